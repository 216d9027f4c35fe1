"""EAP / ESD concept erasure: parameter groups, losses, z sampling, config (Bui et al. 2024)."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_extensions.models import tiny_stable_diffusion_pipeline
from hf_extensions.pipelines import (
    PARAMETER_GROUPS,
    ErasureConfig,
    LatentSampler,
    encode_prompts,
    erase_concepts,
    erasure_target,
    in_group,
    prediction_loss,
)

CONCEPT = "a red circle"


def _fast_config(**overrides) -> ErasureConfig:
    values = {
        "num_steps": 2,
        "learning_rate": 1e-2,
        "ddim_steps": 3,
        "progress_bar": False,
        "k_closest": 8,
        "num_centers": 4,
        "candidates": ["dog", "cat", "tree", "house", "car", "boat", "apple", "river"],
    }
    return ErasureConfig(**{**values, **overrides})


@pytest.mark.parametrize("group", ["xattn", "noxattn", "selfattn"])
def test_only_the_chosen_parameter_group_changes(group):
    pipe = tiny_stable_diffusion_pipeline()
    before = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    text_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    vae_before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    pipe = erase_concepts(pipe, [CONCEPT], "eap", _fast_config(parameter_group=group))
    after = dict(pipe.unet.named_parameters())
    inside = [name for name in before if in_group(name, group)]
    outside = [name for name in before if not in_group(name, group)]
    assert inside and outside
    assert all(torch.equal(before[name], after[name]) for name in outside)
    changed = [name for name in inside if not torch.equal(before[name], after[name])]
    assert changed == inside  # Adam moves every tensor of the group
    assert sorted(pipe.erasure_result.trained_parameters) == sorted(inside)
    assert all(torch.equal(text_before[k], v) for k, v in pipe.text_encoder.state_dict().items())
    assert all(torch.equal(vae_before[k], v) for k, v in pipe.vae.state_dict().items())
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_parameter_groups_partition_as_named():
    names = [name for name, _ in tiny_stable_diffusion_pipeline().unet.named_parameters()]
    xattn = {n for n in names if in_group(n, "xattn")}
    selfattn = {n for n in names if in_group(n, "selfattn")}
    noxattn = {n for n in names if in_group(n, "noxattn")}
    assert all(".attn2." in n for n in xattn) and all(".attn1." in n for n in selfattn)
    assert not xattn & noxattn and selfattn <= noxattn
    excluded = set(names) - xattn - noxattn
    assert excluded and all(
        n.split(".")[0] in ("time_embedding", "conv_out", "conv_norm_out") for n in excluded
    )
    assert {n for n in names if in_group(n, "full")} == set(names)
    with pytest.raises(ValueError, match="parameter_group"):
        in_group(names[0], "attention")


def test_x0_loss_is_scaled_epsilon_loss():
    generator = torch.Generator().manual_seed(0)
    z, a, b = (torch.randn(3, 4, 8, 8, generator=generator) for _ in range(3))
    for alpha_bar in (0.02, 0.5, 0.97):
        eps_loss = prediction_loss(a, b, z, alpha_bar, "epsilon")
        x0_loss = prediction_loss(a, b, z, alpha_bar, "x0")
        torch.testing.assert_close(
            x0_loss, (1 - alpha_bar) / alpha_bar * eps_loss, rtol=1e-5, atol=0
        )
    per_sample = torch.tensor([0.1, 0.5, 0.9])
    weights = (1 - per_sample) / per_sample
    expected = (
        sum(weights[n] * prediction_loss(a[n], b[n], z[n], 1.0, "epsilon") for n in range(3)) / 3
    )
    torch.testing.assert_close(
        prediction_loss(a, b, z, per_sample, "x0"), expected, rtol=1e-5, atol=0
    )


def test_erasure_target_is_negative_guidance():
    uncond, cond = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(erasure_target(uncond, cond, 1.0), torch.tensor([-1.0, 3.0]))
    torch.testing.assert_close(erasure_target(uncond, cond, 0.0), uncond)


@pytest.mark.parametrize("i", [0, 2, 5])
def test_latents_at_timesteps_i_match_the_pipeline(i):
    """z after ``timesteps[:i]`` is the pipeline's own latent after i steps (same noise, CFG)."""
    pipe = tiny_stable_diffusion_pipeline()
    steps, guidance = 6, 3.0
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = {0: noise.clone()}

    def keep(pipeline, index, timestep, tensors):
        seen[index + 1] = tensors["latents"].clone()
        return tensors

    pipe(
        CONCEPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=noise.clone(),
        output_type="latent",
        callback_on_step_end=keep,
    )
    sampler = LatentSampler(pipe.scheduler.config, steps)
    cond = encode_prompts(pipe, [CONCEPT])
    uncond = encode_prompts(pipe, [""])[0]
    z = sampler.sample(pipe.unet, cond, uncond, noise, i, guidance)
    torch.testing.assert_close(z, seen[i], rtol=1e-5, atol=1e-6)
    pipe.scheduler.set_timesteps(steps)
    assert int(sampler.timestep(i)) == int(pipe.scheduler.timesteps[i])
    expected = pipe.scheduler.alphas_cumprod[int(pipe.scheduler.timesteps[i])]
    assert float(sampler.alpha_bar(i)) == float(expected)
    with pytest.raises(ValueError, match=r"^`i` must be an integer in \[0, "):
        sampler.sample(pipe.unet, cond, uncond, noise, steps + 1, guidance)


def test_esd_is_eap_without_preservation_and_method_is_checked():
    config = ErasureConfig(preservation_weight=2.0)
    assert config.for_method("esd").preservation_weight == 0.0
    assert config.for_method("eap").preservation_weight == 2.0
    with pytest.raises(ValueError, match="method"):
        config.for_method("uce")
    assert set(PARAMETER_GROUPS) == {"xattn", "noxattn", "selfattn", "full"}
    with pytest.raises(ValueError, match="concepts"):
        erase_concepts(tiny_stable_diffusion_pipeline(), [""], "esd", _fast_config())


def test_gradient_accumulation_and_bf16_autocast_under_accelerate():
    """gradient_accumulation_steps=2: two cycles (two adversary draws), one optimizer update."""
    from accelerate.state import AcceleratorState

    # Accelerate keeps one process-wide state; a new mixed precision needs a fresh one.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        _check_accumulation()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _check_accumulation():
    from hf_extensions.pipelines import ConceptEraser

    config = _fast_config(gradient_accumulation_steps=2, mixed_precision="bf16", num_steps=1)
    eraser = ConceptEraser(tiny_stable_diffusion_pipeline(), [CONCEPT], "eap", config)
    before = {n: p.detach().clone() for n, p in eraser.unet.named_parameters() if p.requires_grad}
    eraser.step()
    assert sum(eraser.choices[0].values()) == 2  # two micro-cycles ran
    steps = {int(state["step"]) for state in eraser.optimizer.optimizer.state.values()}
    assert steps == {1}  # ... and the optimizer stepped once
    # ... and so did the adversary, on the mean logit gradient of the two cycles
    adversary_steps = {int(state["step"]) for state in eraser.adversary_optimizer.state.values()}
    assert adversary_steps == {1}
    after = dict(eraser.unet.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert eraser.accelerator.mixed_precision == "bf16"


def test_extra_candidates_join_the_adversary_and_are_validated():
    from hf_extensions.pipelines import ConceptEraser

    pipe = tiny_stable_diffusion_pipeline()
    target = encode_prompts(pipe, [CONCEPT])[0]
    eraser = ConceptEraser(
        pipe, [CONCEPT], "eap", _fast_config(), extra_candidates={"<copy>": target + 0.01}
    )
    candidates = eraser.adversaries[0].candidates
    assert candidates.words[-1] == "<copy>" and len(candidates.words) == 5
    assert candidates.distances[-1] == pytest.approx(0.01 * target.numel() ** 0.5, rel=1e-4)
    torch.testing.assert_close(eraser.adversaries[0].embeddings[-1], target + 0.01)
    with pytest.raises(ValueError, match="extra_candidates"):
        ConceptEraser(pipe, [CONCEPT], "eap", _fast_config(), extra_candidates={"x": target[0]})
    with pytest.raises(ValueError, match="extra_candidates"):
        ConceptEraser(
            pipe, [CONCEPT], "eap", _fast_config(), extra_candidates={candidates.words[0]: target}
        )


def test_accumulation_ignores_a_dataloader_another_run_left_open(tmp_path):
    """Accelerate's gradient state is shared by the process: a Trainer stopped by max_steps at
    the last batch of an epoch leaves that dataloader registered "at its end", which used to make
    every cycle of a later erasure in the same process an optimizer step (the result then
    depended on what ran before it)."""
    from transformers import Trainer, TrainingArguments

    from hf_extensions.data import load_digits
    from hf_extensions.models import tiny_mlp_classifier
    from hf_extensions.pipelines import ConceptEraser

    rows = load_digits(seed=0, layout="vector")["train"].select(range(8))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, use_cpu=True,
        report_to=[], save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=tiny_mlp_classifier(), args=args, train_dataset=rows)
    trainer.train()  # stops on the epoch's last batch, before the dataloader unregisters
    eraser = ConceptEraser(
        tiny_stable_diffusion_pipeline(),
        [CONCEPT],
        "esd",
        _fast_config(gradient_accumulation_steps=2),
    )
    eraser.step()
    eraser.step()
    steps = {int(state["step"]) for state in eraser.optimizer.optimizer.state.values()}
    assert steps == {2}  # one optimizer step per model step, not per cycle


def _as_v_prediction(pipe):
    """The same model as a v-prediction UNet (SD 2.x style): v = (ε − σ z) / α at ᾱ_t."""
    import types

    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction"
    )
    alphas_cumprod = pipe.scheduler.alphas_cumprod
    eps_forward = type(pipe.unet).forward

    def v_forward(self, sample, timestep, *args, **kwargs):
        eps = eps_forward(self, sample, timestep, *args, **kwargs)[0]
        bar = alphas_cumprod[torch.as_tensor(timestep).long()].reshape(-1, 1, 1, 1)
        return ((eps - (1 - bar).sqrt() * sample) / bar.sqrt(),)

    pipe.unet.forward = types.MethodType(v_forward, pipe.unet)  # deepcopy rebinds it
    return pipe


def test_v_prediction_unet_erases_exactly_like_its_epsilon_twin():
    """A v-prediction UNet (SD 2.x) must get the loss of the ε UNet it equals: read as ε, its
    x0 loss was 1/ᾱ too large (~150x at t = 981) and its ε loss ᾱ too small."""
    from hf_extensions.pipelines import evaluate_erasure

    results, base = {}, tiny_stable_diffusion_pipeline()
    for kind in ("epsilon", "v"):
        pipe = copy.deepcopy(base)
        if kind == "v":
            pipe = _as_v_prediction(pipe)
        original = copy.deepcopy(pipe.unet)
        pipe = erase_concepts(pipe, [CONCEPT], "eap", _fast_config(ddim_steps=2))
        metrics = evaluate_erasure(
            pipe, original, [CONCEPT], heldout=["dog"], num_samples=2, ddim_steps=2
        )
        results[kind] = (pipe.erasure_result.losses, metrics)
    (eps_losses, eps_metrics), (v_losses, v_metrics) = results["epsilon"], results["v"]
    torch.testing.assert_close(v_losses, eps_losses, rtol=1e-3, atol=0)
    for key in ("erasure_gap", "erasure_distance_before", "heldout_drift"):
        assert v_metrics[key] == pytest.approx(eps_metrics[key], rel=1e-3)
