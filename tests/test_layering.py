"""The import rules of the layout (README "Layout", ../shared/DESIGN.md "Which way imports flow").

Read from the source with ``ast`` (nothing is imported), every ``import`` counted, also those
inside functions:

- no import cycle between our modules;
- the core (``hf_extensions`` outside the method packages) imports no method package, trainer,
  PEFT method, recipe or benchmark;
- a method package imports no other method package, and no trainer, recipe or benchmark;
- ``peft_configs`` imports no trainer; benchmarks import no recipe;
- nothing outside ``tests/`` imports the test helpers ``hf_extensions.testing``.

One exception, by design: the package ``hf_extensions`` itself (its ``__init__``) imports the
quantization package, so that ``import hf_extensions`` registers the quantization method with
transformers (as ``import peft_configs`` registers the PEFT methods).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("hf_extensions", "trainers", "peft_configs", "recipes", "benchmarks")
#: hf_extensions' method packages: each may use the core, never another method package.
METHOD_PACKAGES = (
    "hf_extensions.bnn",
    "hf_extensions.fhbi",
    "hf_extensions.hierarchical_cl",
    "hf_extensions.pga",
    "hf_extensions.pipelines",
    "hf_extensions.prompt_dsi",
    "hf_extensions.quantization",
    "hf_extensions.schedulers",
)
TESTING = "hf_extensions.testing"
#: Importers allowed to reach a method package from the core: plug-in registration on import.
REGISTRATION = {"hf_extensions": {"hf_extensions.quantization"}}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(root: Path) -> dict[str, Path]:
    """Every module of the top-level packages (and the tests), by dotted name."""
    modules = {}
    for top in (*TOP_LEVEL, "tests"):
        for path in sorted((root / top).rglob("*.py")):
            modules[module_name(path, root)] = path
    return modules


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``None`` for third-party names)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules that ``module`` imports, anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = _resolve(name, known)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = discover(root)
    return {module: imports_of(module, path, known) for module, path in known.items()}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _method_package(module: str) -> str | None:
    return next((p for p in METHOD_PACKAGES if _within(module, p)), None)


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a rule of the module docstring, as 'importer -> imported: why'."""
    found = []
    for module, targets in graph.items():
        if _within(module, "tests"):
            continue
        own_method = _method_package(module)
        for target in sorted(targets):
            why = None
            if _within(target, TESTING) and not _within(module, TESTING):
                why = "shipped code, recipes and benchmarks never import the test helpers"
            elif _within(target, "tests"):
                why = "nothing outside tests/ imports tests/"
            elif _within(module, "benchmarks") and _within(target, "recipes"):
                why = "a benchmark never imports a recipe (move the shared code into the package)"
            elif _within(module, "peft_configs") and _within(target, "trainers"):
                why = "peft_configs never imports trainers"
            elif _within(module, "hf_extensions"):
                if target.split(".")[0] in ("trainers", "peft_configs", "recipes", "benchmarks"):
                    why = "hf_extensions imports no trainer, PEFT method, recipe or benchmark"
                elif _method_package(target) not in (None, own_method):
                    why = (
                        "the core imports no method package"
                        if own_method is None
                        else "a method package never imports another (move the shared part "
                        "into the core)"
                    )
            if why is not None and target not in REGISTRATION.get(module, ()):
                found.append(f"{module} -> {target}: {why}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (one per strongly connected component of 2+ modules)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(start: str) -> None:  # iterative Tarjan
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return components


def _graph_without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exporting its submodules, which import each other through
    the package, is how Python packages are built, not a cycle: edges to a package that
    contains the importer are dropped."""
    return {
        module: {t for t in targets if not _within(module, t)} for module, targets in graph.items()
    }


def test_the_import_graph_reads_every_module_and_resolves_relative_imports():
    graph = import_graph()
    assert "hf_extensions.perturbation" in graph["trainers.perturbation_trainer"]
    assert "hf_extensions.data.digits" in graph["hf_extensions.data"]  # `from .digits import`
    assert len(graph) > 150


def test_no_import_cycles():
    found = cycles(_graph_without_package_inits(import_graph()))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_follow_the_layers():
    found = violations(import_graph())
    assert not found, "layering violations:\n" + "\n".join(found)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


BASE_TREE = {
    **{f"{top}/__init__.py": "" for top in (*TOP_LEVEL, "tests")},
    "hf_extensions/testing/__init__.py": "",
    "hf_extensions/core.py": "import torch\n",
    "hf_extensions/fhbi/__init__.py": "",
    "hf_extensions/fhbi/kernels.py": "from hf_extensions import core\n",
    "trainers/fhbi_trainer.py": "from hf_extensions.fhbi.kernels import x\n",
    "recipes/fhbi/__init__.py": "",
    "recipes/fhbi/train.py": "from trainers.fhbi_trainer import y\n",
    "benchmarks/fhbi.py": "import trainers.fhbi_trainer\n",
    "tests/test_x.py": "from hf_extensions.testing import fake_hub\n",
}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, None),
        (
            {"hf_extensions/core.py": "def f():\n    from hf_extensions.testing import fake_hub\n"},
            "never import the test helpers",
        ),
        ({"benchmarks/fhbi.py": "from recipes.fhbi.train import main\n"}, "never imports a recipe"),
        ({"peft_configs/x.py": "import trainers.fhbi_trainer\n"}, "never imports trainers"),
        ({"hf_extensions/core.py": "from .fhbi import kernels\n"}, "no method package"),
        (
            {
                "hf_extensions/bnn/__init__.py": "",
                "hf_extensions/bnn/peers.py": "from hf_extensions.fhbi.kernels import k\n",
            },
            "never imports another",
        ),
        ({"hf_extensions/core.py": "import trainers.fhbi_trainer\n"}, "imports no trainer"),
        (
            {
                "hf_extensions/fhbi/kernels.py": "from . import particles\n",
                "hf_extensions/fhbi/particles.py": "from .kernels import k\n",
            },
            "cycle",
        ),
    ],
)
def test_the_rules_catch_a_planted_violation(tmp_path, extra, expected):
    _write(tmp_path, {**BASE_TREE, **extra})
    graph = import_graph(tmp_path)
    problems = violations(graph) + [
        "cycle: " + " <-> ".join(c) for c in cycles(_graph_without_package_inits(graph))
    ]
    if expected is None:
        assert problems == []
    else:
        assert any(expected in problem for problem in problems), problems
