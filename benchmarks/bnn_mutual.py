"""Independent BNNs vs DML vs DML + diversity (Pham et al., NeurIPS 2023) on digits.

Shrunk to what ships offline: scikit-learn's digits (the split drawn per seed), two peer BNNs
(64-128-128-10 MLPs, every Linear mean-field Gaussian, prior N(0, 1), sigma_0 = softplus(-3)),
the same optimiser, schedule, epochs and seeds for every method. The three methods are settings
of :class:`trainers.BayesianMutualLearningConfig`:

- ``independent``: ``mutual_weight=0`` and both diversity weights 0 (two BNNs, ELBO only);
- ``dml``: both diversity weights 0 (deep mutual learning of BNNs);
- ``dml_diversity``: parameter diversity (Wasserstein, bounded) + feature diversity (cosine on the
  fused outputs of both hidden layers), weights chosen on the *validation* NLL of the first seed
  (first ``parameter_diversity_weight`` from ``--par-grid`` with the default feature weight, then
  ``feature_diversity_weight`` from ``--feat-grid``); the test split is never used to choose.

Scored on the test split, for the Bayesian model average of the two peers over 20 posterior draws
each: accuracy, NLL, ECE (15 bins); between the peers: ``peer_distance`` (mean over the Gaussian
weights of the squared 2-Wasserstein distance of the two posteriors) and ``disagreement`` (share
of test examples whose two peers' predictive distributions have different argmax).

Claims (stated before the run; the tolerance rule is fixed here, its value comes from the run):
with diversity, peer distance and disagreement above DML's (means over seeds); ECE and NLL at
most DML's mean + DML's seed-to-seed standard deviation (ddof=1) of the same metric, i.e. not worse
than one run-to-run fluctuation; accuracy at least DML's - 1 point; one training step at most 1.2x
DML's.

Cost: one optimizer step of each method on the same peers and batch, timed interleaved in one
process (:func:`benchmarks.harness.compare`), for the benchmark's MLP and for two tiny-ViT BNNs.

Run: ``python -m benchmarks.bnn_mutual`` (about 8 minutes on 2 CPU cores, one thread);
``--quick`` for a smoke run that writes nothing.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import (
    BenchmarkReport,
    compare,
    get_pyplot,
    make_parser,
    mean_std,
    optimisation_arguments,
    quiet_training_arguments,
    save_plot,
    torch_threads,
    trainer_step_fn,
)
from hf_extensions.bnn import PeerEnsemble, convert_to_bayesian, peer_distance
from hf_extensions.data import load_digits
from hf_extensions.metrics import accuracy, expected_calibration_error, negative_log_likelihood
from hf_extensions.metrics.reliability import reliability_diagram
from hf_extensions.models import tiny_mlp_classifier, tiny_vit_classifier
from trainers.bnn_mutual_config import BayesianMutualLearningConfig
from trainers.bnn_mutual_trainer import BayesianMutualLearningTrainer

NAME = "bnn_mutual"
METHODS = ("independent", "dml", "dml_diversity")
LABELS = {"independent": "independent BNNs", "dml": "DML", "dml_diversity": "DML + diversity"}
FEATURE_LAYERS = ["net.1", "net.3"]  # the ReLU outputs of both hidden layers
METRICS = ("accuracy", "nll", "ece", "peer_distance", "disagreement", "predictive_tv")


@dataclass(frozen=True)
class Settings:
    """One training configuration shared by every method."""

    hidden_sizes: tuple[int, ...] = (128, 128)
    num_peers: int = 2
    posterior_rho_init: float = -3.0
    prior_std: float = 1.0
    optim: str = "adamw_torch"
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    epochs: int = 50
    batch_size: int = 64
    mc_samples: int = 20
    parameter_diversity_weight: float = BayesianMutualLearningConfig.parameter_diversity_weight
    feature_diversity_weight: float = BayesianMutualLearningConfig.feature_diversity_weight


def method_weights(method: str, settings: Settings) -> dict[str, float]:
    """The config values that make ``method`` out of the one trainer."""
    if method == "independent":
        return dict(mutual_weight=0.0, parameter_diversity_weight=0.0, feature_diversity_weight=0.0)
    if method == "dml":
        return dict(parameter_diversity_weight=0.0, feature_diversity_weight=0.0)
    return dict(
        parameter_diversity_weight=settings.parameter_diversity_weight,
        feature_diversity_weight=settings.feature_diversity_weight,
    )


def build_peers(kind: str, settings: Settings, seed: int) -> PeerEnsemble:
    """``num_peers`` BNNs with different initial means (seed ``1000 seed + k``)."""
    peers = []
    for k in range(settings.num_peers):
        if kind == "mlp":
            model = tiny_mlp_classifier(hidden_sizes=settings.hidden_sizes, seed=1000 * seed + k)
        else:
            model = tiny_vit_classifier(seed=1000 * seed + k)
        convert_to_bayesian(
            model,
            prior_std=settings.prior_std,
            posterior_rho_init=settings.posterior_rho_init,
            moped_delta=None if kind == "mlp" else 0.1,
        )
        peers.append(model.train())
    return PeerEnsemble(peers, mc_samples=settings.mc_samples)


def build_trainer(
    method: str, model, train, settings: Settings, seed: int, output_dir: str, **extra
) -> BayesianMutualLearningTrainer:
    args = BayesianMutualLearningConfig(
        **quiet_training_arguments(
            output_dir,
            seed=seed,
            **optimisation_arguments(settings),
            mc_samples=settings.mc_samples,
            feature_layers=extra.pop("feature_layers", FEATURE_LAYERS),
            **method_weights(method, settings),
            **extra,
        )
    )
    return BayesianMutualLearningTrainer(model=model, args=args, train_dataset=train)


@torch.no_grad()
def score(ensemble: PeerEnsemble, split, seed: int) -> tuple[dict[str, float], np.ndarray]:
    """Test metrics of the model average and of the peers' (dis)agreement; and the probabilities."""
    ensemble.eval()
    columns = split.with_format("torch")[:]
    torch.manual_seed(10_000 + seed)  # the posterior draws of the evaluation
    log_probs = ensemble.peer_log_probs(features=columns["features"].float())
    probs = log_probs.exp().mean(0).numpy().astype(np.float64)
    probs /= probs.sum(1, keepdims=True)
    labels = columns["labels"].numpy()
    votes = log_probs.argmax(-1)
    peer_probs = log_probs.exp()
    pairs = [(a, b) for a in range(len(votes)) for b in range(a + 1, len(votes))]
    metrics = {
        "accuracy": accuracy(probs.argmax(1), labels),
        "nll": negative_log_likelihood(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins=15),
        "peer_distance": float(
            np.mean([peer_distance(ensemble.peers[a], ensemble.peers[b]) for a, b in pairs])
        ),
        "disagreement": float(np.mean([(votes[a] != votes[b]).float().mean() for a, b in pairs])),
        "predictive_tv": float(
            np.mean([0.5 * (peer_probs[a] - peer_probs[b]).abs().sum(-1).mean() for a, b in pairs])
        ),
        "peer_accuracy": float(np.mean([accuracy(v.numpy(), labels) for v in votes])),
    }
    return metrics, probs


def run(method: str, seed: int, settings: Settings, split: str = "test") -> tuple[dict, np.ndarray]:
    """Train ``method`` on seed ``seed``; its metrics on ``split`` and its probabilities there."""
    data = load_digits(seed=seed, layout="vector")
    train = data["train"].select_columns(["features", "labels"])
    ensemble = build_peers("mlp", settings, seed)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(method, ensemble, train, settings, seed, output_dir)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    metrics, probs = score(ensemble, data[split], seed)
    metrics["train_seconds"] = seconds
    return metrics, probs


def select(settings: Settings, par_grid, feat_grid, seed: int, log) -> tuple[Settings, dict]:
    """Diversity weights with the best validation NLL of DML + diversity on ``seed``."""
    scores: dict[str, dict[str, float]] = {
        "parameter_diversity_weight": {},
        "feature_diversity_weight": {},
    }
    cache: dict[tuple[float, float], float] = {}

    def nll(current: Settings) -> float:
        key = (current.parameter_diversity_weight, current.feature_diversity_weight)
        if key not in cache:
            cache[key] = run("dml_diversity", seed, current, split="validation")[0]["nll"]
            log(
                f"  select lambda_par={key[0]} lambda_feat={key[1]}: validation NLL {cache[key]:.4f}"
            )
        return cache[key]

    for field, grid in (
        ("parameter_diversity_weight", par_grid),
        ("feature_diversity_weight", feat_grid),
    ):
        values = {value: nll(replace(settings, **{field: value})) for value in grid}
        scores[field] = {str(k): v for k, v in values.items()}
        settings = replace(settings, **{field: min(grid, key=lambda v: (values[v], v))})
    return settings, scores


def step_ratios(settings: Settings, repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median step time of each method over DML's, on the benchmark's MLP and on tiny ViTs."""
    digits = load_digits(seed=0, layout="vector")["train"].with_format("torch")[
        : settings.batch_size
    ]
    images = load_digits(seed=0)["train"].with_format("torch")[:32]
    batches = {
        "mlp": {"features": digits["features"].float(), "labels": digits["labels"].long()},
        "vit": {"pixel_values": images["pixel_values"].float(), "labels": images["labels"].long()},
    }
    features = {"mlp": FEATURE_LAYERS, "vit": ["vit.layers.0", "vit.layers.1", "classifier:input"]}
    ratios, timings = {}, {}
    total = 5 + repeats + 2
    for kind, batch in batches.items():
        with tempfile.TemporaryDirectory() as output_dir:
            steps = {
                method: trainer_step_fn(
                    build_trainer(
                        method,
                        build_peers(kind, settings, 0),
                        None,
                        settings,
                        0,
                        output_dir,
                        kl_dataset_size=1167,
                        feature_layers=features[kind],
                    ),
                    total,
                )
                for method in METHODS
            }
            result = compare(
                lambda steps=steps, batch=batch: steps["dml"](batch),
                {
                    m: (lambda m=m, steps=steps, batch=batch: steps[m](batch))
                    for m in METHODS
                    if m != "dml"
                },
                warmup=5,
                repeats=repeats,
                number=3 if kind == "mlp" else 1,
            )
        suffix = "" if kind == "mlp" else "_vit"
        ratios[f"step_vs_dml{suffix}"] = result["ratios"]["dml_diversity"]
        ratios[f"independent_step_vs_dml{suffix}"] = result["ratios"]["independent"]
        timings[kind] = {
            "dml": result["baseline"].median * 1e3,
            **{m: result["candidates"][m].median * 1e3 for m in METHODS if m != "dml"},
        }
    return ratios, timings


def plot(per_seed, probabilities, labels, ratios, results_dir):
    plt = get_pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    for index, method in enumerate(METHODS):
        reliability_diagram(
            probabilities[method],
            labels,
            ax=axes[0, index],
            label=LABELS[method],
            color=f"C{index}",
            title=f"{LABELS[method]} (seed 0, test)",
        )
    names = [
        ("accuracy", "test accuracy"),
        ("nll", "test NLL"),
        ("ece", "test ECE"),
        ("peer_distance", "peer distance (W2² / weight)"),
        ("disagreement", "disagreement"),
    ]
    cells = [axes[0, 3], *axes[1]]
    for ax, (metric, title) in zip(cells, names):
        for index, method in enumerate(METHODS):
            values = per_seed[method][metric]
            ax.bar(
                index,
                np.mean(values),
                yerr=np.std(values, ddof=1) if len(values) > 1 else 0,
                capsize=4,
                color=f"C{index}",
            )
            ax.scatter([index] * len(values), values, color="black", s=10, zorder=3)
        ax.set_xticks(
            range(len(METHODS)), [LABELS[m].replace(" + ", "\n+ ") for m in METHODS], fontsize=8
        )
        ax.set_title(title)
    axes[1, 3].set_title(
        f"{axes[1, 3].get_title()}\nstep time vs DML: {ratios.get('step_vs_dml', float('nan')):.2f}x"
    )
    fig.tight_layout()
    return save_plot(fig, NAME, results_dir)


def main(argv: list[str] | None = None) -> BenchmarkReport:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=Settings.epochs)
    parser.add_argument("--par-grid", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    parser.add_argument("--feat-grid", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    parser.add_argument("--timing-repeats", type=int, default=30)
    parser.add_argument(
        "--part",
        choices=("all", "timing"),
        default="all",
        help="'timing' re-times the steps and updates the ratios of an existing JSON",
    )
    parser.add_argument("--quick", action="store_true", help="2 epochs, one seed, no selection")
    args = parser.parse_args(argv)
    with torch_threads(1):  # steadier timings on a shared machine; recorded in the JSON
        return _run(args)


def _claims(summary: dict[str, dict[str, tuple[float, float]]], ratios) -> dict[str, Any]:
    """Each claim with its threshold and whether the measured means meet it."""
    dml, div = summary["dml"], summary["dml_diversity"]
    claims: dict[str, Any] = {}
    for metric in ("peer_distance", "disagreement"):
        claims[f"{metric}_above_dml"] = {
            "dml_diversity": div[metric][0],
            "dml": dml[metric][0],
            "holds": bool(div[metric][0] > dml[metric][0]),
        }
    for metric in ("ece", "nll"):
        tolerance = dml[metric][1]
        claims[f"{metric}_at_most_dml_plus_tolerance"] = {
            "dml_diversity": div[metric][0],
            "dml": dml[metric][0],
            "tolerance": tolerance,
            "holds": bool(div[metric][0] <= dml[metric][0] + tolerance),
        }
    claims["accuracy_at_least_dml_minus_1_point"] = {
        "dml_diversity": div["accuracy"][0],
        "dml": dml["accuracy"][0],
        "holds": bool(div["accuracy"][0] >= dml["accuracy"][0] - 0.01),
    }
    if "step_vs_dml" in ratios:
        claims["step_vs_dml_at_most_1.2"] = {
            "step_vs_dml": ratios["step_vs_dml"],
            "holds": bool(ratios["step_vs_dml"] <= 1.2),
        }
    return claims


def _previous(results_dir) -> tuple[Settings, list[int], dict, dict]:
    """Settings, seeds, selection scores and per-seed results of the existing JSON."""
    path = Path(results_dir) / f"{NAME}.json"
    if not path.is_file():
        raise FileNotFoundError(f"--part timing updates {path}, which does not exist yet.")
    previous = json.loads(path.read_text())
    config = previous["config"]
    fields = {k: v for k, v in config.items() if k in Settings.__dataclass_fields__}
    fields["hidden_sizes"] = tuple(fields["hidden_sizes"])
    per_seed = {
        m: {
            k[: -len("_per_seed")]: v
            for k, v in previous["metrics"][m].items()
            if k.endswith("_per_seed")
        }
        for m in METHODS
    }
    return Settings(**fields), config["seeds"], config["selection_validation_nll"], per_seed


def _train_all(args, settings: Settings, seeds: list[int]):
    """Select the diversity weights, train every method on every seed."""
    selection: dict[str, Any] = {}
    if not args.quick:
        settings, selection = select(settings, args.par_grid, args.feat_grid, seeds[0], print)
    print(
        f"  diversity weights: lambda_par={settings.parameter_diversity_weight}, "
        f"lambda_feat={settings.feature_diversity_weight}"
    )
    per_seed: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
    probabilities: dict[str, np.ndarray] = {}
    for seed in seeds:
        for method in METHODS:
            result, probs = run(method, seed, settings)
            print(
                f"  seed {seed} {method}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items())
            )
            for key, value in result.items():
                per_seed[method].setdefault(key, []).append(value)
            if seed == seeds[0]:
                probabilities[method] = probs
    return settings, selection, per_seed, probabilities


def _run(args) -> BenchmarkReport:
    settings = Settings(epochs=2 if args.quick else args.epochs)
    seeds = args.seeds[:1] if args.quick else args.seeds
    started = time.perf_counter()
    probabilities: dict[str, np.ndarray] = {}
    if args.part == "timing":
        settings, seeds, selection, per_seed = _previous(args.results_dir)
    else:
        settings, selection, per_seed, probabilities = _train_all(args, settings, seeds)
    ratios, timings = step_ratios(settings, 5 if args.quick else args.timing_repeats)
    summary = {m: {k: mean_std(per_seed[m][k]) for k in METRICS} for m in METHODS}
    metrics: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        row: dict[str, Any] = {k: summary[method][k][0] for k in METRICS}
        row.update({f"{k}_std": summary[method][k][1] for k in METRICS})
        row.update({f"{k}_per_seed": v for k, v in per_seed[method].items()})
        row.update({f"step_ms_{kind}": table[method] for kind, table in timings.items()})
        metrics[method] = row
    claims = _claims(summary, ratios)
    report = BenchmarkReport(
        name=NAME,
        metrics=metrics,
        ratios=ratios,
        config={
            **asdict(settings),
            "seeds": seeds,
            "torch_threads": 1,
            "feature_layers": FEATURE_LAYERS,
            "selection_validation_nll": selection,
            "tolerance_rule": (
                "ECE and NLL of dml_diversity may exceed DML's mean by at most DML's seed-to-seed "
                "sample standard deviation (ddof=1) of the same metric; accuracy may be at most 1 "
                "point below DML's; peer distance and disagreement must be above DML's (means "
                "over seeds); step_vs_dml <= 1.2. Fixed before the run."
            ),
            "claims": claims,
            "benchmark_seconds": time.perf_counter() - started,
            "part": args.part,
        },
        notes=(
            "Test-split metrics of the peers' Bayesian model average (20 draws per peer), mean "
            "over seeds with std and per-seed values. peer_distance: mean squared 2-Wasserstein "
            "distance per Gaussian weight between the two peers' posteriors; disagreement: "
            "share of test examples on which the peers' predicted classes differ; predictive_tv: mean "
            "total-variation distance between the peers' predictive distributions (no claim "
            "attached, a finer view of disagreement than the vote). Diversity "
            "weights chosen on seed 0's validation NLL. Ratios: median step time over DML's, "
            "timed interleaved in this run (MLP of the benchmark; _vit: two tiny-ViT BNNs). "
            "Claims: "
            + "; ".join(
                f"{name}: {'holds' if c['holds'] else 'DOES NOT HOLD'}"
                for name, c in claims.items()
            )
        ),
    )
    if not args.quick:
        report.write(args.results_dir)
    if not args.quick and probabilities:  # a timing-only run keeps the existing plot
        labels = load_digits(seed=seeds[0], layout="vector")["test"]["labels"]
        plot(per_seed, probabilities, np.asarray(labels), ratios, args.results_dir)
    report.print_table()
    for name, claim in claims.items():
        print(f"claim {name}: {'holds' if claim['holds'] else 'DOES NOT HOLD'} {claim}")
    return report


if __name__ == "__main__":
    main()
