"""Configuration of the prompt pool (L2P, Wang et al. CVPR 2022; PromptDSI, arXiv 2406.12593)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_extensions.documentation import document_fields
from hf_extensions.validation import (
    check_choice,
    check_integer,
    check_layer_indices,
    check_names,
    check_positive,
    is_plain_int,
    refuse,
)
from peft_configs.registration import HfExtensionsPeftType, RegisteredPeftConfig

__all__ = ["FORMAT_VERSION", "KEY_SOURCES", "QUERY_SOURCES", "PromptPoolConfig"]

#: Layout version of saved adapters; a checkpoint of another version is refused.
FORMAT_VERSION = 1
#: Where the pool's keys come from (see :class:`PromptPoolConfig`).
KEY_SOURCES = ("learned", "fixed")
#: Which feature of the input is matched against the keys (see :class:`PromptPoolConfig`).
QUERY_SOURCES = ("input_embed_mean", "frozen_cls", "layer_k_cls")


@document_fields
@dataclass
class PromptPoolConfig(RegisteredPeftConfig):
    """A pool of prefix key/value prompts chosen per input by query-key cosine similarity.

    Wang et al., "Learning to Prompt for Continual Learning" (L2P, CVPR 2022, Sec. 3.2-3.3) and
    Huynh et al., "PromptDSI: Prompt-based Rehearsal-free Instance-wise Incremental Learning for
    Document Retrieval" (arXiv 2406.12593, Sec. 3). The pool holds ``pool_size`` keys
    ``k_i`` (``[pool_size, d_query]``) and prompts ``P_i`` (``[pool_size, len(layers), 2,
    prompt_length, kv_dim]``: a key and a value prefix per chosen attention layer). For an input
    ``x`` with query feature ``q(x)`` the selected prompts are (L2P Eq. 3)::

        K_x = top_k over i of cos(q(x), k_i)

    and the prefixes of the ``top_k`` selected prompts are concatenated (in rank order) and
    prepended to the keys/values of the chosen layers' self-attention
    (:mod:`peft_configs.injection`, per-sample prefixes). An explicit prompt id per sample
    (``prompt_ids=`` at forward) replaces the cosine selection: task-indexed prompts for
    continual learning (HiDe-Prompt / the hierarchical taxonomy method).

    ``key_source``
        ``learned``: keys are trained, optionally pulled towards their queries by L2P's surrogate
        loss (``pull_loss_weight``; L2P Eq. 5). ``fixed``: keys are given once with
        ``set_keys`` (e.g. k-means topic centroids of the initial corpus, PromptDSI's topic-aware
        keys, :func:`~peft_configs.prompt_pool.selection.topic_keys`), saved in the adapter but
        never trained.
    ``query_source``
        ``input_embed_mean``: masked mean of the input token embeddings (the model's
        ``get_input_embeddings()`` lookup; patch embeddings for ViT): no extra encoder pass
        (PromptDSI). ``frozen_cls``: the first token of the last hidden state of a separate pass
        without prompts (L2P: a second encoder pass per batch). ``layer_k_cls``: the first token of
        the hidden state entering layer ``query_layer`` in the same pass
        (``query_layer`` <= the first prompted layer, so the feature does not see the prompts;
        in training mode it carries that pass's dropout).

    Departures: the PromptDSI T5 code averages the input embeddings over padding too; we mask
    padding (a padded batch then selects what each sample would select alone). L2P's
    ``batchwise_prompt`` (majority vote over a batch at test time) is not offered.
    """

    #: Not a field: PEFT's injection reads it; the targets are the attention modules of `layers`.
    target_modules = None

    pool_size: int = field(
        default=10,
        metadata={"help": "Number of prompts/keys in the pool (PromptDSI: the number of topics)."},
    )
    prompt_length: int = field(
        default=10, metadata={"help": "Prefix length of one prompt (key/value pairs per layer)."}
    )
    top_k: int = field(
        default=1, metadata={"help": "Prompts selected per input; their prefixes are concatenated."}
    )
    layers: list[int] | None = field(
        default_factory=lambda: [1],
        metadata={
            "help": "Indices of the attention layers that get the prompts (None: all). "
            "Default [1]: PromptDSI's T5 code prompts one early layer."
        },
    )
    key_source: str = field(
        default="learned",
        metadata={"help": f"Where the keys come from: one of {KEY_SOURCES}."},
    )
    query_source: str = field(
        default="input_embed_mean",
        metadata={"help": f"The query feature matched against the keys: one of {QUERY_SOURCES}."},
    )
    query_layer: int | None = field(
        default=None,
        metadata={"help": "Layer whose input's first token is the query (layer_k_cls only)."},
    )
    pull_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of L2P's surrogate loss (1 - cos(query, selected key)), learned keys "
            "only; read it from model.base_model.auxiliary_loss()."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained and saved in full, e.g. ['classifier'] for a new head."},
    )
    format_version: int = field(
        default=FORMAT_VERSION, metadata={"help": "Layout version of the saved adapter."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = HfExtensionsPeftType.HF_EXTENSIONS_PROMPT_POOL
        if not is_plain_int(self.format_version) or self.format_version != FORMAT_VERSION:
            refuse(
                "format_version",
                f"{FORMAT_VERSION} (this hf-extensions reads prompt-pool adapters of that version "
                "only; upgrade hf-extensions)",
                self.format_version,
            )
        for name in ("pool_size", "prompt_length", "top_k"):
            value = getattr(self, name)
            check_integer(name, value, low=1, plain=True)  # plain: the config is saved as JSON
        check_integer("top_k", self.top_k, low=1, high=self.pool_size)
        self.layers = check_layer_indices("layers", self.layers)
        self.key_source = check_choice("key_source", self.key_source, KEY_SOURCES)
        self.query_source = check_choice("query_source", self.query_source, QUERY_SOURCES)
        if self.query_source == "layer_k_cls":
            if not is_plain_int(self.query_layer):
                refuse(
                    "query_layer",
                    "an integer >= 0 with query_source='layer_k_cls'",
                    self.query_layer,
                )
            check_integer("query_layer", self.query_layer, low=0)
            first = 0 if self.layers is None else min(self.layers)
            if first >= 0 and self.query_layer > first:
                refuse(
                    "query_layer",
                    f"<= the first prompted layer ({first}, from `layers`={self.layers!r}: the "
                    "query must not see the prompts)",
                    self.query_layer,
                )
        elif self.query_layer is not None:
            refuse(
                "query_layer",
                f"None with query_source={self.query_source!r} (only layer_k_cls uses it)",
                self.query_layer,
            )
        if not isinstance(self.pull_loss_weight, (int, float)):
            refuse("pull_loss_weight", "a finite number in [0.0, inf)", self.pull_loss_weight)
        self.pull_loss_weight = check_positive(
            "pull_loss_weight", self.pull_loss_weight, allow_zero=True
        )
        if self.pull_loss_weight > 0 and self.key_source != "learned":
            refuse(
                "pull_loss_weight",
                f"0.0 with key_source={self.key_source!r} (fixed keys are never trained; only "
                "key_source='learned' uses it)",
                self.pull_loss_weight,
            )
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.modules_to_save = check_names(
            "modules_to_save", self.modules_to_save, allow_empty=True
        )
