"""Configuration of shared-structure prefix tuning (Le et al., ICLR 2025, arXiv 2410.02200)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_extensions.documentation import document_fields
from hf_extensions.validation import (
    check_bool,
    check_choice,
    check_integer,
    check_layer_indices,
    check_names,
    check_range,
    is_plain_int,
    refuse,
)
from peft_configs.registration import HfExtensionsPeftType, RegisteredPeftConfig

__all__ = ["FORMAT_VERSION", "SHARE_CHOICES", "SharedPrefixTuningConfig"]

#: Layout version of saved adapters; a checkpoint of another version is refused.
FORMAT_VERSION = 1
#: How prefix keys and values are parameterised (see :class:`SharedPrefixTuningConfig`).
SHARE_CHOICES = ("none", "global_mlp", "per_layer_mlp", "per_layer_linear", "simple_share")
_USES_HIDDEN = ("global_mlp", "per_layer_mlp")
_USES_LATENT = ("global_mlp", "per_layer_mlp", "per_layer_linear")


@document_fields
@dataclass
class SharedPrefixTuningConfig(RegisteredPeftConfig):
    """Prefix tuning whose keys and values share a reparameterised latent structure.

    Le, Nguyen, Nguyen, Tran, Le, Ho, "Revisiting Prefix-tuning: Statistical Benefits of
    Reparameterization among Prompts", ICLR 2025 (arXiv 2410.02200). Every chosen attention layer
    ``l`` gets ``num_virtual_tokens`` key/value pairs ``P^K_l, P^V_l`` (each ``n x d``, ``d`` the
    key width: ``hidden_size`` of the model, ``num_key_value_heads * head_dim`` with GQA),
    prepended inside self-attention (``peft_configs.injection``). ``share`` says how they are
    produced (the variants the paper compares):

    ``none``
        ``P^K_l``, ``P^V_l`` learned independently (the non-shared ablation; the layout of PEFT
        ``PrefixTuningConfig(prefix_projection=False)``: one ``[n, 2d]`` block per layer, keys
        first).
    ``global_mlp``
        ``[P^K_1 | P^V_1 | ... | P^K_L | P^V_L] = W_2 tanh(W_1 p' + b_1) + b_2`` from one latent
        table ``p'`` (``n x latent_dim``) and one MLP over all layers (Li & Liang 2021; identical to
        PEFT ``PrefixTuningConfig(prefix_projection=True)``, ``hidden_size`` = its
        ``encoder_hidden_size``).
    ``per_layer_mlp``
        ``[P^K_l | P^V_l] = g_l(p'_l)``, ``g_l = Linear(latent_dim, hidden_size) -> Tanh ->
        Linear(hidden_size, 2d)``: the paper's vision setting (official code: ``h = 48``).
    ``per_layer_linear``
        ``[P^K_l | P^V_l] = tanh(W_l p'_l + b_l)`` (the official code's "linear" share type).
    ``simple_share``
        deep prompts ``p_l`` (``n x hidden_size`` of the model) passed through layer ``l``'s frozen
        pre-attention norm and ``W_K``, ``W_V``: ``P^K_l = W_K LN(p_l)``, ``P^V_l = W_V LN(p_l)``.

    The shared variants tie each key to its value through the latent; in the mixture-of-experts
    reading of attention (gates ``q . P^K``, experts ``P^V``) this is what speeds up estimation.
    After training, ``model.materialize()`` stores the keys/values themselves and drops the
    latents and MLPs, so inference costs exactly what plain prefix tuning costs.

    Departures from the official code (Minhchuyentoancbn/ReparamPrefix), none changing what can
    be represented: the MLP output is split into keys then values (PEFT's layout) where the
    official vision code interleaves them (a permutation of the last layer's rows); latents start
    uniform in ``+-sqrt(3 / latent_dim)`` (Xavier for a square map; equal to the official
    ``sqrt(6 / (3 * 16**2 + 768))`` for ViT-B/16), where PEFT's embedding starts ``N(0, 1)``.
    """

    #: Not a field: PEFT's injection reads it; the targets are the attention modules of `layers`.
    target_modules = None

    share: str = field(
        default="per_layer_mlp",
        metadata={"help": f"How prefix keys/values are parameterised: one of {SHARE_CHOICES}."},
    )
    num_virtual_tokens: int = field(
        default=10, metadata={"help": "Prefix length n: key/value pairs per chosen layer."}
    )
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "Indices of the attention layers that get a prefix (None: all)."},
    )
    hidden_size: int | None = field(
        default=None,
        metadata={
            "help": "Hidden width of the MLP (global_mlp, per_layer_mlp). None: 48 for "
            "per_layer_mlp (official vision code), the key width for global_mlp (PEFT's default)."
        },
    )
    latent_dim: int | None = field(
        default=None,
        metadata={
            "help": "Width of the latent prefix p' (global_mlp, per_layer_mlp, per_layer_linear). "
            "None: the key width d."
        },
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the prefix keys and values while training."}
    )
    shift_positions: bool | None = field(
        default=None,
        metadata={
            "help": "Shift the tokens' position ids by n, as PEFT's past_key_values prefix does "
            "(needed for an exported causal-LM prefix to give the same outputs in PEFT). "
            "None: True for task_type CAUSAL_LM, else False."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained and saved in full, e.g. ['classifier'] for a new head."},
    )
    materialized: bool = field(
        default=False,
        metadata={"help": "Set by materialize(): the adapter stores keys/values, no latents/MLPs."},
    )
    format_version: int = field(
        default=FORMAT_VERSION, metadata={"help": "Layout version of the saved adapter."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = HfExtensionsPeftType.HF_EXTENSIONS_SHARED_PREFIX
        if not is_plain_int(self.format_version) or self.format_version != FORMAT_VERSION:
            refuse(
                "format_version",
                f"{FORMAT_VERSION} (this hf-extensions reads shared-prefix adapters of that "
                "version only; upgrade hf-extensions)",
                self.format_version,
            )
        self.share = check_choice("share", self.share, SHARE_CHOICES)
        # plain: the config is saved as JSON
        check_integer("num_virtual_tokens", self.num_virtual_tokens, low=1, plain=True)
        self.layers = check_layer_indices("layers", self.layers)
        for name, allowed in (("hidden_size", _USES_HIDDEN), ("latent_dim", _USES_LATENT)):
            value = getattr(self, name)
            if value is None:
                continue
            if self.share not in allowed:
                refuse(
                    name, f"None with share={self.share!r} (only share in {allowed} uses it)", value
                )
            if not is_plain_int(value) or value < 1:
                refuse(name, "None or an integer >= 1", value)
        if not isinstance(self.dropout, (int, float)):
            refuse("dropout", "a finite number in [0.0, 1.0)", self.dropout)
        self.dropout = check_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        self.shift_positions = check_bool("shift_positions", self.shift_positions, optional=True)
        if self.shift_positions is None:
            self.shift_positions = self.task_type == "CAUSAL_LM"
        self.materialized = check_bool("materialized", self.materialized)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.modules_to_save = check_names(
            "modules_to_save", self.modules_to_save, allow_empty=True
        )

    @property
    def is_shared(self) -> bool:
        """Whether keys and values come from a shared latent (every variant but ``none``)."""
        return self.share != "none"
