"""Batched rendering of the hard digits (:mod:`hf_extensions.data.hard_digits`) with torch.

Every function takes a seeded ``torch.Generator`` and draws all its randomness from it, so a
batch is a deterministic function of (sources, parameters, generator state). Images are float32
``[N, 3, S, S]`` in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws from U[low, high)."""
    return low + (high - low) * torch.rand(n, generator=generator)


def place_strokes(
    sources: torch.Tensor,
    size: int,
    generator: torch.Generator,
    *,
    max_rotation: float = 20.0,
    scale: tuple[float, float] = (0.55, 0.8),
    max_shear: float = 0.25,
    max_shift: float = 0.15,
) -> torch.Tensor:
    """Random affine placement of 8x8 ``sources`` ``[N, 8, 8]`` on a ``size`` canvas: ``[N, 1,
    size, size]`` stroke masks in [0, 1].

    The digit covers ``scale`` of the canvas side, is rotated by up to ``max_rotation`` degrees,
    sheared by up to ``max_shear`` and shifted by up to ``max_shift`` of the half-side; a
    random gamma thins or thickens the strokes.
    """
    n = sources.shape[0]
    angle = torch.deg2rad(uniform(n, -max_rotation, max_rotation, generator))
    zoom = uniform(n, *scale, generator)
    shear = uniform(n, -max_shear, max_shear, generator)
    shift = uniform(2 * n, -max_shift, max_shift, generator).view(n, 2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output coordinates to source coordinates: (R Sh Z)^-1 applied to (out - t).
    forward = torch.stack(
        [torch.stack([cos, -sin + cos * shear], -1), torch.stack([sin, cos + sin * shear], -1)], 1
    ) * zoom.view(n, 1, 1)
    inverse = torch.linalg.inv(forward)
    theta = torch.cat([inverse, -(inverse @ shift.unsqueeze(-1))], dim=2)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    masks = F.grid_sample(
        sources.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    gamma = uniform(n, 0.6, 1.6, generator).view(n, 1, 1, 1)
    return ((masks.clamp(0.0, 1.0) - 0.1) / 0.7).clamp(0.0, 1.0) ** gamma


def plain_background(n: int, size: int, level: tuple[float, float], generator) -> torch.Tensor:
    """A uniform grey of a random level in ``level``, slightly tinted."""
    grey = uniform(n, *level, generator).view(n, 1, 1, 1)
    tint = 0.04 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    return (grey + tint).clamp(0.0, 1.0).expand(n, 3, size, size).clone()


def striped_background(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Dark sinusoidal stripes of random orientation, period and phase, in a random hue."""
    angle = uniform(n, 0.0, math.pi, generator).view(n, 1, 1)
    period = uniform(n, 4.0, 9.0, generator).view(n, 1, 1)
    phase = uniform(n, 0.0, 2 * math.pi, generator).view(n, 1, 1)
    axis = torch.arange(size, dtype=torch.float32)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    wave = torch.sin(2 * math.pi * (x * torch.cos(angle) + y * torch.sin(angle)) / period + phase)
    hue = 0.1 + 0.25 * torch.rand(n, 3, 1, 1, generator=generator)
    return (hue * (0.5 + 0.5 * wave.unsqueeze(1))).clamp(0.0, 1.0)


def scribbles(n: int, size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random straight strokes per image: ``[N, 1, size, size]`` intensities in [0, 1].

    Each stroke is a segment between two random points, drawn as a Gaussian profile of its
    distance to the segment (width 0.6 to 1.2 pixels).
    """
    axis = torch.arange(size, dtype=torch.float32)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([x, y], -1).view(1, 1, size * size, 2)
    start = torch.rand(n, count, 1, 2, generator=generator) * size
    direction = (torch.rand(n, count, 1, 2, generator=generator) - 0.5) * size
    width = uniform(n * count, 0.6, 1.2, generator).view(n, count, 1)
    offset = points - start
    along = (offset * direction).sum(-1) / (direction.pow(2).sum(-1) + 1e-6)
    nearest = start + along.clamp(0.0, 1.0).unsqueeze(-1) * direction
    distance2 = (points - nearest).pow(2).sum(-1)
    ink = torch.exp(-distance2 / (2 * width**2)).amax(dim=1)
    return ink.view(n, 1, size, size)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` images (reflect padding)."""
    radius = max(1, math.ceil(2.5 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    out = F.conv2d(padded, horizontal, groups=channels)
    return F.conv2d(out, vertical, groups=channels)


def composite(background: torch.Tensor, mask: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Paint ``colour`` ``[N, 3]`` over ``background`` where ``mask`` ``[N, 1, H, W]`` is 1."""
    return background * (1.0 - mask) + colour.view(-1, 3, 1, 1) * mask
