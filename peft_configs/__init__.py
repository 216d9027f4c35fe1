"""PEFT methods of hf-extensions, registered with PEFT when this package is imported.

``import peft_configs`` makes ``get_peft_model``, ``PeftConfig.from_pretrained`` and
``PeftModel.from_pretrained`` know every method below (see :mod:`peft_configs.registration`).
The prefix methods share one mechanism, :mod:`peft_configs.injection`, that injects prefix
keys/values into the self-attention of BERT/RoBERTa, ViT, GPT-2 and Llama family models:
shared-structure prefix tuning (:mod:`peft_configs.shared_prefix`) and the L2P / PromptDSI
prompt pool (:mod:`peft_configs.prompt_pool`).
"""

from peft_configs.injection import PrefixSite, attach_prefix_sites, find_self_attention_modules
from peft_configs.prompt_pool import PromptPoolConfig, PromptPoolModel, query_features, topic_keys
from peft_configs.shared_prefix import SharedPrefixModel, SharedPrefixTuningConfig

__all__ = [
    "PrefixSite",
    "PromptPoolConfig",
    "PromptPoolModel",
    "SharedPrefixModel",
    "SharedPrefixTuningConfig",
    "attach_prefix_sites",
    "find_self_attention_modules",
    "query_features",
    "topic_keys",
]
