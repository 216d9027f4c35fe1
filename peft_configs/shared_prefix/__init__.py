"""Shared-structure prefix tuning (Le et al., ICLR 2025, arXiv 2410.02200) as a PEFT method."""

from peft_configs.registration import register_method
from peft_configs.shared_prefix.config import (
    FORMAT_VERSION,
    SHARE_CHOICES,
    SharedPrefixTuningConfig,
)
from peft_configs.shared_prefix.layer import SharedPrefixLayer
from peft_configs.shared_prefix.model import SharedPrefixModel

register_method("shared_prefix", SharedPrefixTuningConfig, SharedPrefixModel)

__all__ = [
    "FORMAT_VERSION",
    "SHARE_CHOICES",
    "SharedPrefixLayer",
    "SharedPrefixModel",
    "SharedPrefixTuningConfig",
]
