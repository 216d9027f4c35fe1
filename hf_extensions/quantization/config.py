"""``MetaAugConfig``: the quantization config that a saved checkpoint's ``config.json`` carries.

Registered with ``transformers.quantizers.auto.register_quantization_config`` under
:data:`QUANT_METHOD`, so ``AutoModel*.from_pretrained`` resolves
``config.json["quantization_config"]["quant_method"]`` to this class once
``hf_extensions.quantization`` is imported. The method (BRECQ, Li et al. 2021; QDrop, Wei et al.
2022; MetaAug, Pham et al., ECCV 2024, arXiv 2407.14726) decides how the scales were calibrated;
the saved inference form (fake-quantized float weights plus per-channel scales and zero points)
is the same for all three.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    register_quantization_config,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_extensions.quantization.quantizers import MAX_BITS, MIN_BITS
from hf_extensions.validation import (
    MAX_SEED,
    check_bool,
    check_choice,
    check_integer,
    check_names,
    check_positive,
    check_range,
)

__all__ = ["METHODS", "QUANT_METHOD", "MetaAugConfig"]

QUANT_METHOD = "hf_extensions_metaaug"
METHODS = ("brecq", "qdrop", "genie", "metaaug")
META_BALANCES = ("unit", "none")


@dataclass
class MetaAugConfig(QuantizationConfigMixin):
    """Uniform affine post-training quantization of the ``nn.Linear`` / ``nn.Conv2d`` layers.

    ``weight_bits`` to ``modules_to_not_convert`` decide which layers are quantized and how (the
    saved inference form); ``method`` and the fields from ``iterations`` on are calibration
    settings, recorded in ``config.json`` but without effect on the saved form. The iteration
    counts default to CPU sizes.

    Args:
        method (`str`, *optional*, defaults to `"metaaug"`):
            How the scales are calibrated: ``"brecq"`` (Li et al. 2021), ``"qdrop"`` (Wei et al.
            2022), ``"genie"`` (Genie-M, Jeon et al., CVPR 2023: QDrop whose per-channel weight
            scales are learned together with the rounding, see ``weight_scale_lr``) or
            ``"metaaug"`` (Pham et al. 2024: the transformation network, then the base given by
            ``metaaug_base``).
        weight_bits (`int`, *optional*, defaults to `4`):
            Bits of the per-output-channel asymmetric weight quantization, 2..8.
        activation_bits (`int`, *optional*, defaults to `4`):
            Bits of the per-tensor asymmetric quantization of each quantized layer's input,
            2..8; `None` for weight-only quantization.
        first_last_8bit (`bool`, *optional*, defaults to `True`):
            The BRECQ / QDrop convention: the first and the last quantized layer (in
            ``named_modules`` order) use 8-bit weights and, unless weight-only, 8-bit inputs.
        quantize_first_layer_input (`bool`, *optional*, defaults to `False`):
            With ``first_last_8bit``, whether the first layer's input (the image) is quantized
            to 8 bits too. `False` is the BRECQ / QDrop / MetaAug convention (first layer W8 on
            the float image, last layer W8A8); `True` makes the first layer W8A8.
        modules_to_not_convert (`list[str]`, *optional*, defaults to `None`):
            Names of modules kept in float: a module matches a name exactly, or as a dotted
            prefix, suffix or inner part of its name (``"classifier"`` matches
            ``"classifier"``, ``"classifier.0"`` and ``"vit.classifier"``). Unlike transformers'
            built-in quantizers no default skips (such as the output head) are added, so
            quantization and loading always convert the same modules.
        iterations (`int`, *optional*, defaults to `200`):
            Block reconstruction steps per block (BRECQ / QDrop: 20000).
        batch_size (`int`, *optional*, defaults to `32`):
            Images per reconstruction step and per MetaAug meta step, drawn with replacement
            (BRECQ / QDrop: 32-64). The round-to-nearest initialisation uses the first
            ``max(batch_size, 256)`` calibration images.
        weight_lr (`float`, *optional*, defaults to `0.05`):
            Adam lr of the AdaRound rounding variables ``V``: 1e-3 in BRECQ for 20k steps, 5e-2
            here, since with a few hundred steps at 1e-3 ``h(V)`` never reaches 0 / 1 and the
            hard rounding is worse than round-to-nearest (measured on the embedded CNN).
        activation_lr (`float`, *optional*, defaults to `4e-05`):
            Adam lr of the LSQ activation steps, with cosine decay to 0 over ``iterations``.
        rounding_weight (`float`, *optional*, defaults to `0.01`):
            λ, the weight of AdaRound's rounding regulariser (AdaRound Eq. 25): 0.01 in BRECQ /
            QDrop, 1.0 in the official Genie-M / MetaAug code.
        warmup (`float`, *optional*, defaults to `0.2`):
            Fraction, in [0, 1], of the iterations (and of the meta iterations) run without the
            rounding regulariser.
        beta_start (`float`, *optional*, defaults to `20.0`):
            β of the regulariser right after warm-up; annealed linearly to ``beta_end``.
        beta_end (`float`, *optional*, defaults to `2.0`):
            β of the regulariser at the last iteration.
        drop_prob (`float`, *optional*, defaults to `0.5`):
            QDrop's probability, in [0, 1], that an activation element stays at full precision
            (at the block input and inside the block); used by ``"qdrop"`` and ``"metaaug"``,
            ``"brecq"`` always uses 0.
        block_names (`list[str]`, *optional*, defaults to `None`):
            The reconstruction units, as module names (each must hold a quantized layer; a
            quantized layer outside them is a unit of its own). `None` finds them (see
            :func:`~hf_extensions.quantization.reconstruction.find_blocks`).
        max_block_layers (`int`, *optional*, defaults to `8`):
            The most quantized layers an automatically found block may hold (not used with
            ``block_names``).
        meta_iterations (`int`, *optional*, defaults to `50`):
            ``"metaaug"``: meta steps that train the transformation network T before each block
            (500 in the paper); 0 skips the MetaAug stage.
        meta_lr (`float`, *optional*, defaults to `0.001`):
            Adam lr of the transformation network T.
        meta_grad_clip (`float`, *optional*, defaults to `0.1`):
            Largest norm of T's gradient (clipped); 0 turns the clipping off.
        inner_lr (`float`, *optional*, defaults to `0.01`):
            lr of the one differentiable SGD step of the block's quantization parameters in the
            inner problem.
        kl_weight (`float`, *optional*, defaults to `5.0`):
            a, the weight of the KL divergence between the quantized model's predictions (after
            the inner step) and the float model's.
        margin_weight (`float`, *optional*, defaults to `0.5`):
            b, the weight of the margin term ``ReLU(τ − mean((T(x) − x)²))``, which keeps T(x)
            away from x.
        pkt_weight (`float`, *optional*, defaults to `30000.0`):
            c, the weight of the PKT term between the float model's features of mixed transformed
            and mixed original images; 0 skips it.
        margin (`float`, *optional*, defaults to `0.1`):
            τ of the margin term.
        temperature (`float`, *optional*, defaults to `4.0`):
            Softmax temperature of the KL term; > 0.
        transform_channels (`int`, *optional*, defaults to `16`):
            Hidden channels of T, a residual conv net
            (:class:`~hf_extensions.quantization.metaaug.TransformNet`).
        transform_blocks (`int`, *optional*, defaults to `2`):
            Residual 3x3 conv-ReLU blocks of T.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the batches, the QDrop masks, the mixups and T's initial weights.
        metaaug_base (`str`, *optional*, defaults to `"qdrop"`):
            ``"metaaug"``: the base reconstruction run after T is trained, ``"brecq"``,
            ``"qdrop"`` or ``"genie"`` (the official MetaAug code builds on Genie-M).
        meta_balance (`str`, *optional*, defaults to `"unit"`):
            How the outer terms' gradients on T are combined. ``"unit"``: each term whose weight
            is > 0 and whose gradient on T is not zero contributes its gradient scaled to unit
            norm, so every active term has the same share of the step whatever the scale of its
            loss (the weights then only switch terms on and off); ``"none"``: the paper's
            weighted sum ``a KL + b margin + c PKT``, in which the PKT term owns the direction
            (see :mod:`~hf_extensions.quantization.metaaug`).
        weight_scale_lr (`float`, *optional*, defaults to `1e-4`):
            ``"genie"``: Adam lr of the per-channel weight scales learned with the rounding
            variables (0 keeps them fixed, which is QDrop).
        quant_method (`str`, *optional*, defaults to `"hf_extensions_metaaug"`):
            The ``quant_method`` key by which transformers finds this class in a checkpoint's
            ``config.json``; any other value is refused.

    Raises:
        ValueError: a field outside its allowed values (named in the message).
    """

    method: str = "metaaug"
    weight_bits: int = 4
    activation_bits: int | None = 4
    first_last_8bit: bool = True
    quantize_first_layer_input: bool = False
    modules_to_not_convert: list[str] | None = None
    iterations: int = 200
    batch_size: int = 32
    weight_lr: float = 5e-2
    activation_lr: float = 4e-5
    rounding_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    drop_prob: float = 0.5
    block_names: list[str] | None = None
    max_block_layers: int = 8
    meta_iterations: int = 50
    meta_lr: float = 1e-3
    meta_grad_clip: float = 0.1
    inner_lr: float = 1e-2
    kl_weight: float = 5.0
    margin_weight: float = 0.5
    pkt_weight: float = 30000.0
    margin: float = 0.1
    temperature: float = 4.0
    transform_channels: int = 16
    transform_blocks: int = 2
    seed: int = 0
    metaaug_base: str = "qdrop"
    meta_balance: str = "unit"
    weight_scale_lr: float = 1e-4
    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        self.method = check_choice("method", self.method, METHODS)
        self.metaaug_base = check_choice(
            "metaaug_base", self.metaaug_base, tuple(m for m in METHODS if m != "metaaug")
        )
        self.meta_balance = check_choice("meta_balance", self.meta_balance, META_BALANCES)
        self.weight_bits = check_integer(
            "weight_bits", self.weight_bits, low=MIN_BITS, high=MAX_BITS
        )
        if self.activation_bits is not None:  # None: weight-only
            self.activation_bits = check_integer(
                "activation_bits", self.activation_bits, low=MIN_BITS, high=MAX_BITS
            )
        for name in ("first_last_8bit", "quantize_first_layer_input"):
            setattr(self, name, check_bool(name, getattr(self, name)))
        for name in ("iterations", "batch_size", "max_block_layers", "transform_channels"):
            setattr(self, name, check_integer(name, getattr(self, name), low=1))
        for name in ("meta_iterations", "transform_blocks"):
            setattr(self, name, check_integer(name, getattr(self, name), low=0))
        self.seed = check_integer("seed", self.seed, low=0, high=MAX_SEED)
        for name in (
            "weight_lr",
            "activation_lr",
            "rounding_weight",
            "beta_start",
            "beta_end",
            "meta_lr",
            "meta_grad_clip",
            "inner_lr",
            "kl_weight",
            "margin_weight",
            "pkt_weight",
            "margin",
            "weight_scale_lr",
        ):
            setattr(self, name, check_positive(name, getattr(self, name), allow_zero=True))
        self.temperature = check_positive("temperature", self.temperature)
        for name in ("warmup", "drop_prob"):
            setattr(self, name, check_range(name, getattr(self, name), low=0.0, high=1.0))
        self.block_names = check_names("block_names", self.block_names, allow_empty=True)
        self.modules_to_not_convert = check_names(
            "modules_to_not_convert", self.modules_to_not_convert, allow_empty=True
        )
        self.quant_method = check_choice("quant_method", self.quant_method, (QUANT_METHOD,))


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(MetaAugConfig)
