"""Label noise for robustness experiments (SAM family, Bayesian methods).

``symmetric``: a sample chosen for corruption gets a label drawn uniformly from the *other*
classes. ``asymmetric``: it gets ``transition[label]`` (class-dependent flips such as 7 -> 1,
as in Patrini et al., 2017). In both cases exactly ``round(rate * n)`` samples are corrupted
(per class for ``asymmetric``), so the realised noise rate is the requested one rather than an
expectation, and ``clean_labels`` keeps the truth for evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from datasets import Dataset

from hf_extensions.validation import check_choice, check_integer, check_range, refuse

NOISE_KINDS = ("symmetric", "asymmetric")

# Look-alike digits (2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1), the usual asymmetric scheme for digits;
# other classes keep their label.
DIGITS_ASYMMETRIC = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}


def noisy_labels(
    labels: np.ndarray,
    rate: float,
    *,
    kind: str = "symmetric",
    num_classes: int | None = None,
    transition: Mapping[int, int] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Return a corrupted copy of ``labels`` (see the module docstring for the two kinds)."""
    check_choice("kind", kind, NOISE_KINDS)
    check_range("rate", rate, low=0.0, high=1.0)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    num_classes = check_integer("num_classes", num_classes, low=2)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]."
        )
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    if kind == "symmetric":
        chosen = rng.choice(len(labels), size=round(rate * len(labels)), replace=False)
        # An offset in [1, K-1] added modulo K is a uniform draw among the other K-1 classes.
        offsets = rng.integers(1, num_classes, size=len(chosen))
        noisy[chosen] = (labels[chosen] + offsets) % num_classes
        return noisy
    if transition is None:
        refuse("transition", "a {source_class: target_class} map for kind='asymmetric'", None)
    for source, target in transition.items():
        if source == target or not (0 <= source < num_classes and 0 <= target < num_classes):
            raise ValueError(
                f"`transition` entry {source} -> {target} is not a flip between valid classes."
            )
        members = np.flatnonzero(labels == source)
        chosen = rng.choice(members, size=round(rate * len(members)), replace=False)
        noisy[chosen] = target
    return noisy


def add_label_noise(
    dataset: Dataset,
    rate: float,
    *,
    kind: str = "symmetric",
    num_classes: int | None = None,
    transition: Mapping[int, int] | None = None,
    seed: int = 0,
    label_column: str = "labels",
) -> Dataset:
    """Corrupt ``label_column`` of ``dataset``; the truth moves to ``clean_labels``.

    Apply it to the training split only: validation and test keep clean labels.

    Args:
        dataset (`datasets.Dataset`):
            One split with integer labels in ``label_column``; it must not already have a
            ``clean_labels`` column (noise applied twice).
        rate (`float`):
            The noise rate, in [0, 1]: exactly ``round(rate * n)`` of the ``n`` rows are
            corrupted (``"symmetric"``), or ``round(rate * n_c)`` of the ``n_c`` rows of each
            source class ``c`` of ``transition`` (``"asymmetric"``).
        kind (`str`, *optional*, defaults to `"symmetric"`):
            ``"symmetric"``: a corrupted row gets a label drawn uniformly from the *other*
            classes; ``"asymmetric"``: it gets ``transition[label]``.
        num_classes (`int`, *optional*, defaults to `None`):
            The number of classes (at least 2); `None`: the column's ``ClassLabel`` size when
            it has one, else the largest label + 1.
        transition (`Mapping[int, int]`, *optional*, defaults to `None`):
            ``{source_class: target_class}`` flips for ``"asymmetric"`` (required there; e.g.
            :data:`DIGITS_ASYMMETRIC`); classes it does not name keep their labels. Not used by
            ``"symmetric"``.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the rows chosen and of the new labels.
        label_column (`str`, *optional*, defaults to `"labels"`):
            The column to corrupt.

    Returns:
        `datasets.Dataset`: ``dataset`` with the noisy labels in ``label_column`` (same
        feature type) and the original ones in ``clean_labels``.

    Raises:
        ValueError: ``label_column`` is missing, ``clean_labels`` exists already, ``kind`` or
            ``rate`` is out of range, fewer than 2 classes, labels outside
            ``[0, num_classes)``, or a missing or invalid ``transition`` for ``"asymmetric"``.
    """
    if label_column not in dataset.column_names:
        raise ValueError(f"`label_column` {label_column!r} is not a column of the dataset.")
    if "clean_labels" in dataset.column_names:
        raise ValueError("the dataset already has `clean_labels`: label noise was applied twice.")
    if num_classes is None:
        num_classes = getattr(dataset.features[label_column], "num_classes", None)
    clean = np.asarray(dataset[label_column], dtype=np.int64)
    noisy = noisy_labels(
        clean, rate, kind=kind, num_classes=num_classes, transition=transition, seed=seed
    )
    feature = dataset.features[label_column]
    dataset = dataset.rename_column(label_column, "clean_labels")
    return dataset.add_column(label_column, noisy.tolist(), feature=feature)
