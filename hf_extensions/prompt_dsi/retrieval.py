"""An embedded document-retrieval corpus for incremental indexing (DSI), built from Python itself.

The documents are the docstrings of the standard library's modules and of their public functions
and classes (text that ships with every Python, so nothing downloads). Each document has an
atomic docid; the collection is split into an initial corpus ``D0`` and ``num_increments`` new
splits ``D1..Dn`` (the incremental-indexing protocol of DSI++ / IncDSI / PromptDSI). Training
inputs are, as in DSI indexing, the document text itself plus pseudo-queries; pseudo-queries are
spans of ``span_words`` consecutive words of the docstring: even-numbered spans are training
queries, odd-numbered spans are test queries, and the document text is built from the words
outside the test spans. So no test query shares a word position with any training row of its
document (before 2026-12-08 the document text was the first 48 words, which contain the test
spans at words 10 and 30: 58 of the recipe's 760 test queries appeared verbatim in their
document's training row).

Determinism: the rows depend only on the Python version (the docstrings change between Python
releases; this was built on 3.11) and on ``seed`` (which documents go to which split).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Sequence

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value

from hf_extensions.validation import check_integer

__all__ = ["STDLIB_MODULES", "select_splits", "stdlib_documents", "stdlib_retrieval_corpus"]

#: Modules whose docstrings (and whose own public functions' and classes' docstrings) are the
#: documents. Fixed and ordered so that the corpus is reproducible.
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "binascii", "bisect", "bz2",
    "calendar", "cmath", "codecs", "collections", "colorsys", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "email.message",
    "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "imaplib",
    "inspect", "io", "ipaddress", "itertools", "json", "keyword", "locale", "logging", "lzma",
    "math", "mimetypes", "numbers", "operator", "os", "pathlib", "pdb", "pickle", "pkgutil",
    "platform", "poplib", "pprint", "queue", "quopri", "random", "re", "sched", "selectors",
    "shutil", "signal", "smtplib", "socket", "sqlite3", "ssl", "statistics", "string", "struct",
    "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit",
    "tokenize", "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "zipfile", "zipimport", "zlib",
)  # fmt: skip


def _top(module_name: str) -> str:
    return module_name.split(".")[0].lstrip("_")


def stdlib_documents(min_words: int = 40) -> list[tuple[str, str]]:
    """``(name, docstring)`` pairs of :data:`STDLIB_MODULES` with at least ``min_words`` words.

    A module contributes its own docstring and those of the public functions and classes it
    defines (a member re-exported from another module is skipped); a docstring seen twice is
    kept once, under its first name. Whitespace is collapsed to single spaces.
    """
    seen: set[str] = set()
    documents = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in STDLIB_MODULES:
            module = importlib.import_module(module_name)
            members = [(module_name, module)]
            for name, member in inspect.getmembers(module):
                if name.startswith("_") or not (
                    inspect.isfunction(member)
                    or inspect.isclass(member)
                    or inspect.isbuiltin(member)
                ):
                    continue
                if _top(getattr(member, "__module__", None) or "") != _top(module_name):
                    continue
                members.append((f"{module_name}.{name}", member))
            for name, member in members:
                text = " ".join((inspect.getdoc(member) or "").split())
                if len(text.split()) >= min_words and text not in seen:
                    seen.add(text)
                    documents.append((name, text))
    return documents


def stdlib_retrieval_corpus(
    num_initial: int = 200,
    num_increments: int = 3,
    docs_per_increment: int = 60,
    span_words: int = 10,
    num_train_queries: int = 2,
    num_test_queries: int = 2,
    document_words: int = 48,
    seed: int = 0,
) -> DatasetDict:
    """D0 + increments of standard-library docstrings, as a ``DatasetDict``.

    Splits:

    - ``corpus``: ``docid``, ``name`` (e.g. ``json.dumps``), ``text`` (name + the first
      ``document_words`` words of the docstring that lie outside every test span), ``split``
      (0 = D0, ``t`` = increment ``t``);
    - ``train``: ``text``, ``labels`` (docid), ``split``, ``kind`` (``"document"``: the document
      text, DSI's indexing input; ``"query"``: a training pseudo-query), ``span_start`` (the
      query's first word in the docstring; -1 for document rows);
    - ``test``: ``text``, ``labels``, ``split``, ``span_start``: held-out pseudo-queries.

    Query spans are the docstring's consecutive ``span_words``-word windows: spans 0, 2, 4, ...
    train, spans 1, 3, 5, ... test (at most ``num_train_queries`` / ``num_test_queries`` each), and
    the document text skips the test spans' words, so no training row (document or query) holds
    a word position of a test query. A test span whose words still occur, in order, in a
    training row of its document (a docstring that repeats a phrase) is dropped. Docids are ``0..num_initial-1`` for
    D0, then consecutive per increment. Which document lands in which split is a permutation
    drawn with ``seed``.

    Raises:
        ValueError: the sizes ask for more documents than there are, or a size is < 1.
    """
    for name, value in (
        ("num_initial", num_initial),
        ("docs_per_increment", docs_per_increment),
        ("span_words", span_words),
        ("num_train_queries", num_train_queries),
        ("num_test_queries", num_test_queries),
        ("document_words", document_words),
    ):
        check_integer(name, value, low=1)
    check_integer("num_increments", num_increments, low=0)
    min_words = span_words * 2 * max(num_train_queries, num_test_queries)
    documents = stdlib_documents(min_words=min_words)
    needed = num_initial + num_increments * docs_per_increment
    if needed > len(documents):
        raise ValueError(
            f"num_initial + num_increments * docs_per_increment = {needed} documents requested, "
            f"but only {len(documents)} docstrings have >= {min_words} words on this Python."
        )
    order = np.random.default_rng(seed).permutation(len(documents))[:needed]
    corpus: dict[str, list] = {"docid": [], "name": [], "text": [], "split": []}
    train: dict[str, list] = {"text": [], "labels": [], "split": [], "kind": [], "span_start": []}
    test: dict[str, list] = {"text": [], "labels": [], "split": [], "span_start": []}
    for docid, index in enumerate(order.tolist()):  # host: building the corpus
        split = 0 if docid < num_initial else 1 + (docid - num_initial) // docs_per_increment
        name, text = documents[index]
        words = text.split()
        starts = list(range(0, len(words) - span_words + 1, span_words))
        train_starts = starts[0::2][:num_train_queries]
        test_starts = starts[1::2][:num_test_queries]
        held_out = {i for start in test_starts for i in range(start, start + span_words)}
        kept = [word for i, word in enumerate(words) if i not in held_out]
        document = f"{name}: {' '.join(kept[:document_words])}"
        queries = [" ".join(words[start : start + span_words]) for start in train_starts]
        corpus["docid"].append(docid)
        corpus["name"].append(name)
        corpus["text"].append(document)
        corpus["split"].append(split)
        for row, kind, start in [(document, "document", -1)] + [
            (query, "query", start) for query, start in zip(queries, train_starts)
        ]:
            train["text"].append(row)
            train["labels"].append(docid)
            train["split"].append(split)
            train["kind"].append(kind)
            train["span_start"].append(start)
        training_texts = [f" {row} " for row in [document, *queries]]
        for start in test_starts:
            query = " ".join(words[start : start + span_words])
            if any(f" {query} " in row for row in training_texts):
                continue  # the docstring repeats this phrase in a training row
            test["text"].append(query)
            test["labels"].append(docid)
            test["split"].append(split)
            test["span_start"].append(start)
    int_features = {
        "labels": Value("int64"),
        "split": Value("int64"),
        "span_start": Value("int64"),
    }
    return DatasetDict(
        {
            "corpus": Dataset.from_dict(
                corpus,
                features=Features(
                    {
                        "docid": Value("int64"),
                        "name": Value("string"),
                        "text": Value("string"),
                        "split": Value("int64"),
                    }
                ),
            ),
            "train": Dataset.from_dict(
                train,
                features=Features(
                    {"text": Value("string"), **int_features, "kind": Value("string")}
                ),
            ),
            "test": Dataset.from_dict(
                test, features=Features({"text": Value("string"), **int_features})
            ),
        }
    )


def select_splits(dataset: Dataset, splits: int | Sequence[int]) -> Dataset:
    """The rows of ``dataset`` whose ``split`` column is in ``splits`` (one int or several)."""
    wanted = {splits} if isinstance(splits, int) else set(splits)
    rows = [i for i, split in enumerate(dataset["split"]) if split in wanted]
    return dataset.select(rows)
