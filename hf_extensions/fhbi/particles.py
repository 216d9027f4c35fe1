"""A set of particles over one frozen backbone: m LoRA adapters (+ one head each), evaluated at once.

Particle-based Bayesian fine-tuning (SVGD, Liu & Wang, NeurIPS 2016; FHBI, Truong et al.,
"Improving Generalization with Flat Hilbert Bayesian Inference", ICML 2025, arXiv 2410.04196)
keeps m models. With parameter-efficient fine-tuning each particle is only an adapter and a head
(the paper: LoRA r=8, α=8 on query/value of a ViT-B/16, plus a linear head per particle); the
backbone is shared and frozen.

:class:`ParticleEnsemble` stores every trainable tensor of the wrapped model (for a
``peft.PeftModel``: the LoRA weights and the ``modules_to_save`` head) *stacked* over the
particles, as one ``nn.Parameter`` of shape ``[m, ...]`` per tensor. The forward pass evaluates
all particles together with ``torch.func.functional_call`` under ``torch.func.vmap`` (one batched
kernel per operation instead of m), or, when every particle tensor belongs to an ``nn.Linear``
(LoRA A/B, a linear head, an MLP), with the batch repeated m times and every such Linear computed
as one batched matmul with its stacked weights (``mode="stacked"``, the fastest); ``mode="loop"``
is the reference implementation (a Python loop; same parameters, same results). Predictions average the
particles' probabilities: ``logits`` is ``log((1/m) Σ_i softmax(z_i))``, so softmax/argmax/NLL of
it are those of the Bayesian model average.

Save/load: every particle is written as its own PEFT adapter (``particle_<i>/``, loadable with
``PeftModel.from_pretrained``) or, for a plain model, as a safetensors file of its trainable
tensors, all in one all-or-nothing save; :meth:`ParticleEnsemble.from_pretrained` reloads
the set exactly (refusing, by file and tensor, a particle that lacks a tensor or holds one of
another shape), and :meth:`ParticleEnsemble.push_to_hub` uploads it. Departure from the
official code (which keeps m separate PyTorch modules and loops over them): stacked weights and
vmap, the layout that lets the particle count grow without growing the number of kernel
launches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import (
    SAFETENSORS_WEIGHTS_NAME,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call, vmap

from hf_extensions.atomic import atomic_save, recover_interrupted_save
from hf_extensions.loading import check_tensors, load_peft_model, read_json, read_tensors
from hf_extensions.validation import check_choice, check_integer

ENSEMBLE_CONFIG_NAME = "particle_ensemble.json"
PARTICLE_WEIGHTS_NAME = "particle.safetensors"
#: How the particles are evaluated: ``"stacked"`` (the batch repeated m times, particle-major,
#: every particle-owning Linear a batched matmul with the stacked weights), ``"vmap"``
#: (``torch.func.vmap`` over ``functional_call``, any module type), ``"loop"`` (the reference),
#: ``"auto"`` (stacked when every particle tensor belongs to an ``nn.Linear``, else vmap).
EVALUATION_MODES = ("auto", "stacked", "vmap", "loop")
FORMAT_VERSION = 1


def _is_peft_model(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


def _reinitialise(model: nn.Module, seed: int) -> None:
    """Draw fresh trainable weights with ``seed``, with each module's own initialiser.

    LoRA layers re-run PEFT's ``reset_lora_parameters`` (A Kaiming-uniform, B zero); any other
    module that owns trainable parameters (a head, or every layer of a fully trained model) runs
    its ``reset_parameters``. The caller's random state is left untouched.
    """
    lora_children: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for adapter in module.lora_A:
                    if module.lora_A[adapter].weight.requires_grad:
                        module.reset_lora_parameters(adapter, True)
                lora_children.update(id(m) for m in module.modules() if m is not module)
                continue
            if id(module) in lora_children:
                continue
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own and hasattr(module, "reset_parameters"):
                module.reset_parameters()


class ParticleEnsemble(nn.Module):
    """m particles (the trainable tensors of ``model``) sharing ``model``'s frozen tensors.

    Args:
        model: a ``peft.PeftModel`` (the particles are its trainable adapter + head), or any
            module whose ``requires_grad`` parameters define one particle. Its forward must take
            the inputs as keyword arguments and return ``logits`` (a dict or a ``ModelOutput``).
        num_particles: m.
        seed: particle 0 is ``model`` as given; particle i > 0 is re-initialised with seed
            ``seed + i`` (LoRA: new A, zero B; heads: their own initialiser).
        mode: one of :data:`EVALUATION_MODES` (stacked weights, vmap, or the loop reference).

    The wrapped model's own trainable tensors are frozen (they only serve as the template that
    ``functional_call`` replaces); the particles are :attr:`particles`, one ``[m, ...]``
    parameter per tensor, named after it in :attr:`names`.

    Forward: ``ensemble(pixel_values=..., labels=...)`` returns ``{"logits": log of the mean
    probability, "loss": NLL of the mean probability (with labels)}``; with
    ``return_particle_logits=True`` also ``particle_logits`` ``[m, batch, classes]``.
    Stateful layers (BatchNorm running statistics) are refused: the particles would share them.
    """

    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module, num_particles: int = 4, seed: int = 0, mode: str = "auto"):
        super().__init__()
        check_integer("num_particles", num_particles, low=1)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                raise ValueError(
                    "ParticleEnsemble refuses models with BatchNorm running statistics: the "
                    "particles would share them. Use track_running_stats=False or LayerNorm."
                )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("The model has no trainable parameter to make particles of.")
        self.model = model
        self.num_particles = num_particles
        self.seed = seed
        self.names = [n for n, _ in named]
        template = [p.detach().clone() for _, p in named]
        values = [[t] for t in template]
        for i in range(1, num_particles):
            _reinitialise(model, seed + i)
            for column, (_, p) in zip(values, named):
                column.append(p.detach().clone())
        with torch.no_grad():
            for (_, p), t in zip(named, template):
                p.copy_(t)
                p.requires_grad_(False)
        self.particles = nn.ParameterList([nn.Parameter(torch.stack(v)) for v in values])
        self.mode = mode

    @property
    def mode(self) -> str:
        """The evaluation mode in use (``"auto"`` resolved); settable."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        check_choice("mode", value, EVALUATION_MODES)
        self._stacked = self._stacked_modules()
        if value == "stacked" and self._stacked is None:
            raise ValueError(
                "mode='stacked' needs every particle tensor to belong to an nn.Linear; use 'vmap'."
            )
        if value == "auto":
            value = "stacked" if self._stacked is not None else "vmap"
        self._mode = value

    # -- evaluation -------------------------------------------------------------------------

    def _call(self, tensors: tuple[torch.Tensor, ...], inputs: dict[str, Any]) -> torch.Tensor:
        output = functional_call(self.model, dict(zip(self.names, tensors)), args=(), kwargs=inputs)
        return output["logits"]

    def _stacked_modules(self) -> list[tuple[nn.Linear, list[tuple[str, int]]]] | None:
        """Linear modules that own particle tensors, or ``None`` if another kind owns one."""
        modules = dict(self.model.named_modules())
        owners: dict[str, list[tuple[str, int]]] = {}
        for index, name in enumerate(self.names):
            owner, _, attribute = name.rpartition(".")
            owners.setdefault(owner, []).append((attribute, index))
        found = []
        for owner, attributes in owners.items():
            module = modules.get(owner)
            if type(module) is not nn.Linear:
                return None
            found.append((module, attributes))
        return found

    @contextlib.contextmanager
    def _stacked_forward(self) -> Iterator[None]:
        """Every particle-owning ``nn.Linear`` computes ``x_i W_i^T + b_i`` for the particle i
        whose rows it receives (batch laid out particle-major: m blocks of B rows), one ``bmm``."""
        m = self.num_particles
        patched = []
        for module, attributes in self._stacked:
            tensors = {attribute: self.particles[index] for attribute, index in attributes}
            weight = tensors.get("weight", module.weight)
            bias = tensors.get("bias", module.bias)

            def forward(x, weight=weight, bias=bias, stacked_weight="weight" in tensors):
                rows = x.reshape(m, -1, x.shape[-1])
                w = weight if stacked_weight else weight.unsqueeze(0).expand(m, -1, -1)
                out = torch.bmm(rows, w.transpose(1, 2))
                if bias is not None:
                    out = out + (bias.unsqueeze(1) if bias.dim() == 2 else bias)
                return out.reshape(*x.shape[:-1], out.shape[-1])

            module.forward = forward
            patched.append(module)
        try:
            yield
        finally:
            for module in patched:
                del module.forward

    def particle_logits(self, **inputs: Any) -> torch.Tensor:
        """``[m, batch, ...]`` logits of every particle, by the configured :attr:`mode`."""
        stacked = tuple(self.particles)
        m = self.num_particles
        if self.mode == "stacked":
            rows = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor))
            repeated = {
                key: value.repeat(m, *([1] * (value.dim() - 1)))
                if isinstance(value, torch.Tensor) and value.dim() > 0
                else value
                for key, value in inputs.items()
            }
            with self._stacked_forward():
                logits = self.model(**repeated)["logits"]
            return logits.reshape(m, rows, *logits.shape[1:])
        if self.mode == "vmap":
            return vmap(lambda *tensors: self._call(tensors, inputs), randomness="different")(
                *stacked
            )
        return torch.stack([self._call(tuple(t[i] for t in stacked), inputs) for i in range(m)])

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_particle_logits: bool = False,
    ) -> dict[str, torch.Tensor]:
        inputs = {
            key: value
            for key, value in (
                ("pixel_values", pixel_values),
                ("features", features),
                ("input_ids", input_ids),
                ("attention_mask", attention_mask),
            )
            if value is not None
        }
        logits = self.particle_logits(**inputs)
        log_mean = torch.logsumexp(torch.log_softmax(logits.float(), -1), 0) - math.log(
            self.num_particles
        )
        out = {"logits": log_mean}
        if labels is not None:
            out["loss"] = nn.functional.nll_loss(log_mean, labels)
        if return_particle_logits:
            out["particle_logits"] = logits
        return out

    # -- particles as models ----------------------------------------------------------------

    def template_parameters(self) -> list[nn.Parameter]:
        """The wrapped model's tensors that the particles replace (frozen), in :attr:`names` order."""
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.names]

    @contextlib.contextmanager
    def particle(self, index: int) -> Iterator[nn.Module]:
        """The wrapped model holding particle ``index``'s weights inside the block (restored after)."""
        if not 0 <= index < self.num_particles:
            raise IndexError(f"particle {index} of {self.num_particles}")
        targets = self.template_parameters()
        saved = [t.detach().clone() for t in targets]
        with torch.no_grad():
            for t, stacked in zip(targets, self.particles):
                t.copy_(stacked[index])
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for t, s in zip(targets, saved):
                    t.copy_(s)

    # -- save / load / push -----------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """``particle_<i>/`` per particle (a PEFT adapter for a PeftModel, else a safetensors file
        of its trainable tensors) and ``particle_ensemble.json`` (m, names, format version).

        All-or-nothing (:func:`hf_extensions.atomic.atomic_save`): a process killed mid-save
        leaves the previous ensemble or this one, never particles of both. ``particle_<i>``
        folders of an earlier, larger ensemble are removed after the commit."""
        directory = Path(save_directory)
        peft = _is_peft_model(self.model)
        with atomic_save(directory) as stage:
            for i in range(self.num_particles):
                target = stage / f"particle_{i}"
                with self.particle(i) as model:
                    if peft:
                        model.save_pretrained(str(target), **kwargs)
                    else:
                        target.mkdir()
                        save_file(
                            {
                                n: t[i].detach().contiguous()
                                for n, t in zip(self.names, self.particles)
                            },
                            target / PARTICLE_WEIGHTS_NAME,
                        )
            config = {
                "format_version": FORMAT_VERSION,
                "num_particles": self.num_particles,
                "names": self.names,
                "peft": peft,
            }
            (stage / ENSEMBLE_CONFIG_NAME).write_text(json.dumps(config, indent=2))
        for folder in directory.glob("particle_*"):
            index = folder.name.removeprefix("particle_")
            if index.isdigit() and int(index) >= self.num_particles and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | os.PathLike, mode: str = "auto"
    ) -> ParticleEnsemble:
        """Rebuild the ensemble saved by :meth:`save_pretrained` over ``model``.

        ``model`` is the base model for a PEFT save (each ``particle_<i>`` is loaded with
        ``PeftModel.from_pretrained`` semantics) or the same architecture for a plain save.
        An interrupted save is first finished or discarded
        (:func:`hf_extensions.atomic.recover_interrupted_save`). The saved configuration is
        validated and every particle's file is checked against the model's trainable tensors
        (:func:`hf_extensions.loading.check_tensors`): a wrong format version, particle count or
        tensor names, a missing or unexpected tensor, or one of another shape (e.g. a head of
        another ``num_labels``) raise ``ValueError`` naming the file and the tensor.
        """
        directory = Path(directory)
        recover_interrupted_save(directory)
        config_path = directory / ENSEMBLE_CONFIG_NAME
        if not config_path.is_file():
            raise ValueError(
                f"{directory} holds no {ENSEMBLE_CONFIG_NAME}: not a particle ensemble; pass the "
                "folder ParticleEnsemble.save_pretrained wrote."
            )
        config = read_json(config_path)
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_path}: particle ensemble format {config.get('format_version')!r} is not "
                f"supported (expected {FORMAT_VERSION}); re-save it with this version."
            )
        m = config.get("num_particles")
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(
                f"{config_path}: `num_particles` must be an integer in [1, inf), got {m!r}; "
                "re-save the ensemble."
            )
        peft = config.get("peft")
        if peft:
            model = load_peft_model(model, directory / "particle_0", is_trainable=True)
            expected = get_peft_model_state_dict(model)
            files = [directory / f"particle_{i}" / SAFETENSORS_WEIGHTS_NAME for i in range(m)]
        else:
            expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
            files = [directory / f"particle_{i}" / PARTICLE_WEIGHTS_NAME for i in range(m)]
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        if names != config.get("names"):
            raise ValueError(
                f"{config_path}: the saved particles hold tensors {config.get('names')}; the "
                f"model trains {names}: load it into the architecture it was saved from."
            )
        columns: list[list[torch.Tensor]] = [[] for _ in named]
        for path in files:
            state = read_tensors(path)
            check_tensors(path, state, expected)  # every tensor, right shape: nothing kept over
            with torch.no_grad():
                if peft:
                    set_peft_model_state_dict(model, state)
                else:
                    for n, p in named:
                        p.copy_(state[n])
            for column, (_, p) in zip(columns, named):
                column.append(p.detach().clone())
        with torch.no_grad():
            for (_, p), column in zip(named, columns):
                p.copy_(column[0])
                p.requires_grad_(False)
        ensemble = cls.__new__(cls)
        nn.Module.__init__(ensemble)
        ensemble.model = model
        ensemble.num_particles = m
        ensemble.seed = None
        ensemble.names = names
        ensemble.particles = nn.ParameterList([nn.Parameter(torch.stack(c)) for c in columns])
        ensemble.mode = mode
        return ensemble

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload particle ensemble", **kwargs):
        """Save to a temporary folder and upload it as one commit (``huggingface_hub``)."""
        from huggingface_hub import HfApi

        api = HfApi()
        repo = api.create_repo(repo_id, exist_ok=True, private=kwargs.pop("private", None))
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return api.upload_folder(
                repo_id=repo.repo_id, folder_path=folder, commit_message=commit_message, **kwargs
            )
