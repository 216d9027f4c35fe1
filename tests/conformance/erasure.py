"""Conformance case of EAP concept erasure (``erase_concepts`` / ``ConceptEraser``, a diffusers
pipeline modifier). No baseline: there is no stock diffusers step to equal, and ESD, the
baseline method, is the same loop without the adversary (not bit-equal to EAP at
preservation weight 0; its parts are checked in tests/test_erasure.py). Reload: the full
pipeline, by generation; card: yes; two processes: 2 x 1 cycle = 1 x 2 accumulated cycles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from conformance.case import CONCEPT, CardSpec, Case, Ranks, Saved, bad_values, params
from hf_extensions.models import tiny_stable_diffusion_pipeline
from hf_extensions.pipelines import ConceptEraser, ErasureConfig, erase_concepts, save_erased

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
        CONCEPT,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    return {"images": torch.from_numpy(np.ascontiguousarray(images))}


def _erasure_save(directory: Path) -> Saved:
    config = ErasureConfig(progress_bar=False, candidates=_WORDS, **ERASURE_CARD)
    pipe = erase_concepts(tiny_stable_diffusion_pipeline(), [CONCEPT], "eap", config)
    save_erased(pipe, directory, base_model="tiny-sd")
    recorded = {"variant": "eap", "erased_concepts": [CONCEPT]}
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
    eraser = ConceptEraser(pipe, [CONCEPT], "eap", config)
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
