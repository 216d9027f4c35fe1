"""Embedded data builders: deterministic per seed, exact noise rates, faithful shifts and streams."""

import numpy as np
import pytest

from hf_extensions.data import (
    DIGITS_ASYMMETRIC,
    add_label_noise,
    class_incremental_stream,
    digits_arrays,
    load_digits,
    noisy_labels,
    shift_digits,
    shift_images,
    shifted_domains,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def _ids(dataset_dict):
    return {split: list(ds["sample_id"]) for split, ds in dataset_dict.items()}


def test_split_is_a_stratified_partition(digits):
    ids = _ids(digits)
    all_ids = [i for split_ids in ids.values() for i in split_ids]
    assert sorted(all_ids) == list(range(1797))  # disjoint and complete
    assert [len(ids[s]) for s in ("train", "validation", "test")] == [1167, 270, 360]
    _, labels = digits_arrays()
    overall = np.bincount(labels, minlength=10) / len(labels)
    for ds in digits.values():
        share = np.bincount(ds["labels"], minlength=10) / len(ds)
        assert np.abs(share - overall).max() < 0.01


def test_split_depends_on_seed_only(digits):
    assert _ids(load_digits(seed=0)) == _ids(digits)
    assert _ids(load_digits(seed=1))["train"] != _ids(digits)["train"]


def test_image_and_vector_layouts_hold_the_same_pixels(digits):
    vectors = load_digits(seed=0, layout="vector")
    images = np.asarray(digits["test"]["pixel_values"])
    assert images.shape == (360, 1, 8, 8)
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(images.reshape(360, 64), np.asarray(vectors["test"]["features"]))
    raw, labels = digits_arrays()
    first = digits["test"][0]
    np.testing.assert_array_equal(np.asarray(first["pixel_values"])[0], raw[first["sample_id"]])
    assert first["labels"] == labels[first["sample_id"]]


def test_upscaled_rgb_images_repeat_channels_and_keep_mass(digits):
    big = load_digits(seed=0, image_size=32, num_channels=3)["test"]
    pixels = np.asarray(big["pixel_values"])
    assert pixels.shape == (360, 3, 32, 32)
    np.testing.assert_array_equal(pixels[:, 0], pixels[:, 2])
    small = np.asarray(digits["test"]["pixel_values"])
    assert abs(pixels.mean() - small.mean()) < 0.02


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layout": "pixels"},
        {"validation_size": 0.0},
        {"validation_size": 0.5, "test_size": 0.5},
        {"layout": "vector", "image_size": 16},
    ],
)
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        load_digits(**kwargs)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.8])
def test_symmetric_noise_hits_the_rate_exactly(digits, rate):
    noisy = add_label_noise(digits["train"], rate, seed=0)
    clean, labels = np.asarray(noisy["clean_labels"]), np.asarray(noisy["labels"])
    assert (clean != labels).sum() == round(rate * len(clean))
    np.testing.assert_array_equal(clean, digits["train"]["labels"])


def test_symmetric_noise_is_seeded_and_spread_over_other_classes():
    labels = np.repeat(np.arange(10), 2000)
    a = noisy_labels(labels, 0.5, seed=3)
    np.testing.assert_array_equal(a, noisy_labels(labels, 0.5, seed=3))
    assert not np.array_equal(a, noisy_labels(labels, 0.5, seed=4))
    flipped_from_zero = a[(labels == 0) & (a != 0)]
    counts = np.bincount(flipped_from_zero, minlength=10)[1:]
    # ~1000 flips over 9 classes: each ~111; a uniform draw stays well within +-40%.
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()


def test_asymmetric_noise_flips_only_mapped_classes_to_their_targets():
    labels = np.repeat(np.arange(10), 100)
    noisy = noisy_labels(labels, 0.3, kind="asymmetric", transition=DIGITS_ASYMMETRIC, seed=0)
    for cls in range(10):
        changed = noisy[(labels == cls)] != cls
        if cls in DIGITS_ASYMMETRIC:
            assert changed.sum() == 30
            assert set(noisy[(labels == cls) & (noisy != cls)]) == {DIGITS_ASYMMETRIC[cls]}
        else:
            assert changed.sum() == 0


def test_noise_validation():
    with pytest.raises(ValueError, match="rate"):
        noisy_labels(np.arange(10), 1.5)
    with pytest.raises(ValueError, match="transition"):
        noisy_labels(np.arange(10), 0.2, kind="asymmetric")
    with pytest.raises(ValueError, match="kind"):
        noisy_labels(np.arange(10), 0.2, kind="pairflip")


def test_noise_applied_twice_is_refused(digits):
    with pytest.raises(ValueError, match="twice"):
        add_label_noise(add_label_noise(digits["train"], 0.1), 0.1)


def test_shifts_transform_images_as_defined():
    images, _ = digits_arrays()
    images = images[:20]
    np.testing.assert_array_equal(shift_images(shift_images(images, "invert"), "invert"), images)
    # A quarter turn maps pixel centres onto pixel centres: bilinear rotation is exact rot90.
    np.testing.assert_allclose(
        shift_images(images, "rotate", severity=2.0), np.rot90(images, k=1, axes=(1, 2)), atol=1e-5
    )
    np.testing.assert_allclose(shift_images(images, "scale", severity=0.0), images, atol=1e-6)
    noisy = shift_images(images, "noise", seed=1)
    np.testing.assert_array_equal(noisy, shift_images(images, "noise", seed=1))
    assert 0.1 < np.abs(noisy - images).mean() < 0.3
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0


def test_shift_digits_keeps_labels_and_works_on_vectors(digits):
    inverted = shift_digits(digits["test"], "invert")
    assert inverted["labels"] == digits["test"]["labels"]
    np.testing.assert_allclose(
        np.asarray(inverted["pixel_values"]), 1.0 - np.asarray(digits["test"]["pixel_values"])
    )
    vectors = load_digits(seed=0, layout="vector")["test"]
    rotated = np.asarray(shift_digits(vectors, "rotate", severity=2.0)["features"])
    expected = np.rot90(np.asarray(vectors["features"]).reshape(-1, 8, 8), axes=(1, 2))
    np.testing.assert_allclose(rotated, expected.reshape(-1, 64), atol=1e-5)


def test_shifted_domains_keep_source_and_draw_independent_noise(digits):
    domains = shifted_domains(digits, {"source": "none", "a": "noise", "b": "noise"})
    assert domains["source"] is digits
    a = np.asarray(domains["a"]["test"]["pixel_values"])
    b = np.asarray(domains["b"]["test"]["pixel_values"])
    assert not np.array_equal(a, b)


def test_class_incremental_stream_partitions_the_classes(digits):
    stream = class_incremental_stream(digits, num_tasks=5, seed=0)
    assert len(stream) == 5
    classes = [c for task_classes in stream.task_classes for c in task_classes]
    assert sorted(classes) == list(range(10))
    assert classes != list(range(10))  # seeded permutation
    total = 0
    for task_id, (task, task_classes) in enumerate(zip(stream, stream.task_classes)):
        for split in ("train", "validation", "test"):
            assert set(task[split]["labels"]) == set(task_classes)
            assert set(task[split]["task_id"]) == {task_id}
        total += len(task["train"])
    assert total == len(digits["train"])
    assert len(stream.seen(1)) == len(stream[0]["test"]) + len(stream[1]["test"])
    ordered = class_incremental_stream(digits, num_tasks=2, classes_per_task=3)
    assert ordered.task_classes == [[0, 1, 2], [3, 4, 5]]


def test_stream_validation(digits):
    with pytest.raises(ValueError, match="classes"):
        class_incremental_stream(digits, num_tasks=4, classes_per_task=3)
    with pytest.raises(ValueError, match="class_order"):
        class_incremental_stream(digits, num_tasks=2, class_order=[0, 0, 1, 2])
