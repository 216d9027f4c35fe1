"""Conformance case of the prompt pool (``PromptPoolConfig``, a PEFT method: a pool of prompts
selected by learned or fixed topic keys). Baseline: with the adapter disabled, a BERT encoder
and a ViT classifier wearing the pool equal the stock models bit for bit (training mode, the
same dropout draws); the control turns the pool on. Reload: 4 key / query variants with their
selections and keys; no card (PEFT writes the adapter's own); two processes: the stock
``Trainer``."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

import peft_configs  # noqa: F401  (registers the PEFT method, as a user's import does)
from conformance.case import (
    Baseline,
    Case,
    Saved,
    bad,
    bad_values,
    prefixed,
    probe_pixels,
    stock_ranks,
)
from hf_extensions.models import tiny_bert_classifier
from hf_extensions.models import tiny_vit_classifier as vit
from peft_configs import PromptPoolConfig
from peft_configs.prompt_pool import query_features, topic_keys


def _bert_encoder():
    return tiny_bert_classifier().bert.eval()


def _tokens(rows: int = 6):
    ids = torch.randint(1, 500, (rows, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


_POOL = dict(pool_size=4, prompt_length=3, top_k=1)


def _pool_outputs(model, batch, enabled: bool):
    torch.manual_seed(0)  # the same dropout draws as the stock forward
    with torch.no_grad():
        if enabled:
            out = model(**batch)
        else:
            with model.disable_adapter():
                out = model(**batch)
    return out


def _prompt_pool_baseline(tmp_path: Path) -> Baseline:
    """With the adapter disabled, a model wearing the pool (its attention rerouted through the
    prefix sites) is the stock model bit for bit: a BERT encoder and a ViT classifier, in
    training mode (dropout with the same draws). Control: the pool on."""
    del tmp_path
    result = Baseline({}, {}, {})
    for kind, build, batch, read in (
        ("bert", _bert_encoder, _tokens(), lambda o: o.last_hidden_state),
        ("vit", lambda: vit(), {"pixel_values": probe_pixels()}, lambda o: o.logits),
    ):
        extra = {"modules_to_save": ["classifier"]} if kind == "vit" else {}
        model = get_peft_model(build(), PromptPoolConfig(layers=[0, 1], **_POOL, **extra)).train()
        stock = build().train()
        torch.manual_seed(0)
        with torch.no_grad():
            result.stock[kind] = read(stock(**batch))
        result.method[kind] = read(_pool_outputs(model, batch, enabled=False))
        result.control[kind] = read(_pool_outputs(model, batch, enabled=True))
    return result


#: (family, key_source, query_source): the variants whose saved state differs.
_POOL_VARIANTS = (
    ("bert", "fixed", "input_embed_mean"),
    ("bert", "learned", "frozen_cls"),
    ("bert", "fixed", "layer_k_cls"),
    ("vit", "fixed", "input_embed_mean"),
)


def _pool_variant(family: str, key_source: str, query_source: str):
    if family == "vit":
        return (
            lambda: vit(num_layers=2),
            {"pixel_values": probe_pixels()},
            {"modules_to_save": ["classifier"]},
        )
    return _bert_encoder, _tokens(), {}


def _pool_query(query_source: str) -> dict:
    return {
        "query_source": query_source,
        "query_layer": 1 if query_source == "layer_k_cls" else None,
    }


def _pool_read(model, batch):
    out = model(**batch)
    value = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
    pool = model.base_model
    return {"output": value, "selection": pool.last_selection.clone(), "keys": pool.get_keys()}


def _prompt_pool_save(directory: Path) -> Saved:
    """Each variant with trained-looking prompts (moved off their initialisation) and, for
    fixed keys, topic keys from the base model's queries."""
    outputs = {}
    for family, key_source, query_source in _POOL_VARIANTS:
        build, batch, extra = _pool_variant(family, key_source, query_source)
        config = PromptPoolConfig(
            key_source=key_source, layers=[1], **_POOL, **_pool_query(query_source), **extra
        )
        torch.manual_seed(0)
        model = get_peft_model(build(), config)
        if key_source == "fixed":
            features = query_features(build(), **batch, **_pool_query(query_source))
            model.base_model.set_keys(topic_keys(features, num_topics=4, seed=0)[0])
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "prompt_pool_prompts" in name:
                    parameter.mul_(1.5).add_(0.1)
        model.eval()
        name = f"{family}-{key_source}-{query_source}"
        model.save_pretrained(directory / name)
        with torch.no_grad():
            outputs.update(prefixed(name, _pool_read(model, batch)))
    return Saved(outputs)


def _prompt_pool_reload(directory: Path):
    outputs = {}
    for family, key_source, query_source in _POOL_VARIANTS:
        build, batch, _ = _pool_variant(family, key_source, query_source)
        name = f"{family}-{key_source}-{query_source}"
        model = PeftModel.from_pretrained(build(), directory / name).eval()
        with torch.no_grad():
            outputs.update(prefixed(name, _pool_read(model, batch)))
    return outputs


PROMPT_POOL = Case(
    id="prompt-pool",
    baseline=_prompt_pool_baseline,
    save=_prompt_pool_save,
    reload=_prompt_pool_reload,
    bad_configs=bad_values(
        PromptPoolConfig,
        {},
        [
            ("pool_size", 0),
            ("prompt_length", 0),
            ("layers", []),
            ("layers", [1, 1]),
            ("key_source", "random"),
            ("query_source", "mean"),
            ("pull_loss_weight", -1.0),
            ("pull_loss_weight", float("nan")),
            ("format_version", 99),
        ],
    )
    + tuple(
        bad(field, lambda overrides=overrides: PromptPoolConfig(**overrides), overrides)
        for overrides, field in (
            ({"top_k": 5, "pool_size": 4}, "top_k"),
            ({"query_source": "layer_k_cls"}, "query_layer"),
            ({"query_source": "layer_k_cls", "query_layer": 2, "layers": [1]}, "query_layer"),
            ({"query_layer": 1}, "query_layer"),
            ({"pull_loss_weight": 0.1, "key_source": "fixed"}, "pull_loss_weight"),
        )
    ),
    ranks=stock_ranks(
        lambda: get_peft_model(
            vit(),
            PromptPoolConfig(layers=[0, 1], modules_to_save=["classifier"], **_POOL),
        )
    ),
    not_applicable={
        "card": "a PEFT adapter's README is PEFT's own card; the hf-extensions record of a pool "
        "is written by recipes/prompt_dsi (method prompt-dsi, see the prompt-dsi case)",
    },
)
