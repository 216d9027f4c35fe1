"""Conformance cases of the methods that are not ``Trainer`` subclasses: the two PEFT methods,
the concept-erasure pipeline modifier, the S2N scheduler and the MetaAug quantizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import (
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

import peft_configs  # noqa: F401  (registers both PEFT methods, as a user's import does)
from conformance.case import (
    DDP_STEP,
    QUIET,
    REAL_STEP,
    Baseline,
    CardSpec,
    Case,
    Ranks,
    Saved,
    bad,
    bad_values,
    digits,
    params,
    prefixed,
    probe_pixels,
)
from hf_extensions.models import (
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_stable_diffusion_pipeline,
)
from hf_extensions.models import tiny_vit_classifier as vit
from hf_extensions.pipelines import ConceptEraser, ErasureConfig, erase_concepts, save_erased
from hf_extensions.quantization import MetaAugConfig, MetaAugQuantizer
from hf_extensions.quantization.models import DigitsResNet
from hf_extensions.schedulers import GaussianMixture, S2NGeneralizedScheduler, run_denoising_loop
from peft_configs import PromptPoolConfig, SharedPrefixTuningConfig
from peft_configs.prompt_pool import query_features, topic_keys
from peft_configs.shared_prefix import SharedPrefixLayer

# ------------------------------------------------------------------ shared-structure prefix


def _token_data(rows: int = 12) -> Dataset:
    ids = torch.randint(5, 500, (rows, 6), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids}
    )


def _stock_fit(model, output_dir: Path, data, **settings) -> None:
    """The stock ``Trainer`` (the PEFT methods are trained by it, as any PEFT adapter)."""
    args = TrainingArguments(
        str(output_dir), **{**QUIET, **REAL_STEP, "per_device_train_batch_size": 4, **settings}
    )
    Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator).train()


def _prefix_outputs(model, prefix: torch.Tensor):
    ids = torch.randint(5, 500, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    return {"prefix": prefix.detach().clone(), "logits": logits}


def _peft_prefix_tuning():
    model = get_peft_model(
        tiny_gpt2(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    weight = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.normal_(generator=torch.Generator().manual_seed(1))
    return model, weight


def _shared_prefix(share: str, start: torch.Tensor | None):
    model = get_peft_model(
        tiny_gpt2(),
        SharedPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, share=share),
    )
    if start is not None:  # PEFT's [n, L * 2d] block of layer l is columns [2dl, 2d(l + 1))
        layers = sorted(
            (m for m in model.modules() if isinstance(m, SharedPrefixLayer)),
            key=lambda m: m.site.layer_index,
        )
        width = 2 * layers[0].site.kv_dim
        with torch.no_grad():
            for index, layer in enumerate(layers):
                layer.shared_prefix_kv["default"].copy_(
                    start[:, index * width : (index + 1) * width]
                )
    return model


def _shared_prefix_baseline(tmp_path: Path) -> Baseline:
    """``share="none"`` from PEFT's initial prefix, 3 AdamW steps of the stock ``Trainer``:
    PEFT's own ``PrefixTuningConfig(prefix_projection=False)`` trained the same way, bit for
    bit (prefix and logits). Control: ``share="global_mlp"``, the reparameterised prefix."""
    data = _token_data()
    stock, weight = _peft_prefix_tuning()
    start = weight.detach().clone()
    initial = _prefix_outputs(stock, start)
    stock.train()
    _stock_fit(stock, tmp_path / "stock", data)
    result = Baseline(method={}, stock=_prefix_outputs(stock, weight), control={}, initial=initial)
    for name, share, begin in (("method", "none", start), ("control", "global_mlp", None)):
        model = _shared_prefix(share, begin)
        _stock_fit(model, tmp_path / name, data)
        setattr(result, name, _prefix_outputs(model, model.base_model.materialized_prefix()))
    return result


_PREFIX_SAVE = dict(share="per_layer_mlp", num_virtual_tokens=3, dropout=0.2)


def _vit_classification(rows: int = 32) -> Dataset:
    return digits("image", rows)


def _shared_prefix_save(directory: Path) -> Saved:
    model = get_peft_model(
        vit(), SharedPrefixTuningConfig(modules_to_save=["classifier"], **_PREFIX_SAVE)
    )
    args = TrainingArguments(str(directory / "run"), **{**QUIET, **REAL_STEP, "max_steps": 2})
    Trainer(model=model, args=args, train_dataset=_vit_classification()).train()
    model.save_pretrained(directory)
    with torch.no_grad():
        return Saved({"logits": model.eval()(pixel_values=probe_pixels()).logits})


def _shared_prefix_reload(directory: Path):
    model = PeftModel.from_pretrained(vit(), directory).eval()
    with torch.no_grad():
        return {"logits": model(pixel_values=probe_pixels()).logits}


def _stock_ranks(build):
    """The stock ``Trainer`` on a PEFT model of ``build()`` (digits, 10 labels): 2 x 8 == 1 x 16."""

    def run(output_dir: str, variant: str):
        model = build()
        initial = params(model)
        args = TrainingArguments(
            output_dir,
            per_device_train_batch_size={"two": 8, "one": 16}[variant],
            **{**QUIET, **DDP_STEP},
        )
        trainer = Trainer(model=model, args=args, train_dataset=_vit_classification(48))
        trainer.train()
        return {"steps": trainer.state.global_step}, initial, params(model)

    return Ranks(run)


SHARED_PREFIX = Case(
    id="shared-prefix",
    baseline=_shared_prefix_baseline,
    save=_shared_prefix_save,
    reload=_shared_prefix_reload,
    bad_configs=(
        *bad_values(
            SharedPrefixTuningConfig,
            {},
            [("share", "deep"), ("num_virtual_tokens", 0), ("dropout", 1.0), ("layers", [0, 0])],
        ),
        bad("hidden_size", lambda: SharedPrefixTuningConfig(share="none", hidden_size=16), 16),
        bad("latent_dim", lambda: SharedPrefixTuningConfig(share="simple_share", latent_dim=8), 8),
    ),
    ranks=_stock_ranks(
        lambda: get_peft_model(
            vit(),
            SharedPrefixTuningConfig(
                share="global_mlp", num_virtual_tokens=3, modules_to_save=["classifier"]
            ),
        )
    ),
    not_applicable={
        "card": "a PEFT adapter's README is PEFT's own card (library_name peft, base_model); the "
        "hf-extensions record (method, paper, share) is written by recipes/shared_prefix only",
    },
)

# -------------------------------------------------------------------------------- prompt pool


def _bert_encoder():
    return tiny_bert_classifier().bert.eval()


def _tokens(rows: int = 6):
    ids = torch.randint(1, 500, (rows, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


_POOL = dict(pool_size=4, prompt_length=3, top_k=1)


def _pool_outputs(model, batch, enabled: bool):
    torch.manual_seed(0)  # the same dropout draws as the stock forward
    with torch.no_grad():
        if enabled:
            out = model(**batch)
        else:
            with model.disable_adapter():
                out = model(**batch)
    return out


def _prompt_pool_baseline(tmp_path: Path) -> Baseline:
    """With the adapter disabled, a model wearing the pool (its attention rerouted through the
    prefix sites) is the stock model bit for bit: a BERT encoder and a ViT classifier, in
    training mode (dropout with the same draws). Control: the pool on."""
    del tmp_path
    result = Baseline({}, {}, {})
    for kind, build, batch, read in (
        ("bert", _bert_encoder, _tokens(), lambda o: o.last_hidden_state),
        ("vit", lambda: vit(), {"pixel_values": probe_pixels()}, lambda o: o.logits),
    ):
        extra = {"modules_to_save": ["classifier"]} if kind == "vit" else {}
        model = get_peft_model(build(), PromptPoolConfig(layers=[0, 1], **_POOL, **extra)).train()
        stock = build().train()
        torch.manual_seed(0)
        with torch.no_grad():
            result.stock[kind] = read(stock(**batch))
        result.method[kind] = read(_pool_outputs(model, batch, enabled=False))
        result.control[kind] = read(_pool_outputs(model, batch, enabled=True))
    return result


#: (family, key_source, query_source): the variants whose saved state differs.
_POOL_VARIANTS = (
    ("bert", "fixed", "input_embed_mean"),
    ("bert", "learned", "frozen_cls"),
    ("bert", "fixed", "layer_k_cls"),
    ("vit", "fixed", "input_embed_mean"),
)


def _pool_variant(family: str, key_source: str, query_source: str):
    if family == "vit":
        return (
            lambda: vit(num_layers=2),
            {"pixel_values": probe_pixels()},
            {"modules_to_save": ["classifier"]},
        )
    return _bert_encoder, _tokens(), {}


def _pool_query(query_source: str) -> dict:
    return {
        "query_source": query_source,
        "query_layer": 1 if query_source == "layer_k_cls" else None,
    }


def _pool_read(model, batch):
    out = model(**batch)
    value = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
    pool = model.base_model
    return {"output": value, "selection": pool.last_selection.clone(), "keys": pool.get_keys()}


def _prompt_pool_save(directory: Path) -> Saved:
    """Each variant with trained-looking prompts (moved off their initialisation) and, for
    fixed keys, topic keys from the base model's queries."""
    outputs = {}
    for family, key_source, query_source in _POOL_VARIANTS:
        build, batch, extra = _pool_variant(family, key_source, query_source)
        config = PromptPoolConfig(
            key_source=key_source, layers=[1], **_POOL, **_pool_query(query_source), **extra
        )
        torch.manual_seed(0)
        model = get_peft_model(build(), config)
        if key_source == "fixed":
            features = query_features(build(), **batch, **_pool_query(query_source))
            model.base_model.set_keys(topic_keys(features, num_topics=4, seed=0)[0])
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "prompt_pool_prompts" in name:
                    parameter.mul_(1.5).add_(0.1)
        model.eval()
        name = f"{family}-{key_source}-{query_source}"
        model.save_pretrained(directory / name)
        with torch.no_grad():
            outputs.update(prefixed(name, _pool_read(model, batch)))
    return Saved(outputs)


def _prompt_pool_reload(directory: Path):
    outputs = {}
    for family, key_source, query_source in _POOL_VARIANTS:
        build, batch, _ = _pool_variant(family, key_source, query_source)
        name = f"{family}-{key_source}-{query_source}"
        model = PeftModel.from_pretrained(build(), directory / name).eval()
        with torch.no_grad():
            outputs.update(prefixed(name, _pool_read(model, batch)))
    return outputs


PROMPT_POOL = Case(
    id="prompt-pool",
    baseline=_prompt_pool_baseline,
    save=_prompt_pool_save,
    reload=_prompt_pool_reload,
    bad_configs=bad_values(
        PromptPoolConfig,
        {},
        [
            ("pool_size", 0),
            ("prompt_length", 0),
            ("layers", []),
            ("layers", [1, 1]),
            ("key_source", "random"),
            ("query_source", "mean"),
            ("pull_loss_weight", -1.0),
            ("pull_loss_weight", float("nan")),
            ("format_version", 99),
        ],
    )
    + tuple(
        bad(field, lambda overrides=overrides: PromptPoolConfig(**overrides), overrides)
        for overrides, field in (
            ({"top_k": 5, "pool_size": 4}, "top_k"),
            ({"query_source": "layer_k_cls"}, "query_layer"),
            ({"query_source": "layer_k_cls", "query_layer": 2, "layers": [1]}, "query_layer"),
            ({"query_layer": 1}, "query_layer"),
            ({"pull_loss_weight": 0.1, "key_source": "fixed"}, "pull_loss_weight"),
        )
    ),
    ranks=_stock_ranks(
        lambda: get_peft_model(
            vit(),
            PromptPoolConfig(layers=[0, 1], modules_to_save=["classifier"], **_POOL),
        )
    ),
    not_applicable={
        "card": "a PEFT adapter's README is PEFT's own card; the hf-extensions record of a pool "
        "is written by recipes/prompt_dsi (method prompt-dsi, see the prompt-dsi case)",
    },
)

# ----------------------------------------------------------------------------- concept erasure

_CONCEPT = "a red circle"
ERASURE_CARD = {
    "parameter_group": "noxattn",
    "negative_guidance": 2.0,
    "preservation_weight": 0.5,
    "num_steps": 2,
    "learning_rate": 2e-2,
    "ddim_steps": 3,
    "k_closest": 4,
    "num_centers": 2,
    "adversary_reference": "detached",
    "gumbel_hard": False,
    "seed": 3,
}
_WORDS = ["dog", "cat", "tree", "house"]


def _erasure_images(pipe) -> dict[str, torch.Tensor]:
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        _CONCEPT,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    return {"images": torch.from_numpy(np.ascontiguousarray(images))}


def _erasure_save(directory: Path) -> Saved:
    config = ErasureConfig(progress_bar=False, candidates=_WORDS, **ERASURE_CARD)
    pipe = erase_concepts(tiny_stable_diffusion_pipeline(), [_CONCEPT], "eap", config)
    save_erased(pipe, directory, base_model="tiny-sd")
    recorded = {"variant": "eap", "erased_concepts": [_CONCEPT]}
    return Saved(_erasure_images(pipe), recorded)


def _erasure_reload(directory: Path):
    return _erasure_images(StableDiffusionPipeline.from_pretrained(directory))


def _erasure_ranks(output_dir: str, variant: str):
    """2 processes x 1 cycle == 1 process x 2 accumulated cycles (one seeded generator per
    cycle of the global batch); control: 1 process x 1 cycle (half the global batch)."""
    del output_dir
    accumulation = {"two": 1, "one": 2, "control": 1}[variant]
    config = ErasureConfig(
        num_steps=3, learning_rate=1e-2, ddim_steps=3, k_closest=6, num_centers=4,
        candidates=["dog", "cat", "tree", "house", "car", "boat", "music", "river"],
        gradient_accumulation_steps=accumulation, seed=0, progress_bar=False,
    )  # fmt: skip
    pipe = tiny_stable_diffusion_pipeline()
    eraser = ConceptEraser(pipe, [_CONCEPT], "eap", config)
    initial = {"logits": eraser.adversaries[0].logits.detach().clone()}
    initial.update(params(eraser.accelerator.unwrap_model(eraser.unet)))
    for _ in range(config.num_steps):
        eraser.step()
    cycles = sum(eraser.choices[0].values())
    pipe = eraser.finish()
    final = {"logits": eraser.adversaries[0].logits.detach()}
    final.update({n: p.detach() for n, p in pipe.unet.named_parameters() if n in initial})
    return {"steps": eraser.steps_done, "cycles_per_process": cycles}, initial, final


def _compare_erasure(two, one) -> None:
    """The 2 processes draw the 1-process run's cycles (3 steps x 2 cycles of the global batch):
    same UNet update (DDP mean = accumulated mean), same adversary step (logit gradients reduced
    over processes = averaged over micro-cycles)."""
    assert [r.values["cycles_per_process"] for r in two] == [3, 3]
    assert one.values["cycles_per_process"] == 6
    finals = [name for name in one.tensors if name.startswith("final/")]
    assert "final/logits" in finals and len(finals) > 1
    for name in finals:
        torch.testing.assert_close(two[0].tensors[name], one.tensors[name], rtol=1e-4, atol=1e-6)


ERASURE = Case(
    id="erasure",
    save=_erasure_save,
    reload=_erasure_reload,
    card=CardSpec(
        "eap-concept-erasure",
        "Erasing Undesirable Concepts in Diffusion Models with Adversarial Preservation",
        "2410.15618",
        "diffusers",
        ErasureConfig,
        ERASURE_CARD,
    ),
    bad_configs=bad_values(
        ErasureConfig,
        {},
        [
            ("parameter_group", "attention"),
            ("loss_space", "v"),
            ("mixed_precision", "fp8"),
            ("learning_rate", 0.0),
            ("learning_rate", float("nan")),
            ("preservation_weight", -1.0),
            ("gumbel_temperature", 0.0),
            ("ddim_steps", 0),
            ("pgd_num_steps", 0),
            ("num_centers", 2000),
            ("candidate_template", "a photo"),
            ("candidates", []),
            ("adversary_reference", "stopgrad"),
        ],
    ),
    ranks=Ranks(_erasure_ranks, has_control=True, compare=_compare_erasure),
    not_applicable={
        "baseline": "no stock diffusers step to equal: ESD, the baseline, is the same loop at "
        "preservation_weight 0 without the adversary (a batch of one prompt instead of two, so "
        "not bit-equal to EAP at weight 0); its parts are checked against diffusers in "
        "tests/test_erasure.py (latents = the pipeline's own, negative-guidance target, x0 loss)",
    },
)

# ------------------------------------------------------------------------------- S2N scheduler

_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
_BIMODAL = GaussianMixture(weights=[0.3, 0.7], means=[[-1.0], [1.0]], stds=[0.25, 0.25])


def _exact_denoiser(scheduler, prediction_type: str):
    """The exact network of a 1-d Gaussian mixture (its posterior mean), element-wise, as a
    diffusers model output of ``prediction_type``."""
    bars = scheduler.alphas_cumprod.to(torch.float64)

    def model(z, t):
        bar = bars[int(t)]
        alpha, sigma = bar.sqrt(), (1 - bar).sqrt()
        x0 = _BIMODAL.posterior_mean(z.reshape(-1, 1), alpha, sigma).reshape(z.shape).to(z.dtype)
        eps = (z - alpha * x0) / sigma
        if prediction_type == "epsilon":
            return eps.to(z.dtype)
        if prediction_type == "sample":
            return x0
        return (alpha * eps - sigma * x0).to(z.dtype)

    return model


def _noise() -> torch.Tensor:
    return torch.randn((4, 3, 6, 6), generator=torch.Generator().manual_seed(0))


def _s2n_baseline(tmp_path: Path) -> Baseline:
    """ρ = 0 is diffusers' ``DDIMScheduler`` at η = 0, bit for bit: every prediction type and
    timestep spacing, 7 steps (off DDIM's t − T//n grid for linspace / trailing) and 50.
    Control: ρ = 1 (stochastic) against the same DDIM runs."""
    del tmp_path
    result = Baseline({}, {}, {})
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        for spacing in ("leading", "trailing", "linspace"):
            config = {
                **_SD_BETAS,
                "prediction_type": prediction_type,
                "timestep_spacing": spacing,
                "clip_sample": False,
            }
            ddim = DDIMScheduler(**config)
            model = _exact_denoiser(ddim, prediction_type)
            for steps in (7, 50):
                key = f"{prediction_type}/{spacing}/{steps}"
                result.stock[key] = run_denoising_loop(ddim, model, _noise(), steps)
                for name, rho in (("method", 0.0), ("control", 1.0)):
                    s2n = S2NGeneralizedScheduler(**config, rho=rho)
                    generator = torch.Generator().manual_seed(1)
                    out = run_denoising_loop(s2n, model, _noise(), steps, generator=generator)
                    getattr(result, name)[key] = out
    return result


def _s2n_images(pipe):
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        _CONCEPT,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    scheduler = pipe.scheduler
    return {
        "images": torch.from_numpy(np.ascontiguousarray(images)),
        "is_s2n": torch.tensor(type(scheduler) is S2NGeneralizedScheduler),
        "rho": torch.tensor(float(scheduler.config.rho)),
        "s_noise": torch.tensor(float(scheduler.config.s_noise)),
    }


def _s2n_save(directory: Path) -> Saved:
    pipe = tiny_stable_diffusion_pipeline()
    pipe.scheduler = S2NGeneralizedScheduler.from_config(
        pipe.scheduler.config, rho=0.7, s_noise=0.9
    )
    pipe.save_pretrained(directory)
    return Saved(_s2n_images(pipe))


def _s2n_reload(directory: Path):
    return _s2n_images(DiffusionPipeline.from_pretrained(directory))


S2N = Case(
    id="s2n-scheduler",
    baseline=_s2n_baseline,
    save=_s2n_save,
    reload=_s2n_reload,
    bad_configs=(
        *bad_values(
            S2NGeneralizedScheduler,
            {},
            [
                ("rho", -0.1),
                ("rho", float("nan")),
                ("s_noise", -1.0),
                ("solver_order", 3),
                ("prediction_type", "flow_prediction"),
                ("timestep_spacing", "karras"),
                ("prev_timestep_rule", "previous"),
                ("beta_schedule", "cubic"),
            ],
        ),
        bad("rho_t_max", lambda: S2NGeneralizedScheduler(rho_t_min=500, rho_t_max=100), 100),
    ),
    field_message="^(`{field}`|{field}=)",
    not_applicable={
        "card": "a scheduler is saved as scheduler_config.json (class, rho, every setting; "
        "checked by the reload case); the pipeline card is written by recipes/s2n",
        "two_processes": "sampling only: no parameters are trained, so there is nothing for "
        "processes to all-reduce",
    },
)

# --------------------------------------------------------------------------------- MetaAug PTQ


def _calibration_images(rows: int = 16) -> torch.Tensor:
    return torch.rand(rows, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _quantize(model, config: MetaAugConfig, directory=None, accelerator=None):
    quantizer = MetaAugQuantizer.from_pretrained(model)
    quantized = quantizer.quantize(
        directory,
        calibration_dataset=_calibration_images(),
        quantization_config=config,
        accelerator=accelerator,
        progress=False,
    )
    return quantizer, quantized


_PTQ = dict(weight_bits=2, activation_bits=4, iterations=3, batch_size=8)


def _metaaug_baseline(tmp_path: Path) -> Baseline:
    """``meta_iterations=0`` is QDrop, the method MetaAug extends (Optimum has no
    reconstruction PTQ to compare with), bit for bit: weights, scales and outputs of a small
    ResNet. Control: two meta iterations (the transformation network T trained per block)."""
    del tmp_path
    result = {}
    for name, method, meta in (
        ("stock", "qdrop", 0),
        ("method", "metaaug", 0),
        ("control", "metaaug", 2),
    ):
        torch.manual_seed(0)
        config = MetaAugConfig(method=method, meta_iterations=meta, **_PTQ)
        _, quantized = _quantize(DigitsResNet(width=4).eval(), config)
        tensors = {k: v for k, v in quantized.state_dict().items() if v.is_floating_point()}
        with torch.no_grad():
            tensors["logits"] = quantized(probe_pixels())
        result[name] = tensors
    return Baseline(result["method"], result["stock"], result["control"])


def _metaaug_outputs(model):
    with torch.no_grad():
        logits = model.eval()(pixel_values=probe_pixels()).logits
    method = model.config.quantization_config.method
    return {"logits": logits, "is_metaaug": torch.tensor(method == "metaaug")}


def _metaaug_save(directory: Path) -> Saved:
    model = vit(attn_implementation="sdpa", seed=0)
    config = MetaAugConfig(
        method="metaaug",
        weight_bits=4,
        activation_bits=4,
        iterations=4,
        meta_iterations=2,
        batch_size=8,
    )
    data = Dataset.from_dict({"pixel_values": _calibration_images(32).numpy(), "labels": [0] * 32})
    quantizer = MetaAugQuantizer.from_pretrained(model)
    quantized = quantizer.quantize(
        directory, calibration_dataset=data, quantization_config=config, progress=False
    )
    return Saved(_metaaug_outputs(quantized))


def _metaaug_reload(directory: Path):
    import hf_extensions  # noqa: F401  (the top-level import registers the quantizer)

    return _metaaug_outputs(AutoModelForImageClassification.from_pretrained(directory))


def _metaaug_ranks(output_dir: str, variant: str):
    """BRECQ on a global batch of 16: each of 2 ranks reconstructs on its half."""
    del output_dir
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = DigitsResNet(width=4).eval()
    initial = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    config = MetaAugConfig(
        method="brecq",
        weight_bits=2,
        activation_bits=4,
        iterations=8,
        batch_size=16,
        meta_iterations=2,
    )
    images = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    quantizer = MetaAugQuantizer.from_pretrained(model)
    accelerator = Accelerator()
    quantized = quantizer.quantize(
        None,
        calibration_dataset=images,
        quantization_config=config,
        accelerator=accelerator,
        progress=False,
    )
    final = {k: v for k, v in quantized.state_dict().items() if v.is_floating_point()}
    values = {
        "steps": config.iterations,
        "local_batch_size": quantizer.result.losses["layer1"]["local_batch_size"],
    }
    return values, initial, final


def _compare_reconstructions(two, one) -> None:
    """Each rank reconstructs on half of every global batch of 16; LSQ activation scales agree
    to float rounding, and hard AdaRound weights agree except where a float sum in another
    order flips a weight whose h(V) sits at 0.5 (nearly all agree exactly)."""
    assert [r.values["local_batch_size"] for r in two] == [8, 8]
    assert one.values["local_batch_size"] == 16
    for name, value in one.tensors.items():
        if not name.startswith("final/"):
            continue
        got = two[0].tensors[name]
        if name.endswith("act_scale"):
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-7)
        elif name.endswith("weight") and value.dim() > 1:
            same = (got == value).float().mean().item()
            assert same > 0.98, (name, same)


METAAUG = Case(
    id="metaaug",
    baseline=_metaaug_baseline,
    save=_metaaug_save,
    reload=_metaaug_reload,
    bad_configs=bad_values(
        MetaAugConfig,
        {},
        [
            ("method", "gptq"),
            ("weight_bits", 1),
            ("weight_bits", 9),
            ("weight_bits", True),
            ("activation_bits", 16),
            ("first_last_8bit", "yes"),
            ("modules_to_not_convert", "classifier"),
            ("quant_method", "bitsandbytes"),
            ("iterations", 0),
            ("batch_size", True),
            ("drop_prob", 1.5),
            ("warmup", -0.1),
            ("meta_iterations", -1),
            ("temperature", 0),
            ("inner_lr", -1.0),
            ("inner_lr", float("inf")),
            ("weight_lr", float("nan")),
            ("block_names", "layer1"),
            ("quantize_first_layer_input", 1),
        ],
    ),
    field_message="^{field}=",
    ranks=Ranks(_metaaug_ranks, compare=_compare_reconstructions),
    not_applicable={
        "card": "MetaAugQuantizer.quantize records the method and every setting in config.json's "
        "quantization_config (checked by the reload case: is_metaaug); the README card is written "
        "by recipes/quantization only",
    },
)

OTHER_CASES = (SHARED_PREFIX, PROMPT_POOL, ERASURE, S2N, METAAUG)
