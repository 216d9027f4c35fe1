"""Test helpers only: a fake Hub, a multi-process launcher, accelerate's fp16 path on the CPU.

Imported by ``tests/`` (and the scripts they launch), never by shipped code, recipes or
benchmarks (``tests/test_layering.py`` enforces it). The tiny model builders that tests share
with recipes and benchmarks live in :mod:`hf_extensions.models`.
"""

from hf_extensions.testing.distributed import RankReport, launch, report
from hf_extensions.testing.fake_hub import FakeCommit, FakeHub, fake_hub

__all__ = ["FakeCommit", "FakeHub", "RankReport", "fake_hub", "launch", "report"]
