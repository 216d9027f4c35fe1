"""A tiny run of each config class: a few training steps, one sampling loop or one quantization.

``RUNNERS[name](config, workdir)`` runs an accepted config on a tiny model (the conformance
suite's models and data) and returns the named values that must all be finite: losses,
trained parameters, outputs. ``RUN_BASE[name](workdir)`` are the settings every run starts from
(small sizes, nothing written or logged); the drawn field values override them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from conformance.case import CONCEPT, QUIET, digits, params, probe_pixels
from conformance.hierarchical_cl import _CL_FAST, _cl_task
from conformance.metaaug import _calibration_images
from conformance.pga import _PGA_CLASSES
from conformance.prompt_dsi import _NUM_D0, _NUM_NEW, _dsi_increment
from conformance.s2n import _exact_denoiser, _noise
from transformers import DefaultDataCollator, Trainer, TrainingArguments, default_data_collator

import peft_configs  # noqa: F401  (registers the PEFT methods)

Values = dict[str, Any]

#: The optimisation every trainer run starts from: 2 AdamW steps of 4 rows.
_STEPS = dict(optim="adamw_torch", learning_rate=1e-2, max_steps=2, per_device_train_batch_size=4)


def _trainer_base(workdir: Path) -> dict[str, Any]:
    return {**QUIET, **_STEPS, "output_dir": str(workdir / "run")}


def _fit(trainer, model: torch.nn.Module, eval_dataset=None) -> Values:
    """Train; the training loss, the trainable parameters and (given data) the eval loss."""
    values: Values = {"training_loss": trainer.train().training_loss, **params(model)}
    if eval_dataset is not None:
        values["eval_loss"] = trainer.evaluate(eval_dataset)["eval_loss"]
    return values


# ----------------------------------------------------------------------------- trainers


def _run_sam(config, workdir: Path) -> Values:
    from hf_extensions.models import tiny_mlp_classifier
    from trainers import SAMTrainer

    model = tiny_mlp_classifier().train()
    trainer = SAMTrainer(model=model, args=config, train_dataset=digits("vector", 16))
    return _fit(trainer, model)


def _run_agnostic_sam(config, workdir: Path) -> Values:
    from hf_extensions.models import tiny_mlp_classifier
    from trainers import AgnosticSAMTrainer

    model = tiny_mlp_classifier().train()
    trainer = AgnosticSAMTrainer(model=model, args=config, train_dataset=digits("vector", 16))
    return _fit(trainer, model)


def _run_fhbi(config, workdir: Path) -> Values:
    from hf_extensions.fhbi.particles import ParticleEnsemble
    from hf_extensions.models import tiny_mlp_classifier
    from trainers import FHBITrainer

    ensemble = ParticleEnsemble(tiny_mlp_classifier(), num_particles=config.num_particles)
    trainer = FHBITrainer(model=ensemble.train(), args=config, train_dataset=digits("vector", 16))
    return _fit(trainer, ensemble, digits("vector", 8))


def _run_bnn(config, workdir: Path) -> Values:
    from hf_extensions.bnn import PeerEnsemble, convert_to_bayesian
    from hf_extensions.models import tiny_mlp_classifier
    from trainers import BayesianMutualLearningTrainer

    peers = [convert_to_bayesian(tiny_mlp_classifier(seed=k)).train() for k in range(2)]
    ensemble = PeerEnsemble(peers)
    trainer = BayesianMutualLearningTrainer(
        model=ensemble, args=config, train_dataset=digits("vector", 16)
    )
    return _fit(trainer, ensemble, digits("vector", 8))


def _run_hierarchical_cl(config, workdir: Path) -> Values:
    from conformance.hierarchical_cl import _prompt_pool_vit

    from trainers import HierarchicalPromptCLTrainer

    model = _prompt_pool_vit()
    learner = HierarchicalPromptCLTrainer(model, config, data_collator=DefaultDataCollator())
    values: Values = {}
    for task, classes in enumerate(([0, 1], [2, 3])):
        metrics = learner.train_task(_cl_task(classes, rows=8), classes)
        values.update({f"task{task}/{k}": v for k, v in metrics.items()})
    predicted = learner.predict_classes(_cl_task([0, 1, 2, 3], rows=8))
    values.update(params(model))
    values["tii.weight"] = learner.tii_head.weight
    values["predictions"] = torch.as_tensor(predicted["predictions"]).float()
    return values


def _run_prompt_dsi(config, workdir: Path) -> Values:
    from conformance.prompt_dsi import _dsi_model

    from hf_extensions.models import tiny_bert_classifier
    from hf_extensions.prompt_dsi.dsi import DSIModel
    from trainers import PromptDSITrainer

    if config.uses_pool:
        model = _dsi_model("learned")
    else:
        torch.manual_seed(0)
        model = DSIModel(tiny_bert_classifier().bert, _NUM_D0)
    learner = PromptDSITrainer(model, config, data_collator=default_data_collator)
    learner.add_documents(_dsi_increment(), _NUM_NEW)
    ids = torch.randint(5, 500, (3, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model.eval()(ids, torch.ones_like(ids)).logits
    return {**params(model), "logits": logits}


def _run_pga(config, workdir: Path) -> Values:
    from hf_extensions.models import tiny_clip
    from hf_extensions.pga.clip_prompts import CLIPPromptLearner
    from trainers import PGATrainer
    from trainers.pga_trainer import PairedDomainDataset

    sources = ["src0", "src1"] if config.multi_source else ["src0"]
    domains = [*sources, config.target_domain]
    clip, tokenizer = tiny_clip()
    torch.manual_seed(0)
    learner = CLIPPromptLearner(
        clip,
        tokenizer,
        _PGA_CLASSES,
        domains,
        n_ctx_shared=config.n_ctx_shared,
        n_ctx_domain=config.n_ctx_domain,
        class_specific_shared=config.class_specific_shared,
    )
    generator = torch.Generator().manual_seed(0)
    rows = {
        name: {
            "pixel_values": torch.rand(8, 3, 16, 16, generator=generator),
            "labels": torch.arange(8) % 3,
        }
        for name in domains
    }
    data = PairedDomainDataset(rows, seed=0)
    trainer = PGATrainer(model=learner, args=config, train_dataset=data)
    values = _fit(trainer, learner)
    with torch.no_grad():
        values["logits"] = learner.eval()(pixel_values=probe_pixels(2, 3, 16))["logits"]
    return values


# ----------------------------------------------------------------------------- PEFT methods


def _stock_steps(model, workdir: Path, data) -> float:
    """Two AdamW steps of the stock ``Trainer`` (how a PEFT adapter is trained)."""
    args = TrainingArguments(str(workdir / "stock"), **{**QUIET, **_STEPS})
    return Trainer(model=model, args=args, train_dataset=data).train().training_loss


def _run_prompt_pool(config, workdir: Path) -> Values:
    from peft import get_peft_model

    from hf_extensions.models import tiny_vit_classifier
    from peft_configs.prompt_pool import query_features, topic_keys

    torch.manual_seed(0)
    model = get_peft_model(tiny_vit_classifier(), config)
    data = digits("image", 16)
    if config.key_source == "fixed":
        pixels = torch.as_tensor(data["pixel_values"])
        query = query_features(
            tiny_vit_classifier(),
            pixel_values=pixels,
            query_source=config.query_source,
            query_layer=config.query_layer,
        )
        model.base_model.set_keys(topic_keys(query, num_topics=config.pool_size, seed=0)[0])
    values: Values = {"training_loss": _stock_steps(model, workdir, data)}
    with torch.no_grad():
        values["logits"] = model.eval()(pixel_values=probe_pixels()).logits
    model.train()(pixel_values=probe_pixels())
    values["auxiliary_loss"] = model.base_model.auxiliary_loss()
    values.update(params(model))
    return values


def _run_shared_prefix(config, workdir: Path) -> Values:
    from peft import get_peft_model

    from hf_extensions.models import tiny_vit_classifier

    torch.manual_seed(0)
    model = get_peft_model(tiny_vit_classifier(), config)
    values: Values = {"training_loss": _stock_steps(model, workdir, digits("image", 16))}
    values.update(params(model))
    model.base_model.materialize()
    with torch.no_grad():
        values["logits"] = model.eval()(pixel_values=probe_pixels()).logits
    return values


# ----------------------------------------------------------------------------- the others


def _run_erasure(config, workdir: Path) -> Values:
    from hf_extensions.models import tiny_stable_diffusion_pipeline
    from hf_extensions.pipelines import erase_concepts

    pipe = erase_concepts(tiny_stable_diffusion_pipeline(), [CONCEPT], "eap", config)
    result = pipe.erasure_result
    values: Values = {"losses": torch.tensor(result.losses, dtype=torch.float64)}
    values.update({n: p for n, p in pipe.unet.named_parameters() if n in result.trained_parameters})
    return values


def _run_s2n(scheduler, workdir: Path) -> Values:
    model = _exact_denoiser(scheduler, scheduler.config.prediction_type)
    steps = min(4, scheduler.config.num_train_timesteps)
    generator = torch.Generator().manual_seed(1)
    from hf_extensions.schedulers import run_denoising_loop

    return {"sample": run_denoising_loop(scheduler, model, _noise(), steps, generator=generator)}


def _run_metaaug(config, workdir: Path) -> Values:
    from hf_extensions.quantization import MetaAugQuantizer
    from hf_extensions.quantization.models import DigitsResNet

    torch.manual_seed(0)
    quantizer = MetaAugQuantizer.from_pretrained(DigitsResNet(width=4).eval())
    model = quantizer.quantize(
        None,
        calibration_dataset=_calibration_images(16),
        quantization_config=config,
        progress=False,
    )
    with torch.no_grad():
        logits = model(probe_pixels())
    floats = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    return {"logits": logits, **floats}


def _run_image_classification(args, workdir: Path) -> Values:
    from hf_extensions.models.image_classification import (
        build_datasets,
        build_model,
        class_names,
    )

    data = build_datasets(args, seed=0)
    model = build_model(args, class_names(data))
    rows = data["train"].select(range(min(4, len(data["train"])))).with_format("torch")[:]
    out = model(pixel_values=rows["pixel_values"], labels=rows["labels"])
    out.loss.backward()
    grads = {f"grad/{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": out.loss, "logits": out.logits, **grads}


RUNNERS: Mapping[str, Callable[[Any, Path], Values]] = {
    "sam": _run_sam,
    "agnostic_sam": _run_agnostic_sam,
    "fhbi": _run_fhbi,
    "bnn": _run_bnn,
    "hierarchical_cl": _run_hierarchical_cl,
    "prompt_dsi": _run_prompt_dsi,
    "pga": _run_pga,
    "prompt_pool": _run_prompt_pool,
    "shared_prefix": _run_shared_prefix,
    "erasure": _run_erasure,
    "s2n": _run_s2n,
    "metaaug": _run_metaaug,
    "image_classification": _run_image_classification,
}

_ERASURE = dict(
    num_steps=2,
    ddim_steps=2,
    k_closest=4,
    num_centers=2,
    progress_bar=False,
    candidates=["dog", "cat", "tree", "house"],
)
_POOL = dict(pool_size=3, prompt_length=2, layers=[0, 1], modules_to_save=["classifier"])

#: The settings each run starts from (tiny sizes; the drawn values override them).
RUN_BASE: Mapping[str, Callable[[Path], dict[str, Any]]] = {
    "sam": _trainer_base,
    "agnostic_sam": _trainer_base,
    "fhbi": lambda w: {**_trainer_base(w), "num_particles": 2},
    "bnn": lambda w: {**_trainer_base(w), "feature_layers": ["net.1"], "mc_samples": 2},
    "hierarchical_cl": lambda w: {**_trainer_base(w), **_CL_FAST},
    "prompt_dsi": _trainer_base,
    "pga": lambda w: {**_trainer_base(w), "n_ctx_shared": 2, "n_ctx_domain": 2},
    "prompt_pool": lambda w: dict(_POOL),
    "shared_prefix": lambda w: {"num_virtual_tokens": 2, "modules_to_save": ["classifier"]},
    "erasure": lambda w: dict(_ERASURE),
    "s2n": lambda w: {"num_train_timesteps": 50},
    "metaaug": lambda w: dict(iterations=2, batch_size=8, meta_iterations=1),
    "image_classification": lambda w: {"max_train_samples": 8},
}
