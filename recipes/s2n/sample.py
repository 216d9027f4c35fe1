"""S2N recipe: swap ``S2NGeneralizedScheduler`` into a Stable Diffusion pipeline and sweep ρ × steps.

Doan et al., "Connective Viewpoints of Signal-to-Noise Diffusion Models" (arXiv 2408.04221):
one knob ρ moves the sampler from the probability-flow ODE (ρ = 0, DDIM) to the reverse SDE
(ρ = 1, DDIM eta 1) and beyond. The recipe loads a pipeline (a Hub id, a local folder, or the
tiny offline pipeline when ``model_name_or_path`` is empty), and for every number of steps
renders the same prompt and seed with DDIM (eta 0 and eta 1, the references) and with the S2N
scheduler at each ρ. It records, per setting, the mean |image − DDIM image| and the seconds
per image, checks that ρ = 0 reproduces DDIM and ρ = 1 reproduces DDIM eta 1 (first-order
update), saves the images, and optionally saves / pushes the pipeline with the S2N scheduler
and a model card (``save_pipeline`` / ``push_to_hub``).

Settings:

- ``tiny.yaml``: the embedded default (a tiny Stable Diffusion built from configs, offline,
  seconds on a CPU; its images are noise from random weights, its checks are real);
- ``sd15.yaml``: Stable Diffusion 1.5 from the Hub on a GPU.

Sampling is one process (under a multi-process launch the main process samples, saves and
pushes; the others wait); run it directly or through Accelerate::

    python recipes/s2n/sample.py --config recipes/s2n/tiny.yaml
    accelerate launch --num_processes 1 recipes/s2n/sample.py --config recipes/s2n/sd15.yaml
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_extensions.atomic import atomic_write_text
from hf_extensions.cli import (
    Artifact,
    RecipeArgumentParser,
    process_state,
    push_folder,
    run_as_script,
    run_demo,
)
from hf_extensions.demo import Comparison
from hf_extensions.hub import Usage, build_model_card, save_model_card
from hf_extensions.schedulers import GaussianMixture, S2NGeneralizedScheduler, run_denoising_loop
from hf_extensions.validation import check_choice, check_integer, check_positive, refuse
from hf_extensions.zoo import fixture_path
from hf_extensions.zoo.building import read_quality
from hf_extensions.zoo.scoring import recognition_rate

RECIPE_DIR = Path(__file__).resolve().parent
METHOD = "s2n-scheduler"
PAPER = "Connective Viewpoints of Signal-to-Noise Diffusion Models"
ARXIV_ID = "2408.04221"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class S2NSampleArguments:
    """Which pipeline, which prompt, which grid of ρ and steps, what to save."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of a Stable Diffusion pipeline (e.g. "
            "stable-diffusion-v1-5/stable-diffusion-v1-5). Empty: the tiny offline pipeline."
        },
    )
    prompt: str = field(
        default="a watercolor painting of a lighthouse at dawn",
        metadata={"help": "Text prompt of every image."},
    )
    rhos: list[float] = field(
        default_factory=lambda: [0.0, 0.5, 1.0],
        metadata={"help": "Values of the S2N stochasticity rho to sweep (0 = DDIM)."},
    )
    num_inference_steps: list[int] = field(
        default_factory=lambda: [10, 25],
        metadata={"help": "Numbers of sampling steps to sweep."},
    )
    s_noise: float = field(default=1.0, metadata={"help": "Scale of the injected noise."})
    solver_order: int = field(
        default=1, metadata={"help": "1: the first-order S2N update; 2: the 2M variant."}
    )
    guidance_scale: float = field(default=7.5, metadata={"help": "Classifier-free guidance."})
    height: int | None = field(default=None, metadata={"help": "Image height (default: model)."})
    width: int | None = field(default=None, metadata={"help": "Image width (default: model)."})
    tiny_image_size: int = field(
        default=16, metadata={"help": "Image side of the tiny offline pipeline."}
    )
    num_images: int = field(default=1, metadata={"help": "Images per setting (one batch)."})
    seed: int = field(default=0, metadata={"help": "Seed of every setting's generator."})
    device: str | None = field(
        default=None, metadata={"help": "cpu / cuda / cuda:1 ... (default: cuda if available)."}
    )
    torch_dtype: str = field(
        default="float32", metadata={"help": f"Pipeline dtype, one of {sorted(DTYPES)}."}
    )
    output_dir: str = field(default="outputs/s2n", metadata={"help": "Where results go."})
    save_images: bool = field(default=True, metadata={"help": "Write the images as PNG."})
    save_pipeline: bool = field(
        default=False,
        metadata={"help": "Save the pipeline with the S2N scheduler (rho = pipeline_rho)."},
    )
    pipeline_rho: float = field(
        default=1.0, metadata={"help": "rho of the scheduler saved with the pipeline."}
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the saved pipeline to hub_model_id."}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository to push to."})
    disable_tqdm: bool = field(
        default=False, metadata={"help": "Hide the progress bar over the sweep's images."}
    )
    scorer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "An image classifier whose class names start with a word of the prompt (the "
            "zoo's digit_scorer): also measure, per setting, the share of samples of "
            "`score_prompts` it recognises."
        },
    )
    score_prompts: list[str] = field(
        default_factory=list, metadata={"help": "Prompts scored by the scorer (with a scorer)."}
    )
    scorer_samples: int = field(default=20, metadata={"help": "Scored samples per prompt."})

    def __post_init__(self):
        if not self.rhos or any(not (math.isfinite(r) and r >= 0) for r in self.rhos):
            refuse("rhos", "a non-empty list of finite numbers >= 0", self.rhos)
        if not self.num_inference_steps or any(n < 1 for n in self.num_inference_steps):
            refuse(
                "num_inference_steps", "a non-empty list of integers >= 1", self.num_inference_steps
            )
        check_choice("solver_order", self.solver_order, (1, 2))
        check_positive("s_noise", self.s_noise, allow_zero=True)
        check_positive("pipeline_rho", self.pipeline_rho, allow_zero=True)
        check_choice("torch_dtype", self.torch_dtype, sorted(DTYPES))
        check_integer("num_images", self.num_images, low=1)
        check_integer("scorer_samples", self.scorer_samples, low=1)
        if self.scorer_name_or_path is not None and not self.score_prompts:
            refuse("score_prompts", "a non-empty list of prompts with a scorer", self.score_prompts)
        if self.push_to_hub and not (self.save_pipeline and self.hub_model_id):
            refuse(
                "push_to_hub",
                "False unless `save_pipeline` is set and a `hub_model_id` is given",
                self.push_to_hub,
            )


def load_pipeline(args: S2NSampleArguments):
    """The pipeline to sample: from the Hub / a folder, or the tiny offline one."""
    from diffusers import DiffusionPipeline

    if args.model_name_or_path is None:
        from hf_extensions.models import tiny_stable_diffusion_pipeline

        pipe = tiny_stable_diffusion_pipeline(image_size=args.tiny_image_size)
    else:
        pipe = DiffusionPipeline.from_pretrained(
            args.model_name_or_path, torch_dtype=DTYPES[args.torch_dtype]
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, args: S2NSampleArguments, steps: int, **kwargs) -> tuple[np.ndarray, float]:
    """Images (N, H, W, 3) in [0, 1] for one setting, and the seconds per image."""
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    start = time.perf_counter()
    images = pipe(
        args.prompt,
        num_inference_steps=steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        generator=generator,
        output_type="np",
        **kwargs,
    ).images
    return np.asarray(images, dtype=np.float64), (time.perf_counter() - start) / args.num_images


def _scorer(args: S2NSampleArguments, pipe):
    if args.scorer_name_or_path is None:
        return None
    from transformers import AutoModelForImageClassification

    classifier = AutoModelForImageClassification.from_pretrained(args.scorer_name_or_path)
    return classifier.to(pipe.device).eval()


def _recognition(pipe, classifier, args: S2NSampleArguments, steps: int) -> float:
    """Share of the samples of ``score_prompts`` the scorer recognises (same seeds for every
    scheduler, so settings differ only by the sampler)."""
    return recognition_rate(
        pipe,
        classifier,
        args.score_prompts,
        samples_per_prompt=args.scorer_samples,
        num_inference_steps=steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
    )


def sweep(pipe, args: S2NSampleArguments) -> dict[str, Any]:
    """Render DDIM eta 0 / eta 1 and S2N at every ρ for every number of steps."""
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(args.num_inference_steps) * (2 + len(args.rhos)),
        desc="S2N sweep (settings)",
        disable=args.disable_tqdm,
    )

    original = pipe.scheduler
    base_config = dict(original.config)
    output_dir = Path(args.output_dir)
    results: dict[str, Any] = {"settings": [], "base_scheduler": type(original).__name__}
    rho0_vs_ddim, rho1_vs_ddim_eta1 = [], []
    classifier = _scorer(args, pipe)
    for steps in args.num_inference_steps:
        pipe.scheduler = DDIMScheduler.from_config(base_config)
        if classifier is not None:
            results[f"recognition_ddim_steps{steps}"] = _recognition(pipe, classifier, args, steps)
        ddim, ddim_seconds = render(pipe, args, steps)
        ddim_eta1, _ = render(pipe, args, steps, eta=1.0)
        bar.update(2)
        _save(pipe, ddim, output_dir, f"steps{steps}_ddim", args)
        for rho in args.rhos:
            pipe.scheduler = S2NGeneralizedScheduler.from_config(
                base_config, rho=rho, s_noise=args.s_noise, solver_order=args.solver_order
            )
            images, seconds = render(pipe, args, steps)
            if classifier is not None:
                key = f"recognition_rho{rho:g}_steps{steps}"
                results[key] = _recognition(pipe, classifier, args, steps)
            bar.update(1)
            _save(pipe, images, output_dir, f"steps{steps}_rho{rho:g}", args)
            setting = {
                "steps": steps,
                "rho": rho,
                "mean_abs_diff_vs_ddim": float(np.abs(images - ddim).mean()),
                "seconds_per_image": seconds,
                "ddim_seconds_per_image": ddim_seconds,
            }
            if args.solver_order == 1 and args.s_noise == 1.0:
                if rho == 0:
                    rho0_vs_ddim.append(float(np.abs(images - ddim).max()))
                elif rho == 1:
                    rho1_vs_ddim_eta1.append(float(np.abs(images - ddim_eta1).max()))
            results["settings"].append(setting)
    bar.close()
    if rho0_vs_ddim:
        results["max_abs_diff_rho0_vs_ddim"] = max(rho0_vs_ddim)
    if rho1_vs_ddim_eta1:
        results["max_abs_diff_rho1_vs_ddim_eta1"] = max(rho1_vs_ddim_eta1)
    pipe.scheduler = original
    return results


def _save(pipe, images: np.ndarray, output_dir: Path, name: str, args) -> None:
    if not args.save_images:
        return
    folder = output_dir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(pipe.numpy_to_pil(images.astype(np.float32))):
        image.save(folder / f"{name}_{i}.png")


def pipeline_usage(artifact: str) -> Usage:
    """Load the saved pipeline (its scheduler is the S2N one) and sample an image."""
    return Usage(
        imports=(
            "from diffusers import DiffusionPipeline",
            "import hf_extensions.schedulers  # noqa: F401  (the S2N scheduler class)",
        ),
        load=(f'pipe = DiffusionPipeline.from_pretrained("{artifact}")',),
        run=(
            'image = pipe("a lighthouse at dawn", num_inference_steps=4).images[0]',
            "print(type(pipe.scheduler).__name__, pipe.scheduler.config.rho, image.size)",
        ),
    )


def save_and_check_pipeline(pipe, args: S2NSampleArguments, results: dict[str, Any]) -> Path:
    """Save the pipeline with the S2N scheduler and a model card; reload it to check."""
    from diffusers import DiffusionPipeline

    original = pipe.scheduler
    pipe.scheduler = S2NGeneralizedScheduler.from_config(
        original.config, rho=args.pipeline_rho, s_noise=args.s_noise, solver_order=args.solver_order
    )
    folder = Path(args.output_dir) / "pipeline"
    pipe.save_pretrained(folder)
    metrics = {
        key: value
        for key, value in results.items()
        if isinstance(value, float) and key.startswith("max_abs_diff")
    }
    card = build_model_card(
        method=METHOD,
        paper=PAPER,
        arxiv_id=ARXIV_ID,
        hyperparameters={
            "rho": args.pipeline_rho,
            "s_noise": args.s_noise,
            "solver_order": args.solver_order,
            "base_scheduler": type(original).__name__,
        },
        metrics=metrics,
        base_model=args.model_name_or_path,
        library_name="diffusers",
        tags=["text-to-image", "stable-diffusion", "scheduler"],
        usage=pipeline_usage(args.hub_model_id if args.push_to_hub else str(folder)),
        extra_text=(
            "The scheduler is `hf_extensions.schedulers.S2NGeneralizedScheduler`: install "
            "`hf-extensions` to load the pipeline."
        ),
    )
    save_model_card(card, folder)
    reloaded = DiffusionPipeline.from_pretrained(folder)
    results["reload_keeps_class_and_rho"] = float(
        type(reloaded.scheduler) is S2NGeneralizedScheduler
        and reloaded.scheduler.config.rho == args.pipeline_rho
    )
    pipe.scheduler = original
    return folder


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep; write ``sweep.json`` (and images, pipeline, card) to ``output_dir``.

    Sampling is one process: under a multi-process launch the main process samples, saves and
    pushes, and the others wait for it (they return an empty dict).
    """
    (args,) = RecipeArgumentParser((S2NSampleArguments,)).parse(argv)
    state = process_state()
    results: dict[str, Any] = {}
    if state.is_main_process:
        pipe = load_pipeline(args)
        results = sweep(pipe, args)
        if args.save_pipeline:
            save_and_check_pipeline(pipe, args, results)
        results["arguments"] = asdict(args)
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "sweep.json", json.dumps(results, indent=2) + "\n")
    state.wait_for_everyone()
    if args.push_to_hub:
        message = f"Pipeline with the S2N scheduler (rho={args.pipeline_rho:g})"
        push_folder(Path(args.output_dir) / "pipeline", args.hub_model_id, message)
    return results


def toy_mixture_w1(steps: int = 50, eps_scale: float = 1.1, seed: int = 0) -> dict[str, float]:
    """W1 of DDIM and ρ = 1 on a 1-D Gaussian mixture with the exact (scaled) ε-network.

    The setting of ``benchmarks/s2n.py`` in miniature (one seed, 5000 samples): with
    ``eps_scale`` = 1.1 the network over-predicts the noise by 10 %, and the stochastic
    sampler forgets that error where DDIM accumulates it.
    """
    from diffusers import DDIMScheduler
    from scipy.stats import wasserstein_distance

    data = GaussianMixture(weights=[0.3, 0.7], means=[[-1.0], [1.0]], stds=[0.25, 0.25])
    reference = data.sample(50_000, generator=torch.Generator().manual_seed(seed + 1))
    config = {"clip_sample": False, "timestep_spacing": "trailing"}
    out = {}
    for name, scheduler in {
        "ddim": DDIMScheduler(**config),
        "rho1": S2NGeneralizedScheduler(**config, rho=1.0),
    }.items():
        bars = scheduler.alphas_cumprod.double()

        def model(z, t, bars=bars):
            alpha, sigma = bars[int(t)].sqrt(), (1 - bars[int(t)]).sqrt()
            return eps_scale * (z - alpha * data.posterior_mean(z, alpha, sigma)) / sigma

        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(5000, 1, generator=generator, dtype=torch.float64)
        samples = run_denoising_loop(scheduler, model, noise, steps, generator=generator)
        out[name] = float(wasserstein_distance(samples[:, 0].numpy(), reference[:, 0].numpy()))
    return out


#: The swap's exactness against DDIM at both ends of rho, and the reload's.
SUMMARY = {
    "tiny SD: max |rho=0 - DDIM|": "max_abs_diff_rho0_vs_ddim",
    "tiny SD: max |rho=1 - DDIM eta=1|": "max_abs_diff_rho1_vs_ddim_eta1",
    "tiny SD: reload keeps class and rho": "reload_keeps_class_and_rho",
}


def demo() -> Comparison:
    """The zoo's text-to-image model sampled with DDIM and with the S2N scheduler at each rho of
    ``zoo_text_to_image.yaml`` and each number of steps: the share of samples whose prompted
    digit the zoo's scorer recognises (same prompts and seeds); plus the toy mixture's W1."""
    flags = [
        "--model_name_or_path", str(fixture_path("text_to_image")),
        "--scorer_name_or_path", str(fixture_path("digit_scorer")),
    ]  # fmt: skip
    results = run_demo(main, RECIPE_DIR / "zoo_text_to_image.yaml", lambda r: r, *flags)
    metrics = {}
    arguments = results["arguments"]
    # the most steps and the largest rho first (the figure's headline); rho 0 (= DDIM) last
    for rho in sorted(arguments["rhos"], key=lambda r: (r == 0, -r)):
        for steps in sorted(arguments["num_inference_steps"], reverse=True):
            ddim = results[f"recognition_ddim_steps{steps}"]
            label = f"digit recognised, rho {rho:g}, {steps} steps"
            metrics[label] = (ddim, results[f"recognition_rho{rho:g}_steps{steps}"])
    toy = toy_mixture_w1()
    metrics["mixture W1, eps x1.1, 50 steps"] = (toy["ddim"], toy["rho1"])
    return Comparison(
        baseline="DDIM (eta 0)",
        metrics=metrics,
        lower_is_better={"mixture W1, eps x1.1, 50 steps"},
        fixture="text_to_image",
        fixture_quality=read_quality(fixture_path("text_to_image"))["quality"],
    )


def artifact(results: dict[str, Any]) -> list[Artifact]:
    """The saved pipeline (with ``save_pipeline``) and the line that loads it."""
    args = results["arguments"]
    if not args["save_pipeline"]:
        return []
    folder = str(Path(args["output_dir"]) / "pipeline")
    hub_id = args["hub_model_id"] if args["push_to_hub"] else None
    return [Artifact(folder, pipeline_usage(folder), hub_id)]


if __name__ == "__main__":
    run_as_script(main, SUMMARY, artifacts=artifact)
