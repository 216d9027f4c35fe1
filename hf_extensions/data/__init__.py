"""Embedded data as ``datasets.Dataset``: nothing here downloads.

- :func:`load_digits`: scikit-learn's digits as images (optionally upscaled) or 64-d vectors,
  with a seeded, stratified train / validation / test split;
- :func:`add_label_noise`: symmetric or asymmetric label noise at an exact rate;
- :func:`shift_digits`, :func:`shifted_domains`: rotated, inverted, noisy or rescaled domains;
- :func:`class_incremental_stream`: N tasks x k classes for continual learning.

(The standard-library retrieval corpus of PromptDSI lives in its method package,
:mod:`hf_extensions.prompt_dsi.retrieval`.)
"""

from .digits import CLASS_NAMES, NUM_CLASSES, digits_arrays, load_digits, resize_images
from .noise import DIGITS_ASYMMETRIC, add_label_noise, noisy_labels
from .shifts import SHIFTS, shift_digits, shift_images, shifted_domains
from .streams import TaskStream, class_incremental_stream

__all__ = [
    "CLASS_NAMES",
    "DIGITS_ASYMMETRIC",
    "NUM_CLASSES",
    "SHIFTS",
    "TaskStream",
    "add_label_noise",
    "class_incremental_stream",
    "digits_arrays",
    "load_digits",
    "noisy_labels",
    "resize_images",
    "shift_digits",
    "shift_images",
    "shifted_domains",
]
