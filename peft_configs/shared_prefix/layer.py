"""The tuner layer of shared-structure prefix tuning: one attention module and its prefixes.

:class:`SharedPrefixLayer` wraps a self-attention module (PEFT's ``base_layer`` convention) and
owns the per-layer adapter weights. At every forward it computes its prefix keys/values from
them (Le et al., ICLR 2025; ``[P^K_l | P^V_l] = g_l(p'_l)`` for ``per_layer_mlp``) and injects
them through the module's :class:`~peft_configs.injection.PrefixSite` (decoding with a cache:
once, written into the cache at the prefill and read from it afterwards). The ``global_mlp``
weights are shared by all layers and live on the tuner (``SharedPrefixModel``); each layer
computes only its own rows of the shared MLP's output (``W_2[rows] tanh(W_1 p' + b_1) +
b_2[rows]``), so no layer computes another layer's prefix and generation / gradient
checkpointing need no per-forward cache.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_configs.injection import PrefixSite
from peft_configs.shared_prefix.config import SharedPrefixTuningConfig

__all__ = ["GlobalPrefixSlice", "SharedPrefixLayer", "init_latent_"]

MATERIALIZED = "materialized"


def init_latent_(tensor: torch.Tensor) -> torch.Tensor:
    """Uniform in ``+-sqrt(3 / width)`` (Xavier for a square map of the latent's width).

    For ViT-B/16 (width 768) this is the official code's VPT initialisation
    ``sqrt(6 / (3 * 16 * 16 + 768))``; it keeps prefix keys at the scale of token keys.
    """
    bound = math.sqrt(3.0 / tensor.shape[-1])
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


class GlobalPrefixSlice:
    """One layer's rows of the ``global_mlp`` output (a plain object: it registers nothing).

    The latent table and MLP are the tuner's ``shared_prefix_embedding``,
    ``shared_prefix_global_up`` and ``shared_prefix_global_down`` containers; rows
    ``[2 d position, 2 d (position + 1))`` of the output are this layer's ``[P^K | P^V]``, the
    order of PEFT's ``PrefixEncoder`` output (keys then values, layer after layer).
    """

    def __init__(
        self,
        embedding: nn.ParameterDict,
        up: nn.ModuleDict,
        down: nn.ModuleDict,
        adapter_name: str,
        position: int,
        kv_dim: int,
    ) -> None:
        self.embedding, self.up, self.down = embedding, up, down
        self.adapter_name = adapter_name
        self.rows = slice(2 * kv_dim * position, 2 * kv_dim * (position + 1))

    def __call__(self) -> torch.Tensor:
        name = self.adapter_name
        hidden = torch.tanh(self.up[name](self.embedding[name]))
        down = self.down[name]
        return F.linear(hidden, down.weight[self.rows], down.bias[self.rows])


class SharedPrefixLayer(nn.Module, BaseTunerLayer):
    """A self-attention module with shared-structure prefixes injected (one per adapter).

    Adapter weights (``{adapter name: ...}`` containers, as PEFT's LoRA layers):

    - ``shared_prefix_latent``: the latent ``p'_l`` (``[n, latent_dim]``), or the deep prompts of
      ``simple_share`` (``[n, hidden_size]``);
    - ``shared_prefix_up`` / ``shared_prefix_down``: the per-layer MLP (``per_layer_mlp``: both;
      ``per_layer_linear``: ``up`` only);
    - ``shared_prefix_kv``: ``[P^K_l | P^V_l]`` itself (``[n, 2 d]``), for ``share="none"`` and for
      every adapter after :meth:`materialize`.

    Several active adapters contribute their prefixes one after another (concatenated).
    ``merge`` is refused: a prefix is not a weight update (use ``materialize``).
    """

    adapter_layer_names = (
        "shared_prefix_latent",
        "shared_prefix_up",
        "shared_prefix_down",
        "shared_prefix_kv",
    )
    other_param_names = ("shared_prefix_dropout",)

    def __init__(self, base_layer: nn.Module, site: PrefixSite) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.site = site
        self.shared_prefix_latent = nn.ParameterDict()
        self.shared_prefix_up = nn.ModuleDict()
        self.shared_prefix_down = nn.ModuleDict()
        self.shared_prefix_kv = nn.ParameterDict()
        self.shared_prefix_dropout = nn.ModuleDict()
        self.share: dict[str, str] = {}
        self.global_slices: dict[str, GlobalPrefixSlice] = {}
        self._active_adapter: str | list[str] = []
        self.merged_adapters = []

    # ------------------------------------------------------------------------- construction
    def _factory(self) -> dict[str, Any]:
        reference = next(self.base_layer.parameters())
        dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
        return {"device": reference.device, "dtype": dtype}

    def update_layer(
        self,
        adapter_name: str,
        config: SharedPrefixTuningConfig,
        global_slice: GlobalPrefixSlice | None = None,
        inference_mode: bool = False,
    ) -> None:
        """Create the weights of ``adapter_name`` for this layer (fresh initialisation)."""
        factory = self._factory()
        n, d = config.num_virtual_tokens, self.site.kv_dim
        share = MATERIALIZED if config.materialized else config.share
        if share in ("none", MATERIALIZED):
            self.shared_prefix_kv[adapter_name] = nn.Parameter(
                init_latent_(torch.empty(n, 2 * d, **factory))
            )
        elif share == "global_mlp":
            if global_slice is None:
                raise ValueError("share='global_mlp' needs the tuner's global prefix encoder")
            self.global_slices[adapter_name] = global_slice
        elif share == "simple_share":
            width = self.site.module.config.hidden_size
            self.shared_prefix_latent[adapter_name] = nn.Parameter(
                init_latent_(torch.empty(n, width, **factory))
            )
        else:  # per_layer_mlp, per_layer_linear
            latent = config.latent_dim
            self.shared_prefix_latent[adapter_name] = nn.Parameter(
                init_latent_(torch.empty(n, latent, **factory))
            )
            if share == "per_layer_mlp":
                self.shared_prefix_up[adapter_name] = nn.Linear(
                    latent, config.hidden_size, **factory
                )
                self.shared_prefix_down[adapter_name] = nn.Linear(
                    config.hidden_size, 2 * d, **factory
                )
            else:
                self.shared_prefix_up[adapter_name] = nn.Linear(latent, 2 * d, **factory)
        self.shared_prefix_dropout[adapter_name] = (
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        )
        self.share[adapter_name] = share
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    # ------------------------------------------------------------------------- the prefix
    def prefix(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P^K_l, P^V_l)`` of ``adapter_name``, each ``[n, kv_dim]`` (dropout when training)."""
        share = self.share[adapter_name]
        dropout = self.shared_prefix_dropout[adapter_name]
        if share == "simple_share":
            return self.site.project(dropout(self.shared_prefix_latent[adapter_name]))
        if share in ("none", MATERIALIZED):
            key_value = self.shared_prefix_kv[adapter_name]
        elif share == "global_mlp":
            key_value = self.global_slices[adapter_name]()
        elif share == "per_layer_mlp":
            hidden = torch.tanh(
                self.shared_prefix_up[adapter_name](self.shared_prefix_latent[adapter_name])
            )
            key_value = self.shared_prefix_down[adapter_name](hidden)
        else:  # per_layer_linear
            key_value = torch.tanh(
                self.shared_prefix_up[adapter_name](self.shared_prefix_latent[adapter_name])
            )
        keys, values = dropout(key_value).chunk(2, dim=-1)
        return keys, values

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapters = [name for name in self.active_adapters if name in self.share]
        if self.disable_adapters or not adapters:
            return self.base_layer(*args, **kwargs)

        def make_prefix() -> tuple[torch.Tensor, torch.Tensor]:
            prefixes = [self.prefix(name) for name in adapters]
            if len(prefixes) == 1:
                return prefixes[0]
            return torch.cat([k for k, _ in prefixes]), torch.cat([v for _, v in prefixes])

        return self.site.run(self.base_layer, args, kwargs, make_prefix)

    # ------------------------------------------------------------------------- PEFT hooks
    @torch.no_grad()
    def materialize(self, adapter_name: str) -> None:
        """Store ``[P^K | P^V]`` of ``adapter_name`` and drop its latent and MLP (frozen)."""
        if self.share.get(adapter_name) in (None, MATERIALIZED):
            return
        was_training = self.training
        self.eval()  # no dropout in the stored prefix
        try:
            keys, values = self.prefix(adapter_name)
        finally:
            self.train(was_training)
        for container in (
            self.shared_prefix_latent,
            self.shared_prefix_up,
            self.shared_prefix_down,
        ):
            if adapter_name in container:
                del container[adapter_name]
        self.global_slices.pop(adapter_name, None)
        self.shared_prefix_kv[adapter_name] = nn.Parameter(
            torch.cat([keys, values], dim=-1).detach().clone(), requires_grad=False
        )
        self.share[adapter_name] = MATERIALIZED

    def delete_adapter(self, adapter_name: str) -> None:
        self.share.pop(adapter_name, None)
        self.global_slices.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def _all_available_adapter_names(self) -> list[str]:
        return sorted(self.share)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "a prefix cannot be merged into the attention weights; use model.materialize() to "
            "drop the reparameterisation for inference, or model.unload() to remove the prefix"
        )

    def unmerge(self) -> None:
        return None

    def __repr__(self) -> str:
        return "shared_prefix." + super().__repr__()
