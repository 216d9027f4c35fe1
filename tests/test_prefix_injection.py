"""The shared prefix key/value injection mechanism (peft_configs.injection).

The reference for "a prefix is injected correctly" is a real token: keys/values that a token
would produce in each layer (its hidden state through the layer's norm and W_K, W_V) must give
exactly the outputs of running the model with that token prepended. Decoders are also compared
with PEFT's own past_key_values prefix.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model

from hf_extensions.models import (
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    tiny_roberta,
    tiny_vit_classifier,
)
from peft_configs.injection import (
    PREFIX_ATTENTION,
    attach_prefix_sites,
    detach_prefix_site,
    extend_attention_mask,
    find_self_attention_modules,
    get_prefix_site,
    prefix_attention_forward,
)

IMPLEMENTATIONS = ["eager", "sdpa"]
ATOL = 2e-6


@contextlib.contextmanager
def inject_tokens(sites, hidden_states, count):
    """Each site gets, as prefix, the first ``count`` tokens' keys/values at its layer."""
    with contextlib.ExitStack() as stack:
        for site in sites:
            keys, values = site.project(hidden_states[site.layer_index][:, :count])
            stack.enter_context(site.inject(keys, values))
        yield


def _padded_ids(batch=3, length=7, vocab=500, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 2 :] = 0
    return ids, mask


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
def test_prefix_of_token_keys_equals_prepending_the_tokens(family, implementation):
    count = 1 if family == "llama" else 2  # rotary position 0 is the identity: one token exact
    first_position = 2 if family == "roberta" else 0  # RoBERTa numbers from padding_idx + 1
    if family == "bert":
        model, vocab = tiny_bert_classifier(attn_implementation=implementation), 500
    elif family == "roberta":
        model, vocab = tiny_roberta(implementation), 100
    elif family == "gpt2":
        model, vocab = tiny_gpt2(attn_implementation=implementation), 500
    else:
        model, vocab = tiny_llama(implementation), 100
    ids, mask = _padded_ids(vocab=vocab)
    extra = torch.randint(
        5, vocab, (ids.shape[0], count), generator=torch.Generator().manual_seed(1)
    )
    full_ids = torch.cat([extra, ids], dim=1)
    full_mask = torch.cat([torch.ones_like(extra), mask], dim=1)
    body = model.bert if family == "bert" else model
    encoder = family in ("bert", "roberta")
    with torch.no_grad():
        full = body(input_ids=full_ids, attention_mask=full_mask, output_hidden_states=True)
        sites = list(attach_prefix_sites(model).values())
        start = first_position + count
        positions = torch.arange(start, start + ids.shape[1]).expand(ids.shape[0], -1)
        with inject_tokens(sites, full.hidden_states, count):
            prefixed = body(input_ids=ids, attention_mask=mask, position_ids=positions)
    reference = full.last_hidden_state if encoder else full.logits
    output = prefixed.last_hidden_state if encoder else prefixed.logits
    keep = mask.bool()
    torch.testing.assert_close(output[keep], reference[:, count:][keep], atol=ATOL, rtol=0)
    # and the prefix does something: without it the outputs differ
    with torch.no_grad():
        plain = body(input_ids=ids, attention_mask=mask, position_ids=positions)
    plain_output = plain.last_hidden_state if encoder else plain.logits
    assert (plain_output[keep] - reference[:, count:][keep]).abs().max() > 1e-3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vit_prefix_of_token_keys_equals_prepending_the_tokens(implementation):
    model = tiny_vit_classifier(attn_implementation=implementation)
    pixels = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def encode(hidden):  # ViTModel's layers on given embeddings; every layer's input kept
        inputs = []
        for layer in model.vit.layers:
            inputs.append(hidden)
            hidden = layer(hidden)
        return hidden, inputs

    with torch.no_grad():
        embedded = model.vit.embeddings(pixels)  # [CLS, 16 patches]
        extra = torch.randn(2, 3, embedded.shape[-1], generator=torch.Generator().manual_seed(1))
        full, layer_inputs = encode(torch.cat([extra, embedded], dim=1))
        sites = list(attach_prefix_sites(model).values())
        with inject_tokens(sites, layer_inputs, 3):
            prefixed, _ = encode(embedded)
            logits = model(pixel_values=pixels).logits
        plain_logits = model(pixel_values=pixels).logits
    torch.testing.assert_close(prefixed, full[:, 3:], atol=ATOL, rtol=0)
    assert (logits - plain_logits).abs().max() > 1e-4  # the full model picks the prefix up too


def _copy_peft_prefix(peft_model, sites):
    """The PEFT prefix's per-layer keys/values, as [P, kv_dim] blocks (PEFT's layout)."""
    weight = peft_model.prompt_encoder["default"].embedding.weight
    width = sites[0].kv_dim
    blocks = weight.view(weight.shape[0], len(sites), 2, width)
    return [(blocks[:, i, 0], blocks[:, i, 1]) for i in range(len(sites))]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_injection_matches_peft_past_key_values_prefix(family, implementation):
    build = (
        (lambda: tiny_gpt2(attn_implementation=implementation))
        if family == "gpt2"
        else (lambda: tiny_llama(implementation))
    )
    reference = get_peft_model(
        build(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    ).eval()
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.normal_(
            generator=torch.Generator().manual_seed(2)
        )
    model = build()
    sites = list(attach_prefix_sites(model).values())
    ids, mask = _padded_ids(batch=2, length=6, vocab=90)
    mask[0, :2] = 0  # left padding too
    # PEFT's prefix sits in the cache at positions 0..2: the tokens are numbered from 3.
    positions = torch.arange(3, 9).expand(2, -1)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for site, (keys, values) in zip(sites, _copy_peft_prefix(reference, sites)):
            stack.enter_context(site.inject(keys, values))
        ours = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        theirs = reference(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=ATOL, rtol=0)


def test_per_sample_prefixes_equal_running_each_sample_alone():
    model = tiny_bert_classifier()
    ids, mask = _padded_ids(batch=2)
    (site,) = attach_prefix_sites(model, layers=[0]).values()
    keys = torch.randn(2, 4, site.kv_dim, generator=torch.Generator().manual_seed(3))
    values = torch.randn(2, 4, site.kv_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with site.inject(keys, values):
            batched = model(input_ids=ids, attention_mask=mask).logits
        alone = []
        for i in range(2):
            with site.inject(keys[i], values[i]):
                alone.append(model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits)
    torch.testing.assert_close(batched, torch.cat(alone), atol=ATOL, rtol=0)
    assert (batched[0] - batched[1]).abs().max() > 0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_prefix_mask_hides_prefix_positions(implementation):
    model = tiny_gpt2(attn_implementation=implementation)
    ids, mask = _padded_ids(batch=2, length=5)
    (site,) = attach_prefix_sites(model, layers=[-1]).values()
    keys = torch.randn(3, site.kv_dim, generator=torch.Generator().manual_seed(5))
    values = torch.randn(3, site.kv_dim, generator=torch.Generator().manual_seed(6))
    hidden = torch.tensor([[True, False, True], [True, True, True]])
    with torch.no_grad():
        with site.inject(keys, values, mask=hidden):
            masked = model(input_ids=ids, attention_mask=mask).logits
        with site.inject(keys[[0, 2]], values[[0, 2]]):
            first = model(input_ids=ids[:1], attention_mask=mask[:1]).logits
        with site.inject(keys, values):
            second = model(input_ids=ids[1:], attention_mask=mask[1:]).logits
    torch.testing.assert_close(masked, torch.cat([first, second]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_without_a_prefix_outputs_are_bit_identical_and_detach_restores(implementation):
    model = tiny_gpt2(attn_implementation=implementation)
    ids, mask = _padded_ids(batch=2)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        sites = attach_prefix_sites(model)
        assert all(
            site.module.config._attn_implementation == PREFIX_ATTENTION for site in sites.values()
        )
        assert model.config._attn_implementation == implementation  # the model's own is untouched
        attached = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, attached)
    for site in sites.values():
        detach_prefix_site(site.module)
        assert get_prefix_site(site.module) is None
        assert site.module.config is model.config
    assert attach_prefix_sites(model, layers=[0]) and len(attach_prefix_sites(model)) == 2


def test_switching_attention_implementation_after_attaching_keeps_the_prefix():
    model = tiny_gpt2(attn_implementation="eager")
    ids, mask = _padded_ids(batch=2)
    sites = list(attach_prefix_sites(model).values())
    generator = torch.Generator().manual_seed(7)
    prefixes = [
        (torch.randn(2, 32, generator=generator), torch.randn(2, 32, generator=generator))
        for _ in sites
    ]
    outputs = {}
    for implementation in IMPLEMENTATIONS:
        model.set_attn_implementation(implementation)
        assert sites[0].implementation == implementation
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for site, (keys, values) in zip(sites, prefixes):
                stack.enter_context(site.inject(keys, values))
            outputs[implementation] = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], atol=ATOL, rtol=0)


def test_layer_choice_and_attention_discovery():
    model = tiny_bert_classifier(num_layers=3)
    found = find_self_attention_modules(model)
    assert [name for name, _ in found] == [
        f"bert.encoder.layer.{i}.attention.self" for i in range(3)
    ]
    sites = attach_prefix_sites(model, layers=[-1, 0])
    assert [site.layer_index for site in sites.values()] == [0, 2]
    assert get_prefix_site(found[1][1]) is None
    with pytest.raises(ValueError, match="out of range"):
        attach_prefix_sites(model, layers=[3])
    with pytest.raises(ValueError, match="twice"):
        attach_prefix_sites(model, layers=[1, -2])
    gqa = next(iter(attach_prefix_sites(tiny_llama("eager")).values()))
    assert (gqa.num_heads, gqa.num_kv_heads, gqa.head_dim, gqa.kv_dim) == (4, 2, 8, 16)


def test_unsupported_settings_are_refused():
    model = tiny_gpt2()
    site = next(iter(attach_prefix_sites(model).values()))
    with pytest.raises(ValueError, match=r"\[P, 32\]"):
        site.set(torch.zeros(2, 31), torch.zeros(2, 31))
    with pytest.raises(ValueError, match="mask"):
        site.set(torch.zeros(2, 32), torch.zeros(2, 32), mask=torch.ones(3, dtype=torch.bool))
    model.config._attn_implementation_internal = "flash_attention_2"  # masks not tensors
    query = key = value = torch.zeros(1, 4, 3, 8)
    with (
        site.inject(torch.zeros(2, 32), torch.zeros(2, 32)),
        pytest.raises(NotImplementedError, match="flash_attention_2"),
    ):
        prefix_attention_forward(site.module, query, key, value, None)
    upcast = tiny_gpt2()
    upcast.config.reorder_and_upcast_attn = True
    for block in upcast.transformer.h:
        block.attn.reorder_and_upcast_attn = True
    with pytest.raises(ValueError, match="reorder_and_upcast_attn"):
        attach_prefix_sites(upcast)


def test_extend_attention_mask_formats():
    bool_mask = torch.tensor([[[[True, False]]]])
    extended = extend_attention_mask(
        bool_mask, 2, query_length=1, key_length=2, causal=False, implementation="sdpa",
        dtype=torch.float32, device=torch.device("cpu"),
    )  # fmt: skip
    assert extended.tolist() == [[[[True, True, True, False]]]]
    float_mask = torch.tensor([[[[0.0, -1e9]]]])
    extended = extend_attention_mask(
        float_mask, 1, query_length=1, key_length=2, causal=False, implementation="eager",
        dtype=torch.float32, device=torch.device("cpu"),
        prefix_mask=torch.tensor([[False], [True]]),
    )  # fmt: skip
    assert extended.shape == (2, 1, 1, 3)
    assert extended[0, 0, 0, 0] == torch.finfo(torch.float32).min and extended[1, 0, 0, 0] == 0
    causal = extend_attention_mask(
        None, 1, query_length=2, key_length=3, causal=True, implementation="sdpa",
        dtype=torch.float32, device=torch.device("cpu"),
    )  # fmt: skip
    # bottom-right aligned causal block behind an always-visible prefix column
    assert causal[0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert extend_attention_mask(
        None, 1, query_length=2, key_length=2, causal=False, implementation="sdpa",
        dtype=torch.float32, device=torch.device("cpu"),
    ) is None  # fmt: skip
