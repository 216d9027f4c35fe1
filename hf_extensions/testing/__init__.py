"""Offline test kit: tiny seeded models, an offline tokenizer, a fake Hub, a multi-process launcher.

Everything here works without network access, so the test suite, the demo and CI smoke runs
exercise the real ``transformers`` / ``peft`` / ``diffusers`` code paths offline.
"""

from hf_extensions.testing.distributed import RankReport, launch, report
from hf_extensions.testing.fake_hub import FakeCommit, FakeHub, fake_hub
from hf_extensions.testing.models import (
    BOS_TOKEN,
    BYTE_VOCAB_SIZE,
    EOS_TOKEN,
    MLPClassifier,
    byte_level_clip_tokenizer,
    count_parameters,
    tiny_bert_classifier,
    tiny_clip,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp_classifier,
    tiny_roberta,
    tiny_stable_diffusion_pipeline,
    tiny_vit_classifier,
)

__all__ = [
    "BOS_TOKEN",
    "BYTE_VOCAB_SIZE",
    "EOS_TOKEN",
    "FakeCommit",
    "FakeHub",
    "MLPClassifier",
    "RankReport",
    "byte_level_clip_tokenizer",
    "count_parameters",
    "fake_hub",
    "launch",
    "report",
    "tiny_bert_classifier",
    "tiny_clip",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_mlp_classifier",
    "tiny_roberta",
    "tiny_stable_diffusion_pipeline",
    "tiny_vit_classifier",
]
