"""Tiny models: sizes, output shapes, seeding, attention back-ends, SD determinism, tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CLIPTokenizer

from hf_extensions.models import (
    BYTE_VOCAB_SIZE,
    byte_level_clip_tokenizer,
    count_parameters,
    tiny_bert_classifier,
    tiny_clip,
    tiny_gpt2,
    tiny_stable_diffusion_pipeline,
    tiny_vit_classifier,
)

BUILDERS = {
    "vit": tiny_vit_classifier,
    "bert": tiny_bert_classifier,
    "gpt2": tiny_gpt2,
    "clip": lambda seed: tiny_clip(seed=seed)[0],
    "unet": lambda seed: tiny_stable_diffusion_pipeline(seed=seed).unet,
}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_vit_sizes_and_logits_shape():
    model = tiny_vit_classifier()
    assert model.config.image_size == 8 and model.config.patch_size == 2
    assert model.config.num_channels == 1 and model.config.hidden_size == 32
    assert model.config.num_hidden_layers == 2 and model.config.num_labels == 10
    assert model.vit.embeddings.patch_embeddings.num_patches == 16
    assert count_parameters(model) < 30_000
    out = model(pixel_values=torch.randn(4, 1, 8, 8), output_hidden_states=True)
    assert out.logits.shape == (4, 10)
    assert out.hidden_states[-1].shape == (4, 17, 32)  # 16 patches + CLS


def test_bert_and_gpt2_shapes():
    bert = tiny_bert_classifier(num_labels=5)
    assert (bert.config.vocab_size, bert.config.hidden_size) == (BYTE_VOCAB_SIZE, 32)
    ids = torch.randint(0, BYTE_VOCAB_SIZE, (3, 12))
    assert bert(input_ids=ids).logits.shape == (3, 5)

    gpt2 = tiny_gpt2()
    assert (gpt2.config.n_embd, gpt2.config.n_layer, gpt2.config.vocab_size) == (32, 2, 514)
    assert gpt2.lm_head.weight.data_ptr() == gpt2.transformer.wte.weight.data_ptr()  # tied
    out = gpt2(input_ids=ids[:2, :10], labels=ids[:2, :10])
    assert out.logits.shape == (2, 10, BYTE_VOCAB_SIZE)
    # An untrained model is close to uniform: loss near log(vocab).
    assert abs(out.loss.item() - np.log(BYTE_VOCAB_SIZE)) < 0.5


@pytest.mark.parametrize("image_size", [8, 16])
def test_clip_towers_and_tokenizer_match(image_size):
    model, tokenizer = tiny_clip(image_size=image_size, patch_size=4)
    assert model.config.vision_config.image_size == image_size
    assert model.config.text_config.vocab_size == len(tokenizer) == BYTE_VOCAB_SIZE
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id
    texts = ["a photo of a cat", "a dog", "digits 1 2 3"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    out = model(**batch, pixel_values=torch.randn(2, 3, image_size, image_size))
    assert out.logits_per_image.shape == (2, 3)
    assert out.text_embeds.shape == (3, 16)
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    # The pooled text feature is read at the EOS position, so padding must not change it.
    alone = model.text_model(**tokenizer(texts[1:2], return_tensors="pt")).pooler_output
    batched = model.text_model(**batch).pooler_output
    torch.testing.assert_close(alone[0], batched[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_same_seed_same_weights_different_seed_different(name):
    build = BUILDERS[name]
    rng_before = torch.get_rng_state()
    first, again, other = _state(build(seed=0)), _state(build(seed=0)), _state(build(seed=1))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_vit_eager_and_sdpa_agree():
    eager = tiny_vit_classifier(attn_implementation="eager")
    sdpa = tiny_vit_classifier(attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    images = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            eager(pixel_values=images).logits, sdpa(pixel_values=images).logits, atol=1e-5, rtol=0
        )


def _generate(pipe, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        "a photo of a cat", num_inference_steps=2, generator=generator, output_type="np"
    ).images


def test_stable_diffusion_is_deterministic_and_round_trips(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = tiny_stable_diffusion_pipeline(image_size=16)
    assert pipe.unet.config.block_out_channels == (8, 16)
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 8
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim
    image = _generate(pipe, seed=0)
    assert image.shape == (1, 16, 16, 3)
    assert np.array_equal(image, _generate(pipe, seed=0))
    assert np.abs(image - _generate(pipe, seed=1)).max() > 1e-3

    pipe.save_pretrained(tmp_path)
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.tokenizer, CLIPTokenizer)
    assert np.array_equal(image, _generate(reloaded, seed=0))


def test_stable_diffusion_refuses_bad_sizes():
    with pytest.raises(ValueError, match="GroupNorm"):
        tiny_stable_diffusion_pipeline(block_out_channels=(8, 12))
    with pytest.raises(ValueError, match="image_size"):
        tiny_stable_diffusion_pipeline(image_size=18)


def test_byte_tokenizer_hand_computed_ids():
    tokenizer = byte_level_clip_tokenizer()
    # bytes_to_unicode lists '!'..'~' first, so a printable ASCII char c has id ord(c) - 33;
    # the word-final form is 256 higher; BOS = 512, EOS = 513.
    ids = tokenizer("Hi!").input_ids
    assert ids == [512, ord("h") - 33, 256 + ord("i") - 33, 256 + ord("!") - 33, 513]
    assert len(tokenizer) == BYTE_VOCAB_SIZE
    assert len(tokenizer("word " * 100, truncation=True).input_ids) == 77


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("a photo of a cat", "a photo of a cat"),
        ("Hello,  World!", "hello , world !"),
        ("It's café time: 42 €", "it 's café time : 4 2 €"),
        ("  tabs\tand\nnewlines  ", "tabs and newlines"),
    ],
)
def test_byte_tokenizer_round_trips_text(text, normalized):
    tokenizer = byte_level_clip_tokenizer()
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == normalized


def test_byte_tokenizer_save_load(tmp_path):
    tokenizer = byte_level_clip_tokenizer(model_max_length=32)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(reloaded, CLIPTokenizer)
    assert reloaded.model_max_length == 32 and len(reloaded) == len(tokenizer)
    text = ["Zürich — 東京, naïve text!", "x"]
    assert reloaded(text, padding=True).input_ids == tokenizer(text, padding=True).input_ids
