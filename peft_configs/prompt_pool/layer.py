"""The tuner layer of the prompt pool: one attention module and its layer's share of the prompts.

:class:`PromptPoolLayer` wraps a self-attention module (PEFT's ``base_layer`` convention) and owns
this layer's slice of every prompt of the pool, ``prompt_pool_prompts[adapter]`` of shape
``[pool_size, 2, prompt_length, kv_dim]`` (key prefix, value prefix). At every forward it reads
the per-sample selection ``[B, k]`` made by the tuner for this batch
(:class:`~peft_configs.prompt_pool.selection.PoolState`), concatenates the ``k`` selected prompts
in rank order and injects them as a per-sample prefix ``[B, k * prompt_length, kv_dim]`` through
the module's :class:`~peft_configs.injection.PrefixSite` (L2P/PromptDSI prefix prompts); when
decoding with a cache, the prompts selected at the prefill are written into the cache then and
read from it at every later step (:meth:`~peft_configs.injection.PrefixSite.run`). Indexing
the prompt table with the selection means only the selected prompts' rows receive gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_configs.injection import PrefixSite
from peft_configs.prompt_pool.config import PromptPoolConfig
from peft_configs.prompt_pool.selection import PoolState

__all__ = ["PromptPoolLayer"]


class PromptPoolLayer(nn.Module, BaseTunerLayer):
    """A self-attention module that gets the prefixes of the prompts selected for each sample.

    Prompts start uniform in ``[-1, 1]``, L2P's ``prompt_init='uniform'``. ``merge`` is refused: a
    prompt chosen per input is not a weight update.
    """

    adapter_layer_names = ("prompt_pool_prompts",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, site: PrefixSite, pool_state: PoolState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.site = site
        self.pool_state = pool_state
        self.prompt_pool_prompts = nn.ParameterDict()
        self._active_adapter: str | list[str] = []
        self.merged_adapters = []

    def update_layer(
        self, adapter_name: str, config: PromptPoolConfig, inference_mode: bool = False
    ) -> None:
        """Create this layer's prompts of ``adapter_name``: ``[pool_size, 2, length, kv_dim]``."""
        reference = next(self.base_layer.parameters())
        dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
        shape = (config.pool_size, 2, config.prompt_length, self.site.kv_dim)
        prompts = torch.empty(shape, device=reference.device, dtype=dtype)
        with torch.no_grad():
            prompts.uniform_(-1.0, 1.0)
        self.prompt_pool_prompts[adapter_name] = nn.Parameter(prompts)
        self.set_adapter(self.active_adapters or [adapter_name], inference_mode=inference_mode)

    def prefix(
        self, adapter_name: str, selection: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample ``(keys, values)``, each ``[B, k * length, kv_dim]``, of ``selection [B, k]``.

        Departure from the official prefix-prompt code (DualPrompt / HiDe-Prompt ``prompt.py``,
        which L2P-style prefix pools reuse): it gathers the selected prompts as ``(L, 2, B, k,
        length, C)`` and reshapes them to ``(L, B, 2, k * length, heads, head_dim)`` without a
        permute, so the key/value axis and the batch axis are interleaved: in the first half of
        the batch the value prefix is made of key prompts, in the second half the key prefix of
        value prompts (K = V in each half when every sample picks the same prompts). Here each
        sample gets its own prompts' key part as keys and value part as values, as prefix tuning
        (Li & Liang, 2021) and the papers' equations define them.
        """
        chosen = self.prompt_pool_prompts[adapter_name][selection]  # [B, k, 2, length, d]
        batch = chosen.shape[0]
        keys = chosen[:, :, 0].reshape(batch, -1, chosen.shape[-1])
        values = chosen[:, :, 1].reshape(batch, -1, chosen.shape[-1])
        return keys, values

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state = self.pool_state
        adapters = [name for name in self.active_adapters if name in self.prompt_pool_prompts]
        if self.disable_adapters or state.bypass or not adapters:
            return self.base_layer(*args, **kwargs)
        if len(adapters) > 1:
            raise ValueError(
                f"the prompt pool runs one adapter at a time; active: {adapters} (set_adapter)"
            )
        name = adapters[0]

        def make_prefix() -> tuple[torch.Tensor, torch.Tensor]:
            if state.selection is None:
                raise RuntimeError(
                    "no prompt selection for this forward: call the model wrapped by the prompt "
                    "pool (the PeftModel or its base model), not one of its submodules"
                )
            return self.prefix(name, state.selection)

        return self.site.run(self.base_layer, args, kwargs, make_prefix)

    def _all_available_adapter_names(self) -> list[str]:
        return sorted(self.prompt_pool_prompts.keys())

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError("prompts selected per input cannot be merged into the attention weights")

    def unmerge(self) -> None:
        return None

    def __repr__(self) -> str:
        return "prompt_pool." + super().__repr__()
