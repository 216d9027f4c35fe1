"""Supervised contrastive terms of the hierarchical-taxonomy method, fused into one pass.

Tran et al., "Leveraging Hierarchical Taxonomies in Prompt-based Continual Learning" (arXiv
2410.04327), Sec. 4: a global SupCon term over current and replayed features, and ``L_sub``,
SupCon within each leaf group of the label tree with the similarity logits weighted by
``Γ = exp(−W/δ)`` (:meth:`hf_extensions.hierarchical_cl.taxonomy.ClassDistances.gamma`). SupCon is Khosla et al.,
NeurIPS 2020, "L_out" (Eq. 2), averaged over positive pairs as the official code does.

Each term is a masked softmax cross-entropy over the same cosine similarities
``u_ab = <z_a, z_b>`` (``z`` the L2-normalised features) with logits ``c_ab · u_ab``
(``c = Γ[y_a, y_b] / τ``, or ``1/τ``). :class:`SupConTerms` computes ``u`` once for all terms
and gives them an analytic backward (:class:`_SharedSimilaritySupCon`); the step of a training
loop pays a few passes over ``[K, N, N]`` instead of an autograd graph per term (on the
benchmark's tiny ViT the two terms went from +31% of a training step to +5-10%):

* the log-partition part ``Σ_a r_a log Σ_b m_ab exp(c_ab u_ab)`` (``m`` the softmax mask, ``r_a``
  the anchor's total pair weight) has ``∂/∂u_ab = r_a · softmax_ab · c_ab``;
* the positive-pair part needs no ``[N, N]`` work: positives share a label, so
  ``c_ab = c_yy`` and ``Σ_{a≠b, y_a=y_b=y} u_ab = |S_y|² − n_y`` with ``S_y`` the sum of the
  class's ``z`` (gradient ``2 S_y``);
* ``∂/∂z = (G + Gᵀ) z`` and the normalisation's Jacobian.

The tests check values against per-pair loops, gradients by finite differences and against the
same loss through autograd.

Departures from the official code: the anchor is excluded from its own softmax denominator (as
in SupCon; the official ``supervised_contrastive_loss`` keeps it; ``include_self=True``
restores it), Γ is indexed vectorised instead of by a Python double loop, and the groups are
one masked pass instead of a loop over groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from hf_extensions.validation import check_integer, check_positive, refuse

__all__ = [
    "SupConTerms",
    "grouped_supervised_contrastive_loss",
    "hierarchical_supcon_losses",
    "supervised_contrastive_loss",
]

# exp(-_SAFE_RANGE) is far above float32's smallest normal: with logits in [-L, L] and
# 2L <= _SAFE_RANGE, shifting by the constant L never underflows an allowed entry
_SAFE_RANGE = 40.0


class _SharedSimilaritySupCon(torch.autograd.Function):
    """``K`` SupCon-type terms over one cosine-similarity matrix, with the backward by hand.

    Term ``k``: ``Σ_a r_ka log Σ_b allowed_kab exp(scale_kab u_ab − shift) − Σ_c h_kc |S_c|²
    + constant_k`` (``r``, ``h``, ``constant`` from :meth:`SupConTerms._batch_weights`).
    ``scale``, ``allowed`` (0/1) ``[K, N, N]``; ``r`` and ``h_{k, y_a}`` ``[K, N]``; ``h``
    ``[K, C]``; ``constant`` ``[K]``: none carries a gradient. The softmax is shifted by the
    constant ``shift`` bounding ``|scale · u|`` (``None``: by each row's allowed maximum, for
    tiny temperatures); ``include_self=False`` drops the diagonal from the denominators.
    Exponentials of the excluded entries are zeroed after ``exp`` rather than exponentiating
    −inf (CPU ``exp`` is several times slower on it). Differentiable once (no double backward).
    """

    @staticmethod
    def forward(ctx, features, labels, scale, allowed, weights, shift, include_self):
        row_weight, anchor_h, class_h, constant = weights
        norm = features.norm(dim=1, keepdim=True).clamp_min(1e-12)  # as F.normalize
        z = features / norm
        similarity = z @ z.T
        if shift is not None:
            shifted = torch.addcmul(similarity.new_tensor(-shift), similarity, scale)
        else:
            logits = similarity * scale
            mask = allowed.clone()
            if not include_self:
                mask.diagonal(dim1=1, dim2=2).zero_()
            row_max = logits.masked_fill(mask == 0, float("-inf")).amax(dim=2, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            shifted = logits - row_max
            constant = constant + (row_weight * row_max[:, :, 0]).sum(dim=1)
        exp = shifted.exp_()
        if not include_self:
            exp.diagonal(dim1=1, dim2=2).zero_()
        total = exp.mul_(allowed).sum(dim=2).clamp_min_(torch.finfo(exp.dtype).tiny)
        class_sums = z.new_zeros(class_h.shape[1], z.shape[1]).index_add_(0, labels, z)
        log_partition = torch.linalg.vecdot(total.log(), row_weight)
        losses = log_partition - class_h @ class_sums.square().sum(dim=1) + constant
        if ctx.needs_input_grad[0]:
            ctx.slope = exp.mul_((row_weight / total)[:, :, None]).mul_(scale)  # ∂/∂u_ab
            ctx.save_for_backward(z, norm, labels, class_sums, anchor_h)
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses):
        z, norm, labels, class_sums, anchor_h = ctx.saved_tensors
        k, n, _ = ctx.slope.shape
        grad_similarity = (grad_losses[None] @ ctx.slope.view(k, n * n)).view(n, n)
        grad_z = (grad_similarity + grad_similarity.T) @ z
        # positive pairs: ∂|S_y|²/∂z_a = 2 S_y (the −n_y and any radial part vanish below)
        positive_weight = 2.0 * (grad_losses @ anchor_h)[:, None]
        grad_z = grad_z - positive_weight * class_sums.index_select(0, labels)
        radial = torch.linalg.vecdot(z, grad_z)[:, None]  # the normalisation's Jacobian
        return torch.addcmul(grad_z, z, radial, value=-1.0).div_(norm), *(None,) * 6


class SupConTerms:
    """SupCon-type terms with their class-level tables built once, applied to many batches.

    Args:
        num_classes: ``C``, larger than every label and group class.
        terms: ``(kind, scaled)`` pairs; ``kind`` is ``"global"`` (the softmax over every other
            sample, the loss averaged over all positive pairs: SupCon) or ``"groups"`` (the
            softmax over the anchor's leaf group only, each group's mean over its positive
            pairs, averaged over the groups: the paper's ``L_sub``; classes in no group are
            ignored); ``scaled``: Γ weights the term's logits.
        groups: leaf groups of class ids (needed by a ``"groups"`` term).
        gamma: ``Γ`` ``[C, C]`` (needed by a scaled term).
        temperature: τ.
        include_self: keep the anchor in its own softmax denominator (the official code).

    Calling it with ``features`` ``[N, D]`` and ``labels`` ``[N]`` returns the ``[K]`` losses
    (computed in float32 for half-precision features).
    Positives are pairs of one label other than the anchor itself. The ``[K, N, N]`` logit
    scales and masks are two gathers from stacked ``[C, C]`` tables; the pair weights
    (``1 / #positive pairs`` of the term's pool) come from per-class counts, computed where the
    labels live (no host copy per batch; on an accelerator, an out-of-range label is a
    device-side error of the count's ``index_add_`` rather than this class's ``ValueError``).
    """

    def __init__(
        self,
        num_classes: int,
        terms: Sequence[tuple[str, bool]],
        groups: Sequence[Sequence[int]] | None = None,
        gamma: torch.Tensor | None = None,
        temperature: float = 0.1,
        include_self: bool = False,
    ):
        check_positive("temperature", temperature)
        kinds = [kind for kind, _ in terms]
        if not kinds or set(kinds) - {"global", "groups"}:
            refuse("terms", "('global' | 'groups', scaled) pairs", terms)
        largest = max([max(g) for g in groups or [] if g] + [-1])
        num_classes = check_integer("num_classes", num_classes, low=0)
        if num_classes <= largest:
            refuse(
                "num_classes",
                f"greater than every class in `groups` (up to {largest})",
                num_classes,
            )
        scaled = [flag for _, flag in terms]
        if any(scaled) and (gamma is None or tuple(gamma.shape) != (num_classes, num_classes)):
            got = None if gamma is None else tuple(gamma.shape)
            refuse("gamma", f"of shape [C, C] with C = {num_classes} for a scaled term", got)
        if "groups" in kinds and not groups:
            refuse("groups", "non-empty for a 'groups' term", groups)
        self.num_classes, self.include_self = num_classes, include_self
        membership = np.zeros((num_classes, len(groups or [])))  # class -> group one-hot
        for index, group in enumerate(groups or []):
            membership[list(group), index] = 1.0
        everyone = np.ones((num_classes, num_classes))
        same_group = membership @ membership.T
        # pair weight of an anchor of class c: member_c / (pool @ class_pairs)_c, i.e.
        # 1 / #positive pairs of all classes (global) or of c's group · #groups (groups)
        pool = np.stack([everyone if k == "global" else same_group * len(groups) for k in kinds])
        member = np.stack(
            [np.ones(num_classes) if k == "global" else same_group.diagonal() for k in kinds]
        )
        # host: once per task, the class tables are built in numpy from Γ
        gamma_table = gamma.detach().double().cpu().numpy() if any(scaled) else everyone
        scales = np.stack([(gamma_table if flag else everyone) / temperature for flag in scaled])
        allowed = np.stack([everyone if k == "global" else same_group for k in kinds])
        diagonal_scale = np.stack([s.diagonal() for s in scales])  # logit scale of positives
        self.tables = torch.from_numpy(np.concatenate([scales, allowed]))
        # member [K, C], pool [K, C, C], diagonal scale [K, C], moved once per device
        self.class_tables = tuple(
            torch.from_numpy(np.ascontiguousarray(t)) for t in (member, pool, diagonal_scale)
        )
        bound = float(np.abs(scales).max())
        self.shift = bound if 2 * bound <= _SAFE_RANGE else None
        self._cast: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _batch_weights(self, labels: torch.Tensor, tables) -> torch.Tensor:
        """``[K, 2N + C + 1]``: per anchor ``r`` and ``h_{y_a}``, per class ``h``, a constant.

        ``f_kc`` is the weight of one positive pair of an anchor of class ``c``; ``r_ka =
        f_k,y_a (n_{y_a} − 1)`` an anchor's total; ``h_kc = f_kc · scale_k,cc`` weights the
        positive-pair similarities ``|S_c|² − n_c``; the constant gathers ``Σ_c h_kc n_c`` and,
        with a constant shift, ``shift · Σ_a r_ka``.
        """
        member, pool, diagonal_scale = tables
        ones = torch.ones(labels.shape, dtype=member.dtype, device=labels.device)
        counts = member.new_zeros(self.num_classes).index_add_(0, labels, ones)
        class_pairs = counts * (counts - 1)  # 0 for a class without positives: weight 0
        pair_weight = member * (class_pairs > 0) / (pool @ class_pairs).clamp_min(1.0)
        class_h = pair_weight * diagonal_scale
        class_r = pair_weight * (counts - 1)
        constant = (class_h + (self.shift or 0.0) * class_r) @ counts
        per_anchor = torch.cat([class_r, class_h])[:, labels]
        k = len(member)
        return torch.cat([per_anchor[:k], per_anchor[k:], class_h, constant[:, None]], dim=1)

    def __call__(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or labels.shape != features.shape[:1]:
            raise ValueError(
                f"features must be [N, D] and labels [N], got {tuple(features.shape)} and "
                f"{tuple(labels.shape)}."
            )
        index = labels.detach().long()
        on_host = index.device.type == "cpu" and len(index) > 0  # checked free on the host only
        if on_host and (index.max() >= self.num_classes or index.min() < 0):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.tolist()}.")
        if features.dtype in (torch.float16, torch.bfloat16):
            features = features.float()  # the softmax sums and pair weights need fp32's range
        like = features.detach()
        index = index.to(like.device)
        key = (like.dtype, like.device)
        if key not in self._cast:
            # float64 for the pair weights where the device has it (MPS has not)
            exact = torch.float32 if like.device.type == "mps" else torch.float64
            class_tables = tuple(t.to(like.device, exact) for t in self.class_tables)
            self._cast[key] = (self.tables.to(like), class_tables)
        tables, class_tables = self._cast[key]
        n, c, k = len(index), self.num_classes, len(self.class_tables[0])
        packed = self._batch_weights(index, class_tables).to(like)
        weights = packed.split([n, n, c, 1], dim=1)
        pairs = tables.index_select(2, index).index_select(1, index)
        return _SharedSimilaritySupCon.apply(
            features,
            index,
            pairs[:k],
            pairs[k:],
            (weights[0], weights[1], weights[2], weights[3][:, 0]),
            self.shift,
            self.include_self,
        )


def _apply_once(features, labels, terms, groups, gamma, temperature, include_self):
    """The functional forms: :class:`SupConTerms` over ``C`` = Γ's size (else the largest label
    or group class + 1), applied to one batch."""
    largest = max([int(labels.max()) if len(labels) else 0] + [max(g) for g in groups or [] if g])
    if gamma is not None and (gamma.dim() != 2 or gamma.shape[0] <= largest):
        raise ValueError(
            f"gamma must be [C, C] over every label and group class (up to {largest}), got "
            f"{tuple(gamma.shape)}."
        )
    num_classes = largest + 1 if gamma is None else gamma.shape[0]
    supcon = SupConTerms(num_classes, terms, groups, gamma, temperature, include_self)
    return supcon(features, labels)


def supervised_contrastive_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    gamma: torch.Tensor | None = None,
    include_self: bool = False,
) -> torch.Tensor:
    """SupCon over L2-normalised ``features`` ``[N, D]`` with optional Γ-weighted logits.

    ``s_ab = Γ[y_a, y_b] · <z_a, z_b> / τ``; the loss is the mean over positive pairs
    ``(a, p)`` (same label, ``a ≠ p``) of ``−log softmax_a(s)_p``, the softmax over ``b ≠ a``
    (``include_self=True``: over all ``b``, as the official code does). Γ = 1 is plain SupCon.
    Returns 0 (with a zero gradient) when no positive pair exists.
    """
    terms = [("global", gamma is not None)]
    return _apply_once(features, labels, terms, None, gamma, temperature, include_self)[0]


def grouped_supervised_contrastive_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    groups: Sequence[Sequence[int]],
    temperature: float = 0.1,
    gamma: torch.Tensor | None = None,
    include_self: bool = False,
) -> torch.Tensor:
    """The paper's ``L_sub``: SupCon within each leaf group, summed and divided by the groups.

    One masked pass: each row's softmax runs over its own group only (equal to calling
    :func:`supervised_contrastive_loss` on each group's samples, which the tests check). Groups
    with fewer than two samples (or no positive pair) in the batch contribute 0 but still count
    in the denominator (as in the official ``subsup_loss``). Samples of classes outside every
    group are ignored.
    """
    if not groups:
        refuse("groups", "non-empty", groups)
    terms = [("groups", gamma is not None)]
    return _apply_once(features, labels, terms, groups, gamma, temperature, include_self)[0]


def hierarchical_supcon_losses(
    features: torch.Tensor,
    labels: torch.Tensor,
    groups: Sequence[Sequence[int]],
    temperature: float = 0.1,
    gamma: torch.Tensor | None = None,
    include_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(global SupCon, Γ-weighted ``L_sub``) of the same features in one pass.

    Equal to ``supervised_contrastive_loss(features, labels, temperature)`` and
    ``grouped_supervised_contrastive_loss(features, labels, groups, temperature, gamma)``,
    sharing the similarity matrix and the backward. For many batches over the same groups,
    build a :class:`SupConTerms` once instead.
    """
    terms = [("global", False), ("groups", gamma is not None)]
    glob, sub = _apply_once(features, labels, terms, groups, gamma, temperature, include_self)
    return glob, sub
