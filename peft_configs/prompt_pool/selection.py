"""Query features, cosine top-k selection, topic keys and usage statistics of a prompt pool.

L2P (Wang et al., CVPR 2022, Eq. 3) picks, for an input ``x`` with query feature ``q(x)``, the
``top_k`` prompts whose keys ``k_i`` are most cosine-similar to ``q(x)``. PromptDSI (Huynh et al.,
arXiv 2406.12593, Sec. 3.2-3.3) changes where ``q(x)`` comes from (the input embeddings, no extra
encoder pass) and what the keys are (fixed topic embeddings of the initial corpus, one prompt per
topic, so that selection cannot collapse onto a few prompts). Everything here works on plain
``transformers`` encoders (BERT/MiniLM, ViT, ...) and on the same encoder wrapped by the pool
(prompts are then switched off while the feature is computed).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import entropy
from sklearn.cluster import KMeans
from torch import nn
from transformers import PreTrainedModel

from hf_extensions.validation import check_choice, refuse
from peft_configs.injection import find_self_attention_modules
from peft_configs.prompt_pool.config import QUERY_SOURCES

__all__ = [
    "INPUT_NAMES",
    "PoolState",
    "backbone_inputs",
    "backbone_of",
    "cosine_similarity_matrix",
    "cosine_top_k",
    "embedding_mean",
    "query_features",
    "topic_keys",
    "transformer_blocks",
    "usage_entropy",
]

#: Model inputs passed on to the backbone for a query pass (when its forward accepts them).
INPUT_NAMES = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "inputs_embeds",
    "pixel_values",
    "interpolate_pos_encoding",
)


class PoolState:
    """Per-forward state shared by a pool's tuner and its layers (a plain object, no weights).

    ``selection``: ``[B, k]`` prompt ids the layers inject (``None`` before the first forward);
    ``bypass``: while ``True`` the layers inject nothing and the tuner selects nothing (query
    passes); ``pending``: ``layer_k_cls`` waits for the hidden state entering ``query_layer``.
    """

    def __init__(self) -> None:
        self.selection: torch.Tensor | None = None
        self.query: torch.Tensor | None = None
        self.bypass = False
        self.pending = False
        self.forced = False

    @contextlib.contextmanager
    def bypassing(self) -> Iterator[None]:
        previous = self.bypass
        self.bypass = True
        try:
            yield
        finally:
            self.bypass = previous


class _StopForward(Exception):
    """Raised by the capture hook of :func:`query_features` once layer ``k``'s input is seen."""


def backbone_of(model: nn.Module) -> nn.Module:
    """The encoder without its task head (``transformers``' ``base_model``; the model itself)."""
    if isinstance(model, PreTrainedModel):
        return model.base_model
    return model


def check_query_backbone(model: nn.Module) -> nn.Module:
    """Refuse a model the pool cannot compute a query feature for; return its backbone.

    Every query source reads one stream of input embeddings (``get_input_embeddings()``: token
    embeddings of a text model, patch embeddings of a ViT). A model with several input towers
    (``CLIPModel``) or without input embeddings has none, and would fail inside transformers.

    Raises:
        ValueError: the model's attention cannot take a prefix (see
            :func:`peft_configs.injection.check_prefix_injection_supported`), or
            ``get_input_embeddings()`` of the backbone is not implemented or not a module.
    """
    find_self_attention_modules(model)  # refuses models the prompts cannot reach first
    backbone = backbone_of(model)
    try:
        embeddings = backbone.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embeddings = None
    if not isinstance(embeddings, nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"the prompt pool does not support {type(model).__name__} (model_type "
            f"{model_type!r}): its backbone {type(backbone).__name__} has no single input "
            "embedding (`get_input_embeddings()`) to compute the query from, as a model with "
            "two input towers or none. Supported: one-tower transformers encoders and decoders "
            "(BERT/RoBERTa/MiniLM text encoders, ViT image encoders, GPT-2/Llama). Fix: wrap one "
            "tower, e.g. `model.text_model` or `model.vision_model` of a CLIPModel."
        )
    return backbone


def _unwrap(model: nn.Module) -> nn.Module:
    """A ``PeftModel`` or a ``BaseTuner`` -> the ``transformers`` model inside."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    inner = getattr(model, "model", None)
    if not isinstance(model, PreTrainedModel) and isinstance(inner, nn.Module):
        model = inner
    return model


def _pool_states(model: nn.Module) -> list[PoolState]:
    states = []
    for module in model.modules():
        state = getattr(module, "pool_state", None)
        if isinstance(state, PoolState) and all(state is not s for s in states):
            states.append(state)
    return states


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (no dropout) for the block; each one's mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer layer (block) around each self-attention module, in layer order.

    A block is the ancestor of the attention module that is an element of an ``nn.ModuleList``
    (``encoder.layer.3`` for BERT/ViT, ``model.layers.3`` for Llama, ``transformer.h.3`` GPT-2).
    """
    blocks = []
    for name, _ in find_self_attention_modules(model):
        parts = name.split(".")
        block = None
        for depth in range(len(parts) - 1, 0, -1):
            parent = model.get_submodule(".".join(parts[: depth - 1])) if depth > 1 else model
            if isinstance(parent, nn.ModuleList) and parts[depth - 1].isdigit():
                block = model.get_submodule(".".join(parts[:depth]))
                break
        if block is None:
            raise ValueError(f"no transformer block (element of a ModuleList) around {name}")
        blocks.append(block)
    return blocks


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block's forward receives (first positional or ``hidden_states``)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise ValueError("could not find the hidden states among the transformer block's inputs")
    return hidden


def model_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's inputs by name (positional ones bound to ``model.forward``'s signature)."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    named = dict(bound.arguments)
    for name, parameter in inspect.signature(model.forward).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in named:
            named.update(named.pop(name))
    return named


def backbone_inputs(backbone: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    accepted = inspect.signature(backbone.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    return {
        name: value
        for name, value in inputs.items()
        if name in INPUT_NAMES and value is not None and (name in accepted or takes_kwargs)
    }


def embedding_mean(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Masked mean of the input embeddings, ``[B, d]``: PromptDSI's one-pass query feature.

    Text: ``get_input_embeddings()(input_ids)`` (the token lookup, no position/type embeddings),
    or ``inputs_embeds`` when given, averaged over the positions where ``attention_mask`` is 1.
    Vision (ViT): the patch embeddings of ``pixel_values``, averaged over patches. The PromptDSI
    T5 code averages over padding too (no mask); masking makes a sample's feature independent of
    how much it was padded.
    """
    embeds = inputs.get("inputs_embeds")
    if embeds is None:
        layer = backbone_of(model).get_input_embeddings()
        source = inputs.get("input_ids")
        if source is None:
            source = inputs.get("pixel_values")
        if source is None:
            raise ValueError(
                "query_source='input_embed_mean' needs input_ids, inputs_embeds or pixel_values"
            )
        embeds = layer(source)
        if isinstance(embeds, tuple):
            embeds = embeds[0]
    if embeds.dim() != 3:
        raise ValueError(f"input embeddings must be [B, T, d], got {tuple(embeds.shape)}")
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape[1] != embeds.shape[1]:
        return embeds.mean(dim=1)
    weights = mask.to(embeds.dtype).unsqueeze(-1)
    return (embeds * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def first_token(output: Any) -> torch.Tensor:
    """``last_hidden_state[:, 0]`` of a model output ([CLS] for BERT/ViT)."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output[0]
    return hidden[:, 0]


@torch.no_grad()
def query_features(
    encoder: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    query_source: str = "input_embed_mean",
    query_layer: int | None = None,
    **inputs: Any,
) -> torch.Tensor:
    """The query feature ``q(x)`` of a batch, ``[B, d]``, without prompts and without gradients.

    Args:
        encoder: a ``transformers`` model (any head: the backbone is used), or the same model
            wrapped by the prompt pool (``PeftModel``; the prompts are switched off meanwhile).
        input_ids, attention_mask, **inputs: the batch (``pixel_values=`` for vision models).
        query_source: ``input_embed_mean`` (masked mean of the input embeddings, no encoder pass;
            PromptDSI), ``frozen_cls`` (first token of the last hidden state of a pass without
            prompts, in eval mode; L2P), ``layer_k_cls`` (first token of the hidden state entering
            layer ``query_layer``; the pass stops there).
        query_layer: the layer for ``layer_k_cls``.

    These are the features the pool matches against its keys, so keys computed from them
    (:func:`topic_keys`) live in the right space. Departure from L2P: the frozen pass runs in
    eval mode (no dropout), where L2P keeps a separate frozen copy of the model in eval mode; the
    feature is the same.
    """
    check_choice("query_source", query_source, QUERY_SOURCES)
    model = _unwrap(encoder)
    check_query_backbone(model)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}
    with contextlib.ExitStack() as stack:
        for state in _pool_states(model):
            stack.enter_context(state.bypassing())
        if query_source == "input_embed_mean":
            return embedding_mean(model, inputs).detach()
        backbone = backbone_of(model)
        kwargs = backbone_inputs(backbone, inputs)
        stack.enter_context(eval_mode(backbone))
        if query_source == "frozen_cls":
            return first_token(backbone(**kwargs)).detach()
        if query_layer is None:
            refuse("query_layer", "a layer index with query_source='layer_k_cls'", query_layer)
        blocks = transformer_blocks(backbone)
        if not 0 <= query_layer < len(blocks):
            refuse(
                "query_layer",
                f"in [0, {len(blocks)}) for a model with {len(blocks)} layers",
                query_layer,
            )
        captured: list[torch.Tensor] = []

        def capture(module, args, kwargs):
            captured.append(block_input(args, kwargs)[:, 0].detach())
            raise _StopForward

        handle = blocks[query_layer].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            backbone(**kwargs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"layer {query_layer} was not reached in the query pass")
        return captured[0]


def cosine_similarity_matrix(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[B, pool]`` cosine similarities of queries ``[B, d]`` and keys ``[pool, d]`` (L2P Eq. 3)."""
    return F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T


def cosine_top_k(
    query: torch.Tensor, keys: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` keys most cosine-similar to each query: ``(ids [B, k], similarity [B, pool])``.

    Ids are in decreasing similarity (the order in which their prefixes are concatenated).
    """
    similarity = cosine_similarity_matrix(query, keys.to(query.dtype))
    return similarity.topk(top_k, dim=-1).indices, similarity


def topic_keys(
    features: torch.Tensor | np.ndarray,
    num_topics: int,
    seed: int = 0,
    *,
    normalize: bool = True,
    n_init: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PromptDSI's topic-aware keys: k-means centroids of the initial corpus' query features.

    PromptDSI (Sec. 3.3) takes the topic embeddings of a BERTopic model of the initial corpus
    as fixed keys, one prompt per topic. We use scikit-learn ``KMeans`` (``num_topics`` clusters,
    ``random_state=seed``) on the features the pool will match (:func:`query_features`), which
    needs no UMAP/HDBSCAN; with ``normalize`` the features are scaled to unit norm first, so the
    clusters follow the cosine geometry used for selection (spherical k-means, approximately).

    Returns:
        ``(keys [num_topics, d] float32, assignments [N] long)``: centroids and each document's
        topic. Pass ``keys`` to ``PromptPoolModel.set_keys``; ``pool_size`` must equal
        ``num_topics``.
    """
    # host: scikit-learn's boundary (k-means), once
    array = features.detach().float().cpu().numpy() if torch.is_tensor(features) else features
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be [N, d], got shape {array.shape}")
    if isinstance(num_topics, bool) or not isinstance(num_topics, int) or num_topics < 1:
        refuse("num_topics", "an integer in [1, inf)", num_topics)
    if num_topics > array.shape[0]:
        refuse(
            "num_topics",
            f"at most the number of documents ({array.shape[0]}): one topic per prompt, so the "
            "pool's `pool_size` is at most the documents too (count them before building the "
            "pool with get_peft_model)",
            num_topics,
        )
    if normalize:
        array = array / np.clip(np.linalg.norm(array, axis=1, keepdims=True), 1e-12, None)
    kmeans = KMeans(n_clusters=num_topics, random_state=seed, n_init=n_init).fit(array)
    keys = torch.from_numpy(kmeans.cluster_centers_).float()
    return keys, torch.from_numpy(kmeans.labels_.astype(np.int64))


def usage_entropy(counts: torch.Tensor | Sequence[int]) -> float:
    """Normalised Shannon entropy of prompt usage: ``H(counts / sum) / log(pool_size)``, in [0, 1].

    1 = every prompt used equally often, 0 = one prompt only (collapse, the L2P failure PromptDSI's
    topic keys avoid). A pool of one prompt that was used gives 1; no usage at all gives 0.
    """
    # host: a summary statistic, read when asked
    counts = np.asarray(counts.cpu() if torch.is_tensor(counts) else counts, dtype=np.float64)
    if counts.sum() <= 0:
        return 0.0
    if counts.size == 1:
        return 1.0
    value = float(entropy(counts, base=counts.size))
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0
