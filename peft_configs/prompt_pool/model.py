"""The PEFT tuner of the prompt pool (``get_peft_model`` with a :class:`PromptPoolConfig`).

L2P (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022) and PromptDSI (Huynh
et al., arXiv 2406.12593). Built as a PEFT ``BaseTuner`` that wraps the chosen self-attention
modules (PEFT refuses new prompt-learning types) over the project's one prefix-injection
mechanism (:mod:`peft_configs.injection`), so ``save_pretrained`` / ``PeftModel.from_pretrained``
(keys and prompts in ``adapter_model.safetensors``), ``disable_adapter()``, ``unload()`` and
``push_to_hub`` work as for PEFT's own tuners.

Per forward: a forward pre-hook on the wrapped ``transformers`` model takes the optional
``prompt_ids=`` argument out of the call, computes the query feature (``input_embed_mean``: the
input embeddings, no encoder pass; ``frozen_cls``: a second, prompt-free pass; ``layer_k_cls``: a
pre-hook on block ``query_layer`` of the same pass), selects the ``top_k`` prompts by cosine
similarity (or takes ``prompt_ids``), and the :class:`PromptPoolLayer` modules inject the selected
prompts as per-sample prefixes. The model returns exactly what the base model returns.

Decoding (``generate()``): the query and the selection are made once, at the prefill, from the
whole prompt; the selected prompts are written into the ``DynamicCache`` there, and every later
step (which sees only the new token) reuses them from the cache: no query, no selection, no
usage count, ``prompt_ids`` ignored. So a generated token sees exactly the prompts a full
forward of the sequence with ``prompt_ids=model.base_model.last_selection`` would give it.
Encoder-decoder models (BART): prompts go into the encoder's and the decoder's self-attention
(never the cross-attention) and the query is computed from the encoder's input; ``generate()``
is refused (it runs the encoder on its own, outside this hook).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from hf_extensions.validation import check_allocation
from peft_configs.injection import (
    PrefixSite,
    attach_prefix_sites,
    holds_prefix,
    self_attention_cache,
    unwrap_attention_layers,
    without_base_layer,
)
from peft_configs.prompt_pool.config import PromptPoolConfig
from peft_configs.prompt_pool.layer import PromptPoolLayer
from peft_configs.prompt_pool.selection import (
    PoolState,
    backbone_inputs,
    backbone_of,
    block_input,
    check_query_backbone,
    cosine_top_k,
    embedding_mean,
    eval_mode,
    first_token,
    model_inputs,
    query_features,
    transformer_blocks,
    usage_entropy,
)

__all__ = ["PromptPoolModel"]

_BATCH_INPUTS = ("input_ids", "inputs_embeds", "pixel_values")


def batch_input(inputs: dict[str, Any]) -> torch.Tensor | None:
    """The call's main input tensor (``input_ids``, ``inputs_embeds`` or ``pixel_values``)."""
    return next((inputs[k] for k in _BATCH_INPUTS if torch.is_tensor(inputs.get(k))), None)


class PromptPoolModel(BaseTuner):
    """A pool of prefix prompts selected per input (L2P / PromptDSI) in a ``transformers`` model.

    Args:
        model: a ``transformers`` model whose attention dispatches through
            ``ALL_ATTENTION_FUNCTIONS`` (BERT/MiniLM, ViT, GPT-2, Llama families), ``eager`` or
            ``sdpa`` attention.
        config: a :class:`PromptPoolConfig`.
        adapter_name: the adapter's name (``"default"``).

    Weights: ``prompt_pool_keys[adapter]`` (``[pool_size, d_query]``, held here; trained only for
    ``key_source='learned'``) and each wrapped layer's ``prompt_pool_prompts[adapter]``
    (``[pool_size, 2, prompt_length, kv_dim]``). Fixed keys start as NaN and must be given with
    :meth:`set_keys` before the first forward that selects by similarity. A pool whose prompts
    and keys would not fit in the memory free on the model's device is refused (naming
    ``pool_size``) before any of them is allocated.

    Example::

        import peft_configs  # registers the method with PEFT
        from peft import get_peft_model
        from peft_configs.prompt_pool import PromptPoolConfig, query_features, topic_keys

        feats = query_features(encoder, **corpus_batch, query_source="input_embed_mean")
        keys, _ = topic_keys(feats, num_topics=8)
        model = get_peft_model(encoder, PromptPoolConfig(pool_size=8, key_source="fixed"))
        model.base_model.set_keys(keys)
        out = model(**batch)                              # cosine top-k selection
        out = model(**batch, prompt_ids=task_ids)         # task-indexed prompts
        model.base_model.usage_entropy()

    Departures from L2P's official code: the pull loss is ``weight * mean(1 - cos)`` over the
    selected keys (L2P subtracts ``coeff * sum(cos) / B``: the same gradient up to a factor
    ``top_k``) and is read from :meth:`auxiliary_loss` rather than added inside the model; no
    batch-wise majority vote of prompts. The frozen query pass runs the same weights in eval mode
    (L2P keeps a frozen copy of the pretrained model; the weights are frozen here too).
    """

    prefix: str = "prompt_pool_"
    tuner_layer_cls = PromptPoolLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ----------------------------------------------------------------------------- injection
    def _pre_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        if not hasattr(self, "prompt_pool_keys"):
            self.prompt_pool_keys = nn.ParameterDict()
            self.pool_state = PoolState()
            self._usage: dict[str, torch.Tensor] = {}
            self._prefix_targets: dict[str, PrefixSite] = {}
            self._hooks: list[Any] = []
            self._block_hooks: dict[int, Any] = {}

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        if not isinstance(peft_config, PromptPoolConfig):
            raise TypeError(f"expected a PromptPoolConfig, got {type(peft_config).__name__}")
        return peft_config

    def _prepare_model(self, peft_config: PromptPoolConfig, model: nn.Module) -> None:
        """Attach the prefix sites of the chosen layers and check the query layer against them."""
        check_query_backbone(model)
        sites = attach_prefix_sites(model, peft_config.layers)
        if peft_config.query_source == "layer_k_cls":
            count = len(transformer_blocks(model))
            first = min(site.layer_index for site in sites.values())
            if not 0 <= peft_config.query_layer < count:
                raise ValueError(
                    f"`query_layer`={peft_config.query_layer!r} out of range for a model with "
                    f"{count} layers (allowed: 0 to {count - 1})."
                )
            if peft_config.query_layer > first:
                raise ValueError(
                    f"`query_layer`={peft_config.query_layer!r} must be <= the first prompted "
                    f"layer ({first}): the query must not see the prompts."
                )
        self._check_memory(peft_config, model, sites)
        self._prefix_targets = {without_base_layer(name): site for name, site in sites.items()}

    def _check_memory(
        self, config: PromptPoolConfig, model: nn.Module, sites: dict[str, PrefixSite]
    ) -> None:
        """Refuse a pool whose prompts and keys cannot fit in memory, before any is allocated:
        ``pool_size x (sum over layers of 2 x prompt_length x kv_dim + d_query)`` numbers."""
        reference = next(model.parameters())
        dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
        per_prompt = sum(2 * config.prompt_length * site.kv_dim for site in sites.values())
        per_prompt += self._query_dim(model, config)
        nbytes = config.pool_size * per_prompt * dtype.itemsize
        check_allocation(
            "pool_size",
            nbytes,
            reference.device,
            what=f"a prompt pool ({config.pool_size} prompts of `prompt_length`="
            f"{config.prompt_length} on {len(sites)} layer{'s' * (len(sites) != 1)}, with their "
            "keys)",
            fix="use a smaller pool_size or prompt_length, or prompt fewer `layers`",
        )

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        return key in self._prefix_targets

    def _create_and_replace(
        self,
        peft_config: PromptPoolConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        site = self._prefix_targets[current_key]
        if isinstance(target, PromptPoolLayer):
            target.update_layer(adapter_name, peft_config, peft_config.inference_mode)
            return
        new_module = PromptPoolLayer(target, site, self.pool_state)
        new_module.update_layer(adapter_name, peft_config, peft_config.inference_mode)
        self._replace_module(parent, target_name, new_module, target)

    def _query_dim(self, model: nn.Module, config: PromptPoolConfig) -> int:
        backbone = backbone_of(model)
        if config.query_source == "input_embed_mean":
            width = getattr(backbone.get_input_embeddings(), "embedding_dim", None)
            if width is not None:
                return int(width)
        return int(backbone.config.hidden_size)

    def _post_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        reference = next(model.parameters())
        dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
        keys = torch.empty(self._query_dim(model, config), device=reference.device, dtype=dtype)
        keys = keys.expand(config.pool_size, -1).clone()
        if config.key_source == "learned":
            keys.uniform_(-1.0, 1.0)  # L2P's prompt_key_init='uniform'
        else:
            keys.fill_(float("nan"))  # "not set yet": set_keys or a loaded adapter fills them
        self.prompt_pool_keys[adapter_name] = nn.Parameter(keys, requires_grad=False)
        # host: until the first count, which moves it to the selection's device (_record)
        self._usage[adapter_name] = torch.zeros(config.pool_size, dtype=torch.long)
        self._set_keys_requires_grad()
        if not self._hooks:
            self._hooks = [
                model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                model.register_forward_hook(self._after_forward, always_call=True),
            ]
        if config.query_source == "layer_k_cls" and config.query_layer not in self._block_hooks:
            block = transformer_blocks(model)[config.query_layer]
            self._block_hooks[config.query_layer] = block.register_forward_pre_hook(
                self._make_block_hook(config.query_layer), with_kwargs=True
            )

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._set_keys_requires_grad()

    # ----------------------------------------------------------------------------- adapters
    def _adapters_disabled(self) -> bool:
        for module in self.model.modules():
            if isinstance(module, PromptPoolLayer):
                return module.disable_adapters
        return False

    def _set_keys_requires_grad(self, requires_grad: dict[str, bool] | None = None) -> None:
        """Learned keys of the active, trainable adapter train; fixed keys never do."""
        if requires_grad is None:
            requires_grad = {
                name: name in self.active_adapters and not config.inference_mode
                for name, config in self.peft_config.items()
            }
        for name, keys in self.prompt_pool_keys.items():
            learned = self.peft_config[name].key_source == "learned"
            keys.requires_grad_(learned and requires_grad.get(name, False))

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._set_keys_requires_grad(
            {name: name in names and not inference_mode for name in self.peft_config}
        )

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name, keys in self.prompt_pool_keys.items():
            if name in names:
                keys.requires_grad_(
                    requires_grad and self.peft_config[name].key_source == "learned"
                )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.prompt_pool_keys:
            del self.prompt_pool_keys[adapter_name]
        self._usage.pop(adapter_name, None)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ):
        if merge:
            raise ValueError(
                "prompts selected per input cannot be merged into the weights; use "
                "model.unload() to remove the pool"
            )
        unwrap_attention_layers(self.model, PromptPoolLayer)
        for handle in [*self._hooks, *self._block_hooks.values()]:
            handle.remove()
        self._hooks, self._block_hooks = [], {}
        return super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, adapter_names=adapter_names
        )

    def _active_name(self) -> str:
        names = [name for name in self.active_adapters if name in self.prompt_pool_keys]
        if len(names) != 1:
            raise ValueError(
                f"the prompt pool runs exactly one adapter at a time; active: "
                f"{self.active_adapters} (use set_adapter)"
            )
        return names[0]

    @property
    def active_pool_config(self) -> PromptPoolConfig:
        """The config of the active adapter."""
        return self.peft_config[self._active_name()]

    # ----------------------------------------------------------------------------- keys
    def get_keys(self, adapter_name: str | None = None) -> torch.Tensor:
        """The keys ``[pool_size, d_query]`` of ``adapter_name`` (the active adapter)."""
        return self.prompt_pool_keys[adapter_name or self._active_name()]

    @torch.no_grad()
    def set_keys(self, keys: torch.Tensor, adapter_name: str | None = None) -> None:
        """Give the pool its keys, ``[pool_size, d_query]`` (PromptDSI's fixed topic keys).

        The keys are stored in the adapter (saved with ``save_pretrained``); fixed keys stay
        frozen, learned keys are (re-)initialised with them and keep training.
        """
        name = adapter_name or self._active_name()
        target = self.prompt_pool_keys[name]
        keys = torch.as_tensor(keys)  # host: user input, copied into the keys below
        if keys.shape != target.shape:
            raise ValueError(
                f"keys must be [pool_size, d_query] = {list(target.shape)}, got "
                f"{list(keys.shape)} (pool_size follows the number of topics: build the config "
                f"with pool_size={keys.shape[0] if keys.dim() else '?'})"
            )
        if not torch.isfinite(keys).all():
            raise ValueError("keys contain NaN or inf")
        target.copy_(keys.to(device=target.device, dtype=target.dtype))

    def _checked_keys(self, name: str) -> torch.Tensor:
        keys = self.prompt_pool_keys[name]
        if not torch.isfinite(keys).all():
            raise RuntimeError(
                f"adapter {name!r} has key_source='fixed' but no keys yet: call "
                "model.base_model.set_keys(keys) (e.g. keys from topic_keys(query_features(...))) "
                "before the first forward, or pass prompt_ids="
            )
        return keys

    # ----------------------------------------------------------------------------- prompts
    def _layers_in_order(self) -> list[PromptPoolLayer]:
        layers = [m for m in self.model.modules() if isinstance(m, PromptPoolLayer)]
        return sorted(layers, key=lambda m: m.site.layer_index)

    def prompts(self, adapter_name: str | None = None) -> torch.Tensor:
        """All prompts, ``[pool_size, num_layers, 2, prompt_length, kv_dim]`` (a stacked copy)."""
        name = adapter_name or self._active_name()
        return torch.stack([m.prompt_pool_prompts[name] for m in self._layers_in_order()], dim=1)

    @torch.no_grad()
    def copy_prompt_(self, source: int, target: int, adapter_name: str | None = None) -> None:
        """Prompt ``target`` := prompt ``source`` in every layer (HiDe: task t starts from t-1)."""
        name = adapter_name or self._active_name()
        size = self.peft_config[name].pool_size
        for index in (source, target):
            if not 0 <= index < size:
                raise ValueError(f"prompt id {index} out of range (pool_size {size})")
        for layer in self._layers_in_order():
            table = layer.prompt_pool_prompts[name]
            table[target].copy_(table[source])

    # ----------------------------------------------------------------------------- queries
    def query(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The active adapter's query feature of a batch, ``[B, d_query]`` (no prompts, no grad)."""
        config = self.active_pool_config
        return query_features(
            self.model,
            *args,
            query_source=config.query_source,
            query_layer=config.query_layer,
            **kwargs,
        )

    def _forced_selection(
        self, prompt_ids: Any, batch: int | None, config: PromptPoolConfig
    ) -> torch.Tensor:
        ids = torch.as_tensor(prompt_ids)  # host: a Python int or list (a tensor keeps its device)
        if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(f"prompt_ids must be integers, got dtype {ids.dtype}")
        if ids.dim() == 0:
            if batch is None:
                raise ValueError("a scalar prompt_ids needs input_ids/inputs_embeds/pixel_values")
            ids = ids.expand(batch)
        if ids.dim() == 1:
            ids = ids.unsqueeze(1)
        if ids.dim() != 2 or (batch is not None and ids.shape[0] != batch):
            raise ValueError(
                f"prompt_ids must be an int, [B] or [B, top_k] with B={batch}, got shape "
                f"{list(ids.shape)}"
            )
        if ids.shape[1] not in (1, config.top_k):
            raise ValueError(
                f"prompt_ids [B, k] needs k = 1 or top_k = {config.top_k}, got k = {ids.shape[1]}"
            )
        # checked where it is free (the host); on an accelerator an index out of range is a
        # device-side error of the prompt gather instead (checking there would sync every step)
        on_host = ids.device.type == "cpu" and ids.numel() > 0
        if on_host and (ids.min() < 0 or ids.max() >= config.pool_size):
            raise ValueError(
                f"prompt_ids must lie in [0, {config.pool_size}), got {ids.min()}..{ids.max()}"
            )
        device = self.prompt_pool_keys[self._active_name()].device
        return ids.to(device=device, dtype=torch.long)

    def _record(self, name: str, selection: torch.Tensor) -> None:
        self.pool_state.selection = selection
        usage = self._usage[name]
        if usage.device != selection.device:
            usage = self._usage[name] = usage.to(selection.device)
        # index_add_ rather than bincount: no host sync (CUDA's bincount reads the max back)
        flat = selection.flatten()
        usage.index_add_(0, flat, torch.ones_like(flat, dtype=usage.dtype))

    def _receive_query(self, query: torch.Tensor, forced: bool) -> None:
        """Store the query; without forced ids, select the ``top_k`` keys by cosine (L2P Eq. 3)."""
        name = self._active_name()
        state = self.pool_state
        state.query = query.detach()
        if forced:
            return
        keys = self._checked_keys(name)
        selection, _ = cosine_top_k(
            state.query.to(keys.dtype), keys.detach(), self.peft_config[name].top_k
        )
        self._record(name, selection)

    # ----------------------------------------------------------------------------- hooks
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of the wrapped model: query, selection, and ``prompt_ids`` removed."""
        prompt_ids = kwargs.pop("prompt_ids", None)
        state = self.pool_state
        if state.bypass or self._adapters_disabled() or not self.active_adapters:
            return args, kwargs
        name = self._active_name()
        config = self.peft_config[name]
        inputs = model_inputs(module, args, kwargs)
        if inputs.get("encoder_outputs") is not None and batch_input(inputs) is None:
            raise ValueError(
                "the prompt pool on an encoder-decoder model selects prompts from the encoder's "
                "input, which this call does not carry (encoder_outputs given, as in generate(), "
                "which runs the encoder on its own): not supported yet. Fix: call the model with "
                "input_ids (teacher forcing), or pool the encoder alone (model.get_encoder())."
            )
        cache = self_attention_cache(inputs)
        if holds_prefix(cache):  # a decoding step: the prompts chosen at the prefill are cached
            state.pending = False
            return args, kwargs
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                f"the prompt pool continues a cached sequence only from its own prefill in a "
                f"DynamicCache; got a {type(cache).__name__} that already holds "
                f"{cache.get_seq_length()} tokens but no prompts. Fix: generate with the default "
                "cache (cache_implementation='dynamic') and the pool enabled from the first step."
            )
        batch = batch_input(inputs)
        batch = None if batch is None else batch.shape[0]
        state.query, state.pending = None, False
        forced = prompt_ids is not None
        if forced:
            self._record(name, self._forced_selection(prompt_ids, batch, config))
        else:
            state.selection = None
        needs_query = not forced or (config.key_source == "learned" and config.pull_loss_weight > 0)
        if not needs_query:
            return args, kwargs
        if config.query_source == "input_embed_mean":
            with torch.no_grad():
                self._receive_query(embedding_mean(module, inputs), forced)
        elif config.query_source == "frozen_cls":
            backbone = backbone_of(module)
            accepted = backbone_inputs(backbone, inputs)
            with torch.no_grad(), state.bypassing(), eval_mode(backbone):
                query = first_token(backbone(**accepted))
            self._receive_query(query, forced)
        else:  # layer_k_cls: the block pre-hook of query_layer takes it from this pass
            state.pending = True
            state.forced = forced
        return args, kwargs

    def _make_block_hook(self, layer_index: int):
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            state = self.pool_state
            if not state.pending or state.bypass:
                return
            config = self.active_pool_config
            if config.query_source != "layer_k_cls" or config.query_layer != layer_index:
                return
            state.pending = False
            with torch.no_grad():
                self._receive_query(block_input(args, kwargs)[:, 0], state.forced)

        return hook

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.pool_state.bypass:
            self.pool_state.pending = False

    # ----------------------------------------------------------------------------- statistics
    @property
    def last_selection(self) -> torch.Tensor | None:
        """``[B, k]`` prompt ids used by the last forward (``None`` before the first)."""
        return self.pool_state.selection

    @property
    def last_query(self) -> torch.Tensor | None:
        """``[B, d_query]`` query feature of the last forward (``None`` when none was needed)."""
        return self.pool_state.query

    def auxiliary_loss(self) -> torch.Tensor:
        """L2P's surrogate (pull) loss of the last forward: ``w * mean(1 - cos(q, k_selected))``.

        L2P Eq. 5 pulls the selected keys towards their queries (the query is detached, so only
        the keys receive gradients). A 0 tensor for fixed keys or ``pull_loss_weight=0``; add it
        to the task loss (``loss = task_loss + model.base_model.auxiliary_loss()``).
        """
        name = self._active_name()
        config = self.peft_config[name]
        keys = self.prompt_pool_keys[name]
        state = self.pool_state
        if (
            config.key_source != "learned"
            or config.pull_loss_weight == 0
            or state.query is None
            or state.selection is None
        ):
            return torch.zeros((), device=keys.device, dtype=keys.dtype)
        chosen = keys[state.selection]  # [B, k, d]
        cosine = F.cosine_similarity(state.query.to(keys.dtype).unsqueeze(1), chosen, dim=-1)
        return config.pull_loss_weight * (1.0 - cosine).mean()

    @property
    def usage_counts(self) -> torch.Tensor:
        """How often each prompt was selected, ``[pool_size]`` long, over all forwards so far."""
        return self._usage[self._active_name()]

    def usage_entropy(self) -> float:
        """Normalised entropy of :attr:`usage_counts` in [0, 1] (1 = uniform, 0 = collapse)."""
        return usage_entropy(self.usage_counts)

    def reset_usage(self) -> None:
        """Zero the usage counts of the active adapter."""
        self._usage[self._active_name()].zero_()
