"""Static device audit (issue 27): what breaks or slows a step on an accelerator, found in the
source of the modules whose code runs per training or sampling step.

In those modules

* a tensor factory (``torch.zeros``, ``torch.randn``, ``torch.arange``, ``torch.tensor``, ...)
  names its ``device``, and a ``torch.Generator`` names its device;
* a host copy or sync (``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``) does not happen;

unless the statement says why it is right on the host: a ``# host: <reason>`` comment on one of
its lines (a compound statement's header lines) or in the comment lines right above it (drawn on the CPU so that results do not depend
on the device, a CPU-only library's boundary, saving, once per task, an error message, ...).
Calls inside a ``raise`` statement are error paths and exempt. ``*_like`` factories and
``tensor.new_*`` inherit their device and are not factories here; a factory given ``**kwargs``
is taken to receive its device there.

The test fails with the file, line and fix of every unexplained call, so a new one is either
moved to the device or explained where it is written.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Modules of those packages that run in no step: float64 reference mathematics on the host
#: (Gaussian-mixture MMSE, schedule tables, as diffusers keeps its own on the host), the ONNX
#: export (host by nature), the quantization recipe's model builders and evaluation.
NOT_STEP_PATHS = {
    ROOT / "hf_extensions" / "schedulers" / "information.py",
    ROOT / "hf_extensions" / "schedulers" / "snr.py",
    ROOT / "hf_extensions" / "quantization" / "onnx_export.py",
    ROOT / "hf_extensions" / "quantization" / "models.py",
}
#: Modules whose code runs in the training or sampling step of some method.
HOT_PATH_MODULES = sorted(
    {
        *ROOT.glob("trainers/*_trainer.py"),
        ROOT / "hf_extensions" / "perturbation.py",
        *ROOT.glob("hf_extensions/fhbi/*.py"),
        *ROOT.glob("hf_extensions/bnn/*.py"),
        *ROOT.glob("hf_extensions/pga/*.py"),
        *ROOT.glob("hf_extensions/hierarchical_cl/*.py"),
        *ROOT.glob("hf_extensions/prompt_dsi/*.py"),
        *ROOT.glob("hf_extensions/pipelines/*.py"),
        *ROOT.glob("hf_extensions/quantization/*.py"),
        *ROOT.glob("hf_extensions/schedulers/*.py"),
        *ROOT.glob("peft_configs/**/*.py"),
    }
    - NOT_STEP_PATHS
)

FACTORIES = {
    "zeros", "ones", "full", "empty", "rand", "randn", "randint", "randperm", "arange",
    "tensor", "as_tensor", "eye", "linspace", "logspace", "normal",
}  # fmt: skip
HOST_CALLS = {"item", "tolist", "numpy", "cpu"}
MARK = "# host:"


def _explained(lines: list[str], first: int, last: int) -> bool:
    """Whether lines ``first..last`` (1-based) or the comment block right above carry MARK."""
    if any(MARK in lines[i - 1] for i in range(first, last + 1)):
        return True
    above = first - 1
    while above >= 1 and lines[above - 1].strip().startswith("#"):
        if MARK in lines[above - 1]:
            return True
        above -= 1
    return False


def _in_raise(tree: ast.AST) -> set[int]:
    return {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.Raise)
            for node in ast.walk(stmt)}  # fmt: skip


def _statement_lines(tree: ast.AST) -> dict[int, tuple[int, int]]:
    """For every node, the lines of its innermost enclosing statement (a compound statement's
    header only: ``for ...:`` without its body)."""
    spans: dict[int, tuple[int, int]] = {}

    def visit(node: ast.AST, span: tuple[int, int] | None) -> None:
        if isinstance(node, ast.stmt):
            body = getattr(node, "body", None)
            last = body[0].lineno - 1 if body and isinstance(body, list) else node.end_lineno
            span = (node.lineno, max(node.lineno, last or node.lineno))
        if span is not None:
            spans[id(node)] = span
        for child in ast.iter_child_nodes(node):
            visit(child, span)

    visit(tree, None)
    return spans


def unexplained_calls(path: Path) -> list[str]:
    """``file:line: what -- fix`` for every unexplained factory, generator or host call."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    error_paths = _in_raise(tree)
    statements = _statement_lines(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in error_paths:
            continue
        func, problem = node.func, None
        keywords = {k.arg for k in node.keywords}  # None: a ``**factory`` that may hold it
        if None in keywords:
            keywords.add("device")
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if func.value.id == "torch" and func.attr in FACTORIES and "device" not in keywords:
                problem = f"torch.{func.attr} without device= (pass the inputs' device)"
            unplaced = not node.args and "device" not in keywords
            if func.value.id == "torch" and func.attr == "Generator" and unplaced:
                problem = "torch.Generator() on the CPU (pass device=)"
        if isinstance(func, ast.Attribute) and func.attr in HOST_CALLS and not node.args:
            problem = f".{func.attr}() copies to the host (keep it on the device)"
        if problem and not _explained(lines, *statements[id(node)]):
            relative = path.relative_to(ROOT)
            found.append(f"{relative}:{node.lineno}: {problem}, or say why with `{MARK} ...`")
    return found


def test_hot_path_modules_exist():
    assert len(HOT_PATH_MODULES) >= 20
    assert all(path.is_file() for path in HOT_PATH_MODULES)


@pytest.mark.parametrize("path", HOT_PATH_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unexplained_host_tensors(path):
    assert unexplained_calls(path) == []


def test_audit_catches_each_pattern(tmp_path):
    """The checker itself: each pattern is found, and the exemptions exempt."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\n"
        "def step(x, loss):\n"
        "    noise = torch.randn(3)\n"
        "    g = torch.Generator()\n"
        "    value = loss.item()\n"
        "    host = x.cpu()\n"
        "    fine = torch.zeros(3, device=x.device)\n"
        "    ok = loss.item()  # host: logged once per epoch\n"
        "    # host: drawn on the CPU for device-independent draws\n"
        "    also_ok = torch.rand(\n"
        "        3)\n"
        "    if fine.sum() < 0:\n"
        "        raise ValueError(f'{x.tolist()}')\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = unexplained_calls(bad)
    finally:
        ROOT = saved
    assert [line.split(":")[1] for line in found] == ["3", "4", "5", "6"]
