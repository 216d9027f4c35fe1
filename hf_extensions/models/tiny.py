"""Tiny, seeded models built from configs: no Hub download, fast on a CPU.

Tests, the demo and CI smoke runs need *real* ``transformers`` / ``diffusers`` classes (so that a
method is exercised through the same code paths a user hits: ``Trainer``, ``get_peft_model``,
``save_pretrained``, ``push_to_hub``) but cannot download checkpoints. Every builder here
instantiates the genuine model class from a small config with a fixed seed, so that the same
``seed`` always gives bit-identical weights. The global torch RNG of the caller is left untouched
(weights are drawn inside :func:`torch.random.fork_rng`).

Text models default to ``vocab_size=BYTE_VOCAB_SIZE`` so that the offline
:func:`byte_level_clip_tokenizer` (which can tokenize any text) matches them out of the box.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaModel,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = [
    "BOS_TOKEN",
    "BYTE_VOCAB_SIZE",
    "CLIP_ZERO_SHOT_TEMPLATE",
    "EOS_TOKEN",
    "MLPClassifier",
    "byte_level_clip_tokenizer",
    "count_parameters",
    "tiny_bert_classifier",
    "tiny_clip",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_mlp_classifier",
    "tiny_roberta",
    "tiny_stable_diffusion_pipeline",
    "tiny_vit_classifier",
]

#: CLIP's ImageNet zero-shot prompt template (PGA's, and the zoo CLIP's evaluation prompt).
CLIP_ZERO_SHOT_TEMPLATE = "a photo of a {}."
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
#: 256 byte characters + the same 256 with the ``</w>`` end-of-word suffix + BOS + EOS.
BYTE_VOCAB_SIZE = 2 * 256 + 2
_BOS_ID = BYTE_VOCAB_SIZE - 2
_EOS_ID = BYTE_VOCAB_SIZE - 1

AttnImplementation = Literal["eager", "sdpa"]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Draw initial weights from ``seed`` without changing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of ``module`` (used to document and test the tiny sizes)."""
    return sum(p.numel() for p in module.parameters())


def _check_heads(hidden_size: int, num_heads: int) -> None:
    if hidden_size % num_heads != 0:
        raise ValueError(
            f"hidden_size={hidden_size} must be divisible by num_attention_heads={num_heads}."
        )


class MLPClassifier(torch.nn.Module):
    """A small feed-forward classifier that speaks the ``Trainer`` protocol.

    ``forward(features, labels=None)`` returns ``{"loss", "logits"}`` (the loss only with
    labels, a per-batch mean cross-entropy). Optional BatchNorm after each hidden layer lets tests
    exercise running statistics. For scikit-learn's digits in the ``"vector"`` layout (64 inputs).
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden_sizes: tuple[int, ...] = (32,),
        num_labels: int = 10,
        batchnorm: bool = False,
    ):
        super().__init__()
        layers: list[torch.nn.Module] = []
        width = in_features
        for hidden in hidden_sizes:
            layers.append(torch.nn.Linear(width, hidden))
            if batchnorm:
                layers.append(torch.nn.BatchNorm1d(hidden))
            layers.append(torch.nn.ReLU())
            width = hidden
        layers.append(torch.nn.Linear(width, num_labels))
        self.net = torch.nn.Sequential(*layers)

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = self.net(features)
        if labels is None:
            return {"logits": logits}
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def tiny_mlp_classifier(
    in_features: int = 64,
    hidden_sizes: tuple[int, ...] = (32,),
    num_labels: int = 10,
    batchnorm: bool = False,
    seed: int = 0,
) -> MLPClassifier:
    """A seeded :class:`MLPClassifier` (64 -> 32 -> 10 by default, about 2.4k parameters)."""
    with _seeded(seed):
        return MLPClassifier(in_features, tuple(hidden_sizes), num_labels, batchnorm).eval()


def tiny_vit_classifier(
    num_labels: int = 10,
    image_size: int = 8,
    patch_size: int = 2,
    num_channels: int = 1,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
    attn_implementation: AttnImplementation = "eager",
    seed: int = 0,
) -> ViTForImageClassification:
    """A ``ViTForImageClassification`` sized for scikit-learn's 8x8 one-channel digits.

    Defaults: 16 patches of 2x2 + CLS, 2 layers of width 32, 10 labels; about 18k parameters,
    built in a few milliseconds. Dropout is 0 so that eager and SDPA attention give the same
    logits in training mode too.

    Args:
        num_labels (`int`, *optional*, defaults to `10`):
            Outputs of the classification head.
        image_size (`int`, *optional*, defaults to `8`):
            Side of the square input images, in pixels.
        patch_size (`int`, *optional*, defaults to `2`):
            Side of the square patches, in pixels; ``(image_size // patch_size) ** 2`` patches.
        num_channels (`int`, *optional*, defaults to `1`):
            Channels of the input images.
        hidden_size (`int`, *optional*, defaults to `32`):
            Width of the encoder; divisible by ``num_attention_heads``.
        num_layers (`int`, *optional*, defaults to `2`):
            Encoder layers.
        num_attention_heads (`int`, *optional*, defaults to `4`):
            Attention heads per layer.
        intermediate_size (`int`, *optional*, defaults to `64`):
            Width of each layer's feed-forward block.
        attn_implementation (`str`, *optional*, defaults to `"eager"`):
            transformers' attention implementation: ``"eager"`` or ``"sdpa"``.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the initial weights (the same seed gives bit-identical weights; the
            caller's global RNG is left untouched).

    Returns:
        `ViTForImageClassification`: the model, in eval mode.

    Raises:
        ValueError: ``hidden_size`` is not divisible by ``num_attention_heads``.
    """
    _check_heads(hidden_size, num_attention_heads)
    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        attn_implementation=attn_implementation,
    )
    with _seeded(seed):
        return ViTForImageClassification(config).eval()


def tiny_bert_classifier(
    num_labels: int = 2,
    vocab_size: int = BYTE_VOCAB_SIZE,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 128,
    attn_implementation: AttnImplementation = "eager",
    seed: int = 0,
) -> BertForSequenceClassification:
    """A ``BertForSequenceClassification`` with 2 layers of width 32 (about 39k parameters).

    ``pad_token_id`` is 0 as in BERT.

    Args:
        num_labels (`int`, *optional*, defaults to `2`):
            Outputs of the classification head.
        vocab_size (`int`, *optional*, defaults to `BYTE_VOCAB_SIZE`):
            Size of the vocabulary; the default (514) is the size of
            :func:`byte_level_clip_tokenizer`'s.
        hidden_size (`int`, *optional*, defaults to `32`):
            Width of the encoder; divisible by ``num_attention_heads``.
        num_layers (`int`, *optional*, defaults to `2`):
            Encoder layers.
        num_attention_heads (`int`, *optional*, defaults to `4`):
            Attention heads per layer.
        intermediate_size (`int`, *optional*, defaults to `64`):
            Width of each layer's feed-forward block.
        max_position_embeddings (`int`, *optional*, defaults to `128`):
            The longest input, in tokens.
        attn_implementation (`str`, *optional*, defaults to `"eager"`):
            transformers' attention implementation: ``"eager"`` or ``"sdpa"``.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the initial weights (the same seed gives bit-identical weights; the
            caller's global RNG is left untouched).

    Returns:
        `BertForSequenceClassification`: the model, in eval mode.

    Raises:
        ValueError: ``hidden_size`` is not divisible by ``num_attention_heads``.
    """
    _check_heads(hidden_size, num_attention_heads)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        num_labels=num_labels,
        attn_implementation=attn_implementation,
    )
    with _seeded(seed):
        return BertForSequenceClassification(config).eval()


def tiny_gpt2(
    vocab_size: int = BYTE_VOCAB_SIZE,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    n_positions: int = 128,
    attn_implementation: AttnImplementation = "eager",
    seed: int = 0,
) -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` with 2 layers of width 32 (about 46k parameters, tied LM head).

    Args:
        vocab_size (`int`, *optional*, defaults to `BYTE_VOCAB_SIZE`):
            Size of the vocabulary. With the default (514) the model pairs with
            :func:`byte_level_clip_tokenizer` (``<|startoftext|>`` / ``<|endoftext|>`` are its
            BOS / EOS ids); a smaller vocabulary caps both ids at ``vocab_size - 1``.
        hidden_size (`int`, *optional*, defaults to `32`):
            Width of the decoder; divisible by ``num_attention_heads``.
        num_layers (`int`, *optional*, defaults to `2`):
            Decoder layers.
        num_attention_heads (`int`, *optional*, defaults to `4`):
            Attention heads per layer.
        n_positions (`int`, *optional*, defaults to `128`):
            The longest input, in tokens.
        attn_implementation (`str`, *optional*, defaults to `"eager"`):
            transformers' attention implementation: ``"eager"`` or ``"sdpa"``.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the initial weights (the same seed gives bit-identical weights; the
            caller's global RNG is left untouched).

    Returns:
        `GPT2LMHeadModel`: the model, in eval mode.

    Raises:
        ValueError: ``hidden_size`` is not divisible by ``num_attention_heads``.
    """
    _check_heads(hidden_size, num_attention_heads)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=num_attention_heads,
        n_positions=n_positions,
        bos_token_id=min(_BOS_ID, vocab_size - 1),
        eos_token_id=min(_EOS_ID, vocab_size - 1),
        attn_implementation=attn_implementation,
    )
    with _seeded(seed):
        return GPT2LMHeadModel(config).eval()


def tiny_llama(
    attn_implementation: AttnImplementation | None = None, seed: int = 0
) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` of 2 layers, width 32, 4 query heads sharing 2 key/value heads
    (grouped-query attention) and rotary positions; vocabulary of 100. ``attn_implementation``
    ``None`` takes transformers' default."""
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn_implementation,
    )
    with _seeded(seed):
        return LlamaForCausalLM(config).eval()


def tiny_roberta(attn_implementation: AttnImplementation = "eager", seed: int = 0) -> RobertaModel:
    """A ``RobertaModel`` (no head) of 2 layers, width 32, 4 heads; vocabulary of 100."""
    config = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        attn_implementation=attn_implementation,
    )
    with _seeded(seed):
        return RobertaModel(config).eval()


def byte_level_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` that needs no vocabulary file: every byte is a token.

    The vocabulary is GPT-2/CLIP's 256 byte-level characters (``bytes_to_unicode``), the same
    256 with CLIP's ``</w>`` end-of-word suffix, then ``<|startoftext|>`` (id 512) and
    ``<|endoftext|>`` (id 513, also padding); there are no merges. So any text is tokenized
    deterministically, byte by byte, after CLIP's normalisation (NFC, lower case, runs of
    whitespace collapsed) and pre-tokenisation (words, single digits and punctuation runs are
    separate words). Decoding gives the pre-tokens joined by single spaces:
    ``"Hello,  World!"`` -> ``"hello , world !"``. It saves and loads with
    ``save_pretrained`` / ``CLIPTokenizer.from_pretrained`` (a ``tokenizer.json``).
    """
    characters = list(bytes_to_unicode().values())
    tokens = [*characters, *(c + "</w>" for c in characters), BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def byte_level_clip_text_config(
    hidden_size: int, num_layers: int, max_length: int
) -> CLIPTextConfig:
    """Text tower matching :func:`byte_level_clip_tokenizer` (vocabulary, BOS/EOS/pad ids)."""
    return CLIPTextConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        projection_dim=hidden_size,
        bos_token_id=_BOS_ID,
        eos_token_id=_EOS_ID,
        pad_token_id=_EOS_ID,
    )


def tiny_clip(
    image_size: int = 16,
    patch_size: int = 4,
    hidden_size: int = 32,
    num_layers: int = 2,
    projection_dim: int = 16,
    max_length: int = 77,
    seed: int = 0,
) -> tuple[CLIPModel, CLIPTokenizer]:
    """A ``CLIPModel`` with tiny text and vision towers, and its byte-level tokenizer.

    Defaults: both towers 2 layers of width 32, 16x16 RGB images in 4x4 patches, a 16-d shared
    embedding space; about 56k parameters. Both towers have 4 attention heads and feed-forward
    blocks twice their width.

    Args:
        image_size (`int`, *optional*, defaults to `16`):
            Side of the square RGB input images, in pixels.
        patch_size (`int`, *optional*, defaults to `4`):
            Side of the vision tower's square patches, in pixels.
        hidden_size (`int`, *optional*, defaults to `32`):
            Width of both towers; divisible by 4 (the heads).
        num_layers (`int`, *optional*, defaults to `2`):
            Layers of each tower.
        projection_dim (`int`, *optional*, defaults to `16`):
            Dimension of the shared image-text embedding space.
        max_length (`int`, *optional*, defaults to `77`):
            The longest text, in tokens: the text tower's positions and the tokenizer's
            ``model_max_length``.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the initial weights (the same seed gives bit-identical weights; the
            caller's global RNG is left untouched).

    Returns:
        `tuple[CLIPModel, CLIPTokenizer]`: ``(model, tokenizer)``, the model in eval mode and
        :func:`byte_level_clip_tokenizer`.

    Raises:
        ValueError: ``hidden_size`` is not divisible by 4.
    """
    _check_heads(hidden_size, 4)
    text_config = byte_level_clip_text_config(hidden_size, num_layers, max_length)
    vision_config = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        projection_dim=projection_dim,
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=projection_dim,
    )
    with _seeded(seed):
        model = CLIPModel(config).eval()
    return model, byte_level_clip_tokenizer(model_max_length=max_length)


def tiny_stable_diffusion_pipeline(
    image_size: int = 16,
    block_out_channels: tuple[int, int] = (8, 16),
    text_hidden_size: int = 32,
    seed: int = 0,
) -> StableDiffusionPipeline:
    """A complete ``StableDiffusionPipeline`` from configs (about 147k parameters in all:
    UNet 67k, VAE 44k, text encoder 36k).

    Components: a 2-level ``UNet2DConditionModel`` (one cross-attention level, GroupNorm with
    8 groups), a 2-level ``AutoencoderKL`` with 4 latent channels, a 2-layer ``CLIPTextModel``
    with the byte-level tokenizer, Stable Diffusion's ``DDIMScheduler`` settings, and no safety
    checker; the progress bar is disabled. Two 16x16 inference steps take a few hundredths of a
    second; ``save_pretrained`` / ``StableDiffusionPipeline.from_pretrained`` round-trip it
    exactly.

    Args:
        image_size (`int`, *optional*, defaults to `16`):
            Side of the square generated images, in pixels; divisible by 4. The latents (the
            UNet's ``sample_size``) are ``image_size // 2`` square.
        block_out_channels (`tuple[int, int]`, *optional*, defaults to `(8, 16)`):
            Channels of the two levels of both the UNet and the VAE; each divisible by 8 (the
            GroupNorm groups).
        text_hidden_size (`int`, *optional*, defaults to `32`):
            Width of the text encoder, and so the UNet's cross-attention dimension; divisible
            by 4 (the text encoder's heads).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the initial weights of the UNet, the VAE and the text encoder (the same
            seed gives bit-identical weights; the caller's global RNG is left untouched).

    Returns:
        `StableDiffusionPipeline`: the pipeline, its models in eval mode.

    Raises:
        ValueError: a ``block_out_channels`` entry not divisible by 8, or an ``image_size``
            not divisible by 4.
    """
    # diffusers is imported here, not at module level: it pulls in torch._dynamo and peft
    # (several seconds), which every process that only wants a tiny BERT would otherwise pay.
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    groups = 8
    if any(channels % groups for channels in block_out_channels):
        raise ValueError(
            f"block_out_channels={block_out_channels} must all be divisible by the "
            f"{groups} GroupNorm groups."
        )
    # The VAE halves the resolution once per extra level, and the UNet does the same again.
    vae_scale_factor = 2 ** (len(block_out_channels) - 1)
    if image_size % (vae_scale_factor**2) != 0:
        raise ValueError(f"image_size={image_size} must be divisible by {vae_scale_factor**2}.")
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=image_size // vae_scale_factor,
            in_channels=4,
            out_channels=4,
            block_out_channels=block_out_channels,
            layers_per_block=1,
            norm_num_groups=groups,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=text_hidden_size,
            attention_head_dim=4,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=block_out_channels,
            down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
            up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
            latent_channels=4,
            norm_num_groups=groups,
            layers_per_block=1,
            sample_size=image_size,
        )
        text_encoder = CLIPTextModel(byte_level_clip_text_config(text_hidden_size, 2, 77))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=byte_level_clip_tokenizer(model_max_length=77),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
