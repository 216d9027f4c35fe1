"""Zoo fixture ``text_to_image``: a tiny Stable Diffusion trained on captioned hard digits.

A folder that the stock ``diffusers.StableDiffusionPipeline.from_pretrained`` loads, in which the
prompt really controls the digit and the ink ("a handwritten seven in red ink on a plain dark
background"), so that concept erasure (:mod:`hf_extensions.pipelines.erasure`) and samplers have
something real to act on. Built in three stages, Stable Diffusion's recipe at toy scale:

1. an ``AutoencoderKL`` (32x32 RGB <-> 8x8x4 latents) trained as a VAE with a small KL weight
   and an ink-weighted MSE (pixels far from the image's median colour count up to ~9x: with a
   plain MSE the decoder learns the strokes' brightness long before the inks' hues);
   its ``scaling_factor`` is 1 / std of the training latents, as in SD;
2. the ``CLIPTextModel`` over the byte-level ``CLIPTokenizer``, pretrained to read the digit, ink
   and style of a caption off its end-of-text states, then frozen: a frozen encoder lets every
   caption's states be computed once (a few hundred distinct captions), which is most of the
   UNet step's cost saved, and the UNet starts from text states in which the concepts are
   already separated (joint training from scratch spends its first steps finding them);
3. the ``UNet2DConditionModel`` (cross-attention on the text states) trained for epsilon
   prediction on SD's noise schedule, with 10% of captions dropped to ``""`` so that
   classifier-free guidance works; the pipeline gets the exponential moving average of the
   UNet's weights.

The quality is measured with the pipeline's own ``__call__`` (25 DDIM steps, a fixed generator)
on 200 prompts cycling over digits x inks, scored by the ``digit_scorer`` fixture; the guidance
scale is picked among :data:`GUIDANCE_SCALES` on samples from another generator seed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hf_extensions.data.hard_digits import (
    CAPTION_TEMPLATES,
    DIGIT_WORDS,
    IMAGE_SIZE,
    STYLES,
    caption,
    render_hard_digits,
)
from hf_extensions.seeding import keyed_generator
from hf_extensions.zoo import building, scorer, zoo_root

__all__ = ["DEFAULT_STEPS", "DESCRIPTION", "build", "evaluate", "prompts"]

DESCRIPTION = "tiny Stable Diffusion (VAE 8x8x4, CLIP text, UNet) whose prompt sets digit and ink"
DEFAULT_STEPS = 2400  # UNet steps; the VAE trains VAE_STEPS_PER_UNET_STEP times as many
COLOUR_NAMES = scorer.COLOUR_NAMES
STYLE_NAMES = scorer.STYLE_NAMES
TRAIN_IMAGES = 8000  # per source split (pretrain, train)
VAE_STEPS_PER_UNET_STEP = 1 / 6
VAE_BATCH_SIZE = 32
KL_WEIGHT = 1e-6
INK_WEIGHT = 8.0
TEXT_STEPS = 200
UNET_BATCH_SIZE = 64
EMA_DECAY = 0.995
CAPTION_DROPOUT = 0.1
SHORT_CAPTIONS = 0.2  # share of captions in a short form ("a red seven", "the digit seven")
TEXT_WIDTH = 64
# evaluation
NUM_SAMPLES = 200
NUM_INFERENCE_STEPS = 25
GUIDANCE_SCALES = (3.0, 5.0, 7.5)  # candidates; the build picks one on SELECTION_SEED samples
SELECTION_SEED = 1
EVAL_SEED = 0
EVAL_TEMPLATE = 0
_SHORT_FORMS = ("a {digit}", "the digit {digit}", "a {colour} {digit}", "a {digit} in {colour} ink")


def prompts(num_samples: int = NUM_SAMPLES) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The evaluation prompts with their digits and inks: sample ``i`` asks for digit
    ``i % 10`` in ink ``(i // 10) % 4`` in style ``(i // 40) % 2`` (template 0)."""
    index = torch.arange(num_samples)
    digits = index % 10
    colours = (index // 10) % len(COLOUR_NAMES)
    styles = (index // (10 * len(COLOUR_NAMES))) % len(STYLE_NAMES)
    texts = [
        caption(int(d), COLOUR_NAMES[int(c)], STYLE_NAMES[int(s)], EVAL_TEMPLATE)
        for d, c, s in zip(digits, colours, styles)
    ]
    return texts, digits, colours


def _short_caption(form: int, digit: int, colour: int) -> str:
    return _SHORT_FORMS[form].format(digit=DIGIT_WORDS[digit], colour=COLOUR_NAMES[colour])


def _models(seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from hf_extensions.models.tiny import byte_level_clip_text_config

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(byte_level_clip_text_config(TEXT_WIDTH, 2, 77))
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=2,
    )
    return vae, text_encoder, unet


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _train_vae(vae, images, steps, seed, progress) -> building.TrainingCurve:
    def step_loss(step: int) -> torch.Tensor:
        rows = building.keyed_batches(images.shape[0], VAE_BATCH_SIZE, step, seed)
        x = images[rows] * 2 - 1
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=keyed_generator(seed, step, 2))
        z = posterior.mean + posterior.std * noise
        reconstruction = vae.decode(z).sample
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
        # the ink covers few pixels: weight each pixel by its distance from the image's median
        # colour, or the decoder learns the background and the strokes' brightness long before
        # the inks' hues
        background = x.flatten(2).median(dim=2).values[:, :, None, None]
        weight = 1.0 + INK_WEIGHT * (x - background).abs().mean(dim=1, keepdim=True)
        error = (weight * (reconstruction - x) ** 2).mean() / weight.mean()
        return error + KL_WEIGHT * kl

    vae.train()
    curve = building.train(
        list(vae.parameters()),
        step_loss,
        steps=steps,
        lr=2e-3,
        weight_decay=0.0,
        description="text_to_image: vae",
        progress=progress,
    )
    vae.eval().requires_grad_(False)
    return curve


@torch.no_grad()
def _posteriors(vae, images) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for rows in building.batches(images.shape[0], 500):
        posterior = vae.encode(images[rows] * 2 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def _tokens(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def _train_text(text_encoder, tokenizer, seed, progress) -> tuple[list[str], torch.Tensor]:
    """Pretrain the text encoder to read digit / ink / style off its end-of-text states, on
    every distinct caption; return the captions (index 0: ``""``) and their frozen states."""
    texts, labels = [""], [(-100, -100, -100)]
    for d in range(10):
        for c, colour in enumerate(COLOUR_NAMES):
            for s, style in enumerate(STYLE_NAMES):
                for t in range(len(CAPTION_TEMPLATES)):
                    texts.append(caption(d, colour, style, t))
                    labels.append((d, c, s))
            for f, form in enumerate(_SHORT_FORMS):
                text = _short_caption(f, d, c)
                if text not in texts:
                    texts.append(text)
                    labels.append((d, c if "{colour}" in form else -100, -100))
    tokens = _tokens(tokenizer, texts)
    targets = torch.tensor(labels)
    eos = (tokens == tokenizer.eos_token_id).int().argmax(-1)
    heads = torch.nn.Linear(TEXT_WIDTH, 10 + len(COLOUR_NAMES) + len(STYLE_NAMES))
    torch.nn.init.zeros_(heads.bias)
    sizes = (10, len(COLOUR_NAMES), len(STYLE_NAMES))

    def step_loss(step: int) -> torch.Tensor:
        rows = building.keyed_batches(len(texts), 64, step, seed)
        states = text_encoder(input_ids=tokens[rows]).last_hidden_state
        loss = torch.zeros(())
        # the first end-of-text state (the pooled output) and the last padding state
        for read in (states[torch.arange(len(rows)), eos[rows]], states[:, -1]):
            for logits, target in zip(heads(read).split(sizes, dim=-1), targets[rows].T):
                if (target >= 0).any():
                    loss = loss + F.cross_entropy(logits, target, ignore_index=-100)
        return loss

    text_encoder.train()
    building.train(
        [*text_encoder.parameters(), *heads.parameters()],
        step_loss,
        steps=TEXT_STEPS,
        lr=2e-3,
        description="text_to_image: text encoder",
        progress=progress,
    )
    text_encoder.eval().requires_grad_(False)
    with torch.no_grad():
        states = text_encoder(input_ids=tokens).last_hidden_state
    return texts, states


def _caption_table(texts: list[str], data) -> torch.Tensor:
    """Per image: the indices (into ``texts``) of its full caption and of its short forms."""
    where = {text: index for index, text in enumerate(texts)}
    rows = []
    for k in range(len(data)):
        d, c = int(data.digits[k]), int(data.colours[k])
        short = [where[_short_caption(f, d, c)] for f in range(len(_SHORT_FORMS))]
        rows.append([where[data.captions[k]], *short])
    return torch.tensor(rows)


def _train_unet(unet, latents, stds, table, states, steps, seed, progress):
    """Train ``unet``; return the training curve and the exponential moving average of its
    weights (decay :data:`EMA_DECAY`, warmed up), which samples better than the last weights."""
    alphas = _scheduler().alphas_cumprod
    forms = table.shape[1] - 1
    ema = copy.deepcopy(unet).eval().requires_grad_(False)

    def update_ema(step: int) -> None:
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, parameter in zip(ema.parameters(), unet.parameters()):
                average.lerp_(parameter, 1.0 - decay)

    def step_loss(step: int) -> torch.Tensor:
        if step > 0:
            update_ema(step - 1)  # the weights after step - 1's update
        rows = building.keyed_batches(latents.shape[0], UNET_BATCH_SIZE, step, seed)
        generator = keyed_generator(seed, step, 3)
        n = len(rows)
        z0 = latents[rows] + stds[rows] * torch.randn(latents[rows].shape, generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, len(alphas), (n,), generator=generator)
        a = alphas[t].view(n, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        u = torch.rand(n, generator=generator)
        form = torch.randint(forms, (n,), generator=generator)
        chosen = torch.where(
            u < CAPTION_DROPOUT + SHORT_CAPTIONS, table[rows, 1 + form], table[rows, 0]
        )
        chosen = torch.where(u < CAPTION_DROPOUT, torch.zeros_like(chosen), chosen)
        prediction = unet(zt, t, encoder_hidden_states=states[chosen]).sample
        return F.mse_loss(prediction, noise)

    unet.train()
    curve = building.train(
        list(unet.parameters()),
        step_loss,
        steps=steps,
        lr=1e-3,
        weight_decay=0.01,
        description="text_to_image: unet",
        progress=progress,
    )
    update_ema(steps - 1)
    return curve, ema


def _pipeline(vae, text_encoder, unet):
    from diffusers import StableDiffusionPipeline

    from hf_extensions.models.tiny import byte_level_clip_tokenizer

    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=byte_level_clip_tokenizer(model_max_length=77),
        unet=unet.eval(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, guidance_scale: float, seed: int = EVAL_SEED, num_samples: int = NUM_SAMPLES):
    """Samples ``[num_samples, 3, 32, 32]`` in [0, 1] of :func:`prompts` (the evaluation
    samples with the defaults), from ``torch.Generator().manual_seed(seed)``."""
    texts, _, _ = prompts(num_samples)
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        texts,
        num_inference_steps=NUM_INFERENCE_STEPS,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type="pt",
    ).images.float()


def _scores(images: torch.Tensor, scoring) -> dict[str, float]:
    _, digits, colours = prompts(images.shape[0])
    digit, colour = scorer.fine_to_labels(scorer.predict(scoring, images))
    return {
        "prompted_digit_accuracy": (digit == digits).float().mean().item(),
        "prompted_colour_accuracy": (colour == colours).float().mean().item(),
        "prompted_fine_accuracy": ((digit == digits) & (colour == colours)).float().mean().item(),
    }


def _scorer_folder(seed: int, progress: bool) -> Path:
    folder = zoo_root() / "digit_scorer"
    if not (folder / building.QUALITY_FILE).is_file():
        scorer.build(building.BuildOptions(output_dir=folder, seed=seed, progress=progress))
    return folder


def _grid(images: torch.Tensor) -> np.ndarray:
    """The first 40 samples (digits across, inks down, plain style) as one uint8 image."""
    rows = len(COLOUR_NAMES)
    tiles = images[: 10 * rows].reshape(rows, 10, 3, IMAGE_SIZE, IMAGE_SIZE)
    grid = tiles.permute(0, 3, 1, 4, 2).reshape(rows * IMAGE_SIZE, 10 * IMAGE_SIZE, 3)
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def build(options: building.BuildOptions) -> Path:
    """Train the VAE, the text encoder and the UNet (``options.steps`` UNet steps, default
    :data:`DEFAULT_STEPS`; the VAE trains ``VAE_STEPS_PER_UNET_STEP`` times as many), measure
    the pipeline with the ``digit_scorer`` fixture (built first when missing) and save it."""
    from PIL import Image

    timer = building.Timer()
    steps = options.steps or DEFAULT_STEPS
    vae_steps = max(1, round(VAE_STEPS_PER_UNET_STEP * steps))
    scoring = scorer.load(_scorer_folder(options.seed, options.progress))
    parts = [
        render_hard_digits(
            TRAIN_IMAGES, split=split, styles=STYLE_NAMES, colours=COLOUR_NAMES, seed=options.seed
        )
        for split in ("pretrain", "train")
    ]
    images = torch.cat([part.images for part in parts])
    vae, text_encoder, unet = _models(options.seed)
    vae_curve = _train_vae(vae, images, vae_steps, options.seed, options.progress)
    means, stds = _posteriors(vae, images)
    sampled = means + stds * torch.randn(means.shape, generator=keyed_generator(options.seed, 4))
    scaling_factor = float(1.0 / sampled.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    from hf_extensions.models.tiny import byte_level_clip_tokenizer

    tokenizer = byte_level_clip_tokenizer(model_max_length=77)
    texts, states = _train_text(text_encoder, tokenizer, options.seed, options.progress)
    table = torch.cat([_caption_table(texts, part) for part in parts])
    curve, unet = _train_unet(
        unet,
        means * scaling_factor,
        stds * scaling_factor,
        table,
        states,
        steps,
        options.seed,
        options.progress,
    )
    pipe = _pipeline(vae, text_encoder, unet)
    # the guidance scale is chosen on other samples (another generator seed) than the measured
    selection = {
        scale: _scores(generate(pipe, scale, SELECTION_SEED, 100), scoring)[
            "prompted_digit_accuracy"
        ]
        for scale in GUIDANCE_SCALES
    }
    guidance_scale = max(GUIDANCE_SCALES, key=lambda scale: (selection[scale], -scale))
    samples = generate(pipe, guidance_scale)
    quality = _scores(samples, scoring)
    with torch.no_grad():
        decoded = vae.decode(means[:2000]).sample.add(1).div(2).clamp(0, 1)
    reconstruction_mse = F.mse_loss(decoded, images[:2000]).item()

    def save(folder: Path) -> None:
        pipe.save_pretrained(folder)
        Image.fromarray(_grid(samples)).resize((640, 256), Image.NEAREST).save(
            folder / "samples.png", optimize=True
        )

    extra = {
        "styles": list(STYLE_NAMES),
        "colours": list(COLOUR_NAMES),
        "templates": list(CAPTION_TEMPLATES),
        "short_forms": list(_SHORT_FORMS),
        "evaluation_template": CAPTION_TEMPLATES[EVAL_TEMPLATE],
        "resolution": IMAGE_SIZE,
        "latent_shape": [4, IMAGE_SIZE // 4, IMAGE_SIZE // 4],
        "guidance_scale": guidance_scale,
        "guidance_selection": {str(k): v for k, v in selection.items()},
        "num_samples": NUM_SAMPLES,
        "num_inference_steps": NUM_INFERENCE_STEPS,
        "generator_seed": EVAL_SEED,
        "caption_dropout": CAPTION_DROPOUT,
        "unet_steps": steps,
        "vae_steps": vae_steps,
        "vae_final_loss": vae_curve.losses[-1],
        "vae_reconstruction_mse": reconstruction_mse,
        "scaling_factor": scaling_factor,
        "scorer": "zoo/digit_scorer",
    }
    sizes = {
        name: sum(p.numel() for p in model.parameters())
        for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
    }
    card = building.card_text(
        "text_to_image",
        "A tiny Stable Diffusion (`StableDiffusionPipeline`: `AutoencoderKL`, `CLIPTextModel` "
        "with a byte-level `CLIPTokenizer`, `UNet2DConditionModel`, `DDIMScheduler`, no safety "
        "checker) trained on captioned 32x32 hard digits, so that the prompt really sets the "
        "digit and the ink: the stand-in for SD v1.4 of concept erasure (EAP) and samplers.\n\n"
        "![samples](samples.png)\n\n`samples.png`: the first 40 evaluation samples (digits "
        f'zero..nine across, inks {", ".join(COLOUR_NAMES)} down; "{CAPTION_TEMPLATES[EVAL_TEMPLATE]}" '
        f"with the plain style), {NUM_INFERENCE_STEPS} steps, guidance {guidance_scale}.",
        data=(
            f"{2 * TRAIN_IMAGES} hard digits (`hf_extensions.data.hard_digits`) of the `pretrain` "
            f"and `train` sources, styles {', '.join(STYLE_NAMES)}, inks "
            f"{', '.join(COLOUR_NAMES)}, 32x32. Captions: the data's templates "
            f"({'; '.join(repr(t) for t in CAPTION_TEMPLATES)}) with style phrases "
            f"({'; '.join(repr(STYLES[s].phrase) for s in STYLE_NAMES)}); "
            f"{SHORT_CAPTIONS:.0%} of the time a short form "
            f"({'; '.join(repr(t) for t in _SHORT_FORMS)}) and {CAPTION_DROPOUT:.0%} of the time "
            '`""` (for classifier-free guidance).'
        ),
        model=(
            f"VAE {sizes['vae']:,} parameters (32x32x3 <-> 8x8x4, {vae_steps} steps of "
            f"{VAE_BATCH_SIZE}, ink-weighted MSE + {KL_WEIGHT} KL; reconstruction MSE "
            f"{reconstruction_mse:.4f} in [-1, 1] units; `scaling_factor` {scaling_factor:.4f} "
            f"= 1 / latent std); text encoder {sizes['text_encoder']:,} parameters (2 layers, "
            f"width {TEXT_WIDTH}; pretrained {TEXT_STEPS} steps to read digit, ink and style "
            f"off its end-of-text states, then frozen); UNet {sizes['unet']:,} parameters "
            f"(levels 32/64, cross-attention at 4x4 and in the middle; {steps} steps of "
            f"{UNET_BATCH_SIZE}, epsilon prediction, SD's scaled-linear betas). Quality: "
            f"{NUM_SAMPLES} samples of the pipeline's own `__call__` ({NUM_INFERENCE_STEPS} DDIM "
            f"steps, guidance {guidance_scale}, `torch.Generator().manual_seed({EVAL_SEED})`), "
            "prompts cycling over digits x inks (x styles), scored by `zoo/digit_scorer`."
        ),
        load=(
            "from diffusers import StableDiffusionPipeline\n"
            'pipe = StableDiffusionPipeline.from_pretrained("zoo/text_to_image")\n'
            'image = pipe("a handwritten seven in red ink on a plain dark background",\n'
            f"             num_inference_steps=25, guidance_scale={guidance_scale}).images[0]"
        ),
        quality=quality,
        curve=curve,
        seconds=timer.seconds(),
    )
    return building.save_fixture(
        options.output_dir, save, card=card, quality=quality, curve=curve, extra=extra
    )


def load(folder: str | Path):
    """The pipeline of a built folder, with the stock ``from_pretrained``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate(folder: str | Path) -> dict[str, float]:
    """Reload ``folder`` (and ``zoo/digit_scorer``) and re-measure its ``quality.json``."""
    from hf_extensions.zoo import fixture_path

    scoring = scorer.load(fixture_path("digit_scorer"))
    guidance_scale = building.read_quality(folder)["guidance_scale"]
    return _scores(generate(load(folder), guidance_scale), scoring)
