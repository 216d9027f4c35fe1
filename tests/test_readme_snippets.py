"""Every code block of README.md is executed or checked; nothing is skipped silently.

* ```python blocks run as they are, each in a fresh process (``sys.executable``, a temporary
  working directory, the Hub and datasets offline). All of them run concurrently in one fixture
  (they are mostly import time), each test asserts one block's exit status.
* ```bash blocks: every command is checked without running it (files, YAML settings and flags
  exist: a recipe's command line is parsed by the recipe's own parser; ``make`` targets,
  ``benchmarks`` modules, pip extras and the constraint file exist), and the quickstart's
  ``accelerate launch`` runs for real, cut to two steps.
* A block that must not run (it needs a GPU or the Hub) is preceded by
  ``<!-- not-run: reason -->``; those are counted against :data:`EXPECTED_NOT_RUN`.
* Fences without a language (the layout tree) are text.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
import yaml

from hf_extensions import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: Blocks marked ``<!-- not-run: reason -->``; raise it only for a block that cannot run here.
EXPECTED_NOT_RUN = 0
#: Seconds one python block may take (they take a few seconds each).
BLOCK_TIMEOUT = 300
#: The environment of every process this test starts: offline, one thread each (they run side
#: by side).
OFFLINE = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MPLBACKEND": "Agg",
}
_FENCE = re.compile(r"^```(?P<language>[\w-]*)\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)
_NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    code: str
    not_run: str | None  # the reason, for a block marked not to run

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _NOT_RUN.search(before)
        blocks.append(
            Block(
                line=text.count("\n", 0, match.start()) + 1,
                language=match["language"],
                code=match["code"],
                not_run=marker["reason"] if marker else None,
            )
        )
    return blocks


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b.language == "python" and b.not_run is None]
SHELL = [b for b in BLOCKS if b.language == "bash" and b.not_run is None]


def test_every_block_is_run_checked_marked_or_text():
    not_run = [b for b in BLOCKS if b.not_run is not None]
    unknown = [b.id for b in BLOCKS if b.language not in ("python", "bash", "")]
    assert not unknown, f"blocks of a language this test neither runs nor checks: {unknown}"
    assert all(b.not_run for b in not_run), "a not-run marker needs a reason"
    assert len(not_run) == EXPECTED_NOT_RUN, [(b.id, b.not_run) for b in not_run]
    assert len(PYTHON) >= 6 and len(SHELL) >= 5  # the quickstarts are there
    assert len(PYTHON) + len(SHELL) + len(not_run) + sum(b.language == "" for b in BLOCKS) == len(
        BLOCKS
    )


# ----------------------------------------------------------------------------- python blocks
def _run_block(block: Block, directory: Path) -> subprocess.CompletedProcess:
    directory.mkdir(parents=True)
    env = {**os.environ, **OFFLINE}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )


@pytest.fixture(scope="module")
def python_results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("readme")
    workers = max(2, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {b.id: pool.submit(_run_block, b, root / f"block-{b.line}") for b in PYTHON}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.id)
def test_python_block_runs_in_a_fresh_process(block, python_results):
    result = python_results[block.id]
    assert result.returncode == 0, f"{block.id} failed:\n{result.stderr[-3000:]}"


# ------------------------------------------------------------------------------ shell blocks
def _commands(block: Block) -> list[list[str]]:
    """The block's commands as argument lists (continuations joined, comments dropped, ``&&``
    chains split)."""
    text = block.code.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            if "&&" in words:
                cut = words.index("&&")
                commands.append(words[:cut])
                words = words[cut + 1 :]
            else:
                commands.append(words)
                words = []
    return commands


class _Parsed(Exception):
    """Raised by the patched recipe parser once the command line is parsed."""


def _check_recipe_arguments(script: Path, argv: list[str], monkeypatch, *, gpu: bool) -> None:
    """Parse ``argv`` with the recipe's own parser (YAML and flags), then stop before it runs.

    On a GPU setting the dataclasses are not built (``TrainingArguments`` refuses ``bf16`` on a
    machine without a GPU): names, YAML keys and value types are checked by argparse alone.
    """
    module = ".".join(script.relative_to(ROOT).with_suffix("").parts)
    recipe = __import__(module, fromlist=["main"])
    original = cli.RecipeArgumentParser.parse

    def parse_then_stop(self, args=None):
        if not gpu:
            raise _Parsed(original(self, args))
        config = self.parse_known_args(args)[0].config
        if config is not None:
            self._apply_yaml_defaults(Path(config))  # refuses unknown keys
        namespace, remaining = self.parse_known_args(args)
        assert not remaining, f"unknown flags {remaining}"
        raise _Parsed(namespace)

    with monkeypatch.context() as patch:
        patch.setattr(cli.RecipeArgumentParser, "parse", parse_then_stop)
        with pytest.raises(_Parsed):
            recipe.main(argv)


def _check_launch(words: list[str], monkeypatch) -> None:
    arguments, gpu = words[2:], False
    if arguments[0] == "--config_file":
        launch_config = yaml.safe_load((ROOT / arguments[1]).read_text())
        gpu = not launch_config.get("use_cpu", False) and launch_config["distributed_type"] != "NO"
        arguments = arguments[2:]
    script, argv = ROOT / arguments[0], arguments[1:]
    assert script.is_file(), script
    _check_recipe_arguments(script, argv, monkeypatch, gpu=gpu)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _check_pip(words: list[str]) -> None:
    extras = set(_pyproject()["project"]["optional-dependencies"])
    for index, word in enumerate(words[2:], start=2):
        if words[index - 1] == "-c":
            assert (ROOT / word).is_file(), word
        for named in re.findall(r"\[([\w,-]+)\]", word):
            assert set(named.split(",")) <= extras, (word, extras)
        if "git+" in word:
            assert word.split("git+", 1)[1] == _repository_url(), word


def _repository_url() -> str:
    return _pyproject()["project"]["urls"]["Documentation"].split("#", 1)[0]


def _check_command(words: list[str], monkeypatch) -> None:
    program = words[0]
    if words[:2] == ["accelerate", "launch"]:
        _check_launch(words, monkeypatch)
    elif words[:3] == ["python", "-m", "pytest"]:
        assert all((ROOT / w).exists() for w in words[3:] if not w.startswith("-")), words
    elif words[:2] == ["python", "-m"]:
        module = ROOT.joinpath(*words[2].split("."))
        assert module.with_suffix(".py").is_file() or module.is_dir(), words[2]
    elif program == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert all(w in targets for w in words[1:] if "=" not in w), (words, targets)
    elif words[:2] == ["pip", "install"]:
        _check_pip(words)
    elif words[:2] == ["git", "clone"]:
        assert words[2] == _repository_url(), words
    elif program == "cd":
        assert words[1] == _repository_url().rsplit("/", 1)[1], words
    else:
        raise AssertionError(f"no check for the README command {shlex.join(words)!r}")


@pytest.mark.parametrize("block", SHELL, ids=lambda b: b.id)
def test_shell_block_files_settings_and_flags_exist(block, monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands' paths are relative to the repository root
    commands = _commands(block)
    assert commands, block.id
    for words in commands:
        _check_command(words, monkeypatch)


def test_the_constraint_file_leaves_the_users_torch_alone():
    # The install section promises that `-c requirements/lock.txt` never replaces a torch build.
    pinned = [
        line.split("==")[0].strip().lower()
        for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    ]
    assert pinned and not any(name == "torch" or name.startswith("nvidia-") for name in pinned)


def test_the_extras_table_lists_exactly_pyprojects_extras():
    text = README.read_text(encoding="utf-8")
    table = text.split("| extra | installs | needed for |", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"^\| `([\w-]+)` \|", table, re.M))
    assert listed == set(_pyproject()["project"]["optional-dependencies"])


def test_the_quickstart_recipe_launches(tmp_path):
    """The quickstart's ``accelerate launch`` command for real, cut to two steps."""
    section = README.read_text(encoding="utf-8").split("### A recipe: `accelerate launch`", 1)[1]
    block = next(b for b in SHELL if b.code in section)
    (words,) = _commands(block)
    assert words[:2] == ["accelerate", "launch"]
    overrides = ["--max_steps", "2", "--eval_strategy", "no", "--output_dir", str(tmp_path)]
    env = {**os.environ, **OFFLINE}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *words[2:], *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy" in result.stdout
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "README.md").is_file()
