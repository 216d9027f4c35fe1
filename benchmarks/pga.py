"""PGA vs its baselines on an embedded domain shift: target accuracy, gradient alignment, cost.

The setting of the paper's single-source UDA experiments (Phan et al., arXiv 2406.09353, Sec. 5)
shrunk to what runs offline on a CPU: scikit-learn's digits (source, labelled) -> the digits
rotated by 22.5 degrees (target, unlabelled; ``hf_extensions.data.shifted_domains``), with a
tiny CLIP (2+2 layers, width 32, 16x16 RGB images) standing in for a web-pretrained CLIP. As
no pretrained CLIP ships offline, the tiny CLIP is pretrained *here*, once, seeded, for
``--clip-steps`` steps of image-to-class-text cross-entropy on the source training split, then
frozen; the three seeds vary the prompt initialisation and the batch order (a real CLIP is one
fixed model too).

Methods (the same prompt learner, optimizer, schedule and steps; the same zero-shot
pseudo-labels of the target training split, kept at confidence >= ``--threshold``):

- ``zero_shot``: CLIP with "a photo of a {class}." (no training);
- ``source_only``: prompts tuned on the source only, predicting with the source prompt;
- ``erm``: source + pseudo-labelled target, ``rho = alpha = 0`` (two passes per step);
- ``pga``: ``rho = --rho``, ``alpha = --align``, ``lambda = --tradeoff`` (four passes);
- ``pga_no_align``: the same with ``alpha = 0`` (for the gradient-cosine comparison).

Ceilings (issue 9 audit): ``oracle`` is the same prompt learner trained on the *target* training
split with its TRUE labels (source-only mode, the target rows fed to the "source" prompts; a
ceiling, not a UDA method); ``linear_probe`` is a logistic regression on the frozen target image
features (C on validation). Step 1 of the audit measured both on this unchanged setting before
anything else (``AUDIT``, copied into ``config.audit``), under a rule fixed beforehand: oracle
within ~3 points of zero-shot = no room, redesign the setting; oracle >= zero-shot + 8 points =
keep the setting and tune the method. The oracle came out at +19 points (linear probe +30), so
the setting is unchanged and the method is tuned instead, on the first seed's target validation
split only: the learning rate of ``source_only`` (``--lr-grid``); the pseudo-label threshold and
learning rate of ``erm`` (``--threshold-grid`` x ``--lr-grid``); ``alpha`` of ``pga``
(``--align-grid``) at ERM's threshold and learning rate (``pga_no_align`` takes PGA's). Each
table is in ``config.selection_first_seed``; the choices in ``config.selected``. Two more
diagnostics (they use target labels; not UDA methods): ``erm_true_labels`` / ``pga_true_labels``
are ERM / PGA with the kept target rows' pseudo-labels replaced by their true labels (same rows,
same hyper-parameters), which separates what the pseudo-labels cost from what the method does;
``config.pseudo_label_confusion_true_by_pseudo`` shows which classes the zero-shot labels confuse.

Model selection: each run is evaluated every ``--eval-every`` steps on the *target validation
split* (held out, labelled; never the test split), and the prompts of its best evaluation are
scored once on the target test split. (Selecting on labelled target validation data is the
usual "oracle validation" of UDA papers; the official code selects on the test set.)

``grad_cosine``: the mean over training steps of cos(g_S^sh, g_T^sh), the shared-prompt
gradients of the two domains at the current prompts (the official code's running average at
the end of training).

Cost: one optimizer step on the same batch, timed interleaved (``harness.compare``): PGA with
image features cached (encoded once per step) and PGA re-encoding the images in every pass (the
official code), over ERM (which encodes each batch once). ``floor`` is ``(I + 4T)/(I + 2T)``
with ``I`` the image encoding of the step's two batches and ``T`` one text pass (forward and
gradient of one domain's loss), timed in the same run.

Run: ``python -m benchmarks.pga`` (about 7 minutes on 2 loaded CPU cores); ``--quick`` for a
smoke run of seconds.
"""

from __future__ import annotations

import copy
import tempfile
import time
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from benchmarks.harness import (
    BenchmarkReport,
    compare,
    get_pyplot,
    make_parser,
    mean_std,
    quiet_training_arguments,
    save_plot,
    torch_threads,
    trainer_step_fn,
)
from hf_extensions.metrics import compute_classification_metrics
from hf_extensions.models import tiny_clip
from hf_extensions.pga.clip_prompts import (
    DIGIT_WORDS,
    CLIPPromptLearner,
    as_tensors,
    digit_domains,
    pretrain_clip_on_labels,
)
from trainers.pga_config import PGAConfig
from trainers.pga_trainer import PairedDomainCollator, PairedDomainDataset, PGATrainer

NAME = "pga"
TRAINED = ("source_only", "erm", "pga", "pga_no_align")
#: Not UDA methods (they use target labels): the ceiling, and ERM / PGA with the kept target
#: rows' pseudo-labels replaced by their true labels (same rows, same coverage).
DIAGNOSTICS = ("oracle", "erm_true_labels", "pga_true_labels")
RUNS = (*TRAINED, *DIAGNOSTICS)
WITH_COSINE = ("erm", "pga", "pga_no_align", "erm_true_labels", "pga_true_labels")

#: Step 1 of the issue-9 audit, measured on the unchanged setting (rotate, severity 0.5, tiny
#: CLIP pretrained on source digits) BEFORE any change, with the rule fixed beforehand.
AUDIT = {
    "question": "is the benchmark setting able to show any adaptation working at all?",
    "rule": (
        "oracle prompt tuning (target train, TRUE labels, selected on target validation) within "
        "~3 points of zero-shot: the setting has no room and may be redesigned; oracle >= "
        "zero-shot + 8 points: keep the setting and tune the method on the validation split"
    ),
    "measured_before_change": {
        "zero_shot_target_test": 0.4917,
        "zero_shot_target_validation": 0.5296,
        "oracle_target_test_per_seed": [0.6833, 0.6833, 0.7000],
        "oracle_target_validation_per_seed": [0.7259, 0.7222, 0.7185],
        "linear_probe_target_test": 0.7944,
        "linear_probe_target_validation": 0.8074,
    },
    "decision": (
        "room: oracle +19 points and linear probe +30 points over zero-shot. The setting is kept "
        "unchanged; the method is tuned instead (pseudo-label threshold and learning rate with "
        "ERM, alpha with PGA, on the first seed's target validation split)."
    ),
}
NOTES = (
    "Target accuracy on the rotated-digits test split, prompts selected on the target validation "
    "split (never test). Tiny CLIP pretrained here on source digits, frozen. oracle = the same "
    "prompt learner trained on the target training split with its TRUE labels (a ceiling, not a "
    "UDA method); erm_true_labels / pga_true_labels = ERM / PGA with the kept target rows' "
    "pseudo-labels replaced by their true labels (diagnostic, not UDA); linear_probe = logistic regression on the frozen target image features (C "
    "chosen on validation; deterministic, repeated per seed). Hyper-parameters of source_only, "
    "erm and pga chosen on the first seed's target validation split (config.selected, "
    "config.selection_first_seed). Timings are medians of interleaved samples on a shared, "
    "loaded 2-core CPU."
)


class KeepBest(TrainerCallback):
    """Keeps a copy of the prompts at the best ``eval_accuracy`` (the held-out split)."""

    def __init__(self):
        self.best = -1.0
        self.state: dict[str, torch.Tensor] | None = None
        self.step = 0

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        accuracy = (metrics or {}).get("eval_accuracy")
        if accuracy is not None and accuracy > self.best:
            self.best, self.step = accuracy, state.global_step
            self.state = {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            }

    def restore(self, model) -> None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.state:
                    param.copy_(self.state[name])


def method_options(method: str, opts) -> dict[str, Any]:
    """The PGAConfig fields that make each method."""
    return {
        "source_only": {"pga_rho": 0.0, "pga_align": 0.0, "pga_source_only": True},
        "oracle": {"pga_rho": 0.0, "pga_align": 0.0, "pga_source_only": True},
        "erm_true_labels": {"pga_rho": 0.0, "pga_align": 0.0},
        "pga_true_labels": {"pga_rho": opts.rho, "pga_align": opts.align},
        "erm": {"pga_rho": 0.0, "pga_align": 0.0},
        "pga": {"pga_rho": opts.rho, "pga_align": opts.align},
        "pga_no_align": {"pga_rho": opts.rho, "pga_align": 0.0},
    }[method]


def make_learner(clip, tokenizer, opts, seed: int) -> CLIPPromptLearner:
    torch.manual_seed(seed)
    return CLIPPromptLearner(
        clip, tokenizer, DIGIT_WORDS, ["source", "target"],
        n_ctx_shared=opts.n_ctx, n_ctx_domain=opts.n_ctx,
    )  # fmt: skip


def make_config(method: str, opts, seed: int, output_dir: str, **extra) -> PGAConfig:
    return PGAConfig(
        **quiet_training_arguments(output_dir, seed=seed, **extra),
        **method_options(method, opts),
        pga_tradeoff=opts.tradeoff,
        pseudo_label_threshold=opts.threshold,
        n_ctx_shared=opts.n_ctx,
        n_ctx_domain=opts.n_ctx,
        per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=512,
        learning_rate=opts.lr,
        weight_decay=0.0,
        lr_scheduler_type="cosine",
    )


def run(method, clip, tokenizer, train, validation, test, opts, seed) -> dict[str, Any]:
    learner = make_learner(clip, tokenizer, opts, seed)
    keep = KeepBest()
    with tempfile.TemporaryDirectory() as output_dir:
        config = make_config(
            method, opts, seed, output_dir,
            max_steps=opts.steps, eval_strategy="steps", eval_steps=opts.eval_every,
            logging_strategy="steps", logging_steps=1, log_level="error",
        )  # fmt: skip
        trainer = PGATrainer(
            model=learner,
            args=config,
            train_dataset=train,
            eval_dataset=validation,
            compute_metrics=compute_classification_metrics,
            callbacks=[keep],
        )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        cosines = [e["grad_cosine"] for e in trainer.state.log_history if "grad_cosine" in e]
        keep.restore(learner)
        test_accuracy = trainer.evaluate(test, metric_key_prefix="test")["test_accuracy"]
    return {
        "target_accuracy": float(test_accuracy),
        "validation_accuracy": keep.best,
        "selected_step": keep.step,
        "grad_cosine": float(np.mean(cosines)) if cosines else float("nan"),
        "cosine_curve": cosines,
        "train_seconds": seconds,
    }


def _split(tensors: dict[str, torch.Tensor]) -> Dataset:
    return Dataset.from_dict({k: v.numpy() for k, v in tensors.items()}).with_format("torch")


def linear_probe(features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], grid):
    """Multinomial logistic regression (scikit-learn) on frozen target image features, its
    inverse regularisation ``C`` chosen on the validation split; returns ``(test accuracy,
    validation accuracy, C)``. Deterministic (lbfgs on fixed features)."""
    from sklearn.linear_model import LogisticRegression

    best = None
    for c in grid:
        model = LogisticRegression(C=c, max_iter=5000)
        model.fit(features["train"].numpy(), labels["train"].numpy())
        score = model.score(features["validation"].numpy(), labels["validation"].numpy())
        if best is None or score > best[1]:
            best = (model.score(features["test"].numpy(), labels["test"].numpy()), score, c)
    return best


def with_options(opts, **overrides):
    """A copy of the parsed options with ``overrides`` set (one tuning candidate)."""
    out = copy.copy(opts)
    for key, value in overrides.items():
        setattr(out, key, value)
    return out


def tune(method, candidates, make_train, clip, clip_state, tokenizer, validation, test, opts):
    """Honest tuning: every candidate (a dict of option overrides) trains ``method`` on the
    first seed; the best *target-validation* accuracy wins (ties: the earlier candidate).
    Returns ``(winning overrides, table)``; the test accuracy is not recorded."""
    table, best = [], None
    seed = opts.seeds[0]
    for overrides in candidates:
        trial = with_options(opts, **overrides)
        clip.load_state_dict(clip_state)
        result = run(
            method, clip, tokenizer, make_train(trial, seed), validation, test, trial, seed
        )
        row = {**overrides, "validation_accuracy": result["validation_accuracy"]}
        if method not in ("source_only", "oracle"):
            row["grad_cosine"] = result["grad_cosine"]
        table.append(row)
        print(
            f"tuning {method} {overrides}: validation {row['validation_accuracy']:.4f}", flush=True
        )
        if best is None or row["validation_accuracy"] > best[1]:
            best = (overrides, row["validation_accuracy"])
    return best[0], table


def step_timing(clip, tokenizer, train, opts) -> tuple[dict[str, float], dict[str, float]]:
    """ERM / PGA cached / PGA uncached optimizer steps on one batch, interleaved."""
    batch = PairedDomainCollator()([train[i] for i in range(opts.batch_size)])
    with tempfile.TemporaryDirectory() as output_dir:
        total = 3 + opts.repeats + 2
        steps = {}
        for name, method, cache in (
            ("erm", "erm", True),
            ("pga", "pga", True),
            ("pga_uncached", "pga", False),
        ):
            learner = make_learner(clip, tokenizer, opts, 0)
            config = make_config(method, opts, 0, output_dir, cache_image_features=cache)
            steps[name] = trainer_step_fn(PGATrainer(model=learner, args=config), total)
        learner = make_learner(clip, tokenizer, opts, 0)
        image = {d: learner.image_features(batch[d]["pixel_values"]) for d in batch}

        def encode_images():
            return [learner.image_features(batch[d]["pixel_values"]) for d in batch]

        def text_pass():
            loss = learner.domain_loss(image["target"], batch["target"]["labels"], "target")
            return torch.autograd.grad(loss, learner.prompt_parameters("target"))

        result = compare(
            lambda: steps["erm"](batch),
            {
                "pga": lambda: steps["pga"](batch),
                "pga_uncached": lambda: steps["pga_uncached"](batch),
                "images": encode_images,
                "text_pass": text_pass,
            },
            warmup=3,
            repeats=opts.repeats,
        )
    ms = {"erm": result["baseline"].median * 1e3}
    ms.update({k: v.median * 1e3 for k, v in result["candidates"].items()})
    image_ms, text_ms = ms["images"], ms["text_pass"]
    ratios = {
        "pga_step_vs_erm": ms["pga"] / ms["erm"],
        "pga_uncached_step_vs_erm": ms["pga_uncached"] / ms["erm"],
        "cached_vs_uncached": ms["pga"] / ms["pga_uncached"],
        "floor_pga_vs_erm": (image_ms + 4 * text_ms) / (image_ms + 2 * text_ms),
    }
    return ratios, ms


def plot(per_seed, curves, ratios, results_dir):
    plt = get_pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    names = ["zero_shot", *RUNS, "linear_probe"]
    for index, method in enumerate(names):
        values = per_seed[method]
        left.bar(index, np.mean(values), color=f"C{index}")
        left.scatter([index] * len(values), values, color="black", s=12, zorder=3)
    left.set_xticks(range(len(names)), names, rotation=35, ha="right")
    left.set_ylabel("target test accuracy")
    left.set_title("digits -> rotated digits (tiny CLIP)")
    for method, curve in curves.items():
        running = np.cumsum(curve) / np.arange(1, len(curve) + 1)
        middle.plot(running, label=method)
    middle.set_xlabel("step")
    middle.set_ylabel("running mean cos(g_S^sh, g_T^sh)")
    middle.set_title("shared-prompt gradient alignment (seed 0)")
    middle.legend()
    keys = [k for k in ratios if "accuracy" not in k]
    right.barh(range(len(keys)), [ratios[k] for k in keys], color="C7")
    right.set_yticks(range(len(keys)), keys)
    right.axvline(1.0, color="black", lw=0.8)
    right.set_title("step-time ratios")
    fig.tight_layout()
    return save_plot(fig, NAME, results_dir)


def main(argv: list[str] | None = None) -> BenchmarkReport:
    with torch_threads(1):  # tiny models: extra threads only wait for a busy core here
        return _main(argv)


def _main(argv: list[str] | None = None) -> BenchmarkReport:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--clip-steps", type=int, default=300)
    parser.add_argument("--n-ctx", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3, help="when --lr-grid is empty")
    parser.add_argument("--rho", type=float, default=1e-3)
    parser.add_argument("--align", type=float, default=1.0, help="alpha when --align-grid is empty")
    parser.add_argument("--tradeoff", type=float, default=1.0)
    parser.add_argument(
        "--threshold", type=float, default=0.4, help="when --threshold-grid is empty"
    )
    parser.add_argument(
        "--lr-grid", type=float, nargs="*", default=[3e-3, 1e-2],
        help="learning rates tried (first seed, target validation) for source-only and ERM",
    )  # fmt: skip
    parser.add_argument(
        "--threshold-grid", type=float, nargs="*", default=[0.4, 0.8, 0.95],
        help="pseudo-label thresholds tried with ERM; PGA and pga_no_align use ERM's choice",
    )  # fmt: skip
    parser.add_argument(
        "--align-grid", type=float, nargs="*", default=[0.01, 0.1, 1.0, 10.0],
        help="alpha values tried on the first seed; the best target-validation accuracy wins",
    )  # fmt: skip
    parser.add_argument("--probe-c-grid", type=float, nargs="*", default=[0.1, 1, 10, 100, 1000])
    parser.add_argument("--shift", default="rotate")
    parser.add_argument("--severity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=20)
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.seeds, opts.steps, opts.eval_every = [0], 6, 3
        opts.clip_steps, opts.repeats, opts.align_grid = 20, 3, []
        opts.lr_grid, opts.threshold_grid, opts.probe_c_grid = [], [], [1.0]
    start = time.perf_counter()

    domains = digit_domains(0, target_shift=opts.shift, severity=opts.severity)
    split = {d: {s: as_tensors(domains[d][s]) for s in domains[d]} for d in domains}
    clip, tokenizer = tiny_clip(seed=0)
    source = split["source"]["train"]
    pretrain_clip_on_labels(
        clip, tokenizer, source["pixel_values"], source["labels"], DIGIT_WORDS,
        steps=opts.clip_steps, learning_rate=1e-3, seed=0,
    )  # fmt: skip
    clip_state = copy.deepcopy(clip.state_dict())

    probe = make_learner(clip, tokenizer, opts, 0)
    target = split["target"]
    zero_shot = probe.zero_shot_proba(target["test"]["pixel_values"]).argmax(-1)
    zero_shot_accuracy = float((zero_shot == target["test"]["labels"]).float().mean())
    zero_shot_val = probe.zero_shot_proba(target["validation"]["pixel_values"]).argmax(-1)
    zero_shot_val_accuracy = float((zero_shot_val == target["validation"]["labels"]).float().mean())
    source_zero_shot = probe.zero_shot_proba(split["source"]["test"]["pixel_values"]).argmax(-1)
    source_accuracy = float((source_zero_shot == split["source"]["test"]["labels"]).float().mean())

    pseudo_cache: dict[float, torch.Tensor] = {}

    def pseudo_labels(threshold: float) -> torch.Tensor:
        if threshold not in pseudo_cache:
            pseudo_cache[threshold] = probe.pseudo_labels(
                target["train"]["pixel_values"], threshold
            )
        return pseudo_cache[threshold]

    def uda_train(trial, seed: int) -> PairedDomainDataset:
        """Labelled source + pseudo-labelled target (target labels never used)."""
        pseudo = pseudo_labels(trial.threshold)
        domains = {
            "source": split["source"]["train"],
            "target": {"pixel_values": target["train"]["pixel_values"], "labels": pseudo},
        }
        return PairedDomainDataset(domains, seed=seed)

    def true_label_train(trial, seed: int) -> PairedDomainDataset:
        """Diagnostic: the kept pseudo-labelled rows carry their TRUE labels instead."""
        pseudo = pseudo_labels(trial.threshold)
        truth = torch.where(pseudo != -100, target["train"]["labels"], pseudo)
        domains = {
            "source": split["source"]["train"],
            "target": {"pixel_values": target["train"]["pixel_values"], "labels": truth},
        }
        return PairedDomainDataset(domains, seed=seed)

    def oracle_train(trial, seed: int) -> PairedDomainDataset:
        """The ceiling: the target training split with its TRUE labels, fed to the prompt
        learner's "source" prompts (source-only mode). Not a UDA method."""
        return PairedDomainDataset({"source": target["train"]}, seed=seed)

    validation, test = _split(target["validation"]), _split(target["test"])

    # The ceiling of the frozen image features (step 1 of the audit, see the module docstring).
    image = {s: probe.image_features(target[s]["pixel_values"]) for s in target}
    probe_test, probe_val, probe_c = linear_probe(
        image, {s: target[s]["labels"] for s in target}, opts.probe_c_grid
    )

    # Honest tuning on the first seed's target validation split (never test).
    selection: dict[str, list] = {}
    chosen: dict[str, dict[str, float]] = {}
    lr_grid = [{"lr": lr} for lr in opts.lr_grid] or [{}]
    tuned = (validation, test, opts)
    if len(lr_grid) > 1:
        chosen["source_only"], selection["source_only"] = tune(
            "source_only", lr_grid, uda_train, clip, clip_state, tokenizer, *tuned
        )
    else:
        chosen["source_only"] = lr_grid[0]
    erm_grid = [
        {"threshold": threshold, **lr}
        for threshold in (opts.threshold_grid or [opts.threshold])
        for lr in lr_grid
    ]
    if len(erm_grid) > 1:
        chosen["erm"], selection["erm"] = tune(
            "erm", erm_grid, uda_train, clip, clip_state, tokenizer, *tuned
        )
    else:
        chosen["erm"] = erm_grid[0]
    if opts.align_grid:
        pga_grid = [{**chosen["erm"], "align": align} for align in opts.align_grid]
        chosen["pga"], selection["pga"] = tune(
            "pga", pga_grid, uda_train, clip, clip_state, tokenizer, *tuned
        )
    else:
        chosen["pga"] = dict(chosen["erm"])
    chosen["pga_no_align"] = {**chosen["pga"], "align": 0.0}
    chosen["oracle"] = {}
    chosen["erm_true_labels"], chosen["pga_true_labels"] = chosen["erm"], chosen["pga"]
    method_opts = {m: with_options(opts, **chosen[m]) for m in RUNS}
    builders = {"oracle": oracle_train, "erm_true_labels": true_label_train}
    builders["pga_true_labels"] = true_label_train

    per_seed: dict[str, list[float]] = {"zero_shot": [zero_shot_accuracy] * len(opts.seeds)}
    details: dict[str, dict[str, list[float]]] = {m: {} for m in RUNS}
    curves = {}
    for seed in opts.seeds:
        for method in RUNS:
            trial = method_opts[method]
            train = builders.get(method, uda_train)(trial, seed)
            clip.load_state_dict(clip_state)
            result = run(method, clip, tokenizer, train, validation, test, trial, seed)
            per_seed.setdefault(method, []).append(result["target_accuracy"])
            for key in ("validation_accuracy", "selected_step", "grad_cosine", "train_seconds"):
                details[method].setdefault(key, []).append(result[key])
            if seed == opts.seeds[0] and method in ("erm", "pga", "pga_no_align"):
                label = f"pga alpha={trial.align}" if method == "pga" else method
                curves[label] = result["cosine_curve"]
            print(
                f"seed {seed} {method:13s} target test {result['target_accuracy']:.4f} "
                f"(val {result['validation_accuracy']:.4f} @ step {result['selected_step']}), "
                f"cos {result['grad_cosine']:.3f}, {result['train_seconds']:.1f} s",
                flush=True,
            )
    per_seed["linear_probe"] = [probe_test] * len(opts.seeds)

    clip.load_state_dict(clip_state)
    ratios, step_ms = step_timing(
        clip, tokenizer, uda_train(method_opts["pga"], 0), method_opts["pga"]
    )

    metrics: dict[str, dict[str, Any]] = {
        "zero_shot": {
            "target_accuracy": per_seed["zero_shot"],
            "validation_accuracy": zero_shot_val_accuracy,
        },
    }
    for method in RUNS:
        metrics[method] = {
            "target_accuracy": per_seed[method],
            "validation_accuracy": details[method]["validation_accuracy"],
            "selected_step": details[method]["selected_step"],
        }
        if method in WITH_COSINE:
            metrics[method]["grad_cosine"] = float(np.mean(details[method]["grad_cosine"]))
            metrics[method]["grad_cosine_per_seed"] = details[method]["grad_cosine"]
    metrics["linear_probe"] = {
        "target_accuracy": per_seed["linear_probe"],
        "validation_accuracy": probe_val,
        "C": probe_c,
    }
    summary = {m: mean_std(v)[0] for m, v in per_seed.items()}
    ratios.update(
        {
            "pga_minus_source_only_accuracy": summary["pga"] - summary["source_only"],
            "pga_minus_erm_accuracy": summary["pga"] - summary["erm"],
            "oracle_minus_zero_shot_accuracy": summary["oracle"] - summary["zero_shot"],
            "linear_probe_minus_zero_shot_accuracy": summary["linear_probe"] - summary["zero_shot"],
        }
    )
    kept = {t: float((p != -100).float().mean()) for t, p in pseudo_cache.items()}
    correct = {
        t: float((p[p != -100] == target["train"]["labels"][p != -100]).float().mean())
        for t, p in pseudo_cache.items()
    }
    confusion = {}
    for threshold, pseudo in pseudo_cache.items():
        kept_rows = pseudo != -100
        pairs = target["train"]["labels"][kept_rows] * 10 + pseudo[kept_rows]
        confusion[threshold] = torch.bincount(pairs, minlength=100).view(10, 10).tolist()
    report = BenchmarkReport(
        name=NAME,
        metrics=metrics,
        ratios=ratios,
        config={
            **{k: (str(v) if k == "results_dir" else v) for k, v in vars(opts).items()},
            "selected": {m: chosen[m] for m in RUNS},
            "selection_first_seed": selection,
            "pseudo_label_coverage": kept,
            "pseudo_label_accuracy": correct,
            "pseudo_label_confusion_true_by_pseudo": confusion,
            "source_zero_shot_test_accuracy": source_accuracy,
            "audit": AUDIT,
            "step_ms": step_ms,
            "total_seconds": time.perf_counter() - start,
        },
        notes=NOTES,
    )
    report.print_table()
    if not opts.quick:
        report.write(opts.results_dir)
        plot(per_seed, curves, ratios, opts.results_dir)
    return report


if __name__ == "__main__":
    main()
