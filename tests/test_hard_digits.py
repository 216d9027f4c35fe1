"""The hard-digits generator: deterministic, leak-free splits, labels that match the pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_extensions.data.digits import digits_arrays
from hf_extensions.data.hard_digits import (
    COLOURS,
    DIGIT_WORDS,
    SOURCE_SPLITS,
    STYLES,
    caption,
    fine_class_names,
    load_hard_digits,
    render_hard_digits,
    source_ids,
)


def test_same_seed_same_images_and_other_seed_other_images():
    first = render_hard_digits(64, styles=tuple(STYLES), seed=3)
    again = render_hard_digits(64, styles=tuple(STYLES), seed=3)
    other = render_hard_digits(64, styles=tuple(STYLES), seed=4)
    assert torch.equal(first.images, again.images) and first.captions == again.captions
    assert not torch.equal(first.images, other.images)
    assert first.images.shape == (64, 3, 32, 32) and first.images.dtype == torch.float32
    assert first.images.min() >= 0.0 and first.images.max() <= 1.0


def test_source_splits_partition_the_digits_disjointly_and_stratified():
    _, labels = digits_arrays()
    parts = {name: source_ids(name) for name in SOURCE_SPLITS}
    joined = np.concatenate(list(parts.values()))
    assert len(joined) == len(labels) == len(np.unique(joined))
    for name, ids in parts.items():
        assert abs(len(ids) / len(labels) - SOURCE_SPLITS[name]) < 0.01
        counts = np.bincount(labels[ids], minlength=10) / len(ids)
        assert counts.min() > 0.08 and counts.max() < 0.12  # every digit about 10%


def test_images_come_only_from_their_split_and_digit_labels_match_sources():
    _, labels = digits_arrays()
    batch = render_hard_digits(300, split="test", seed=0)
    assert set(batch.sources.tolist()) <= set(source_ids("test").tolist())
    assert torch.equal(batch.digits, torch.from_numpy(labels)[batch.sources])
    only = render_hard_digits(50, split="train", digits=(3, 8), seed=0)
    assert set(only.digits.tolist()) <= {3, 8}


def test_fine_labels_and_captions_name_the_digit_and_the_ink():
    colours = ("red", "blue", "cyan")
    batch = render_hard_digits(60, colours=colours, styles=("plain", "noisy"), seed=2)
    assert torch.equal(batch.fine, batch.digits * 3 + batch.colours)
    names = fine_class_names(colours)
    for k in range(60):
        digit, colour = DIGIT_WORDS[batch.digits[k]], colours[batch.colours[k]]
        assert names[batch.fine[k]] == f"{digit} {colour}"
        assert digit in batch.captions[k].split() and colour in batch.captions[k].split()
        assert STYLES[batch.style_names[batch.styles[k]]].phrase in batch.captions[k]
    assert caption(7, "red", "noisy") == "a handwritten seven in red ink on a noisy background"


def test_ink_colour_is_the_labelled_one():
    colours = tuple(COLOURS)
    batch = render_hard_digits(120, colours=colours, styles=("plain",), seed=5)
    palette = torch.tensor([COLOURS[name] for name in colours])
    # the brightest 5% of pixels of a dark-background image are ink
    flat = batch.images.flatten(2)
    brightness = flat.sum(1)
    top = brightness.topk(int(0.05 * flat.shape[-1]), dim=-1).indices
    ink = torch.stack([flat[i][:, top[i]].mean(-1) for i in range(len(batch))])
    nearest = torch.cdist(ink, palette).argmin(-1)
    assert (nearest == batch.colours).float().mean() > 0.95


def test_styles_differ_where_they_say():
    def one(style: str) -> torch.Tensor:
        return render_hard_digits(200, styles=(style,), seed=0).images

    plain, paper, noisy, blurred = one("plain"), one("paper"), one("noisy"), one("blurred")
    corner = slice(0, 3)
    assert paper[..., corner, corner].mean() > 0.7 > 0.3 > plain[..., corner, corner].mean()

    def roughness(images: torch.Tensor) -> float:  # mean absolute neighbour difference
        return (images[..., 1:] - images[..., :-1]).abs().mean().item()

    assert roughness(noisy) > 2 * roughness(plain) > 2 * roughness(blurred)


def test_dataset_columns_and_label_kinds():
    data = load_hard_digits({"train": 20, "test": 10}, label="fine", colours=("red", "green"))
    assert set(data) == {"train", "test"}
    row = data["train"].with_format("numpy")[0]
    assert row["pixel_values"].shape == (3, 32, 32)
    assert row["labels"] == row["digit"] * 2 + row["colour"]
    assert data["train"].features["labels"].names == fine_class_names(("red", "green"))
    # a split's images do not depend on which other splits were asked for
    alone = load_hard_digits({"test": 10}, label="fine", colours=("red", "green"))
    np.testing.assert_array_equal(
        alone["test"].with_format("numpy")["pixel_values"],
        data["test"].with_format("numpy")["pixel_values"],
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"styles": ("plain", "gloomy")}, "styles"),
        ({"styles": ("plain", "plain")}, "styles"),
        ({"colours": ()}, "colours"),
        ({"colours": "red"}, "colours"),
        ({"split": "holdout"}, "split"),
        ({"digits": (3, 10)}, "digits"),
        ({"num_images": 0}, "num_images"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    arguments = {"num_images": 4, **kwargs}
    with pytest.raises(ValueError, match=f"`{field}`"):
        render_hard_digits(**arguments)


def test_image_classification_recipes_take_the_hard_digits():
    from hf_extensions.models.image_classification import (
        ImageClassificationArguments,
        build_datasets,
        build_model,
        class_names,
    )

    args = ImageClassificationArguments(
        dataset_name="hard_digits",
        image_size=32,
        patch_size=4,
        hard_digits_styles=["noisy"],
        hard_digits_label="fine",
        hard_digits_colours=["red", "blue"],
        hard_digits_train_images=40,
        hard_digits_eval_images=20,
        label_noise=0.25,
    )
    data = build_datasets(args, seed=0)
    assert [len(data[s]) for s in ("train", "validation", "test")] == [40, 20, 20]
    assert class_names(data) == fine_class_names(("red", "blue"))
    assert (
        sum(data["train"]["labels"][i] != data["train"]["clean_labels"][i] for i in range(40)) == 10
    )
    model = build_model(args, class_names(data))
    logits = model(pixel_values=torch.as_tensor(data["test"][:2]["pixel_values"])).logits
    assert logits.shape == (2, 20)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hard_digits_styles": ["noisy", "foggy"]}, "hard_digits_styles"),
        ({"hard_digits_colours": "red"}, "hard_digits_colours"),
        ({"hard_digits_label": "style"}, "hard_digits_label"),
        ({"hard_digits_train_images": 0}, "hard_digits_train_images"),
        ({"image_size": 8}, "image_size"),
    ],
)
def test_hard_digits_arguments_name_the_field(kwargs, field):
    from hf_extensions.models.image_classification import ImageClassificationArguments

    arguments = {"dataset_name": "hard_digits", "image_size": 32, "patch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=f"`{field}"):
        ImageClassificationArguments(**arguments)
