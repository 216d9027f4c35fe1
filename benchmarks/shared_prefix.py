"""Shared-structure prefix tuning: sample efficiency (vs non-shared, LoRA, full FT) and cost.

Le et al., "Revisiting Prefix-tuning: Statistical Benefits of Reparameterization among Prompts",
ICLR 2025 (arXiv 2410.02200), claim that tying each prefix key to its value through a shared
latent (the reparameterisation) makes prefix tuning more sample efficient. Three measurements,
all through ``get_peft_model(model, SharedPrefixTuningConfig(...))`` on ``transformers`` models:

1. **Synthetic MoE task** (the setting of the paper's theory). A frozen random one-layer BERT
   reads one input vector; a *teacher* adapter's prefix keys/values come from a 2-dimensional
   latent per pair through a small MLP (``per_layer_mlp`` with ``latent_dim=2, hidden_size=16``),
   scaled so that prefix keys have the norm of the model's own keys. Students ``share="none"``
   and ``share="per_layer_mlp"`` (default sizes: they do not know the teacher's latent size)
   are fitted by full-batch Adam on ``n`` noisy examples; the score is test MSE against the
   teacher's clean outputs, per seed. Learning rates follow the paper's rule (the shared variant
   uses half the non-shared one); nothing was tuned on the outcome.
2. **Digits transfer** (real data, embedded). A tiny ViT pretrained from scratch on digits 0-4 is
   frozen and adapted to digits 5-9 from ``n`` examples: prefixes ``none`` / ``per_layer_mlp`` /
   ``global_mlp``, LoRA (r=4 on q, v) and full fine-tuning; test accuracy per seed.
3. **Cost.** Inference of the materialised adapter against plain prefix tuning (``share="none"``),
   and the training-step overhead of the reparameterisation, timed interleaved (``compare``).

Run: ``python -m benchmarks.shared_prefix`` (writes ``benchmarks/results/shared_prefix.json`` and
``.png``; several minutes on one CPU thread); ``--quick`` is a smoke run of seconds.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel

import peft_configs  # noqa: F401  (registers the PEFT method)
from benchmarks.harness import (
    BenchmarkReport,
    compare,
    get_pyplot,
    make_parser,
    mean_std,
    save_plot,
    torch_threads,
)
from hf_extensions.data import load_digits
from hf_extensions.models import tiny_vit_classifier
from peft_configs import SharedPrefixTuningConfig
from peft_configs.shared_prefix import SharedPrefixLayer

NAME = "shared_prefix"
SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
DIGITS_METHODS = ("none", "per_layer_mlp", "global_mlp", "lora", "full")
#: Learning rates fixed before any run: prefix 1e-2, shared prefix half of it (the paper's rule),
#: LoRA 5e-3, full fine-tuning 1e-3 (AdamW, cosine schedule).
DIGITS_LR = {"none": 1e-2, "per_layer_mlp": 5e-3, "global_mlp": 5e-3, "lora": 5e-3, "full": 1e-3}
SYNTHETIC_LR = {"none": 1e-2, "per_layer_mlp": 5e-3}
VIT = {
    "image_size": 16,
    "patch_size": 4,
    "hidden_size": 64,
    "num_layers": 4,
    "intermediate_size": 128,
}


# ----------------------------------------------------------------------------- synthetic task

SYN_WIDTH, SYN_HEADS, SYN_PAIRS, SYN_LATENT, SYN_NOISE = 32, 4, 8, 2, 0.1


def _frozen_attention_model() -> BertModel:
    """One BERT layer whose projections keep the input's scale (init std 1/sqrt(width))."""
    config = BertConfig(
        vocab_size=8,
        hidden_size=SYN_WIDTH,
        num_hidden_layers=1,
        num_attention_heads=SYN_HEADS,
        intermediate_size=2 * SYN_WIDTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=SYN_WIDTH**-0.5,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertModel(config, add_pooling_layer=False).eval()


def _prefix_layers(model) -> list[SharedPrefixLayer]:
    return [m for m in model.modules() if isinstance(m, SharedPrefixLayer)]


def synthetic_teacher(seed: int):
    """Teacher prefixes from a 2-d latent per pair (a low-dimensional shared structure)."""
    torch.manual_seed(1000 + seed)
    config = SharedPrefixTuningConfig(
        share="per_layer_mlp", num_virtual_tokens=SYN_PAIRS, latent_dim=SYN_LATENT, hidden_size=16
    )
    teacher = get_peft_model(_frozen_attention_model(), config).eval()
    with torch.no_grad():
        for layer in _prefix_layers(teacher):
            layer.shared_prefix_latent["default"].normal_(0.0, 1.0)
            layer.shared_prefix_up["default"].weight.normal_(0.0, 1.5)
            layer.shared_prefix_down["default"].weight.normal_(0.0, 16**-0.5)
    return teacher


def synthetic_data(teacher, n: int, seed: int, noise: float):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 1, SYN_WIDTH, generator=generator)
    with torch.no_grad():
        clean = teacher(inputs_embeds=inputs).last_hidden_state[:, 0]
    return inputs, clean + noise * torch.randn(clean.shape, generator=generator), clean


def synthetic_fit_mse(share: str, data, test, seed: int, steps: int) -> float:
    """Fit a student prefix by full-batch Adam; test MSE against the teacher's clean outputs."""
    torch.manual_seed(seed)
    student = get_peft_model(
        _frozen_attention_model(),
        SharedPrefixTuningConfig(share=share, num_virtual_tokens=SYN_PAIRS),
    )
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=SYNTHETIC_LR[share])
    inputs, targets, _ = data
    for _ in range(steps):
        loss = F.mse_loss(student(inputs_embeds=inputs).last_hidden_state[:, 0], targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_inputs, _, test_clean = test
    with torch.no_grad():
        return F.mse_loss(
            student(inputs_embeds=test_inputs).last_hidden_state[:, 0], test_clean
        ).item()


def run_synthetic(sizes, seeds, steps, test_size=2000) -> dict[str, dict[str, list[float]]]:
    """``{share: {n: [test MSE per seed]}}``."""
    results = {share: {n: [] for n in sizes} for share in SYNTHETIC_LR}
    for seed in seeds:
        teacher = synthetic_teacher(seed)
        test = synthetic_data(teacher, test_size, 10_000 + seed, SYN_NOISE)
        for n in sizes:
            data = synthetic_data(teacher, n, seed, SYN_NOISE)
            for share in SYNTHETIC_LR:
                results[share][n].append(synthetic_fit_mse(share, data, test, seed, steps))
        print(f"synthetic seed {seed}: " + ", ".join(
            f"n={n} none {results['none'][n][-1]:.4f} shared {results['per_layer_mlp'][n][-1]:.4f}"
            for n in sizes
        ), flush=True)  # fmt: skip
    return results


# ----------------------------------------------------------------------------- digits transfer


def digits_arrays(classes, split_seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{split: (pixels [N,1,16,16], labels relabelled 0..4)}`` of the given digits."""
    data = load_digits(split_seed, image_size=VIT["image_size"])
    arrays = {}
    for split in ("train", "test"):
        pixels = np.asarray(data[split]["pixel_values"], dtype=np.float32)
        labels = np.asarray(data[split]["labels"])
        keep = np.isin(labels, classes)
        relabel = np.searchsorted(np.asarray(classes), labels[keep])
        arrays[split] = (torch.as_tensor(pixels[keep]), torch.as_tensor(relabel))
    return arrays


def train_steps(model, parameters, pixels, labels, *, steps, lr, seed, batch_size=32) -> None:
    """AdamW with a cosine schedule for ``steps`` mini-batch steps (reshuffled every epoch)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    model.train()
    done = 0
    while done < steps:
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            rows = order[start : start + batch_size]
            loss = F.cross_entropy(model(pixel_values=pixels[rows]).logits, labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
            if done == steps:
                break
    model.eval()


def pretrained_backbone(source, epochs: int):
    """The frozen backbone: a tiny ViT trained from scratch on digits 0-4 (seed 0)."""
    model = tiny_vit_classifier(num_labels=len(SOURCE), seed=0, **VIT)
    pixels, labels = source["train"]
    steps = epochs * -(-len(labels) // 32)
    train_steps(model, list(model.parameters()), pixels, labels, steps=steps, lr=2e-3, seed=0)
    with torch.no_grad():
        accuracy = (
            (model(pixel_values=source["test"][0]).logits.argmax(-1) == source["test"][1])
            .float()
            .mean()
        )
    return model, float(accuracy)


def adapted_model(backbone, method: str, seed: int):
    """The backbone with a fresh 5-way head, wrapped for ``method``; and its trainable params."""
    model = copy.deepcopy(backbone)
    torch.manual_seed(seed)
    model.classifier = torch.nn.Linear(model.classifier.in_features, len(TARGET))
    if method == "full":
        model.requires_grad_(True)  # the backbone was frozen for the adapters
        return model, list(model.parameters())
    if method == "lora":
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]
        )
    else:
        config = SharedPrefixTuningConfig(
            share=method, num_virtual_tokens=5, modules_to_save=["classifier"]
        )
    model = get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def digits_steps(n: int, max_steps: int, max_epochs: int = 100) -> int:
    """Optimizer steps for ``n`` examples: ``max_steps``, but at most ``max_epochs`` epochs."""
    return min(max_steps, max_epochs * -(-n // 32))


def run_digits(backbone, target, sizes, seeds, max_steps):
    """``{method: {n: [test accuracy per seed]}}`` and trainable parameter counts."""
    pixels, labels = target["train"]
    test_pixels, test_labels = target["test"]
    results = {method: {n: [] for n in sizes} for method in DIGITS_METHODS}
    trainable = {}
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(labels), generator=generator)
        for n in sizes:
            rows = order[: min(n, len(labels))]
            for method in DIGITS_METHODS:
                model, parameters = adapted_model(backbone, method, seed)
                trainable[method] = sum(p.numel() for p in parameters)
                steps = digits_steps(len(rows), max_steps)
                train_steps(
                    model, parameters, pixels[rows], labels[rows],
                    steps=steps, lr=DIGITS_LR[method], seed=seed,
                )  # fmt: skip
                with torch.no_grad():
                    predicted = model(pixel_values=test_pixels).logits.argmax(-1)
                results[method][n].append(float((predicted == test_labels).float().mean()))
            print(f"digits seed {seed} n={len(rows)}: " + ", ".join(
                f"{m} {results[m][n][-1]:.3f}" for m in DIGITS_METHODS), flush=True)  # fmt: skip
    return results, trainable


# ----------------------------------------------------------------------------- cost


def run_cost(backbone, batch_size: int, repeats: int, number: int) -> dict:
    """Interleaved timings: inference (materialised vs plain prefix) and training steps."""
    pixels = torch.rand(
        batch_size,
        1,
        VIT["image_size"],
        VIT["image_size"],
        generator=torch.Generator().manual_seed(0),
    )
    labels = torch.randint(
        0, len(TARGET), (batch_size,), generator=torch.Generator().manual_seed(1)
    )
    models = {
        share: adapted_model(backbone, share, 0)[0].eval()
        for share in ("none", "per_layer_mlp", "global_mlp")
    }
    materialized = copy.deepcopy(models["per_layer_mlp"]).eval()
    materialized.materialize()
    with torch.no_grad():
        difference = (
            (
                materialized(pixel_values=pixels).logits
                - models["per_layer_mlp"](pixel_values=pixels).logits
            )
            .abs()
            .max()
        )

    def infer(model):
        def call():
            with torch.no_grad():
                model(pixel_values=pixels)

        return call

    inference = compare(
        infer(models["none"]),
        {"materialized": infer(materialized), "reparameterized": infer(models["per_layer_mlp"])},
        warmup=5, repeats=repeats, number=number,
    )  # fmt: skip

    def step(model):
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(parameters, lr=1e-3)

        def call():
            loss = F.cross_entropy(model(pixel_values=pixels).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return call

    training = compare(
        step(models["none"]),
        {"per_layer_mlp": step(models["per_layer_mlp"]), "global_mlp": step(models["global_mlp"])},
        warmup=3, repeats=repeats, number=max(1, number // 2),
    )  # fmt: skip
    return {"inference": inference, "training": training, "max_logit_difference": float(difference)}


# ----------------------------------------------------------------------------- report


def plot(report: BenchmarkReport, synthetic, digits, sizes_syn, sizes_dig, results_dir) -> None:
    try:
        plt = get_pyplot()
    except ImportError as error:
        print(f"no plot: {error}")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = {"none": "non-shared (none)", "per_layer_mlp": "shared (per_layer_mlp)"}
    for share, by_n in synthetic.items():
        stats = [mean_std(by_n[n]) for n in sizes_syn]
        left.errorbar(
            sizes_syn,
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            marker="o",
            capsize=3,
            label=labels[share],
        )
    left.set_xscale("log", base=2)
    left.set_xticks(sizes_syn, [str(n) for n in sizes_syn])
    left.minorticks_off()
    left.set_yscale("log")
    left.set_xlabel("training examples n")
    left.set_ylabel("test MSE (teacher, clean)")
    wins = report.metrics["synthetic"]["shared_wins"]
    left.set_title(
        f"synthetic MoE prefix task: shared wins {wins}/{report.metrics['synthetic']['seeds']} "
        f"seeds at n={sizes_syn[-1]}",
        fontsize=9,
    )
    left.legend(fontsize=8)
    for method, by_n in digits.items():
        stats = [mean_std(by_n[n]) for n in sizes_dig]
        right.errorbar(
            sizes_dig,
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            marker="o",
            capsize=3,
            label=method,
        )
    right.set_xscale("log")
    right.set_xticks(sizes_dig, [str(n) for n in sizes_dig])
    right.minorticks_off()
    right.set_xlabel("training examples n (digits 5-9)")
    right.set_ylabel("test accuracy")
    right.set_title("frozen tiny ViT (pretrained on digits 0-4) adapted to 5-9", fontsize=9)
    right.legend(fontsize=8)
    machine = report.machine
    fig.suptitle(
        f"shared-structure prefix tuning; {machine['cpu_model'] or machine['processor']}, "
        f"{machine['torch_threads']} thread(s)",
        fontsize=8,
    )
    print(f"wrote {save_plot(fig, NAME, results_dir)}")


def main(argv: list[str] | None = None) -> BenchmarkReport:
    """Run the three measurements, print the tables, write JSON and PNG."""
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: as is)")
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return _run(args)


def _run(args) -> BenchmarkReport:
    if args.quick:
        syn = {"sizes": [16, 64], "seeds": [0, 1], "steps": 30}
        dig = {"sizes": [25, 100], "seeds": [0], "max_steps": 20, "pretrain_epochs": 2}
        cost = {"batch_size": 16, "repeats": 5, "number": 2}
    else:
        syn = {"sizes": [32, 128, 512], "seeds": list(range(6)), "steps": 600}
        dig = {
            "sizes": [25, 100, 10_000],
            "seeds": [0, 1, 2],
            "max_steps": 300,
            "pretrain_epochs": 30,
        }
        cost = {"batch_size": 64, "repeats": 60, "number": 10}
    start = time.perf_counter()
    synthetic = run_synthetic(syn["sizes"], syn["seeds"], syn["steps"])
    largest = syn["sizes"][-1]

    def wins_at(n: int) -> int:
        """Seeds on which the shared prefix has the lower test MSE at ``n`` examples."""
        return sum(s < u for s, u in zip(synthetic["per_layer_mlp"][n], synthetic["none"][n]))

    wins = wins_at(largest)
    digits_data = {"source": digits_arrays(SOURCE), "target": digits_arrays(TARGET)}
    backbone, source_accuracy = pretrained_backbone(digits_data["source"], dig["pretrain_epochs"])
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    digits, trainable = run_digits(
        backbone, digits_data["target"], dig["sizes"], dig["seeds"], dig["max_steps"]
    )
    train_size = len(digits_data["target"]["train"][1])
    sizes_dig = [min(n, train_size) for n in dig["sizes"]]
    digits = {m: {min(n, train_size): v for n, v in by_n.items()} for m, by_n in digits.items()}
    timing = run_cost(backbone, **cost)

    metrics: dict[str, dict] = {
        "synthetic": {
            "shared_wins": wins,
            "seeds": len(syn["seeds"]),
            "largest_n": largest,
            **{f"shared_wins_n{n}": wins_at(n) for n in syn["sizes"]},
        },
    }  # fmt: skip
    for share, by_n in synthetic.items():
        metrics[f"synthetic/{share}"] = {f"test_mse_n{n}": values for n, values in by_n.items()}
    for method, by_n in digits.items():
        metrics[f"digits/{method}"] = {
            **{f"accuracy_n{n}": values for n, values in by_n.items()},
            "trainable_params": trainable[method],
        }
    inference, training = timing["inference"], timing["training"]
    metrics["cost/plain_prefix"] = {
        **inference["baseline"].metrics(prefix="inference_"),
        **training["baseline"].metrics(prefix="train_step_"),
    }  # fmt: skip
    metrics["cost/materialized"] = {
        **inference["candidates"]["materialized"].metrics(prefix="inference_"),
        "max_logit_difference_vs_reparameterized": timing["max_logit_difference"],
    }
    metrics["cost/reparameterized"] = {
        **inference["candidates"]["reparameterized"].metrics(prefix="inference_"),
        **training["candidates"]["per_layer_mlp"].metrics(prefix="train_step_"),
    }
    metrics["cost/global_mlp"] = training["candidates"]["global_mlp"].metrics(prefix="train_step_")
    report = BenchmarkReport(
        name=NAME,
        metrics=metrics,
        ratios={
            "materialized_vs_plain_prefix": inference["ratios"]["materialized"],
            "reparameterized_vs_plain_prefix_inference": inference["ratios"]["reparameterized"],
            "train_step_per_layer_mlp_vs_none": training["ratios"]["per_layer_mlp"],
            "train_step_global_mlp_vs_none": training["ratios"]["global_mlp"],
        },
        config={
            "synthetic": {
                **syn,
                "width": SYN_WIDTH,
                "heads": SYN_HEADS,
                "prefix_pairs": SYN_PAIRS,
                "teacher_latent_dim": SYN_LATENT,
                "teacher_hidden": 16,
                "noise_std": SYN_NOISE,
                "learning_rates": SYNTHETIC_LR,
                "optimizer": "Adam, full batch",
                "test_size": 2000,
            },
            "digits": {
                **dig,
                "sizes": sizes_dig,
                "vit": VIT,
                "num_virtual_tokens": 5,
                "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
                "learning_rates": DIGITS_LR,
                "optimizer": "AdamW (wd 0), cosine, batch 32",
                "source_test_accuracy": source_accuracy,
                "test_size": len(digits_data["target"]["test"][1]),
            },
            "cost": {**cost, "model": "the digits ViT, 5 prefix pairs per layer"},
            "seconds": time.perf_counter() - start,
        },
        notes=(
            "synthetic: test MSE of student prefixes against a teacher whose prefix keys/values "
            "come from a 2-d latent per pair; shared_wins counts seeds where per_layer_mlp beats "
            "none at the largest n. digits: accuracy on digits 5-9 of a frozen tiny ViT pretrained "
            "on 0-4; the largest n is the whole training split. cost: inference of the "
            "materialised per_layer_mlp adapter vs share='none' (plain prefix) and training "
            "steps, medians of interleaved samples."
        ),
    )
    report.print_table()
    print(f"wrote {report.write(args.results_dir)}")
    plot(report, synthetic, digits, syn["sizes"], sizes_dig, args.results_dir)
    return report


if __name__ == "__main__":
    main()
