"""Scoring a text-to-image pipeline with a classifier: does a sample show what its prompt names?

The zoo's ``digit_scorer`` names its classes ``"<digit word> <ink>"`` (``"seven red"``); a sample
is *recognised* when the first word of its predicted class name is a word of its prompt. The
erasure recipe measures how often an erased concept is still drawn, the S2N recipe how often a
sampler draws the prompted digit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["recognition_rate"]


@torch.no_grad()
def recognition_rate(
    pipe,
    classifier,
    prompts: Sequence[str],
    *,
    samples_per_prompt: int = 20,
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    seed: int = 0,
) -> float:
    """Share of ``samples_per_prompt`` samples of each prompt whose predicted class name starts
    with a word of the prompt.

    Prompt ``i`` is sampled with a generator seeded ``seed + i``, so two pipelines (or two
    schedulers) are compared on the same initial noise.
    """
    names = classifier.config.id2label
    dtype = next(classifier.parameters()).dtype
    device = next(classifier.parameters()).device
    hits: list[bool] = []
    for index, prompt in enumerate(prompts):
        images = pipe(
            [prompt] * samples_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed + index),
            output_type="pt",
        ).images.float()
        predicted = classifier(pixel_values=images.to(device, dtype)).logits.argmax(-1)
        words = set(prompt.lower().split())
        hits += [names[int(k)].split()[0] in words for k in predicted]
    return float(np.mean(hits))
