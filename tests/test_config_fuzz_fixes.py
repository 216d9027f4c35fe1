"""The defects the config fuzz found, one test each (every one failed before its fix).

Each was: a value accepted that trains NaN or crashes deep inside torch / numpy / diffusers, an
error that does not name the field, a wrong type taken for a setting (``"no"`` is truthy), a
numpy scalar that makes the saved config unwritable, or memory allocated before a check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conformance.case import QUIET, TRAINING, digits
from conformance.metaaug import _calibration_images

from hf_extensions.models import tiny_mlp_classifier
from hf_extensions.models.image_classification import ImageClassificationArguments
from hf_extensions.pipelines import ErasureConfig
from hf_extensions.quantization import MetaAugConfig, MetaAugQuantizer
from hf_extensions.quantization.models import DigitsResNet
from hf_extensions.schedulers import S2NGeneralizedScheduler
from peft_configs import PromptPoolConfig, SharedPrefixTuningConfig
from trainers import (
    AgnosticSAMConfig,
    AgnosticSAMTrainer,
    BayesianMutualLearningConfig,
    FHBIConfig,
    HierarchicalPromptCLConfig,
    PGAConfig,
    PromptDSIConfig,
    SAMConfig,
)


def _refused(field: str, build) -> str:
    """``build()`` raises ``ValueError`` whose message starts with the field; the message."""
    with pytest.raises(ValueError, match=rf"^`{field}`") as error:
        build()
    return str(error.value)


# ----------------------------------------------------------------------------- TrainingArguments


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("learning_rate", math.nan),
        ("learning_rate", "0.1"),
        ("weight_decay", math.inf),
        ("adam_beta1", 1.0),
        ("adam_epsilon", 0.0),
        ("max_grad_norm", -math.inf),
        ("num_train_epochs", math.nan),
        ("per_device_train_batch_size", 0),
        ("gradient_accumulation_steps", 0),
        ("seed", -1),
        ("seed", 2**32 - 1),
    ],
)
def test_method_configs_check_the_inherited_optimisation_numbers(field, value):
    """Stock ``TrainingArguments`` takes all of these; a NaN learning rate, or Adam's eps = 0
    (0 / 0 on a zero gradient), trained NaN weights; seed -1 crashed in numpy, and 2**32 - 1 in
    the k-means of hierarchical CL (which seeds it with seed + 1)."""
    _refused(field, lambda: SAMConfig(**TRAINING, **{field: value}))


def test_adam_epsilon_zero_used_to_train_nan_weights(tmp_path):
    """The run the check prevents: eps = 0 with stock TrainingArguments gives NaN weights."""
    from transformers import Trainer, TrainingArguments

    model = tiny_mlp_classifier()
    args = TrainingArguments(
        str(tmp_path), adam_epsilon=0.0, max_steps=2, per_device_train_batch_size=4, **QUIET
    )
    Trainer(model=model, args=args, train_dataset=digits("vector", 16)).train()
    assert not all(torch.isfinite(p).all() for p in model.parameters())
    _refused("adam_epsilon", lambda: SAMConfig(**TRAINING, adam_epsilon=0.0))


def test_max_grad_norm_none_means_no_clipping_in_every_trainer(tmp_path):
    """None (no clipping, as for the stock Trainer) crashed Agnostic-SAM's clipping with a
    TypeError ('>' between None and int); it is stored as 0.0, the other spelling."""
    args = AgnosticSAMConfig(
        output_dir=str(tmp_path), max_grad_norm=None, max_steps=1, **{**QUIET, "seed": 0}
    )
    model = tiny_mlp_classifier()
    AgnosticSAMTrainer(model=model, args=args, train_dataset=digits("vector", 16)).train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert args.max_grad_norm == 0.0


# ----------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("config_cls", "field", "value"),
    [
        (SAMConfig, "adaptive", "no"),  # truthy: silently ASAM
        (SAMConfig, "freeze_batchnorm_stats", 0),
        (AgnosticSAMConfig, "chain", "False"),
        (HierarchicalPromptCLConfig, "use_ot", 1),
        (PGAConfig, "multi_source", "yes"),
        (PromptDSIConfig, "train_old_rows", 1),
    ],
)
def test_bool_fields_refuse_anything_but_a_bool(config_cls, field, value):
    _refused(field, lambda: config_cls(**TRAINING, **{field: value}))


@pytest.mark.parametrize(
    ("config_cls", "field"),
    [
        (FHBIConfig, "num_particles"),
        (SAMConfig, "sharpness_batch_size"),
        (HierarchicalPromptCLConfig, "ot_samples"),
        (HierarchicalPromptCLConfig, "ca_epochs"),
        (PGAConfig, "n_ctx_shared"),
        (BayesianMutualLearningConfig, "kl_dataset_size"),
    ],
)
def test_integer_fields_refuse_fractions(config_cls, field):
    """``check_range(low=1)`` let 1.5 particles, epochs or context tokens through."""
    _refused(field, lambda: config_cls(**TRAINING, **{field: 1.5}))


def test_numpy_scalars_are_stored_as_plain_python_values(tmp_path):
    """A numpy integer was stored as given, and the saved config could not be written
    (``json`` cannot encode ``numpy.int64``)."""
    args = FHBIConfig(**TRAINING, num_particles=np.int64(3), rho=np.float64(0.1))
    assert type(args.num_particles) is int and type(args.rho) is float
    args.to_json_string()
    scheduler = S2NGeneralizedScheduler(rho=np.int64(1), num_train_timesteps=np.int64(100))
    assert type(scheduler.config.rho) is float and type(scheduler.config.num_train_timesteps) is int
    scheduler.save_config(tmp_path)
    reloaded = S2NGeneralizedScheduler.from_pretrained(tmp_path)
    assert reloaded.config.rho == 1.0


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: PromptPoolConfig(layers=1), "layers"),  # was TypeError: int is not iterable
        (lambda: SharedPrefixTuningConfig(layers=0), "layers"),
        (lambda: PromptPoolConfig(modules_to_save=3), "modules_to_save"),  # was accepted
        (lambda: PromptPoolConfig(format_version=True), "format_version"),  # True == 1
        (lambda: ErasureConfig(candidates=3), "candidates"),  # was TypeError: no len()
        (lambda: ErasureConfig(candidate_template=3), "candidate_template"),
        (lambda: ErasureConfig(preserve_concepts=3), "preserve_concepts"),  # was accepted
        (lambda: ErasureConfig(gumbel_hard="no"), "gumbel_hard"),
        (lambda: ErasureConfig(seed=-1), "seed"),
        (lambda: BayesianMutualLearningConfig(**TRAINING, feature_layers=3), "feature_layers"),
        (lambda: PGAConfig(**TRAINING, target_domain=3), "target_domain"),
        (lambda: MetaAugConfig(seed=2**40), "seed"),
    ],
)
def test_wrong_types_are_refused_naming_the_field(build, field):
    _refused(field, build)


# ----------------------------------------------------------------------------- errors of runs


def test_bnn_feature_layers_that_do_not_exist_are_named(tmp_path):
    """The error named the peer and the module, not the setting to change."""
    from hf_extensions.bnn import PeerEnsemble, convert_to_bayesian
    from trainers import BayesianMutualLearningTrainer

    peers = PeerEnsemble([convert_to_bayesian(tiny_mlp_classifier(seed=k)) for k in range(2)])
    args = BayesianMutualLearningConfig(
        output_dir=str(tmp_path), feature_layers=["net.1", "head"], **QUIET
    )
    message = _refused(
        "feature_layers",
        lambda: BayesianMutualLearningTrainer(
            model=peers, args=args, train_dataset=digits("vector", 8)
        ),
    )
    assert "'head'" in message


def test_hierarchical_cl_head_name_of_a_non_linear_module_is_named(tmp_path):
    from conformance.hierarchical_cl import _prompt_pool_vit
    from transformers import DefaultDataCollator

    from trainers import HierarchicalPromptCLTrainer

    args = HierarchicalPromptCLConfig(output_dir=str(tmp_path), head_name="vit", **QUIET)
    _refused(
        "head_name",
        lambda: HierarchicalPromptCLTrainer(
            _prompt_pool_vit(), args, data_collator=DefaultDataCollator()
        ),
    )


def test_pga_context_longer_than_clip_text_is_named():
    """87 context tokens on CLIP's 77 positions failed inside the text embeddings."""
    from hf_extensions.models import tiny_clip
    from hf_extensions.pga.clip_prompts import CLIPPromptLearner

    clip, tokenizer = tiny_clip()
    message = _refused(
        "n_ctx_shared",
        lambda: CLIPPromptLearner(
            clip, tokenizer, ["zero", "one"], ["s", "t"], n_ctx_shared=40, n_ctx_domain=40
        ),
    )
    assert "`n_ctx_domain`" in message and "77" in message


def test_more_prompt_pool_topics_than_documents_names_pool_size():
    from peft_configs.prompt_pool import topic_keys

    message = _refused("num_topics", lambda: topic_keys(torch.rand(16, 8), num_topics=40))
    assert "`pool_size`" in message


def test_metaaug_modules_to_not_convert_leaving_no_layer_is_named():
    """Every layer kept in float failed with 'call replace_with_quant_modules first' (main's
    check_quantizable now names modules_to_not_convert, not at the start of its message)."""
    quantizer = MetaAugQuantizer.from_pretrained(DigitsResNet(width=4).eval())
    config = MetaAugConfig(
        iterations=1, batch_size=8, modules_to_not_convert=["conv1", "layer1", "layer2", "fc"]
    )
    with pytest.raises(ValueError, match=r"modules_to_not_convert=\['conv1'"):
        quantizer.quantize(
            None,
            calibration_dataset=_calibration_images(8),
            quantization_config=config,
            progress=False,
        )


# ----------------------------------------------------------------------------- S2N scheduler


def test_s2n_steps_offset_past_the_schedule_is_named():
    """An offset beyond the training timesteps indexed past the tables (IndexError)."""
    _refused(
        "steps_offset", lambda: S2NGeneralizedScheduler(num_train_timesteps=50, steps_offset=50)
    )
    scheduler = S2NGeneralizedScheduler(steps_offset=999)
    _refused("steps_offset", lambda: scheduler.set_timesteps(10))


def test_s2n_refuses_a_huge_timestep_table_before_building_it():
    """T above the cap is refused; 2**31 used to allocate 17 GB of tables (killed)."""
    _refused("num_train_timesteps", lambda: S2NGeneralizedScheduler(num_train_timesteps=2_000_000))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"trained_betas": [0.01] * 10}, "trained_betas"),  # 10 betas for T = 1000: IndexError
        ({"num_train_timesteps": 3, "trained_betas": [0.1, math.nan, 0.2]}, "trained_betas"),
        ({"beta_start": 0.0}, "beta_start"),  # "alphas_cumprod must lie in [0, 1)"
        ({"beta_start": 1.0, "beta_end": 1.0}, "beta_start"),  # alpha_bar = 0 everywhere
        ({"solver_order": True}, "solver_order"),  # True == 1
        ({"clip_sample": "no"}, "clip_sample"),
        ({"steps_offset": -3}, "steps_offset"),
    ],
)
def test_s2n_schedule_settings_are_refused_naming_the_argument(kwargs, field):
    _refused(field, lambda: S2NGeneralizedScheduler(**kwargs))
    from diffusers import DDIMScheduler

    _refused(field, lambda: S2NGeneralizedScheduler.from_config(DDIMScheduler().config, **kwargs))


# ----------------------------------------------------------------------------- image classification


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("patch_size", 0),
        ("patch_size", 9),
        ("num_layers", 0),
        ("split_seed", -1),
        ("image_column", ""),
    ],
)
def test_image_classification_arguments_are_checked_before_any_data_or_model(field, value):
    _refused(field, lambda: ImageClassificationArguments(**{field: value}))


# ----------------------------------------------------------------------------- allocation, data


def test_prompt_pool_too_large_for_memory_is_refused_before_allocating(monkeypatch):
    """A 200000-prompt pool on the tiny ViT costs 513 MiB: with less free memory it is refused
    naming pool_size before a single prompt tensor exists (it used to allocate, then fail)."""
    from peft import get_peft_model

    import hf_extensions.validation as validation
    from hf_extensions.models import tiny_vit_classifier
    from peft_configs.prompt_pool.layer import PromptPoolLayer

    allocated = []
    original = PromptPoolLayer.update_layer
    monkeypatch.setattr(
        PromptPoolLayer,
        "update_layer",
        lambda self, *a, **k: (allocated.append(1), original(self, *a, **k))[1],
    )
    monkeypatch.setattr(  # raising=False: the test fails on the check, not on a missing name
        validation, "available_memory", lambda device: 400 * 2**20, raising=False
    )
    message = _refused(
        "pool_size",
        lambda: get_peft_model(tiny_vit_classifier(), PromptPoolConfig(pool_size=200_000)),
    )
    assert "513 MiB" in message and "400 MiB free" in message
    assert allocated == []
    get_peft_model(tiny_vit_classifier(), PromptPoolConfig(pool_size=2000))  # 5 MiB: fits
    assert allocated == [1]


def test_shared_prefix_too_large_for_memory_is_refused_before_allocating(monkeypatch):
    """The same check for shared-prefix tuning: 100000 virtual tokens (25 MiB on the tiny ViT)
    with 1 MiB free are refused naming num_virtual_tokens before any layer gets weights."""
    from peft import get_peft_model

    import hf_extensions.validation as validation
    from hf_extensions.models import tiny_vit_classifier
    from peft_configs.shared_prefix import SharedPrefixLayer

    allocated = []
    original = SharedPrefixLayer.update_layer
    monkeypatch.setattr(
        SharedPrefixLayer,
        "update_layer",
        lambda self, *a, **k: (allocated.append(1), original(self, *a, **k))[1],
    )
    monkeypatch.setattr(validation, "available_memory", lambda device: 2**20, raising=False)
    for share in ("none", "global_mlp", "per_layer_mlp", "per_layer_linear", "simple_share"):
        config = SharedPrefixTuningConfig(share=share, num_virtual_tokens=100_000)
        _refused("num_virtual_tokens", lambda c=config: get_peft_model(tiny_vit_classifier(), c))
    assert allocated == []
    get_peft_model(tiny_vit_classifier(), SharedPrefixTuningConfig(num_virtual_tokens=100))
    assert allocated == [1, 1]


def test_non_finite_calibration_images_are_refused():
    """A NaN image was accepted and made the activation scales, and so the model, NaN."""
    images = _calibration_images(16)
    images[3, 0, 2, 2] = math.nan
    quantizer = MetaAugQuantizer.from_pretrained(DigitsResNet(width=4).eval())
    config = MetaAugConfig(iterations=1, batch_size=8, meta_iterations=0)
    message = _refused(
        "calibration_dataset",
        lambda: quantizer.quantize(
            None, calibration_dataset=images, quantization_config=config, progress=False
        ),
    )
    assert "1 NaN or infinite values of 1024" in message
    from hf_extensions.quantization.calibration import reconstruct_model

    images[3, 0, 2, 2] = math.inf
    _refused("images", lambda: reconstruct_model(DigitsResNet(width=4).eval(), images, config))


@pytest.mark.parametrize("num_samples", [0, -1, 2.5])
def test_num_samples_must_be_a_positive_count(num_samples):
    """-1 silently dropped the last image (``images[:-1]``); 2.5 crashed in the slicing."""
    from hf_extensions.quantization.optimum_quantizer import calibration_images

    _refused(
        "num_samples", lambda: calibration_images(_calibration_images(8), num_samples=num_samples)
    )


# ----------------------------------------------------------------------------- the helpers


def test_validation_helpers_do_not_take_lookalikes():
    """``True == 1`` and ``numpy.True_ == 1``; ``"no"`` is truthy; a string is iterable."""
    from hf_extensions.validation import check_bool, check_choice, check_names

    for value in (True, np.True_):
        _refused("solver_order", lambda value=value: check_choice("solver_order", value, (1, 2)))
    assert type(check_choice("norm", np.str_("global"), ("global",))) is str
    _refused("flag", lambda: check_bool("flag", 1))
    _refused("names", lambda: check_names("names", "classifier"))
    _refused("names", lambda: check_names("names", ["classifier", ""]))
    assert check_names("names", ("a", "b")) == ["a", "b"]
