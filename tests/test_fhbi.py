"""FHBI: particle evaluation modes, exact reductions (SVGD, SAM), repulsion, save/load, resume."""

import math
from pathlib import Path

import pytest
import torch
from fhbi_setup import lora_vit, mlp_particles_and_logits, train_set, training_args
from peft import PeftModel
from torch.func import functional_call

from hf_extensions.fhbi.kernels import mean_pairwise_distance
from hf_extensions.fhbi.particles import ParticleEnsemble
from hf_extensions.models import tiny_vit_classifier
from hf_extensions.testing.fake_hub import fake_hub
from trainers.fhbi_config import FHBIConfig
from trainers.fhbi_trainer import FHBITrainer
from trainers.sam_config import SAMConfig
from trainers.sam_trainer import SAMTrainer

ROOT = Path(__file__).resolve().parents[1]
DIGITS_YAML = ROOT / "recipes" / "fhbi" / "digits.yaml"


def _batch(rows=32):
    columns = train_set(rows).with_format("torch")[:]
    return columns["pixel_values"].float(), columns["labels"]


def _randomise_lora_b(ensemble, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in zip(ensemble.names, ensemble.particles):
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))


def test_stacked_vmap_and_loop_particles_agree_in_outputs_and_gradients():
    ensemble = ParticleEnsemble(lora_vit(), num_particles=3)
    assert ensemble.mode == "stacked"  # every particle tensor is an nn.Linear's
    _randomise_lora_b(ensemble)
    pixels, labels = _batch(16)
    results = {}
    for mode in ("stacked", "vmap", "loop"):
        ensemble.mode = mode
        ensemble.zero_grad()
        out = ensemble(pixel_values=pixels, labels=labels, return_particle_logits=True)
        out["particle_logits"].square().mean().backward()
        results[mode] = (
            out["particle_logits"].detach(),
            [p.grad.clone() for p in ensemble.particles],
        )
    loop_logits, loop_grads = results["loop"]
    assert (loop_logits[0] - loop_logits[1]).abs().max() > 1e-2  # the particles really differ
    for mode in ("stacked", "vmap"):
        torch.testing.assert_close(results[mode][0], loop_logits)
        for a, b in zip(results[mode][1], loop_grads):
            torch.testing.assert_close(a, b)
    # the prediction is the log of the mean probability
    mean = torch.softmax(loop_logits, -1).mean(0)
    out = ensemble(pixel_values=pixels, labels=labels)
    torch.testing.assert_close(out["logits"].exp(), mean)
    torch.testing.assert_close(out["loss"], torch.nn.functional.nll_loss(mean.log(), labels))


def test_particles_start_apart_and_particle_zero_is_the_given_model():
    peft = lora_vit()
    before = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    ensemble = ParticleEnsemble(peft, num_particles=3, seed=0)
    for name, stacked in zip(ensemble.names, ensemble.particles):
        assert torch.equal(stacked[0], before[name])
        if "lora_B" in name:
            assert torch.count_nonzero(stacked) == 0  # PEFT's init: B = 0 for every particle
        else:
            assert not torch.equal(stacked[1], stacked[0]) and not torch.equal(
                stacked[2], stacked[1]
            )
    assert not any(p.requires_grad for p in ensemble.template_parameters())


def test_rho_zero_equals_a_hand_computed_svgd_step(tmp_path):
    ensemble = ParticleEnsemble(lora_vit(), num_particles=3)
    _randomise_lora_b(ensemble)
    x0 = [p.detach().clone() for p in ensemble.particles]
    lr, m = 0.1, 3
    args = FHBIConfig(**training_args(tmp_path, learning_rate=lr), num_particles=m, rho=0.0)
    FHBITrainer(model=ensemble, args=args, train_dataset=train_set()).train()

    pixels, labels = _batch()
    grads = []
    for i in range(m):
        leaves = [x[i].clone().requires_grad_(True) for x in x0]
        logits = functional_call(ensemble.model, dict(zip(ensemble.names, leaves)), (pixels,))
        loss = torch.nn.functional.cross_entropy(logits["logits"], labels)
        grads.append(torch.autograd.grad(loss, leaves))
    flat = torch.stack([torch.cat([x[i].flatten() for x in x0]) for i in range(m)]).double()
    d2 = torch.tensor(
        [[float(((flat[i] - flat[j]) ** 2).sum()) for j in range(m)] for i in range(m)]
    )
    sigma2 = float(torch.tensor([d2[0, 1], d2[0, 2], d2[1, 2]]).median()) / (2 * math.log(m + 1))
    kernel = torch.exp(-d2 / (2 * sigma2))
    for k, x in enumerate(x0):
        for i in range(m):
            step = sum(
                float(kernel[i, j]) * (grads[j][k] - (x[i] - x[j]) / sigma2) for j in range(m)
            )
            expected = x[i] - lr * step / m
            torch.testing.assert_close(ensemble.particles[k][i].detach(), expected)
    assert max((ensemble.particles[k] - x).abs().max() for k, x in enumerate(x0)) > 1e-3


def test_one_particle_equals_a_sam_step(tmp_path):
    sam_model = lora_vit()
    ensemble = ParticleEnsemble(lora_vit(), num_particles=1)
    common = training_args(tmp_path / "a", max_steps=3, per_device_train_batch_size=16)
    SAMTrainer(
        model=sam_model, args=SAMConfig(**common, rho=0.05), train_dataset=train_set()
    ).train()
    common["output_dir"] = str(tmp_path / "b")
    fhbi = FHBIConfig(**common, rho=0.05, num_particles=1, ascent_norm="particle")
    FHBITrainer(model=ensemble, args=fhbi, train_dataset=train_set()).train()
    trained = dict(sam_model.named_parameters())
    initial = dict(lora_vit().named_parameters())
    moved = max((trained[n] - initial[n]).abs().max().item() for n in ensemble.names)
    assert moved > 1e-3
    for name, stacked in zip(ensemble.names, ensemble.particles):
        torch.testing.assert_close(stacked[0], trained[name], msg=name)


def test_kernel_term_repels_particles_when_the_loss_gradient_is_zero(tmp_path):
    distances = {}
    for kernel, sign in (("rbf", "paper"), ("rbf", "official_code"), ("none", "paper")):
        ensemble = ParticleEnsemble(lora_vit(), num_particles=4)
        args = FHBIConfig(**training_args(tmp_path), kernel=kernel, kernel_grad_sign=sign)
        trainer = FHBITrainer(model=ensemble, args=args, train_dataset=train_set())
        params = list(ensemble.particles)
        before = float(mean_pairwise_distance(params))
        for p in params:
            p.grad = torch.zeros_like(p)
        trainer.apply_kernel()
        with torch.no_grad():
            for p in params:
                p -= 0.05 * p.grad
        distances[kernel, sign] = float(mean_pairwise_distance(params)) - before
    assert distances["rbf", "paper"] > 1e-4
    assert distances["rbf", "official_code"] < -1e-4  # the official code's sign attracts
    assert distances["none", "paper"] == 0.0


def test_ensemble_saves_as_peft_adapters_reloads_exactly_and_pushes(tmp_path):
    ensemble = ParticleEnsemble(lora_vit(), num_particles=3)
    _randomise_lora_b(ensemble)
    pixels, _ = _batch(8)
    expected = ensemble(pixel_values=pixels, return_particle_logits=True)["particle_logits"]
    ensemble.save_pretrained(tmp_path / "saved")
    reloaded = ParticleEnsemble.from_pretrained(tiny_vit_classifier(), tmp_path / "saved")
    for a, b in zip(reloaded.particles, ensemble.particles):
        assert torch.equal(a, b)
    got = reloaded(pixel_values=pixels, return_particle_logits=True)["particle_logits"]
    assert torch.equal(got, expected)
    single = PeftModel.from_pretrained(tiny_vit_classifier(), str(tmp_path / "saved/particle_2"))
    torch.testing.assert_close(single(pixel_values=pixels).logits, expected[2])
    with fake_hub(tmp_path / "hub") as hub:
        ensemble.push_to_hub("fhbi-particles")
        pushed = hub.repo_path("fhbi-particles")
        again = ParticleEnsemble.from_pretrained(tiny_vit_classifier(), pushed)
    assert all(torch.equal(a, b) for a, b in zip(again.particles, ensemble.particles))
    (tmp_path / "saved/particle_ensemble.json").write_text('{"format_version": 99}')
    with pytest.raises(ValueError, match="format"):
        ParticleEnsemble.from_pretrained(tiny_vit_classifier(), tmp_path / "saved")


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    common = training_args(
        tmp_path / "full", max_steps=4, per_device_train_batch_size=8, optim="sgd",
        optim_args="momentum=0.9", save_strategy="steps", save_steps=2,
    )  # fmt: skip
    full = ParticleEnsemble(lora_vit(), num_particles=3)
    FHBITrainer(
        model=full, args=FHBIConfig(**common, num_particles=3), train_dataset=train_set()
    ).train()
    resumed = ParticleEnsemble(lora_vit(), num_particles=3)
    common["output_dir"] = str(tmp_path / "resumed")
    trainer = FHBITrainer(
        model=resumed, args=FHBIConfig(**common, num_particles=3), train_dataset=train_set()
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert (tmp_path / "full/checkpoint-2/particle_1/adapter_model.safetensors").is_file()
    for a, b in zip(resumed.particles, full.particles):
        assert torch.equal(a, b)
    assert max((a - b).abs().max() for a, b in zip(full.particles, ParticleEnsemble(
        lora_vit(), num_particles=3).particles)) > 1e-3  # fmt: skip


def test_trainer_refuses_an_ensemble_of_another_size(tmp_path):
    """(The config's own refusals are in the conformance suite.)"""
    with pytest.raises(ValueError, match="particles"):
        FHBITrainer(
            model=ParticleEnsemble(lora_vit(), num_particles=2),
            args=FHBIConfig(output_dir=str(tmp_path), num_particles=3, report_to="none"),
        )


def test_recipe_trains_saves_particle_adapters_and_writes_its_card(tmp_path):
    from hf_extensions.hub import check_model_card_method
    from recipes.fhbi.train import main

    trainer, metrics = main(
        ["--config", str(DIGITS_YAML), "--output_dir", str(tmp_path), "--max_steps", "60", "--learning_rate", "0.01",
         "--eval_strategy", "no", "--logging_steps", "10", "--num_particles", "2"]
    )  # fmt: skip
    assert metrics["test_accuracy"] > 0.2  # chance is 0.1
    assert (tmp_path / "particle_1" / "adapter_config.json").is_file()
    metadata = check_model_card_method(tmp_path / "README.md", "fhbi")
    assert metadata["hyperparameters"]["num_particles"] == 2
    logged = [h for h in trainer.state.log_history if "particle_distance" in h]
    assert logged and all(h["particle_distance"] > 0 and h["perturbation_norm"] > 0 for h in logged)
    reloaded = ParticleEnsemble.from_pretrained(tiny_vit_classifier(), tmp_path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.particles, model.particles))


def test_paper_scale_setting_parses_into_valid_configs(tmp_path):
    from hf_extensions.cli import RecipeArgumentParser
    from hf_extensions.models.image_classification import ImageClassificationArguments
    from recipes.fhbi.train import LoraArguments

    parser = RecipeArgumentParser((ImageClassificationArguments, LoraArguments, FHBIConfig))
    script_args, lora, config = parser.parse(
        ["--config", str(ROOT / "recipes/fhbi/vtab_vit_b16.yaml"), "--output_dir",
         str(tmp_path), "--use_cpu", "true"]  # bf16 needs a GPU or use_cpu
    )  # fmt: skip
    assert script_args.model_name_or_path == "google/vit-base-patch16-224-in21k"
    assert lora.lora_r == 8 and lora.lora_target_modules == "q_proj,v_proj"
    assert config.num_particles == 4 and config.rho == 0.03 and config.learning_rate == 0.15


def test_likelihoods_and_prior_define_the_training_loss(tmp_path):
    ensemble, inputs, logits = mlp_particles_and_logits()
    ce = torch.nn.functional.cross_entropy
    expected = {
        "per_particle": sum(ce(logits[i], inputs["labels"]) for i in range(3)),
        "ensemble_logits": 3 * ce(logits.mean(0), inputs["labels"]),
    }
    for likelihood, value in expected.items():
        args = FHBIConfig(**training_args(tmp_path), num_particles=3, likelihood=likelihood)
        trainer = FHBITrainer(model=ensemble, args=args)
        torch.testing.assert_close(trainer.compute_loss(ensemble, dict(inputs)), value)
    args = FHBIConfig(**training_args(tmp_path), num_particles=3, prior_std=0.5)
    trainer = FHBITrainer(model=ensemble, args=args, train_dataset=train_set(10))
    squares = sum(p.pow(2).sum() for p in ensemble.particles)
    torch.testing.assert_close(
        trainer.compute_loss(ensemble, dict(inputs)),
        expected["per_particle"] + squares / (2 * 0.25 * 10),
    )


def test_plain_model_particles_save_and_reload_exactly(tmp_path):
    from hf_extensions.models import tiny_mlp_classifier

    ensemble = ParticleEnsemble(tiny_mlp_classifier(), num_particles=3, seed=4)
    assert ensemble.mode == "stacked"
    ensemble.save_pretrained(tmp_path)
    reloaded = ParticleEnsemble.from_pretrained(tiny_mlp_classifier(seed=9), tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.particles, ensemble.particles))
    assert not torch.equal(ensemble.particles[0][1], ensemble.particles[0][0])
    with pytest.raises(ValueError, match="tensors"):
        ParticleEnsemble.from_pretrained(tiny_mlp_classifier(hidden_sizes=(16, 16)), tmp_path)
