"""Every entry point that inspects a model's structure refuses an unsupported model up front,
naming the model (class and model type), what is supported and the fix.

Each case builds a tiny unsupported model from a config and asserts the early ``ValueError``;
before these checks, each failed deep inside transformers / diffusers / torch (an
``AttributeError``, a shape error, a ``TypeError``), or not at all where a layer would have been
silently skipped.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model
from torch import nn

from hf_extensions.models import (
    byte_level_clip_tokenizer,
    tiny_bert_classifier,
    tiny_clip,
    tiny_stable_diffusion_pipeline,
    tiny_vit_classifier,
)
from hf_extensions.pga.clip_prompts import CLIPPromptLearner
from hf_extensions.pipelines import ErasureConfig, erase_concepts
from hf_extensions.prompt_dsi.dsi import DSIModel
from hf_extensions.quantization import MetaAugConfig, MetaAugQuantizer
from peft_configs import PromptPoolConfig, SharedPrefixTuningConfig

SMALL = dict(num_layers=2, num_heads=2, vocab_size=100)


def _t5(cls=transformers.T5EncoderModel):
    return cls(transformers.T5Config(d_model=32, d_kv=16, d_ff=37, **SMALL))


def _gpt_neo():
    config = transformers.GPTNeoConfig(
        hidden_size=32, attention_types=[[["global"], 2]], max_position_embeddings=64, **SMALL
    )
    return transformers.GPTNeoForCausalLM(config)


def _resnet():
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])
    return transformers.ResNetForImageClassification(config)


# ------------------------------------------------------------------- prefix methods (PEFT)
PREFIX_CASES = {
    # T5's attention computes its scores with a relative position bias, not via the registry.
    "t5-encoder": (_t5, ["T5EncoderModel", "model_type 't5'", "ALL_ATTENTION_FUNCTIONS"]),
    "t5-encoder-decoder": (
        lambda: _t5(transformers.T5ForConditionalGeneration),
        ["T5ForConditionalGeneration", "T5LayerSelfAttention"],
    ),
    "gpt-neo": (_gpt_neo, ["GPTNeoForCausalLM", "model_type 'gpt_neo'", "no attention"]),
    "resnet": (_resnet, ["ResNetForImageClassification", "no attention"]),
    "flex-attention": (
        lambda: tiny_bert_classifier(attn_implementation="flex_attention"),
        ["'flex_attention'", "set_attn_implementation('sdpa')"],
    ),
}
PEFT_CONFIGS = {
    "shared_prefix": lambda: SharedPrefixTuningConfig(num_virtual_tokens=2),
    "prompt_pool": lambda: PromptPoolConfig(pool_size=2, layers=[0]),
}


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
@pytest.mark.parametrize("case", list(PREFIX_CASES))
def test_prefix_methods_refuse_unsupported_models_in_get_peft_model(case, method):
    build, expected = PREFIX_CASES[case]
    with pytest.raises(ValueError) as error:
        get_peft_model(build(), PEFT_CONFIGS[method]())
    message = str(error.value)
    for text in expected:
        assert text in message
    assert "Supported" in message or "supports" in message
    assert "Fix" in message


def test_prompt_pool_refuses_a_two_tower_model():
    clip, _ = tiny_clip()
    with pytest.raises(ValueError, match=r"CLIPModel \(model_type 'clip'\).*text_model"):
        get_peft_model(clip, PromptPoolConfig(pool_size=2, layers=[0]))


# ------------------------------------------------------------------------------- erasure
def _unet_variant(pipe, **changes):
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    return UNet2DConditionModel.from_config({**config, **changes})


def _sdxl_unet(pipe):
    pipe.unet = _unet_variant(
        pipe,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
    )


def _class_unet(pipe):
    pipe.unet = _unet_variant(pipe, class_embed_type="timestep")


def _narrow_unet(pipe):
    pipe.unet = _unet_variant(pipe, cross_attention_dim=16)


def _no_unet(pipe):
    del pipe.unet  # as a transformer-based (DiT / Flux-style) pipeline has no unet


ERASURE_CASES = {
    "sdxl-text-time": (_sdxl_unet, "'addition_embed_type': 'text_time'"),
    "class-embedding": (_class_unet, "'class_embed_type': 'timestep'"),
    "cross-attention-width": (_narrow_unet, "width 32 but the UNet's cross_attention_dim is 16"),
    "no-unet": (_no_unet, "it has no ['unet']"),
}


@pytest.mark.parametrize("case", list(ERASURE_CASES))
def test_erasure_refuses_unsupported_pipelines(case):
    change, expected = ERASURE_CASES[case]
    pipe = tiny_stable_diffusion_pipeline()
    change(pipe)
    config = ErasureConfig(num_steps=1, ddim_steps=2, progress_bar=False)
    with pytest.raises(ValueError) as error:
        erase_concepts(pipe, ["cat"], method="esd", config=config)
    message = str(error.value)
    assert "StableDiffusionPipeline" in message and expected in message
    assert "Supported: Stable Diffusion 1.x/2.x-style" in message


# ---------------------------------------------------------------------------- quantization
class _Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, images):
        return self.fc(self.conv(images.flatten(2)).mean(-1))


class _AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mid = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, images):
        tokens = self.embed(images.flatten(2).transpose(1, 2))
        return self.fc(self.mid(self.mha(tokens, tokens, tokens)[0].mean(1)))


QUANT_SETTINGS = dict(method="brecq", iterations=1, batch_size=4, meta_iterations=0)
QUANT_CASES = {
    # A text model: calibration feeds images (before: a shape error inside BERT's embeddings).
    "bert": (tiny_bert_classifier, ["BertForSequenceClassification", "'input_ids'"]),
    # Before: the Conv1d layers silently stayed in float.
    "conv1d": (_Conv1dNet, ["{'conv': 'Conv1d'}", "modules_to_not_convert=['conv']"]),
    # Before: a RuntimeError that mha.out_proj "was not called" (MHA reads its weight directly).
    "multihead-attention": (_AttentionNet, ["'MultiheadAttention'", "['mha']"]),
}


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantizer_refuses_unsupported_models(case):
    build, expected = QUANT_CASES[case]
    quantizer = MetaAugQuantizer.from_pretrained(build())
    with pytest.raises(ValueError) as error:
        quantizer.quantize(
            calibration_dataset=torch.rand(8, 3, 8, 8),
            quantization_config=MetaAugConfig(**QUANT_SETTINGS),
            progress=False,
        )
    message = str(error.value)
    assert all(text in message for text in expected)
    assert "Supported: image models" in message


def test_the_suggested_fix_quantizes_the_rest():
    model = _AttentionNet()
    config = MetaAugConfig(**QUANT_SETTINGS, modules_to_not_convert=["mha"])
    MetaAugQuantizer.from_pretrained(model).quantize(
        calibration_dataset=torch.rand(8, 3, 8, 8), quantization_config=config, progress=False
    )
    quantized = {name for name, m in model.named_modules() if type(m).__name__ == "QuantLinear"}
    assert quantized == {"embed", "mid", "fc"}  # mha (out_proj included) stays in float


# -------------------------------------------------------------------------------------- PGA
def _siglip():
    tower = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    config = transformers.SiglipConfig(
        text_config={**tower, "vocab_size": 600},
        vision_config={**tower, "image_size": 16, "patch_size": 4},
    )
    return transformers.SiglipModel(config)


PGA_CASES = {
    # Before: "every tokenised prompt must contain the EOS token", which is not the problem.
    "siglip": (_siglip, "SiglipModel (model_type 'siglip')"),
    # Before: AttributeError: 'CLIPTextModel' object has no attribute 'text_model'.
    "clip-text-tower": (
        lambda: transformers.CLIPTextModel(tiny_clip()[0].config.text_config),
        "CLIPTextModel",
    ),
}


@pytest.mark.parametrize("case", list(PGA_CASES))
def test_pga_prompt_learner_refuses_models_other_than_clip(case):
    build, expected = PGA_CASES[case]
    with pytest.raises(ValueError) as error:
        CLIPPromptLearner(build(), byte_level_clip_tokenizer(), ["a", "b"], ["source", "target"])
    assert expected in str(error.value) and "CLIPModel.from_pretrained" in str(error.value)


# -------------------------------------------------------------------------------- PromptDSI
DSI_CASES = {
    # Before: AttributeError: 'SequenceClassifierOutput' object has no attribute
    # 'last_hidden_state', at the first forward.
    "task-head": (tiny_bert_classifier, "task head around BertModel", "model.base_model"),
    # Before: "You must specify exactly one of input_ids or inputs_embeds" from T5's decoder.
    "encoder-decoder": (
        lambda: _t5(transformers.T5ForConditionalGeneration),
        "encoder-decoder",
        "T5EncoderModel",
    ),
    # Before: AttributeError: 'NoneType' object has no attribute 'dtype' inside ViT.
    "vision": (lambda: tiny_vit_classifier().vit, "'pixel_values'", "text encoder"),
}


@pytest.mark.parametrize("case", list(DSI_CASES))
def test_dsi_refuses_encoders_it_cannot_use(case):
    build, problem, fix = DSI_CASES[case]
    with pytest.raises(ValueError) as error:
        DSIModel(build(), num_docs=3)
    message = str(error.value)
    assert problem in message and fix in message and "Supported" in message
