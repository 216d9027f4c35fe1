"""Every public config documents each of its own fields (``Args:`` from the fields' help).

``MetaAugConfig`` (a transformers ``QuantizationConfigMixin``) lists its fields by hand in its
docstring and is not covered here yet.
"""

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
