"""FHBI's combined step (ρ > 0 with m > 1 particles) against hand computations, and the
SAM-ensemble arm (``kernel="none"``, ρ > 0) against m independent SAM runs."""

import math

import torch
from fhbi_setup import lora_vit, mlp_particles_and_logits, train_set, training_args
from torch.func import functional_call

from hf_extensions.fhbi.particles import ParticleEnsemble
from trainers.fhbi_config import FHBIConfig
from trainers.fhbi_trainer import FHBITrainer
from trainers.sam_config import SAMConfig
from trainers.sam_trainer import SAMTrainer


def _ensemble(m):
    ensemble = ParticleEnsemble(lora_vit(), num_particles=m)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero LoRA B: every tensor gets a gradient
        for name, p in zip(ensemble.names, ensemble.particles):
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return ensemble


def _gradient(model, names, tensors, pixels, labels, scale=1.0):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    logits = functional_call(model, dict(zip(names, leaves)), (pixels,))["logits"]
    loss = scale * torch.nn.functional.cross_entropy(logits, labels)
    return torch.autograd.grad(loss, leaves)


def test_rho_and_several_particles_equal_a_hand_computed_fhbi_step(tmp_path):
    """ε_i = ρ g_i/‖g_i‖ per tensor, g_i' at θ_i + ε_i, then (1/m) Σ_j [K_ij g_j' − ∇K] with the
    median bandwidth at the unperturbed particles (Truong et al. 2025, Algorithm 1)."""
    m, lr, rho = 3, 0.1, 0.05
    ensemble = _ensemble(m)
    x0 = [p.detach().clone() for p in ensemble.particles]
    args = FHBIConfig(**training_args(tmp_path, learning_rate=lr), num_particles=m, rho=rho)
    FHBITrainer(model=ensemble, args=args, train_dataset=train_set()).train()

    columns = train_set().with_format("torch")[:]
    pixels, labels = columns["pixel_values"].float(), columns["labels"]
    perturbed_grads = []
    for i in range(m):
        theta = [x[i] for x in x0]
        g = _gradient(ensemble.model, ensemble.names, theta, pixels, labels)
        eps = [rho * t / (t.norm() + 1e-12) for t in g]  # ascent_norm="block": per tensor
        shifted = [t + e for t, e in zip(theta, eps)]
        perturbed_grads.append(_gradient(ensemble.model, ensemble.names, shifted, pixels, labels))
    flat = torch.stack([torch.cat([x[i].flatten() for x in x0]) for i in range(m)]).double()
    d2 = torch.cdist(flat, flat).pow(2)
    pairs = torch.stack([d2[0, 1], d2[0, 2], d2[1, 2]])
    sigma2 = float(pairs.median()) / (2 * math.log(m + 1))
    kernel = torch.exp(-d2 / (2 * sigma2))
    for k, x in enumerate(x0):
        for i in range(m):
            step = sum(
                float(kernel[i, j]) * (perturbed_grads[j][k] - (x[i] - x[j]) / sigma2)
                for j in range(m)
            )
            torch.testing.assert_close(
                ensemble.particles[k][i].detach(), x[i] - lr * step / m, atol=2e-6, rtol=1e-4
            )
    # the perturbation mattered: the same step with rho = 0 lands elsewhere
    svgd = _ensemble(m)
    args = FHBIConfig(
        **training_args(tmp_path / "svgd", learning_rate=lr), num_particles=m, rho=0.0
    )
    FHBITrainer(model=svgd, args=args, train_dataset=train_set()).train()
    gap = max((a - b).abs().max() for a, b in zip(svgd.particles, ensemble.particles))
    assert gap > 1e-4


def test_kernel_off_with_rho_equals_independent_sam_runs(tmp_path):
    """``kernel="none"``, ρ > 0, m = 3: each particle follows its own SAM trajectory."""
    m = 3
    ensemble = _ensemble(m)
    initial = [p.detach().clone() for p in ensemble.particles]
    common = training_args(tmp_path / "fhbi", max_steps=3, per_device_train_batch_size=16)
    fhbi = FHBIConfig(**common, num_particles=m, rho=0.05, kernel="none", ascent_norm="particle")
    FHBITrainer(model=ensemble, args=fhbi, train_dataset=train_set()).train()
    for i in range(m):
        model = lora_vit()
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, stacked in zip(ensemble.names, initial):
                named[name].copy_(stacked[i])
        common["output_dir"] = str(tmp_path / f"sam{i}")
        SAMTrainer(
            model=model, args=SAMConfig(**common, rho=0.05), train_dataset=train_set()
        ).train()
        moved = max((named[n] - s[i]).abs().max() for n, s in zip(ensemble.names, initial))
        assert moved > 1e-3
        for name, stacked in zip(ensemble.names, ensemble.particles):
            torch.testing.assert_close(stacked[i], named[name], msg=f"particle {i} {name}")


def test_official_likelihood_scale_is_the_codes_loss_and_reports_the_same_losses(tmp_path):
    ensemble, inputs, logits = mlp_particles_and_logits()
    ce = torch.nn.functional.cross_entropy
    expected = {
        "per_particle": sum(ce(logits[i], inputs["labels"]) for i in range(3)) / 3,
        "ensemble_logits": ce(logits.mean(0), inputs["labels"]),
    }
    for likelihood, value in expected.items():
        args = FHBIConfig(
            **training_args(tmp_path), num_particles=3, likelihood=likelihood,
            likelihood_scale="official_code",
        )  # fmt: skip
        trainer = FHBITrainer(model=ensemble, args=args)
        torch.testing.assert_close(trainer.compute_loss(ensemble, dict(inputs)), value)
    # the logged training losses are per particle whatever the scale
    logged = {}
    for scale in ("particle", "official_code"):
        model = ParticleEnsemble(lora_vit(), num_particles=2)
        args = FHBIConfig(
            **training_args(tmp_path / scale), num_particles=2, rho=0.05, likelihood_scale=scale
        )
        trainer = FHBITrainer(model=model, args=args, train_dataset=train_set())
        trainer.train()
        logged[scale] = next(h for h in trainer.state.log_history if "loss_at_weights" in h)
    assert logged["particle"]["loss_at_weights"] == logged["official_code"]["loss_at_weights"]
