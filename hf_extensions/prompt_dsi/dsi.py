"""A classification differentiable search index (DSI) whose docid rows grow, and IncDSI's solver.

Classification DSI (Tay et al. 2022, "atomic docids"; the form used by IncDSI and PromptDSI's
classification variant): a query ``q`` is encoded by a transformer encoder, pooled to a feature
``f(q)`` (masked mean of the last hidden states, L2-normalised by default), and every document
``d`` has one row ``w_d`` of a linear layer; the score is ``s_d(q) = logit_scale * w_d . f(q)``
and retrieval ranks documents by score. :class:`DSIModel` keeps the rows in blocks, one per
indexing step, so :meth:`DSIModel.add_documents` appends a block and leaves the old rows
bit-identical (and frozen when wanted).

:func:`incdsi_rows` is IncDSI (Kishore, Wan, Lovelace, Artzi, Weinberger, "IncDSI: Incrementally
Updatable Document Retrieval", ICML 2023, Sec. 3): each new document's row ``x`` is the solution
of the constrained problem

    min ||x||^2  s.t.  x . q_new >= max_{d old} w_d . q_new + m1     (its queries pick it)
                       x . q_old <  max_{d old} w_d . q_old - m2     (old queries keep their argmax)

solved, as in the official code, as a penalised problem with L-BFGS (hinge terms weighted
``lam`` / ``1 - lam``, an L2 term), one document at a time, each added document's mean query
joining the old-query bank. Departures: (1) the second constraint uses each old query's current
*maximum* score (its argmax) rather than the score of its own document; the two agree whenever
the old query is retrieved correctly, and the max form is what "keeps every old query's argmax"
means; (2) after L-BFGS, violated old-query constraints are removed exactly by cyclic projection
onto their half-spaces (the penalty alone does not guarantee them), so the argmax of every old
query in the bank is provably unchanged. Cost: each bank query's best score is updated as rows
are added (``O(M d)`` per new document, ``O(N d)`` for its mean query), as the official code
does, not recomputed over all rows for every new document (``O(M N d)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_extensions.atomic import atomic_save, recover_interrupted_save
from hf_extensions.loading import FIX, check_tensors, load_peft_model, read_json, read_tensors
from hf_extensions.models.encoders import mean_pool
from hf_extensions.validation import (
    check_choice,
    check_integer,
    check_positive,
    is_plain_int,
    refuse,
)

__all__ = [
    "DSIModel",
    "check_dsi_encoder",
    "fit_docid_head",
    "incdsi_add_documents",
    "incdsi_rows",
]

POOLINGS = ("mean", "cls")
DSI_FORMAT = "hf-extensions-dsi-1"
ROWS_FILE = "docid_rows.safetensors"
CONFIG_FILE = "dsi_config.json"


#: What a DSI encoder must be, for error messages.
SUPPORTED_ENCODERS = (
    "a transformers text model without a task head that takes input_ids and returns "
    "last_hidden_state (BertModel, the bundled MiniLM, RobertaModel, T5EncoderModel, ...), or a "
    "PeftModel around one (a prompt pool)"
)


def check_dsi_encoder(encoder: nn.Module) -> None:
    """Refuse, naming it, an encoder :class:`DSIModel` would fail on deep in its forward.

    Raises:
        ValueError: an encoder-decoder model (T5: pass its encoder), a model with a task head
            (pass ``model.base_model``), a model whose main input is not ``input_ids`` (a
            vision or audio model), or a config without ``hidden_size``.
    """
    from transformers import PreTrainedModel

    model = encoder.get_base_model() if hasattr(encoder, "get_base_model") else encoder
    config = getattr(model, "config", None)
    described = f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})"
    problem = fix = None
    if isinstance(model, PreTrainedModel):
        if getattr(config, "is_encoder_decoder", False):
            problem = "an encoder-decoder model"
            fix = "pass its encoder (T5EncoderModel.from_pretrained(...) or model.get_encoder())"
        elif model.base_model is not model:
            problem = f"a model with a task head around {type(model.base_model).__name__}"
            fix = f"pass model.base_model ({type(model.base_model).__name__})"
        elif getattr(model, "main_input_name", "input_ids") != "input_ids":
            problem = f"a model whose main input is {model.main_input_name!r}, not text"
            fix = "use a text encoder"
    if problem is None and not isinstance(getattr(config, "hidden_size", None), int):
        problem, fix = "a model without config.hidden_size", "use a transformers text encoder"
    if problem is not None:
        raise ValueError(
            f"DSIModel does not support {described}: it is {problem}. Supported: "
            f"{SUPPORTED_ENCODERS}. Fix: {fix}."
        )


class DSIModel(nn.Module):
    """Encoder -> pooled feature -> docid rows (a linear layer without bias that can grow).

    Args:
        encoder: a ``transformers`` encoder returning ``last_hidden_state`` (``BertModel``, the
            bundled MiniLM), or a ``PeftModel`` around one (a prompt pool); extra forward keywords
            (``prompt_ids``) are passed to it.
        num_docs: rows of the initial corpus ``D0``.
        pooling: ``"mean"`` (masked mean, the MiniLM sentence embedding) or ``"cls"``.
        normalize: L2-normalise the pooled feature (cosine scores).
        logit_scale: fixed factor on the scores (a temperature for the cross-entropy).
        init_std: standard deviation of freshly initialised rows.

    ``forward(input_ids, attention_mask, labels=None, **encoder_kwargs)`` returns a
    ``SequenceClassifierOutput`` with ``logits [B, num_docs]`` and, with ``labels`` (docids), the
    cross-entropy ``loss``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_docs: int,
        pooling: str = "mean",
        normalize: bool = True,
        logit_scale: float = 10.0,
        init_std: float = 0.02,
    ):
        super().__init__()
        check_choice("pooling", pooling, POOLINGS)
        check_integer("num_docs", num_docs, low=1)
        check_positive("logit_scale", logit_scale)
        check_dsi_encoder(encoder)
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        self.logit_scale = float(logit_scale)
        self.init_std = float(init_std)
        self.hidden_size = int(encoder.config.hidden_size)
        self.docid_blocks = nn.ParameterList()
        self.add_documents(num_docs)

    @property
    def config(self):
        """The encoder's config (so ``Trainer`` and model cards find a name and sizes)."""
        return self.encoder.config

    @property
    def num_docs(self) -> int:
        return sum(block.shape[0] for block in self.docid_blocks)

    @property
    def docid_weight(self) -> torch.Tensor:
        """All rows ``[num_docs, hidden]`` (a concatenation: differentiable w.r.t. each block)."""
        return torch.cat(list(self.docid_blocks), dim=0)

    def add_documents(
        self,
        num_new: int,
        rows: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> range:
        """Append ``num_new`` docid rows (``rows`` if given, else N(0, init_std)); return their ids.

        Existing blocks are not touched (bit-identical); the new block is trainable.
        """
        num_new = check_integer("num_new", num_new, low=1)
        start = self.num_docs if len(self.docid_blocks) else 0
        reference = self.docid_blocks[0] if len(self.docid_blocks) else None
        if rows is None:
            # host: drawn on the CPU so that the rows do not depend on the device; moved below
            rows = torch.randn(num_new, self.hidden_size, generator=generator) * self.init_std
        elif tuple(rows.shape) != (num_new, self.hidden_size):
            raise ValueError(
                f"`rows` must have shape {(num_new, self.hidden_size)}, got {tuple(rows.shape)}."
            )
        if reference is not None:
            rows = rows.to(device=reference.device, dtype=reference.dtype)
        self.docid_blocks.append(nn.Parameter(rows.detach().clone()))
        return range(start, start + num_new)

    def set_trainable(self, *, encoder: bool, old_rows: bool, new_rows: bool = True) -> None:
        """``requires_grad`` of the encoder's own weights and of the old / newest row blocks.

        Adapter (prompt-pool) parameters are not touched here: PEFT sets them trainable and
        the encoder's base weights frozen.
        """
        if _is_peft_model(self.encoder):
            if encoder:
                refuse(
                    "encoder",
                    "False with a PEFT-wrapped encoder: its base weights stay frozen (train the "
                    "adapter, or unwrap the encoder to fine-tune it)",
                    encoder,
                )
        else:
            self.encoder.requires_grad_(encoder)
        for index, block in enumerate(self.docid_blocks):
            newest = index == len(self.docid_blocks) - 1
            block.requires_grad_(new_rows if newest else old_rows)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled (and normalised) feature ``[B, hidden]`` of last hidden states."""
        pooled = mean_pool(hidden, attention_mask) if self.pooling == "mean" else hidden[:, 0]
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def encode(self, input_ids, attention_mask, **encoder_kwargs) -> torch.Tensor:
        """The query feature ``f(q)`` ``[B, hidden]``."""
        output = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **encoder_kwargs)
        return self.pool(output.last_hidden_state, attention_mask)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """``logit_scale * features @ W^T``: ``[B, num_docs]``.

        One product per row block, the ``[B, n_block]`` results side by side: the rows are never
        concatenated into ``[num_docs, hidden]`` (a copy of every row at every forward, which
        :attr:`docid_weight` makes); gradients reach each block as before.
        """
        blocks = list(self.docid_blocks)
        if len(blocks) == 1:
            return self.logit_scale * (features @ blocks[0].T)
        return self.logit_scale * torch.cat([features @ block.T for block in blocks], dim=-1)

    def forward(self, input_ids, attention_mask=None, labels=None, **encoder_kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.scores(self.encode(input_ids, attention_mask, **encoder_kwargs))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    # ----------------------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the encoder (a PEFT adapter, or the full encoder) and the rows (safetensors).

        Layout: ``encoder/`` (``save_pretrained`` of the encoder: a PEFT model writes only its
        adapter), ``docid_rows.safetensors`` (one tensor per block) and ``dsi_config.json``, as
        one all-or-nothing save (:func:`hf_extensions.atomic.atomic_save`: ``encoder/`` is
        replaced whole).
        """
        blocks = {  # host: saving
            f"block_{i}": b.detach().cpu().contiguous() for i, b in enumerate(self.docid_blocks)
        }
        config = {
            "format": DSI_FORMAT,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "logit_scale": self.logit_scale,
            "init_std": self.init_std,
            "block_sizes": [int(b.shape[0]) for b in self.docid_blocks],
            "peft": _is_peft_model(self.encoder),
        }
        with atomic_save(save_directory) as stage:
            self.encoder.save_pretrained(str(stage / "encoder"))
            save_file(blocks, str(stage / ROWS_FILE))
            (stage / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, save_directory: str | os.PathLike, encoder: nn.Module) -> DSIModel:
        """Rebuild a saved DSI around ``encoder`` (the base encoder: a saved PEFT adapter is
        loaded onto it with ``PeftModel.from_pretrained``; a saved full encoder replaces it).

        An interrupted save is first finished or discarded.

        Raises:
            ValueError: the folder is not a DSI of this format, its rows do not match the block
                sizes and the encoder's width, or the encoder's files lack a tensor or hold one
                of another shape; each message names the file.
        """
        directory = Path(save_directory)
        recover_interrupted_save(directory)
        config_path, rows_path = directory / CONFIG_FILE, directory / ROWS_FILE
        config = read_json(config_path)
        if config.get("format") != DSI_FORMAT:
            raise ValueError(
                f"{config_path} holds DSI format {config.get('format')!r}; this version reads "
                f"{DSI_FORMAT!r}."
            )
        lacking = [
            key
            for key in ("pooling", "normalize", "logit_scale", "init_std", "block_sizes", "peft")
            if key not in config
        ]
        if lacking:
            raise ValueError(f"{config_path} lacks {lacking}: {FIX}.")
        sizes = config.get("block_sizes")
        if not isinstance(sizes, list) or not sizes or not all(is_plain_int(n) for n in sizes):
            raise ValueError(
                f"{config_path}: `block_sizes` must be a non-empty list of integers, got "
                f"{sizes!r}; re-save the model."
            )
        if config.get("peft"):
            encoder = load_peft_model(encoder, directory / "encoder")
        else:
            encoder, info = type(encoder).from_pretrained(
                str(directory / "encoder"), output_loading_info=True, ignore_mismatched_sizes=True
            )
            problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
            if problems or info.get("error_msgs"):
                raise ValueError(
                    f"{directory / 'encoder'} does not load whole into "
                    f"{type(encoder).__name__} ({problems or info['error_msgs']}): {FIX}."
                )
        blocks = read_tensors(rows_path)
        hidden = int(encoder.config.hidden_size)
        check_tensors(rows_path, blocks, {f"block_{i}": (n, hidden) for i, n in enumerate(sizes)})
        model = cls(
            encoder,
            sizes[0],
            pooling=config["pooling"],
            normalize=config["normalize"],
            logit_scale=config["logit_scale"],
            init_std=config["init_std"],
        )
        with torch.no_grad():
            model.docid_blocks[0].copy_(blocks["block_0"])
        for i, n in enumerate(sizes[1:], start=1):
            model.add_documents(n, rows=blocks[f"block_{i}"])
        return model


def _is_peft_model(module: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


def fit_docid_head(
    model: DSIModel,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    block: int = -1,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> float:
    """Fit one row block of a frozen-encoder DSI on precomputed features (full-batch AdamW, CE).

    The cheap way to index ``D0`` when the encoder stays frozen (the features are ``model.encode``
    of the training inputs, computed once). Only block ``block`` moves; the loss is over all rows.
    Returns the final training loss.
    """
    torch.manual_seed(seed)
    target = model.docid_blocks[block]
    others = [b for i, b in enumerate(model.docid_blocks) if b is not target]
    optimizer = torch.optim.AdamW([target], lr=lr, weight_decay=0.0)
    features = features.to(target.device, target.dtype)
    labels = labels.to(target.device)
    loss = torch.full((), float("nan"), device=target.device)
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model.scores(features)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
    for b in others:
        b.grad = None
    target.grad = None
    return float(loss.detach())


@torch.no_grad()
def _enforce_old_argmax(x, old_queries, limits, margin, max_rounds):
    """Cyclic projection of ``x`` onto ``{x: x . q_i <= limit_i - margin}`` (most violated first)."""
    for _ in range(max_rounds):
        violation = old_queries @ x - (limits - margin)
        worst = int(torch.argmax(violation))
        if violation[worst] < 0:
            return x, True
        q = old_queries[worst]
        x = x - (violation[worst] + 1e-6) / (q @ q).clamp_min(1e-12) * q
    return x, bool((old_queries @ x < limits).all())


def _solve_one_document(qs, bank, max_new, limits, lam, m1, m2, l2_reg, iterations, lr):
    """L-BFGS on IncDSI's penalised objective for one document (init: mean of its queries)."""
    x = qs.mean(dim=0).clone().requires_grad_(True)  # IncDSI's "mean_dpr" initialisation
    optimizer = torch.optim.LBFGS([x], lr=lr, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        pick = F.relu(max_new + m1 - qs @ x).sum()
        keep = F.relu(bank @ x - limits + m2).sum()
        loss = lam * pick + (1 - lam) * keep + l2_reg * (x * x).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return x.detach()


def incdsi_rows(
    weight: torch.Tensor,
    old_queries: torch.Tensor,
    new_queries: Sequence[torch.Tensor],
    *,
    lam: float = 0.5,
    m1: float = 0.1,
    m2: float = 0.1,
    l2_reg: float = 1e-3,
    iterations: int = 20,
    lr: float = 1.0,
    max_projection_rounds: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IncDSI: rows for new documents that keep the argmax of every old query.

    Args:
        weight: existing rows ``[N, d]``.
        old_queries: the bank of old query features ``[M, d]`` (IncDSI: one mean training-query
            feature per indexed document).
        new_queries: per new document, its query features ``[n_j, d]``.
        lam, m1, m2, l2_reg: the official code's hinge weight, margins and L2 weight.
        iterations, lr: L-BFGS steps (strong-Wolfe line search) per document.

    Returns:
        ``(rows [len(new_queries), d], bank)``: the new rows, and the old-query bank extended
        with each new document's mean query. Every bank query's argmax over ``[weight; rows]``
        equals its argmax over ``weight`` (exact, by the final projection), unless the
        constraints are infeasible, which raises ``RuntimeError``.
    """
    weight = weight.detach().float()
    old_queries = old_queries.detach().float()
    num_old, num_new, width = weight.shape[0], len(new_queries), weight.shape[1]
    # Rows and bank grow into preallocated storage; each bank query's best score over the rows
    # so far (`limits`) is kept up to date: O(M d) per new row, plus O(N d) for the new
    # document's mean query (the official code's incremental update), instead of recomputing
    # bank @ rows^T (O(M N d)) for every new document.
    rows = torch.empty(num_old + num_new, width, dtype=weight.dtype, device=weight.device)
    rows[:num_old] = weight
    bank = torch.empty(
        old_queries.shape[0] + num_new, width, dtype=weight.dtype, device=weight.device
    )
    bank[: old_queries.shape[0]] = old_queries
    limits = torch.empty(bank.shape[0], dtype=weight.dtype, device=weight.device)
    limits[: old_queries.shape[0]] = (old_queries @ weight.T).max(dim=1).values
    size = old_queries.shape[0]
    for j, qs in enumerate(new_queries):
        qs = qs.detach().float()
        if qs.ndim != 2 or qs.shape[1] != width:
            raise ValueError(f"each new query block must be [n, {width}], got {qs.shape}")
        current = rows[: num_old + j]
        max_new = (qs @ current.T).max(dim=1).values
        old, old_limits = bank[:size], limits[:size]
        x = _solve_one_document(qs, old, max_new, old_limits, lam, m1, m2, l2_reg, iterations, lr)
        x, ok = _enforce_old_argmax(x, old, old_limits, m2 / 2, max_projection_rounds)
        if not ok:
            raise RuntimeError("IncDSI: could not satisfy every old query's argmax constraint.")
        rows[num_old + j] = x
        limits[:size] = torch.maximum(old_limits, old @ x)
        mean = qs.mean(dim=0)
        bank[size] = mean
        limits[size] = (rows[: num_old + j + 1] @ mean).max()
        size += 1
    return rows[num_old:].clone(), bank


def incdsi_add_documents(
    model: DSIModel, old_queries: torch.Tensor, new_queries: Sequence[torch.Tensor], **kwargs
) -> tuple[range, torch.Tensor]:
    """Solve :func:`incdsi_rows` against ``model``'s rows and append them as a frozen block.

    ``new_queries`` are features (``model.encode``) of each new document's training inputs;
    returns ``(new docids, extended old-query bank)``. Scores carry ``logit_scale``, a positive
    factor, so argmax constraints in feature space hold for the model's logits.
    """
    with torch.no_grad():
        weight = model.docid_weight.detach()
    rows, bank = incdsi_rows(weight, old_queries, new_queries, **kwargs)
    ids = model.add_documents(len(rows), rows=rows)
    model.docid_blocks[-1].requires_grad_(False)
    return ids, bank
