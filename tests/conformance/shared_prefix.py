"""Conformance case of shared-structure prefix tuning (``SharedPrefixTuningConfig``, a PEFT
method trained by the stock ``Trainer``). Baseline: ``share="none"`` from PEFT's initial
prefix equals PEFT's own ``PrefixTuningConfig(prefix_projection=False)`` trained the same way,
prefix and logits; the control is ``share="global_mlp"``, the reparameterised prefix.
Reload: the PEFT adapter; no card (PEFT writes the adapter's own); two processes: the stock
``Trainer`` on a global_mlp adapter."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import Trainer, TrainingArguments, default_data_collator

import peft_configs  # noqa: F401  (registers the PEFT method, as a user's import does)
from conformance.case import (
    QUIET,
    REAL_STEP,
    Baseline,
    Case,
    Saved,
    bad,
    bad_values,
    digits,
    probe_pixels,
    stock_ranks,
)
from hf_extensions.models import tiny_gpt2
from hf_extensions.models import tiny_vit_classifier as vit
from peft_configs import SharedPrefixTuningConfig
from peft_configs.shared_prefix import SharedPrefixLayer


def _token_data(rows: int = 12) -> Dataset:
    ids = torch.randint(5, 500, (rows, 6), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids}
    )


def _stock_fit(model, output_dir: Path, data, **settings) -> None:
    """The stock ``Trainer`` (the PEFT methods are trained by it, as any PEFT adapter)."""
    args = TrainingArguments(
        str(output_dir), **{**QUIET, **REAL_STEP, "per_device_train_batch_size": 4, **settings}
    )
    Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator).train()


def _prefix_outputs(model, prefix: torch.Tensor):
    ids = torch.randint(5, 500, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    return {"prefix": prefix.detach().clone(), "logits": logits}


def _peft_prefix_tuning():
    model = get_peft_model(
        tiny_gpt2(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    weight = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.normal_(generator=torch.Generator().manual_seed(1))
    return model, weight


def _shared_prefix(share: str, start: torch.Tensor | None):
    model = get_peft_model(
        tiny_gpt2(),
        SharedPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, share=share),
    )
    if start is not None:  # PEFT's [n, L * 2d] block of layer l is columns [2dl, 2d(l + 1))
        layers = sorted(
            (m for m in model.modules() if isinstance(m, SharedPrefixLayer)),
            key=lambda m: m.site.layer_index,
        )
        width = 2 * layers[0].site.kv_dim
        with torch.no_grad():
            for index, layer in enumerate(layers):
                layer.shared_prefix_kv["default"].copy_(
                    start[:, index * width : (index + 1) * width]
                )
    return model


def _shared_prefix_baseline(tmp_path: Path) -> Baseline:
    """``share="none"`` from PEFT's initial prefix, 3 AdamW steps of the stock ``Trainer``:
    PEFT's own ``PrefixTuningConfig(prefix_projection=False)`` trained the same way, bit for
    bit (prefix and logits). Control: ``share="global_mlp"``, the reparameterised prefix."""
    data = _token_data()
    stock, weight = _peft_prefix_tuning()
    start = weight.detach().clone()
    initial = _prefix_outputs(stock, start)
    stock.train()
    _stock_fit(stock, tmp_path / "stock", data)
    result = Baseline(method={}, stock=_prefix_outputs(stock, weight), control={}, initial=initial)
    for name, share, begin in (("method", "none", start), ("control", "global_mlp", None)):
        model = _shared_prefix(share, begin)
        _stock_fit(model, tmp_path / name, data)
        setattr(result, name, _prefix_outputs(model, model.base_model.materialized_prefix()))
    return result


_PREFIX_SAVE = dict(share="per_layer_mlp", num_virtual_tokens=3, dropout=0.2)


def _shared_prefix_save(directory: Path) -> Saved:
    model = get_peft_model(
        vit(), SharedPrefixTuningConfig(modules_to_save=["classifier"], **_PREFIX_SAVE)
    )
    args = TrainingArguments(str(directory / "run"), **{**QUIET, **REAL_STEP, "max_steps": 2})
    Trainer(model=model, args=args, train_dataset=digits("image", 32)).train()
    model.save_pretrained(directory)
    with torch.no_grad():
        return Saved({"logits": model.eval()(pixel_values=probe_pixels()).logits})


def _shared_prefix_reload(directory: Path):
    model = PeftModel.from_pretrained(vit(), directory).eval()
    with torch.no_grad():
        return {"logits": model(pixel_values=probe_pixels()).logits}


SHARED_PREFIX = Case(
    id="shared-prefix",
    baseline=_shared_prefix_baseline,
    save=_shared_prefix_save,
    reload=_shared_prefix_reload,
    bad_configs=(
        *bad_values(
            SharedPrefixTuningConfig,
            {},
            [("share", "deep"), ("num_virtual_tokens", 0), ("dropout", 1.0), ("layers", [0, 0])],
        ),
        bad("hidden_size", lambda: SharedPrefixTuningConfig(share="none", hidden_size=16), 16),
        bad("latent_dim", lambda: SharedPrefixTuningConfig(share="simple_share", latent_dim=8), 8),
    ),
    ranks=stock_ranks(
        lambda: get_peft_model(
            vit(),
            SharedPrefixTuningConfig(
                share="global_mlp", num_virtual_tokens=3, modules_to_save=["classifier"]
            ),
        )
    ),
    not_applicable={
        "card": "a PEFT adapter's README is PEFT's own card (library_name peft, base_model); the "
        "hf-extensions record (method, paper, share) is written by recipes/shared_prefix only",
    },
)
