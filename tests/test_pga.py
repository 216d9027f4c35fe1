"""PGA: the update (finite-difference check of the spec), its trainer and its baselines."""

import pytest
import torch

from hf_extensions.mixed_precision import fp16_loss_scaling
from hf_extensions.models import tiny_clip
from hf_extensions.pga.clip_prompts import CLIPPromptLearner
from trainers.pga_config import PGAConfig
from trainers.pga_trainer import PairedDomainCollator, PairedDomainDataset, PGATrainer, pga_update

# ----------------------------------------------------------------------------- toy objectives


def _toy(seed=0):
    """Two domains over (θ_sh [2, 3], θ_d [3]): smooth non-quadratic losses whose Hessians
    couple the shared and the domain tensors."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(2, 3, generator=generator).requires_grad_()
    own = {d: torch.randn(3, generator=generator).requires_grad_() for d in ("target", "source")}
    mats = {d: torch.randn(5, 9, generator=generator) for d in own}
    offsets = {d: torch.randn(5, generator=generator) for d in own}

    def loss(domain):
        z = torch.cat([shared.flatten(), own[domain]])
        fit = torch.log(torch.cosh(mats[domain] @ z - offsets[domain])).sum()
        return fit + 0.3 * torch.sin(z).sum() * z.pow(2).sum() / 9

    return shared, own, loss


def _update(shared, own, loss, rho, align, tradeoff=1.0):
    step = pga_update(
        {d: (lambda d=d: loss(d)) for d in own},
        shared,
        own,
        target="target",
        rho=rho,
        align=align,
        tradeoff=tradeoff,
    )
    grads = [step.shared_grad, step.domain_grads["target"], step.domain_grads["source"]]
    return torch.cat([g.flatten() for g in grads]), step


def _penalised_gradient(shared, own, loss, rho, align):
    """Autograd of L_T + L_S + ρ Σ_d (‖g_d^sh‖ + ‖g_d^d‖) − α ⟨g_S^sh, g_T^sh⟩ / c, with
    c = ‖g_S^sh‖ ‖g_T^sh‖ held constant (double backward)."""
    g = {d: torch.autograd.grad(loss(d), [shared, own[d]], create_graph=True) for d in own}
    c = (g["source"][0].norm() * g["target"][0].norm()).detach()
    penalty = sum(g[d][0].norm() + g[d][1].norm() for d in own)
    objective = (
        loss("target")
        + loss("source")
        + rho * penalty
        - align * (g["source"][0] * g["target"][0]).sum() / c
    )
    grads = torch.autograd.grad(objective, [shared, own["target"], own["source"]])
    return torch.cat([t.flatten() for t in grads])


def test_update_matches_penalised_objective_to_first_order():
    """The spec's check: for small ρ = α = ε the PGA update equals the gradient of the
    penalised objective up to O(ε²); dropping the alignment term leaves an O(ε) error."""
    shared, own, loss = _toy()
    plain, _ = _update(shared, own, loss, 0.0, 0.0)
    errors, controls = [], []
    for eps in (2e-2, 1e-2, 5e-3):
        update, _ = _update(shared, own, loss, eps, eps)
        first_order = (update - plain).norm()
        error = (update - _penalised_gradient(shared, own, loss, eps, eps)).norm()
        control = (update - _penalised_gradient(shared, own, loss, eps, 0.0)).norm()
        assert error < 0.05 * first_order  # the O(ε) effect is captured
        assert control > 0.05 * first_order  # ... and the alignment term is part of it
        errors.append(float(error))
        controls.append(float(control))
    # second-order remainder: halving ε quarters the error; the control only halves
    assert errors[1] / errors[0] < 0.3 and errors[2] / errors[1] < 0.3
    assert controls[1] / controls[0] > 0.4 and controls[2] / controls[1] > 0.4


def test_zero_rho_alpha_is_plain_gradient_and_weights_are_restored():
    shared, own, loss = _toy(seed=1)
    before = [shared.detach().clone(), *(p.detach().clone() for p in own.values())]
    update, step = _update(shared, own, loss, 0.0, 0.0, tradeoff=0.5)
    g_t = torch.autograd.grad(loss("target"), [shared, own["target"]])
    g_s = torch.autograd.grad(loss("source"), [shared, own["source"]])
    torch.testing.assert_close(step.shared_grad, g_t[0] + 0.5 * g_s[0])
    torch.testing.assert_close(step.domain_grads["target"], g_t[1])
    torch.testing.assert_close(step.domain_grads["source"], g_s[1])  # G_s, as the official code
    cosine = torch.nn.functional.cosine_similarity(g_t[0].flatten(), g_s[0].flatten(), dim=0)
    assert step.cosine["source"] == pytest.approx(float(cosine), abs=1e-5)
    # with ρ, α > 0 the weights are back exactly afterwards and the gradient differs
    perturbed, _ = _update(shared, own, loss, 0.1, 1.0, tradeoff=0.5)
    after = [shared.detach(), *(p.detach() for p in own.values())]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert (perturbed - update).norm() > 1e-3
    assert shared.grad is None  # autograd.grad never touches .grad


def test_shift_sizes_are_rho_and_alpha_over_the_gradient_norm():
    """``PGAStep.shifts``: the ρ part of θ_sh's shift has norm ρ (per-tensor), the α part
    α / ‖g_own^sh‖ (one other domain); none are reported for ERM (ρ = α = 0)."""
    shared, own, loss = _toy(seed=5)
    g = {d: torch.autograd.grad(loss(d), [shared])[0].norm() for d in own}
    _, step = _update(shared, own, loss, 0.03, 0.2)
    for domain in own:
        assert step.shifts[domain]["rho"] == pytest.approx(0.03, rel=1e-5)
        assert step.shifts[domain]["align"] == pytest.approx(float(0.2 / g[domain]), rel=1e-4)
    assert _update(shared, own, loss, 0.0, 0.0)[1].shifts == {}
    assert _update(shared, own, loss, 0.03, 0.0)[1].shifts["target"]["align"] == 0.0


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_alignment_raises_the_gradient_cosine(seed):
    """Descending the shifted gradients with α > 0 ends at a much higher cos(g_S^sh, g_T^sh)
    than α = 0 (same start, step size and step count; ρ = 0 to isolate α)."""
    results = {}
    for align in (0.0, 0.5):
        shared, own, loss = _toy(seed=seed)
        params = [shared, *own.values()]
        for _ in range(30):
            _, step = _update(shared, own, loss, 0.0, align)
            grads = [step.shared_grad, step.domain_grads["target"], step.domain_grads["source"]]
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= 0.02 * g
        _, step = _update(shared, own, loss, 0.0, 0.0)
        results[align] = step.cosine["source"]
    assert results[0.5] > results[0.0] + 0.5


def test_multi_source_target_shift_sums_over_sources():
    generator = torch.Generator().manual_seed(3)
    shared = torch.randn(4, generator=generator).requires_grad_()
    names = ("target", "a", "b")
    own = {d: torch.randn(4, generator=generator).requires_grad_() for d in names}
    weights = {d: torch.randn(4, generator=generator) for d in names}

    def loss(d):
        return ((shared * weights[d]).sum() ** 2 + (own[d] * shared).sum() ** 2) / 2

    step = pga_update(
        {d: (lambda d=d: loss(d)) for d in names}, shared, own, target="target",
        rho=0.0, align=0.5, tradeoff=2.0,
    )  # fmt: skip
    g = {d: torch.autograd.grad(loss(d), [shared, own[d]]) for d in names}
    shift = -0.5 * sum(g[s][0] / (g[s][0].norm() * g["target"][0].norm()) for s in ("a", "b"))
    with torch.no_grad():
        shared += shift
    expected_target = torch.autograd.grad(loss("target"), [shared, own["target"]])
    with torch.no_grad():
        shared -= shift
    expected_a_shift = -0.5 * g["target"][0] / (g["target"][0].norm() * g["a"][0].norm())
    with torch.no_grad():
        shared += expected_a_shift
    expected_a = torch.autograd.grad(loss("a"), [shared, own["a"]])
    with torch.no_grad():
        shared -= expected_a_shift
    torch.testing.assert_close(step.domain_grads["target"], expected_target[1])
    torch.testing.assert_close(step.domain_grads["a"], expected_a[1])
    assert set(step.cosine) == {"a", "b"}


# ----------------------------------------------------------------------------- config


def test_config_refuses_alignment_without_target(tmp_path):
    with pytest.raises(ValueError, match="pga_align"):
        PGAConfig(output_dir=str(tmp_path), pga_source_only=True, pga_align=1.0)
    config = PGAConfig(output_dir=str(tmp_path), pga_source_only=True, pga_align=0.0)
    assert config.method_hyperparameters()["pga_source_only"] is True
    assert config.learning_rate == 3e-3


# ----------------------------------------------------------------------------- trainer

NAMES = ["zero", "one", "two"]


def _paired_data(rows=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(rows) % 3
    source = {"pixel_values": torch.rand(rows, 3, 16, 16, generator=generator), "labels": labels}
    target_labels = labels.clone()
    target_labels[::4] = -100  # unconfident pseudo-labels
    target = {
        "pixel_values": torch.rand(rows // 2, 3, 16, 16, generator=generator),
        "labels": target_labels[: rows // 2],
    }
    return PairedDomainDataset({"source": source, "target": target}, seed=seed)


def _trainer(tmp_path, domains=("source", "target"), **overrides):
    clip, tokenizer = tiny_clip()
    torch.manual_seed(0)
    learner = CLIPPromptLearner(
        clip, tokenizer, NAMES, list(domains), n_ctx_shared=2, n_ctx_domain=2
    )
    options = {
        "output_dir": str(tmp_path),
        "n_ctx_shared": 2,
        "n_ctx_domain": 2,
        "per_device_train_batch_size": 8,
        "max_steps": 3,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        **overrides,
    }
    return PGATrainer(model=learner, args=PGAConfig(**options), train_dataset=_paired_data())


def test_paired_dataset_and_collator():
    data = _paired_data()
    assert len(data) == 24
    batch = PairedDomainCollator()([data[i] for i in range(5)])
    assert batch["source"]["pixel_values"].shape == (5, 3, 16, 16)
    assert batch["target"]["labels"].shape == (5,)
    # the smaller domain is cycled: every target row appears exactly twice over the length
    seen = torch.stack([data[i]["target"]["pixel_values"][0, 0, 0] for i in range(24)])
    assert len(torch.unique(seen)) == 12


def test_trainer_moves_only_prompts_and_logs_cosine(tmp_path):
    trainer = _trainer(tmp_path, pga_rho=1e-3, pga_align=1.0)
    learner = trainer.model
    frozen = {k: v.clone() for k, v in learner.clip.state_dict().items()}
    prompts = {n: p.detach().clone() for n, p in learner.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(torch.equal(v, learner.clip.state_dict()[k]) for k, v in frozen.items())
    moved = {n: not torch.equal(p, dict(learner.named_parameters())[n]) for n, p in prompts.items()}
    assert all(moved.values())
    logs = [entry for entry in trainer.state.log_history if "grad_cosine" in entry]
    assert len(logs) == 3 and all(-1 <= entry["grad_cosine"] <= 1 for entry in logs)
    # the shift sizes relative to ‖θ_sh‖ are logged beside the cosine
    assert all(entry["rho_shift_rel"] > 0 and entry["align_shift_rel"] > 0 for entry in logs)


def test_trainer_step_equals_pga_update_and_caching_changes_nothing(tmp_path):
    """One training_step puts exactly pga_update's gradients in p.grad; re-encoding the
    images in every pass (the official code) gives the same gradients."""
    grads = {}
    for cache in (True, False):
        trainer = _trainer(tmp_path, pga_rho=1e-2, pga_align=1.0, cache_image_features=cache)
        trainer.current_gradient_accumulation_steps = 1
        batch = PairedDomainCollator()([trainer.train_dataset[i] for i in range(8)])
        trainer.training_step(trainer.model, batch)
        grads[cache] = {
            n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None
        }
        learner = trainer.model
        for p in learner.parameters():
            p.grad = None

        def loss_of(d, learner=learner, batch=batch):
            features = learner.image_features(batch[d]["pixel_values"])
            return lambda: learner.domain_loss(features, batch[d]["labels"], d)

        step = pga_update(
            {d: loss_of(d) for d in ("target", "source")},
            learner.shared_ctx,
            dict(learner.domain_ctx),
            target="target",
            rho=1e-2,
            align=1.0,
            tradeoff=1.0,
        )
        torch.testing.assert_close(grads[cache]["shared_ctx"], step.shared_grad)
        torch.testing.assert_close(grads[cache]["domain_ctx.source"], step.domain_grads["source"])
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name])


def test_fp16_loss_scaling_step_equals_the_fp32_step(tmp_path):
    """PGA writes its own gradients into p.grad: under accelerate's fp16 loss scaling they must
    carry the scale the GradScaler divides out (fp32 compute, so the steps are equal)."""
    knobs = dict(pga_rho=1e-2, pga_align=1.0, max_grad_norm=1.0)
    reference = _trainer(tmp_path / "fp32", **knobs)
    reference.train()
    scaled = _trainer(tmp_path / "fp16", **knobs)
    with fp16_loss_scaling(scaled.accelerator, init_scale=2.0**10, autocast=False) as scaler:
        scaled.train()
        assert scaler.get_scale() == 2.0**10
    for (name, p), q in zip(reference.model.named_parameters(), scaled.model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_source_only_baseline_ignores_the_target(tmp_path):
    trainer = _trainer(tmp_path, pga_rho=0.0, pga_align=0.0, pga_source_only=True)
    target_before = trainer.model.domain_ctx["target"].detach().clone()
    trainer.train()
    assert torch.equal(trainer.model.domain_ctx["target"], target_before)
    assert trainer.model.predict_domains == ["source"]


def test_trainer_refuses_unknown_setups(tmp_path):
    with pytest.raises(ValueError, match="multi_source"):
        _trainer(tmp_path, domains=("a", "b", "target"))
    with pytest.raises(ValueError, match="target_domain"):
        _trainer(tmp_path, target_domain="nowhere")
    with pytest.raises(ValueError, match="context lengths"):
        _trainer(tmp_path, n_ctx_shared=3)


# ----------------------------------------------------------------------------- the recipe


@pytest.mark.slow
def test_recipe_runs_offline_and_writes_its_card(tmp_path):
    from hf_extensions.hub import check_model_card_method
    from recipes.pga.train import RECIPE_DIR, main

    trainer, metrics = main(
        ["--config", str(RECIPE_DIR / "digits.yaml"), "--output_dir", str(tmp_path),
         "--max_steps", "4", "--clip_pretrain_steps", "30", "--eval_strategy", "no",
         "--pseudo_label_threshold", "0.0"]
    )  # fmt: skip
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["pseudo_label_coverage"] == 1.0  # threshold 0 keeps every target row
    metadata = check_model_card_method(tmp_path / "README.md", "pga")
    assert metadata["hyperparameters"]["pga_align"] == 1.0
    assert trainer.state.global_step == 4


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    """ERM (ρ = α = 0, every target row labelled): 2 accumulated micro-batches of 8 give the
    prompts of one batch of 16 (the added gradients are divided by the accumulation steps; SGD,
    since Adam would hide a wrong gradient scale)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(32) % 3
    domains = {
        name: {"pixel_values": torch.rand(32, 3, 16, 16, generator=generator), "labels": labels}
        for name in ("source", "target")
    }
    results = []
    for batch, accumulation in ((16, 1), (8, 2)):
        trainer = _trainer(
            tmp_path, pga_rho=0.0, pga_align=0.0, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, max_steps=2, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
        )  # fmt: skip
        trainer.train_dataset = PairedDomainDataset(domains)
        trainer.train()
        results.append(
            {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        )
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-4, atol=1e-5)
