"""Every project loader refuses a tensor of another shape, a missing tensor and a damaged file,
naming the file (and the tensor and both shapes), instead of broadcasting, keeping the value
that was there before, or failing with a bare library error."""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_extensions.bnn import PeerEnsemble, convert_to_bayesian
from hf_extensions.fhbi.particles import ParticleEnsemble
from hf_extensions.loading import check_tensors
from hf_extensions.models import tiny_bert_classifier, tiny_mlp_classifier, tiny_vit_classifier


def _drop(path, name):
    """Rewrite the safetensors file ``path`` without tensor ``name`` (a save cut short)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    del tensors[name]
    save_file(tensors, str(path), metadata=metadata)


def _refused(path, *fragments):
    """``pytest.raises(ValueError)`` whose message names ``path`` and each fragment."""
    pattern = "".join(f"(?=.*{re.escape(str(f))})" for f in (path, *fragments))
    return pytest.raises(ValueError, match=re.compile(pattern, re.S))


def test_check_tensors_names_each_problem():
    expected = {"a": (2, 3), "b": (4,)}
    check_tensors("f.safetensors", {"a": torch.zeros(2, 3), "b": torch.zeros(4)}, expected)
    with _refused("f.safetensors", "lacks tensors ['b']", "tensor 'a' has shape (3, 2), the model's is (2, 3)", "does not have ['c']", "re-save"):  # fmt: skip
        check_tensors("f.safetensors", {"a": torch.zeros(3, 2), "c": torch.zeros(1)}, expected)


# ---------------------------------------------------------------------------- particles


def _lora_ensemble(num_labels=10):
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], modules_to_save=["classifier"])
    model = get_peft_model(tiny_vit_classifier(num_labels=num_labels), lora)
    return ParticleEnsemble(model, num_particles=3)


def test_particles_refuse_a_head_of_another_num_labels(tmp_path):
    _lora_ensemble(num_labels=3).save_pretrained(tmp_path)  # PEFT: PeftModel raised its own
    head = "base_model.model.classifier.weight"
    file = tmp_path / "particle_0" / "adapter_model.safetensors"
    with _refused(file, f"tensor '{head}' has shape (3, 32), the model's is (10, 32)"):
        ParticleEnsemble.from_pretrained(tiny_vit_classifier(), tmp_path)
    # a plain model: Tensor.copy_ broadcast a one-label head into every row of a ten-label one
    ParticleEnsemble(tiny_mlp_classifier(num_labels=1), num_particles=2).save_pretrained(
        tmp_path / "plain"
    )
    file = tmp_path / "plain" / "particle_0" / "particle.safetensors"
    with _refused(file, "tensor 'net.2.weight' has shape (1, 32), the model's is (10, 32)"):
        ParticleEnsemble.from_pretrained(tiny_mlp_classifier(), tmp_path / "plain")


def test_particles_refuse_a_later_particle_that_lacks_a_tensor(tmp_path):
    ensemble = _lora_ensemble()
    with torch.no_grad():  # LoRA B starts at zero: make every particle's tensors distinct
        for p in ensemble.particles:
            p.copy_(torch.randn(p.shape))
    ensemble.save_pretrained(tmp_path)
    reloaded = ParticleEnsemble.from_pretrained(tiny_vit_classifier(), tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.particles, ensemble.particles))
    name = next(n for n in load_file(str(tmp_path / "particle_0/adapter_model.safetensors")) if "lora_B" in n)  # fmt: skip
    file = tmp_path / "particle_2" / "adapter_model.safetensors"
    _drop(file, name)  # before: particle 2 silently kept particle 1's value of this tensor
    with _refused(file, "lacks tensors", name, "incomplete"):
        ParticleEnsemble.from_pretrained(tiny_vit_classifier(), tmp_path)


def test_particles_refuse_a_damaged_file_and_config(tmp_path):
    ParticleEnsemble(tiny_mlp_classifier(), num_particles=2).save_pretrained(tmp_path)
    file = tmp_path / "particle_1" / "particle.safetensors"
    file.write_bytes(file.read_bytes()[:100])  # cut short
    with _refused(file, "not a readable safetensors file"):
        ParticleEnsemble.from_pretrained(tiny_mlp_classifier(), tmp_path)
    config = tmp_path / "particle_ensemble.json"
    config.write_text('{"format_version": 1, "num_parti')
    with _refused(config, "not valid JSON"):
        ParticleEnsemble.from_pretrained(tiny_mlp_classifier(), tmp_path)


# ---------------------------------------------------------------------------- BNN peers


def _peers(hidden=(32,)):
    return [convert_to_bayesian(tiny_mlp_classifier(hidden_sizes=hidden)) for _ in range(2)]


def test_bnn_peers_refuse_another_architecture_and_a_missing_tensor(tmp_path):
    PeerEnsemble(_peers()).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    with _refused(file, "tensor 'peers.0.net.0.weight' has shape (32, 64), the model's is (16, 64)"):  # fmt: skip
        PeerEnsemble.from_pretrained(tmp_path, peer_factory=lambda i: tiny_mlp_classifier(hidden_sizes=(16,)))  # fmt: skip
    _drop(file, "peers.1.net.2.bias_rho")
    with _refused(file, "lacks tensors ['peers.1.net.2.bias_rho']"):
        PeerEnsemble.from_pretrained(tmp_path, peer_factory=lambda i: tiny_mlp_classifier())


# ---------------------------------------------------------------------------- PromptDSI


def test_prompt_dsi_refuses_rows_and_adapters_that_do_not_match(tmp_path):
    from hf_extensions.prompt_dsi.dsi import DSIModel

    encoder = get_peft_model(tiny_bert_classifier().bert, LoraConfig(r=2, target_modules=["query"]))
    model = DSIModel(encoder, 4)
    model.add_documents(2)
    model.save_pretrained(tmp_path)
    rows = tmp_path / "docid_rows.safetensors"
    blocks = load_file(str(rows))
    save_file(
        {"block_0": blocks["block_0"][:, :16].contiguous(), "block_1": blocks["block_1"]}, str(rows)
    )
    with _refused(rows, "tensor 'block_0' has shape (4, 16), the model's is (4, 32)"):
        DSIModel.from_pretrained(tmp_path, tiny_bert_classifier().bert)
    save_file({"block_0": blocks["block_0"]}, str(rows))
    with _refused(rows, "lacks tensors ['block_1']"):
        DSIModel.from_pretrained(tmp_path, tiny_bert_classifier().bert)
    save_file(blocks, str(rows))
    adapter = tmp_path / "encoder" / "adapter_model.safetensors"
    name = sorted(load_file(str(adapter)))[0]
    _drop(adapter, name)  # before: PEFT warned and kept the fresh LoRA weights
    with _refused(adapter, f"lacks tensors ['{name}']"):
        DSIModel.from_pretrained(tmp_path, tiny_bert_classifier().bert)


# ---------------------------------------------------------------------------- continual state


def test_continual_state_refuses_missing_and_misshapen_tensors(tmp_path):
    from hf_extensions.hierarchical_cl.taxonomy import ClassMixture
    from peft_configs.prompt_pool import PromptPoolConfig
    from trainers import HierarchicalPromptCLConfig, HierarchicalPromptCLTrainer
    from trainers.hierarchical_cl_trainer import STATE_FILE

    model = get_peft_model(
        tiny_vit_classifier(),
        PromptPoolConfig(pool_size=2, top_k=1, layers=[0], modules_to_save=["classifier"]),
    )
    trainer = HierarchicalPromptCLTrainer(
        model,
        HierarchicalPromptCLConfig(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True),
    )
    trainer.task_classes, trainer._groups = [[0, 1]], [[0, 1]]

    def mixture():
        return ClassMixture(torch.randn(2, 32), torch.rand(2, 32), torch.rand(2))

    trainer.frozen_mixtures = {0: mixture(), 1: mixture()}
    trainer.prompted_mixtures = {0: mixture(), 1: mixture()}
    trainer.tii_head = torch.nn.Linear(32, 10)
    trainer.save_continual_state(tmp_path)
    trainer.load_continual_state(tmp_path)
    kept = trainer.prompted_mixtures[1]
    file = tmp_path / STATE_FILE
    tensors = load_file(str(file))
    save_file({**tensors, "tii.weight": torch.zeros(10, 16)}, str(file))  # another feature width
    with _refused(file, "tensor 'tii.weight' has shape (10, 16), the model's is (10, 32)"):
        trainer.load_continual_state(tmp_path)
    del tensors["prompted.1.variances"]
    save_file(tensors, str(file))  # before: class 1's prompted mixture raised a bare KeyError
    with _refused(file, "lacks tensors ['prompted.1.variances']"):
        trainer.load_continual_state(tmp_path)
    assert trainer.prompted_mixtures[1] is kept  # a refused load changes nothing


# ---------------------------------------------------------------------------- erased artifact


def test_erased_artifact_refuses_missing_and_misshapen_tensors(tmp_path):
    from hf_extensions.models import tiny_stable_diffusion_pipeline
    from hf_extensions.pipelines import ErasureConfig, load_erased, save_erased
    from hf_extensions.pipelines.artifacts import WEIGHTS_NAME
    from hf_extensions.pipelines.erasure import ErasureResult

    pipe = tiny_stable_diffusion_pipeline()
    names = [n for n, _ in pipe.unet.named_parameters() if ".attn2." in n]
    pipe.erasure_result = ErasureResult(
        method="eap",
        concepts=["a dog"],
        config=ErasureConfig(progress_bar=False).to_dict(),
        trained_parameters=names,
    )
    save_erased(pipe, tmp_path, only_changed=True)
    file = tmp_path / WEIGHTS_NAME
    tensors = load_file(str(file))
    _drop(file, names[0])  # before: the base pipeline's value of it was kept, silently
    with _refused(file, f"lacks tensors ['{names[0]}']"):
        load_erased(tiny_stable_diffusion_pipeline(), tmp_path)
    shape = tuple(tensors[names[1]].shape)
    save_file({**tensors, names[1]: torch.zeros(3, 3)}, str(file))
    with _refused(file, f"tensor '{names[1]}' has shape (3, 3), the model's is {shape}"):
        load_erased(tiny_stable_diffusion_pipeline(), tmp_path)


# ---------------------------------------------------------------------------- quantized artifacts


def test_quantized_artifacts_refuse_another_architecture_and_a_missing_tensor(tmp_path):
    from hf_extensions.quantization import (
        MetaAugConfig,
        MetaAugQuantizer,
        export_integer,
        load_integer_export,
        load_quantized,
    )
    from hf_extensions.quantization.models import DigitsResNet
    from hf_extensions.quantization.modules import quantize_model_rtn

    config = MetaAugConfig(weight_bits=4, activation_bits=None)
    model = quantize_model_rtn(DigitsResNet(width=4).eval(), config)
    quantizer = MetaAugQuantizer.from_pretrained(model)
    quantizer.config = config
    quantizer.save(tmp_path / "q")
    file = tmp_path / "q" / "model.safetensors"
    with _refused(file, "tensor 'conv1.weight' has shape (4, 1, 3, 3), the model's is (8, 1, 3, 3)"):  # fmt: skip
        load_quantized(DigitsResNet(width=8), tmp_path / "q")  # before: RuntimeError, no file
    _drop(file, "fc.bias")
    with _refused(file, "lacks tensors ['fc.bias']"):
        load_quantized(DigitsResNet(width=4), tmp_path / "q")
    path = export_integer(model, tmp_path / "int", config=config)
    with _refused(path, "layer 'conv1' was exported with weight shape [4, 1, 3, 3]"):
        load_integer_export(DigitsResNet(width=8), tmp_path / "int")
    _drop(path, "layer1.conv1.weight_scale")  # before: a bare KeyError
    with _refused(path, "lacks tensors ['layer1.conv1.weight_scale']"):
        load_integer_export(DigitsResNet(width=4), tmp_path / "int")
