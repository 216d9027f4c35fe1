"""Label trees, class mixtures, OT class distances and (Γ-weighted) SupCon (hf_extensions.hierarchical_cl.taxonomy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_extensions.data import digits_arrays
from hf_extensions.hierarchical_cl.taxonomy import ClassDistances, LabelTree, fit_class_mixture

TREE = {
    "round": {"loops": ["zero", "six", "eight", "nine"], "open": ["two", "three", "five"]},
    "straight": ["one", "four", "seven"],
}
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NAMES = {name: i for i, name in enumerate(DIGIT_NAMES)}


def test_leaf_groups_come_from_the_nested_dict_and_grow_with_the_stream():
    tree = LabelTree(TREE, NAMES)
    assert tree.leaf_groups() == [[0, 6, 8, 9], [2, 3, 5], [1, 4, 7]]
    assert tree.group_names == ["round/loops", "round/open", "straight"]
    assert tree.leaf_groups(classes=[0, 1, 2, 3]) == [[0], [2, 3], [1]]
    assert tree.leaf_groups(classes=[4, 7]) == [[4, 7]]


def test_label_tree_refuses_duplicates_unknown_names_and_bad_nodes():
    with pytest.raises(ValueError, match="appears in leaf groups"):
        LabelTree({"a": [1, 2], "b": {"c": [2]}})
    with pytest.raises(ValueError, match="unknown class 'ten'"):
        LabelTree({"a": ["ten"]}, NAMES)
    with pytest.raises(ValueError, match="mapping or a list"):
        LabelTree({"a": 3})


def test_tree_from_embeddings_groups_close_class_means():
    means = {0: np.array([1.0, 0.0]), 1: np.array([0.99, 0.1]), 2: np.array([0.0, 1.0])}
    tree = LabelTree.from_embeddings(means, num_groups=2)
    assert sorted(tree.leaf_groups()) == [[0, 1], [2]]


@pytest.fixture(scope="module")
def digit_mixtures():
    images, labels = digits_arrays()
    x = images.reshape(len(images), -1).astype(np.float64) / 16.0
    return {c: fit_class_mixture(x[labels == c], num_components=5, seed=0) for c in (0, 1, 3, 8)}


def test_emd_matrix_is_symmetric_zero_diagonal_and_closer_for_look_alike_digits(digit_mixtures):
    distances = ClassDistances(num_samples=150, seed=0)
    w = distances.matrix(digit_mixtures, num_classes=10)
    assert torch.equal(w, w.T)
    assert torch.all(w.diagonal() == 0)
    assert w[3, 8] < w[0, 1], (w[3, 8], w[0, 1])
    solves = distances.solves
    assert solves == 6  # one per unordered pair
    distances.matrix(digit_mixtures, num_classes=10)
    assert distances.solves == solves  # cached
    gamma = distances.gamma(digit_mixtures, 10, delta=100.0)
    assert torch.allclose(gamma, torch.exp(-w / 100.0))
    assert gamma[3, 8] > gamma[0, 1]


def test_sinkhorn_approximates_the_exact_distance(digit_mixtures):
    exact = ClassDistances(num_samples=100, seed=1).distance(3, 8, digit_mixtures)
    approx = ClassDistances(num_samples=100, seed=1, solver="sinkhorn", sinkhorn_reg=0.01)
    value = approx.distance(3, 8, digit_mixtures)
    assert value >= exact * 0.999  # entropic OT upper-bounds the exact cost
    assert value == pytest.approx(exact, rel=0.15)


def test_mixture_samples_match_the_class_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=[3.0, -1.0], scale=[0.5, 2.0], size=(4000, 2))
    mixture = fit_class_mixture(x, num_components=1)
    draws = mixture.sample(20000, torch.Generator().manual_seed(0))
    assert torch.allclose(draws.mean(0), torch.tensor([3.0, -1.0]), atol=0.05)
    assert torch.allclose(draws.std(0), torch.tensor([0.5, 2.0]), atol=0.05)
