"""The one weight-perturbation mechanism of the SAM family (SAM, ASAM, Agnostic-SAM, FHBI, PGA).

Every method of the family takes gradients at perturbed weights: it computes an ascent (or
descent) direction from one or more *local* gradients, moves the weights by ``e``, takes the
gradient that the optimizer will use at ``θ + e``, and puts the weights back. Written once here,
with the details that the popular PyTorch SAM gets wrong under mixed precision, data parallelism
and gradient accumulation:

- :func:`local_gradients` leaves ``p.grad`` exactly as it found it (the gradient accumulated over
  earlier micro-batches is stashed and put back), runs its forward *and* backward under
  ``accelerator.no_sync`` (no all-reduce: the direction is the process's own, as in Foret et al.'s
  data-parallel SAM), and with a GradScaler divides by ``scaler.get_scale()`` instead of calling
  ``unscale_`` (which may be called once per optimizer step only).
- :func:`loss_scaler` decides whether loss scaling is active by accelerate's own rule, so that a
  local pass is scaled (and unscaled) exactly when ``Accelerator.backward`` scales the final one.
- :func:`ascent_direction` is ``ρ · T² g / ‖T g‖`` (SAM: ``T = I``, Foret et al. 2021, Eq. 2;
  ASAM: ``T = |θ| + η``, Kwon et al. 2021, Eq. 7), computed over all tensors at once or tensor by
  tensor. A zero gradient gives a zero perturbation, not NaN; a non-finite gradient (fp16
  overflow) gives no perturbation (the trainer then makes the GradScaler skip the step).
- :func:`perturbed_weights` adds ``e`` in place, keeps an exact copy of the weights and restores
  them by ``copy_`` (``p -= e`` rounds differently on each process and lets replicas drift), and
  by default keeps BatchNorm running statistics from being updated by passes at ``θ + e``.

The perturbation lives only inside the context manager: it is never optimizer state, so
checkpoints do not grow and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from accelerate.utils import DistributedType
from torch import nn

from hf_extensions.validation import check_choice

PERTURBATION_NORMS = ("global", "per_tensor")

#: Added to a gradient norm before dividing by it, so that a zero gradient gives a zero step.
NORM_EPS = 1e-12

Tensors = list[torch.Tensor | None]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a perturbation moves: those that require gradients, in module order."""
    return [p for p in model.parameters() if p.requires_grad]


def loss_scaler(accelerator) -> torch.amp.GradScaler | None:
    """The GradScaler whose scale ``accelerator.backward`` puts on the loss, or ``None``.

    The rule is accelerate's own (``Accelerator.backward``): the loss is scaled whenever
    ``accelerator.scaler`` is set, except under DeepSpeed and Megatron-LM, whose engines own the
    backward pass. ``Accelerator.unscale_gradients`` (called by ``clip_grad_norm_`` before
    Trainer's clipping) divides the scale out again only when ``native_amp`` is on and
    ``mixed_precision == "fp16"``. Every accelerator that accelerate sets up for fp16 satisfies
    both (accelerate creates the scaler only on a device that supports fp16 autocast: from 1.16 on,
    ``mixed_precision="fp16"`` on the CPU gives no scaler and no autocast, i.e. fp32, and older
    releases refuse it). An accelerator with a scaler but not in that state would clip and log
    scaled gradients; it is refused, naming the fix.
    """
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return None
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        return None
    if not (accelerator.native_amp and accelerator.mixed_precision == "fp16"):
        raise ValueError(
            "`accelerator.scaler` is set but the Accelerator is not in fp16 mixed precision "
            f"(native_amp={accelerator.native_amp}, mixed_precision="
            f"{accelerator.mixed_precision!r}): accelerate would scale the loss in `backward` "
            "but not unscale before clipping. Create the Accelerator (or Trainer) with "
            "`mixed_precision='fp16'` / `fp16=True` instead of assigning a scaler."
        )
    return scaler


def _present(tensors: Tensors) -> list[int]:
    return [i for i, t in enumerate(tensors) if t is not None]


def _scatter(values: list[torch.Tensor], index: list[int], length: int) -> Tensors:
    out: Tensors = [None] * length
    for i, value in zip(index, values):
        out[i] = value
    return out


def local_gradients(
    loss_fn: Callable[[], torch.Tensor],
    parameters: Sequence[nn.Parameter],
    *,
    model: nn.Module | None = None,
    accelerator=None,
    scaler=None,
) -> tuple[torch.Tensor, Tensors]:
    """Gradient of ``loss_fn()`` on this process only, without touching accumulated gradients.

    Args:
        loss_fn: computes the loss (forward pass) when called.
        parameters: the tensors to differentiate against (see :func:`trainable_parameters`).
        model: the (possibly DDP-wrapped) model, for ``accelerator.no_sync(model)``.
        accelerator: an ``accelerate.Accelerator``; ``None`` for plain PyTorch.
        scaler: a ``torch.amp.GradScaler`` whose scale the backward pass applies (fp16). The
            returned gradients are divided by ``scaler.get_scale()``: true gradients.

    Returns:
        ``(loss.detach(), grads)`` with ``grads[i] is None`` where a parameter got no gradient.
        Every ``p.grad`` is the same object with the same values as before the call.
    """
    stashed = [p.grad for p in parameters]
    for p in parameters:
        p.grad = None
    sync = (
        accelerator.no_sync(model)
        if accelerator is not None and model is not None
        else contextlib.nullcontext()
    )
    try:
        with sync:
            loss = loss_fn()
            (scaler.scale(loss) if scaler is not None else loss).backward()
        grads: Tensors = [p.grad for p in parameters]
    finally:
        for p, grad in zip(parameters, stashed):
            p.grad = grad
    if scaler is not None:
        index = _present(grads)
        unscaled = torch._foreach_mul([grads[i] for i in index], 1.0 / scaler.get_scale())
        grads = _scatter(unscaled, index, len(grads))
    return loss.detach(), grads


def local_gradients_of_each(
    losses_fn: Callable[[], Sequence[torch.Tensor]],
    parameters: Sequence[nn.Parameter],
    *,
    model: nn.Module | None = None,
    accelerator=None,
    scaler=None,
) -> tuple[list[torch.Tensor], list[Tensors]]:
    """The gradient of each of several losses that share one forward pass, on this process only.

    Like :func:`local_gradients` (no all-reduce, ``p.grad`` never touched, fp16 scale divided
    out), but ``losses_fn()`` returns several losses from one forward pass and each gets its own
    ``torch.autograd.grad`` call over the retained graph: one forward pass instead of one per
    loss (Agnostic-SAM's ``g_tr`` and ``g_val`` from one pass over the whole batch).

    Returns:
        ``([loss.detach() ...], [grads ...])``, ``grads[k][i] is None`` where parameter ``i`` got
        no gradient from loss ``k``.
    """
    sync = (
        accelerator.no_sync(model)
        if accelerator is not None and model is not None
        else contextlib.nullcontext()
    )
    with sync:
        losses = list(losses_fn())
        gradients = []
        for index, loss in enumerate(losses):
            scaled = scaler.scale(loss) if scaler is not None else loss
            grads = torch.autograd.grad(
                scaled, parameters, retain_graph=index < len(losses) - 1, allow_unused=True
            )
            gradients.append(list(grads))
    if scaler is not None:
        for k, grads in enumerate(gradients):
            index = _present(grads)
            unscaled = torch._foreach_mul([grads[i] for i in index], 1.0 / scaler.get_scale())
            gradients[k] = _scatter(unscaled, index, len(grads))
    return [loss.detach() for loss in losses], gradients


def ascent_direction(
    grads: Tensors,
    parameters: Sequence[nn.Parameter],
    *,
    rho: float,
    adaptive: bool = False,
    adaptive_eta: float = 0.01,
    norm: str = "global",
) -> Tensors:
    """``e = ρ · T² g / ‖T g‖``: the worst-case perturbation of radius ``ρ`` to first order.

    SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
    ICLR 2021, Eq. 2) is ``T = I``. ASAM (Kwon et al., "ASAM: Adaptive Sharpness-Aware
    Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021, Eq. 7 with the
    normalisation operator ``T_θ = |θ| + η`` of their Sec. 4) is ``adaptive=True``.
    ``norm="global"`` takes ``‖·‖`` over all tensors together (the papers); ``"per_tensor"`` gives
    every tensor its own radius ``ρ``. A negative ``rho`` gives the descent direction.

    Returns one tensor per parameter (``None`` where ``grads`` has ``None``); all zeros when the
    gradient is zero (no NaN) or not finite (an fp16 overflow: callers with a GradScaler must make
    the scaler skip the step, see ``PerturbationTrainer``).

    Departure from Kwon et al.'s code: ``T`` applies to every parameter; their code normalises
    only the tensors named ``weight`` (biases get ``T = 1``).
    Vectorised over tensors (``torch._foreach_*``): its cost does not grow with their number.
    """
    check_choice("norm", norm, PERTURBATION_NORMS)
    index = _present(grads)
    if not index:
        return [None] * len(grads)
    g = [grads[i].detach() for i in index]
    if adaptive:
        weights = torch._foreach_add(
            torch._foreach_abs([parameters[i].detach() for i in index]), adaptive_eta
        )
        scaled = torch._foreach_mul(g, weights)  # T g
    else:
        scaled = g
    # Norms in float32 (an fp16 norm overflows at 65504) and on one device (a model split over
    # devices with device_map has gradients on several).
    home, dtype = scaled[0].device, scaled[0].dtype
    uniform = all(t.device == home and t.dtype == dtype for t in scaled)
    tensor_norms = torch._foreach_norm(scaled, 2, dtype=torch.float32)
    norms = torch.stack(tensor_norms if uniform else [n.to(home) for n in tensor_norms])
    if not gradients_finite(norms):
        return _scatter([torch.zeros_like(t) for t in g], index, len(grads))
    if norm == "global" and uniform:  # one scalar for every tensor: one fused multiply
        factor = (rho / (torch.linalg.vector_norm(norms) + NORM_EPS)).to(dtype)
        direction = torch._foreach_mul(scaled, factor)
    else:
        if norm == "global":
            factors = [rho / (torch.linalg.vector_norm(norms) + NORM_EPS)] * len(scaled)
        else:
            factors = list((rho / (norms + NORM_EPS)).unbind())
        direction = torch._foreach_mul(
            scaled, [f.to(device=t.device, dtype=t.dtype) for f, t in zip(factors, scaled)]
        )
    if adaptive:
        torch._foreach_mul_(direction, weights)  # T (T g) = T² g
    return _scatter(direction, index, len(grads))


def gradients_finite(tensors: Tensors | torch.Tensor) -> bool:
    """Whether every value is finite (one device sync); ``None`` entries are ignored."""
    if isinstance(tensors, torch.Tensor):
        return bool(torch.isfinite(tensors).all())
    present = [t for t in tensors if t is not None]
    if not present:
        return True
    home = present[0].device
    norms = torch._foreach_norm(present, 2, dtype=torch.float32)
    return bool(torch.isfinite(torch.stack([n.to(home) for n in norms])).all())


class RandomState:
    """The random state of the CPU and of every CUDA device, to replay the same draws.

    The SAM family runs several passes on one batch. Restoring the state captured before the
    first pass, before the pass whose gradient the optimizer gets, gives that pass the random
    draws (dropout masks) a plain step would have drawn: ``rho = 0`` is then exactly the plain
    step even with dropout, and every pass of a step sees the same masks.
    """

    def __init__(self):
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def combine_directions(*terms: tuple[float, Tensors]) -> Tensors:
    """``Σ coefficient · direction``, element by element (``None`` where every term has ``None``)."""
    length = len(terms[0][1])
    if any(len(direction) != length for _, direction in terms):
        raise ValueError("All directions must have one entry per parameter.")
    index = [i for i in range(length) if any(d[i] is not None for _, d in terms)]
    if not index:
        return [None] * length
    first = terms[0][1]
    template = [next(d[i] for _, d in terms if d[i] is not None) for i in index]
    total = torch._foreach_mul(
        [
            first[i] if first[i] is not None else torch.zeros_like(t)
            for i, t in zip(index, template)
        ],
        terms[0][0],
    )
    for coefficient, direction in terms[1:]:
        if all(direction[i] is not None for i in index):
            torch._foreach_add_(total, [direction[i] for i in index], alpha=coefficient)
        else:
            for position, i in enumerate(index):
                if direction[i] is not None:
                    total[position].add_(direction[i], alpha=coefficient)
    return _scatter(total, index, length)


def direction_norm(direction: Tensors) -> torch.Tensor:
    """Global Euclidean norm of a direction, a 0-d tensor (for logging; no device sync)."""
    norms = [torch.linalg.vector_norm(d.float()) for d in direction if d is not None]
    if not norms:
        # host: no direction: a 0-d CPU zero, moved at the log step like any record
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


@contextlib.contextmanager
def frozen_batchnorm_statistics(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Restore every BatchNorm's running statistics (and batch counter) on exit, by copy.

    Forward passes at perturbed weights must not move the running statistics that inference
    uses; restoring by copy is exact for any ``momentum`` (including the cumulative ``None``).
    """
    if not enabled:
        yield
        return
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            buffers = (module.running_mean, module.running_var, module.num_batches_tracked)
            saved.append((buffers, [b.clone() if b is not None else None for b in buffers]))
    try:
        yield
    finally:
        with torch.no_grad():
            for buffers, copies in saved:
                for buffer, copy in zip(buffers, copies):
                    if buffer is not None:
                        buffer.copy_(copy)


@contextlib.contextmanager
def perturbed_weights(
    parameters: Sequence[nn.Parameter],
    direction: Tensors,
    *,
    model: nn.Module | None = None,
    freeze_batchnorm_stats: bool = True,
) -> Iterator[None]:
    """Weights at ``θ + e`` inside the block, exactly ``θ`` again after it (restored by copy).

    With ``model`` given and ``freeze_batchnorm_stats``, BatchNorm running statistics updated by
    forward passes inside the block are restored on exit too.
    """
    if len(direction) != len(parameters):
        raise ValueError(
            f"The direction has {len(direction)} entries for {len(parameters)} parameters."
        )
    moved = [(p, e) for p, e in zip(parameters, direction) if e is not None]
    targets = [p.data for p, _ in moved]
    saved = [t.clone() for t in targets]
    batchnorm = (
        frozen_batchnorm_statistics(model, freeze_batchnorm_stats)
        if model is not None
        else contextlib.nullcontext()
    )
    if targets:
        torch._foreach_add_(targets, [e for _, e in moved])
    try:
        with batchnorm:
            yield
    finally:
        if targets:
            torch._foreach_copy_(targets, saved)
