"""SAM / ASAM / Agnostic-SAM trainers: equivalences with the plain step and with hand-computed steps.

Two models cover Trainer's two loss normalisations: the MLP returns a per-batch mean loss (Trainer
divides it by the accumulation steps), the tiny ViT accepts loss kwargs and normalises by
``num_items_in_batch`` itself.
"""

import pytest
import torch
from conformance.case import QUIET
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from hf_extensions.data import load_digits
from hf_extensions.hub import check_model_card_method
from hf_extensions.mixed_precision import fp16_loss_scaling
from hf_extensions.models import tiny_mlp_classifier, tiny_vit_classifier
from hf_extensions.perturbation import trainable_parameters
from hf_extensions.testing import fake_hub
from trainers import AgnosticSAMConfig, AgnosticSAMTrainer, SAMConfig, SAMTrainer

DEFAULTS = dict(
    **QUIET,
    optim="sgd",
    learning_rate=0.5,
    lr_scheduler_type="constant",
    weight_decay=0.0,
    max_grad_norm=0.0,
)


def _data(kind: str, rows: int):
    if kind == "mlp":
        split = load_digits(seed=0, layout="vector")["train"]
        return split.select(range(rows)).select_columns(["features", "labels"])
    split = load_digits(seed=0)["train"]
    return split.select(range(rows)).select_columns(["pixel_values", "labels"])


def _model(kind: str):
    model = tiny_mlp_classifier() if kind == "mlp" else tiny_vit_classifier()
    return model.train()


def _train(trainer_cls, config_cls, kind, output_dir, rows=32, **overrides):
    args = config_cls(output_dir=str(output_dir), **{**DEFAULTS, **overrides})
    trainer = trainer_cls(model=_model(kind), args=args, train_dataset=_data(kind, rows))
    trainer.train()
    return trainer


def _params(trainer):
    return [p.detach().clone() for p in trainable_parameters(trainer.model)]


def _assert_equal(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


METHODS = {
    "sam": (SAMTrainer, SAMConfig, {"rho": 0.05}),
    "asam": (SAMTrainer, SAMConfig, {"rho": 0.5, "adaptive": True}),
    "agnostic_sam": (AgnosticSAMTrainer, AgnosticSAMConfig, {"rho_train": 0.05, "rho_val": 0.05}),
}
ZERO = {"sam": {"rho": 0.0}, "agnostic_sam": {"rho_train": 0.0, "rho_val": 0.0}}


def _hand_sam_step(model, features, labels, rho, lr, adaptive=False, eta=0.01):
    params = trainable_parameters(model)
    grads = torch.autograd.grad(model(features, labels)["loss"], params)
    t = [p.detach().abs() + eta if adaptive else torch.ones_like(p) for p in params]
    norm = torch.sqrt(sum(((ti * g) ** 2).sum() for ti, g in zip(t, grads)))
    with torch.no_grad():
        moved = [p + rho * ti**2 * g / norm for p, ti, g in zip(params, t, grads)]
    model_at = _with_params(model, moved)
    grads_at = torch.autograd.grad(
        model_at(features, labels)["loss"], trainable_parameters(model_at)
    )
    return [p.detach() - lr * g for p, g in zip(params, grads_at)]


def _with_params(model, values):
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p, v in zip(trainable_parameters(clone), values):
            p.copy_(v)
    return clone


def _full_batch(rows=32):
    columns = _data("mlp", rows).with_format("torch")[:]
    return columns["features"].float(), columns["labels"].long()


@pytest.mark.parametrize("method", ["sam", "asam"])
def test_sam_step_matches_a_hand_computed_step(tmp_path, method):
    trainer_cls, config_cls, knobs = METHODS[method]
    trainer = _train(
        trainer_cls,
        config_cls,
        "mlp",
        tmp_path,
        per_device_train_batch_size=32,
        max_steps=1,
        train_sampling_strategy="sequential",
        **knobs,
    )
    features, labels = _full_batch()
    expected = _hand_sam_step(
        _model("mlp"), features, labels, knobs["rho"], 0.5, adaptive=method == "asam"
    )
    assert _max_diff(_params(trainer), expected) < 1e-6
    assert (
        _max_diff(_params(trainer), [p.detach() for p in trainable_parameters(_model("mlp"))])
        > 1e-2
    )


def _unit(grads):
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    return [g / norm for g in grads]


def _grads(model, params, features, labels):
    return torch.autograd.grad(model(features, labels)["loss"], trainable_parameters(model))


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize(
    ("chain", "final", "val_fraction"),
    [(False, "full", 0.5), (True, "train", 0.25), (False, "sum", 0.5)],
)
def test_agnostic_sam_step_matches_a_hand_computed_step(tmp_path, chain, final, val_fraction, fuse):
    rho_tr, rho_val, lr = 0.05, 0.03, 0.5
    trainer = _train(
        AgnosticSAMTrainer,
        AgnosticSAMConfig,
        "mlp",
        tmp_path,
        per_device_train_batch_size=32,
        max_steps=1,
        train_sampling_strategy="sequential",
        rho_train=rho_tr,
        rho_val=rho_val,
        chain=chain,
        final_grad_on=final,
        val_fraction=val_fraction,
        fuse_split_passes=fuse,
    )
    model = _model("mlp")
    params = [p.detach() for p in trainable_parameters(model)]
    features, labels = _full_batch()
    cut = 32 - round(32 * val_fraction)
    tr, val = (features[:cut], labels[:cut]), (features[cut:], labels[cut:])
    e_tr = [rho_tr * u for u in _unit(_grads(model, params, *tr))]
    at_val = _with_params(model, [p + e for p, e in zip(params, e_tr)]) if chain else model
    e_val = [rho_val * u for u in _unit(_grads(at_val, params, *val))]
    at = _with_params(model, [p + a - b for p, a, b in zip(params, e_tr, e_val)])
    if final == "full":
        g = _grads(at, params, features, labels)
    elif final == "train":
        g = _grads(at, params, *tr)
    else:
        g = [a + b for a, b in zip(_grads(at, params, *tr), _grads(at, params, *val))]
    expected = [p - lr * gi for p, gi in zip(params, g)]
    assert _max_diff(_params(trainer), expected) < 1e-6


@pytest.mark.parametrize("kind", ["mlp", "vit"])
@pytest.mark.parametrize("method", ["sam", "agnostic_sam"])
def test_gradient_accumulation_equals_one_batch_at_the_same_sharpness_batch(tmp_path, method, kind):
    """2 micro-batches of 8 == one batch of 16 perturbed in chunks of 8 (m-sharpness, m = 8)."""
    trainer_cls, config_cls, knobs = METHODS[method]
    common = dict(max_steps=3, **knobs)
    accumulated = _train(
        trainer_cls, config_cls, kind, tmp_path / "ga", 48,
        per_device_train_batch_size=8, gradient_accumulation_steps=2, **common,
    )  # fmt: skip
    one_batch = _train(
        trainer_cls, config_cls, kind, tmp_path / "one", 48,
        per_device_train_batch_size=16, sharpness_batch_size=8, **common,
    )  # fmt: skip
    assert _max_diff(_params(accumulated), _params(one_batch)) < 1e-6
    plain = _train(
        Trainer, TrainingArguments, kind, tmp_path / "plain", 48,
        per_device_train_batch_size=16, max_steps=3,
    )  # fmt: skip
    assert _max_diff(_params(one_batch), _params(plain)) > 1e-4
    # Reported losses agree too (the loss at perturbed weights, averaged like Trainer's).
    assert accumulated.state.log_history[-1]["train_loss"] == pytest.approx(
        one_batch.state.log_history[-1]["train_loss"], rel=1e-5
    )


def test_resume_from_checkpoint_is_exact_and_checkpoints_do_not_grow(tmp_path):
    knobs = dict(
        METHODS["agnostic_sam"][2],
        optim="adamw_torch",
        learning_rate=1e-2,
        per_device_train_batch_size=8,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
    )
    full = _train(AgnosticSAMTrainer, AgnosticSAMConfig, "mlp", tmp_path / "full", 48, **knobs)
    args = AgnosticSAMConfig(output_dir=str(tmp_path / "resumed"), **{**DEFAULTS, **knobs})
    resumed = AgnosticSAMTrainer(model=_model("mlp"), args=args, train_dataset=_data("mlp", 48))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    _assert_equal(_params(resumed), _params(full))
    # The perturbation is not optimizer state: the checkpoint holds what a plain run's holds.
    plain_knobs = {k: v for k, v in knobs.items() if k not in METHODS["agnostic_sam"][2]}
    _train(Trainer, TrainingArguments, "mlp", tmp_path / "plain", 48, **plain_knobs)
    sam_state = torch.load(tmp_path / "full/checkpoint-3/optimizer.pt", weights_only=True)
    plain_state = torch.load(tmp_path / "plain/checkpoint-3/optimizer.pt", weights_only=True)
    assert sam_state["state"].keys() == plain_state["state"].keys()
    for key, state in sam_state["state"].items():
        assert {k: v.shape for k, v in state.items()} == {
            k: v.shape for k, v in plain_state["state"][key].items()
        }
    weights = load_file(tmp_path / "full/checkpoint-3/model.safetensors")
    assert set(weights) == set(_model("mlp").state_dict())


@pytest.mark.parametrize("method", ["sam", "agnostic_sam"])
def test_fp16_loss_scaling_step_equals_the_fp32_step(tmp_path, method):
    """accelerate's fp16 loss scaling (fp32 compute): scaled backward passes, accelerate's
    unscale before Trainer's clipping, ``scaler.step``: the same SAM step as plain fp32."""
    trainer_cls, config_cls, knobs = METHODS[method]
    overrides = dict(per_device_train_batch_size=16, max_steps=3, max_grad_norm=0.5, **knobs)
    reference = _train(trainer_cls, config_cls, "mlp", tmp_path / "fp32", **overrides)
    args = config_cls(output_dir=str(tmp_path / "scaled"), **{**DEFAULTS, **overrides})
    scaled = trainer_cls(model=_model("mlp"), args=args, train_dataset=_data("mlp", 32))
    with fp16_loss_scaling(scaled.accelerator, init_scale=2.0**10, autocast=False) as scaler:
        scaled.train()
        assert scaler.get_scale() == 2.0**10  # no overflow, no skipped step
    assert _max_diff(_params(scaled), _params(reference)) < 1e-6


def test_an_fp16_overflow_skips_the_step_and_applies_no_perturbation(tmp_path, monkeypatch):
    """Real float16 autocast and a scale that overflows the scaled backward: the local pass's
    overflow is recognised (no perturbation, zero direction), the GradScaler skips the step and
    halves its scale, and the weights do not move."""
    args = SAMConfig(output_dir=str(tmp_path), **{**DEFAULTS, "max_steps": 1, "rho": 0.05})
    trainer = SAMTrainer(model=_model("mlp"), args=args, train_dataset=_data("mlp", 32))
    before = _params(trainer)
    directions = []
    original = SAMTrainer.perturbed

    def spy(self, model, direction):
        directions.append([d.clone() for d in direction if d is not None])
        return original(self, model, direction)

    monkeypatch.setattr(SAMTrainer, "perturbed", spy)
    # float16 overflows at 65504: 2**24 times any gradient entry above 0.004 is infinite.
    with fp16_loss_scaling(trainer.accelerator, init_scale=2.0**24) as scaler:
        trainer.train()
        assert trainer.accelerator.optimizer_step_was_skipped
        assert scaler.get_scale() == 2.0**23
    assert len(directions) == 1 and directions[0]
    assert all(torch.count_nonzero(d) == 0 for d in directions[0])
    _assert_equal(_params(trainer), before)


def test_bf16_autocast_runs_close_to_fp32(tmp_path):
    knobs = dict(per_device_train_batch_size=16, max_steps=3, **METHODS["agnostic_sam"][2])
    fp32 = _train(AgnosticSAMTrainer, AgnosticSAMConfig, "vit", tmp_path / "fp32", **knobs)
    bf16 = _train(
        AgnosticSAMTrainer, AgnosticSAMConfig, "vit", tmp_path / "bf16", bf16=True, **knobs
    )
    initial = [p.detach() for p in trainable_parameters(_model("vit"))]
    moved = _max_diff(_params(fp32), initial)
    # bf16 keeps 8 bits of mantissa: the step differs by a fraction of its size, not more.
    assert _max_diff(_params(bf16), _params(fp32)) < 0.25 * moved
    assert all(torch.isfinite(p).all() for p in _params(bf16))


def test_batchnorm_statistics_come_from_the_unperturbed_pass_only(tmp_path):
    def run(trainer_cls, config_cls, name, **extra):
        args = config_cls(output_dir=str(tmp_path / name), **{**DEFAULTS, "max_steps": 1, **extra})
        model = tiny_mlp_classifier(batchnorm=True).train()
        trainer = trainer_cls(model=model, args=args, train_dataset=_data("mlp", 32))
        trainer.train()
        return [b.clone() for b in model.buffers()]

    plain = run(Trainer, TrainingArguments, "plain")
    frozen = run(SAMTrainer, SAMConfig, "frozen", rho=0.5)
    moving = run(SAMTrainer, SAMConfig, "moving", rho=0.5, freeze_batchnorm_stats=False)
    _assert_equal(frozen, plain)
    assert not torch.equal(moving[0], plain[0])


def test_logs_the_perturbation_norm_and_the_split_losses(tmp_path):
    logging = dict(max_steps=4, logging_strategy="steps", logging_steps=2)
    sam = _train(SAMTrainer, SAMConfig, "mlp", tmp_path / "sam", rho=0.07, **logging)
    logs = [h for h in sam.state.log_history if "loss" in h]
    assert len(logs) == 2
    for entry in logs:
        assert entry["perturbation_norm"] == pytest.approx(0.07, rel=1e-4)
        assert entry["loss_at_weights"] < entry["loss"]  # the ascent step raised the loss
    agnostic = _train(AgnosticSAMTrainer, AgnosticSAMConfig, "mlp", tmp_path / "asam", **logging)
    for entry in (h for h in agnostic.state.log_history if "loss" in h):
        assert {"perturbation_norm", "train_split_loss", "val_split_loss"} <= set(entry)
        assert 0 < entry["perturbation_norm"] <= 0.05 + 0.05 + 1e-6


def test_trainers_refuse_other_configs_and_lomo(tmp_path):
    with pytest.raises(TypeError, match="SAMConfig"):
        SAMTrainer(
            model=_model("mlp"), args=AgnosticSAMConfig(output_dir=str(tmp_path), report_to=[])
        )
    with pytest.raises(ValueError, match="LOMO"):
        SAMTrainer(
            model=_model("mlp"),
            args=SAMConfig(output_dir=str(tmp_path), report_to=[], optim="lomo"),
        )


def test_agnostic_sam_handles_one_row_leftovers(tmp_path):
    """33 rows in batches of 16 leave a 1-row batch (a SAM step on it); a 1-row sharpness chunk
    joins the chunk before it."""
    trainer = _train(AgnosticSAMTrainer, AgnosticSAMConfig, "mlp", tmp_path / "a", 33,
                     num_train_epochs=1, per_device_train_batch_size=16)  # fmt: skip
    assert trainer.state.global_step == 3
    chunked = _train(AgnosticSAMTrainer, AgnosticSAMConfig, "mlp", tmp_path / "b", 33,
                     max_steps=1, per_device_train_batch_size=33, sharpness_batch_size=16)  # fmt: skip
    assert all(torch.isfinite(p).all() for p in _params(chunked))


@pytest.mark.parametrize(
    "settings",
    [dict(per_device_train_batch_size=1, gradient_accumulation_steps=16),
     dict(per_device_train_batch_size=16, sharpness_batch_size=1)],
)  # fmt: skip
def test_agnostic_sam_refuses_perturbations_of_one_row(tmp_path, settings):
    """One row cannot be split into B_tr and B_val: every step would silently be a SAM step."""
    field = next(name for name, value in settings.items() if value == 1)
    with pytest.raises(ValueError, match=rf"^`{field}`=1: Agnostic-SAM splits"):
        AgnosticSAMConfig(output_dir=str(tmp_path), **settings)


def test_agnostic_sam_warns_once_on_a_one_row_leftover(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="trainers.agnostic_sam_trainer"):
        _train(AgnosticSAMTrainer, AgnosticSAMConfig, "mlp", tmp_path, 33,
               num_train_epochs=2, per_device_train_batch_size=16)  # fmt: skip
    assert sum("got a batch of 1 row" in r.getMessage() for r in caplog.records) == 1


def _with_dropout(model, p=0.2):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    return model


@pytest.mark.parametrize("method", ["sam", "agnostic_sam"])
def test_zero_radius_is_the_plain_step_with_dropout_and_label_smoothing(tmp_path, method):
    """Every pass replays the step's random draws, and ``compute_loss`` may pop ``labels``."""
    knobs = dict(per_device_train_batch_size=8, max_steps=2, label_smoothing_factor=0.1)
    trainer_cls, config_cls, _ = METHODS[method]
    results = []
    for name, cls, cfg, extra in (("plain", Trainer, TrainingArguments, {}),
                                  ("zero", trainer_cls, config_cls, ZERO[method])):  # fmt: skip
        args = cfg(output_dir=str(tmp_path / name), **{**DEFAULTS, **knobs, **extra})
        model = _with_dropout(_model("vit"))
        cls(model=model, args=args, train_dataset=_data("vit", 32)).train()
        results.append([p.detach().clone() for p in trainable_parameters(model)])
    _assert_equal(results[1], results[0])


def test_loss_kwargs_models_give_the_same_step_as_mean_loss_models(tmp_path):
    """The ViT normalises its loss by Trainer's ``num_items_in_batch``; with loss kwargs turned off
    it returns a per-batch mean. Both must give the same Agnostic-SAM step for every final split
    (the split losses are rescaled to means over their own items)."""
    knobs = dict(per_device_train_batch_size=16, max_steps=2, gradient_accumulation_steps=2,
                 **METHODS["agnostic_sam"][2], val_fraction=0.25)  # fmt: skip
    for final in ("train", "sum"):
        runs = []
        for accepts in (True, False):
            args = AgnosticSAMConfig(output_dir=str(tmp_path / f"{final}{accepts}"),
                                     final_grad_on=final, **{**DEFAULTS, **knobs})  # fmt: skip
            trainer = AgnosticSAMTrainer(
                model=_model("vit"), args=args, train_dataset=_data("vit", 64)
            )
            trainer.model_accepts_loss_kwargs = accepts
            trainer.train()
            runs.append(_params(trainer))
        assert _max_diff(runs[0], runs[1]) < 1e-6, final


@pytest.mark.parametrize("fuse", [False, True])
def test_an_overflowing_local_pass_makes_the_scaler_skip_the_step(tmp_path, monkeypatch, fuse):
    """fp16: the validation half overflows, the final pass does not; the step must be skipped and
    the scale lowered (not taken with half a perturbation). Both ways of taking g_val."""
    args = AgnosticSAMConfig(
        output_dir=str(tmp_path), **{**DEFAULTS, "max_steps": 1}, fuse_split_passes=fuse
    )
    trainer = AgnosticSAMTrainer(model=_model("mlp"), args=args, train_dataset=_data("mlp", 32))
    before = _params(trainer)
    calls = []

    def infinite(grads):
        return [None if g is None else torch.full_like(g, float("inf")) for g in grads]

    if fuse:
        original_split = AgnosticSAMTrainer._split_gradients

        def overflow_val(self, model, inputs, val):
            train_loss, val_loss, train_grads, val_grads = original_split(self, model, inputs, val)
            calls.extend([0, 1])
            return train_loss, val_loss, train_grads, infinite(val_grads)

        monkeypatch.setattr(AgnosticSAMTrainer, "_split_gradients", overflow_val)
    else:
        original = AgnosticSAMTrainer.local_gradients

        def overflow_second_pass(self, model, inputs):
            loss, grads = original(self, model, inputs)
            calls.append(len(calls))
            return loss, infinite(grads) if len(calls) == 2 else grads

        monkeypatch.setattr(AgnosticSAMTrainer, "local_gradients", overflow_second_pass)
    with fp16_loss_scaling(trainer.accelerator, init_scale=2.0**10, autocast=False) as scaler:
        trainer.train()
        assert trainer.accelerator.optimizer_step_was_skipped
        assert scaler.get_scale() == 2.0**9
    assert calls == [0, 1]
    _assert_equal(_params(trainer), before)


def test_push_to_hub_carries_an_agnostic_sam_model_card(tmp_path):
    trainer = _train(
        AgnosticSAMTrainer, AgnosticSAMConfig, "vit", tmp_path / "out", max_steps=1,
        hub_model_id="agnostic-run", rho_val=0.02,
    )  # fmt: skip
    with fake_hub(tmp_path / "hub") as hub:
        trainer.push_to_hub()
    repo = hub.repo_path("fake-user/agnostic-run")
    metadata = check_model_card_method(repo / "README.md", "agnostic-sam")
    assert metadata["hyperparameters"]["rho_val"] == 0.02
    assert metadata["hyperparameters"]["final_grad_on"] == "full"
    assert "arxiv:2406.07107" in (repo / "README.md").read_text()


def test_resume_from_a_checkpoint_is_exact_for_a_renamed_key_model(tmp_path):
    """A tiny ViT (transformers 5 saves its checkpoint keys in the original ViT format): a run
    resumed from checkpoint-2 ends with the uninterrupted run's weights, bit for bit (Trainer's
    own resume would restart from the initial weights, transformers #43701)."""
    knobs = dict(per_device_train_batch_size=16, max_steps=4, save_strategy="steps", save_steps=2,
                 rho_train=0.05, rho_val=0.05)  # fmt: skip
    whole = _train(AgnosticSAMTrainer, AgnosticSAMConfig, "vit", tmp_path / "whole", 64, **knobs)
    args = AgnosticSAMConfig(output_dir=str(tmp_path / "resumed"), **{**DEFAULTS, **knobs})
    resumed = AgnosticSAMTrainer(model=_model("vit"), args=args, train_dataset=_data("vit", 64))
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    _assert_equal(_params(resumed), _params(whole))
    assert (
        _max_diff(_params(resumed), [p.detach() for p in trainable_parameters(_model("vit"))]) > 0
    )


def test_fp16_that_accelerate_turns_into_float32_is_not_silent(tmp_path, caplog):
    """On a CPU, accelerate >= 1.16 gives ``fp16=True`` no autocast and no scaler (float32 without
    a word); the trainer says so. Earlier releases refuse fp16 on a CPU outright."""
    args = SAMConfig(output_dir=str(tmp_path), fp16=True, **{**DEFAULTS, "max_steps": 1})
    try:
        with caplog.at_level("WARNING", logger="trainers.method_trainer"):
            SAMTrainer(model=_model("mlp"), args=args, train_dataset=_data("mlp", 8))
    except ValueError as error:  # accelerate < 1.16: "fp16 mixed precision requires a device"
        assert "fp16" in str(error)
        return
    assert any("trains in float32" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("kind", ["mlp", "vit"])
def test_agnostic_sam_one_pass_split_gradients_equal_the_two_pass_ones(tmp_path, kind):
    """g_tr and g_val from one forward pass (two autograd.grad calls) give the step of one pass
    per split, to 1e-6, over several steps (the ViT normalises its loss by num_items_in_batch)."""
    runs = {
        fuse: _params(
            _train(
                AgnosticSAMTrainer,
                AgnosticSAMConfig,
                kind,
                tmp_path / str(fuse),
                rows=48,
                per_device_train_batch_size=16,
                max_steps=3,
                learning_rate=0.1,
                rho_train=0.05,
                rho_val=0.03,
                fuse_split_passes=fuse,
            )
        )
        for fuse in (True, False)
    }
    assert _max_diff(runs[True], runs[False]) < 1e-6
    assert _max_diff(runs[True], [p.detach() for p in trainable_parameters(_model(kind))]) > 1e-3


class _DoubledLoss(torch.nn.Module):
    """A classifier whose loss is twice the cross-entropy of its logits."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_mlp_classifier()

    def forward(self, features, labels):
        out = self.inner(features, labels)
        return {"loss": 2 * out["loss"], "logits": out["logits"]}


def test_agnostic_sam_keeps_two_passes_when_the_loss_is_not_the_logits_cross_entropy(
    tmp_path, caplog
):
    def run(fuse):
        torch.manual_seed(0)
        model = _DoubledLoss()
        args = AgnosticSAMConfig(
            output_dir=str(tmp_path / str(fuse)), **DEFAULTS, per_device_train_batch_size=16,
            max_steps=2, rho_train=0.05, rho_val=0.03, fuse_split_passes=fuse,
        )  # fmt: skip
        trainer = AgnosticSAMTrainer(model=model, args=args, train_dataset=_data("mlp", 32))
        trainer.train()
        return trainer

    with caplog.at_level("WARNING"):
        fused = run(True)
    assert not fused._fusion_ok and "cannot come from one pass" in caplog.text
    assert _max_diff(_params(fused), _params(run(False))) < 1e-6
