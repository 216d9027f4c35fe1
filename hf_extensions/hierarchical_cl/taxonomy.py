"""Label taxonomies and optimal-transport class relations for continual learning.

Tran et al., "Leveraging Hierarchical Taxonomies in Prompt-based Continual Learning" (arXiv
2410.04327; official code tranquyenbk173/HierC on HiDe-Prompt). Classes that share a leaf of a
label tree are the confusable groups a new task is likely to overwrite; the method pulls them
apart with supervised contrastive terms weighted by how close the classes are in the ORIGINAL
pretrained feature space, measured by optimal transport:

* :class:`LabelTree`: a (growing) taxonomy from a nested dict / JSON (inner nodes are dicts,
  leaves are lists of class names or ids), or built from class-mean embeddings by agglomerative
  clustering when the user has none (our addition, not the paper's);
* :class:`ClassMixture` / :func:`fit_class_mixture`: a class's features summarised by k-means
  centroids with per-cluster diagonal variances (the stored statistics of HiDe-Prompt's
  "multi-centroid" option), sampled for pseudo-feature replay;
* :class:`ClassDistances`: ``W_ij``, the earth mover's distance (POT ``ot.emd2`` on the squared
  Euclidean ``ot.dist``) between samples of two class mixtures, cached per pair; Sinkhorn
  (``ot.sinkhorn2``) as an option; ``Γ = exp(−W/δ)`` (:meth:`ClassDistances.gamma`).

The supervised contrastive terms that use Γ live in :mod:`hf_extensions.hierarchical_cl.supcon`.

Departure from the official code: the diagonal of ``W`` is exactly 0 (a distribution's distance
to itself) rather than a sampled estimate.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ot
import torch
from sklearn.cluster import AgglomerativeClustering, KMeans

from hf_extensions.seeding import keyed_generator
from hf_extensions.validation import check_choice, check_integer, check_positive

__all__ = [
    "DIGITS_TAXONOMY",
    "ClassDistances",
    "ClassMixture",
    "LabelTree",
    "fit_class_mixture",
]

#: A hand-written look-alike taxonomy of the ten digits (superclasses of similar shapes), for
#: the digits setting of the recipe and the benchmark.
DIGITS_TAXONOMY = Path(__file__).with_name("digits_taxonomy.json")

OT_SOLVERS = ("emd", "sinkhorn")


class LabelTree:
    """A label taxonomy: nested groups whose leaves list classes.

    Args:
        tree: nested mapping; an inner node maps names to sub-trees, a leaf group is a list of
            class names or integer ids, e.g. ``{"round": {"loops": ["0", "6", "8", "9"]},
            "straight": ["1", "4", "7"]}``.
        class_names: maps names in the tree to class ids (``None``: the leaves hold ids, or
            strings of ids).

    A class may appear in one leaf only. :meth:`leaf_groups` gives the confusable groups as
    lists of ids, optionally restricted to the classes seen so far (the tree "grows" with the
    stream as its classes arrive).
    """

    def __init__(self, tree: Mapping[str, Any], class_names: Mapping[str, int] | None = None):
        if not isinstance(tree, Mapping) or not tree:
            raise ValueError(f"`tree` must be a non-empty nested mapping, got {tree!r}.")
        self.tree = tree
        self.class_names = dict(class_names or {})
        self._groups: list[tuple[str, list[int]]] = []
        self._collect(tree, prefix="")
        seen: dict[int, str] = {}
        for name, ids in self._groups:
            for i in ids:
                if i in seen:
                    raise ValueError(f"class {i} appears in leaf groups {seen[i]!r} and {name!r}.")
                seen[i] = name

    def _class_id(self, label: Any) -> int:
        if isinstance(label, bool):
            raise ValueError(f"a class label must be a name or an int, got {label!r}.")
        if isinstance(label, int):
            return label
        if isinstance(label, str):
            if label in self.class_names:
                return int(self.class_names[label])
            if label.lstrip("-").isdigit():
                return int(label)
        raise ValueError(
            f"unknown class {label!r}: give `class_names` mapping it to an id "
            f"(known names: {sorted(self.class_names)[:10]}...)."
        )

    def _collect(self, node: Mapping[str, Any], prefix: str) -> None:
        for name, child in node.items():
            path = f"{prefix}/{name}" if prefix else str(name)
            if isinstance(child, Mapping):
                self._collect(child, path)
            elif isinstance(child, (list, tuple)):
                self._groups.append((path, [self._class_id(label) for label in child]))
            else:
                raise ValueError(
                    f"taxonomy node {path!r} must be a mapping or a list of classes, got "
                    f"{type(child).__name__}."
                )

    @classmethod
    def from_json(cls, path: str | Path, class_names: Mapping[str, int] | None = None) -> LabelTree:
        """Read the nested mapping from a JSON file."""
        return cls(json.loads(Path(path).read_text()), class_names)

    @classmethod
    def from_embeddings(
        cls,
        class_means: Mapping[int, np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
        num_groups: int,
        linkage: str = "average",
    ) -> LabelTree:
        """A one-level tree from class-mean embeddings by agglomerative clustering (cosine).

        Our addition for users without a taxonomy (the paper writes its trees by hand or with an
        LLM): classes whose frozen-model means are close share a leaf group.
        """
        if isinstance(class_means, Mapping):
            ids = sorted(class_means)
            # host: taxonomy from class means: scikit-learn's boundary, once per task
            means = np.stack([np.asarray(torch.as_tensor(class_means[i]).cpu()) for i in ids])
        else:
            # host: as above
            means = np.asarray(torch.as_tensor(class_means).cpu())
            ids = list(range(len(means)))
        if not 1 <= num_groups <= len(ids):
            raise ValueError(f"`num_groups` must be in [1, {len(ids)}], got {num_groups}.")
        if num_groups == len(ids):
            assignment = np.arange(len(ids))
        elif num_groups == 1:
            assignment = np.zeros(len(ids), dtype=int)
        else:
            model = AgglomerativeClustering(n_clusters=num_groups, metric="cosine", linkage=linkage)
            assignment = model.fit_predict(means)
        tree = {
            f"group_{g}": [int(ids[i]) for i in np.flatnonzero(assignment == g)]
            # host: scikit-learn's cluster ids
            for g in sorted(set(assignment.tolist()))
        }
        return cls(tree)

    @classmethod
    def from_coarse_labels(
        cls,
        fine: Sequence[int] | np.ndarray,
        coarse: Sequence[int] | np.ndarray,
        coarse_names: Sequence[str] | None = None,
    ) -> LabelTree:
        """A one-level tree from a dataset's coarse labels (e.g. CIFAR-100's 20 superclasses).

        Each fine class goes to the leaf of its coarse label; a fine class seen under two coarse
        labels is refused.
        """
        fine, coarse = np.asarray(fine), np.asarray(coarse)
        if fine.shape != coarse.shape or fine.ndim != 1:
            raise ValueError(
                f"fine and coarse labels must be 1-D of one length, got {fine.shape}, {coarse.shape}."
            )
        parent: dict[int, int] = {}
        # host: label bookkeeping from host arrays, once
        for f, c in zip(fine.tolist(), coarse.tolist()):
            if parent.setdefault(int(f), int(c)) != int(c):
                raise ValueError(f"fine class {f} appears under coarse labels {parent[f]} and {c}.")
        tree: dict[str, list[int]] = {}
        for f, c in sorted(parent.items()):
            name = coarse_names[c] if coarse_names is not None else f"coarse_{c}"
            tree.setdefault(name, []).append(f)
        return cls(tree)

    def leaf_groups(self, classes: Iterable[int] | None = None) -> list[list[int]]:
        """Leaf groups as id lists, restricted to ``classes`` when given (empty groups dropped)."""
        keep = None if classes is None else {int(c) for c in classes}
        groups = [[i for i in ids if keep is None or i in keep] for _, ids in self._groups]
        return [g for g in groups if g]

    @property
    def group_names(self) -> list[str]:
        """Paths (``"parent/leaf"``) of the leaf groups, in :meth:`leaf_groups` order."""
        return [name for name, _ in self._groups]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.tree))


@dataclass
class ClassMixture:
    """A class's features as a mixture of diagonal Gaussians at k-means centroids.

    ``means`` ``[K, D]``, ``variances`` ``[K, D]``, ``weights`` ``[K]`` (share of the class's
    samples in each cluster). :meth:`sample` draws replay pseudo-features.
    """

    means: torch.Tensor
    variances: torch.Tensor
    weights: torch.Tensor

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num_samples`` draws: clusters by weight, then ``mean + sqrt(var) * N(0, I)``."""
        clusters = torch.multinomial(
            self.weights, num_samples, replacement=True, generator=generator
        )
        # host: class mixtures live on the host (fitted by scikit-learn); replay moves draws in chunks
        noise = torch.randn(
            num_samples, self.means.shape[1], generator=generator, dtype=self.means.dtype
        )
        return self.means[clusters] + self.variances[clusters].sqrt() * noise


def fit_class_mixture(
    features: torch.Tensor | np.ndarray, num_components: int = 10, seed: int = 0
) -> ClassMixture:
    """k-means (scikit-learn) mixture of one class's features ``[N, D]``.

    ``num_components`` is capped at ``N``; a cluster's variance is that of its members (0 for a
    singleton, as in HiDe-Prompt's multi-centroid statistics).
    """
    # host: scikit-learn's boundary (k-means), once per class and task
    x = np.asarray(torch.as_tensor(features).detach().cpu(), dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"`features` must be a non-empty [N, D] array, got shape {x.shape}.")
    k = min(num_components, len(x))
    labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x)
    means, variances, weights = [], [], []
    for c in range(k):
        members = x[labels == c]
        if len(members) == 0:
            continue
        means.append(members.mean(0))
        variances.append(members.var(0))
        weights.append(len(members) / len(x))
    return ClassMixture(
        # host: the mixture is kept on the host (see ClassMixture.sample)
        means=torch.tensor(np.stack(means), dtype=torch.float32),
        variances=torch.tensor(np.stack(variances), dtype=torch.float32),
        weights=torch.tensor(weights, dtype=torch.float32),
    )


class ClassDistances:
    """Cached OT distances ``W_ij`` between class mixtures and the weights ``Γ = exp(−W/δ)``.

    Args:
        num_samples: draws per class mixture for the OT problem (the official code draws
            ``5 × batch`` per cluster).
        solver: ``"emd"`` (exact, ``ot.emd2``; the paper's) or ``"sinkhorn"`` (``ot.sinkhorn2``
            with ``sinkhorn_reg`` relative to the cost's mean).
        seed: seeds the draws; each pair uses a generator seeded by ``(seed, i, j)``, so a cached
            entry does not depend on which pairs were computed before it.
    """

    def __init__(
        self,
        num_samples: int = 200,
        solver: str = "emd",
        sinkhorn_reg: float = 0.05,
        seed: int = 0,
    ) -> None:
        check_choice("solver", solver, OT_SOLVERS)
        check_integer("num_samples", num_samples, low=1)
        check_positive("sinkhorn_reg", sinkhorn_reg)
        self.num_samples = num_samples
        self.solver = solver
        self.sinkhorn_reg = sinkhorn_reg
        self.seed = seed
        self.cache: dict[tuple[int, int], float] = {}
        self.solves = 0

    def _samples(self, mixture: ClassMixture, i: int, j: int, which: int) -> np.ndarray:
        generator = keyed_generator(self.seed, i, j, which)
        # host: POT's boundary (numpy inputs), once per class pair
        return mixture.sample(self.num_samples, generator).double().numpy()

    def distance(self, i: int, j: int, mixtures: Mapping[int, ClassMixture]) -> float:
        """``W_ij`` (cached; symmetric; 0 on the diagonal)."""
        if i == j:
            return 0.0
        key = (min(i, j), max(i, j))
        if key not in self.cache:
            a, b = key
            xa = self._samples(mixtures[a], a, b, 0)
            xb = self._samples(mixtures[b], a, b, 1)
            cost = ot.dist(xa, xb)  # squared Euclidean
            wa = np.full(len(xa), 1.0 / len(xa))
            wb = np.full(len(xb), 1.0 / len(xb))
            if self.solver == "emd":
                value = ot.emd2(wa, wb, cost)
            else:
                value = ot.sinkhorn2(wa, wb, cost, self.sinkhorn_reg * cost.mean())
            self.cache[key] = float(value)
            self.solves += 1
        return self.cache[key]

    def matrix(self, mixtures: Mapping[int, ClassMixture], num_classes: int) -> torch.Tensor:
        """``W`` ``[num_classes, num_classes]`` over the classes in ``mixtures`` (others 0)."""
        # host: W is built on the host from POT's floats, once per task; moved by the caller
        w = torch.zeros(num_classes, num_classes)
        ids = sorted(mixtures)
        for x, i in enumerate(ids):
            for j in ids[x + 1 :]:
                w[i, j] = w[j, i] = self.distance(i, j, mixtures)
        return w

    def gamma(
        self, mixtures: Mapping[int, ClassMixture], num_classes: int, delta: float = 100.0
    ) -> torch.Tensor:
        """``Γ = exp(−W / δ)`` (the paper's δ = 100); 1 on the diagonal and for unseen classes."""
        check_positive("delta", delta)
        return torch.exp(-self.matrix(mixtures, num_classes) / delta)
