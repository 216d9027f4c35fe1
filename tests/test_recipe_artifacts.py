"""Every recipe, launched as a user launches it on two processes with ``--push_to_hub``:

* exactly one push (one commit to one repository, counted by the fake Hub of each process);
* one artifact: what was pushed is exactly the saved folder, and rank 1 wrote nothing at all
  (each rank runs in a working folder of its own, so a write from rank 1 shows up there);
* the run ends with its figures, where the artifact is and the line that loads it;
* the Python blocks of the pushed model card(s) run in a fresh process on the pushed copy
  (the Hub id replaced by the fake Hub's folder): every artifact kind reloads and runs from what
  was pushed, without the recipe.

Each case is one launch at the tiniest settings (20-40 s on a 2-core machine) plus one fresh
process per code block, so they are marked slow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hf_extensions.hub import ARTIFACT_PLACEHOLDER
from hf_extensions.testing.distributed import launch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "recipe_artifacts.py"
RECIPES = ROOT / "recipes"
TRAINER = "--max_steps 2 --eval_strategy no "
CODE_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


@dataclass
class Case:
    module: str
    config: str
    flags: str
    saved: str = "out"  # the folder the recipe saves and pushes, relative to the rank's folder
    cards: tuple[str, ...] = ("README.md",)  # the pushed cards whose code blocks must run


CASES = {
    "example": Case(
        "recipes.example.train", "example/digits.yaml", TRAINER + "--max_train_samples 64"
    ),
    "agnostic_sam": Case(
        "recipes.agnostic_sam.train",
        "agnostic_sam/digits_noisy.yaml",
        TRAINER + "--max_train_samples 64",
    ),
    "fhbi": Case(
        "recipes.fhbi.train",
        "fhbi/digits.yaml",
        TRAINER + "--max_train_samples 64 --num_particles 2",
    ),
    "bnn_mutual": Case(
        "recipes.bnn_mutual.train",
        "bnn_mutual/digits.yaml",
        TRAINER + "--max_train_samples 64 --mc_samples 2",
    ),
    "hierarchical_cl": Case(
        "recipes.hierarchical_cl.train",
        "hierarchical_cl/digits.yaml",
        "--num_tasks 2 --upstream_epochs 1 --num_train_epochs 1 --ca_epochs 1 --tii_epochs 1",
    ),
    "pga": Case("recipes.pga.train", "pga/digits.yaml", TRAINER + "--clip_pretrain_steps 5"),
    "prompt_dsi": Case(
        "recipes.prompt_dsi.train",
        "prompt_dsi/embedded.yaml",
        "--num_initial 20 --num_increments 1 --docs_per_increment 10 --num_train_epochs 1 "
        "--max_length 16 --d0_head_steps 10",
    ),
    "shared_prefix": Case(
        "recipes.shared_prefix.train",
        "shared_prefix/digits_vit.yaml",
        "--max_steps 2 --pretrain_epochs 1 --max_train_samples 64 --save_materialized true",
    ),
    "quantization": Case(
        "recipes.quantization.train",
        "quantization/digits.yaml",
        "--train_epochs 1 --settings w4a4 --iterations 5 --meta_iterations 2 "
        "--num_calibration 16 --max_eval_samples 32",
        cards=("README.md", "w4a4/README.md"),
    ),
    "erasure": Case(
        "recipes.erasure.train",
        "erasure/tiny.yaml",
        "--num_steps 3 --k_closest 6 --num_centers 3 --eval_samples 1 "
        "--candidates dog cat tree house car boat",
        saved="out/pipeline",
    ),
    "s2n": Case(
        "recipes.s2n.sample",
        "s2n/tiny.yaml",
        "--rhos 0 1 --num_inference_steps 2 --num_images 1",
        saved="out/pipeline",
    ),
}


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def run_code_blocks(card: Path, replacements: dict[str, str], cwd: Path) -> list[str]:
    """Run every Python block of ``card`` in a fresh interpreter (``replacements`` applied to
    its text first); return the blocks. Fails with the block and its output on a non-zero exit."""
    text = card.read_text()
    for old, new in replacements.items():
        text = text.replace(f'"{old}"', json.dumps(new))
    blocks = CODE_BLOCK.findall(text)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for code in blocks:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{card}:\n{code}\n--- output:\n{done.stderr[-3000:]}"
    return blocks


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CASES))
def test_two_process_run_pushes_one_artifact_whose_card_runs(name, tmp_path):
    case = CASES[name]
    repo_id = f"fake-user/{name.replace('_', '-')}"
    argv = [str(tmp_path), case.module, "--config", str(RECIPES / case.config), "--output_dir",
            "out", *case.flags.split(), "--push_to_hub", "true", "--hub_model_id", repo_id]  # fmt: skip
    start = time.perf_counter()
    main, other = launch(SCRIPT, argv, num_processes=2, cwd=ROOT)
    launched = time.perf_counter()

    # exactly one push, from the main process
    assert other.values["commits"] == []
    assert len(main.values["commits"]) == 1, main.values["commits"]
    (commit,) = main.values["commits"]
    assert commit["repo_id"] == repo_id
    # rank 1 wrote nothing (its folder holds only the empty fake-Hub root)
    assert _files(tmp_path / "rank1") == []
    # one artifact: the pushed repository is the saved folder, file for file
    saved = tmp_path / "rank0" / case.saved
    pushed = tmp_path / "rank0" / "hub" / repo_id
    assert _files(pushed) == _files(saved) == sorted(commit["added"])
    assert not [f for f in _files(saved) if re.search(r"rank_?\d|process_?\d", f)]
    # the run ends with where the artifact is and how to load it
    printed = main.values["stdout"]
    assert f"Saved to {case.saved}" in printed and f"pushed to {repo_id}" in printed
    assert "Load it:" in printed and other.values["stdout"] == ""
    # the card's snippets reload and run what was pushed, in a fresh process
    replacements = {repo_id: str(pushed), ARTIFACT_PLACEHOLDER: str(pushed)}
    blocks = [
        b for card in case.cards for b in run_code_blocks(pushed / card, replacements, tmp_path)
    ]
    assert blocks, f"no usage snippet in {case.cards}"
    seconds = f"launch {launched - start:.1f} s, card code {time.perf_counter() - launched:.1f} s"
    print(f"[{name}] {seconds}; the run ends with:\n" + "\n".join(printed.splitlines()[-6:]))
    if name == "shared_prefix":
        _check_shared_prefix(pushed, blocks)


def _check_shared_prefix(pushed: Path, blocks: list[str]) -> None:
    """Both adapters were pushed, each in its own folder, and both name their backbone."""
    trainable = json.loads((pushed / "adapter_config.json").read_text())
    materialized = json.loads((pushed / "materialized" / "adapter_config.json").read_text())
    assert trainable["materialized"] is False and materialized["materialized"] is True
    assert trainable["base_model_name_or_path"] == "out/base_model"
    assert materialized["base_model_name_or_path"] == "out/base_model"
    assert (pushed / "base_model" / "model.safetensors").is_file()
    assert len(blocks) == 2 and 'subfolder="materialized"' in blocks[1]
