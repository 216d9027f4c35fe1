"""Hard digits: 32x32 RGB digits in coloured ink, in named styles, with captions (no download).

scikit-learn's 1,797 8x8 digits are too easy for the methods' premises (every method saturates
them). :func:`render_hard_digits` turns them into a deterministic, seeded stream of harder images:
each source digit is placed by a random affine map (rotation, shear, zoom, shift, stroke
thickness), painted in a coloured ink (:data:`COLOURS`, jittered) over the background of a
*style* (:data:`STYLES`: the domains of domain adaptation), and captioned from templates
("a handwritten seven in red ink on a noisy background"). Tens of thousands of images render in
seconds.

Labels come in a real hierarchy: the ``digit`` (10 superclasses), the ink ``colour``, and the
``fine`` class ``digit * len(colours) + colour`` (for example 40 classes with 4 inks; the digit
is the superclass of each fine class).

The 1,797 sources are partitioned once (stratified by digit, a fixed seed) into
:data:`SOURCE_SPLITS` (``pretrain``, ``train``, ``validation``, ``test``), so a model pretrained
on the ``pretrain`` sources never saw the handwriting of a downstream ``test`` image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features, Value
from sklearn.model_selection import train_test_split

from hf_extensions.data import rendering
from hf_extensions.data.digits import digits_arrays
from hf_extensions.seeding import keyed_generator
from hf_extensions.validation import check_choice, check_integer, check_names, refuse

__all__ = [
    "CAPTION_TEMPLATES",
    "COLOURS",
    "DIGIT_WORDS",
    "IMAGE_SIZE",
    "LABELS",
    "SOURCE_SPLITS",
    "STYLES",
    "HardDigits",
    "Style",
    "caption",
    "fine_class_names",
    "load_hard_digits",
    "render_hard_digits",
    "source_ids",
]

IMAGE_SIZE = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Ink colours (RGB in [0, 1]); each image's ink is jittered by up to +-0.08 per channel.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.1),
    "green": (0.1, 0.78, 0.2),
    "blue": (0.2, 0.35, 0.98),
    "yellow": (0.95, 0.88, 0.12),
    "magenta": (0.88, 0.15, 0.85),
    "cyan": (0.1, 0.85, 0.9),
}
#: Fractions of the 1,797 sources in each source split (stratified by digit, fixed seed 0).
SOURCE_SPLITS = {"pretrain": 0.4, "train": 0.3, "validation": 0.1, "test": 0.2}
LABELS = ("digit", "colour", "fine")
_CHUNK = 4096  # images rendered at once
#: Caption templates, drawn uniformly per image (``{style}`` is the style's phrase).
CAPTION_TEMPLATES = (
    "a handwritten {digit} in {colour} ink {style}",
    "the digit {digit} written in {colour} {style}",
    "a {colour} {digit} {style}",
)


@dataclass(frozen=True)
class Style:
    """A domain: how the background, clutter, blur and noise of its images are drawn."""

    phrase: str  # the caption's words for it
    background: str = "dark"  # "dark", "light" or "stripes"
    noise: float = 0.03  # standard deviation of additive Gaussian noise
    scribbles: int = 0  # random grey strokes drawn under the digit
    blur: float = 0.0  # Gaussian blur sigma, in pixels (0: none)


STYLES: dict[str, Style] = {
    "plain": Style("on a plain dark background"),
    "noisy": Style("on a noisy background", noise=0.22),
    "cluttered": Style("among scribbles", scribbles=4),
    "striped": Style("on a striped background", background="stripes"),
    "paper": Style("on white paper", background="light"),
    "blurred": Style("blurred on a dark background", blur=1.1),
}


def fine_class_names(colours: tuple[str, ...] | list[str]) -> list[str]:
    """Fine class names ``"<digit word> <colour>"`` in label order (digit major)."""
    return [f"{word} {colour}" for word in DIGIT_WORDS for colour in colours]


def caption(digit: int, colour: str, style: str, template: int = 0) -> str:
    """The caption of one image, e.g. ``caption(7, "red", "noisy")`` ->
    ``"a handwritten seven in red ink on a noisy background"``."""
    text = CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)]
    return text.format(digit=DIGIT_WORDS[digit], colour=colour, style=STYLES[style].phrase)


def source_ids(split: str) -> np.ndarray:
    """Indices into scikit-learn's digits of the sources of ``split`` (sorted)."""
    check_choice("split", split, SOURCE_SPLITS)
    _, labels = digits_arrays()
    remaining = np.arange(len(labels))
    fractions = dict(SOURCE_SPLITS)
    left = 1.0
    for name in list(SOURCE_SPLITS)[:-1]:
        share = fractions[name] / left
        taken, remaining = train_test_split(
            remaining, train_size=share, stratify=labels[remaining], random_state=0
        )
        if name == split:
            return np.sort(taken)
        left -= fractions[name]
    return np.sort(remaining)


@dataclass
class HardDigits:
    """A rendered batch: images ``[N, 3, 32, 32]`` float32 in [0, 1] and per-image labels."""

    images: torch.Tensor
    digits: torch.Tensor  # int64, 0-9
    colours: torch.Tensor  # int64 index into ``colour_names``
    styles: torch.Tensor  # int64 index into ``style_names``
    sources: torch.Tensor  # int64 index into scikit-learn's digits
    captions: list[str]
    colour_names: tuple[str, ...]
    style_names: tuple[str, ...]

    @property
    def fine(self) -> torch.Tensor:
        """Fine labels ``digit * len(colour_names) + colour``."""
        return self.digits * len(self.colour_names) + self.colours

    def __len__(self) -> int:
        return self.images.shape[0]


def _render_chunk(sources, colour_rgb, style_index, style_names, generator) -> torch.Tensor:
    n = sources.shape[0]
    masks = rendering.place_strokes(sources, IMAGE_SIZE, generator)
    images = torch.empty(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    for k, name in enumerate(style_names):
        rows = (style_index == k).nonzero().flatten()
        if len(rows) == 0:
            continue
        style, m = STYLES[name], len(rows)
        if style.background == "stripes":
            back = rendering.striped_background(m, IMAGE_SIZE, generator)
        else:
            level = (0.82, 1.0) if style.background == "light" else (0.0, 0.18)
            back = rendering.plain_background(m, IMAGE_SIZE, level, generator)
        if style.scribbles:
            ink = 0.8 * rendering.scribbles(m, IMAGE_SIZE, style.scribbles, generator)
            grey = rendering.uniform(m, 0.45, 0.85, generator).view(m, 1, 1, 1)
            back = back * (1 - ink) + grey * ink
        ink_colour = colour_rgb[rows]
        if style.background == "light":  # darker ink reads on paper
            ink_colour = 0.75 * ink_colour
        image = rendering.composite(back, masks[rows], ink_colour)
        if style.blur:
            image = rendering.gaussian_blur(image, style.blur)
        noise = torch.randn(image.shape, generator=generator) * style.noise
        images[rows] = (image + noise).clamp(0.0, 1.0)
    return images


def _check_known(name: str, value, known) -> tuple[str, ...]:
    names = check_names(name, value, optional=False)
    for entry in names:
        check_choice(name, entry, tuple(known))
    if len(set(names)) != len(names):
        refuse(name, "names without repeats", value)
    return tuple(names)


def render_hard_digits(
    num_images: int,
    *,
    split: str = "train",
    styles: tuple[str, ...] | list[str] = ("plain",),
    colours: tuple[str, ...] | list[str] = ("red", "green", "blue", "yellow"),
    digits: tuple[int, ...] | list[int] | None = None,
    seed: int = 0,
) -> HardDigits:
    """Render ``num_images`` hard digits from the sources of ``split``.

    Each image draws, uniformly and independently, a source of ``split`` (restricted to
    ``digits`` when given), an ink among ``colours``, a style among ``styles`` and a caption
    template. The result depends only on the arguments; images are rendered
    :data:`_CHUNK` at a time to bound memory.

    Args:
        num_images (`int`): images to render, >= 1.
        split (`str`, *optional*, defaults to `"train"`): a source split of :data:`SOURCE_SPLITS`.
        styles (`tuple[str, ...]`, *optional*, defaults to `("plain",)`): names in :data:`STYLES`.
        colours (`tuple[str, ...]`, *optional*): ink names in :data:`COLOURS`; their order
            defines the ``colour`` and ``fine`` labels.
        digits (`tuple[int, ...]`, *optional*): only these digits (all ten when `None`).
        seed (`int`, *optional*, defaults to `0`): the random stream (mixed with ``split``).

    Returns:
        `HardDigits`: the images, labels and captions.
    """
    check_integer("num_images", num_images, low=1)
    styles = _check_known("styles", styles, STYLES)
    colours = _check_known("colours", colours, COLOURS)
    images_8x8, labels = digits_arrays()
    pool = source_ids(split)
    if digits is not None:
        for digit in digits:
            check_integer("digits", digit, low=0, high=9)
        pool = pool[np.isin(labels[pool], list(digits))]
    split_key = list(SOURCE_SPLITS).index(split)
    generator = keyed_generator(seed, split_key)
    chosen = torch.from_numpy(pool)[torch.randint(len(pool), (num_images,), generator=generator)]
    colour_index = torch.randint(len(colours), (num_images,), generator=generator)
    style_index = torch.randint(len(styles), (num_images,), generator=generator)
    template = torch.randint(len(CAPTION_TEMPLATES), (num_images,), generator=generator)
    palette = torch.tensor([COLOURS[name] for name in colours])
    jitter = 0.16 * (torch.rand(num_images, 3, generator=generator) - 0.5)
    colour_rgb = (palette[colour_index] + jitter).clamp(0.0, 1.0)
    sources = torch.from_numpy(images_8x8)[chosen]
    parts = []
    for chunk, start in enumerate(range(0, num_images, _CHUNK)):
        rows = slice(start, start + _CHUNK)
        chunk_generator = keyed_generator(seed, split_key, chunk)
        parts.append(
            _render_chunk(
                sources[rows], colour_rgb[rows], style_index[rows], styles, chunk_generator
            )
        )
    digit_labels = torch.from_numpy(labels)[chosen]
    captions = [
        caption(int(d), colours[int(c)], styles[int(s)], int(t))
        for d, c, s, t in zip(digit_labels, colour_index, style_index, template)
    ]
    return HardDigits(
        images=torch.cat(parts),
        digits=digit_labels,
        colours=colour_index,
        styles=style_index,
        sources=chosen,
        captions=captions,
        colour_names=colours,
        style_names=styles,
    )


def to_dataset(batch: HardDigits, label: str = "digit") -> Dataset:
    """A ``datasets.Dataset`` of a rendered batch: ``pixel_values`` (float32 ``[3, 32, 32]``),
    ``labels`` (the ``label`` kind: ``"digit"``, ``"colour"`` or ``"fine"``), ``digit``,
    ``colour``, ``style``, ``caption`` and ``sample_id`` (the scikit-learn source)."""
    check_choice("label", label, LABELS)
    names = {
        "digit": list(DIGIT_WORDS),
        "colour": list(batch.colour_names),
        "fine": fine_class_names(batch.colour_names),
    }[label]
    values = {"digit": batch.digits, "colour": batch.colours, "fine": batch.fine}[label]
    features = Features(
        {
            "pixel_values": Array3D(shape=(3, IMAGE_SIZE, IMAGE_SIZE), dtype="float32"),
            "labels": ClassLabel(names=names),
            "digit": ClassLabel(names=list(DIGIT_WORDS)),
            "colour": ClassLabel(names=list(batch.colour_names)),
            "style": ClassLabel(names=list(batch.style_names)),
            "caption": Value("string"),
            "sample_id": Value("int64"),
        }
    )
    return Dataset.from_dict(
        {
            "pixel_values": batch.images.numpy(),
            "labels": values.numpy(),
            "digit": batch.digits.numpy(),
            "colour": batch.colours.numpy(),
            "style": batch.styles.numpy(),
            "caption": batch.captions,
            "sample_id": batch.sources.numpy(),
        },
        features=features,
    )


def load_hard_digits(
    sizes: dict[str, int] | None = None,
    *,
    styles: tuple[str, ...] | list[str] = ("plain",),
    colours: tuple[str, ...] | list[str] = ("red", "green", "blue", "yellow"),
    label: str = "digit",
    digits: tuple[int, ...] | list[int] | None = None,
    seed: int = 0,
) -> DatasetDict:
    """Hard digits as a ``DatasetDict``, one split per entry of ``sizes``.

    Args:
        sizes (`dict[str, int]`, *optional*): split name (a key of :data:`SOURCE_SPLITS`) ->
            number of images; defaults to ``{"train": 2000, "validation": 500, "test": 1000}``.
        styles, colours, digits, seed: as in :func:`render_hard_digits` (each split is its
            own random stream, so changing one split's size leaves the others unchanged).
        label (`str`, *optional*, defaults to `"digit"`): which label fills ``labels``:
            ``"digit"``, ``"colour"`` or ``"fine"`` (digit x colour).

    Returns:
        `datasets.DatasetDict`: the splits, with the columns of :func:`to_dataset`.
    """
    sizes = sizes or {"train": 2000, "validation": 500, "test": 1000}
    return DatasetDict(
        {
            split: to_dataset(
                render_hard_digits(
                    n, split=split, styles=styles, colours=colours, digits=digits, seed=seed
                ),
                label,
            )
            for split, n in sizes.items()
        }
    )
