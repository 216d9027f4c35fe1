"""scikit-learn's handwritten digits (1,797 images of 8x8 pixels, 10 classes) as ``datasets``.

The digits ship inside scikit-learn, so every test, demo and benchmark of the project can train on
real images with no download. ``load_digits`` returns a stratified train / validation / test
``DatasetDict`` whose split depends only on ``seed``.
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features, Sequence, Value
from sklearn.datasets import load_digits as _sklearn_digits
from sklearn.model_selection import train_test_split

from hf_extensions.validation import check_choice, check_integer, check_range, refuse

LAYOUTS = ("image", "vector")
NUM_CLASSES = 10
CLASS_NAMES = [str(i) for i in range(NUM_CLASSES)]


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All digits as ``(images [N, 8, 8] float32 in [0, 1], labels [N] int64)``."""
    bunch = _sklearn_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    return images, bunch.target.astype(np.int64)


def resize_images(images: np.ndarray, image_size: int, num_channels: int = 1) -> np.ndarray:
    """Bilinearly resize ``[N, H, W]`` images to ``[N, C, S, S]`` (channels repeated).

    Used to give ViT-style models patches larger than one pixel (e.g. 8x8 -> 32x32 with 4x4
    patches) and 3-channel inputs for models pretrained on RGB images.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    if tensor.shape[-1] != image_size or tensor.shape[-2] != image_size:
        tensor = torch.nn.functional.interpolate(
            tensor, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    return tensor.clamp_(0.0, 1.0).repeat(1, num_channels, 1, 1).numpy()


def _validate_fraction(name: str, value: float) -> None:
    check_range(name, value, low=0.0, high=1.0, low_open=True, high_open=True)


def load_digits(
    seed: int = 0,
    *,
    layout: str = "image",
    image_size: int = 8,
    num_channels: int = 1,
    validation_size: float = 0.15,
    test_size: float = 0.2,
) -> DatasetDict:
    """Digits as a stratified ``DatasetDict`` with ``train``, ``validation`` and ``test`` splits.

    Every row also carries ``labels`` (a ``ClassLabel``) and ``sample_id`` (its index in
    scikit-learn's array), so label noise and domain shifts stay traceable to the source image.

    Args:
        seed (`int`, *optional*, defaults to `0`):
            Decides the split (and nothing else); the same seed gives the same rows in each
            split.
        layout (`str`, *optional*, defaults to `"image"`):
            ``"image"`` gives a ``pixel_values`` column of float32 ``[num_channels, image_size,
            image_size]`` in [0, 1]; ``"vector"`` gives a ``features`` column of 64 float32
            values.
        image_size (`int`, *optional*, defaults to `8`):
            Side of the (bilinearly resized) image; ``"image"`` layout only.
        num_channels (`int`, *optional*, defaults to `1`):
            Channels the gray image is repeated into; ``"image"`` layout only.
        validation_size (`float`, *optional*, defaults to `0.15`):
            Fraction of the 1,797 images held out for ``validation``, stratified by class; in
            (0, 1).
        test_size (`float`, *optional*, defaults to `0.2`):
            Fraction held out for ``test``, stratified by class; in (0, 1), and
            ``validation_size + test_size < 1``.

    Returns:
        `datasets.DatasetDict`: the ``train``, ``validation`` and ``test`` splits, rows in
        scikit-learn's order.

    Raises:
        ValueError: an unknown ``layout``, fractions out of range, ``image_size`` or
            ``num_channels`` below 1, or either of them changed with ``layout="vector"``.
    """
    check_choice("layout", layout, LAYOUTS)
    _validate_fraction("validation_size", validation_size)
    _validate_fraction("test_size", test_size)
    if validation_size + test_size >= 1.0:
        refuse("validation_size + test_size", "< 1", validation_size + test_size)
    check_integer("image_size", image_size, low=1)
    check_integer("num_channels", num_channels, low=1)
    if layout == "vector" and (image_size != 8 or num_channels != 1):
        raise ValueError("`image_size` and `num_channels` apply to layout='image' only.")

    images, labels = digits_arrays()
    ids = np.arange(len(labels))
    train_ids, test_ids = train_test_split(
        ids, test_size=test_size, stratify=labels, random_state=seed
    )
    train_ids, val_ids = train_test_split(
        train_ids,
        test_size=validation_size / (1.0 - test_size),
        stratify=labels[train_ids],
        random_state=seed,
    )
    label_feature = ClassLabel(names=CLASS_NAMES)
    if layout == "image":
        pixels = resize_images(images, image_size, num_channels)
        value_feature = Array3D(shape=(num_channels, image_size, image_size), dtype="float32")
        column = "pixel_values"
    else:
        pixels = images.reshape(len(images), -1)
        value_feature = Sequence(Value("float32"), length=64)
        column = "features"
    features = Features(
        {column: value_feature, "labels": label_feature, "sample_id": Value("int64")}
    )

    def build(split_ids: np.ndarray) -> Dataset:
        split_ids = np.sort(split_ids)
        return Dataset.from_dict(
            {column: pixels[split_ids], "labels": labels[split_ids], "sample_id": split_ids},
            features=features,
        )

    return DatasetDict(
        {"train": build(train_ids), "validation": build(val_ids), "test": build(test_ids)}
    )
