"""PromptDSI incremental indexing: the growing DSI head, IncDSI, the trainer and the pool's passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, AutoTokenizer, DataCollatorWithPadding

import peft_configs  # noqa: F401  (registers the prompt pool with PEFT)
from hf_extensions.models import tiny_bert_classifier
from hf_extensions.models.encoders import minilm_path
from hf_extensions.prompt_dsi.dsi import (
    DSIModel,
    _enforce_old_argmax,
    _solve_one_document,
    fit_docid_head,
    incdsi_add_documents,
    incdsi_rows,
)
from hf_extensions.prompt_dsi.retrieval import select_splits, stdlib_retrieval_corpus
from peft_configs.prompt_pool import PromptPoolConfig, query_features, topic_keys
from trainers.prompt_dsi_config import PromptDSIConfig
from trainers.prompt_dsi_trainer import PromptDSITrainer, evaluate_retrieval, tokenize_for_dsi

NUM_D0, NUM_NEW = 16, 8


def _args(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path),
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "per_device_train_batch_size": 16,
        "learning_rate": 1e-2,
        "num_train_epochs": 15,
        "seed": 0,
        **overrides,
    }
    return PromptDSIConfig(**values)


@pytest.fixture(scope="module")
def setup():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = stdlib_retrieval_corpus(num_initial=NUM_D0, num_increments=1, docs_per_increment=NUM_NEW)
    train = tokenize_for_dsi(data["train"], tokenizer, max_length=24)
    return tokenizer, train, DataCollatorWithPadding(tokenizer)


def _batch(collator, dataset):
    rows = [{k: r[k] for k in ("input_ids", "attention_mask")} for r in dataset]
    return collator(rows)


def _indexed_d0(tokenizer, train, collator):
    """Tiny BERT DSI whose D0 rows are fitted on frozen features."""
    encoder = tiny_bert_classifier(vocab_size=tokenizer.vocab_size).bert
    model = DSIModel(encoder, NUM_D0)
    d0 = select_splits(train, 0)
    batch = _batch(collator, d0)
    with torch.no_grad():
        features = model.encode(batch["input_ids"], batch["attention_mask"])
    fit_docid_head(model, features, torch.tensor(d0["labels"]), steps=200)
    return model, batch


def _pool(encoder, batch, **overrides):
    config = {
        "pool_size": 4,
        "prompt_length": 4,
        "top_k": 1,
        "layers": [1],
        "key_source": "fixed",
        "query_source": "input_embed_mean",
        **overrides,
    }
    pool = get_peft_model(encoder, PromptPoolConfig(**config))
    if config["key_source"] == "fixed":
        query = query_features(
            encoder, batch["input_ids"], batch["attention_mask"], query_source="input_embed_mean"
        )
        pool.base_model.set_keys(topic_keys(query, 4, seed=0)[0])
    return pool


# ----------------------------------------------------------------------------- the DSI head


def test_add_documents_grows_head_and_keeps_old_rows_bit_identical():
    torch.manual_seed(0)
    model = DSIModel(tiny_bert_classifier().bert, 5)
    old = model.docid_weight.detach().clone()
    ids = model.add_documents(3)
    assert list(ids) == [5, 6, 7] and model.num_docs == 8
    assert torch.equal(model.docid_weight[:5], old)
    logits = model(torch.randint(1, 200, (2, 6))).logits
    assert logits.shape == (2, 8)
    model.set_trainable(encoder=False, old_rows=False)
    assert not model.docid_blocks[0].requires_grad and model.docid_blocks[1].requires_grad
    assert not any(p.requires_grad for p in model.encoder.parameters())
    with pytest.raises(ValueError, match="rows"):
        model.add_documents(2, rows=torch.zeros(3, 32))


def test_scores_never_concatenate_the_rows():
    """DSI scoring used to build ``[num_docs, hidden]`` (all rows) at every forward."""
    torch.manual_seed(0)
    model = DSIModel(tiny_bert_classifier().bert, 5)
    model.add_documents(3)
    model.add_documents(4)
    features = F.normalize(torch.randn(6, 32), dim=-1)
    shapes = []

    class RecordCat(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func is torch.cat:
                shapes.append(tuple(result.shape))
            return result

    with RecordCat():
        logits = model.scores(features)
    assert (12, 32) not in shapes and shapes == [(6, 12)]
    expected = model.logit_scale * features @ model.docid_weight.T
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    model.set_trainable(encoder=False, old_rows=False)
    model.scores(features).sum().backward()
    assert model.docid_blocks[0].grad is None and model.docid_blocks[2].grad is not None


def test_incdsi_rows_keep_every_old_query_argmax_exactly():
    torch.manual_seed(0)
    d, n_old = 16, 40
    weight = F.normalize(torch.randn(n_old, d), dim=-1)
    old_queries = F.normalize(weight + 0.5 * torch.randn(n_old, d), dim=-1)
    # new documents near old ones: the hardest case for keeping old argmaxes
    new = [F.normalize(weight[i] + 0.3 * torch.randn(3, d), dim=-1) for i in range(12)]
    before = (old_queries @ weight.T).argmax(dim=1)
    rows, bank = incdsi_rows(weight, old_queries, new)
    full = torch.cat([weight, rows])
    assert torch.equal((old_queries @ full.T).argmax(dim=1), before)
    # every bank query (old and the added documents' mean queries) keeps the argmax it had
    assert bank.shape == (n_old + 12, d)
    new_queries = torch.cat(new)
    labels = torch.arange(n_old, n_old + 12).repeat_interleave(3)
    hits = ((new_queries @ full.T).argmax(dim=1) == labels).float().mean()
    assert hits >= 0.5, hits  # the new documents are found by their own queries


def _incdsi_recomputing(weight, bank, new_queries, lam=0.5, m1=0.1, m2=0.1, l2_reg=1e-3):
    """The first implementation: every bank query's best score recomputed for each document."""
    rows = []
    for qs in new_queries:
        current = torch.cat([weight, *[r[None] for r in rows]])
        max_new = (qs @ current.T).max(dim=1).values
        limits = (bank @ current.T).max(dim=1).values
        x = _solve_one_document(qs, bank, max_new, limits, lam, m1, m2, l2_reg, 20, 1.0)
        x, _ = _enforce_old_argmax(x, bank, limits, m2 / 2, 1000)
        rows.append(x)
        bank = torch.cat([bank, qs.mean(dim=0, keepdim=True)])
    return torch.stack(rows), bank


def test_incdsi_updates_old_query_scores_incrementally():
    """Same rows as recomputing ``bank @ rows^T`` per document, at O(M d) per document: the
    matrix products cost about one pass over bank x old rows, not one per new document."""
    torch.manual_seed(2)
    d, n_old, m, n_new = 8, 40, 300, 4
    weight = F.normalize(torch.randn(n_old, d), dim=-1)
    bank = F.normalize(torch.randn(m, d), dim=-1)
    new = [F.normalize(weight[i] + 0.3 * torch.randn(3, d), dim=-1) for i in range(n_new)]
    with FlopCounterMode(display=False) as counter:
        rows, extended = incdsi_rows(weight, bank, new)
    expected_rows, expected_bank = _incdsi_recomputing(weight, bank, new)
    torch.testing.assert_close(rows, expected_rows, atol=1e-6, rtol=0)
    torch.testing.assert_close(extended, expected_bank, atol=0, rtol=0)
    one_pass = 2 * m * n_old * d
    assert counter.get_total_flops() < 1.5 * one_pass, (counter.get_total_flops(), one_pass)


def test_incdsi_add_documents_appends_a_frozen_block():
    torch.manual_seed(1)
    model = DSIModel(tiny_bert_classifier().bert, 6)
    old = model.docid_weight.detach().clone()
    bank = F.normalize(torch.randn(6, 32), dim=-1)
    ids, bank2 = incdsi_add_documents(model, bank, [F.normalize(torch.randn(2, 32), dim=-1)])
    assert list(ids) == [6] and bank2.shape == (7, 32)
    assert torch.equal(model.docid_weight[:6], old)
    assert not model.docid_blocks[-1].requires_grad


# ----------------------------------------------------------------------------- config / trainer


def test_strategy_sets_what_trains_by_default(tmp_path):
    """(Refused strategies and settings are in the conformance suite.)"""
    sequential = _args(tmp_path, strategy="sequential")
    assert sequential.train_encoder and sequential.train_old_rows
    prompt = _args(tmp_path)
    assert prompt.train_encoder is False and prompt.train_old_rows is False


def test_trainer_refuses_a_pool_strategy_without_a_pool(tmp_path):
    model = DSIModel(tiny_bert_classifier().bert, 4)
    with pytest.raises(ValueError, match="prompt pool"):
        PromptDSITrainer(model, _args(tmp_path))


def test_prompt_dsi_increment_learns_new_docs_with_frozen_encoder(tmp_path, setup):
    tokenizer, train, collator = setup
    model, batch = _indexed_d0(tokenizer, train, collator)
    base = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    d0_rows = model.docid_weight.detach().clone()
    model.encoder = _pool(model.encoder, batch)
    prompts = model.encoder.base_model.prompts().detach().clone()
    trainer = PromptDSITrainer(model, _args(tmp_path), data_collator=collator)
    new = select_splits(train, 1)
    before = evaluate_retrieval(model, new, collator)  # no new rows yet: labels out of range
    assert before["hits@10"] == 0.0
    ids = trainer.add_documents(new, NUM_NEW)
    assert list(ids) == list(range(NUM_D0, NUM_D0 + NUM_NEW))
    after = evaluate_retrieval(model, new, collator)
    chance = 1 / (NUM_D0 + NUM_NEW)
    assert after["hits@1"] > 5 * chance, after  # the increment's documents are indexed
    # frozen encoder, frozen old rows; the prompts and new rows moved
    pool_model = model.encoder.get_base_model()
    for name, value in pool_model.state_dict().items():
        key = name.replace(".base_layer", "")
        if "prompt_pool" not in name:
            assert torch.equal(value, base[key]), name
    assert torch.equal(model.docid_weight[:NUM_D0], d0_rows)
    assert not torch.equal(model.encoder.base_model.prompts(), prompts)
    assert model.encoder.base_model.usage_counts.sum() > 0


def test_sequential_strategy_fine_tunes_encoder_and_old_rows(tmp_path, setup):
    tokenizer, train, collator = setup
    model, _ = _indexed_d0(tokenizer, train, collator)
    encoder_before = model.encoder.encoder.layer[0].attention.self.query.weight.detach().clone()
    d0_rows = model.docid_weight.detach().clone()
    trainer = PromptDSITrainer(
        model, _args(tmp_path, strategy="sequential", num_train_epochs=2), data_collator=collator
    )
    trainer.add_documents(select_splits(train, 1), NUM_NEW)
    assert not torch.equal(
        model.encoder.encoder.layer[0].attention.self.query.weight, encoder_before
    )
    assert not torch.equal(model.docid_weight[:NUM_D0], d0_rows)


# ----------------------------------------------------------------------------- one pass vs two


@pytest.mark.parametrize(("query_source", "passes"), [("input_embed_mean", 1), ("frozen_cls", 2)])
def test_encoder_passes_per_batch(setup, query_source, passes):
    tokenizer, train, collator = setup
    model, batch = _indexed_d0(tokenizer, train, collator)
    encoder_stack = model.encoder.encoder  # BertEncoder: the transformer layers
    if query_source == "frozen_cls":
        model.encoder = _pool(model.encoder, batch, key_source="learned", query_source=query_source)
    else:
        model.encoder = _pool(model.encoder, batch)
    calls = []
    handle = encoder_stack.register_forward_hook(lambda *args: calls.append(1))
    try:
        model(batch["input_ids"][:4], batch["attention_mask"][:4])
    finally:
        handle.remove()
    assert len(calls) == passes


def test_dsi_with_pool_saves_and_reloads_with_identical_outputs(tmp_path, setup):
    tokenizer, train, collator = setup
    model, batch = _indexed_d0(tokenizer, train, collator)
    model.encoder = _pool(model.encoder, batch)
    model.add_documents(3)
    with torch.no_grad():  # move the prompts off their initial values
        for param in model.encoder.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    model.eval()
    inputs = (batch["input_ids"][:6], batch["attention_mask"][:6])
    with torch.no_grad():
        expected = model(*inputs).logits
    selection = model.encoder.base_model.last_selection.clone()
    model.save_pretrained(tmp_path / "dsi")
    assert (tmp_path / "dsi" / "encoder" / "adapter_config.json").is_file()
    fresh = tiny_bert_classifier(vocab_size=tokenizer.vocab_size).bert
    loaded = DSIModel.from_pretrained(tmp_path / "dsi", fresh).eval()
    with torch.no_grad():
        got = loaded(*inputs).logits
    assert torch.equal(got, expected)
    assert torch.equal(loaded.encoder.base_model.last_selection, selection)
    assert [b.shape[0] for b in loaded.docid_blocks] == [NUM_D0, 3]


# ----------------------------------------------------------------------------- the recipe


def test_recipe_indexes_an_increment_and_saves_a_reloadable_dsi(tmp_path, setup):
    from recipes.prompt_dsi.train import main

    tokenizer = setup[0]
    encoder_dir = tmp_path / "encoder"
    tiny_bert_classifier(vocab_size=tokenizer.vocab_size).bert.save_pretrained(encoder_dir)
    tokenizer.save_pretrained(encoder_dir)
    out = tmp_path / "run"
    trainer, metrics = main(
        [
            "--config",
            "recipes/prompt_dsi/embedded.yaml",
            "--model_name_or_path",
            str(encoder_dir),
            "--num_initial",
            "12",
            "--num_increments",
            "1",
            "--docs_per_increment",
            "4",
            "--max_length",
            "16",
            "--pool_size",
            "3",
            "--prompt_length",
            "2",
            "--num_train_epochs",
            "2",
            "--output_dir",
            str(out),
            "--use_cpu",
            "true",
        ]
    )
    for key in ("test_d0_hits10", "test_new_hits10", "test_new_mrr10", "test_usage_entropy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert (out / "README.md").read_text().count("prompt-dsi") >= 1
    fresh = AutoModel.from_pretrained(encoder_dir)
    loaded = DSIModel.from_pretrained(out, fresh)
    assert loaded.num_docs == 16
    assert torch.equal(loaded.docid_weight, trainer.model.docid_weight.detach())
