"""Post-training quantization on digits: FP, round-to-nearest, QDrop (base) and MetaAug.

The embedded setting of issue 12 (MetaAug, Pham et al., ECCV 2024, arXiv 2407.14726): per seed,
the digits split of that seed, the embedded ResNet-style CNN trained on its train split, 128
calibration images drawn from that train split, and the test split held out. At W4A4 and W2A4
(first layer W8 on the float image, last layer W8A8, the BRECQ / QDrop convention) it measures
the top-1 accuracy on the calibration images and on the held-out split of

* ``fp`` -- the float model;
* ``rtn`` -- round-to-nearest (Lp grid-searched scales, no reconstruction);
* ``base`` -- QDrop block reconstruction (AdaRound + LSQ + QDrop, ``drop_prob`` 0.5);
* ``metaaug`` -- the same reconstruction after MetaAug's bi-level stage on every inner block,
  on the calibration images and their transforms.

``ratios.metaaug_calib_time_vs_base``: mean over runs of MetaAug's calibration wall time over
QDrop's, the two run back to back in this process for every seed and bit setting.

Iterations are CPU-sized (the paper: 20000 per block, 500 meta steps): see ``config`` in the JSON.
MetaAug's margin τ is 0.1 in the paper on ImageNet-normalised images (pixel variance about 1); here
it is ``0.1 * var(calibration pixels)``, the same fraction of the data's variance.

Run: ``python -m benchmarks.quantization`` (about 6 minutes on 2 busy CPU cores);
``--quick`` for a seconds-long smoke run.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch

from benchmarks.harness import (
    RESULTS_DIR,
    BenchmarkReport,
    get_pyplot,
    make_parser,
    mean_std,
    save_plot,
    torch_threads,
)
from hf_extensions.quantization import MetaAugConfig, quantize_model_rtn, reconstruct_model
from hf_extensions.quantization.models import digits_tensors, evaluate_accuracy, train_digits_cnn

NAME = "quantization"
SETTINGS = {"w4a4": (4, 4), "w2a4": (2, 4)}
METHODS = ("fp", "rtn", "base", "metaaug")


def _config(method: str, bits: tuple[int, int], args: Any, margin: float, seed: int):
    return MetaAugConfig(
        method=method,
        weight_bits=bits[0],
        activation_bits=bits[1],
        quantize_first_layer_input=False,
        iterations=args.iterations,
        meta_iterations=args.meta_iterations,
        margin=margin,
        seed=seed,
    )


def run_seed(seed: int, args: Any) -> tuple[dict, dict]:
    """Accuracies ``{method: {setting: (calib, heldout)}}`` and times ``{setting: {method: s}}``."""
    data = digits_tensors(seed)
    train_x, train_y = data["train"]
    test_x, test_y = data["test"]
    fp = train_digits_cnn(train_x, train_y, seed=seed, epochs=args.epochs)
    pick = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    pick = pick[: args.num_calibration]
    calib_x, calib_y = train_x[pick], train_y[pick]
    margin = 0.1 * calib_x.var().item()

    def accuracies(model):
        return (
            evaluate_accuracy(model, calib_x, calib_y),
            evaluate_accuracy(model, test_x, test_y),
        )

    acc: dict[str, dict[str, tuple[float, float]]] = {m: {} for m in METHODS}
    times: dict[str, dict[str, float]] = {}
    for setting, bits in SETTINGS.items():
        acc["fp"][setting] = accuracies(fp)
        rtn = quantize_model_rtn(
            copy.deepcopy(fp), _config("qdrop", bits, args, margin, seed), calib_x
        )
        acc["rtn"][setting] = accuracies(rtn)
        times[setting] = {}
        for name, method in (("base", "qdrop"), ("metaaug", "metaaug")):
            model = copy.deepcopy(fp)
            start = time.perf_counter()
            reconstruct_model(
                model, calib_x, _config(method, bits, args, margin, seed), progress=False
            )
            times[setting][name] = time.perf_counter() - start
            acc[name][setting] = accuracies(model)
        print(
            f"seed {seed} {setting}: "
            + ", ".join(f"{m} {acc[m][setting][0]:.1f}/{acc[m][setting][1]:.1f}" for m in METHODS)
            + f" (calib/held-out); time base {times[setting]['base']:.1f}s, "
            f"metaaug {times[setting]['metaaug']:.1f}s",
            flush=True,
        )
    return acc, times


def plot(metrics: dict, results_dir) -> None:
    plt = get_pyplot()
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(6.5 * len(SETTINGS), 3.8))
    for ax, setting in zip(np.atleast_1d(axes), SETTINGS, strict=True):
        pos = np.arange(len(METHODS))
        for offset, (key, label) in enumerate(
            (("calib_acc", "calibration"), ("heldout_acc", "held-out"))
        ):
            means = [metrics[m][setting][key] for m in METHODS]
            stds = [metrics[m][setting][f"{key}_std"] for m in METHODS]
            ax.bar(pos + (offset - 0.5) * 0.38, means, 0.38, yerr=stds, label=label, capsize=3)
        ax.set_xticks(pos, METHODS)
        low = min(metrics[m][setting]["heldout_acc"] for m in METHODS)
        ax.set_ylim(max(0.0, low - 10), 100.5)
        ax.set_title(f"{setting.upper()}: 128 calibration images, mean ± std over seeds")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.legend(loc="lower left")
    save_plot(fig, NAME, results_dir)


def main(argv: list[str] | None = None) -> BenchmarkReport:
    with torch_threads(1):  # tiny models: extra threads only wait for a busy core here
        return _main(argv)


def _main(argv: list[str] | None = None) -> BenchmarkReport:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-calibration", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=200, help="reconstruction steps/block")
    parser.add_argument("--meta-iterations", type=int, default=40, help="MetaAug steps per block")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of the float CNN")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.iterations, args.meta_iterations, args.epochs = [0], 5, 2, 1
    runs = [run_seed(seed, args) for seed in args.seeds]
    metrics: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in METHODS}
    for method in METHODS:
        for setting in SETTINGS:
            calib = [run[0][method][setting][0] for run in runs]
            held = [run[0][method][setting][1] for run in runs]
            gaps = [c - h for c, h in zip(calib, held, strict=True)]
            entry: dict[str, Any] = {}
            for key, values in (("calib_acc", calib), ("heldout_acc", held), ("gap", gaps)):
                mean, std = mean_std(values)
                entry[key], entry[f"{key}_std"], entry[f"{key}_seeds"] = mean, std, values
            metrics[method][setting] = entry
    ratios_per_run = [run[1][s]["metaaug"] / run[1][s]["base"] for run in runs for s in SETTINGS]
    ratios = {"metaaug_calib_time_vs_base": float(np.mean(ratios_per_run))}
    claims = {}
    for setting in SETTINGS:
        base, meta = metrics["base"][setting], metrics["metaaug"][setting]
        claims[setting] = {
            "metaaug_heldout_ge_base": meta["heldout_acc"] >= base["heldout_acc"],
            "metaaug_gap_smaller": meta["gap"] < base["gap"],
        }
    report = BenchmarkReport(
        name=NAME,
        metrics=metrics,
        ratios=ratios,
        config={
            "seeds": args.seeds,
            "num_calibration": args.num_calibration,
            "iterations_per_block": args.iterations,
            "meta_iterations_per_block": args.meta_iterations,
            "fp_epochs": args.epochs,
            "model": "DigitsResNet(width=16): conv1, layer1, layer2 (BasicBlocks), fc",
            "first_last": "first layer W8 on the float image, last layer W8A8",
            "defaults": MetaAugConfig().to_dict(),
            "claims": claims,
            "quick": args.quick,
            "time_ratio_per_run": ratios_per_run,
        },
        notes=(
            "accuracies in %, mean over seeds (std ddof=1, per-seed values alongside); gap = "
            "calib_acc - heldout_acc; timings from one process on a shared, loaded CPU"
        ),
    )
    if not args.quick or args.results_dir != RESULTS_DIR:  # a quick run keeps the real results
        report.write(args.results_dir)
        plot(metrics, args.results_dir)
    print(f"== {NAME} == (calibration / held-out accuracy, %, mean ± std over seeds)")
    for method in METHODS:
        cells = [
            f"{s}: {metrics[method][s]['calib_acc']:.2f}/{metrics[method][s]['heldout_acc']:.2f}"
            f" ± {metrics[method][s]['heldout_acc_std']:.2f} (gap {metrics[method][s]['gap']:.2f})"
            for s in SETTINGS
        ]
        print(f"{method:8s} " + "  ".join(cells))
    print(f"ratio metaaug_calib_time_vs_base: {ratios['metaaug_calib_time_vs_base']:.3f}")
    print(f"claims: {claims}")
    return report


if __name__ == "__main__":
    main()
