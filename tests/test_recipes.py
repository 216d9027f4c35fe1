"""The recipe convention: YAML + CLI parsing, the example recipe, the demo table, and data parallelism."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainingArguments

from hf_extensions.cli import (
    RecipeArgumentParser,
    refuse_resume,
    resume_checkpoint,
    run_as_script,
    summarize,
    use_cpu_for_multiprocess_launch,
)
from hf_extensions.demo import Comparison
from hf_extensions.hub import read_model_card_metadata
from hf_extensions.models import tiny_vit_classifier
from hf_extensions.models.image_classification import (
    ImageClassificationArguments as ScriptArguments,
)
from hf_extensions.testing import fake_hub
from hf_extensions.testing.distributed import launch
from recipes.demo import REGISTRY, format_table, save_figure
from recipes.example.train import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS_YAML = ROOT / "recipes" / "example" / "digits.yaml"


def _parser():
    return RecipeArgumentParser((ScriptArguments, TrainingArguments))


def test_yaml_gives_defaults_and_command_line_overrides(tmp_path):
    script, training = _parser().parse(
        ["--config", str(DIGITS_YAML), "--learning_rate", "0.5", "--output_dir", str(tmp_path)]
    )
    assert training.learning_rate == 0.5  # command line wins
    assert training.num_train_epochs == 15  # from the YAML
    assert script.hidden_size == 32 and script.model_name_or_path is None
    assert training.output_dir == str(tmp_path)


def test_unknown_yaml_keys_and_flags_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\nlearnig_rate: 0.2\n")
    with pytest.raises(SystemExit):
        _parser().parse(["--config", str(bad)])
    with pytest.raises(SystemExit):
        _parser().parse(["--no_such_flag", "1"])


def test_script_arguments_validate_themselves():
    with pytest.raises(ValueError, match="label_noise"):
        ScriptArguments(label_noise=1.5)


def test_help_lists_the_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--model_name_or_path" in out and "--learning_rate" in out


def test_shipped_settings_leave_progress_bars_on():
    """Every digits YAML used to set ``disable_tqdm: true`` (and the erasure one
    ``progress_bar: false``): progress is shown by default, the flag still hides it."""

    for path in sorted((ROOT / "recipes").glob("*/*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        assert values.get("disable_tqdm", False) is False, path
        assert values.get("progress_bar", True) is True, path
    assert not _parser().parse(["--config", str(DIGITS_YAML)])[1].disable_tqdm
    assert _parser().parse(["--config", str(DIGITS_YAML), "--disable_tqdm", "true"])[1].disable_tqdm


def test_multiprocess_launch_without_gpu_selects_cpu(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not use_cpu_for_multiprocess_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert use_cpu_for_multiprocess_launch() == (not torch.cuda.is_available())


def test_example_recipe_learns_digits_and_saves_a_card(tmp_path):
    _, metrics = main(
        ["--config", str(DIGITS_YAML), "--output_dir", str(tmp_path), "--eval_strategy", "no"]
    )  # fmt: skip
    # 10 classes: chance is 0.1; the setting's 15 epochs of the tiny ViT get far above it (4 did
    # with one input channel; the digits are RGB now, as the image-classification pipeline feeds
    # them, and learn more slowly: 0.44 after 4 epochs, 0.74 after 15 at seed 0).
    assert metrics["test_accuracy"] > 0.6
    assert (tmp_path / "model.safetensors").exists()
    card = (tmp_path / "README.md").read_text()
    assert "test_accuracy" in card


def test_resume_flag_reaches_trainer_and_resumes_exactly(tmp_path):
    """`--resume_from_checkpoint` used to be parsed and ignored: a run resumed from its
    checkpoint-2 must end with the weights of the uninterrupted run, bit for bit."""
    from safetensors.torch import load_file

    common = ["--config", str(DIGITS_YAML), "--max_steps", "4", "--save_strategy", "steps",
              "--save_steps", "2", "--eval_strategy", "no", "--logging_strategy", "no"]  # fmt: skip
    main([*common, "--output_dir", str(tmp_path / "whole")])
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    main([*common, "--output_dir", str(tmp_path / "resumed"),
          "--resume_from_checkpoint", str(checkpoint)])  # fmt: skip
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    state = (tmp_path / "resumed" / "checkpoint-4" / "trainer_state.json").read_text()
    assert '"global_step": 4' in state


def test_resume_values_and_recipes_that_cannot_resume_refuse_it(tmp_path):
    class Args:
        resume_from_checkpoint = None
        output_dir = str(tmp_path)

    args = Args()
    assert resume_checkpoint(args) is None
    args.resume_from_checkpoint = "last"
    with pytest.raises(ValueError, match="holds no checkpoint-N folder"):
        resume_checkpoint(args)
    for step in (2, 10):  # complete checkpoints, as far as resolve_checkpoint looks
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
        for name in ("model.safetensors", "optimizer.pt", "rng_state.pth"):
            (folder / name).touch()
    assert resume_checkpoint(args) == str(tmp_path / "checkpoint-10")
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-3")
    with pytest.raises(ValueError, match="no checkpoint folder at"):
        resume_checkpoint(args)
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-2")
    assert resume_checkpoint(args) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="not supported by the hierarchical CL recipe"):
        refuse_resume(args, "hierarchical CL")


def _run_card_code(card: Path, artifact: str, folder: Path) -> None:
    """Run the Python blocks of ``card`` in a fresh interpreter, ``artifact`` -> ``folder``."""
    blocks = re.findall(r"```python\n(.*?)```", card.read_text(), re.DOTALL)
    assert blocks, f"no usage snippet in {card}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for code in blocks:
        code = code.replace(json.dumps(artifact), json.dumps(str(folder)))
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{code}\n--- output:\n{done.stderr[-3000:]}"
        assert "'label': '" in done.stdout  # the pipeline named the classes


def test_stock_trainer_recipe_pushes_its_own_card_once_and_it_runs(tmp_path):
    """Trainer.push_to_hub writes transformers' card before uploading; the example recipe (a
    stock Trainer) must push the hf-extensions card it wrote, with its test metrics, in one
    commit (``save_model`` before ``push_to_hub`` pushed a second one). The card's snippet,
    ``pipeline("image-classification", model=<pushed repo>)``, runs in a fresh process: the
    image processor and the label names were saved with the model."""
    with fake_hub(tmp_path / "hub") as hub:
        main(
            ["--config", str(DIGITS_YAML), "--output_dir", str(tmp_path / "out"), "--max_steps",
             "2", "--eval_strategy", "no", "--push_to_hub", "true", "--hub_model_id",
             "fake-user/example"]
        )  # fmt: skip
        pushed = hub.repo_path("fake-user/example")
    assert len(hub.commits) == 1, [c.message for c in hub.commits]
    record = read_model_card_metadata(pushed)
    assert record["method"] == "fine-tuning"
    assert "test_accuracy" in record["metrics"] and record["hyperparameters"]["seed"] == 0
    assert "test_runtime" not in record["metrics"]
    assert (pushed / "model.safetensors").exists() and (
        pushed / "preprocessor_config.json"
    ).exists()
    config = json.loads((pushed / "config.json").read_text())
    assert config["id2label"] == {str(i): str(i) for i in range(10)}
    _run_card_code(pushed / "README.md", "fake-user/example", pushed)


def test_method_trainer_recipe_pushes_once_and_prints_where_and_how(tmp_path, capsys):
    """A method trainer's recipe (Agnostic-SAM): one commit with model, processor and card; the
    run ends with the figures, where the model is and the line that loads it."""
    from recipes.agnostic_sam.train import RECIPE_DIR
    from recipes.agnostic_sam.train import artifact as sam_artifact
    from recipes.agnostic_sam.train import main as sam_main

    out = tmp_path / "out"
    with fake_hub(tmp_path / "hub") as hub:
        run_as_script(
            sam_main,
            {"accuracy": "test_accuracy"},
            argv=["--config", str(RECIPE_DIR / "digits_noisy.yaml"), "--output_dir", str(out),
                  "--max_steps", "1", "--eval_strategy", "no", "--max_train_samples", "32",
                  "--push_to_hub", "true", "--hub_model_id", "fake-user/sam"],
            artifacts=sam_artifact,
        )  # fmt: skip
    assert [c.repo_id for c in hub.commits] == ["fake-user/sam"]
    assert {"README.md", "model.safetensors", "preprocessor_config.json"} <= set(
        hub.commits[0].added
    )
    printed = capsys.readouterr().out.splitlines()[-3:]  # Trainer's logs come before
    assert printed[0].startswith("accuracy: ")
    assert (
        printed[1]
        == f"Saved to {out} and pushed to fake-user/sam (its README.md has a usage example). Load it:"
    )
    assert printed[2].strip() == (
        f'from transformers import pipeline; classifier = pipeline("image-classification", '
        f'model="{out}")'
    )


def test_method_trainer_finish_pushes_one_commit_whose_card_names_the_repo(tmp_path):
    """``MethodTrainer.finish`` with ``push_to_hub``: one commit (``save_model`` would push one
    of its own first), and the card's usage snippet loads the pushed repository."""
    from hf_extensions.models import tiny_mlp_classifier
    from trainers import SAMConfig, SAMTrainer

    args = SAMConfig(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1,
                     push_to_hub=True, hub_model_id="fake-user/finish", save_strategy="no")  # fmt: skip
    data = [{"features": torch.randn(64), "labels": 0} for _ in range(8)]
    with fake_hub(tmp_path / "hub") as hub:
        trainer = SAMTrainer(model=tiny_mlp_classifier(), args=args, train_dataset=data)
        trainer.train()
        trainer.finish()
    assert [c.repo_id for c in hub.commits] == ["fake-user/finish"], [
        (c.message, c.added) for c in hub.commits
    ]
    card = (tmp_path / "out" / "README.md").read_text()
    assert '"fake-user/finish"' in card


def test_run_as_script_prints_the_summary_and_ends_the_process_group(capsys, tmp_path):
    """A launched process that exits with its process group alive can abort at exit (gloo's
    threads at interpreter shutdown): the script entry point must end the group."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        result = run_as_script(lambda argv: (None, {"test_accuracy": 0.75, "n": len(argv)}),
                               {"accuracy": "test_accuracy", "absent": "x"}, argv=["a", "b"])  # fmt: skip
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert result == (None, {"test_accuracy": 0.75, "n": 2})
    assert capsys.readouterr().out == "accuracy: 0.75\n"  # a missing metric is skipped here


def test_summary_refuses_a_missing_metric_in_the_demo():
    metrics = {"test_accuracy": 0.5, "test_nll": 1.0}
    assert summarize(("trainer", metrics), {"acc": "test_accuracy"}) == {"acc": 0.5}
    assert summarize(metrics, lambda m: {"nll": m["test_nll"]}) == {"nll": 1.0}
    with pytest.raises(KeyError, match="test_ece"):
        summarize(metrics, {"ece": "test_ece"})


def test_demo_table_lists_every_metric_beside_its_baseline(tmp_path):
    assert "example" in REGISTRY
    compared = Comparison(
        "stock Trainer",
        {"test accuracy": (0.5, 0.625), "test NLL": (1.0, 1.5)},
        lower_is_better={"test NLL"},
        fixture="vit",
        fixture_quality={"accuracy": 0.9},
    )
    rows = [("a", "d", compared, 3.0), ("b", "d", {"acc": 0.25}, 1.0), ("c", "d", "boom", 1.0)]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["method", "baseline", "metric"]
    assert any(line.split()[-4:] == ["0.5", "0.625", "better", "3.0"] for line in lines)
    assert any("test NLL" in line and line.split()[-3:] == ["1", "1.5", "worse"] for line in lines)
    assert any("zoo/vit" in line and "accuracy 0.9" in line for line in lines)
    assert any(line.split()[:3] == ["b", "acc", "0.25"] for line in lines)
    assert any("FAILED" in line and "boom" in line for line in lines)
    figure = save_figure(rows, tmp_path / "summary.png")
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert save_figure(rows[1:], tmp_path / "none.png") is None


def test_comparison_gain_is_signed_by_the_metric_direction():
    compared = Comparison("b", {"acc": (0.5, 0.75), "ece": (0.1, 0.3), "w": (1.0, 1.0005),
                                "tiny": (1e-5, 3e-5)}, lower_is_better={"ece"})  # fmt: skip
    assert compared.gain("acc") == 0.25 and compared.verdict("acc") == "better"
    assert abs(compared.gain("ece") + 0.2) < 1e-12 and compared.verdict("ece") == "worse"
    assert compared.verdict("w") == "tie"  # within 1e-3 of the values' size
    assert compared.verdict("tiny") == "better"  # small values are compared at their scale


@pytest.mark.distributed
def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    """DDP over 2 CPU processes (gloo) ends with the same parameters as 1 process, batch 2 x 16 = 32.

    Plain SGD: the all-reduce sums gradients in another order than one process does, a float
    rounding difference (~1e-8) that SGD keeps at that size. Adam would turn it into steps of
    size ``lr`` wherever the true gradient is ~0 (e.g. attention key biases, to which softmax is
    invariant), which says nothing about data parallelism.
    """
    common = ["--config", str(DIGITS_YAML), "--max_steps", "6", "--max_train_samples", "256",
              "--eval_strategy", "no", "--optim", "sgd", "--learning_rate", "0.5",
              "--warmup_steps", "0"]  # fmt: skip
    script = ROOT / "tests" / "scripts" / "recipe_ranks.py"
    common = ["recipes.example.train", *common]
    two = launch(
        script, [*common, "--per_device_train_batch_size", "16", "--output_dir", str(tmp_path / "two")],
        num_processes=2, cwd=ROOT,
    )  # fmt: skip
    one = launch(
        script, [*common, "--per_device_train_batch_size", "32", "--output_dir", str(tmp_path / "one")],
        num_processes=1, cwd=ROOT,
    )  # fmt: skip
    # A real process group, not two processes each training alone:
    assert [r.values["num_processes"] for r in two] == [2, 2]
    assert [r.values["process_index"] for r in two] == [0, 1]
    assert two[0].values["global_step"] == one[0].values["global_step"] == 6
    initial = dict(tiny_vit_classifier(num_channels=3).named_parameters())
    reference = one[0].tensors
    assert set(reference) == set(initial)
    moved = max((reference[n] - initial[n].detach()).abs().max().item() for n in reference)
    assert moved > 1e-3  # training changed the weights, so equality below is not vacuous
    for name, value in reference.items():
        assert torch.equal(two[0].tensors[name], two[1].tensors[name]), name
        torch.testing.assert_close(two[0].tensors[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_example_recipe_fine_tunes_a_saved_checkpoint_with_its_processor(tmp_path):
    """The real-run path (a checkpoint + image processor) works offline on a local folder."""
    from transformers import ViTImageProcessor

    checkpoint = tmp_path / "checkpoint"
    # a 3-way head to be replaced
    tiny_vit_classifier(num_labels=3, num_channels=3).save_pretrained(checkpoint)
    ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(checkpoint)
    trainer, _ = main(
        ["--config", str(DIGITS_YAML), "--model_name_or_path", str(checkpoint),
         "--output_dir", str(tmp_path / "out"), "--max_steps", "3", "--eval_strategy", "no"]
    )  # fmt: skip
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.config.num_labels == 10 and model.classifier.out_features == 10
    batch = next(iter(trainer.get_train_dataloader()))
    # Normalised with the processor's statistics: digits in [0, 1] map into [-2, 2].
    assert batch["pixel_values"].min() < -1.5 and batch["pixel_values"].max() > 1.5


RECIPE_SCRIPTS = sorted(
    path.relative_to(ROOT).as_posix()
    for path in (ROOT / "recipes").glob("*/*.py")
    if 'if __name__ == "__main__":' in path.read_text()
)


_RUN_HELP = """
import contextlib, io, runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as done:
            assert done.code in (0, None), (script, done.code)
    assert "--config" in out.getvalue(), script
"""


def test_recipe_scripts_run_as_documented_without_pythonpath():
    """``accelerate launch recipes/<method>/train.py`` runs the file as a script: the repository
    root is not on ``sys.path`` then, so a recipe may import installed packages only. ``python -I``
    leaves the working directory and PYTHONPATH off ``sys.path``; every recipe's ``--help`` must
    still work."""
    import subprocess
    import sys

    assert len(RECIPE_SCRIPTS) >= 2
    done = subprocess.run(
        [sys.executable, "-I", "-c", _RUN_HELP, *RECIPE_SCRIPTS], cwd=ROOT, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def _recipe_settings():
    """(script, yaml) for every recipe setting: each YAML next to a script that parses one."""
    for script in sorted((ROOT / "recipes").glob("*/*.py")):
        if re.search(r"RecipeArgumentParser\(\s*\(", script.read_text()):
            for setting in sorted(script.parent.glob("*.yaml")):
                yield pytest.param(script, setting, id=f"{script.parent.name}/{setting.name}")


@pytest.mark.parametrize("script,setting", list(_recipe_settings()))
def test_every_shipped_setting_parses_and_validates(script, setting, tmp_path):
    """Every YAML of every recipe (paper-scale ones included, which no CPU test runs) is
    accepted by its recipe's dataclasses and their validation; GPU settings get ``use_cpu``."""
    import ast
    import importlib

    tree = ast.parse(script.read_text())
    call = next(
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "RecipeArgumentParser"
    )  # fmt: skip
    module = importlib.import_module(f"recipes.{script.parent.name}.{script.stem}")
    types = tuple(getattr(module, element.id) for element in call.args[0].elts)
    parser = RecipeArgumentParser(types)
    argv = ["--config", str(setting), "--output_dir", str(tmp_path)]
    if any(action.dest == "use_cpu" for action in parser._actions):
        argv += ["--use_cpu", "true"]  # bf16 settings are for GPUs; CPU bf16 is allowed with it
    parsed = parser.parse(argv)
    assert len(parsed) == len(types)
