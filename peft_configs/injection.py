"""Prefix key/value injection into the self-attention of any ``transformers`` attention model.

Prefix tuning (Li & Liang, ACL 2021; Le et al., "Revisiting Prefix-tuning: Statistical Benefits
of Reparameterization among Prompts", ICLR 2025) lets every token of layer ``l`` attend
to ``P`` learned key/value pairs as well as to the sequence::

    Attention_l(X) = softmax(Q(X) [P^K_l ; K(X)]^T / sqrt(d_h)) [P^V_l ; V(X)]     (per head)

with the attention mask extended so that every query attends to the prefix. PEFT's own
``PREFIX_TUNING`` passes the prefix as ``past_key_values``: it works only for models that take a
cache (not ViT, and not BERT classification in current versions) and it moves the tokens'
positions by ``P``. This module instead puts the prefix into the attention call itself, through
``transformers``' attention-function registry, so it works for every model whose attention
modules dispatch through ``ALL_ATTENTION_FUNCTIONS`` (BERT/RoBERTa, ViT, GPT-2, Llama and most
current architectures), with ``eager`` and ``sdpa`` attention:

* :data:`PREFIX_ATTENTION` is registered once with ``AttentionInterface``.
* :func:`attach_prefix_sites` gives each chosen self-attention module (chosen by layer index) a
  :class:`PrefixSite` and a view of the model config whose ``_attn_implementation`` names
  :data:`PREFIX_ATTENTION`; only those modules are routed through it. The model config itself is
  untouched, so masks are still built for the real implementation, and switching the model with
  ``set_attn_implementation`` keeps working (the view reads the real value at every call).
* :func:`prefix_attention_forward` prepends the site's keys/values (after RoPE / the cache, i.e.
  as PEFT's cache entries would be), extends the mask, and calls the real implementation: the
  model file's own ``eager_attention_forward`` for ``eager``, the registered function otherwise.
  With no prefix set it is the real implementation, unchanged.

**Decoding with a cache.** When the attention module is called with a ``DynamicCache`` (what
``generate()`` uses, and what causal LMs build in a forward with ``use_cache=True``), the prefix
is written into the cache once, in front of the first keys/values the layer caches (the
prefill): that layer of the cache becomes a :class:`PrefixCacheLayer`, whose reported length
excludes the prefix (so position ids, ``cache_position`` and the masks transformers builds see
only the tokens). Every later step reads the prefix from the cache with the tokens' keys and
only extends the mask; the prefix is neither recomputed nor concatenated onto the cache again
(PEFT's ``PREFIX_TUNING`` reaches the same cost by passing the prefix as ``past_key_values``;
ours keeps the tokens' positions unshifted). A cache layer of another kind (static, sliding
window, quantised) gets the prefix concatenated at every call, as without a cache.

A prefix is shared by the batch (``[P, kv_dim]``) or per sample (``[B, P, kv_dim]``, what a
prompt pool that picks prompts per input needs), optionally with a per-sample prefix mask
(``[B, P]``, ``True`` = attend) for prefixes of different lengths. Set it for one forward with
``with site.inject(keys, values): model(...)``.

Departures: a prefix with ``flash_attention_*``/``flex_attention`` raises (their masks are not
tensors we can extend); GPT-2 with ``reorder_and_upcast_attn`` bypasses the attention registry
in eager mode and is refused. Attention weights returned by ``eager`` include the prefix columns.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicLayer, EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

__all__ = [
    "PREFIX_ATTENTION",
    "SUPPORTED_IMPLEMENTATIONS",
    "SUPPORTED_MODELS",
    "PrefixCacheLayer",
    "PrefixSite",
    "attach_prefix_sites",
    "check_attention_implementation",
    "check_prefix_injection_supported",
    "detach_prefix_site",
    "extend_attention_mask",
    "find_self_attention_modules",
    "get_prefix_site",
    "holds_prefix",
    "prefix_attention_forward",
    "self_attention_cache",
    "unwrap_attention_layers",
    "without_base_layer",
]

#: Name under which :func:`prefix_attention_forward` is registered with transformers.
PREFIX_ATTENTION = "hf_extensions_prefix"
#: Real attention implementations a prefix can be injected into.
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")
_SITE_ATTRIBUTE = "_hf_extensions_prefix_site"
#: Attribute names of the layer norm applied before self-attention (ViT, GPT-2, Llama families).
_PRE_ATTENTION_NORMS = ("layernorm_before", "ln_1", "input_layernorm")
#: Post-norm encoders: attention reads the previous layer's normalised output directly.
_POST_NORM_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "mpnet", "bart"}
)
#: Attribute names under which decoder layers hold their cross-attention (BART family, BERT
#: decoders, T5, recent encoder-decoders); such modules share the self-attention class.
_CROSS_ATTENTION_NAMES = frozenset(
    {"encoder_attn", "crossattention", "EncDecAttention", "cross_attn"}
)


class _PrefixRoutedConfig:
    """An attention module's view of the model config that routes it through the prefix function.

    Every attribute is read from (and written to) the real config, except
    ``_attn_implementation``, which names :data:`PREFIX_ATTENTION`. The real implementation is
    read again at every call (:attr:`PrefixSite.implementation`), so it follows the model.
    """

    __slots__ = ("_hfx_config",)

    def __init__(self, config: Any) -> None:
        object.__setattr__(self, "_hfx_config", config)

    @property
    def _attn_implementation(self) -> str:
        return PREFIX_ATTENTION

    def __getattr__(self, name: str) -> Any:
        if name == "_hfx_config":  # not yet set (during copy): no recursion
            raise AttributeError(name)
        return getattr(self._hfx_config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._hfx_config, name, value)

    def __reduce__(self):
        return (type(self), (self._hfx_config,))

    def __repr__(self) -> str:
        return f"PrefixRoutedConfig({self._hfx_config.__class__.__name__})"


class PrefixCacheLayer(DynamicLayer):
    """A ``DynamicLayer`` whose first ``prefix_length`` positions hold a prefix, not tokens.

    Written once by :func:`prefix_attention_forward` at the first cached call of a prefixed
    layer (the prefill). ``get_seq_length`` (and so ``get_mask_sizes``, the position ids and
    ``cache_position`` that transformers derives from it) counts the tokens only; ``update``
    returns the prefix and the tokens together, so the prefix is never concatenated again.
    ``prefix_mask`` (``[B, P]`` bool or ``None``) follows beam reordering and batch selection.
    After ``reset`` the layer is an empty plain cache layer until a prefix is written again.
    """

    def __init__(self) -> None:
        super().__init__()
        self.prefix_length = 0
        self.prefix_mask: torch.Tensor | None = None

    @classmethod
    def holding(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        prefix_length: int,
        prefix_mask: torch.Tensor | None,
    ) -> PrefixCacheLayer:
        """A layer holding ``keys``/``values`` (``[B, H, P + T, D]``, the prefix first)."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        layer.prefix_length = prefix_length
        layer.prefix_mask = prefix_mask
        return layer

    @property
    def holds_prefix(self) -> bool:
        return self.is_initialized and self.prefix_length > 0

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return 0
        return self.keys.shape[-2] - self.prefix_length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and -tokens_to_remove > self.get_seq_length():
            raise ValueError(
                f"cannot crop {-tokens_to_remove} tokens from a cache layer holding "
                f"{self.get_seq_length()} tokens after its prefix"
            )
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self.prefix_length, self.prefix_mask = 0, None

    def _select_mask(self, select: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.prefix_mask is not None and self.get_seq_length() > 0:
            self.prefix_mask = select(self.prefix_mask)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_mask(lambda mask: mask.index_select(0, beam_idx.to(mask.device)))
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_mask(lambda mask: mask.repeat_interleave(repeats, dim=0))
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_mask(lambda mask: mask[indices, ...])
        super().batch_select_indices(indices)


def self_attention_cache(kwargs: dict[str, Any]) -> Any:
    """The self-attention cache among an attention module's (or model's) keyword arguments.

    transformers 5 passes it as ``cache`` (``past_key_values`` before); an
    ``EncoderDecoderCache`` gives its self-attention part. ``None`` when there is none.
    """
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    return cache if hasattr(cache, "layers") else None


def holds_prefix(cache: Any) -> bool:
    """Whether a layer of ``cache`` (a model-level cache, or ``None``) holds a written prefix:
    the call continues a sequence whose prefill already injected the prefix."""
    cache = self_attention_cache({"cache": cache})
    if cache is None:
        return False
    return any(isinstance(layer, PrefixCacheLayer) and layer.holds_prefix for layer in cache.layers)


def _to_heads(tensor: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """``[P, H*D]`` or ``[B, P, H*D]`` -> ``[1 or B, H, P, D]``."""
    tensor = tensor.unflatten(-1, (num_heads, head_dim)).transpose(-3, -2)
    return tensor.unsqueeze(0) if tensor.dim() == 3 else tensor


class PrefixSite:
    """The prefix injection point of one self-attention module.

    Attributes:
        module: the attention module (its ``config`` is the routed view while attached).
        layer_index: position of the module among the model's self-attention modules.
        num_heads, num_kv_heads, head_dim: the module's geometry; ``kv_dim = num_kv_heads *
            head_dim`` is the width of a prefix key or value (``hidden_size`` without GQA).
        pre_norm: the layer norm applied to the attention input (``None`` if unknown, an
            ``nn.Identity`` for post-norm encoders), used by :meth:`project`.
    """

    def __init__(
        self,
        module: nn.Module,
        layer_index: int,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        pre_norm: nn.Module | None,
    ) -> None:
        self.module = module
        self.layer_index = layer_index
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.pre_norm = pre_norm
        self.config = module.config  # the real config
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.prefix_mask: torch.Tensor | None = None
        self.cache: Any = None  # the self-attention cache of the current call (see `run`)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def implementation(self) -> str:
        """The model's real attention implementation, read at every call."""
        return self.config._attn_implementation or "eager"

    @property
    def active(self) -> bool:
        return self.keys is not None

    def set(
        self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None
    ) -> None:
        """Use ``keys``/``values`` (``[P, kv_dim]`` or ``[B, P, kv_dim]``) from now on.

        ``mask`` (``[P]`` or ``[B, P]``, bool, ``True`` = attend) hides prefix positions.
        """
        if keys.shape != values.shape:
            raise ValueError(
                f"prefix keys {tuple(keys.shape)} and values {tuple(values.shape)} differ"
            )
        if keys.dim() not in (2, 3) or keys.shape[-1] != self.kv_dim:
            raise ValueError(
                f"prefix keys must be [P, {self.kv_dim}] or [B, P, {self.kv_dim}] for layer "
                f"{self.layer_index}, got {tuple(keys.shape)}"
            )
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape[-1] != keys.shape[-2] or mask.dim() > 2:
                raise ValueError(
                    f"prefix mask must be bool [P] or [B, P] with P={keys.shape[-2]}, got "
                    f"{mask.dtype} {tuple(mask.shape)}"
                )
            mask = mask if mask.dim() == 2 else mask.unsqueeze(0)
        self.keys = _to_heads(keys, self.num_kv_heads, self.head_dim)
        self.values = _to_heads(values, self.num_kv_heads, self.head_dim)
        self.prefix_mask = mask

    def clear(self) -> None:
        """Stop injecting: the module computes plain attention again."""
        self.keys = self.values = self.prefix_mask = None

    @contextlib.contextmanager
    def inject(
        self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None
    ) -> Iterator[PrefixSite]:
        """Inject for the duration of the ``with`` block (restores what was set before)."""
        previous = (self.keys, self.values, self.prefix_mask)
        self.set(keys, values, mask)
        try:
            yield self
        finally:
            self.keys, self.values, self.prefix_mask = previous

    def cache_layer(self) -> Any:
        """This module's layer of the current call's cache (``None`` without one)."""
        index = getattr(self.module, "layer_idx", None)
        if self.cache is None or index is None or index >= len(self.cache.layers):
            return None
        return self.cache.layers[index]

    def prefix_cached(self) -> bool:
        """Whether the current call's cache already holds this layer's prefix (a decoding step)."""
        layer = self.cache_layer()
        return isinstance(layer, PrefixCacheLayer) and layer.holds_prefix

    def run(
        self,
        forward: Callable,
        args: tuple,
        kwargs: dict[str, Any],
        make_prefix: Callable[[], tuple[torch.Tensor, ...]],
    ) -> Any:
        """``forward(*args, **kwargs)`` of the attention module with the prefix ``make_prefix()``
        (``(keys, values)`` or ``(keys, values, mask)``) injected: the tuner layers' forward.

        With a ``DynamicCache`` among ``kwargs`` the prefix is computed and written into the
        cache at the first (prefill) call only; later calls read it from there and
        ``make_prefix`` is not called (so a prompt pool's selection made at prefill holds for
        every generated token).
        """
        previous = (self.keys, self.values, self.prefix_mask, self.cache)
        self.cache = self_attention_cache(kwargs)
        try:
            if self.prefix_cached():
                self.keys = self.values = self.prefix_mask = None
            else:
                self.set(*make_prefix())
            return forward(*args, **kwargs)
        finally:
            self.keys, self.values, self.prefix_mask, self.cache = previous

    def project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values that ``tokens`` (``[..., hidden_size]``) would have in this layer.

        The tokens go through the layer's frozen pre-attention norm and key/value projections
        (no rotary embedding): Le et al.'s "simple share" deep prompts, and the way to build a
        prefix that acts exactly like prepending real tokens to an encoder's sequence.
        """
        if self.pre_norm is None:
            raise ValueError(
                f"don't know the layer norm before attention in {type(self.module).__name__}; "
                f"known: attributes {_PRE_ATTENTION_NORMS} of the enclosing layer, or a post-norm "
                f"encoder ({sorted(_POST_NORM_MODEL_TYPES)})"
            )
        hidden = self.pre_norm(tokens)
        module = self.module
        if hasattr(module, "k_proj") and hasattr(module, "v_proj"):
            return module.k_proj(hidden), module.v_proj(hidden)
        if hasattr(module, "key") and hasattr(module, "value"):
            return module.key(hidden), module.value(hidden)
        if hasattr(module, "c_attn") and hasattr(module, "split_size"):
            _, keys, values = module.c_attn(hidden).split(module.split_size, dim=-1)
            return keys, values
        raise ValueError(f"don't know the key/value projections of {type(module).__name__}")

    def base_function(self, implementation: str) -> Callable:
        """The attention function of the real implementation for this module."""
        if implementation == "eager":
            function = getattr(
                sys.modules[type(self.module).__module__], "eager_attention_forward", None
            )
            if function is None:
                raise NotImplementedError(
                    f"{type(self.module).__module__} has no eager_attention_forward; use "
                    "attn_implementation='sdpa' with prefix injection"
                )
            return function
        return ALL_ATTENTION_FUNCTIONS[implementation]


def get_prefix_site(module: nn.Module) -> PrefixSite | None:
    """The :class:`PrefixSite` attached to ``module``, if any."""
    return module.__dict__.get(_SITE_ATTRIBUTE)


def extend_attention_mask(
    attention_mask: torch.Tensor | None,
    prefix_length: int,
    *,
    query_length: int,
    key_length: int,
    causal: bool,
    implementation: str,
    dtype: torch.dtype,
    device: torch.device,
    prefix_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Prepend ``prefix_length`` key columns that every query may attend to (or ``prefix_mask``).

    ``attention_mask`` is what the model built for the real implementation: ``None``, a bool
    mask (``True`` = attend; sdpa) or an additive float mask (eager), ``[b, h, q, k]`` with
    broadcastable ``b``/``h``/``q``. ``None`` stays ``None`` (full attention) unless the module is
    causal under sdpa with several queries (sdpa would then apply ``is_causal`` top-left aligned
    over the longer key set, so the causal mask is written out, aligned bottom-right as
    transformers does) or a ``prefix_mask`` hides prefix positions.
    """
    if attention_mask is None:
        needs_causal = implementation == "sdpa" and causal and query_length > 1
        if not needs_causal and prefix_mask is None:
            return None
        if needs_causal:
            rows = torch.arange(query_length, device=device) + (key_length - query_length)
            allowed = rows[:, None] >= torch.arange(key_length, device=device)[None, :]
        else:
            allowed = torch.ones(query_length, key_length, dtype=torch.bool, device=device)
        attention_mask = allowed[None, None]
        if implementation != "sdpa":
            attention_mask = torch.zeros(
                attention_mask.shape, dtype=dtype, device=device
            ).masked_fill(~attention_mask, torch.finfo(dtype).min)
    if prefix_mask is None:
        prefix_mask = torch.ones(1, prefix_length, dtype=torch.bool, device=attention_mask.device)
    prefix_mask = prefix_mask.to(attention_mask.device)
    batch = max(attention_mask.shape[0], prefix_mask.shape[0])
    heads, rows = attention_mask.shape[1], attention_mask.shape[2]
    allowed = prefix_mask[:, None, None, :].expand(batch, heads, rows, prefix_length)
    if attention_mask.dtype == torch.bool:
        block = allowed
    else:
        block = torch.zeros(allowed.shape, dtype=attention_mask.dtype, device=attention_mask.device)
        block = block.masked_fill(~allowed, torch.finfo(attention_mask.dtype).min)
    attention_mask = attention_mask.expand(batch, -1, -1, -1)
    return torch.cat([block, attention_mask], dim=-1)


def prefix_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
):
    """The registered attention function: prefix keys/values prepended, then the real attention.

    ``query`` is ``[B, H, q, D]``, ``key``/``value`` ``[B, H_kv, k, D]`` (after RoPE and the
    cache); the prefix becomes the first ``P`` key/value positions and the mask is extended by
    :func:`extend_attention_mask`. At a cached call whose cache layer is a plain
    ``DynamicLayer`` that layer is replaced by a :class:`PrefixCacheLayer` holding the prefix and
    the keys (the one concatenation); when the cache layer already holds the prefix, ``key``
    starts with it and only the mask is extended. Without a prefix this is exactly the real
    implementation.
    """
    site = get_prefix_site(module)
    if site is None:
        raise RuntimeError(
            f"{type(module).__name__} is routed to {PREFIX_ATTENTION!r} but has no prefix site"
        )
    implementation = site.implementation
    function = site.base_function(implementation)
    layer = site.cache_layer()
    cached = isinstance(layer, PrefixCacheLayer) and layer.holds_prefix and layer.keys is key
    if site.keys is None and not cached:
        return function(module, query, key, value, attention_mask, **kwargs)
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise NotImplementedError(
            f"prefix injection supports attn_implementation {SUPPORTED_IMPLEMENTATIONS}, the model "
            f"uses {implementation!r}"
        )
    batch = query.shape[0]
    if cached:
        prefix_length, prefix_mask = layer.prefix_length, layer.prefix_mask
    else:
        prefix_keys = site.keys.to(device=key.device, dtype=key.dtype)
        prefix_values = site.values.to(device=value.device, dtype=value.dtype)
        if prefix_keys.shape[0] not in (1, batch):
            raise ValueError(
                f"per-sample prefix of batch {prefix_keys.shape[0]} for an input batch of {batch}"
            )
        prefix_length, prefix_mask = prefix_keys.shape[2], site.prefix_mask
        written = type(layer) in (DynamicLayer, PrefixCacheLayer) and layer.keys is key
        key = torch.cat([prefix_keys.expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix_values.expand(batch, -1, -1, -1), value], dim=2)
        if written:  # the prefill: the prefix goes into the cache, once
            if prefix_mask is not None:
                prefix_mask = prefix_mask.expand(batch, -1).contiguous()
            site.cache.layers[module.layer_idx] = PrefixCacheLayer.holding(
                key, value, prefix_length, prefix_mask
            )
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    attention_mask = extend_attention_mask(
        attention_mask,
        prefix_length,
        query_length=query.shape[2],
        key_length=key.shape[2] - prefix_length,
        causal=bool(causal),
        implementation=implementation,
        dtype=query.dtype,
        device=query.device,
        prefix_mask=prefix_mask,
    )
    return function(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(PREFIX_ATTENTION, prefix_attention_forward)


def _attention_classes(model: nn.Module) -> tuple[type, ...]:
    """Self-attention classes declared by the model (``_can_record_outputs["attentions"]``)."""
    classes = []
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        recorder = (getattr(module, "_can_record_outputs", None) or {}).get("attentions")
        if recorder is None:
            continue
        cls = recorder if isinstance(recorder, type) else getattr(recorder, "target_class", None)
        if cls is not None and cls not in classes:
            classes.append(cls)
    return tuple(classes)


#: What prefix injection supports, for error messages.
SUPPORTED_MODELS = (
    "transformers models whose self-attention modules call the ALL_ATTENTION_FUNCTIONS registry "
    "(tested: BERT, RoBERTa, MiniLM, ViT, GPT-2, Llama; most current encoders and decoders)"
)
#: What to do with a model prefix injection does not support.
UNSUPPORTED_FIX = (
    "use another PEFT method for this model (e.g. peft.LoraConfig, or peft.PrefixTuningConfig "
    "for a model that takes past_key_values)"
)


def _describe(model: nn.Module) -> str:
    """``ClassName (model_type 'x')`` of a model, for error messages."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} (model_type {model_type!r})"


def _code_names(code) -> set[str]:
    """Global names a code object and the code objects nested in it refer to."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if hasattr(constant, "co_names"):
            names |= _code_names(constant)
    return names


def _dispatches_through_registry(cls: type) -> bool:
    """Whether a method of the attention class ``cls`` (or of a transformers base of it) looks
    its attention function up in ``ALL_ATTENTION_FUNCTIONS``: the only route a prefix takes."""
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object:
            break
        for attribute in vars(klass).values():
            function = inspect.unwrap(attribute) if callable(attribute) else None
            code = getattr(function, "__code__", None)
            if code is not None and "ALL_ATTENTION_FUNCTIONS" in _code_names(code):
                return True
    return False


def check_prefix_injection_supported(model: nn.Module) -> tuple[type, ...]:
    """Refuse, naming the model and what is supported, a model whose attention a prefix cannot
    reach; return its self-attention classes.

    Raises:
        ValueError: the model declares no attention modules (``_can_record_outputs``; e.g. a
            CNN, Mamba, or an older architecture such as GPT-Neo), or its attention computes
            the scores itself instead of calling the registry (e.g. T5, whose relative position
            bias bypasses it): a prefix would fail deep in the forward or be silently ignored.
    """
    classes = _attention_classes(model)
    if not classes:
        raise ValueError(
            f"prefix injection does not support {_describe(model)}: it declares no attention "
            f"modules (`_can_record_outputs['attentions']`). Supported: {SUPPORTED_MODELS}. "
            f"Fix: {UNSUPPORTED_FIX}."
        )
    bypassing = [cls.__name__ for cls in classes if not _dispatches_through_registry(cls)]
    if bypassing:
        raise ValueError(
            f"prefix injection does not support {_describe(model)}: its attention "
            f"{bypassing} computes attention itself, not through transformers' "
            f"ALL_ATTENTION_FUNCTIONS, so a prefix cannot reach it. Supported: "
            f"{SUPPORTED_MODELS}. Fix: {UNSUPPORTED_FIX}."
        )
    return classes


def check_attention_implementation(model: nn.Module) -> None:
    """Refuse a model whose attention implementation a prefix cannot be injected into.

    Raises:
        ValueError: ``config._attn_implementation`` is not one of
            :data:`SUPPORTED_IMPLEMENTATIONS` (e.g. ``flash_attention_2``, ``flex_attention``).
    """
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation is not None and implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(
            f"prefix injection supports attn_implementation {SUPPORTED_IMPLEMENTATIONS}; "
            f"{_describe(model)} uses {implementation!r}. Fix: load the model with "
            "attn_implementation='sdpa' or call model.set_attn_implementation('sdpa') first."
        )


def _is_cross_attention(name: str, module: nn.Module) -> bool:
    """A cross-attention module: flagged (GPT-2, BERT) or held under a cross-attention name
    (BART's ``encoder_attn``, whose class is also the self-attention's)."""
    if getattr(module, "is_cross_attention", False):
        return True
    return name.rpartition(".")[2] in _CROSS_ATTENTION_NAMES


def find_self_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every self-attention module of ``model``, in layer order.

    The attention classes are those a ``transformers`` model declares for recording attention
    weights (``_can_record_outputs["attentions"]``); cross-attention modules are left out (also
    where they share the self-attention class, as BART's ``encoder_attn``). In an
    encoder-decoder model the encoder's layers come first, then the decoder's (BART with 2 + 2
    layers: indices 0-1 encoder, 2-3 decoder self-attention).
    Unsupported models are refused first (:func:`check_prefix_injection_supported`).
    """
    classes = check_prefix_injection_supported(model)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, classes) and not _is_cross_attention(name, module)
    ]
    if not found:
        raise ValueError(f"no self-attention module of classes {classes} in {type(model).__name__}")
    return found


def _geometry(module: nn.Module) -> tuple[int, int, int]:
    config = module.config
    num_heads = config.num_attention_heads
    head_dim = (
        getattr(module, "head_dim", None)
        or getattr(module, "attention_head_size", None)
        or config.hidden_size // num_heads
    )
    num_kv_heads = num_heads // getattr(module, "num_key_value_groups", 1)
    return num_heads, num_kv_heads, head_dim


def _pre_attention_norm(model: nn.Module, name: str) -> nn.Module | None:
    """The norm applied to the attention input: an attribute of the nearest enclosing layer."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[:depth]))
        for attribute in _PRE_ATTENTION_NORMS:
            norm = getattr(parent, attribute, None)
            if isinstance(norm, nn.Module):
                return norm
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return nn.Identity() if model_type in _POST_NORM_MODEL_TYPES else None


def _normalize_layers(layers: Sequence[int] | None, count: int) -> list[int]:
    if layers is None:
        return list(range(count))
    chosen = []
    for index in layers:
        if not -count <= index < count:
            raise ValueError(f"layer index {index} out of range for a model with {count} layers")
        chosen.append(index % count)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers {list(layers)} name a layer twice")
    return sorted(chosen)


def attach_prefix_sites(
    model: nn.Module, layers: Sequence[int] | None = None
) -> dict[str, PrefixSite]:
    """Attach a :class:`PrefixSite` to the self-attention of each chosen layer; idempotent.

    Args:
        model: a ``transformers`` model (any head).
        layers: layer indices (negative ones count from the end); ``None`` = every layer.

    Returns:
        ``{module name: site}`` in layer order. Nothing is injected until a site is given keys.
    """
    modules = find_self_attention_modules(model)
    check_attention_implementation(model)
    sites = {}
    for index in _normalize_layers(layers, len(modules)):
        name, module = modules[index]
        site = get_prefix_site(module)
        if site is None:
            if getattr(module, "reorder_and_upcast_attn", False):
                raise ValueError(
                    "GPT-2 with reorder_and_upcast_attn=True bypasses the attention registry; "
                    "prefix injection needs it False"
                )
            num_heads, num_kv_heads, head_dim = _geometry(module)
            site = PrefixSite(
                module,
                index,
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                pre_norm=_pre_attention_norm(model, name),
            )
            module.__dict__[_SITE_ATTRIBUTE] = site
            module.config = _PrefixRoutedConfig(site.config)
        sites[name] = site
    return sites


def detach_prefix_site(module: nn.Module) -> None:
    """Give ``module`` its plain config back and forget its site (no-op if none)."""
    site = module.__dict__.pop(_SITE_ATTRIBUTE, None)
    if site is not None:
        module.config = site.config


def unwrap_attention_layers(model: nn.Module, layer_type: type[nn.Module]) -> None:
    """Put back every attention module wrapped by a ``layer_type`` tuner layer and detach its site.

    A wrapped attention module holds no weight of its own to merge, so PEFT's generic unload
    (which copies ``weight``/``bias``) does not apply; the prefix tuners call this instead.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, layer_type):
            parent_name, _, child_name = name.rpartition(".")
            base_layer = module.get_base_layer()
            detach_prefix_site(base_layer)
            setattr(model.get_submodule(parent_name), child_name, base_layer)


def without_base_layer(name: str) -> str:
    """A module name without PEFT's trailing ``.base_layer`` parts (the name before wrapping)."""
    while name.endswith(".base_layer"):
        name = name.removesuffix(".base_layer")
    return name
