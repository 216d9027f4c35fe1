"""hf_extensions.validation: one message format, NaN / ±inf / bool refused, and the configs use it."""

import math

import pytest

from hf_extensions.validation import (
    check_choice,
    check_finite,
    check_integer,
    check_positive,
    check_range,
    refuse,
)
from trainers import AgnosticSAMConfig, FHBIConfig, SAMConfig

NOT_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", NOT_FINITE)
def test_range_checks_refuse_nan_and_inf_even_when_unbounded(value):
    for check in (
        lambda v: check_range("x", v),
        lambda v: check_range("x", v, low=0.0),
        lambda v: check_positive("x", v),
        lambda v: check_finite("x", v),
    ):
        with pytest.raises(ValueError, match=r"^`x` must be a finite number"):
            check(value)


def test_the_one_message_format_names_field_allowed_and_value():
    with pytest.raises(ValueError) as error:
        check_range("rho", -0.5, low=0.0)
    assert str(error.value) == "`rho` must be a finite number in [0.0, inf), got -0.5."
    with pytest.raises(ValueError) as error:
        check_range("p", 1.0, low=0.0, high=1.0, low_open=True, high_open=True)
    assert str(error.value) == "`p` must be a finite number in (0.0, 1.0), got 1.0."
    with pytest.raises(ValueError) as error:
        check_choice("norm", "l1", ("global", "per_tensor"))
    assert str(error.value) == "`norm` must be one of ('global', 'per_tensor'), got 'l1'."
    with pytest.raises(ValueError) as error:
        check_integer("bits", 9, low=2, high=8)
    assert str(error.value) == "`bits` must be an integer in [2, 8], got 9."
    with pytest.raises(ValueError) as error:
        refuse("block", "a submodule name", "nope")
    assert str(error.value) == "`block` must be a submodule name, got 'nope'."


@pytest.mark.parametrize("value", [True, "1", None, 2.5, 2.0])
def test_integer_check_refuses_bools_strings_and_floats(value):
    with pytest.raises(ValueError, match="must be an integer"):
        check_integer("n", value, low=0)


@pytest.mark.parametrize("value", [True, "0.1", None])
def test_number_checks_refuse_non_numbers(value):
    with pytest.raises(ValueError, match="must be a finite number"):
        check_range("x", value, low=0.0)


def test_accepted_values_come_back_converted():
    assert check_range("x", 1, low=0) == 1.0 and isinstance(check_range("x", 1, low=0), float)
    assert check_positive("x", 0.0, allow_zero=True) == 0.0
    assert check_integer("n", 3, low=1) == 3
    assert check_choice("c", "a", ["a", "b"]) == "a"
    with pytest.raises(ValueError, match=r"in \(0.0, inf\)"):
        check_positive("x", 0.0)


@pytest.mark.parametrize(
    ("config_cls", "field"),
    [(SAMConfig, "rho"), (AgnosticSAMConfig, "rho_train"), (FHBIConfig, "rho")],
)
@pytest.mark.parametrize("value", NOT_FINITE)
def test_configs_refuse_non_finite_numbers_naming_the_field(tmp_path, config_cls, field, value):
    """A NaN radius used to pass (``nan < 0`` is false) and train with NaN weights."""
    with pytest.raises(ValueError, match=rf"^`{field}` must be a finite number"):
        config_cls(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{field: value})


def _nan_cases():
    from functools import partial
    from types import SimpleNamespace

    import numpy as np
    from datasets import Dataset, DatasetDict
    from torch import nn

    from hf_extensions.data.digits import load_digits
    from hf_extensions.data.noise import noisy_labels
    from hf_extensions.data.shifts import shift_images
    from hf_extensions.data.streams import class_incremental_stream
    from hf_extensions.fhbi.particles import ParticleEnsemble
    from hf_extensions.hierarchical_cl.supcon import SupConTerms
    from hf_extensions.hierarchical_cl.taxonomy import ClassDistances
    from hf_extensions.metrics.functional import accuracy_matrix
    from hf_extensions.models.encoders import encode_sentences
    from hf_extensions.pga.clip_prompts import CLIPPromptLearner
    from hf_extensions.pipelines.vocabulary import common_words
    from hf_extensions.prompt_dsi.dsi import DSIModel
    from hf_extensions.prompt_dsi.retrieval import stdlib_retrieval_corpus
    from hf_extensions.schedulers.snr import EDMSchedule, FlowMatchingSchedule, s2n_coefficients
    from recipes.bnn_mutual.train import BayesianPeersArguments
    from recipes.s2n.sample import S2NSampleArguments

    return [
        pytest.param(BayesianPeersArguments, "prior_std", id="bnn-prior_std"),
        pytest.param(BayesianPeersArguments, "moped_delta", id="bnn-moped_delta"),
        pytest.param(S2NSampleArguments, "s_noise", id="s2n-s_noise"),
        pytest.param(EDMSchedule, "sigma_data", id="edm-sigma_data"),
        pytest.param(FlowMatchingSchedule, "shift", id="flow-shift"),
        pytest.param(
            partial(ParticleEnsemble, nn.Linear(2, 2)),
            "num_particles",
            "an integer",
            id="fhbi-num_particles",
        ),
        pytest.param(
            partial(accuracy_matrix, [0], [0], [0], [0]),
            "num_tasks",
            "an integer",
            id="metrics-accuracy_matrix-num_tasks",
        ),
        pytest.param(
            partial(
                class_incremental_stream,
                DatasetDict({"train": Dataset.from_dict({"labels": [0, 1, 2, 3]})}),
            ),
            "num_tasks",
            "an integer",
            id="data-stream-num_tasks",
        ),
        pytest.param(
            partial(
                class_incremental_stream,
                DatasetDict({"train": Dataset.from_dict({"labels": [0, 1, 2, 3]})}),
                num_tasks=2,
            ),
            "classes_per_task",
            "an integer",
            id="data-stream-classes_per_task",
        ),
        pytest.param(load_digits, "image_size", "an integer", id="data-digits-image_size"),
        pytest.param(load_digits, "num_channels", "an integer", id="data-digits-num_channels"),
        pytest.param(
            partial(noisy_labels, np.arange(4), 0.5),
            "num_classes",
            "an integer",
            id="data-noise-num_classes",
        ),
        pytest.param(
            partial(shift_images, np.zeros((1, 8, 8)), "scale"),
            "severity",
            id="data-shift-severity",
        ),
        pytest.param(
            partial(shift_images, np.zeros((1, 8, 8)), "rotate"),
            "severity",
            id="data-shift-rotate-severity",
        ),
        *(
            pytest.param(
                partial(CLIPPromptLearner, None, None, ["cat"], ["a", "b"]),
                field,
                "an integer",
                id=f"pga-{field}",
            )
            for field in ("n_ctx_shared", "n_ctx_domain")
        ),
        pytest.param(common_words, "limit", "an integer", id="pipelines-common_words-limit"),
        *(
            pytest.param(stdlib_retrieval_corpus, field, "an integer", id=f"prompt_dsi-{field}")
            for field in (
                "num_initial",
                "num_increments",
                "docs_per_increment",
                "span_words",
                "num_train_queries",
                "num_test_queries",
                "document_words",
            )
        ),
        pytest.param(partial(DSIModel, None), "num_docs", "an integer", id="prompt_dsi-num_docs"),
        pytest.param(
            DSIModel(SimpleNamespace(config=SimpleNamespace(hidden_size=4)), 2).add_documents,
            "num_new",
            "an integer",
            id="prompt_dsi-add_documents-num_new",
        ),
        pytest.param(EDMSchedule().karras_sigmas, "num_steps", "an integer", id="edm-num_steps"),
        pytest.param(partial(s2n_coefficients, 0.5, 0.8, 0.9, 0.4), "rho", id="s2n-rho"),
        pytest.param(
            partial(encode_sentences, ["a"], None, None),
            "batch_size",
            "an integer",
            id="models-encode_sentences-batch_size",
        ),
        pytest.param(ClassDistances, "num_samples", "an integer", id="taxonomy-num_samples"),
        pytest.param(
            partial(SupConTerms, terms=[("global", False)]),
            "num_classes",
            "an integer",
            id="supcon-num_classes",
        ),
    ]


def _with_allowed(cases):
    """Each case as ``(callable, field, allowed)``; ``allowed`` defaults to "a finite number"."""
    return [
        pytest.param(
            *case.values, *(["a finite number"] if len(case.values) == 2 else []), id=case.id
        )
        for case in cases
    ]


@pytest.mark.parametrize(("arguments_cls", "field", "allowed"), _with_allowed(_nan_cases()))
def test_converted_arguments_refuse_nan_naming_the_field(arguments_cls, field, allowed):
    """These used ``if x <= 0: raise`` (or ``< 0``), which a NaN passes (every comparison with NaN
    is false); converted to ``hf_extensions.validation``, NaN is refused with the field named first
    (``allowed``: "a finite number", or "an integer" where the argument counts something)."""
    with pytest.raises(ValueError, match=rf"^`{field}` must be {allowed}"):
        arguments_cls(**{field: float("nan")})
