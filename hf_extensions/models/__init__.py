"""Model builders that shipped code, recipes, benchmarks and tests share.

- :mod:`hf_extensions.models.tiny`: tiny seeded models built from configs (BERT, RoBERTa, ViT,
  GPT-2, Llama, CLIP, Stable Diffusion, an MLP), an offline byte-level CLIP tokenizer;
- :mod:`hf_extensions.models.image_classification`: data + model of the image-classification
  recipes (digits or a Hub checkpoint) and the stand-in pretraining;
- :mod:`hf_extensions.models.encoders`: the real pretrained MiniLM sentence encoder.

Only the tiny builders are imported here; the other two are imported as submodules.
"""

from hf_extensions.models import tiny
from hf_extensions.models.tiny import *  # noqa: F403 (the builders listed in tiny.__all__)

__all__ = list(tiny.__all__)
