"""Public configs and entry points document every parameter in an ``Args:`` block.

The dataclass configs get theirs from the fields' help (:mod:`hf_extensions.documentation`).
The public entry points (functions, classes with their ``__init__`` parameters, and
``MetaAugConfig``, a transformers ``QuantizationConfigMixin`` whose block is written by hand)
must list each parameter of their signature as ``    name (`` in their own ``Args:`` block, and
nothing that is not a parameter.
"""

import importlib
import inspect
import re

import pytest

from hf_extensions.documentation import document_fields, documented_fields
from hf_extensions.pipelines import ErasureConfig
from peft_configs import PromptPoolConfig, SharedPrefixTuningConfig
from trainers import (
    AgnosticSAMConfig,
    BayesianMutualLearningConfig,
    FHBIConfig,
    HierarchicalPromptCLConfig,
    PGAConfig,
    PromptDSIConfig,
    SAMConfig,
)

CONFIGS = [
    AgnosticSAMConfig,
    BayesianMutualLearningConfig,
    FHBIConfig,
    HierarchicalPromptCLConfig,
    PGAConfig,
    PromptDSIConfig,
    SAMConfig,
    PromptPoolConfig,
    SharedPrefixTuningConfig,
    ErasureConfig,
]


@pytest.mark.parametrize("config_cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_of_ours_has_help_and_appears_in_args(config_cls):
    fields = documented_fields(config_cls)
    assert fields, config_cls
    args = config_cls.__doc__.split("\nArgs:\n", 1)[1]
    for field in fields:
        assert field.metadata.get("help"), f"{config_cls.__name__}.{field.name} has no help text"
        assert f"\n    {field.name} (`" in "\n" + args, field.name


def test_upstream_fields_are_left_to_upstream_docs():
    names = {f.name for f in documented_fields(SAMConfig)}
    assert {"rho", "adaptive", "sharpness_batch_size"} <= names
    assert "learning_rate" not in names and "output_dir" not in names


def test_the_block_is_built_from_the_help_text():
    from dataclasses import dataclass, field

    @document_fields
    @dataclass
    class Demo:
        """A demo."""

        __module__ = "hf_extensions.demo"  # documented_fields keeps our packages' fields only
        width: int = field(default=3, metadata={"help": "How wide."})

    assert Demo.__doc__.endswith("Args:\n    width (`int`, defaults to `3`):\n        How wide.\n")


#: ``module:qualified name`` of every public entry point whose parameters are documented.
ENTRY_POINTS = [
    "hf_extensions.pipelines:erase_concepts",
    "hf_extensions.pipelines:ConceptEraser",
    "hf_extensions.pipelines:evaluate_erasure",
    "hf_extensions.pipelines:save_erased",
    "hf_extensions.pipelines:load_erased",
    "hf_extensions.pipelines:push_erased_to_hub",
    "hf_extensions.pipelines:build_erasure_card",
    "hf_extensions.schedulers:S2NGeneralizedScheduler",
    "hf_extensions.schedulers:run_denoising_loop",
    "hf_extensions.schedulers:make_betas",
    "hf_extensions.schedulers:s2n_coefficients",
    "hf_extensions.quantization:MetaAugConfig",
    "hf_extensions.quantization:MetaAugQuantizer.from_pretrained",
    "hf_extensions.quantization:MetaAugQuantizer.quantize",
    "hf_extensions.quantization:export_integer",
    "hf_extensions.quantization:load_quantized",
    "hf_extensions.quantization:reconstruct_model",
    "hf_extensions.quantization:quantize_model_rtn",
    "hf_extensions.data:add_label_noise",
    "hf_extensions.data:shifted_domains",
    "hf_extensions.data:class_incremental_stream",
    "hf_extensions.data:load_digits",
    "hf_extensions.models.tiny:tiny_vit_classifier",
    "hf_extensions.models.tiny:tiny_clip",
    "hf_extensions.models.tiny:tiny_stable_diffusion_pipeline",
    "hf_extensions.models.tiny:tiny_bert_classifier",
    "hf_extensions.models.tiny:tiny_gpt2",
    "hf_extensions.hub:build_model_card",
    "hf_extensions.cli:finish_training",
    "hf_extensions.cli:summarize",
    "hf_extensions.cli:run_demo",
    "hf_extensions.cli:run_as_script",
    "hf_extensions.models.image_classification:train_image_classifier",
]

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _resolve(path: str):
    module, _, qualname = path.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def documented_args(doc: str) -> list[str]:
    """The names of the entries of ``doc``'s ``Args:`` block (lines ``name (`` one level in)."""
    lines = inspect.cleandoc(doc).splitlines()
    starts = [n for n, line in enumerate(lines) if line.strip() == "Args:"]
    assert len(starts) == 1, f"expected one Args: section, found {len(starts)}"
    indent = len(lines[starts[0]]) - len(lines[starts[0]].lstrip())
    entry = re.compile("^" + " " * (indent + 4) + r"(\w+) \(")
    names = []
    for line in lines[starts[0] + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break  # the next section (Returns:, Raises:, prose) ends the block
        match = entry.match(line)
        if match:
            names.append(match.group(1))
    return names


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=lambda p: p.replace(":", "."))
def test_entry_point_documents_every_parameter(path):
    obj = _resolve(path)
    documented = documented_args(obj.__doc__ or "")  # __doc__: a class's own, not inherited
    parameters = inspect.signature(obj).parameters.values()
    required = [
        p.name for p in parameters if p.name not in ("self", "cls") and p.kind not in _VARIADIC
    ]
    missing = [name for name in required if name not in documented]
    assert not missing, f"{path}: parameters missing from Args: {missing}"
    unknown = [name for name in documented if name not in {p.name for p in parameters}]
    assert not unknown, f"{path}: Args entries that are not parameters: {unknown}"
    assert len(documented) == len(set(documented)), f"{path}: an entry is repeated"


def test_args_block_ends_at_the_next_section():
    doc = """Summary.

    Args:
        width (`int`):
            How wide.
            height (`int`): an indented continuation, not an entry.

    Returns:
        depth (`int`): not an entry either.
    """
    assert documented_args(doc) == ["width"]
