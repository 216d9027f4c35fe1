"""The K peers of Bayesian mutual learning in one module, and their fused multi-stage features.

:class:`PeerEnsemble` holds the K peers of mutual learning (Zhang et al., "Deep Mutual
Learning", CVPR 2018) in ONE ``nn.Module``, so that ``Trainer``, Accelerate, DDP, one optimizer
and checkpointing see one model. In training mode its forward runs each peer once and returns
the peers' logits (and fused multi-stage features when asked); in evaluation mode it returns the
Bayesian model average: the predictive ``p(y|x) = 1/(K T) sum_k sum_t softmax(f_{w_kt}(x))``
over ``T = mc_samples`` posterior draws of each peer (``logits`` = its log, so a softmax of the
logits gives back the averaged probabilities).
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers.utils import ModelOutput

from hf_extensions.atomic import atomic_save, atomic_write_text, recover_interrupted_save
from hf_extensions.bnn.layers import bayesian_layers, convert_to_bayesian
from hf_extensions.loading import check_tensors, read_json, read_tensors
from hf_extensions.validation import check_integer, refuse

ENSEMBLE_CONFIG_NAME = "peer_ensemble.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------


def _pool(feature: torch.Tensor) -> torch.Tensor:
    """One vector per example: average over space (``[B, C, H, W]``) or tokens (``[B, T, D]``)."""
    if feature.dim() == 4:
        return feature.mean(dim=(2, 3))
    if feature.dim() == 3:
        return feature.mean(dim=1)
    return feature.flatten(1)


def fuse_features(stages: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fuse multi-stage features into one ``[B, D]`` vector per example.

    Each stage is pooled to ``[B, D_s]`` (mean over spatial positions or tokens), standardised
    over its channels (zero mean, unit variance: a layer norm without affine parameters, so that
    every stage counts on the same scale whatever its activation range) and the stages are
    concatenated. Parameter-free, so it adds nothing to train or save. The paper fuses features of
    several stages before its feature-diversity term; its exact fusion could not be read offline,
    and this form is ours.
    """
    if not stages:
        raise ValueError("no feature stage was captured.")
    pooled = [_pool(stage.float()) for stage in stages]
    return torch.cat([F.layer_norm(p, p.shape[-1:]) for p in pooled], dim=-1)


# ---------------------------------------------------------------------------------------------
# the peers of mutual learning in one module
# ---------------------------------------------------------------------------------------------


@dataclass
class PeerEnsembleOutput(ModelOutput):
    """Output of :class:`PeerEnsemble`.

    Attributes:
        loss: training mode: the sum over peers of their cross-entropies (each peer's gradient as
            if trained alone); evaluation mode: the NLL of the averaged prediction.
        logits: ``[B, C]``, log of the peers' averaged predictive probabilities.
        peer_logits: training mode only, ``[K, B, C]``.
        peer_features: training mode with feature capture only, ``[K, B, D]`` fused features.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    peer_logits: torch.Tensor | None = None
    peer_features: torch.Tensor | None = None


def _forward_parameters(module: nn.Module) -> tuple[set[str], bool]:
    """Names ``module.forward`` accepts, and whether it takes ``**kwargs``."""
    params = inspect.signature(module.forward).parameters.values()
    names = {
        p.name
        for p in params
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"
    }
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _auto_feature_layers(peer: nn.Module) -> list[str]:
    """Default stages: the blocks of the peer's longest ``nn.ModuleList`` + the head's input.

    The longest ``ModuleList`` is the stack of blocks in most ``transformers`` models
    (``vit.layers``, ``bert.encoder.layer``, ``resnet.encoder.stages``); the input of the last
    ``nn.Linear`` is the penultimate (pooled) representation.
    """
    lists = [(n, m) for n, m in peer.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    names: list[str] = []
    if lists:
        name, blocks = max(lists, key=lambda item: len(item[1]))
        names.extend(f"{name}.{i}" for i in range(len(blocks)))
    linears = [n for n, m in peer.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        names.append(f"{linears[-1]}:input")
    if not names:
        raise ValueError("could not choose feature layers automatically; name them.")
    return names


class _CaptureHook:
    """Forward (pre-)hook that hands a stage's output (or input) to its ensemble.

    An object rather than a closure, so that ``copy.deepcopy`` and pickling of the ensemble carry
    hooks that point to the copy.
    """

    def __init__(self, ensemble: PeerEnsemble, index: int, is_input: bool):
        self.ensemble = ensemble
        self.index = index
        self.is_input = is_input

    def __call__(self, module, args, output=None):
        self.ensemble._store(self.index, args[0] if self.is_input else output)


class PeerEnsemble(nn.Module):
    """K peer models in one module: one optimizer, accumulation, DDP and checkpoints for all.

    Args:
        peers: the peer models (``transformers`` classifiers, or any module whose forward returns
            a mapping with ``"logits"``); usually Bayesian (:func:`convert_to_bayesian`), but
            deterministic peers work too (plain DML).
        mc_samples: posterior draws per peer averaged by the evaluation-mode forward (20 by
            default; a peer without sampling Gaussian layers is run once).
        feature_layers: stages whose outputs are fused into the features of the
            feature-diversity term (:func:`fuse_features`); a name is a submodule of each peer,
            its output by default or its input with the suffix ``":input"``. ``None``: no feature
            capture; ``"auto"``: :func:`_auto_feature_layers`.

    Inputs: the peers' own inputs (``pixel_values``, ``input_ids``, ``features``...) and
    ``labels``; every peer gets the inputs its ``forward`` accepts. See
    :class:`PeerEnsembleOutput` for what comes back.

    Saving: :meth:`save_pretrained` writes ``model.safetensors`` (all peers' means, ``rho`` and
    buffers) and ``peer_ensemble.json`` (the peers' ``transformers`` configs and how each was
    converted); :meth:`from_pretrained` rebuilds and loads them, strictly.
    """

    # Trainer reads this: the loss is not normalised by `num_items_in_batch` inside the model.
    accepts_loss_kwargs = False

    def __init__(
        self,
        peers: Sequence[nn.Module],
        mc_samples: int = 20,
        feature_layers: Sequence[str] | str | None = None,
    ):
        super().__init__()
        if len(peers) < 1:
            refuse("peers", "a sequence of at least one model", list(peers))
        if not isinstance(mc_samples, int):  # a plain int only (numpy integers too were refused)
            refuse("mc_samples", "an integer in [1, inf)", mc_samples)
        check_integer("mc_samples", mc_samples, low=1)
        self.peers = nn.ModuleList(peers)
        self.mc_samples = mc_samples
        self._signatures = [_forward_parameters(peer) for peer in self.peers]
        self._captured: list[list[torch.Tensor]] | None = None
        self._hooks: list[Any] = []
        self.feature_layers: list[str] | None = None
        self.set_feature_layers(feature_layers)

    # -- features -----------------------------------------------------------------------------

    def set_feature_layers(self, names: Sequence[str] | str | None) -> None:
        """Capture (and fuse) the outputs of ``names`` in every training-mode forward."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if names is None:
            self.feature_layers = None
            return
        if names == "auto":
            names = _auto_feature_layers(self.peers[0])
        if isinstance(names, str) or not names:
            refuse("feature_layers", "a list of module names", names)
        self.feature_layers = list(names)
        for index, peer in enumerate(self.peers):
            for spec in self.feature_layers:
                name, _, where = spec.partition(":")
                if where not in ("", "input"):
                    raise ValueError(
                        f"`feature_layers` entry {spec!r}: the suffix may only be ':input'."
                    )
                try:
                    module = peer.get_submodule(name)
                except AttributeError as error:
                    raise ValueError(
                        f"`feature_layers` entry {spec!r}: peer {index} has no submodule "
                        f"{name!r} (allowed: names from peer.named_modules())."
                    ) from error
                capture = _CaptureHook(self, index, where == "input")
                if where == "input":
                    hook = module.register_forward_pre_hook(capture)
                else:
                    hook = module.register_forward_hook(capture)
                self._hooks.append(hook)

    def _store(self, index: int, value: Any) -> None:
        if self._captured is None:
            return
        if isinstance(value, (tuple, list)):
            value = value[0]
        elif isinstance(value, dict):
            value = next(iter(value.values()))
        self._captured[index].append(value)

    # -- forward ------------------------------------------------------------------------------

    def input_names(self) -> list[str]:
        """Inputs the peers accept (what ``Trainer`` keeps of a dataset), plus ``labels``."""
        names = set().union(*(names for names, _ in self._signatures)) | {"labels"}
        return sorted(names)

    def _peer_inputs(self, index: int, inputs: dict[str, Any]) -> dict[str, Any]:
        names, any_kwargs = self._signatures[index]
        return inputs if any_kwargs else {k: v for k, v in inputs.items() if k in names}

    def _peer_logits(self, index: int, inputs: dict[str, Any]) -> torch.Tensor:
        output = self.peers[index](**self._peer_inputs(index, inputs))
        return output["logits"] if isinstance(output, dict) else output[0]

    def forward(self, labels: torch.Tensor | None = None, **inputs: Any) -> PeerEnsembleOutput:
        if not self.training:
            log_probs = self.peer_log_probs(**inputs).logsumexp(0) - math.log(len(self.peers))
            loss = F.nll_loss(log_probs, labels) if labels is not None else None
            return PeerEnsembleOutput(loss=loss, logits=log_probs)
        capture = self.feature_layers is not None
        self._captured = [[] for _ in self.peers] if capture else None
        try:
            peer_logits = torch.stack(
                [self._peer_logits(k, inputs) for k in range(len(self.peers))]
            )
            features = (
                torch.stack([fuse_features(stages) for stages in self._captured])
                if capture
                else None
            )
        finally:
            self._captured = None
        log_probs = peer_logits.float().log_softmax(-1)
        logits = log_probs.logsumexp(0) - math.log(len(self.peers))
        loss = None
        if labels is not None:
            loss = sum(F.cross_entropy(z.float(), labels) for z in peer_logits)
        return PeerEnsembleOutput(
            loss=loss, logits=logits, peer_logits=peer_logits, peer_features=features
        )

    def peer_log_probs(self, mc_samples: int | None = None, **inputs: Any) -> torch.Tensor:
        """``[K, B, C]``: each peer's log predictive, averaged over ``mc_samples`` draws."""
        samples = self.mc_samples if mc_samples is None else mc_samples
        per_peer = []
        for index, peer in enumerate(self.peers):
            stochastic = any(layer.sampling for _, layer in bayesian_layers(peer))
            draws = samples if stochastic else 1
            log_probs = torch.stack(
                [self._peer_logits(index, inputs).float().log_softmax(-1) for _ in range(draws)]
            )
            per_peer.append(log_probs.logsumexp(0) - math.log(draws))
        return torch.stack(per_peer)

    # -- saving and loading -------------------------------------------------------------------

    def ensemble_config(self) -> dict[str, Any]:
        """What :meth:`from_pretrained` needs besides the weights (written as JSON)."""
        peers = []
        for peer in self.peers:
            config = getattr(peer, "config", None)
            layers = {
                name: {
                    "type": type(layer).__name__,
                    "prior_std": layer.prior_std,
                    "prior_mean": layer.prior_mean,
                    "estimator": layer.estimator,
                }
                for name, layer in bayesian_layers(peer)
            }
            is_hf = hasattr(config, "to_json_string")
            peers.append(
                {
                    "class": type(peer).__name__,
                    "config": json.loads(config.to_json_string(use_diff=False)) if is_hf else None,
                    # not serialised by transformers, but it changes the numerics
                    "attn_implementation": getattr(config, "_attn_implementation", None)
                    if is_hf
                    else None,
                    "bayesian_layers": layers,
                }
            )
        return {
            "hf_extensions_class": type(self).__name__,
            "format_version": FORMAT_VERSION,
            "num_peers": len(self.peers),
            "mc_samples": self.mc_samples,
            "feature_layers": self.feature_layers,
            "peers": peers,
        }

    def save_config(self, save_directory: str | Path) -> Path:
        """Write ``peer_ensemble.json`` in ``save_directory`` (atomically: temporary file, then
        ``os.replace``)."""
        path = Path(save_directory) / ENSEMBLE_CONFIG_NAME
        text = json.dumps(self.ensemble_config(), indent=2) + "\n"
        return atomic_write_text(path, text)

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Weights as safetensors (shared tensors de-duplicated) and ``peer_ensemble.json``, in
        one all-or-nothing save (:func:`hf_extensions.atomic.atomic_save`)."""
        with atomic_save(save_directory) as stage:
            save_model(self, str(stage / WEIGHTS_NAME), metadata={"format": "pt"})
            self.save_config(stage)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        peer_factory: Callable[[int], nn.Module] | None = None,
    ) -> PeerEnsemble:
        """Rebuild the peers, convert them as they were, and load the weights (strictly).

        ``transformers`` peers are rebuilt from their saved configs (the class must be one of
        ``transformers``' model classes: nothing else is imported). Other peers need
        ``peer_factory(index)`` returning the deterministic architecture of peer ``index``.
        An interrupted save is first finished or discarded; a weights file that lacks a tensor,
        holds an unknown one or one of another shape is refused naming the file and the tensor.
        """
        directory = Path(directory)
        recover_interrupted_save(directory)
        path = directory / ENSEMBLE_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: not a saved {cls.__name__}; pass the folder "
                f"{cls.__name__}.save_pretrained (or BNNMutualTrainer) wrote."
            )
        config = read_json(path)
        if config.get("hf_extensions_class") != cls.__name__:
            raise ValueError(
                f"{path} describes a {config.get('hf_extensions_class')!r}, not a {cls.__name__}."
            )
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format version {config.get('format_version')!r}; this version of "
                f"hf-extensions reads version {FORMAT_VERSION}."
            )
        if not isinstance(config.get("peers"), list) or config.get("num_peers") != len(
            config["peers"]
        ):
            raise ValueError(
                f"{path}: `peers` must be a list of `num_peers` ({config.get('num_peers')!r}) "
                "entries; re-save the ensemble."
            )
        peers = []
        for index, entry in enumerate(config["peers"]):
            peer = peer_factory(index) if peer_factory is not None else _build_peer(entry, index)
            for name, layer in entry["bayesian_layers"].items():
                if layer["type"] not in {"BayesianLinear", "BayesianConv2d"}:
                    raise ValueError(f"unknown Gaussian layer type {layer['type']!r} for {name}.")
                convert_to_bayesian(
                    peer,
                    prior_std=float(layer["prior_std"]),
                    prior_mean=layer["prior_mean"],
                    estimator=layer["estimator"],
                    target_modules=[name],
                )
            found = sorted(name for name, _ in bayesian_layers(peer))
            if found != sorted(entry["bayesian_layers"]):
                raise ValueError(
                    f"peer {index}: converting gave the Gaussian layers {found}, the checkpoint "
                    f"has {sorted(entry['bayesian_layers'])}."
                )
            peers.append(peer)
        ensemble = cls(peers, mc_samples=int(config["mc_samples"]))
        ensemble.set_feature_layers(config.get("feature_layers"))
        weights = directory / WEIGHTS_NAME
        # names and shapes first (load_state_dict would name neither the file nor the fix);
        # tensors the saver de-duplicated (tied) may be absent: load_model reports the rest
        check_tensors(
            weights, read_tensors(weights), ensemble.state_dict(), optional=_aliases(ensemble)
        )
        missing, _ = load_model(ensemble, str(weights), strict=False)
        if missing:
            check_tensors(weights, {}, {name: () for name in missing})
        return ensemble.eval()


def _aliases(module: nn.Module) -> set[str]:
    """State-dict names that share storage with another name (tied: the saver keeps one)."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        groups.setdefault(key, []).append(name)
    return {name for names in groups.values() if len(names) > 1 for name in names}


_CLASS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _build_peer(entry: dict[str, Any], index: int) -> nn.Module:
    """A ``transformers`` model from its saved class name and config (no checkpoint download)."""
    import transformers
    from transformers import AutoConfig, PreTrainedModel

    name, config = entry.get("class"), entry.get("config")
    if config is None:
        raise ValueError(
            f"peer {index} ({name}) is not a transformers model: pass `peer_factory` to "
            "PeerEnsemble.from_pretrained to rebuild it."
        )
    model_cls = getattr(transformers, name, None) if _CLASS_NAME.match(str(name)) else None
    if not (isinstance(model_cls, type) and issubclass(model_cls, PreTrainedModel)):
        raise ValueError(f"peer {index}: {name!r} is not a transformers model class.")
    config = dict(config)
    model_type = config.pop("model_type")
    config = AutoConfig.for_model(model_type, **config)
    if entry.get("attn_implementation") is not None:
        config._attn_implementation = entry["attn_implementation"]
    return model_cls(config)
