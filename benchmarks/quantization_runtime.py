"""Integer execution of the quantized CNN: ONNX Runtime's int kernels against the float model.

Issue 24, last Build item: what the quantized model gains in a standard runtime. The export is
:func:`hf_extensions.quantization.onnx_export.export_onnx` (QDQ graph with the model's own
integers and scales; ONNX Runtime fuses it into QLinearConv kernels).

Protocol (committed before the full run; 2026-12-08):

* Model: the zoo's ``resnet20`` (ResNet-20-style CNN, 40 fine hard-digit classes, 32x32 RGB).
* Data: per seed s in 0..4, 128 calibration images rendered from the ``train`` sources
  (all six styles, the four inks, seed ``100 + s``); the test set is the zoo's held-out one,
  2000 images of the unseen ``test`` sources (seed 2026), the same for every seed.
* Quantized model per seed: round-to-nearest PTQ (:func:`quantize_model_rtn`: Lp grid-searched
  per-channel weight and per-tensor input scales on the seed's calibration images), first and
  last layer 8-bit, first-layer input in float (the spec's convention). Settings: ``w4a8``
  (primary: 4-bit weights in 8-bit containers, 8-bit activations) and ``w8a8``. No tuning, so
  no grid: every arm runs the same model.
* Arms: ``ort_int`` (the exported integer graph, ONNX Runtime CPU, 1 thread, all graph
  optimisations), ``ort_float`` (the float model exported by ``torch.onnx``, same runtime and
  settings: the baseline), ``torch_float`` (the float model in PyTorch, 1 thread), and
  ``fake_quant`` (the quantized model in PyTorch, the accuracy reference).
* Latency: :func:`benchmarks.harness.compare` with ``ort_float`` as baseline, interleaved
  rounds, 5 warm-up and 30 timed rounds, median seconds per call; batch 64 (primary) and batch 1
  (20 calls per sample); the same test images. Per seed one ratio ``median(ort_int) /
  median(ort_float)``.
* Size: bytes of the ``.onnx`` files, int over float.
* Accuracy: top-1 on the 2000 test images of ``ort_int`` minus that of ``fake_quant``, in
  percentage points, per seed; plus top-1 agreement of the two and the mean absolute logit
  difference over the logits' standard deviation.
* Tests (paired over the 5 seeds, 95% t-interval, :func:`benchmarks.protocol.paired_interval`):
  (1) accuracy: ``ort_int - fake_quant``; claimed: the interval lies inside [-0.5, +0.5] pp
  (the stated tolerance: ONNX Runtime's int32 bias rounding is the only departure, see the
  export's docstring); (2) latency: ``log(ort_int) - log(ort_float)`` per seed at batch 64;
  claimed direction: int faster (interval below 0). Reported either way.
* Outputs: ``benchmarks/results/quantization_runtime.json`` / ``.png`` (this run's full report)
  and, merged into ``benchmarks/results/quantization.json`` by :func:`merge_into_quantization`
  (read, replace only our keys, atomic write): ``ratios.int_vs_float_latency`` (mean over seeds
  of the per-seed batch-64 ratio at w4a8), ``ratios.int_vs_float_size`` (w4a8),
  ``metrics.onnx_int`` / ``metrics.onnx_float``, ``intervals.onnx_int_vs_fake_quant_accuracy``,
  ``config.onnx_export``.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.quantization_runtime`` (a few minutes on one
core); ``--quick`` for a smoke run (2 seeds, fewer rounds; it does not touch
``quantization.json``). Re-merge a finished report: ``python -m benchmarks.quantization_runtime
--merge-only``.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import (
    RESULTS_DIR,
    BenchmarkReport,
    compare,
    get_pyplot,
    make_parser,
    save_plot,
    torch_threads,
)
from hf_extensions.atomic import atomic_write_text

NAME = "quantization_runtime"
TARGET = "quantization"
SETTINGS = {"w4a8": (4, 8), "w8a8": (8, 8)}
PRIMARY = "w4a8"
COLOURS = ("red", "green", "blue", "yellow")
SEEDS = (0, 1, 2, 3, 4)
NUM_CALIBRATION = 128
TEST_IMAGES = 2000
TEST_SEED = 2026
BATCHES = {"b64": (64, 1), "b1": (1, 20)}  # name: (batch size, calls per timing sample)
TOLERANCE_PP = 0.5


def _images(num: int, split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from hf_extensions.data.hard_digits import STYLES, render_hard_digits

    batch = render_hard_digits(num, split=split, styles=tuple(STYLES), colours=COLOURS, seed=seed)
    return batch.images, batch.fine


def _float_model():
    from transformers import ResNetForImageClassification

    from hf_extensions.zoo import fixture_path

    return ResNetForImageClassification.from_pretrained(
        fixture_path("resnet20"), dtype=torch.float32
    ).eval()


def _torch_logits(model, images: torch.Tensor, batch: int = 250) -> np.ndarray:
    with torch.no_grad():
        return torch.cat(
            [model(images[i : i + batch]).logits for i in range(0, len(images), batch)]
        )


def run_seed(seed: int, bits: tuple[int, int], args: Any, folder: Path) -> dict[str, float]:
    """One seed and setting: accuracies, agreement, sizes and latency ratios."""
    from hf_extensions.quantization import MetaAugConfig, quantize_model_rtn
    from hf_extensions.quantization.onnx_export import (
        export_float_onnx,
        export_onnx,
        integer_op_counts,
        load_onnx,
    )

    test_x, test_y = _images(args.test_images, "test", TEST_SEED)
    calib_x, _ = _images(NUM_CALIBRATION, "train", 100 + seed)
    float_model = _float_model()
    config = MetaAugConfig(
        weight_bits=bits[0], activation_bits=bits[1], quantize_first_layer_input=False
    )
    quantized = quantize_model_rtn(copy.deepcopy(float_model), config, calib_x)
    int_path = export_onnx(quantized, calib_x[:2], folder / f"int_{seed}.onnx")
    float_path = export_float_onnx(float_model, calib_x[:2], folder / "float.onnx")
    ort_int, ort_float = load_onnx(int_path), load_onnx(float_path)

    fake = _torch_logits(quantized, test_x).numpy()
    onnx_int = np.concatenate([ort_int(test_x[i : i + 250]) for i in range(0, len(test_x), 250)])
    labels = test_y.numpy()
    out = {
        "fake_quant_accuracy": 100 * float((fake.argmax(1) == labels).mean()),
        "int_accuracy": 100 * float((onnx_int.argmax(1) == labels).mean()),
        "agreement": 100 * float((fake.argmax(1) == onnx_int.argmax(1)).mean()),
        "logit_diff_rel": float(np.abs(onnx_int - fake).mean() / fake.std()),
        "int_bytes": int_path.stat().st_size,
        "float_bytes": float_path.stat().st_size,
        "integer_kernels": sum(
            n for op, n in integer_op_counts(int_path).items() if op.startswith("QLinear")
        ),
        "float_layers": ort_int.float_layers,
    }
    out["accuracy_diff_pp"] = out["int_accuracy"] - out["fake_quant_accuracy"]
    for name, (size, number) in BATCHES.items():
        x_torch = test_x[:size]
        x = x_torch.numpy()
        with torch.no_grad():
            timing = compare(
                lambda x=x: ort_float(x),
                {
                    "ort_int": lambda x=x: ort_int(x),
                    "torch_float": lambda x=x_torch: float_model(x),
                },
                warmup=args.warmup,
                repeats=args.repeats,
                number=number,
            )
        out[f"ort_float_ms_{name}"] = timing["baseline"].median * 1e3
        for arm, result in timing["candidates"].items():
            out[f"{arm}_ms_{name}"] = result.median * 1e3
            out[f"{arm}_vs_ort_float_{name}"] = timing["ratios"][arm]
    return out


def _per_seed(runs: list[dict], key: str) -> list[float]:
    return [float(run[key]) for run in runs]


def build_report(results: dict[str, list[dict]], args: Any) -> BenchmarkReport:
    from benchmarks.protocol import paired_interval  # (scipy: imported when a report is built)

    metrics: dict[str, dict[str, Any]] = {}
    intervals: dict[str, dict[str, Any]] = {}
    for setting, runs in results.items():
        metrics[f"ort_int_{setting}"] = {
            key: _per_seed(runs, key)
            for key in (
                "int_accuracy",
                "accuracy_diff_pp",
                "agreement",
                "logit_diff_rel",
                "int_bytes",
                "integer_kernels",
                "float_layers",
                *(f"ort_int_ms_{b}" for b in BATCHES),
                *(f"ort_int_vs_ort_float_{b}" for b in BATCHES),
            )
        }
        metrics[f"fake_quant_{setting}"] = {"accuracy": _per_seed(runs, "fake_quant_accuracy")}
        if len(runs) > 1:
            intervals[f"{setting}_int_minus_fake_quant_accuracy_pp"] = paired_interval(
                _per_seed(runs, "int_accuracy"), _per_seed(runs, "fake_quant_accuracy")
            ).to_dict()
            intervals[f"{setting}_log_latency_int_minus_float_b64"] = paired_interval(
                np.log(_per_seed(runs, "ort_int_ms_b64")),
                np.log(_per_seed(runs, "ort_float_ms_b64")),
            ).to_dict()
    first = results[PRIMARY]
    metrics["ort_float"] = {
        "float_bytes": first[0]["float_bytes"],
        **{f"ort_float_ms_{b}": _per_seed(first, f"ort_float_ms_{b}") for b in BATCHES},
    }
    metrics["torch_float"] = {
        f"torch_float_vs_ort_float_{b}": _per_seed(first, f"torch_float_vs_ort_float_{b}")
        for b in BATCHES
    }
    ratios = {
        "int_vs_float_latency": float(np.mean(_per_seed(first, "ort_int_vs_ort_float_b64"))),
        "int_vs_float_latency_b1": float(np.mean(_per_seed(first, "ort_int_vs_ort_float_b1"))),
        "int_vs_float_size": float(first[0]["int_bytes"] / first[0]["float_bytes"]),
        "int_vs_torch_float_latency": float(
            np.mean(
                [r["ort_int_ms_b64"] / r["torch_float_ms_b64"] for r in first]  # same run
            )
        ),
    }
    import onnxruntime

    config = {
        "model": "zoo/resnet20",
        "settings": {k: list(v) for k, v in SETTINGS.items()},
        "primary": PRIMARY,
        "seeds": list(args.seeds),
        "num_calibration": NUM_CALIBRATION,
        "test_images": args.test_images,
        "batches": {k: list(v) for k, v in BATCHES.items()},
        "warmup": args.warmup,
        "repeats": args.repeats,
        "tolerance_pp": TOLERANCE_PP,
        "onnxruntime": onnxruntime.__version__,
        "quick": args.quick,
    }
    notes = (
        "latency ratios: ONNX Runtime int graph over ONNX Runtime float graph, medians of "
        "interleaved samples in one process, 1 thread, batch 64 (b1: batch 1); accuracy in %, "
        "diff = int - fake_quant in percentage points; bytes of the .onnx files"
    )
    return BenchmarkReport(
        name=NAME,
        metrics=metrics,
        ratios=ratios,
        config=config,
        notes=notes,
        protocol=__doc__,
        intervals=intervals,
    )


def merge_into_quantization(report: dict[str, Any], results_dir: str | Path = RESULTS_DIR) -> Path:
    """Read ``<results_dir>/quantization.json``, set this benchmark's keys from ``report`` (the
    ``quantization_runtime.json`` document), keep every other key, and write it atomically.

    Keys written: ``ratios.int_vs_float_latency``, ``ratios.int_vs_float_size``,
    ``metrics.onnx_int``, ``metrics.onnx_float``, ``intervals.onnx_int_vs_fake_quant_accuracy``,
    ``intervals.onnx_int_vs_float_log_latency_b64``, ``config.onnx_export``. Safe to re-run after another writer rewrote the file.
    """
    path = Path(results_dir) / f"{TARGET}.json"
    document = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    primary = report["config"]["primary"]
    int_metrics = report["metrics"][f"ort_int_{primary}"]
    document.setdefault("ratios", {})["int_vs_float_latency"] = report["ratios"][
        "int_vs_float_latency"
    ]
    document["ratios"]["int_vs_float_size"] = report["ratios"]["int_vs_float_size"]
    document.setdefault("metrics", {})["onnx_int"] = {
        "setting": primary,
        "accuracy": int_metrics["int_accuracy"],
        "accuracy_diff_vs_fake_quant_pp": int_metrics["accuracy_diff_pp"],
        "agreement_with_fake_quant": int_metrics["agreement"],
        "latency_ratio_vs_onnx_float_b64": int_metrics["ort_int_vs_ort_float_b64"],
        "latency_ratio_vs_onnx_float_b1": int_metrics["ort_int_vs_ort_float_b1"],
        "bytes": int_metrics["int_bytes"],
    }
    document["metrics"]["onnx_float"] = {"bytes": report["metrics"]["ort_float"]["float_bytes"]}
    for ours, theirs in (
        ("onnx_int_vs_fake_quant_accuracy", f"{primary}_int_minus_fake_quant_accuracy_pp"),
        ("onnx_int_vs_float_log_latency_b64", f"{primary}_log_latency_int_minus_float_b64"),
    ):
        if theirs in report.get("intervals", {}):
            document.setdefault("intervals", {})[ours] = report["intervals"][theirs]
    document.setdefault("config", {})["onnx_export"] = {
        "source": f"benchmarks/{NAME}.py (full report: benchmarks/results/{NAME}.json)",
        "setting": primary,
        "runtime": f"onnxruntime {report['config']['onnxruntime']}, CPU, 1 thread",
        "tolerance_pp": report["config"]["tolerance_pp"],
    }
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


def _plot(report: BenchmarkReport, results_dir: Path) -> None:
    plt = get_pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    settings = list(SETTINGS)
    for offset, batch in enumerate(BATCHES):
        values = [
            np.mean(report.metrics[f"ort_int_{s}"][f"ort_int_vs_ort_float_{batch}"])
            for s in settings
        ]
        left.bar(np.arange(len(settings)) + 0.4 * offset, values, width=0.4, label=batch)
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_xticks(np.arange(len(settings)) + 0.2, settings)
    left.set_ylabel("latency: ORT int / ORT float")
    left.legend()
    diffs = [report.metrics[f"ort_int_{s}"]["accuracy_diff_pp"] for s in settings]
    right.boxplot(diffs)
    right.set_xticks(range(1, len(settings) + 1), settings)
    for bound in (-TOLERANCE_PP, TOLERANCE_PP):
        right.axhline(bound, color="grey", linestyle="--", linewidth=0.8)
    right.set_ylabel("top-1: ORT int - fake quant (pp)")
    fig.suptitle("zoo/resnet20 quantized (RTN), ONNX Runtime CPU, 1 thread")
    save_plot(fig, NAME, results_dir)


def main(argv: list[str] | None = None) -> BenchmarkReport | None:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 500 images, 5 rounds")
    parser.add_argument("--merge-only", action="store_true", help="re-merge the saved report")
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir)
    if args.merge_only:
        report = json.loads((results_dir / f"{NAME}.json").read_text(encoding="utf-8"))
        print(merge_into_quantization(report, results_dir))
        return None
    args.seeds = SEEDS[:2] if args.quick else SEEDS
    args.test_images = 500 if args.quick else TEST_IMAGES
    args.warmup, args.repeats = (1, 5) if args.quick else (5, 30)
    results: dict[str, list[dict]] = {setting: [] for setting in SETTINGS}
    with torch_threads(1), tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            for setting, bits in SETTINGS.items():
                run = run_seed(seed, bits, args, Path(folder))
                results[setting].append(run)
                print(
                    f"seed {seed} {setting}: " + ", ".join(f"{k}={v:.4g}" for k, v in run.items())
                )
    report = build_report(results, args)
    report.print_table()
    if args.quick:
        return report
    report.write(results_dir)
    _plot(report, results_dir)
    merge_into_quantization(report.to_dict(), results_dir)
    return report


if __name__ == "__main__":
    main()
