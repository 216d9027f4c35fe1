"""The embedded retrieval corpus (hf_extensions.prompt_dsi.retrieval): determinism, splits, disjointness."""

from __future__ import annotations

import pytest

from hf_extensions.prompt_dsi.retrieval import select_splits, stdlib_retrieval_corpus

SIZES = {"num_initial": 30, "num_increments": 3, "docs_per_increment": 10}


@pytest.fixture(scope="module")
def corpus():
    return stdlib_retrieval_corpus(**SIZES)


def test_corpus_is_deterministic_and_seed_changes_the_split(corpus):
    again = stdlib_retrieval_corpus(**SIZES)
    for split in ("corpus", "train", "test"):
        assert corpus[split].to_dict() == again[split].to_dict()
    other = stdlib_retrieval_corpus(**SIZES, seed=1)
    assert other["corpus"]["name"] != corpus["corpus"]["name"]


def test_docids_are_contiguous_per_increment(corpus):
    docs = corpus["corpus"]
    assert docs["docid"] == list(range(60))
    assert [docs["split"].count(t) for t in range(4)] == [30, 10, 10, 10]
    for t in range(4):
        ids = set(select_splits(docs, t)["docid"])
        assert set(select_splits(corpus["train"], t)["labels"]) == ids
        assert set(select_splits(corpus["test"], t)["labels"]) == ids
    assert len(set(docs["name"])) == 60 and len(set(docs["text"])) == 60


def test_train_and_test_query_spans_are_disjoint(corpus):
    train, test = corpus["train"], corpus["test"]
    span = 10  # the default span_words
    train_windows: dict[int, list[range]] = {}
    for label, kind, start in zip(train["labels"], train["kind"], train["span_start"]):
        if kind == "query":
            train_windows.setdefault(label, []).append(range(start, start + span))
    assert sorted(train_windows) == list(range(60))
    assert all(len(v) == 2 for v in train_windows.values())
    for text, label, start in zip(test["text"], test["labels"], test["span_start"]):
        assert len(text.split()) == span
        for window in train_windows[label]:
            assert not set(window) & set(range(start, start + span)), (label, start, window)
    # the document text (DSI indexing input) is one training row per document
    assert train["kind"].count("document") == 60
    assert len(test) == 2 * 60


def test_no_test_query_appears_in_a_training_row_of_its_document(corpus):
    """The leak of the first corpus: the document row (name + first 48 words) held the test
    spans at words 10 and 30 verbatim. A test query's word window must occur in no training
    text (document row or training query) of its document."""
    rows: dict[int, list[str]] = {}
    for text, label in zip(corpus["train"]["text"], corpus["train"]["labels"]):
        rows.setdefault(label, []).append(f" {text} ")
    assert len(corpus["test"]) == 2 * 60  # nothing had to be dropped for these documents
    for query, label in zip(corpus["test"]["text"], corpus["test"]["labels"]):
        assert not any(f" {query} " in row for row in rows[label]), (label, query)
    # the document rows keep every other word: name + up to 48 words outside the two test spans
    # of a docstring of >= 40 words
    assert all(21 <= len(text.split()) <= 49 for text in corpus["corpus"]["text"])


def test_too_many_documents_is_refused():
    with pytest.raises(ValueError, match="documents requested"):
        stdlib_retrieval_corpus(num_initial=5000)
    with pytest.raises(ValueError, match="num_initial"):
        stdlib_retrieval_corpus(num_initial=0)
