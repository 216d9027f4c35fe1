"""Cost of one stock ``transformers.Trainer`` optimizer step against a plain PyTorch step.

Every Trainer-subclass method of the project is compared against the stock ``Trainer`` step; this
benchmark measures what that step itself costs over the bare minimum (forward, backward, AdamW
step, zero_grad) on the same small model and batch: a 64 -> 256 -> 10 MLP on scikit-learn's
digits, batch 64, on the CPU. The two paths are timed interleaved in one process, and the result
is the ratio Trainer / plain of their median step times.

A sanity check, not a timing: from the same initial weights and with plain SGD, both paths must
reach the same loss after the same batches (Trainer adds bookkeeping, not arithmetic).

Run: ``python -m benchmarks.trainer_overhead``.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import torch
import transformers
from torch import nn
from transformers import Trainer, TrainingArguments

from benchmarks.harness import (
    BenchmarkReport,
    TimingResult,
    compare,
    get_pyplot,
    make_parser,
    quiet_training_arguments,
    save_plot,
    torch_threads,
    trainer_step_fn,
)
from hf_extensions.data import load_digits
from hf_extensions.models import MLPClassifier, tiny_mlp_classifier

NAME = "trainer_overhead"
BATCH_SIZE = 64


def digits_mlp(seed: int = 0) -> MLPClassifier:
    """64 -> 256 -> 10 classifier returning ``{"loss", "logits"}`` as Trainer expects."""
    return tiny_mlp_classifier(hidden_sizes=(256,), seed=seed)


def digits_batches(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` consecutive training batches of ``BATCH_SIZE`` (wrapping around the split)."""
    train = load_digits(seed=seed, layout="vector")["train"]
    columns = train.with_format("torch", columns=["features", "labels"])[:]
    features, labels = columns["features"].float(), columns["labels"].long()
    batches = []
    for index in range(count):
        rows = torch.arange(index * BATCH_SIZE, (index + 1) * BATCH_SIZE) % len(labels)
        batches.append({"features": features[rows], "labels": labels[rows]})
    return batches


def make_trainer(model: nn.Module, output_dir: str, **overrides: Any) -> Trainer:
    """A stock Trainer on the CPU that logs, saves and reports nothing."""
    overrides.setdefault("per_device_train_batch_size", BATCH_SIZE)
    args = TrainingArguments(**quiet_training_arguments(output_dir, **overrides))
    return Trainer(model=model, args=args)


def plain_step_fn(model: nn.Module, optimizer: torch.optim.Optimizer):
    """The bare minimum step: forward, backward, optimizer step, zero_grad."""

    def step(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        model.train()
        loss = model(**inputs)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step


def sgd_losses(seed: int, steps: int, lr: float, output_dir: str) -> tuple[float, float]:
    """Loss on the last of ``steps`` SGD steps, plain loop vs Trainer, from the same init."""
    plain_model = digits_mlp(seed)
    trainer_model = copy.deepcopy(plain_model)
    batches = digits_batches(seed, steps)
    plain = plain_step_fn(plain_model, torch.optim.SGD(plain_model.parameters(), lr=lr))
    trainer = make_trainer(
        trainer_model,
        output_dir,
        optim="sgd",
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
    )
    via_trainer = trainer_step_fn(trainer, num_training_steps=steps)
    plain_loss = trainer_loss = torch.tensor(float("nan"))
    for batch in batches:
        plain_loss, trainer_loss = plain(batch), via_trainer(batch)
    return float(plain_loss), float(trainer_loss)


def plot(report: BenchmarkReport, timings: dict[str, TimingResult], results_dir) -> None:
    """Bar chart of the median step times, error bars from the first to the third quartile."""
    try:
        plt = get_pyplot()
    except ImportError as error:
        print(f"no plot: {error}")
        return
    names = list(timings)
    medians = [timings[n].median * 1e3 for n in names]
    spread = [
        [(timings[n].median - timings[n].q1) * 1e3 for n in names],
        [(timings[n].q3 - timings[n].median) * 1e3 for n in names],
    ]
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(names, medians, yerr=spread, capsize=4, color=["#4c72b0", "#dd8452"])
    ax.set_ylabel("median time per optimizer step (ms)")
    ratio = report.ratios["trainer/plain"]
    ax.set_title(f"MLP 64-256-10, batch {BATCH_SIZE}: Trainer/plain = {ratio:.2f}", fontsize=9)
    machine = report.machine
    ax.set_xlabel(
        f"{machine['cpu_model'] or machine['processor']}, {machine['torch_threads']} thread(s); "
        "bars: quartiles",
        fontsize=7,
    )
    print(f"wrote {save_plot(fig, NAME, results_dir)}")


def main(argv: list[str] | None = None) -> BenchmarkReport:
    """Time both step paths interleaved, check SGD equivalence, print, write JSON and PNG."""
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40, help="timed samples per path")
    parser.add_argument("--warmup", type=int, default=5, help="untimed samples per path")
    parser.add_argument("--number", type=int, default=20, help="optimizer steps per sample")
    parser.add_argument("--sanity-steps", type=int, default=20, help="SGD steps of the check")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="check seeds")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0: leave as is)"
    )
    args = parser.parse_args(argv)
    # A 64x256 matmul gains nothing from intra-op threads, and on a shared small machine a
    # second thread waiting for a busy core only adds noise to what is measured: Python-side
    # overhead per step.
    with torch_threads(args.threads):
        return _run(args)


def _run(args) -> BenchmarkReport:
    """The body of :func:`main` once options are parsed and threads set."""
    with tempfile.TemporaryDirectory() as output_dir:
        torch.manual_seed(0)
        plain_model = digits_mlp()
        trainer_model = copy.deepcopy(plain_model)
        (batch,) = digits_batches(seed=0, count=1)
        trainer = make_trainer(trainer_model, output_dir, max_grad_norm=0.0)
        total_steps = (args.warmup + args.repeats) * args.number + 1
        trainer_step = trainer_step_fn(trainer, num_training_steps=total_steps)
        # The same AdamW the Trainer built (its default optimizer), over one parameter group.
        t_args = trainer.args
        optimizer = torch.optim.AdamW(
            plain_model.parameters(),
            lr=t_args.learning_rate,
            betas=(t_args.adam_beta1, t_args.adam_beta2),
            eps=t_args.adam_epsilon,
            weight_decay=t_args.weight_decay,
            fused=t_args.optim == "adamw_torch_fused",
        )
        plain_step = plain_step_fn(plain_model, optimizer)
        timing = compare(
            lambda: plain_step(batch),
            {"trainer": lambda: trainer_step(batch)},
            warmup=args.warmup,
            repeats=args.repeats,
            number=args.number,
        )
        losses = [sgd_losses(s, args.sanity_steps, 0.1, output_dir) for s in args.seeds]

    plain_losses = [plain for plain, _ in losses]
    trainer_losses = [via_trainer for _, via_trainer in losses]
    sanity_key = f"sgd_loss_after_{args.sanity_steps}"
    metrics = {
        "plain": {**timing["baseline"].metrics(prefix="step_"), sanity_key: plain_losses},
        "trainer": {
            **timing["candidates"]["trainer"].metrics(prefix="step_"),
            sanity_key: trainer_losses,
        },
    }
    max_diff = max(abs(p - t) for p, t in losses)
    metrics["trainer"]["sgd_loss_max_abs_diff"] = max_diff
    report = BenchmarkReport(
        name=NAME,
        metrics=metrics,
        ratios={"trainer/plain": timing["ratios"]["trainer"]},
        config={
            "model": "MLP 64-256-10 (ReLU)",
            "data": "hf_extensions.data.load_digits(seed=0, layout='vector'), train split",
            "batch_size": BATCH_SIZE,
            "optimizer": t_args.optim,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "steps_per_sample": args.number,
            "sanity": {"optimizer": "sgd", "lr": 0.1, "steps": args.sanity_steps},
            "seeds": args.seeds,
            "transformers": transformers.__version__,
        },
        notes=(
            "Trainer step = training_step + optimizer.step (accelerate-wrapped) + "
            "lr_scheduler.step + model.zero_grad, max_grad_norm=0; plain step = forward, "
            "backward, AdamW step, zero_grad. Times are per optimizer step, interleaved in one "
            "process; callbacks, logging and the data loader of trainer.train() are not included."
        ),
    )
    report.print_table()
    print(f"wrote {report.write(args.results_dir)}")
    plot(report, {"plain": timing["baseline"], **timing["candidates"]}, args.results_dir)
    if max_diff > 1e-5:
        raise AssertionError(f"plain and Trainer SGD losses differ by {max_diff:.3g}: {losses}")
    return report


if __name__ == "__main__":
    main()
