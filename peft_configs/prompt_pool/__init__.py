"""A prompt pool as a PEFT method: L2P (Wang et al., CVPR 2022) and PromptDSI (arXiv 2406.12593).

Prefix key/value prompts selected per input by cosine similarity between a query feature and the
pool's keys (learned, or fixed topic keys), or by an explicit prompt id (task-indexed prompts for
continual learning). Importing this package registers the method with PEFT.
"""

from peft_configs.prompt_pool.config import (
    FORMAT_VERSION,
    KEY_SOURCES,
    QUERY_SOURCES,
    PromptPoolConfig,
)
from peft_configs.prompt_pool.layer import PromptPoolLayer
from peft_configs.prompt_pool.model import PromptPoolModel
from peft_configs.prompt_pool.selection import (
    cosine_similarity_matrix,
    cosine_top_k,
    query_features,
    topic_keys,
    usage_entropy,
)
from peft_configs.registration import register_method

register_method("prompt_pool", PromptPoolConfig, PromptPoolModel)

__all__ = [
    "FORMAT_VERSION",
    "KEY_SOURCES",
    "QUERY_SOURCES",
    "PromptPoolConfig",
    "PromptPoolLayer",
    "PromptPoolModel",
    "cosine_similarity_matrix",
    "cosine_top_k",
    "query_features",
    "topic_keys",
    "usage_entropy",
]
