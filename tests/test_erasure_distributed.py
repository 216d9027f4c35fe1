"""EAP erasure data-parallel: 2 CPU processes give the 1-process run at the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_extensions.testing import launch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "erasure_ranks.py"


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation():
    """2 processes x 1 cycle = 1 process x 2 accumulated cycles: same draws (one seeded generator
    per cycle of the global batch), same UNet update (DDP mean = accumulated mean), same
    adversary step (logit gradients reduced over processes = averaged over micro-cycles)."""
    two = launch(SCRIPT, ["1"], num_processes=2, cwd=ROOT)
    one = launch(SCRIPT, ["2"], num_processes=1, cwd=ROOT)
    assert [r.values["num_processes"] for r in two] == [2, 2]
    assert [r.values["cycles"] for r in two] == [3, 3] and one[0].values["cycles"] == 6
    reference = one[0].tensors
    assert set(two[0].tensors) == set(reference) and len(reference) > 1
    half_batch = launch(SCRIPT, ["1"], num_processes=1, cwd=ROOT)[0].tensors
    moved = [name for name in reference if not torch.equal(reference[name], half_batch[name])]
    assert "logits" in moved and len(moved) == len(reference)  # the global batch matters
    for name, value in reference.items():
        assert torch.equal(two[0].tensors[name], two[1].tensors[name]), name  # ranks agree
        torch.testing.assert_close(two[0].tensors[name], value, rtol=1e-4, atol=1e-6)
