"""Concept erasure on the zoo's trained text-to-image fixture: EAP vs ESD vs fixed preservation.

Bui et al., "Erasing Undesirable Concepts in Diffusion Models with Adversarial Preservation"
(NeurIPS 2024, arXiv 2410.15618), on ``zoo/text_to_image`` (a tiny SD trained on captioned hard
digits, whose prompt really sets the digit) scored by ``zoo/digit_scorer`` (96.95% test accuracy).
:mod:`benchmarks.erasure` measures the same methods in ε space on a random tiny pipeline; this
benchmark measures what the samples show.

Protocol (committed before the full run; a pilot on seed 100, not an evaluation seed, ESD only,
50 target samples: lr 1e-3 reached erasure success 1.0 by step 20, lr 2e-4 only 0.44 by step 120;
the lr below was set between them, not piloted):

- Concept erased: ``"a handwritten seven"``. Every arm starts from the fixture and edits the
  cross-attention (``xattn``) with the settings of ``recipes/erasure/zoo_text_to_image.yaml``
  (read from it: x0 loss, η = 1, 10 DDIM steps, start guidance 3, the 13 candidate words
  digits + inks with template ``"a handwritten {}"``, k_closest 13, 6 k-means centres, Gumbel
  temperature 2, adversary lr 1e-2) except the model learning rate, ``LR`` = 5e-4 (the recipe's
  1e-3 erases within 10-20 steps, too fast for a curve), and the step count (``STEPS`` = 80).
- Arms, same steps, lr and draws (the erasure's seed): ``esd`` (no preservation), ``fixed``
  (λ = 1 on the fixed prompt ``"a handwritten digit"``), ``eap`` (λ = 1 on the adversarial
  concept, the project's default straight-through Gumbel adversary).
- Seeds 0, 1, 2 (paired: the erasure's draws and the evaluation noise follow the seed; every arm
  and checkpoint of a seed is sampled from the same initial latents). Brief: ≥ 3 seeds.
- Checkpoints: steps ``CHECKPOINTS`` = 10, 20, 30, 40, 50, 60, 80 (and step 0, the fixture
  itself). At each, samples with the pipeline's own ``__call__``: DDIM, 10 steps, guidance 7.5
  (the fixture's), classified by the scorer:
  ``erasure_success`` = share of ``TARGET_SAMPLES`` samples of the concept prompt NOT classified as
  seven; ``preservation`` = mean over the nine other digits of the share of ``PROMPT_SAMPLES``
  samples of ``"a handwritten {digit}"`` classified as that digit; ``heldout_recognition`` (the
  digit of the prompt recognised) and ``heldout_drift`` (share of samples whose scorer class,
  digit and ink, differs from the fixture's sample at the same noise) over ``HELDOUT_SAMPLES``
  samples of each of the recipe's five held-out prompts (full captions with ink and background,
  never seen by any arm's objective).
  REDUCTION: the issue asks ≥ 500 samples per prompt and 25 sampling steps; to fit ~25 min on one
  CPU thread this runs 100 samples of the target, 32 of each other digit (288 in all) and 20 of
  each held-out prompt (100 in all) per checkpoint, at 10 DDIM steps.
- Matched erasure: ``LEVEL`` = 0.9 erasure success. Per seed and arm, the first checkpoint whose
  erasure success reaches ``LEVEL`` is that arm's matched point; its preservation, held-out
  recognition and drift are reported. An arm that never reaches the level in ``STEPS`` steps is
  reported as not reaching it (its last checkpoint is shown, and the seed is left out of that
  arm's comparison, said in the notes).
- Primary test: paired difference EAP − ESD in preservation at matched erasure, 95% t-interval
  (``benchmarks.protocol.paired_interval``, n = 3). Claimed direction (the paper's): EAP > ESD.
  Secondary: fixed − ESD and EAP − fixed on preservation; EAP − ESD on held-out drift (lower is
  better).
- Adversary check: the adversary's final argmax and softmax over its candidates, and the words
  it chose during training, against (a) how much ESD at its matched point damaged each digit
  (drop of that digit's recognition from the fixture's: the concepts the erasure really
  confuses) and (b) the fixture's own confusions between seven and each digit (the share of
  seven samples classified as the digit plus the share of the digit's samples classified as
  seven).

AMENDMENT (2026-12-08 03:54 UTC, before any result beyond the first seed's first two ESD
checkpoints): the first full run (lr 5e-4, 80 steps, checkpoints 10…80, samples 100 / 32 / 20)
was stopped after its first seed's ESD showed erasure success 0.08 at step 20 and its evaluations
took ~35 s each on the shared CPU (the whole run would have exceeded the time allotted). The run
reported uses the recipe's own lr 1e-3 (no departure from the recipe left there), 30 steps,
checkpoints 5, 10, 15, 20, 25, 30, and per checkpoint 80 samples of the target, 20 of each other
digit (180) and 12 of each held-out prompt (60). Everything else (level 0.9, seeds, arms,
metrics, test, claimed direction) is unchanged.

AMENDMENT 2 (2026-12-08 03:57 UTC): the amended run was stopped after seed 0's ESD reached only
0.26 erasure success by step 30 (the pilot's seed 100 had reached 1.0 by step 20: the speed of
erasure varies with the draws), so no arm would have reached the level. The run reported trains
90 steps at the recipe's lr 1e-3 with checkpoints 15, 30, 45, 60, 75, 90; samples, level, seeds,
arms, metrics and test are unchanged.

Run: ``python -m benchmarks.erasure_fixture`` (~25 min on one CPU thread); ``--quick`` for a
smoke run that keeps the real results.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.harness import (
    RESULTS_DIR,
    BenchmarkReport,
    get_pyplot,
    make_parser,
    mean_std,
    save_plot,
    torch_threads,
)
from benchmarks.protocol import paired_interval
from hf_extensions.pipelines import ConceptEraser, ErasureConfig
from hf_extensions.zoo import fixture_path

NAME = "erasure_fixture"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "erasure" / "zoo_text_to_image.yaml"
TARGET = "seven"
CONCEPT = f"a handwritten {TARGET}"
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
OTHERS = tuple(d for d in DIGITS if d != TARGET)
ARMS = ("esd", "fixed", "eap")
FIXED_PROMPT = "a handwritten digit"
LR = 1e-3
STEPS = 90
CHECKPOINTS = (15, 30, 45, 60, 75, 90)
LEVEL = 0.9
SEEDS = (0, 1, 2)
TARGET_SAMPLES, PROMPT_SAMPLES, HELDOUT_SAMPLES = 80, 20, 12
SAMPLING_STEPS, GUIDANCE = 10, 7.5
_RECIPE_ONLY = ("model_name_or_path", "concepts", "method", "heldout_prompts", "output_dir",
                "save_mode")  # fmt: skip


def recipe_settings() -> tuple[dict, list[str]]:
    """The recipe's erasure settings (ErasureConfig fields) and its held-out prompts."""
    settings = yaml.safe_load(RECIPE.read_text())
    fields = set(ErasureConfig.__dataclass_fields__)
    return {k: v for k, v in settings.items() if k in fields}, settings["heldout_prompts"]


def load_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(fixture_path("text_to_image"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_scorer():
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(fixture_path("digit_scorer")).eval()


class Evaluation:
    """The fixed evaluation prompts and initial latents of one seed, and their scoring."""

    def __init__(self, pipe, scorer, heldout: list[str], seed: int, sizes: tuple[int, int, int]):
        self.scorer, self.names = scorer, scorer.config.id2label
        target, prompt, held = sizes
        self.groups = {"target": [CONCEPT] * target}
        self.groups["preserve"] = [f"a handwritten {d}" for d in OTHERS for _ in range(prompt)]
        self.groups["heldout"] = [p for p in heldout for _ in range(held)]
        self.prompts = [p for group in self.groups.values() for p in group]
        shape = (
            len(self.prompts),
            pipe.unet.config.in_channels,
            *([pipe.unet.config.sample_size] * 2),
        )
        self.latents = torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + seed))
        self.reference: dict[str, list[str]] | None = None

    @torch.no_grad()
    def classes(self, pipe, chunk: int = 256) -> dict[str, list[str]]:
        """The scorer's class name (``"seven red"``) of every sample, by group."""
        names = []
        for start in range(0, len(self.prompts), chunk):
            images = pipe(
                self.prompts[start : start + chunk],
                latents=self.latents[start : start + chunk],
                num_inference_steps=SAMPLING_STEPS,
                guidance_scale=GUIDANCE,
                output_type="pt",
            ).images.float()
            logits = self.scorer(pixel_values=images).logits
            names += [self.names[int(k)] for k in logits.argmax(-1)]
        out, start = {}, 0
        for group, prompts in self.groups.items():
            out[group] = names[start : start + len(prompts)]
            start += len(prompts)
        return out

    def measure(self, pipe) -> dict:
        classes = self.classes(pipe)
        if self.reference is None:
            self.reference = classes
        digit = {g: [name.split()[0] for name in names] for g, names in classes.items()}
        per_digit = {
            d: float(np.mean([p == f"a handwritten {d}" and k == d for p, k in zip(
                self.groups["preserve"], digit["preserve"]) if p == f"a handwritten {d}"]))
            for d in OTHERS
        }  # fmt: skip
        held_words = [set(p.split()) for p in self.groups["heldout"]]
        return {
            "erasure_success": float(np.mean([k != TARGET for k in digit["target"]])),
            "preservation": float(np.mean(list(per_digit.values()))),
            "heldout_recognition": float(np.mean([k in w for k, w in zip(digit["heldout"], held_words)])),
            "heldout_drift": float(np.mean([a != b for a, b in zip(classes["heldout"], self.reference["heldout"])])),
            "per_digit": per_digit,
            "target_classes": dict(Counter(digit["target"])),
            "preserve_as_target": {
                d: float(np.mean([k == TARGET for p, k in zip(self.groups["preserve"], digit["preserve"])
                                  if p == f"a handwritten {d}"]))
                for d in OTHERS
            },
        }  # fmt: skip


def run_arm(arm: str, seed: int, evaluation: Evaluation, args) -> dict:
    settings, _ = recipe_settings()
    overrides = {"learning_rate": args.lr, "num_steps": args.steps, "seed": seed,
                 "preserve_concepts": [FIXED_PROMPT], "progress_bar": False}  # fmt: skip
    config = ErasureConfig(**{**settings, **overrides})
    pipe = load_pipeline()
    eraser = ConceptEraser(pipe, [CONCEPT], arm, config)
    path = []
    for step in range(1, args.steps + 1):
        eraser.step()
        if step in args.checkpoints:
            unet = eraser.accelerator.unwrap_model(eraser.unet)
            snapshot = copy.copy(pipe)
            snapshot.unet = unet.eval()
            with torch.no_grad():
                row = evaluation.measure(snapshot)
            unet.train()
            path.append({"step": step, **row})
            print(f"  seed {seed} {arm} step {step}: erasure {row['erasure_success']:.2f} "
                  f"preservation {row['preservation']:.3f} drift {row['heldout_drift']:.3f}",
                  flush=True)  # fmt: skip
    out = {"path": path}
    if eraser.adversaries:
        adversary = eraser.adversaries[0]
        out["adversary"] = {
            "candidates": list(adversary.candidates.words),
            "argmax": adversary.argmax_word(),
            "probabilities": adversary.probabilities(),
            "chosen_counts": dict(eraser.choices[0]),
        }
    return out


def matched(path: list[dict], level: float) -> dict | None:
    """The first checkpoint whose erasure success reaches ``level`` (None: never)."""
    return next((row for row in path if row["erasure_success"] >= level), None)


def run_seed(seed: int, args, scorer) -> dict:
    _, heldout = recipe_settings()
    sizes = (args.target_samples, args.prompt_samples, args.heldout_samples)
    evaluation = Evaluation(load_pipeline(), scorer, heldout, seed, sizes)
    base = {"step": 0, **evaluation.measure(load_pipeline())}
    print(f"seed {seed} fixture: erasure {base['erasure_success']:.2f} preservation "
          f"{base['preservation']:.3f}", flush=True)  # fmt: skip
    return {"base": base, **{arm: run_arm(arm, seed, evaluation, args) for arm in ARMS}}


METRICS = ("erasure_success", "preservation", "heldout_recognition", "heldout_drift")


def summarize(per_seed: list[dict], args) -> tuple[dict, dict, dict]:
    metrics: dict[str, dict] = {"fixture": {k: [s["base"][k] for s in per_seed] for k in METRICS}}
    matched_rows: dict[str, list] = {}
    for arm in ARMS:
        rows = [matched(s[arm]["path"], args.level) for s in per_seed]
        matched_rows[arm] = rows
        metrics[arm] = {k: [r[k] if r else float("nan") for r in rows] for k in METRICS}
        metrics[arm]["matched_step"] = [r["step"] if r else float("nan") for r in rows]
        metrics[arm]["reached_level"] = [float(r is not None) for r in rows]
        last = [s[arm]["path"][-1] for s in per_seed]
        for k in METRICS:
            metrics[arm][f"final_{k}"] = [r[k] for r in last]
    intervals = {}
    for a, b, key, higher in (
        ("eap", "esd", "preservation", True),
        ("fixed", "esd", "preservation", True),
        ("eap", "fixed", "preservation", True),
        ("eap", "esd", "heldout_drift", False),
        ("eap", "esd", "heldout_recognition", True),
    ):
        pairs = [(x[key], y[key]) for x, y in zip(matched_rows[a], matched_rows[b]) if x and y]
        if len(pairs) >= 2:
            interval = paired_interval([p[0] for p in pairs], [p[1] for p in pairs])
            intervals[f"{a}_minus_{b}_{key}_at_matched_erasure"] = interval.to_dict(higher)
    return metrics, intervals, matched_rows


def adversary_check(per_seed: list[dict], matched_rows: dict) -> dict:
    """The adversary's picks against ESD's per-digit damage and the fixture's confusions."""
    out = []
    for seed_run, esd_row in zip(per_seed, matched_rows["esd"]):
        base = seed_run["base"]
        total = sum(base["target_classes"].values())
        confusion = {d: base["target_classes"].get(d, 0) / total + base["preserve_as_target"][d]
                     for d in OTHERS}  # fmt: skip
        damage = ({d: base["per_digit"][d] - esd_row["per_digit"][d] for d in OTHERS}
                  if esd_row else None)  # fmt: skip
        adversary = seed_run["eap"]["adversary"]
        out.append({
            "argmax": adversary["argmax"],
            "most_chosen": sorted(adversary["chosen_counts"], key=adversary["chosen_counts"].get,
                                  reverse=True)[:3],
            "probabilities": adversary["probabilities"],
            "candidates": adversary["candidates"],
            "esd_damage_by_digit": damage,
            "most_damaged_by_esd": sorted(damage, key=damage.get, reverse=True)[:3] if damage else None,
            "fixture_confusion_with_seven": confusion,
            "most_confused_in_fixture": sorted(confusion, key=confusion.get, reverse=True)[:3],
        })  # fmt: skip
    return {"per_seed": out}


def plot(per_seed: list[dict], args, results_dir) -> None:
    plt = get_pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for n, arm in enumerate(ARMS):
        for s, seed_run in enumerate(per_seed):
            path = [seed_run["base"], *seed_run[arm]["path"]]
            x = [row["erasure_success"] for row in path]
            label = arm if s == 0 else None
            axes[0].plot(x, [row["preservation"] for row in path], "o-", color=f"C{n}",
                         label=label, alpha=0.7, ms=3)  # fmt: skip
            axes[1].plot(x, [row["heldout_drift"] for row in path], "o-", color=f"C{n}",
                         label=label, alpha=0.7, ms=3)  # fmt: skip
            axes[2].plot([row["step"] for row in path], x, "o-", color=f"C{n}", label=label,
                         alpha=0.7, ms=3)  # fmt: skip
    for axis, (xlabel, ylabel) in zip(axes, (
        ("erasure success", "preservation (other digits recognised)"),
        ("erasure success", "held-out drift (class changed)"),
        ("training step", "erasure success"),
    )):  # fmt: skip
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=7)
    for axis in axes[:2]:
        axis.axvline(args.level, color="grey", ls="--", lw=0.8)
    axes[2].axhline(args.level, color="grey", ls="--", lw=0.8)
    fig.suptitle(f"Erasing {CONCEPT!r} from zoo/text_to_image (xattn), per seed; matched level "
                 f"{args.level}")  # fmt: skip
    save_plot(fig, NAME, results_dir)


def main(argv: list[str] | None = None) -> BenchmarkReport:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: as is)")
    parser.add_argument("--quick", action="store_true", help="smoke run; keeps real results")
    args = parser.parse_args(argv)
    args.seeds, args.lr, args.steps, args.checkpoints, args.level = (
        SEEDS,
        LR,
        STEPS,
        CHECKPOINTS,
        LEVEL,
    )
    args.target_samples, args.prompt_samples = TARGET_SAMPLES, PROMPT_SAMPLES
    args.heldout_samples = HELDOUT_SAMPLES
    if args.quick:
        args.seeds, args.steps, args.checkpoints = (0, 1), 4, (2, 4)
        args.target_samples, args.prompt_samples, args.heldout_samples = 8, 2, 2
    with torch_threads(args.threads):
        return _run(args)


def _run(args) -> BenchmarkReport:
    scorer = load_scorer()
    per_seed = [run_seed(seed, args, scorer) for seed in args.seeds]
    metrics, intervals, matched_rows = summarize(per_seed, args)
    check = adversary_check(per_seed, matched_rows)
    means = {arm: {k: mean_std(metrics[arm][k])[0] for k in METRICS} for arm in ARMS}
    ratios = {"eap_minus_esd_preservation_at_matched": means["eap"]["preservation"]
              - means["esd"]["preservation"]}  # fmt: skip
    paths = {str(seed): {arm: [{k: row[k] for k in ("step", *METRICS, "per_digit")}
                               for row in run[arm]["path"]] for arm in ARMS}
             for seed, run in zip(args.seeds, per_seed)}  # fmt: skip
    notes = (
        "metrics.<arm>.<metric>: per-seed values at the arm's matched point (first checkpoint "
        f"with erasure_success >= {args.level}; NaN and reached_level 0 where never reached); "
        "final_*: at the last step; fixture: step 0. Paths (per seed, per arm, per checkpoint) "
        "in config.paths; adversary check in config.adversary_check. CPU, 1 torch thread."
    )
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    config.update(results_dir=str(args.results_dir), concept=CONCEPT, fixed_prompt=FIXED_PROMPT,
                  recipe=str(RECIPE.name), paths=paths, adversary_check=check)  # fmt: skip
    report = BenchmarkReport(name=NAME, metrics=metrics, ratios=ratios, config=config,
                             notes=notes, protocol=__doc__, intervals=intervals)  # fmt: skip
    if not args.quick or args.results_dir != RESULTS_DIR:  # a quick run keeps the real results
        report.write(args.results_dir)
        plot(per_seed, args, args.results_dir)
    report.print_table()
    for name, interval in intervals.items():
        print(name, {k: interval[k] for k in ("mean", "low", "high", "verdict")})
    for row in check["per_seed"]:
        print({k: row[k] for k in ("argmax", "most_chosen", "most_damaged_by_esd",
                                   "most_confused_in_fixture")})  # fmt: skip
    return report


if __name__ == "__main__":
    main()
