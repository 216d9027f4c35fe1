"""Killed mid-training (mid-save), resumed in a fresh process: bit for bit the uninterrupted run.

For a perturbation trainer (Agnostic-SAM), FHBI (2 particles), hierarchical CL (killed during
task 2 of 3: the continual state and the stream's results must come back too) and concept
erasure: the run of :mod:`tests.scripts.resume_run` is forked, stopped in the middle of writing a
checkpoint and killed with SIGKILL; a new Python process resumes with
``resume_from_checkpoint=True`` / ``"last"``, which must skip the cut-short checkpoint (Trainer
checkpoints: with a warning naming it; erasure: its staging area is discarded) and resume from
the one before. Every final tensor must be ``torch.equal`` to the uninterrupted run's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_extensions.atomic import STAGING_NAME
from hf_extensions.checkpoints import checkpoint_problem, resolve_checkpoint
from tests.scripts.resume_run import (
    continual_tensors,
    hierarchical_cl_trainer,
    run,
    stall_marker,
)

SCRIPT = Path(__file__).resolve().parent / "scripts" / "resume_run.py"

#: case -> (checkpoint being written when killed, checkpoint resumed from, steps the resumed
#: process trains: model steps, or for hierarchical CL the steps of tasks 2 and 3)
KILLS = {
    "agnostic_sam": ("checkpoint-4", "checkpoint-2", 4),
    "fhbi": ("checkpoint-4", "checkpoint-2", 4),
    "hierarchical_cl": ("task-1/checkpoint-6", "task-1/checkpoint-3", 5 + 10),
    "erasure": ("checkpoint-4", "checkpoint-2", 4),
}


def _kill_mid_save(case: str, output_dir: Path, stall: str) -> None:
    """Fork the run; SIGKILL it once it is stopped inside the save of ``stall``."""
    pid = os.fork()
    if pid == 0:  # the child never returns to the test session
        try:
            run(case, output_dir, stall=stall)
        finally:
            os._exit(1)
    deadline = time.monotonic() + 300
    try:
        while not stall_marker(output_dir).exists():
            if os.waitpid(pid, os.WNOHANG)[0]:
                pytest.fail(f"the {case} run ended without reaching the save of {stall}")
            if time.monotonic() > deadline:
                pytest.fail(f"the {case} run did not reach the save of {stall} in 300 s")
            time.sleep(0.02)
    finally:
        with_child = os.waitpid(pid, os.WNOHANG)[0] == 0
        if with_child:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal``, NaN matching NaN (unset prompt keys; the accuracy matrix above its
    diagonal)."""
    if a.is_floating_point() and b.is_floating_point() and torch.equal(a.isnan(), b.isnan()):
        return torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """Per case: the uninterrupted run's tensors, the killed run's folder, the resumed run's
    result file and the log of the (one) resuming process. That new Python process is started
    first, so that its imports overlap the runs here, and told what to resume once all are
    killed."""
    root = tmp_path_factory.mktemp("resume")
    command = [sys.executable, str(SCRIPT), "--resume", "--stdin"]
    resumer = subprocess.Popen(
        command, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        runs, outcome = [], {}
        for case, (stall, _, _) in KILLS.items():
            whole = run(case, root / f"{case}-whole")
            _kill_mid_save(case, root / case, stall)
            outcome[case] = {"whole": whole, "killed": root / case, "result": root / f"{case}.pt"}
            if case == "erasure":  # all-or-nothing: the checkpoint is still in the staging area
                assert (root / case / STAGING_NAME / stall).is_dir()
                assert not (root / case / stall).exists()
            else:  # Trainer's checkpoint is half written: weights, no trainer_state.json
                assert "no trainer_state.json" in checkpoint_problem(root / case / stall)
            runs.append(f"{case} {root / case} {root / case}.pt")
        _, log = resumer.communicate("\n".join(runs), timeout=600)
    finally:
        if resumer.poll() is None:
            resumer.kill()
            resumer.wait()
    for case in outcome:
        outcome[case]["log"] = log
    return outcome


@pytest.mark.parametrize("case", list(KILLS))
def test_killed_mid_save_then_resumed_equals_the_uninterrupted_run(case, interrupted):
    stall, resumed_from, steps = KILLS[case]
    whole, killed, result = (interrupted[case][k] for k in ("whole", "killed", "result"))
    error = Path(f"{result}.error")
    assert not error.exists(), error.read_text() if error.exists() else ""
    assert result.is_file(), interrupted[case]["log"][-3000:]
    resumed = torch.load(result, weights_only=True)
    if case != "erasure":
        assert f"Skipping the incomplete checkpoint {killed / stall}" in interrupted[case]["log"]
    assert int(resumed["steps_run"]) == steps, f"not resumed from {resumed_from}"
    assert int(whole["steps_run"]) > steps
    assert resumed.keys() == whole.keys()
    unequal = [n for n in whole if n != "steps_run" and not _equal(whole[n], resumed[n])]
    assert not unequal, f"{len(unequal)} of {len(whole)} tensors differ, e.g. {unequal[:3]}"


# ----------------------------------------------------------------------------- incomplete folders


def _complete_run(tmp_path) -> Path:
    run("agnostic_sam", tmp_path / "run")
    return tmp_path / "run"


def test_incomplete_checkpoints_are_skipped_with_a_warning_and_refused_by_name(tmp_path, caplog):
    output = _complete_run(tmp_path)
    assert resolve_checkpoint("last", str(output)) == str(output / "checkpoint-6")
    state = (output / "checkpoint-6" / "trainer_state.json").read_text()
    (output / "checkpoint-6" / "trainer_state.json").write_text(state[: len(state) // 2])
    (output / "checkpoint-4" / "optimizer.pt").unlink()
    with caplog.at_level("WARNING", logger="hf_extensions.checkpoints"):
        assert resolve_checkpoint(True, str(output)) == str(output / "checkpoint-2")
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        f"{output / 'checkpoint-6'}: its trainer_state.json is not JSON" in m for m in messages
    )
    assert any(f"{output / 'checkpoint-4'}: it has no optimizer state" in m for m in messages)
    with pytest.raises(ValueError, match=r"checkpoint-6 is incomplete: its trainer_state\.json"):
        resolve_checkpoint(str(output / "checkpoint-6"), str(output))
    # a folder holding another step's trainer_state.json is a mix of two saves
    shutil.copy(output / "checkpoint-2" / "trainer_state.json", output / "checkpoint-6")
    assert "global_step 2 (a mix" in checkpoint_problem(output / "checkpoint-6")
    for name in os.listdir(output / "checkpoint-2"):
        if name != "trainer_state.json":
            (output / "checkpoint-2" / name).unlink()
    with pytest.raises(ValueError, match="holds no checkpoint-N folder that is complete"):
        resolve_checkpoint("last", str(output))


def test_a_run_resumed_past_a_truncated_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """In-process: checkpoint-6 and checkpoint-4 cut short; ``True`` resumes from checkpoint-2."""
    whole = run("agnostic_sam", tmp_path / "whole")
    output = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", output)
    (output / "checkpoint-6" / "trainer_state.json").unlink()
    state = output / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:100])
    resumed = run("agnostic_sam", output, resume=True)
    assert int(resumed.pop("steps_run")) == 4
    whole.pop("steps_run")
    assert all(_equal(whole[name], resumed[name]) for name in whole)


def test_rng_states_of_every_process_are_required_when_resumed_by_several(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "trainer_state.json").write_text('{"global_step": 3}')
    (folder / "model.safetensors").touch()
    (folder / "optimizer.pt").touch()
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state_0.pth")
    assert "no rng_state_1.pth" in checkpoint_problem(folder, world_size=2)
    (folder / "rng_state_1.pth").write_bytes((folder / "rng_state_0.pth").read_bytes()[:50])
    assert "rng_state_1.pth cannot be read" in checkpoint_problem(folder, world_size=2)
    shutil.copy(folder / "rng_state_0.pth", folder / "rng_state_1.pth")
    assert checkpoint_problem(folder, world_size=2) is None
    assert checkpoint_problem(folder) is None  # saved by 2, resumed by 1: Trainer's own case


# ----------------------------------------------------------------------------- hierarchical CL


class _Interrupt(Exception):
    pass


def test_an_interrupted_task_is_not_recorded_and_trains_again_to_the_same_result(
    tmp_path, interrupted
):
    """A task that raises mid-training is rolled back (classes, mixtures, prompts, head), so the
    same task can be trained again; the stream then ends where an uninterrupted one does."""
    from transformers import TrainerCallback

    class InterruptTask1(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if trainer.current_task == 1 and state.global_step == 5:
                raise _Interrupt

    trainer, stream = hierarchical_cl_trainer(str(tmp_path), save_strategy="no")
    trainer.train_task(stream[0]["train"], stream.task_classes[0])
    before = continual_tensors(trainer)
    trainer.add_callback(InterruptTask1)
    with pytest.raises(_Interrupt):
        trainer.train_task(stream[1]["train"], stream.task_classes[1])
    assert trainer.task_classes == [stream.task_classes[0]] and trainer.current_task == 0
    after = continual_tensors(trainer)
    assert after.keys() == before.keys()
    assert all(_equal(before[name], after[name]) for name in before)
    trainer.remove_callback(InterruptTask1)
    for task in (1, 2):
        trainer.train_task(stream[task]["train"], stream.task_classes[task])
    expected, got = interrupted["hierarchical_cl"]["whole"], continual_tensors(trainer)
    assert all(_equal(expected[name], got[name]) for name in got)  # the uninterrupted stream


# ----------------------------------------------------------------------------- erasure


def test_erasure_checkpoints_are_validated_rotated_and_not_recorded_with_the_result(tmp_path):
    from hf_extensions.models import tiny_stable_diffusion_pipeline
    from hf_extensions.pipelines import ErasureConfig, erase_concepts

    with pytest.raises(ValueError, match="`checkpoint_dir` must be a folder for the checkpoints"):
        ErasureConfig(save_steps=2)
    with pytest.raises(ValueError, match="`checkpoint_dir` must be the checkpoints' folder"):
        ErasureConfig(resume_from_checkpoint="last")
    with pytest.raises(ValueError, match="`save_total_limit` must be an integer in"):
        ErasureConfig(save_total_limit=0, save_steps=1, checkpoint_dir=str(tmp_path))
    config = ErasureConfig(
        num_steps=5, learning_rate=1e-2, ddim_steps=2, progress_bar=False,
        save_steps=1, save_total_limit=2, checkpoint_dir=str(tmp_path),
    )  # fmt: skip
    pipe = erase_concepts(tiny_stable_diffusion_pipeline(), ["a red circle"], "esd", config)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-5"]
    recorded = pipe.erasure_result.config
    assert "checkpoint_dir" not in recorded and "resume_from_checkpoint" not in recorded
    # resuming from the last checkpoint of a finished erasure trains nothing and changes nothing
    again = ErasureConfig(**{**config.to_dict(), "resume_from_checkpoint": "last"})
    resumed = erase_concepts(tiny_stable_diffusion_pipeline(), ["a red circle"], "esd", again)
    assert all(
        torch.equal(a, b)
        for a, b in zip(pipe.unet.parameters(), resumed.unet.parameters(), strict=True)
    )
    assert resumed.erasure_result.losses == pipe.erasure_result.losses
    with pytest.raises(ValueError, match="its `concepts` is"):
        erase_concepts(tiny_stable_diffusion_pipeline(), ["a blue square"], "esd", again)
