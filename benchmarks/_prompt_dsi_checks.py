"""Sanity logs and the per-query bootstrap of the PromptDSI benchmark (``benchmarks.prompt_dsi``).

* :func:`feature_shift`: cosine between the prompted and the unprompted pooled feature of the
  same queries (the pool bypassed): 1.0 means the prompts do not move the retrieval feature.
* :func:`prefix_attention_mass`: the share of attention that the real tokens of each prompted
  layer put on the prefix columns (eager attention; averaged over heads, real query tokens and
  queries): 0 means the prefix is not read.
* :func:`query_bootstrap`: a 95% percentile interval of the seed-averaged paired difference when
  the test queries are resampled within each seed (the query sampling error the per-seed
  t-interval does not contain).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from trainers.prompt_dsi_trainer import prompt_pool_of


def _batches(dataset, collator, batch_size: int = 128):
    for start in range(0, len(dataset), batch_size):
        rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
        yield collator([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows])


@torch.no_grad()
def feature_shift(model, dataset, collator) -> dict[str, float]:
    """Mean / min cosine of prompted vs unprompted pooled features (``model``: a pooled DSI)."""
    pool = prompt_pool_of(model)
    model.eval()
    cosines = []
    for batch in _batches(dataset, collator):
        prompted = model.encode(batch["input_ids"], batch["attention_mask"])
        with pool.pool_state.bypassing():
            plain = model.encode(batch["input_ids"], batch["attention_mask"])
        cosines.append(F.cosine_similarity(prompted, plain, dim=-1))
    cosine = torch.cat(cosines)
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}


@torch.no_grad()
def prefix_attention_mass(model, dataset, collator, prefix_length: int) -> dict[str, float]:
    """Share of each prompted layer's attention (real tokens as queries) on the prefix columns.

    Runs a copy of the model with eager attention and ``output_attentions=True``; the injected
    prefix occupies the first ``prefix_length`` key columns of a prompted layer's weights.
    """
    model = copy.deepcopy(model).eval()
    pool = prompt_pool_of(model)
    config = next(iter(model.encoder.peft_config.values()))
    base = model.encoder.get_base_model()
    base.set_attn_implementation("eager")
    layers = config.layers if config.layers is not None else list(range(len(base.encoder.layer)))
    masses: dict[int, list[float]] = {layer: [] for layer in layers}
    for batch in _batches(dataset, collator):
        out = model.encoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_attentions=True,
        )
        real = batch["attention_mask"].bool()  # [B, T] real query tokens
        for layer in layers:
            weights = out.attentions[layer]  # [B, H, T, P + T]
            if weights.shape[-1] != real.shape[1] + prefix_length:
                raise RuntimeError(
                    f"layer {layer}: {weights.shape[-1]} key columns, expected "
                    f"{real.shape[1]} tokens + {prefix_length} prefix"
                )
            mass = weights[..., :prefix_length].sum(-1).mean(1)  # [B, T]
            per_query = (mass * real).sum(1) / real.sum(1)
            masses[layer].extend(per_query.tolist())
    del pool
    per_layer = {str(layer): float(np.mean(values)) for layer, values in masses.items()}
    return {"mean": float(np.mean(list(per_layer.values()))), "per_layer": per_layer}


def query_bootstrap(
    method: list[np.ndarray], baseline: list[np.ndarray], *, draws: int = 2000, seed: int = 0
) -> dict[str, float]:
    """95% percentile interval of the seed-averaged ``method − baseline`` (per-query values,
    one array per seed, paired by query), the queries resampled with replacement within each seed.
    """
    generator = np.random.default_rng(seed)
    differences = [np.asarray(m, float) - np.asarray(b, float) for m, b in zip(method, baseline)]
    means = np.zeros(draws)
    for difference in differences:
        index = generator.integers(0, difference.size, size=(draws, difference.size))
        means += difference[index].mean(1)
    means /= len(differences)
    low, high = np.percentile(means, [2.5, 97.5])
    point = float(np.mean([d.mean() for d in differences]))
    return {"mean": point, "low": float(low), "high": float(high), "draws": draws}
