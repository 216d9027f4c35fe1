"""The EAP adversary: candidate concepts and the Gumbel-softmax search over them.

Bui et al., "Erasing Undesirable Concepts in Diffusion Models with Adversarial Preservation"
(NeurIPS 2024, arXiv 2410.15618), Sec. 4.2. The adversarial concept
``c_a = argmax_{c in C} || ε_θ'(z_c, c) − ε_θ(z_c, c) ||²`` is searched over a fixed set C of
real words, not over continuous embeddings (which collapse to background concepts, Sec. 4.1):

1. :func:`select_candidates`: embed every word of a vocabulary with the text encoder, keep the
   ``k_closest`` by L2 distance to the target concept's embedding (default: the closest third,
   the paper's 1000 of 3000 words; the target word itself stays in when the vocabulary holds it,
   as in the official code, unless ``exclude_target``), then pick ``num_centers``
   of them spread over that distance range by 1-D k-means (scikit-learn) on the distances: one
   word per cluster, the member closest to the cluster's centre;
2. :class:`GumbelAdversary`: learnable logits π over C (uniform start), a straight-through
   Gumbel-softmax sample ``y = onehot(argmax((π + g)/τ)) − stopgrad(s) + s`` with
   ``s = softmax((π + g)/τ)`` and Gumbel noise g (Jang et al. 2017), and
   ``c_a = Σ_k y_k e_k`` over the candidates' embeddings e_k; the logits ascend L_preserve.

Departure from the official code: the Gumbel noise comes from a seeded ``torch.Generator`` so
that a run is reproducible (the official code draws from the global RNG); the maths is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "CandidateSet",
    "GumbelAdversary",
    "gumbel_noise",
    "gumbel_softmax",
    "select_candidates",
]


@dataclass
class CandidateSet:
    """The adversary's candidates for one target concept.

    ``words`` and ``distances`` (L2 text-encoder distance to the target) are sorted by distance;
    ``closest`` are the ``k_closest`` words the k-means ran over (the pool held-out words can
    be drawn from).
    """

    target: str
    words: list[str]
    distances: list[float]
    closest: list[str]


def select_candidates(
    target: str,
    target_embedding: torch.Tensor,
    words: Sequence[str],
    word_embeddings: torch.Tensor,
    k_closest: int | None,
    num_centers: int,
    seed: int = 0,
    exclude_target: bool = False,
) -> CandidateSet:
    """Rank ``words`` by text-encoder distance to ``target`` and spread ``num_centers`` of them.

    Args:
        target_embedding: the target prompt's text-encoder output ``[L, D]``.
        word_embeddings: the words' outputs ``[N, L, D]`` (same encoder and padding).
        k_closest: how many closest words to keep (clipped to ``N``); `None`: the closest third
            (the paper's 1000 of 3000 words), at least ``num_centers``.
        num_centers: how many to select by 1-D k-means over the kept distances (clipped to the
            number of distinct distances, so k-means never asks for more clusters than points).
        exclude_target: drop a word equal to the target (same text after stripping and
            lower-casing). The official code keeps it (`False`, the default): the target is then
            the closest word (distance 0) and usually one of the spread candidates.
    """
    from sklearn.cluster import KMeans

    if word_embeddings.shape[0] != len(words):
        raise ValueError(
            f"{len(words)} words but {word_embeddings.shape[0]} embeddings were given."
        )
    keep = list(range(len(words)))
    if exclude_target:
        keep = [i for i in keep if words[i].strip().lower() != target.strip().lower()]
    if not keep:
        raise ValueError("No candidate word is left once the target itself is removed.")
    if k_closest is None:
        k_closest = max(num_centers, round(len(keep) / 3))
    flat = word_embeddings[keep].flatten(1).double()
    # host: scikit-learn's boundary (k-means over the vocabulary), once
    distances = (flat - target_embedding.flatten().double()).norm(dim=1).cpu().numpy()
    order = np.argsort(distances, kind="stable")[: min(k_closest, len(keep))]
    pool = distances[order]
    clusters = min(num_centers, len(np.unique(pool)))
    kmeans = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(pool[:, None])
    chosen = []
    for cluster, centre in enumerate(kmeans.cluster_centers_[:, 0]):
        members = np.flatnonzero(kmeans.labels_ == cluster)
        chosen.append(members[np.argmin(np.abs(pool[members] - centre))])
    chosen = sorted(chosen, key=lambda j: (pool[j], j))
    return CandidateSet(
        target=target,
        words=[words[keep[order[j]]] for j in chosen],
        distances=[float(pool[j]) for j in chosen],
        closest=[words[keep[i]] for i in order],
    )


def gumbel_noise(shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise ``g = −log(−log u)``, ``u ~ U(0, 1)`` (float64, CPU)."""
    # host: float64 Gumbel noise from the cycle's host generator (the same on every rank); the caller moves it
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    return -torch.log(-torch.log(uniform))


def gumbel_softmax(
    logits: torch.Tensor,
    temperature: float,
    hard: bool = True,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """A Gumbel-softmax sample over the last axis (Jang et al. 2017), straight-through if ``hard``.

    ``s = softmax((logits + g) / τ)`` with ``g = −log(−log u)``, ``u ~ U(0, 1)``; hard: the
    one-hot of ``argmax s`` in the forward pass with the gradient of ``s`` in the backward pass.
    ``torch.nn.functional.gumbel_softmax`` computes the same but takes no generator. Pass
    ``noise`` (from :func:`gumbel_noise`) to redo a draw with other logits.
    """
    if noise is None:
        noise = gumbel_noise(logits.shape, generator)
    noise = noise.to(device=logits.device, dtype=logits.dtype)
    soft = torch.softmax((logits + noise) / temperature, dim=-1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


class GumbelAdversary(torch.nn.Module):
    """Learnable logits over fixed candidate embeddings; a sample mixes them into c_a.

    Paper Sec. 4.2 (Eq. 8): c_a = Σ_k y_k e_k with y a hard Gumbel-softmax sample of the
    logits, which start uniform (zeros here; the official code starts at 1/K, the same
    distribution). The logits are trained by *ascending* the preservation loss.
    """

    def __init__(
        self,
        candidates: CandidateSet,
        embeddings: torch.Tensor,
        temperature: float = 2.0,
        hard: bool = True,
    ) -> None:
        super().__init__()
        if embeddings.shape[0] != len(candidates.words):
            raise ValueError(
                f"{len(candidates.words)} candidates but {embeddings.shape[0]} embeddings."
            )
        self.candidates = candidates
        self.temperature = temperature
        self.hard = hard
        # host: initialised on the host; the eraser moves the adversaries to its device
        self.logits = torch.nn.Parameter(torch.zeros(len(candidates.words)))
        self.register_buffer("embeddings", embeddings.detach().clone(), persistent=False)

    def sample(
        self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weights [K], embedding [L, D], gumbel noise [K])`` of one draw (differentiable).

        Give the ``noise`` of an earlier draw to redo that draw with the current logits.
        """
        if noise is None:
            noise = gumbel_noise(self.logits.shape, generator)
        weights = gumbel_softmax(self.logits, self.temperature, self.hard, noise=noise)
        mixed = torch.einsum("k,k...->...", weights.to(self.embeddings.dtype), self.embeddings)
        return weights, mixed, noise

    def argmax_word(self) -> str:
        """The candidate the logits favour now (the adversarial concept found)."""
        return self.candidates.words[int(self.logits.argmax())]

    def probabilities(self) -> dict[str, float]:
        """softmax(logits) by candidate word."""
        # host: a report, read when asked
        probs = torch.softmax(self.logits.detach().float(), dim=0).tolist()
        return dict(zip(self.candidates.words, probs))
