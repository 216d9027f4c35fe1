"""EAP recipe: erase concepts from a Stable Diffusion pipeline, measure, save, reload, push.

Bui et al., "Erasing Undesirable Concepts in Diffusion Models with Adversarial Preservation"
(NeurIPS 2024, arXiv 2410.15618). The recipe loads a pipeline (a Hub id, a local folder, or the
tiny offline pipeline when ``model_name_or_path`` is empty), erases ``concepts`` with
:func:`hf_extensions.pipelines.erase_concepts` (``method``: eap, esd or fixed; every
``ErasureConfig`` field is a flag), measures the erasure and the drift of preserved and
held-out prompts against the original UNet (:func:`hf_extensions.pipelines.evaluate_erasure`),
saves the pipeline (``save_mode: full``) or only the changed tensors (``save_mode: changed``)
with a model card, reloads it to check that it generates identically, and optionally pushes it.

Settings (the evaluation protocol of the paper's three tasks is in README.md):

- ``tiny.yaml``: the embedded default (tiny random SD built from configs, offline, CPU, seconds);
- ``sd14_objects.yaml``: Imagenette objects, cross-attention (``xattn``);
- ``sd14_nudity.yaml``: nudity, all but cross-attention (``noxattn``);
- ``sd14_artists.yaml``: five artists' styles (``xattn``).

Run directly, or through Accelerate (gradient accumulation, mixed precision, several GPUs)::

    python recipes/erasure/train.py --config recipes/erasure/tiny.yaml
    accelerate launch --mixed_precision bf16 recipes/erasure/train.py \\
        --config recipes/erasure/sd14_objects.yaml
"""

from __future__ import annotations

import copy
import json
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
    summarize,
)
from hf_extensions.demo import Comparison, run_comparison
from hf_extensions.hub import usage_for
from hf_extensions.pipelines import (
    ErasureConfig,
    erase_concepts,
    evaluate_erasure,
    load_erased,
    save_erased,
)
from hf_extensions.pipelines.erasure import METHOD
from hf_extensions.validation import check_choice, refuse
from hf_extensions.zoo import fixture_path
from hf_extensions.zoo.scoring import recognition_rate

RECIPE_DIR = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ErasureRecipeArguments:
    """Which pipeline, which concepts, how to measure, what to save."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or folder of a Stable Diffusion pipeline (CompVis/stable-diffusion-"
            "v1-4). Empty: the tiny offline pipeline."
        },
    )
    concepts: list[str] = field(
        default_factory=lambda: ["a red circle"], metadata={"help": "Concepts to erase."}
    )
    method: str = field(default="eap", metadata={"help": "eap, esd or fixed."})
    heldout_prompts: list[str] = field(
        default_factory=lambda: ["a dog", "a house", "a tree"],
        metadata={"help": "Prompts whose drift is measured (never trained on)."},
    )
    eval_samples: int = field(default=4, metadata={"help": "Evaluation draws per prompt."})
    eval_ddim_steps: int = field(default=10, metadata={"help": "DDIM grid of the evaluation."})
    evaluate: bool = field(
        default=True, metadata={"help": "Measure gap and drift (keeps a copy of the UNet)."}
    )
    scorer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "An image classifier whose class names start with the concept's word (the "
            "zoo's digit_scorer: 'seven red'): also measure how often samples of each concept "
            "and held-out prompt are recognised, before and after erasure."
        },
    )
    scorer_samples: int = field(
        default=20, metadata={"help": "Samples per prompt scored by the scorer."}
    )
    scorer_steps: int = field(default=25, metadata={"help": "Sampling steps of scored samples."})
    scorer_guidance: float = field(default=4.0, metadata={"help": "Guidance of scored samples."})
    tiny_image_size: int = field(default=16, metadata={"help": "Image side of the tiny pipeline."})
    device: str | None = field(default=None, metadata={"help": "Device (default: Accelerate's)."})
    torch_dtype: str = field(default="float32", metadata={"help": f"One of {sorted(DTYPES)}."})
    output_dir: str = field(default="outputs/erasure", metadata={"help": "Where results go."})
    save_mode: str = field(
        default="changed", metadata={"help": "full (the pipeline) or changed (only the tensors)."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload to hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository to push to."})

    def __post_init__(self):
        check_choice("method", self.method, ("eap", "esd", "fixed"))
        check_choice("save_mode", self.save_mode, ("full", "changed"))
        check_choice("torch_dtype", self.torch_dtype, sorted(DTYPES))
        if not self.concepts:
            refuse("concepts", "a non-empty list naming at least one concept", self.concepts)
        if self.push_to_hub and not self.hub_model_id:
            refuse(
                "hub_model_id", "a Hub repository id when `push_to_hub` is set", self.hub_model_id
            )


def load_pipeline(args: ErasureRecipeArguments):
    """The pipeline to edit: from the Hub / a folder, or the tiny offline one."""
    if args.model_name_or_path is None:
        from hf_extensions.models import tiny_stable_diffusion_pipeline

        pipe = tiny_stable_diffusion_pipeline(image_size=args.tiny_image_size)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            args.model_name_or_path, torch_dtype=DTYPES[args.torch_dtype], safety_checker=None
        )
    if args.device:
        pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, prompt: str, seed: int = 0) -> np.ndarray:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=4, generator=generator, output_type="np").images


def _scored(pipe, original_unet, args: ErasureRecipeArguments) -> dict[str, float]:
    """Recognition of the erased concepts and of the held-out prompts, after and before."""
    from transformers import AutoModelForImageClassification

    classifier = AutoModelForImageClassification.from_pretrained(args.scorer_name_or_path)
    classifier = classifier.to(pipe.unet.device).eval()
    sampling = {
        "samples_per_prompt": args.scorer_samples,
        "num_inference_steps": args.scorer_steps,
        "guidance_scale": args.scorer_guidance,
    }
    out = {}
    for suffix, unet in (("", pipe.unet), ("_before", original_unet)):
        edited, pipe.unet = pipe.unet, unet
        try:
            out[f"concept_recognition{suffix}"] = recognition_rate(
                pipe, classifier, args.concepts, **sampling
            )
            out[f"heldout_recognition{suffix}"] = recognition_rate(
                pipe, classifier, args.heldout_prompts, **sampling
            )
        finally:
            pipe.unet = edited
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Erase, measure, save, reload; write ``results.json`` to ``output_dir``."""
    args, config = RecipeArgumentParser((ErasureRecipeArguments, ErasureConfig)).parse(argv)
    pipe = load_pipeline(args)
    original = copy.deepcopy(pipe.unet) if args.evaluate else None
    pipe = erase_concepts(pipe, args.concepts, method=args.method, config=config)
    result = pipe.erasure_result
    metrics: dict[str, float] = {}
    if original is not None:
        preserved = [w for words in result.candidates.values() for w in words]
        if not preserved:
            preserved = list(config.preserve_concepts)
        original.to(pipe.unet.device)
        metrics = evaluate_erasure(
            pipe,
            original,
            args.concepts,
            preserved=preserved,
            heldout=args.heldout_prompts,
            num_samples=args.eval_samples,
            ddim_steps=args.eval_ddim_steps,
            start_guidance=config.start_guidance,
            negative_guidance=config.negative_guidance,
            seed=config.seed,
        )
        if args.scorer_name_or_path is not None:
            metrics.update(_scored(pipe, original, args))
        del original
    result.metrics.update(metrics)
    state = process_state()
    folder = Path(args.output_dir) / "pipeline"
    results: dict[str, Any] = {"metrics": metrics}
    if state.is_main_process:  # the main process saves and checks the reload; the others wait
        save_erased(
            pipe,
            folder,
            only_changed=args.save_mode == "changed",
            base_model=args.model_name_or_path,
        )
        reference = _images(pipe, args.concepts[0])
        if args.save_mode == "full":
            from diffusers import StableDiffusionPipeline

            reloaded = StableDiffusionPipeline.from_pretrained(folder).to(pipe.device)
            reloaded.set_progress_bar_config(disable=True)
        else:
            reloaded = load_erased(load_pipeline(args), folder)
        metrics["reload_generates_identically"] = float(
            np.array_equal(_images(reloaded, args.concepts[0]), reference)
        )
        results = {
            "metrics": metrics,
            "adversarial_concepts": result.adversarial_concepts,
            "final_loss": result.losses[-1] if result.losses else None,
            "arguments": asdict(args),
            "config": config.to_dict(),
        }
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            Path(args.output_dir) / "results.json", json.dumps(results, indent=2) + "\n"
        )
    state.wait_for_everyone()
    if args.push_to_hub:  # the saved folder, as it is, in one commit
        concepts = ", ".join(args.concepts)
        push_folder(folder, args.hub_model_id, f"Erase {concepts} ({args.method})")
    return results


def summary(results: dict[str, Any]) -> dict[str, float]:
    """How much the concept faded, how far the rest drifted, and whether the reload is exact."""
    metrics = results["metrics"]
    labels = {
        "erasure gap (after/before)": "erasure_gap",
        "candidate drift": "preserved_drift",
        "held-out drift": "heldout_drift",
        "reload generates identically": "reload_generates_identically",
    }
    return {label: float(metrics[key]) for label, key in labels.items() if key in metrics}


#: What the demo compares: scorer recognition of the erased concept (lower is better) and of the
#: held-out prompts (preservation), and the noise drift of the held-out prompts.
ZOO_SUMMARY = {
    "erased concept recognised": "concept_recognition",
    "held-out prompts recognised": "heldout_recognition",
    "held-out drift": "heldout_drift",
    "erased concept recognised, unedited": "concept_recognition_before",
}


def zoo_summary(results: dict[str, Any]) -> dict[str, float]:
    """:data:`ZOO_SUMMARY`'s figures of a run (all must be there)."""
    return summarize(results["metrics"], ZOO_SUMMARY)


def demo() -> Comparison:
    """Erase "seven" from the zoo's text-to-image model: EAP beside ESD (the same objective
    without adversarial preservation); scored by the zoo's digit scorer."""
    flags = ["--scorer_name_or_path", str(fixture_path("digit_scorer"))]
    comparison = run_comparison(
        method=main,
        baseline_name="ESD (no adversarial preservation)",
        baseline_flags=["--method", "esd"],
        config=RECIPE_DIR / "zoo_text_to_image.yaml",
        summary=zoo_summary,
        flags=flags,
        lower_is_better=("erased concept recognised", "held-out drift"),
        fixture="text_to_image",
    )
    # the unedited model is the same in both arms: one more row, unedited vs EAP
    unedited, _ = comparison.metrics.pop("erased concept recognised, unedited")
    after = comparison.metrics["erased concept recognised"][1]
    comparison.metrics["erased concept recognised: unedited vs EAP"] = (unedited, after)
    comparison.lower_is_better.add("erased concept recognised: unedited vs EAP")
    return comparison


def artifact(results: dict[str, Any]) -> Artifact:
    """The saved erasure and the line that loads it (printed at the end of a run)."""
    args = results["arguments"]
    folder = str(Path(args["output_dir"]) / "pipeline")
    usage = usage_for(METHOD, folder, args["model_name_or_path"])
    return Artifact(folder, usage, args["hub_model_id"] if args["push_to_hub"] else None)


if __name__ == "__main__":
    run_as_script(main, summary, artifacts=artifact)
