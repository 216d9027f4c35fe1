"""Prefix injection in an encoder-decoder model (BART): self-attention only, against real tokens.

The prefix goes into the encoder's and the decoder's self-attention, never into the decoder's
cross-attention (BART's ``encoder_attn`` shares the self-attention class). A prefix made of some
tokens' keys/values must act exactly as prepending those tokens to the layer inputs, and
``generate()`` must match the full forward with the prefix written into the cache once.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import get_peft_model
from transformers import BartConfig, BartForConditionalGeneration

from peft_configs import PromptPoolConfig, SharedPrefixTuningConfig
from peft_configs.injection import attach_prefix_sites
from peft_configs.shared_prefix import SharedPrefixLayer

ATOL = 2e-6
WIDTH, COUNT = 32, 2


def _bart(implementation: str = "eager") -> BartForConditionalGeneration:
    config = BartConfig(
        vocab_size=100, d_model=WIDTH, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
        attn_implementation=implementation, decoder_start_token_id=2, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, forced_eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return BartForConditionalGeneration(config).eval()


def _run(layers, hidden, **kwargs):
    """The layers on ``hidden``; returns the output and every layer's input."""
    inputs = []
    for layer in layers:
        inputs.append(hidden)
        hidden = layer(hidden, **kwargs)
    return hidden, inputs


def _causal(length: int) -> torch.Tensor:
    blocked = torch.ones(length, length, dtype=torch.bool).triu(1)
    return torch.zeros(1, 1, length, length).masked_fill(blocked, torch.finfo(torch.float32).min)


@contextlib.contextmanager
def _prefixed_by(sites, layer_inputs, first_layer):
    with contextlib.ExitStack() as stack:
        for site in sites:
            keys, values = site.project(layer_inputs[site.layer_index - first_layer][:, :COUNT])
            stack.enter_context(site.inject(keys, values))
        yield


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_bart_self_attention_prefix_equals_prepending_tokens(implementation):
    model = _bart(implementation)
    sites = attach_prefix_sites(model)
    assert [name.split(".", 1)[1] for name in sites] == [
        "encoder.layers.0.self_attn", "encoder.layers.1.self_attn",
        "decoder.layers.0.self_attn", "decoder.layers.1.self_attn",
    ]  # fmt: skip
    encoder_sites, decoder_sites = list(sites.values())[:2], list(sites.values())[2:]
    generator = torch.Generator().manual_seed(1)
    tokens, memory = torch.randn(2, 5, WIDTH, generator=generator), torch.randn(2, 6, WIDTH)
    extra = torch.randn(2, COUNT, WIDTH, generator=generator)
    encoder_layers, decoder_layers = model.model.encoder.layers, model.model.decoder.layers
    with torch.no_grad():
        full, inputs = _run(encoder_layers, torch.cat([extra, tokens], 1), attention_mask=None)
        with _prefixed_by(encoder_sites, inputs, 0):
            prefixed, _ = _run(encoder_layers, tokens, attention_mask=None)
        torch.testing.assert_close(prefixed, full[:, COUNT:], atol=ATOL, rtol=0)

        n = tokens.shape[1]
        cross = {"encoder_hidden_states": memory, "encoder_attention_mask": None}
        full, inputs = _run(
            decoder_layers, torch.cat([extra, tokens], 1), attention_mask=_causal(n + COUNT),
            **cross,
        )  # fmt: skip
        with _prefixed_by(decoder_sites, inputs, 2):
            prefixed, _ = _run(decoder_layers, tokens, attention_mask=_causal(n), **cross)
        plain, _ = _run(decoder_layers, tokens, attention_mask=_causal(n), **cross)
    torch.testing.assert_close(prefixed, full[:, COUNT:], atol=ATOL, rtol=0)
    assert (plain - full[:, COUNT:]).abs().max() > 1e-3


def test_bart_generate_matches_the_full_forward_with_the_prefix_cached_once():
    model = get_peft_model(
        _bart("sdpa"),
        SharedPrefixTuningConfig(share="none", num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM"),
    ).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "shared_prefix" in name:
                parameter.normal_(0, 1.0, generator=generator)
    layers = [m for m in model.modules() if isinstance(m, SharedPrefixLayer)]
    assert len(layers) == 4  # no cross-attention
    calls = []
    for layer in layers:
        layer.prefix = lambda name, _f=layer.prefix: calls.append(name) or _f(name)
    ids = torch.randint(5, 100, (2, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        assert len(calls) == len(layers)  # the encoder once, the decoder at the prefill only
        logits = model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences, use_cache=False
        ).logits
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, logits[:, step], atol=1e-5, rtol=0)
        assert torch.equal(out.sequences[:, step + 1], logits[:, step].argmax(-1))


def test_bart_prompt_pool_trains_by_forward_and_refuses_generate_clearly():
    model = get_peft_model(
        _bart("sdpa"),
        PromptPoolConfig(pool_size=4, prompt_length=2, top_k=1, task_type="SEQ_2_SEQ_LM"),
    ).eval()
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        prompted = model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        with model.disable_adapter():
            plain = model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        assert (prompted - plain).abs().max() > 1e-6  # tiny random BART: small logits
        with pytest.raises(ValueError, match="encoder-decoder model selects prompts"):
            model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
