"""Several launched processes that formed no process group are refused, naming the fix."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_extensions.distributed import require_process_group
from hf_extensions.models import tiny_mlp_classifier
from trainers import SAMConfig, SAMTrainer

ROOT = Path(__file__).resolve().parents[1]


def test_a_trainer_refuses_processes_without_a_process_group(tmp_path, monkeypatch):
    args = SAMConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    SAMTrainer(model=tiny_mlp_classifier(), args=args)  # control: one process launched
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="export ACCELERATE_USE_CPU=true"):
        SAMTrainer(model=tiny_mlp_classifier(), args=args)


def test_require_process_group_accepts_matching_counts(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    require_process_group(2, "X")
    monkeypatch.setenv("WORLD_SIZE", "1")
    require_process_group(1, "X")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match=r"^X: the launcher started 4 processes"):
        require_process_group(1, "X")


USER_SCRIPT = """
    from hf_extensions.models import tiny_mlp_classifier
    from trainers import SAMConfig, SAMTrainer
    args = SAMConfig(output_dir={output!r}, report_to="none")
    trainer = SAMTrainer(model=tiny_mlp_classifier(), args=args)
    print("processes", trainer.accelerator.num_processes)
"""


@pytest.mark.slow
@pytest.mark.parametrize("use_cpu", [False, True])
def test_a_user_script_launched_with_the_cpu_config(tmp_path, use_cpu):
    """The user's path: their own script, ``accelerate launch`` with the shipped CPU config."""
    script = tmp_path / "user.py"
    script.write_text(textwrap.dedent(USER_SCRIPT.format(output=str(tmp_path / "out"))))
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["PYTHONPATH"] = str(ROOT)
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    config = ROOT / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    run = subprocess.run(
        [*command, "--main_process_port", "0", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if use_cpu:
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("processes 2") == 2
    else:
        assert run.returncode != 0
        assert "formed no process group" in run.stderr and "ACCELERATE_USE_CPU" in run.stderr
