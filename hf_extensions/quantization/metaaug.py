"""MetaAug's bi-level stage: learn a transformation network T of the calibration images.

Pham et al., "MetaAug: Meta-Data Augmentation for Post-Training Quantization", ECCV 2024
(arXiv 2407.14726), Sec. 3 / Alg. 1. Before the reconstruction of block ``k`` (not the first or
last layer), for ``meta_iterations`` steps:

* **inner** (Eq. 4): ``x' = T(x)``; one differentiable step of the block's quantization
  parameters θ_Q (AdaRound ``V`` and LSQ steps) on the reconstruction loss on ``x'``,
  ``θ̄_Q = θ_Q - η ∇θ [ ||f̂_k(x'_q) - f_k(x'_fp)||^2 + λ R(V) ]``, keeping the graph
  (``torch.autograd.grad(create_graph=True)``), the model then evaluated at θ̄_Q with
  ``torch.func.functional_call`` (the official code uses the archived ``higher`` library);
* **outer** (Eq. 5-7): on the ORIGINAL images
  ``L = a KL(softmax(q_θ̄(x_v)/t) || softmax(fp(x_v)/t)) + b ReLU(τ - mean((x' - x)^2))
  + c PKT(feat_fp(mix(x')), feat_fp(mix(x)))``, ``mix`` with the official code's
  ``λ ~ Beta(4, 4)``, ``max(λ, 1 - λ)`` (:func:`mixup_lambda`), and T takes one Adam step
  (gradient norm clipped).

θ_Q is never updated by this stage (the official code rebuilds its ``higher`` copy every step);
the block is then reconstructed on the union of ``x`` and ``T(x)`` by the base method
(``metaaug_base``: QDrop by default, or BRECQ / Genie-M).

**The inner update, and why its derivative with respect to T is not degenerate.** The inner
step is plain SGD, ``θ̄ = θ - η g(T)`` with ``g = ∇θ L_inner(T(x))``, so T reaches the KL term
only through ``∂θ̄/∂T = -η ∂g/∂T`` (MAML's second-order term): a mixed second derivative that
is not zero and not a sign function; the finite-difference tests check it. The official code's
inner step is Adam, whose first step from a fresh state, ``θ - lr · g / (|g| + ε)``, has
derivative ``lr · ε / (|g| + ε)^2 ≈ 0`` with respect to ``g`` wherever ``|g| ≫ ε``, so it
carries (almost) no meta-gradient. SGD's meta-gradient is not degenerate but small: it scales
with η (1e-2) and with the KL's own gradient, which is what the audit of issue 24 measured
(the KL term's gradient on T 1.6e-6 at W4A4 and 1.2e-3 at W2A4 against 48 from the c-weighted
PKT term, so after the norm clipping T followed PKT alone).

**Balancing the terms** (``meta_balance="unit"``, the default; a departure from the paper's
weighted sum, which ``"none"`` keeps): each term's gradient on T is computed separately and
scaled to unit norm before they are summed (:func:`combine_term_gradients`), so every active
term has the same share of the (clipped) direction whatever the scale of its loss; the
weights a, b, c then only switch terms on and off. The per-term gradient norms, their shares
and the KL-PKT cosine are logged at every meta step (``history`` in the log). Measured at the
benchmark's setting (the zoo ResNet-20, W2A2, 32 calibration images, first inner block): the
KL term's share of T's gradient is 1.8e-4 with ``"none"`` and 0.5 with ``"unit"``, and the KL
and PKT gradients point against each other (cosine about -0.8). The margin term is inactive at
the start (the random residual T already moves the images by more than τ), so its gradient
is zero and it adds nothing until T comes closer to the identity.

**Caching.** The float model does not change, so its logits on the calibration images are
computed once per run and indexed for ``x_v``. What else each meta step computes depends on T
(``T(x)`` through the quantized prefix, the float target, the PKT features of the mixed
images, which depend on the step's ``λ`` and permutation) or on the inner update (the
quantized model from block k on ``x_v``); the quantized prefix on ``x_v`` alone does not, but
a generic model's forward pass cannot start at block k, so it is recomputed.

Departures from the official code, and why:

* the inner step is plain SGD (``inner_lr``), not Adam (see above);
* the terms' gradients on T are balanced (see above);
* T is a small residual conv net ``x + g(x)`` (:class:`TransformNet`, size in the config), not
  the official UNet with 64..1024 channels warm-started from weights that are not published;
* the two mixups of the PKT term share one ``λ`` and permutation, so that PKT compares the
  features of the same mixtures of transformed and original images (the official code draws
  them independently);
* the float block output ``f_k(x')`` that the inner step reconstructs stays in the autograd
  graph (the official code detaches it), so the meta-gradient is the exact gradient of the
  bi-level objective, which the tests check against finite differences;
* ``x_v`` is a second batch drawn from the calibration images (the official code reads a
  separate loader of the same images); later blocks run in full precision, as in the official
  code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel

from hf_extensions.quantization.config import MetaAugConfig
from hf_extensions.quantization.models import model_logits
from hf_extensions.quantization.reconstruction import (
    _call_block,
    _learner_modules,
    _rounding_term,
    attach_learners,
    capture_block,
    discard_learners,
    quant_layers,
    reconstruction_loss,
    rounding_beta,
)

__all__ = [
    "MetaLosses",
    "TransformNet",
    "combine_term_gradients",
    "meta_losses",
    "mixup_lambda",
    "pkt_loss",
    "train_transform",
]


class TransformNet(nn.Module):
    """``T(x) = x + out(h)``, ``h`` = a stem conv and ``num_blocks`` residual 3x3 conv-ReLU blocks.

    The default transformation network (MetaAug's is a UNet; see the module docstring). Its size
    comes from ``MetaAugConfig.transform_channels`` / ``transform_blocks``.
    """

    def __init__(self, channels: int, hidden: int = 16, num_blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, hidden, 3, padding=1)
        self.body = nn.ModuleList(
            nn.Conv2d(hidden, hidden, 3, padding=1) for _ in range(num_blocks)
        )
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        for conv in self.body:
            h = h + F.relu(conv(h))
        return x + self.out(h)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, Eq. 7-10).

    Cosine similarities within the batch, shifted to ``[0, 1]`` and normalised per row into
    conditional probabilities; the loss is the mean of ``p_t log(p_t / p_s)``.
    """
    s = F.normalize(student.flatten(1), dim=1, eps=eps)
    t = F.normalize(teacher.flatten(1), dim=1, eps=eps)
    s_sim = (s @ s.T + 1) / 2
    t_sim = (t @ t.T + 1) / 2
    s_p = s_sim / s_sim.sum(dim=1, keepdim=True)
    t_p = t_sim / t_sim.sum(dim=1, keepdim=True)
    return (t_p * torch.log((t_p + eps) / (s_p + eps))).mean()


def _logits_with(
    model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    if isinstance(model, PreTrainedModel):
        return functional_call(model, params, (), {"pixel_values": x}).logits
    out = functional_call(model, params, (x,))
    return getattr(out, "logits", out)


@dataclass
class MetaLosses:
    """The outer objective and its parts (``inner`` is the inner reconstruction loss)."""

    total: torch.Tensor
    kl: torch.Tensor
    margin: torch.Tensor
    pkt: torch.Tensor
    inner: torch.Tensor


def meta_losses(
    model: nn.Module,
    fp_model: nn.Module,
    block_name: str,
    transform: nn.Module,
    x: torch.Tensor,
    x_val: torch.Tensor,
    config: MetaAugConfig,
    beta: float | None,
    lam: float,
    perm: torch.Tensor,
    feature_layer: str,
    logits_fp: torch.Tensor | None = None,
) -> MetaLosses:
    """MetaAug's outer loss for one meta step (inner step inside); differentiable w.r.t. T.

    The block's learners must be attached (:func:`attach_learners`). ``feature_layer``: the
    layer whose input is the float model's feature for PKT (the classifier head).
    ``logits_fp``: the float model's logits on ``x_val`` when already known (the float model
    does not change, so :func:`train_transform` computes them once); `None` computes them.
    """
    block = model.get_submodule(block_name)
    params = {
        n: p
        for n, p in block.named_parameters()
        if n.endswith(("weight_quantizer.alpha", "weight_quantizer.scale", "input_quantizer.step"))
    }
    learners = _learner_modules(block)
    x_t = transform(x)
    # Inner step on the transformed images.
    for m in learners:
        m.train()
    q_data = capture_block(model, block_name, x_t, need_output=False, keep_graph=True)
    # The float target stays in the graph: the meta-gradient is the exact gradient of the
    # bi-level objective (the official code computes it under no_grad).
    target = capture_block(fp_model, block_name, x_t, need_output=True, keep_graph=True).outputs
    inner = reconstruction_loss(_call_block(block, q_data.inputs, q_data), target)
    inner = inner + config.rounding_weight * _rounding_term(block, beta)
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
    updated = {
        f"{block_name}.{n}": p - config.inner_lr * g
        for (n, p), g in zip(params.items(), grads, strict=True)
    }
    # Outer losses on the original images.
    for m in learners:
        m.eval()
    t = config.temperature
    logits_q = _logits_with(model, updated, x_val)
    if logits_fp is None:
        with torch.no_grad():
            logits_fp = _logits_with(fp_model, {}, x_val)
    kl = F.kl_div(
        F.log_softmax(logits_q / t, 1), F.softmax(logits_fp / t, 1), reduction="batchmean"
    )
    margin = F.relu(config.margin - (x_t - x).pow(2).mean())
    if config.pkt_weight > 0:
        mixed_t = lam * x_t + (1 - lam) * x_t[perm]
        mixed = lam * x + (1 - lam) * x[perm]
        feat_t = capture_block(
            fp_model, feature_layer, mixed_t, need_output=False, keep_graph=True
        ).inputs
        with torch.no_grad():
            feat = capture_block(fp_model, feature_layer, mixed, need_output=False).inputs
        pkt = pkt_loss(feat_t, feat)
    else:
        pkt = torch.zeros((), device=x.device)
    total = config.kl_weight * kl + config.margin_weight * margin + config.pkt_weight * pkt
    return MetaLosses(total=total, kl=kl, margin=margin, pkt=pkt, inner=inner)


def mixup_lambda(generator: torch.Generator) -> float:
    """The mixup coefficient of the official MetaAug code: ``l ~ Beta(4, 4)``, ``max(l, 1 - l)``.

    Drawn from ``generator`` as the 4th smallest of 7 uniforms (the k-th order statistic of n
    uniforms is Beta(k, n + 1 - k)), so runs are reproducible from ``config.seed``.
    """
    # host: mixup's coefficient, a Python float per meta step
    sample = torch.rand(7, generator=generator, dtype=torch.float64).sort().values[3].item()
    return max(sample, 1.0 - sample)


#: The outer terms, in the order of :class:`MetaLosses`, with their config weight fields.
TERMS = {"kl": "kl_weight", "margin": "margin_weight", "pkt": "pkt_weight"}


def _norm(tensors: list[torch.Tensor]) -> float:
    # host: per-term gradient norms for the balancing and the logs, once per meta step (a double backward dwarfs it)
    return torch.sqrt(sum((t.pow(2).sum() for t in tensors), torch.zeros(()))).item()


def combine_term_gradients(
    losses: MetaLosses, params: list[torch.Tensor], config: MetaAugConfig
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """T's gradient from the outer terms, combined by ``config.meta_balance``, and a log.

    Each term's gradient on T is taken separately (one ``autograd.grad`` per term on the shared
    graph). ``"none"``: the weighted sum, the gradient of ``losses.total``. ``"unit"``: the sum
    of the weighted gradients each scaled to unit norm (a term whose gradient is zero, such as
    an inactive margin, adds nothing). The log holds, per term, ``grad_norm_<term>`` (the norm
    of the weighted term's gradient before balancing) and ``share_<term>`` (the norm of its
    contribution over the sum of the contributions' norms, before clipping), and ``cos_kl_pkt``,
    the cosine between the KL and PKT gradients.
    """
    active = [k for k, w in TERMS.items() if getattr(config, w) > 0]
    raw: dict[str, list[torch.Tensor]] = {}
    for i, key in enumerate(active):
        term = getattr(config, TERMS[key]) * getattr(losses, key)
        grads = [None] * len(params)
        if term.requires_grad:
            grads = torch.autograd.grad(
                term, params, retain_graph=i < len(active) - 1, allow_unused=True
            )
        raw[key] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    log: dict[str, float] = {}
    parts: dict[str, list[torch.Tensor]] = {}
    for key, grads in raw.items():
        norm = _norm(grads)
        log[f"grad_norm_{key}"] = norm
        if config.meta_balance == "unit":
            grads = [g / norm for g in grads] if norm > 0 else grads
        parts[key] = grads
    norms = {key: _norm(grads) for key, grads in parts.items()}
    for key, norm in norms.items():
        log[f"share_{key}"] = norm / sum(norms.values()) if sum(norms.values()) > 0 else 0.0
    if norms.get("kl", 0) > 0 and norms.get("pkt", 0) > 0:
        # host: as above, once per meta step
        dot = sum((a * b).sum() for a, b in zip(parts["kl"], parts["pkt"], strict=True)).item()
        log["cos_kl_pkt"] = dot / (norms["kl"] * norms["pkt"])
    zeros = [torch.zeros_like(p) for p in params]
    total = [sum(gs, z) for z, *gs in zip(zeros, *parts.values(), strict=True)]
    return total, log


def build_transform(images: torch.Tensor, config: MetaAugConfig) -> TransformNet:
    """A seeded :class:`TransformNet` for images shaped like ``images``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = TransformNet(images.shape[1], config.transform_channels, config.transform_blocks)
    return net.to(images.device)


def train_transform(
    model: nn.Module,
    fp_model: nn.Module,
    block_name: str,
    images: torch.Tensor,
    config: MetaAugConfig,
    generator: torch.Generator,
    fp_logits: torch.Tensor | None = None,
) -> tuple[TransformNet, dict[str, Any]]:
    """Train T for one block (``config.meta_iterations`` meta steps); returns T and a log.

    The block's layers must be the only ones switched on besides earlier blocks (as
    :func:`~hf_extensions.quantization.calibration.reconstruct_model` arranges).
    ``fp_logits``: the float model's logits on ``images`` (computed here when `None`; the
    driver computes them once for all blocks). The log holds ``first_`` / ``last_`` of the loss
    terms, ``mean_`` of the per-term gradient norms and shares on T
    (:func:`combine_term_gradients`), and ``history``, their per-step values.
    """
    block = model.get_submodule(block_name)
    base = config.metaaug_base
    attach_learners(block, 0.0 if base == "brecq" else config.drop_prob, base == "genie")
    transform = build_transform(images, config)
    params = list(transform.parameters())
    opt = torch.optim.Adam(params, lr=config.meta_lr)
    feature_layer = quant_layers(model)[-1][0]
    if fp_logits is None:
        with torch.no_grad():
            fp_logits = torch.cat([model_logits(fp_model, c) for c in images.split(256)])
    n, bs = len(images), min(config.batch_size, len(images))
    history: dict[str, list[float]] = {}
    try:
        for it in range(config.meta_iterations):
            # host: the calibration generator drives every rank alike (small index copies)
            idx = torch.randint(n, (bs,), generator=generator).to(images.device)
            idx_v = torch.randint(n, (bs,), generator=generator).to(images.device)  # host: ditto
            lam = mixup_lambda(generator)
            perm = torch.randperm(bs, generator=generator).to(images.device)  # host: ditto
            beta = rounding_beta(
                it, config.meta_iterations, config.warmup, config.beta_start, config.beta_end
            )
            # The math SDPA kernel has a double backward (the fused CPU/flash kernels do not).
            with sdpa_kernel([SDPBackend.MATH]):
                losses = meta_losses(
                    model,
                    fp_model,
                    block_name,
                    transform,
                    images[idx],
                    images[idx_v],
                    config,
                    beta,
                    lam,
                    perm,
                    feature_layer,
                    logits_fp=fp_logits[idx_v],
                )
                grads, grad_log = combine_term_gradients(losses, params, config)
            opt.zero_grad()
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            if config.meta_grad_clip > 0:
                nn.utils.clip_grad_norm_(params, config.meta_grad_clip)
            opt.step()
            # host: the meta step's logged losses, once per meta step
            step_log = {k: getattr(losses, k).item() for k in ("kl", "margin", "pkt", "total")}
            for key, value in {**step_log, **grad_log}.items():
                history.setdefault(key, []).append(value)
    finally:
        discard_learners(block)
    transform.eval()
    for p in params:
        p.requires_grad_(False)
    summary: dict[str, Any] = {}
    for key, values in history.items():
        if key.startswith(("grad_norm_", "share_", "cos_")):
            summary[f"mean_{key}"] = sum(values) / len(values)
        else:
            summary[f"first_{key}"], summary[f"last_{key}"] = values[0], values[-1]
    summary["history"] = history
    return transform, summary
