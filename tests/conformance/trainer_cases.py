"""Conformance cases of the ``Trainer`` methods: SAM, ASAM, Agnostic-SAM, FHBI, BNN mutual
learning, hierarchical continual learning, PromptDSI and PGA."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import (
    DefaultDataCollator,
    Trainer,
    TrainingArguments,
    ViTForImageClassification,
    default_data_collator,
)

import peft_configs  # noqa: F401  (registers the prompt pool with PEFT)
from conformance.case import (
    DDP_STEP,
    QUIET,
    REAL_STEP,
    Baseline,
    CardSpec,
    Case,
    Ranks,
    Saved,
    bad,
    bad_values,
    digits,
    params,
    prefixed,
    probe_pixels,
)
from hf_extensions.bnn import PeerEnsemble, convert_to_bayesian, fixed_noise
from hf_extensions.fhbi.particles import ParticleEnsemble
from hf_extensions.models import tiny_bert_classifier, tiny_clip, tiny_mlp_classifier
from hf_extensions.models import tiny_vit_classifier as vit
from hf_extensions.pga.clip_prompts import CLIPPromptLearner
from hf_extensions.prompt_dsi.dsi import DSIModel
from peft_configs.prompt_pool import PromptPoolConfig, query_features, topic_keys
from trainers import (
    AgnosticSAMConfig,
    AgnosticSAMTrainer,
    FHBIConfig,
    FHBITrainer,
    HierarchicalPromptCLConfig,
    HierarchicalPromptCLTrainer,
    PGAConfig,
    PGATrainer,
    PromptDSIConfig,
    PromptDSITrainer,
    SAMConfig,
    SAMTrainer,
)
from trainers.bnn_mutual_config import BayesianMutualLearningConfig
from trainers.bnn_mutual_trainer import BayesianMutualLearningTrainer
from trainers.pga_trainer import PairedDomainCollator, PairedDomainDataset

TRAINING = dict(output_dir="unused", report_to=[])


def _fit(trainer) -> None:
    """Train, then leave the model in eval mode (the outputs compared are inference outputs)."""
    trainer.train()
    trainer.accelerator.unwrap_model(trainer.model).eval()


def _saved_trainer(trainer, directory: Path, outputs) -> Saved:
    """Save ``trainer``'s model and card into ``directory`` (its ``output_dir``)."""
    trainer.save_model(str(directory))
    trainer.create_model_card()
    config = trainer.args
    return Saved(outputs, {name: getattr(config, name) for name in config.method_fields})


# ----------------------------------------------------------------------- SAM, ASAM, Agnostic-SAM

_MODELS = {"vector": lambda: tiny_mlp_classifier(), "image": lambda: vit()}


def _train_perturbation(trainer_cls, config_cls, kind, output_dir, **settings):
    model = _MODELS[kind]().train()
    args = config_cls(output_dir=str(output_dir), **{**QUIET, **REAL_STEP, **settings})
    trainer_cls(model=model, args=args, train_dataset=digits(kind, 32)).train()
    return params(model)


@functools.cache
def _stock_perturbation_run(kind: str):
    """The stock ``Trainer`` run every SAM-family case compares with (computed once)."""
    with tempfile.TemporaryDirectory() as output_dir:
        return _train_perturbation(Trainer, TrainingArguments, kind, output_dir)


def _perturbation_baseline(trainer_cls, config_cls, zero, control):
    """ρ = 0 against the stock ``Trainer`` on an MLP (per-batch mean loss) and a ViT (loss
    normalised by ``num_items_in_batch``): the two loss conventions of ``Trainer``."""

    def baseline(tmp_path: Path) -> Baseline:
        result = Baseline({}, {}, {}, {})
        for kind in _MODELS:
            result.stock.update(prefixed(kind, _stock_perturbation_run(kind)))
            for name, settings in (("method", zero), ("control", control)):
                output_dir = tmp_path / f"{kind}-{name}"
                trained = _train_perturbation(trainer_cls, config_cls, kind, output_dir, **settings)
                getattr(result, name).update(prefixed(kind, trained))
            result.initial.update(prefixed(kind, params(_MODELS[kind]())))
        return result

    return baseline


def _perturbation_save(trainer_cls, config_cls, settings):
    """A tiny ViT (SDPA, what ``from_pretrained`` picks) trained 2 steps and saved."""

    def save(directory: Path) -> Saved:
        model = vit(attn_implementation="sdpa").train()
        args = config_cls(
            output_dir=str(directory), **{**QUIET, **REAL_STEP, "max_steps": 2, **settings}
        )
        trainer = trainer_cls(model=model, args=args, train_dataset=digits("image", 32))
        _fit(trainer)
        with torch.no_grad():
            logits = model(pixel_values=probe_pixels()).logits
        return _saved_trainer(trainer, directory, {"logits": logits})

    return save


def _reload_vit(directory: Path):
    model = ViTForImageClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        return {"logits": model(pixel_values=probe_pixels()).logits}


def _perturbation_ranks(trainer_cls, config_cls, settings):
    """2 x 16 rows == 1 x 32 rows perturbed in sharpness batches of 16 (each process perturbs by
    its own gradient); the control perturbs by the whole 32 rows (the ascent pass does not
    all-reduce, so it differs)."""

    def run(output_dir: str, variant: str):
        batch = {"two": 16, "one": 32, "control": 32}[variant]
        sharpness = {"one": 16}.get(variant)
        model = vit().train()
        initial = params(model)
        args = config_cls(
            output_dir=output_dir,
            per_device_train_batch_size=batch,
            sharpness_batch_size=sharpness,
            **{**QUIET, **DDP_STEP, **settings},
        )
        trainer = trainer_cls(model=model, args=args, train_dataset=digits("image", 96))
        trainer.train()
        return {"steps": trainer.state.global_step}, initial, params(model)

    return Ranks(run, has_control=True)


_SAM_BASE = dict(TRAINING)
_SAM_BAD = [
    ("rho", -0.1),
    ("rho", float("nan")),
    ("perturb_norm", "l2"),
    ("adaptive_eta", -1.0),
    ("sharpness_batch_size", 0),
]
SAM_CARD = {"rho": 0.07, "perturb_norm": "per_tensor", "sharpness_batch_size": 4}
ASAM_CARD = {"rho": 0.7, "adaptive": True, "adaptive_eta": 0.02}

SAM = Case(
    id="sam",
    baseline=_perturbation_baseline(SAMTrainer, SAMConfig, {"rho": 0.0}, {"rho": 0.05}),
    save=_perturbation_save(SAMTrainer, SAMConfig, SAM_CARD),
    reload=_reload_vit,
    card=CardSpec(
        "sam",
        "Sharpness-Aware Minimization for Efficiently Improving Generalization",
        "2010.01412",
        "transformers",
        SAMConfig,
        SAM_CARD,
    ),
    bad_configs=bad_values(SAMConfig, _SAM_BASE, _SAM_BAD),
    ranks=_perturbation_ranks(SAMTrainer, SAMConfig, {"rho": 0.05}),
)

ASAM = Case(
    id="asam",
    baseline=_perturbation_baseline(
        SAMTrainer, SAMConfig, {"rho": 0.0, "adaptive": True}, {"rho": 0.5, "adaptive": True}
    ),
    save=_perturbation_save(SAMTrainer, SAMConfig, ASAM_CARD),
    reload=_reload_vit,
    card=CardSpec(
        "asam",
        "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep "
        "Neural Networks",
        "2102.11600",
        "transformers",
        SAMConfig,
        ASAM_CARD,
    ),
    bad_configs=bad_values(SAMConfig, {**_SAM_BASE, "adaptive": True}, [("adaptive_eta", -0.5)]),
    ranks=_perturbation_ranks(SAMTrainer, SAMConfig, {"rho": 0.5, "adaptive": True}),
)

AGNOSTIC_CARD = {"rho_train": 0.07, "rho_val": 0.03, "val_fraction": 0.25, "chain": True}
AGNOSTIC_SAM = Case(
    id="agnostic-sam",
    baseline=_perturbation_baseline(
        AgnosticSAMTrainer,
        AgnosticSAMConfig,
        {"rho_train": 0.0, "rho_val": 0.0},
        {"rho_train": 0.05, "rho_val": 0.05},
    ),
    save=_perturbation_save(
        AgnosticSAMTrainer, AgnosticSAMConfig, {**AGNOSTIC_CARD, "final_grad_on": "sum"}
    ),
    reload=_reload_vit,
    card=CardSpec(
        "agnostic-sam",
        "Agnostic Sharpness-Aware Minimization",
        "2406.07107",
        "transformers",
        AgnosticSAMConfig,
        {**AGNOSTIC_CARD, "final_grad_on": "sum"},
    ),
    bad_configs=bad_values(
        AgnosticSAMConfig,
        TRAINING,
        [
            ("rho_train", -0.05),
            ("rho_train", float("inf")),
            ("rho_val", -0.05),
            ("val_fraction", 0.0),
            ("val_fraction", 1.0),
            ("final_grad_on", "validation"),
        ],
    ),
    ranks=_perturbation_ranks(
        AgnosticSAMTrainer, AgnosticSAMConfig, {"rho_train": 0.05, "rho_val": 0.05}
    ),
)

# ----------------------------------------------------------------------------------------- FHBI


def _lora_vit(seed: int = 0) -> PeftModel:
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A is drawn from the global generator
        return get_peft_model(vit(seed=seed), config)


def _fhbi_baseline(tmp_path: Path) -> Baseline:
    """One particle at ρ = 0 (SVGD with m = 1: K = 1, no repulsion), evaluated by the
    reference ``loop`` mode, against the stock ``Trainer`` on the model itself: an MLP and a
    LoRA ViT (the paper's particles)."""
    builders = {"vector": tiny_mlp_classifier, "image": _lora_vit}
    result = Baseline({}, {}, {}, {})
    for kind, build in builders.items():
        data = digits(kind, 32)
        stock = build().train()
        args = TrainingArguments(str(tmp_path / f"{kind}-stock"), **QUIET, **REAL_STEP)
        Trainer(model=stock, args=args, train_dataset=data).train()
        for name, rho in (("method", 0.0), ("control", 0.05)):
            ensemble = ParticleEnsemble(build(), num_particles=1, mode="loop").train()
            config = FHBIConfig(
                output_dir=str(tmp_path / f"{kind}-{name}"),
                num_particles=1,
                rho=rho,
                **QUIET,
                **REAL_STEP,
            )
            FHBITrainer(model=ensemble, args=config, train_dataset=data).train()
            particle = {
                n: p[0].detach().clone() for n, p in zip(ensemble.names, ensemble.particles)
            }
            getattr(result, name).update(prefixed(kind, particle))
        result.stock.update(prefixed(kind, {n: p for n, p in params(stock).items()}))
        result.initial.update(prefixed(kind, params(build())))
    return result


FHBI_CARD = {
    "num_particles": 3,
    "rho": 0.02,
    "kernel_scope": "block",
    "ascent_norm": "particle",
    "likelihood": "ensemble_logits",
    "prior_std": 1.0,
}


def _fhbi_save(directory: Path) -> Saved:
    ensemble = ParticleEnsemble(_lora_vit(), num_particles=3).train()
    args = FHBIConfig(
        output_dir=str(directory), **{**QUIET, **REAL_STEP, "max_steps": 2, **FHBI_CARD}
    )
    trainer = FHBITrainer(model=ensemble, args=args, train_dataset=digits("image", 32))
    _fit(trainer)
    return _saved_trainer(trainer, directory, _particle_logits(ensemble))


def _particle_logits(ensemble: ParticleEnsemble):
    with torch.no_grad():
        out = ensemble(pixel_values=probe_pixels(), return_particle_logits=True)
    return {"particle_logits": out["particle_logits"], "logits": out["logits"]}


def _fhbi_reload(directory: Path):
    return _particle_logits(ParticleEnsemble.from_pretrained(vit(), directory).eval())


def _fhbi_ranks(output_dir: str, variant: str):
    """3 LoRA particles: 2 x 16 == 1 x 32 in sharpness batches of 16; control: perturbed by
    the whole 32 rows."""
    ensemble = ParticleEnsemble(_lora_vit(), num_particles=3).train()
    initial = params(ensemble)
    args = FHBIConfig(
        output_dir=output_dir,
        num_particles=3,
        rho=0.05,
        per_device_train_batch_size={"two": 16, "one": 32, "control": 32}[variant],
        sharpness_batch_size=16 if variant == "one" else None,
        **{**QUIET, **DDP_STEP, "learning_rate": 0.1},
    )
    trainer = FHBITrainer(model=ensemble, args=args, train_dataset=digits("image", 96))
    trainer.train()
    return {"steps": trainer.state.global_step}, initial, params(ensemble)


FHBI = Case(
    id="fhbi",
    baseline=_fhbi_baseline,
    save=_fhbi_save,
    reload=_fhbi_reload,
    card=CardSpec(
        "fhbi",
        "Improving Generalization with Flat Hilbert Bayesian Inference",
        "2410.04196",
        "transformers",
        FHBIConfig,
        FHBI_CARD,
    ),
    bad_configs=bad_values(
        FHBIConfig,
        TRAINING,
        [
            ("kernel", "laplace"),
            ("kernel_scope", "layer"),
            ("likelihood", "joint"),
            ("ascent_norm", "tensor"),
            ("kernel_grad_sign", "minus"),
            ("rho", -0.1),
            ("num_particles", 0),
            ("kernel_bandwidth", 0.0),
            ("prior_std", float("nan")),
            ("perturb_norm", "per_tensor"),
        ],
    ),
    ranks=Ranks(_fhbi_ranks, has_control=True),
)

# ------------------------------------------------------------------------- BNN mutual learning


def _bnn_baseline(tmp_path: Path) -> Baseline:
    """One Gaussian (Bayesian) peer, ``kl_weight=0`` and no peer terms, under one frozen weight
    draw: the stock ``Trainer`` on the same Bayesian network. Control: the KL / N term on."""

    def peer():
        return convert_to_bayesian(tiny_mlp_classifier()).train()

    data = digits("vector", 32)
    stock = peer()
    args = TrainingArguments(str(tmp_path / "stock"), **QUIET, **REAL_STEP)
    with fixed_noise(stock, seed=0):
        Trainer(model=stock, args=args, train_dataset=data).train()
    result = Baseline({}, params(stock), {}, params(peer()))
    for name, kl_weight in (("method", 0.0), ("control", 1.0)):
        ensemble = PeerEnsemble([peer()])
        config = BayesianMutualLearningConfig(
            output_dir=str(tmp_path / name),
            kl_weight=kl_weight,
            mutual_weight=0.0,
            parameter_diversity_weight=0.0,
            feature_diversity_weight=0.0,
            **QUIET,
            **REAL_STEP,
        )
        trainer = BayesianMutualLearningTrainer(model=ensemble, args=config, train_dataset=data)
        with fixed_noise(ensemble, seed=0):
            trainer.train()
        setattr(result, name, params(ensemble.peers[0]))
    return result


BNN_CARD = {
    "kl_weight": 0.5,
    "mutual_weight": 0.5,
    "mutual_temperature": 2.0,
    "parameter_diversity_weight": 0.1,
    "feature_diversity_weight": 0.2,
    "feature_divergence": "jensen_shannon",
    "feature_layers": ["vit.layers.0", "classifier:input"],
    "mc_samples": 2,
}


def _bnn_peers() -> PeerEnsemble:
    return PeerEnsemble([convert_to_bayesian(vit(seed=k)).train() for k in range(2)])


def _bnn_outputs(ensemble: PeerEnsemble):
    """Every peer's logits and the model average (training-mode forward: one pass per peer)
    under one frozen weight draw (the same in both processes), and the evaluation output (the
    average over ``mc_samples`` draws, all equal here)."""
    probe = probe_pixels()
    with torch.no_grad(), fixed_noise(ensemble, seed=3):
        out = ensemble.train()(pixel_values=probe)
        average = ensemble.eval()(pixel_values=probe).logits
    return {"logits": out.logits, "peer_logits": out.peer_logits, "evaluation": average}


def _bnn_save(directory: Path) -> Saved:
    ensemble = _bnn_peers()
    args = BayesianMutualLearningConfig(
        output_dir=str(directory), **{**QUIET, **REAL_STEP, "max_steps": 2, **BNN_CARD}
    )
    trainer = BayesianMutualLearningTrainer(
        model=ensemble, args=args, train_dataset=digits("image", 32)
    )
    _fit(trainer)
    return _saved_trainer(trainer, directory, _bnn_outputs(ensemble))


def _bnn_reload(directory: Path):
    return _bnn_outputs(PeerEnsemble.from_pretrained(directory))


def _bnn_ranks(output_dir: str, variant: str):
    """Two Bayesian ViT peers, every term on: 2 x 16 == 1 x 32 (each rank draws the weights the
    single process draws; KL / N and the parameter term are counted once by the all-reduce)."""
    torch.manual_seed(0)
    ensemble = _bnn_peers()
    initial = params(ensemble)
    args = BayesianMutualLearningConfig(
        output_dir=output_dir,
        per_device_train_batch_size={"two": 16, "one": 32}[variant],
        **{**QUIET, **DDP_STEP, "learning_rate": 0.1, **BNN_CARD},
    )
    trainer = BayesianMutualLearningTrainer(
        model=ensemble, args=args, train_dataset=digits("image", 96)
    )
    trainer.train()
    return {"steps": trainer.state.global_step}, initial, params(ensemble)


_BNN_BASE = {**TRAINING, "feature_layers": ["net.1"]}
BNN = Case(
    id="bnn-mutual-learning",
    baseline=_bnn_baseline,
    save=_bnn_save,
    reload=_bnn_reload,
    card=CardSpec(
        "bnn-mutual-learning",
        "Model and Feature Diversity for Bayesian Neural Networks in Mutual Learning",
        "2407.02721",
        "transformers",
        BayesianMutualLearningConfig,
        BNN_CARD,
    ),
    bad_configs=(
        *bad_values(
            BayesianMutualLearningConfig,
            _BNN_BASE,
            [
                ("kl_weight", -1.0),
                ("kl_dataset_size", 0),
                ("mutual_weight", -0.1),
                ("mutual_temperature", 0.0),
                ("parameter_diversity_weight", -1.0),
                ("parameter_divergence", "bures"),
                ("parameter_diversity_bound", "none"),
                ("parameter_diversity_scale", 0.0),
                ("parameter_diversity_normalization", "batch"),
                ("feature_diversity_weight", -1.0),
                ("feature_divergence", "l2"),
                ("feature_diversity_bound", "clip"),
                ("feature_temperature", -1.0),
                ("feature_layers", []),
                ("mc_samples", 0),
            ],
        ),
        bad(
            "feature_diversity_bound",
            lambda: BayesianMutualLearningConfig(
                **_BNN_BASE, feature_divergence="kl", feature_diversity_bound="none"
            ),
            "none",
        ),
    ),
    ranks=Ranks(_bnn_ranks),
)

# ------------------------------------------------------------- hierarchical continual learning

_CL_CLASSES = ([0, 1], [2, 3])


def _cl_task(classes, rows: int = 24) -> Dataset:
    train = digits("image", 400)
    keep = [i for i, y in enumerate(train["labels"]) if y in classes][:rows]
    return train.select(keep)


def _prompt_pool_vit(pool_size: int = 2) -> PeftModel:
    torch.manual_seed(0)  # the prompts are drawn from the global generator
    return get_peft_model(
        vit(),
        PromptPoolConfig(
            pool_size=pool_size,
            top_k=1,
            layers=[0, 1],
            prompt_length=2,
            key_source="fixed",
            modules_to_save=["classifier"],
        ),
    )


class _MaskedTaskCE(nn.Module):
    """The stock objective of a prompt-per-task learner: the task's prompt, CE over its classes."""

    def __init__(self, model: PeftModel, classes, task: int = 0):
        super().__init__()
        self.model, self.task = model, task
        mask = torch.zeros(10, dtype=torch.bool)
        mask[classes] = True
        self.register_buffer("mask", mask)

    def forward(self, pixel_values, labels):
        logits = self.model(pixel_values=pixel_values, prompt_ids=self.task).logits
        logits = logits.masked_fill(~self.mask, float("-inf"))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


_CL_FAST = dict(use_ot=False, tii_epochs=1, ca_epochs=1, num_components=1, ca_samples_per_class=8)


def _cl_trainer(model, output_dir, **settings) -> HierarchicalPromptCLTrainer:
    config = HierarchicalPromptCLConfig(
        output_dir=str(output_dir), **{**QUIET, **REAL_STEP, **_CL_FAST, **settings}
    )
    return HierarchicalPromptCLTrainer(model, config, data_collator=DefaultDataCollator())


def _cl_baseline(tmp_path: Path) -> Baseline:
    """The first task with the taxonomy terms and the HiDe regulariser off is the stock
    ``Trainer`` on the task's prompt with the CE masked to the task's classes."""
    data = _cl_task(_CL_CLASSES[0])
    stock = _prompt_pool_vit()
    args = TrainingArguments(str(tmp_path / "stock"), **QUIET, **REAL_STEP)
    trainer = Trainer(
        model=_MaskedTaskCE(stock, _CL_CLASSES[0]),
        args=args,
        train_dataset=data,
        data_collator=DefaultDataCollator(),
    )
    torch.manual_seed(0)
    trainer.train()
    result = Baseline({}, params(stock), {}, params(_prompt_pool_vit()))
    for name, settings in (
        ("method", dict(hierarchical=False, hide_reg=0.0)),
        ("control", dict(hierarchical=True, reg_glob=0.5, hide_reg=0.0)),
    ):
        model = _prompt_pool_vit()
        learner = _cl_trainer(model, tmp_path / name, **settings)
        torch.manual_seed(0)
        learner.train_task(data, _CL_CLASSES[0])
        setattr(result, name, params(model))
    return result


CL_CARD = {
    "reg_glob": 0.07,
    "reg_sub": 0.2,
    "hide_reg": 0.3,
    "supcon_temperature": 0.2,
    "eval_rescoring": True,
    "rescoring_eta": 0.05,
    "rescoring_eta0": 0.5,
}


def _cl_outputs(learner: HierarchicalPromptCLTrainer):
    """Every task prompt's logits, the TII head, and the learner's class and task predictions
    (with the re-scoring on)."""
    model = learner.accelerator.unwrap_model(learner.model).eval()
    probe = _cl_task([0, 1, 2, 3], rows=12)
    pixels = torch.as_tensor(probe["pixel_values"])
    outputs = {}
    with torch.no_grad():
        for task in range(len(learner.task_classes)):
            outputs[f"task{task}/logits"] = model(pixel_values=pixels, prompt_ids=task).logits
        outputs["tii.weight"] = learner.tii_head.weight.detach().clone()
    predicted = learner.predict_classes(probe)
    for key in ("predictions", "task_predictions"):
        outputs[key] = torch.as_tensor(predicted[key])
    return outputs


def _cl_save(directory: Path) -> Saved:
    learner = _cl_trainer(_prompt_pool_vit(), directory, max_steps=2, **CL_CARD)
    torch.manual_seed(0)
    for classes in _CL_CLASSES:
        learner.train_task(_cl_task(classes), classes)
    outputs = _cl_outputs(learner)
    return _saved_trainer(learner, directory, outputs)


def _cl_reload(directory: Path):
    from hf_extensions.hub import read_model_card_metadata

    recorded = read_model_card_metadata(directory)["hyperparameters"]
    settings = {n: recorded[n] for n in HierarchicalPromptCLConfig.method_fields}
    model = PeftModel.from_pretrained(vit(), str(directory))
    config = HierarchicalPromptCLConfig(output_dir=str(directory / "reloaded"), **settings)
    learner = HierarchicalPromptCLTrainer(model, config, data_collator=DefaultDataCollator())
    learner.load_continual_state(directory)
    return _cl_outputs(learner)


def _cl_ranks(output_dir: str, variant: str):
    """A 2-task stream. Plain CE (the per-rank terms off): 2 x 8 == 1 x 16 for the prompts, the
    head, the TII head and the class means. ``replicas``: the full method on 2 processes
    (replay and SupCon are drawn per rank): every rank ends with the same state."""
    plain = variant != "replicas"
    model = _prompt_pool_vit()
    initial = params(model)
    learner = _cl_trainer(
        model,
        output_dir,
        per_device_train_batch_size={"two": 8, "one": 16, "replicas": 8}[variant],
        **{**DDP_STEP, "learning_rate": 0.1},
        **(dict(hierarchical=False, hide_reg=0.0) if plain else dict(reg_glob=0.5, hide_reg=0.3)),
    )
    torch.manual_seed(0)
    for classes in _CL_CLASSES:
        learner.train_task(_cl_task(classes, rows=32), classes)
    final = {**params(model), "tii.weight": learner.tii_head.weight.detach()}
    for c, mixture in learner.prompted_mixtures.items():
        final[f"prompted.{c}.means"] = mixture.means
    return {"steps": learner.state.global_step}, initial, final


HIERARCHICAL_CL = Case(
    id="hierarchical-cl",
    baseline=_cl_baseline,
    save=_cl_save,
    reload=_cl_reload,
    card=CardSpec(
        "hierarchical-prompt-cl",
        "Leveraging Hierarchical Taxonomies in Prompt-based Continual Learning",
        "2410.04327",
        "transformers",
        HierarchicalPromptCLConfig,
        CL_CARD,
    ),
    bad_configs=bad_values(
        HierarchicalPromptCLConfig,
        TRAINING,
        [
            ("reg_glob", -1.0),
            ("rescoring_eta", float("nan")),
            ("ot_delta", 0.0),
            ("ot_solver", "sliced"),
            ("num_components", 0),
            ("replay_factor", -1),
            ("num_groups", 0),
            ("head_name", ""),
        ],
    ),
    ranks=Ranks(_cl_ranks, has_replicas=True),
)

# ------------------------------------------------------------------------------------- PromptDSI

_NUM_D0, _NUM_NEW = 4, 6


def _dsi_increment() -> Dataset:
    ids = torch.randint(5, 500, (24, 6), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": (torch.arange(24) % _NUM_NEW + _NUM_D0).tolist(),
        }
    )


def _dsi_model(key_source: str = "learned") -> DSIModel:
    """A tiny BERT DSI of ``_NUM_D0`` documents whose encoder wears a prompt pool: learned keys
    with L2P's pull loss, or PromptDSI's fixed topic keys (k-means of the increment's queries)."""
    torch.manual_seed(0)
    model = DSIModel(tiny_bert_classifier().bert, _NUM_D0)
    pull = 0.1 if key_source == "learned" else 0.0
    config = PromptPoolConfig(
        pool_size=3, prompt_length=2, layers=[0, 1], key_source=key_source, pull_loss_weight=pull
    )
    model.encoder = get_peft_model(model.encoder, config)
    if key_source == "fixed":
        tokens = _dsi_increment()[:]
        features = query_features(
            tiny_bert_classifier().bert,
            input_ids=torch.tensor(tokens["input_ids"]),
            attention_mask=torch.tensor(tokens["attention_mask"]),
        )
        model.encoder.base_model.set_keys(topic_keys(features, num_topics=3, seed=0)[0])
    return model


def _dsi_baseline(tmp_path: Path) -> Baseline:
    """An increment with ``auxiliary_loss_weight=0``: the stock ``Trainer`` on the grown DSI,
    only the prompts and the new rows trainable. Control: the pool's pull loss on."""
    data = _dsi_increment()
    stock = _dsi_model()
    stock.accepts_loss_kwargs = False
    args = TrainingArguments(str(tmp_path / "stock"), **QUIET, **REAL_STEP)
    trainer = Trainer(
        model=stock, args=args, train_dataset=data, data_collator=default_data_collator
    )
    torch.manual_seed(1)
    stock.add_documents(_NUM_NEW)
    stock.set_trainable(encoder=False, old_rows=False)
    trainer.train()
    result = Baseline({}, stock.state_dict(), {}, None)
    for name, weight in (("method", 0.0), ("control", 1.0)):
        model = _dsi_model()
        config = PromptDSIConfig(
            output_dir=str(tmp_path / name), auxiliary_loss_weight=weight, **QUIET, **REAL_STEP
        )
        learner = PromptDSITrainer(model, config, data_collator=default_data_collator)
        torch.manual_seed(1)
        learner.add_documents(data, _NUM_NEW)
        setattr(result, name, model.state_dict())
    start = _dsi_model()
    torch.manual_seed(1)
    start.add_documents(_NUM_NEW)
    result.initial = start.state_dict()
    return result


DSI_CARD = {"strategy": "l2p", "auxiliary_loss_weight": 0.5, "rows_learning_rate": 0.05}


def _dsi_outputs(model: DSIModel):
    ids = torch.randint(5, 500, (5, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return {"logits": model.eval()(ids, torch.ones_like(ids)).logits}


def _dsi_save(directory: Path) -> Saved:
    model = _dsi_model()
    config = PromptDSIConfig(
        output_dir=str(directory), **{**QUIET, **REAL_STEP, "max_steps": 2, **DSI_CARD}
    )
    learner = PromptDSITrainer(model, config, data_collator=default_data_collator)
    learner.add_documents(_dsi_increment(), _NUM_NEW)
    model.save_pretrained(directory)
    learner.create_model_card()
    return Saved(_dsi_outputs(model), {n: getattr(config, n) for n in config.method_fields})


def _dsi_reload(directory: Path):
    return _dsi_outputs(DSIModel.from_pretrained(directory, tiny_bert_classifier().bert))


def _dsi_ranks(output_dir: str, variant: str):
    """One PromptDSI increment with fixed topic keys (one trainer per increment under DDP):
    2 x 4 == 1 x 8, 3 steps: one epoch of the 24 rows (a last global batch shorter than the
    others would be padded with repeated rows on 2 processes). BERT's dropout is off: each
    process draws its own masks. (Learned keys with the pull loss fail under DDP: the loss
    reads the keys outside the forward pass.)"""
    model = _dsi_model("fixed")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    initial = params(model)
    config = PromptDSIConfig(
        output_dir=output_dir,
        per_device_train_batch_size={"two": 4, "one": 8}[variant],
        rows_learning_rate=0.5,
        **{**QUIET, **DDP_STEP, "learning_rate": 20.0},
    )
    learner = PromptDSITrainer(model, config, data_collator=default_data_collator)
    torch.manual_seed(1)  # the new rows are drawn from the global generator
    learner.add_documents(_dsi_increment(), _NUM_NEW)
    return {"steps": learner.state.global_step}, initial, params(model)


PROMPT_DSI = Case(
    id="prompt-dsi",
    baseline=_dsi_baseline,
    save=_dsi_save,
    reload=_dsi_reload,
    card=CardSpec(
        "prompt-dsi",
        "PromptDSI: Prompt-based Rehearsal-free Instance-wise Incremental Learning for "
        "Document Retrieval",
        "2406.12593",
        "transformers",
        PromptDSIConfig,
        DSI_CARD,
    ),
    bad_configs=(
        *bad_values(
            PromptDSIConfig,
            TRAINING,
            [("strategy", "replay"), ("auxiliary_loss_weight", -1.0), ("rows_learning_rate", 0.0)],
        ),
        bad(
            "train_encoder",
            lambda: PromptDSIConfig(**TRAINING, strategy="prompt_dsi", train_encoder=True),
            True,
        ),
    ),
    ranks=Ranks(_dsi_ranks),
)

# ------------------------------------------------------------------------------------------ PGA

_PGA_CLASSES = ["zero", "one", "two"]


def _pga_learner() -> CLIPPromptLearner:
    clip, tokenizer = tiny_clip()
    torch.manual_seed(0)
    return CLIPPromptLearner(
        clip, tokenizer, _PGA_CLASSES, ["source", "target"], n_ctx_shared=2, n_ctx_domain=2
    )


def _pga_data(rows: int = 24, unlabelled: bool = True) -> PairedDomainDataset:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(rows) % 3
    target_labels = labels.clone()
    if unlabelled:
        target_labels[::4] = -100  # unconfident pseudo-labels
    return PairedDomainDataset(
        {
            "source": {
                "pixel_values": torch.rand(rows, 3, 16, 16, generator=generator),
                "labels": labels,
            },
            "target": {
                "pixel_values": torch.rand(rows // 2, 3, 16, 16, generator=generator),
                "labels": target_labels[: rows // 2],
            },
        },
        seed=0,
    )


class _ERMObjective(nn.Module):
    """The stock objective of ERM over prompts: target loss + source loss."""

    def __init__(self, learner: CLIPPromptLearner):
        super().__init__()
        self.learner = learner

    def forward(self, source, target):
        learner = self.learner
        total = 0
        for name, batch in (("target", target), ("source", source)):
            features = learner.image_features(batch["pixel_values"])
            total = total + learner.domain_loss(features, batch["labels"], name)
        return {"loss": total}


_PGA_SHAPE = dict(n_ctx_shared=2, n_ctx_domain=2, remove_unused_columns=False)


def _pga_baseline(tmp_path: Path) -> Baseline:
    """ρ = α = 0 with trade-off 1 is ERM: the stock ``Trainer`` on L_target + L_source."""
    stock = _pga_learner()
    args = TrainingArguments(
        str(tmp_path / "stock"), remove_unused_columns=False, **QUIET, **REAL_STEP
    )
    Trainer(
        model=_ERMObjective(stock),
        args=args,
        train_dataset=_pga_data(),
        data_collator=PairedDomainCollator(),
    ).train()
    result = Baseline({}, params(stock), {}, params(_pga_learner()))
    for name, rho, align in (("method", 0.0, 0.0), ("control", 1e-2, 1.0)):
        learner = _pga_learner()
        config = PGAConfig(
            output_dir=str(tmp_path / name),
            pga_rho=rho,
            pga_align=align,
            pga_tradeoff=1.0,
            **_PGA_SHAPE,
            **QUIET,
            **REAL_STEP,
        )
        PGATrainer(model=learner, args=config, train_dataset=_pga_data()).train()
        setattr(result, name, params(learner))
    return result


PGA_CARD = {
    "pga_rho": 2e-3,
    "pga_align": 0.5,
    "pga_tradeoff": 0.5,
    "pseudo_label_threshold": 0.6,
    "n_ctx_shared": 2,
    "n_ctx_domain": 2,
}


def _pga_outputs(learner: CLIPPromptLearner):
    with torch.no_grad():
        return {"logits": learner.eval()(pixel_values=probe_pixels(4, 3, 16))["logits"]}


def _pga_save(directory: Path) -> Saved:
    learner = _pga_learner()
    config = PGAConfig(
        output_dir=str(directory),
        remove_unused_columns=False,
        **{**QUIET, **REAL_STEP, "max_steps": 2, **PGA_CARD},
    )
    trainer = PGATrainer(model=learner, args=config, train_dataset=_pga_data())
    _fit(trainer)
    return _saved_trainer(trainer, directory, _pga_outputs(learner))


def _pga_reload(directory: Path):
    learner = _pga_learner()
    learner.load_state_dict(load_file(directory / "model.safetensors"))
    return _pga_outputs(learner)


def _pga_ranks(output_dir: str, variant: str):
    """ERM (ρ = α = 0): 2 x 8 == 1 x 16 (the prompt gradients are all-reduced explicitly).
    ``replicas``: PGA (ρ, α > 0; the shifts are per process, as SAM's): the ranks agree."""
    learner = _pga_learner()
    initial = params(learner)
    pga = variant == "replicas"
    config = PGAConfig(
        output_dir=output_dir,
        pga_rho=0.01 if pga else 0.0,
        pga_align=1.0 if pga else 0.0,
        per_device_train_batch_size={"two": 8, "one": 16, "replicas": 8}[variant],
        **{**_PGA_SHAPE, **QUIET, "max_steps": 3},
    )
    trainer = PGATrainer(model=learner, args=config, train_dataset=_pga_data(64, False))
    trainer.train()
    return {"steps": trainer.state.global_step}, initial, params(learner)


PGA = Case(
    id="pga",
    baseline=_pga_baseline,
    save=_pga_save,
    reload=_pga_reload,
    card=CardSpec(
        "pga",
        "Enhancing Domain Adaptation through Prompt Gradient Alignment",
        "2406.09353",
        "transformers",
        PGAConfig,
        PGA_CARD,
    ),
    bad_configs=(
        *bad_values(
            PGAConfig,
            TRAINING,
            [
                ("pga_rho", -0.1),
                ("pga_align", -1.0),
                ("pga_tradeoff", 0.0),
                ("pseudo_label_threshold", 1.5),
                ("n_ctx_shared", 0),
                ("remove_unused_columns", True),
            ],
        ),
        bad(
            "pga_align",
            lambda: PGAConfig(**TRAINING, pga_source_only=True, pga_align=1.0),
            1.0,
        ),
    ),
    ranks=Ranks(_pga_ranks, has_replicas=True),
)

TRAINER_CASES = (AGNOSTIC_SAM, SAM, ASAM, FHBI, BNN, HIERARCHICAL_CL, PROMPT_DSI, PGA)
