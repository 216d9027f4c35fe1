"""Block-wise reconstruction PTQ: BRECQ and QDrop blocks (the driver is in ``calibration``).

BRECQ (Li et al., ICLR 2021, "BRECQ: Pushing the Limit of Post-Training Quantization by Block
Reconstruction") quantizes a network one block at a time, in forward order. For block ``k`` it
records the full-precision block output ``y = f_k(x_fp)`` and the input ``x_q`` the already
quantized blocks ``1..k-1`` feed it, then learns the block's AdaRound rounding variables ``V``
(Nagel et al. 2020, Eq. 21-25) and LSQ activation steps (Esser et al. 2020) by minimising

    ``|| f̂_k(x_q) - y ||^2  +  λ Σ_layers Σ (1 - |2 h(V) - 1|^β)``           (BRECQ Eq. 7 + AdaRound Eq. 24)

with β annealed 20 -> 2 after a 20 % warm-up without the rounding term, λ = 0.01, Adam (lr 1e-3
for ``V``; 4e-5 with cosine decay for the steps). Afterwards the rounding is made hard
(``h(V) >= 0.5``) and stored as rounded weights in the :class:`QuantLinear` / :class:`QuantConv2d`.

QDrop (Wei et al., ICLR 2022, Eq. 8) differs in one place: with probability ``drop_prob`` each
activation element stays at full precision, both inside the block (the LSQ quantizers in training
mode) and at the block input (``where(rand < p, x_fp, x_q)``, as the QDrop code mixes
``cur_fp_inp`` / ``cur_inp``). ``method="brecq"`` is QDrop with ``drop_prob = 0``.

Genie-M (Jeon et al., "Genie: Show Me the Data for Quantization", CVPR 2023, Sec. 4), the base
of the official MetaAug code, is QDrop whose per-channel weight scales are learned together with
the rounding variables: ``W_hat = s * (clip(floor(W / s_0) + h(V) + z) - z)`` with ``s``
trained from ``s_0`` (:meth:`WeightQuantizer.learn_scale`; ``method="genie"``, Adam lr
``weight_scale_lr``). The official defaults named by issue 24: rounding weight λ = 1.0 (set
``rounding_weight=1.0``; 0.01 is BRECQ's), the scales learned jointly with ``V``; the official
scale learning rate could not be read offline (1e-4 here).

MetaAug (Pham et al., ECCV 2024, arXiv 2407.14726) runs its bi-level stage
(:func:`~hf_extensions.quantization.metaaug.train_transform`) before each block that holds
neither the first nor the last quantized layer, then reconstructs that block on the union of ``x`` and ``T(x)``.

Departures from the official code (BRECQ / QDrop / MetaAug, all built on the same
``block_reconstruction``): BatchNorm is not folded into the preceding convolution (the stored
inference form must load into the unmodified ``transformers`` / torchvision architecture, so BN
stays a float op between quantized layers); activations are quantized at each layer's *input*
(the inference form in :mod:`~hf_extensions.quantization.modules`) instead of after each block's
activation function; blocks are found by a structural rule (:func:`find_blocks`) instead of a list
of class names; the iteration counts default to CPU sizes (the papers use 20k per block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_extensions.quantization.config import MetaAugConfig
from hf_extensions.quantization.models import model_logits
from hf_extensions.quantization.modules import _QuantMixin
from hf_extensions.quantization.quantizers import ActivationQuantizer, WeightQuantizer
from hf_extensions.validation import refuse

__all__ = [
    "BlockData",
    "attach_learners",
    "block_output_error",
    "capture_block",
    "finalize_learners",
    "find_blocks",
    "mask_generator",
    "quant_layers",
    "reconstruct_block",
    "reconstruction_loss",
    "rounding_beta",
    "set_quant_enabled",
]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _StopForward(Exception):
    """Raised by a capture hook once the block of interest has run (skips the rest)."""


def quant_layers(module: nn.Module, prefix: str = "") -> list[tuple[str, _QuantMixin]]:
    """``(name, layer)`` of every quantized layer inside ``module`` (itself included)."""
    return [
        (f"{prefix}.{n}" if prefix and n else prefix or n, m)
        for n, m in module.named_modules()
        if isinstance(m, _QuantMixin)
    ]


def set_quant_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every quantized layer of ``module`` between fake-quant and full precision."""
    for _, layer in quant_layers(module):
        layer.quant_enabled = enabled


def _inside(name: str, block: str) -> bool:
    return not block or name == block or name.startswith(block + ".")


def find_blocks(
    model: nn.Module,
    example_input: torch.Tensor,
    max_block_layers: int = 8,
    block_names: Sequence[str] | None = None,
) -> list[str]:
    """The reconstruction units of a model whose layers are already quantized, in forward order.

    With ``block_names`` those modules (each must hold a quantized layer) plus every quantized
    layer outside them. Otherwise, walking the module tree from the root: a quantized layer is a
    block; a module with its own ``forward`` (not ``Sequential`` / ``ModuleList`` / ``ModuleDict``)
    that holds at most ``max_block_layers`` quantized layers, neither the first nor the last one,
    and is not a mere wrapper whose only child is a ``Sequential`` / ``ModuleList``, is a block (a ResNet ``BasicBlock`` / ``Bottleneck``, a MobileNetV2 ``InvertedResidual``,
    a ViT encoder layer); anything else is descended into. The first and last layers are thus
    reconstructed alone, as in BRECQ. Forward order = order of first call on ``example_input``.
    """
    layers = [n for n, _ in quant_layers(model)]
    if not layers:
        raise ValueError("model has no quantized layers: call replace_with_quant_modules first")
    first, last = layers[0], layers[-1]
    blocks: list[str] = []
    if block_names is not None:
        for name in block_names:
            if not any(_inside(n, name) for n in layers):
                refuse("block_names", "names of modules that hold a quantized layer", name)
        blocks = list(block_names)
        blocks += [n for n in layers if not any(_inside(n, b) for b in blocks)]
    else:

        def visit(name: str, module: nn.Module) -> None:
            inner = [n for n in layers if _inside(n, name)]
            if not inner:
                return
            children = list(module.children())
            # A stage that only wraps a list of units (transformers' ResNetStage.layers) is
            # descended into, so the units (ResNet basic layers) are the blocks, as in BRECQ.
            wrapper = len(children) == 1 and isinstance(children[0], _CONTAINERS)
            if isinstance(module, _QuantMixin) or (
                name
                and not isinstance(module, _CONTAINERS)
                and not wrapper
                and len(inner) <= max_block_layers
                and first not in inner
                and last not in inner
            ):
                blocks.append(name)
            else:
                for child_name, child in module.named_children():
                    visit(f"{name}.{child_name}" if name else child_name, child)

        visit("", model)
    order: dict[str, int] = {}
    hooks = []
    for name in blocks:

        def pre(_module, _args, _name=name):
            order.setdefault(_name, len(order))

        hooks.append(model.get_submodule(name).register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model_logits(model, example_input)
    finally:
        for h in hooks:
            h.remove()
    missing = [b for b in blocks if b not in order]
    if missing:
        raise ValueError(f"blocks {missing} are not called by the model's forward pass")
    return sorted(blocks, key=order.__getitem__)


@dataclass
class BlockData:
    """What a block sees: its first positional input, the other arguments, and its output."""

    inputs: torch.Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    outputs: torch.Tensor | None = None


def _first(output: Any) -> torch.Tensor:
    """The tensor of a block's output: itself, or the first entry of a tuple / ``ModelOutput``."""
    if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
        return output[0]
    return output


def capture_block(
    model: nn.Module,
    block_name: str,
    images: torch.Tensor,
    need_output: bool = True,
    batch_size: int = 256,
    keep_graph: bool = False,
) -> BlockData:
    """Run ``model`` on ``images`` (in chunks) and record ``block_name``'s input (and output).

    The forward pass stops as soon as the block has run. The block's other positional and keyword
    arguments are taken from the first chunk (they must not depend on the batch, as the
    ``attention_mask=None`` of a vision transformer's layers). ``keep_graph`` keeps the autograd
    graph from ``images`` to the recorded tensors (MetaAug's inner step differentiates through it).
    """
    block = model.get_submodule(block_name)
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    extra: dict[str, Any] = {}

    def pre(_module, args, kwargs):
        x = args[0]
        inputs.append(x if keep_graph else x.detach())
        if not extra:
            extra["args"], extra["kwargs"] = tuple(args[1:]), dict(kwargs)
        if not need_output:
            raise _StopForward

    def post(_module, _args, _kwargs, output):
        y = _first(output)
        outputs.append(y if keep_graph else y.detach())
        raise _StopForward

    hooks = [block.register_forward_pre_hook(pre, with_kwargs=True)]
    if need_output:
        hooks.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.set_grad_enabled(keep_graph and torch.is_grad_enabled()):
            for chunk in images.split(batch_size):
                with contextlib.suppress(_StopForward):
                    model_logits(model, chunk)
    finally:
        for h in hooks:
            h.remove()
    if not inputs:
        raise RuntimeError(f"block {block_name!r} was not called by the model's forward pass")
    return BlockData(
        inputs=torch.cat(inputs),
        args=extra["args"],
        kwargs=extra["kwargs"],
        outputs=torch.cat(outputs) if need_output else None,
    )


def rounding_beta(step: int, total: int, warmup: float, start: float, end: float) -> float | None:
    """β of AdaRound's regulariser at ``step``: ``None`` during warm-up, then ``start -> end``.

    BRECQ's ``LinearTempDecay``: ``β = end + (start - end) * max(0, 1 - (t - t_w) / (T - t_w))``
    with ``t_w = warmup * T``; the rounding term is off (``None``) while ``t < t_w``.
    """
    t_w = warmup * total
    if step < t_w:
        return None
    rel = (step - t_w) / max(total - t_w, 1e-12)
    return end + (start - end) * max(0.0, 1.0 - rel)


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(f̂(x) - y)^2`` summed over dim 1 (channels / tokens), averaged over the rest.

    The ``lp_loss(p=2, reduction='none')`` of the BRECQ / QDrop / MetaAug code.
    """
    return (output - target).pow(2).sum(1).mean()


def attach_learners(
    block: nn.Module, drop_prob: float, learn_weight_scale: bool = False
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Give every quantized layer of ``block`` an AdaRound weight and an LSQ/QDrop input quantizer.

    They start from the layer's stored (round-to-nearest) scales: ``weight_quantizer`` with
    ``V`` initialised so that the soft weight equals the float weight, ``input_quantizer`` with
    step = ``act_scale``. ``learn_weight_scale`` (Genie-M) also makes each weight quantizer's
    per-channel scale a parameter (:meth:`WeightQuantizer.learn_scale`). Returns
    ``(rounding variables V, activation steps)``; the learned weight scales are the
    ``weight_quantizer.scale`` parameters of the layers.
    """
    alphas, steps = [], []
    for _, layer in quant_layers(block):
        wq = WeightQuantizer(bits=layer.weight_bits, grid_size=1)
        wq.scale = layer.weight_scale.detach().clone()
        wq.zero_point = layer.weight_zero_point.detach().clone()
        wq.init_adaround(layer.weight.detach())
        if learn_weight_scale:
            wq.learn_scale()
        layer.weight_quantizer = wq
        alphas.append(wq.alpha)
        if layer.activation_bits is not None:
            aq = ActivationQuantizer(bits=layer.activation_bits, drop_prob=drop_prob, grid_size=1)
            aq.to(layer.act_scale.device)
            with torch.no_grad():
                aq.step.copy_(layer.act_scale)
                aq.zero_point.copy_(layer.act_zero_point)
                aq.calibrated.fill_(True)
            layer.input_quantizer = aq
            steps.append(aq.step)
    return alphas, steps


def _learner_modules(block: nn.Module) -> list[nn.Module]:
    return [m for m in block.modules() if isinstance(m, (WeightQuantizer, ActivationQuantizer))]


def _rounding_term(block: nn.Module, beta: float | None) -> torch.Tensor | float:
    if beta is None:
        return 0.0
    return sum(
        m.rounding_regularizer(beta) for m in block.modules() if isinstance(m, WeightQuantizer)
    )


@torch.no_grad()
def finalize_learners(block: nn.Module) -> None:
    """Store hard-rounded weights and learned steps in the layers; remove the learners."""
    for _, layer in quant_layers(block):
        wq = layer._modules.pop("weight_quantizer", None)
        if wq is not None:
            wq.set_mode("hard")
            layer.weight.copy_(wq(layer.weight))
            # A learned scale (Genie-M) is the one the rounded weight lies on.
            layer.weight_scale.copy_(wq.scale.detach().abs().clamp(min=1e-8))
        aq = layer._modules.pop("input_quantizer", None)
        if aq is not None:
            layer.act_scale.copy_(aq.step.detach().abs().clamp(min=1e-8))


def discard_learners(block: nn.Module) -> None:
    """Remove the learners without storing anything (MetaAug discards its inner updates)."""
    for _, layer in quant_layers(block):
        layer._modules.pop("weight_quantizer", None)
        layer._modules.pop("input_quantizer", None)


def _call_block(block: nn.Module, x: torch.Tensor, data: BlockData) -> torch.Tensor:
    return _first(block(x, *data.args, **data.kwargs))


def mask_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``generator``, for QDrop's block-input masks.

    The masks are then drawn where the activations are (no host tensor copied to the device
    every iteration); every process of a distributed run seeds it identically, so all draw the
    same full-batch mask and take their slice of it.
    """
    seed = int(torch.randint(2**62, (1,), generator=generator))  # host: a seed, once per block
    return torch.Generator(device=device).manual_seed(seed)


def reconstruct_block(
    block: nn.Module,
    q_data: BlockData,
    fp_data: BlockData,
    config: MetaAugConfig,
    drop_prob: float,
    generator: torch.Generator,
    accelerator: Any = None,
    learn_weight_scale: bool = False,
) -> dict[str, float]:
    """BRECQ / QDrop / Genie-M reconstruction of one block (see the module docstring); in place.

    ``q_data.inputs``: the block's inputs in the partially quantized model; ``fp_data``: inputs
    and outputs in the float model, on the same images. Under Accelerate with several processes
    each process takes its slice of every (identically sampled) batch and the gradients are
    averaged, so the result does not depend on the number of processes beyond float sums.
    ``learn_weight_scale``: Genie-M, the per-channel weight scales are learned with the
    rounding (Adam, ``config.weight_scale_lr``). QDrop's block-input masks are drawn on the
    inputs' device (:func:`mask_generator`), and not at all when ``drop_prob`` is 0.
    """
    alphas, steps = attach_learners(block, drop_prob, learn_weight_scale)
    groups = [{"params": alphas, "lr": config.weight_lr}]
    scales = [
        m.scale for m in block.modules() if isinstance(m, WeightQuantizer) and learn_weight_scale
    ]
    if scales:
        groups.append({"params": scales, "lr": config.weight_scale_lr})
    opt = torch.optim.Adam(groups)
    act_opt = sched = None
    if steps:
        act_opt = torch.optim.Adam(steps, lr=config.activation_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            act_opt, T_max=config.iterations, eta_min=0.0
        )
    block.eval()
    for m in _learner_modules(block):
        m.train()
    n = len(q_data.inputs)
    world = getattr(accelerator, "num_processes", 1)
    rank = getattr(accelerator, "process_index", 0)
    first_rec = last_rec = torch.full((), float("nan"), device=q_data.inputs.device)
    idx = torch.empty(0, dtype=torch.long, device=q_data.inputs.device)
    device = q_data.inputs.device
    masks = mask_generator(generator, device) if drop_prob > 0 else None
    for it in range(config.iterations):
        # host: the calibration generator drives every rank alike; a small index copy per step
        idx = torch.randint(n, (min(config.batch_size, n),), generator=generator)
        mask = None
        if masks is not None:
            shape = (len(idx), *q_data.inputs.shape[1:])
            mask = torch.rand(shape, generator=masks, device=device) < drop_prob
        if world > 1:
            idx = idx.chunk(world)[rank]
            mask = None if mask is None else mask.chunk(world)[rank]
        idx = idx.to(device)
        x = q_data.inputs[idx]
        if mask is not None:
            x = torch.where(mask, fp_data.inputs[idx], x)
        rec = reconstruction_loss(_call_block(block, x, q_data), fp_data.outputs[idx])
        beta = rounding_beta(
            it, config.iterations, config.warmup, config.beta_start, config.beta_end
        )
        loss = rec + config.rounding_weight * _rounding_term(block, beta)
        opt.zero_grad()
        if act_opt is not None:
            act_opt.zero_grad()
        loss.backward()
        if world > 1:
            for p in alphas + steps + scales:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        opt.step()
        if act_opt is not None:
            act_opt.step()
            sched.step()
        if it == 0:
            first_rec = rec.detach()
        last_rec = rec.detach()  # read once after the loop: no host sync per iteration
    finalize_learners(block)
    return {
        "first_rec_loss": float(first_rec),
        "last_rec_loss": float(last_rec),
        "local_batch_size": float(len(idx)),
    }


@torch.no_grad()
def block_output_error(
    model: nn.Module, fp_model: nn.Module, block_name: str, images: torch.Tensor
) -> float:
    """``reconstruction_loss`` of ``block_name``: quantized block on quantized inputs vs float."""
    q = capture_block(model, block_name, images, need_output=True)
    fp = capture_block(fp_model, block_name, images, need_output=True)
    return reconstruction_loss(q.outputs, fp.outputs).item()  # host: a metric, once per block
