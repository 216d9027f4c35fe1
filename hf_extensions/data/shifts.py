"""Domain shifts of the digits for domain adaptation (PGA) and robustness tests.

Each shift is a deterministic (seeded) transform of the image, applied to every row:

- ``rotate``: rotation by ``45 * severity`` degrees (bilinear, zero fill);
- ``invert``: ``1 - x`` (white digits on black become black on white);
- ``noise``: additive Gaussian noise of standard deviation ``0.3 * severity``, clipped to [0, 1];
- ``scale``: zoom by ``1 + 0.5 * severity`` about the centre (a shrink for negative severity).
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, DatasetDict
from scipy import ndimage

from hf_extensions.validation import check_choice, check_finite, check_range

SHIFTS = ("rotate", "invert", "noise", "scale")


def _zoom_about_centre(image: np.ndarray, factor: float) -> np.ndarray:
    centre = (np.array(image.shape) - 1) / 2.0
    matrix = np.eye(2) / factor
    offset = centre - matrix @ centre
    return ndimage.affine_transform(image, matrix, offset=offset, order=1, cval=0.0)


def shift_images(
    images: np.ndarray, shift: str, *, severity: float = 1.0, seed: int = 0
) -> np.ndarray:
    """Apply ``shift`` to ``images`` of shape ``[..., H, W]`` with values in [0, 1]."""
    check_choice("shift", shift, SHIFTS)
    if shift == "scale":  # the zoom factor 1 + severity / 2 must be > 0
        check_range("severity", severity, low=-2.0, low_open=True)
    else:
        check_finite("severity", severity)
    images = np.asarray(images, dtype=np.float32)
    if shift == "invert":
        return 1.0 - images
    if shift == "noise":
        noise = np.random.default_rng(seed).normal(0.0, 0.3 * severity, size=images.shape)
        return np.clip(images + noise, 0.0, 1.0).astype(np.float32)
    flat = images.reshape(-1, *images.shape[-2:])
    if shift == "rotate":
        out = [ndimage.rotate(im, 45.0 * severity, reshape=False, order=1, cval=0.0) for im in flat]
    else:
        factor = 1.0 + 0.5 * severity
        out = [_zoom_about_centre(im, factor) for im in flat]
    return np.clip(np.stack(out), 0.0, 1.0).astype(np.float32).reshape(images.shape)


def shift_digits(dataset: Dataset, shift: str, *, severity: float = 1.0, seed: int = 0) -> Dataset:
    """Return ``dataset`` with ``shift`` applied to its ``pixel_values`` (or 64-d ``features``)."""
    if "pixel_values" in dataset.column_names:
        column, shape = "pixel_values", None
    elif "features" in dataset.column_names:
        column, shape = "features", (8, 8)
    else:
        raise ValueError("the dataset has neither a `pixel_values` nor a `features` column.")
    values = np.asarray(dataset.with_format("numpy")[column], dtype=np.float32)
    images = values.reshape(len(values), *shape) if shape else values
    shifted = shift_images(images, shift, severity=severity, seed=seed).reshape(values.shape)
    columns = {name: dataset[name] for name in dataset.column_names if name != column}
    return Dataset.from_dict({**columns, column: shifted}, features=dataset.features)


def shifted_domains(
    dataset: DatasetDict, shifts: dict[str, str], *, severity: float = 1.0, seed: int = 0
) -> dict[str, DatasetDict]:
    """Build named domains, e.g. ``{"source": "none", "rotated": "rotate"}``, from one DatasetDict.

    Args:
        dataset (`datasets.DatasetDict`):
            The source splits (e.g. from :func:`load_digits`), each with a ``pixel_values``
            column of images in [0, 1] or a 64-d ``features`` column (read as 8x8 images).
        shifts (`dict[str, str]`):
            Domain name -> shift: ``"none"`` keeps the images as they are (the same
            ``DatasetDict``), or one of :data:`SHIFTS`: ``"rotate"``, ``"invert"``, ``"noise"``,
            ``"scale"`` (see the module docstring).
        severity (`float`, *optional*, defaults to `1.0`):
            Strength of every shift: rotation by ``45 * severity`` degrees, noise of standard
            deviation ``0.3 * severity``, zoom by ``1 + 0.5 * severity`` (a shrink for negative
            severity; must stay > 0); ``"invert"`` ignores it.
        seed (`int`, *optional*, defaults to `0`):
            Base seed of the ``"noise"`` draws. Every split of every domain is shifted with its
            own seed, so two domains never share a noise draw.

    Returns:
        `dict[str, datasets.DatasetDict]`: domain name -> its splits, in the order of
        ``shifts``.

    Raises:
        ValueError: an unknown shift, a split with neither ``pixel_values`` nor ``features``,
            or a ``"scale"`` severity of -2 or less.
    """
    domains = {}
    for index, (name, shift) in enumerate(shifts.items()):
        if shift == "none":
            domains[name] = dataset
            continue
        domains[name] = DatasetDict(
            {
                split: shift_digits(ds, shift, severity=severity, seed=seed + 1000 * index + k)
                for k, (split, ds) in enumerate(dataset.items())
            }
        )
    return domains
