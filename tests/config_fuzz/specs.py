"""Every public config class of the project, the fields the fuzz draws, and how it is built.

:data:`SPECS` is checked against the packages' exports (``tests/test_config_fuzz.py``): a new
public config class that is missing here fails that test.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

import peft_configs
from hf_extensions.bnn.posterior import GAUSSIAN_DIVERGENCES
from hf_extensions.fhbi.kernels import KERNEL_GRAD_SIGNS, KERNEL_SCOPES
from hf_extensions.hierarchical_cl.taxonomy import OT_SOLVERS
from hf_extensions.models.image_classification import ImageClassificationArguments
from hf_extensions.perturbation import PERTURBATION_NORMS
from hf_extensions.pipelines import config as erasure_config
from hf_extensions.pipelines.config import ErasureConfig
from hf_extensions.quantization.config import METHODS as QUANT_METHODS
from hf_extensions.quantization.config import QUANT_METHOD, MetaAugConfig
from hf_extensions.schedulers import S2NFlowMatchScheduler, S2NGeneralizedScheduler
from hf_extensions.schedulers.snr import BETA_SCHEDULES
from peft_configs.prompt_pool.config import KEY_SOURCES, QUERY_SOURCES
from peft_configs.registration import RegisteredPeftConfig
from peft_configs.shared_prefix.config import SHARE_CHOICES
from trainers import (
    AgnosticSAMConfig,
    BayesianMutualLearningConfig,
    FHBIConfig,
    HierarchicalPromptCLConfig,
    MethodConfig,
    PerturbationConfig,
    PGAConfig,
    PromptDSIConfig,
    SAMConfig,
    agnostic_sam_config,
    bnn_mutual_config,
    fhbi_config,
    prompt_dsi_config,
)

from .values import Field, fields_of

#: ``TrainingArguments`` fields every method config validates (the optimisation settings a run
#: and its model card depend on).
TRAINING_FIELDS = (
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "num_train_epochs",
    "max_steps",
    "warmup_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
)
_TRAINING_KINDS = {
    "max_steps": "int",
    "per_device_train_batch_size": "int",
    "gradient_accumulation_steps": "int",
    "seed": "int",
}


def training_fields() -> tuple[Field, ...]:
    run = {
        "learning_rate": st.sampled_from([0.0, 1e-3, 0.1]),
        "weight_decay": st.sampled_from([0.0, 0.01, 1.0]),
        "adam_beta1": st.sampled_from([0.0, 0.5, 0.9, 1.0]),
        "adam_beta2": st.sampled_from([0.0, 0.999, 1.0]),
        "adam_epsilon": st.sampled_from([0.0, 1e-8, 1.0]),
        "max_grad_norm": st.sampled_from([0.0, 1e-3, 1.0]),
        "num_train_epochs": st.sampled_from([0.0, 1.0]),
        "max_steps": st.integers(-2, 2),
        "warmup_steps": st.sampled_from([0, 0.5, 1, 5]),
        "per_device_train_batch_size": st.integers(-1, 4),
        "gradient_accumulation_steps": st.integers(-1, 2),
        "seed": st.sampled_from([-1, 0, 2**31 - 1, 2**31]),
    }
    return tuple(
        Field(name, _TRAINING_KINDS.get(name, "float"), False, (), run[name])
        for name in TRAINING_FIELDS
    )


def own_fields(cls: type, base: type) -> list[str]:
    """Fields ``cls`` declares or re-declares on top of ``base``."""
    inherited = {f.name for f in dataclasses.fields(base)}
    declared = set()
    for klass in cls.__mro__:
        if klass is base:
            break
        declared |= set(vars(klass).get("__annotations__", {}))
    return [
        f.name for f in dataclasses.fields(cls) if f.name not in inherited or f.name in declared
    ]


@dataclass(frozen=True)
class ConfigSpec:
    """One public config class: how to build it from field overrides, its fields, how an
    accepted config is saved (``to_json``) and how it is run (``runner``: a name in
    :mod:`runs`, ``None`` for abstract bases, with the reason in ``no_run``)."""

    cls: type
    build: Callable[..., Any]
    fields: tuple[Field, ...]
    to_json: Callable[[Any], str]
    runner: str | None = None
    no_run: str = ""
    #: Overrides a run always applies on top of the drawn ones (a setting the tiny model needs).
    run_base: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cls.__name__

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)


def _training(cls: type, choices=None, run=None, **kwargs) -> ConfigSpec:
    from transformers import TrainingArguments

    inherited = {f.name: f for f in training_fields()}
    own = fields_of(cls, own_fields(cls, TrainingArguments), choices, run)
    # a re-declared TrainingArguments field (a method's own default) keeps the run values
    own = tuple(inherited.pop(f.name) if f.name in inherited else f for f in own)
    fields = own + tuple(inherited.values())
    return ConfigSpec(
        cls,
        lambda **o: cls(**{"output_dir": "unused", "report_to": [], **o}),
        fields,
        lambda c: c.to_json_string(),
        **kwargs,
    )


def _peft(cls: type, choices=None, run=None, **kwargs) -> ConfigSpec:
    from peft.config import PeftConfig

    return ConfigSpec(
        cls,
        lambda **o: cls(**o),
        fields_of(cls, own_fields(cls, PeftConfig), choices, run),
        lambda c: json.dumps(c.to_dict(), allow_nan=False),
        **kwargs,
    )


def _plain(cls: type, names, choices=None, run=None, to_json=None, **kwargs) -> ConfigSpec:
    return ConfigSpec(
        cls,
        lambda **o: cls(**o),
        fields_of(cls, names, choices, run),
        to_json or (lambda c: json.dumps(dataclasses.asdict(c), allow_nan=False)),
        **kwargs,
    )


_PERTURBATION = {"perturb_norm": PERTURBATION_NORMS}
_SMALL = st.integers(-1, 3)
#: A size past what the tiny models / data hold (more topics than rows, a context longer than
#: CLIP's 77 positions): its run must be refused naming the field.
_LARGE = st.sampled_from([40, 80])
_RATIO = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])


def _s2n_fields() -> tuple[Field, ...]:
    """The scheduler's ``__init__`` arguments (registered to its config)."""
    kinds = {
        "num_train_timesteps": "int",
        "beta_start": "float",
        "beta_end": "float",
        "beta_schedule": "str",
        "clip_sample": "bool",
        "set_alpha_to_one": "bool",
        "steps_offset": "int",
        "prediction_type": "str",
        "thresholding": "bool",
        "dynamic_thresholding_ratio": "float",
        "clip_sample_range": "float",
        "sample_max_value": "float",
        "timestep_spacing": "str",
        "rescale_betas_zero_snr": "bool",
        "rho": "float",
        "s_noise": "float",
        "rho_t_min": "int",
        "rho_t_max": "int",
        "solver_order": "int",
        "prev_timestep_rule": "str",
        "trained_betas": "list[float]",
    }
    choices = {
        "beta_schedule": BETA_SCHEDULES,
        "prediction_type": ("epsilon", "sample", "v_prediction"),
        "timestep_spacing": ("leading", "trailing", "linspace"),
        "prev_timestep_rule": ("ddim", "next"),
    }
    run = {
        "num_train_timesteps": st.integers(0, 60) | _LARGE,
        "beta_start": st.sampled_from([0.0, 1e-4, 0.01, 0.5, 1.0]),
        "beta_end": st.sampled_from([0.0, 0.02, 0.5, 1.0]),
        "steps_offset": st.integers(-1, 3) | _LARGE,
        "dynamic_thresholding_ratio": _RATIO,
        "rho_t_min": st.integers(-1, 40),
        "rho_t_max": st.integers(-1, 40),
        "solver_order": st.integers(0, 3),
        "trained_betas": st.lists(st.sampled_from([0.0, 0.01, 0.5, 1.0]), max_size=4),
    }
    params = inspect.signature(S2NGeneralizedScheduler.__init__).parameters
    out = []
    for name in params:
        if name == "self":
            continue
        kind = kinds[name]  # a new argument must be described here
        optional = params[name].default is None
        out.append(Field(name, kind, optional, tuple(choices.get(name, ())), run.get(name)))
    return tuple(out)


SPECS: tuple[ConfigSpec, ...] = (
    _training(MethodConfig, runner=None, no_run="abstract base: no trainer of its own"),
    _training(
        PerturbationConfig,
        _PERTURBATION,
        runner=None,
        no_run="abstract base of the SAM family: run through SAMConfig / AgnosticSAMConfig",
    ),
    _training(SAMConfig, _PERTURBATION, {"sharpness_batch_size": _SMALL}, runner="sam"),
    _training(
        AgnosticSAMConfig,
        {**_PERTURBATION, "final_grad_on": agnostic_sam_config.FINAL_GRADIENT_SPLITS},
        {"sharpness_batch_size": _SMALL, "val_fraction": _RATIO},
        runner="agnostic_sam",
    ),
    _training(
        FHBIConfig,
        {
            **_PERTURBATION,
            "kernel": fhbi_config.KERNELS,
            "kernel_scope": KERNEL_SCOPES,
            "kernel_grad_sign": KERNEL_GRAD_SIGNS,
            "ascent_norm": fhbi_config.ASCENT_NORMS,
            "likelihood": fhbi_config.LIKELIHOODS,
        },
        {"num_particles": _SMALL, "sharpness_batch_size": _SMALL},
        runner="fhbi",
    ),
    _training(
        BayesianMutualLearningConfig,
        {
            "parameter_divergence": GAUSSIAN_DIVERGENCES,
            "parameter_diversity_bound": bnn_mutual_config.PARAMETER_BOUNDS,
            "parameter_diversity_normalization": bnn_mutual_config.PARAMETER_NORMALIZATIONS,
            "feature_divergence": bnn_mutual_config.FEATURE_DIVERGENCES,
            "feature_diversity_bound": bnn_mutual_config.FEATURE_BOUNDS,
        },
        {
            "kl_dataset_size": _SMALL,
            "mc_samples": _SMALL,
            "feature_layers": st.lists(st.sampled_from(["net.1", "net", "x", ""]), max_size=2),
            "mutual_temperature": st.sampled_from([0.0, 0.01, 1.0, 100.0]),
            "feature_temperature": st.sampled_from([0.0, 0.01, 1.0, 100.0]),
        },
        runner="bnn",
        run_base={"feature_layers": ["net.1"]},
    ),
    _training(
        HierarchicalPromptCLConfig,
        {"ot_solver": OT_SOLVERS},
        {
            "ot_samples": st.integers(0, 8),
            "num_components": _SMALL,
            "replay_factor": _SMALL,
            "num_groups": _SMALL,
            "ca_epochs": _SMALL,
            "ca_samples_per_class": st.integers(0, 8),
            "tii_epochs": _SMALL,
            "num_train_epochs": st.sampled_from([0.0, 1.0]),
            "head_name": st.sampled_from(["classifier", "vit", "x", ""]),
            "hide_temperature": st.sampled_from([0.0, 0.01, 1.0, 100.0]),
            "supcon_temperature": st.sampled_from([0.0, 0.01, 1.0, 100.0]),
            "ot_delta": st.sampled_from([0.0, 0.01, 1.0, 100.0]),
        },
        runner="hierarchical_cl",
    ),
    _training(
        PromptDSIConfig,
        {"strategy": prompt_dsi_config.STRATEGIES},
        {"num_train_epochs": st.sampled_from([0.0, 1.0])},
        runner="prompt_dsi",
    ),
    _training(
        PGAConfig,
        None,
        {
            "n_ctx_shared": _SMALL | _LARGE,
            "n_ctx_domain": _SMALL | _LARGE,
            "pseudo_label_threshold": _RATIO,
            "target_domain": st.sampled_from(["target", "source", "x", ""]),
        },
        runner="pga",
    ),
    _peft(
        RegisteredPeftConfig,
        runner=None,
        no_run="abstract base of the PEFT configs (no fields of its own): run through "
        "PromptPoolConfig / SharedPrefixTuningConfig",
    ),
    _peft(
        peft_configs.PromptPoolConfig,
        {"key_source": KEY_SOURCES, "query_source": QUERY_SOURCES},
        {
            "pool_size": _SMALL | _LARGE,
            "prompt_length": _SMALL,
            "top_k": _SMALL,
            "query_layer": _SMALL,
            "format_version": _SMALL,
            "modules_to_save": st.sampled_from([["classifier"], ["nope"], []]),
        },
        runner="prompt_pool",
    ),
    _peft(
        peft_configs.SharedPrefixTuningConfig,
        {"share": SHARE_CHOICES},
        {
            "num_virtual_tokens": _SMALL,
            "hidden_size": _SMALL,
            "latent_dim": _SMALL,
            "format_version": _SMALL,
            "dropout": _RATIO,
            "modules_to_save": st.sampled_from([["classifier"], ["nope"], []]),
        },
        runner="shared_prefix",
    ),
    _plain(
        ErasureConfig,
        [f.name for f in dataclasses.fields(ErasureConfig)],
        {
            "parameter_group": erasure_config.PARAMETER_GROUPS,
            "loss_space": erasure_config.LOSS_SPACES,
            "mixed_precision": ("no",),
            "adversary_estimator": erasure_config.ADVERSARY_ESTIMATORS,
            "adversary_reference": erasure_config.ADVERSARY_REFERENCES,
            "candidate_template": ("{}", "a {}", "a photo"),
        },
        {
            "num_steps": _SMALL,
            "gradient_accumulation_steps": _SMALL,
            "ddim_steps": _SMALL,
            "k_closest": st.integers(0, 4),
            "num_centers": st.integers(0, 4),
            "pgd_num_steps": _SMALL,
            "height": st.sampled_from([None, 0, 7, 8, 16]),
            "width": st.sampled_from([None, 0, 7, 8, 16]),
            "candidates": st.lists(st.sampled_from(["dog", "cat", "tree", ""]), max_size=4),
            "preserve_concepts": st.lists(st.sampled_from(["a photo", ""]), max_size=2),
        },
        runner="erasure",
    ),
    ConfigSpec(
        S2NGeneralizedScheduler,
        lambda **o: S2NGeneralizedScheduler(**o),
        _s2n_fields(),
        lambda s: s.to_json_string(),
        runner="s2n",
    ),
    ConfigSpec(
        # our arguments only: the rest are FlowMatchEulerDiscreteScheduler's, validated there
        S2NFlowMatchScheduler,
        lambda **o: S2NFlowMatchScheduler(**o),
        (
            Field("rho", "float"),
            Field("s_noise", "float"),
            Field("stochastic_sampling", "bool"),
            Field("invert_sigmas", "bool"),
        ),
        lambda s: s.to_json_string(),
        runner=None,
        no_run="its step is S2NGeneralizedScheduler's update on flow-matching sigmas: runs are "
        "fuzzed through that scheduler; tests/test_s2n_flow.py checks the flow step itself",
    ),
    _plain(
        MetaAugConfig,
        [f.name for f in dataclasses.fields(MetaAugConfig)],
        {"method": QUANT_METHODS, "quant_method": (QUANT_METHOD,)},
        {
            "weight_bits": st.integers(1, 9),
            "activation_bits": st.integers(1, 9),
            "iterations": _SMALL,
            "batch_size": st.integers(0, 8),
            "max_block_layers": _SMALL,
            "meta_iterations": _SMALL,
            "transform_channels": _SMALL,
            "transform_blocks": _SMALL,
            "warmup": _RATIO,
            "drop_prob": _RATIO,
            "seed": st.integers(-1, 3),
            "block_names": st.sampled_from([None, ["layer1"], ["stem"], ["nope"], []]),
            "modules_to_not_convert": st.sampled_from(
                [None, ["fc"], ["nope"], [], ["conv1", "layer1", "layer2", "fc"]]
            ),
        },
        to_json=lambda c: c.to_json_string(),
        runner="metaaug",
    ),
    _plain(
        ImageClassificationArguments,
        [f.name for f in dataclasses.fields(ImageClassificationArguments)],
        None,
        {
            "model_name_or_path": st.just(None),
            "dataset_name": st.just(None),
            "image_size": st.integers(0, 12),
            "num_channels": st.integers(0, 3),
            "patch_size": st.integers(0, 5),
            "hidden_size": st.sampled_from([0, 8, 30, 32]),
            "num_layers": _SMALL,
            "split_seed": st.integers(-1, 3),
            "max_train_samples": st.integers(0, 40),
            "label_noise": _RATIO,
            "validation_size": _RATIO,
        },
        runner="image_classification",
    ),
)

BY_NAME: Mapping[str, ConfigSpec] = {spec.name: spec for spec in SPECS}
