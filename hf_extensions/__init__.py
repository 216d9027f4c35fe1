"""hf-extensions: Hugging Face ecosystem plug-ins for ten recent research methods.

The import packages are ``hf_extensions`` (the shared core, and one package per method for its
machinery: ``fhbi``, ``bnn``, ``hierarchical_cl``, ``prompt_dsi``, ``pga``, ``schedulers`` (S2N),
``pipelines`` (concept erasure), ``quantization`` (MetaAug)), ``trainers`` (``Trainer``
subclasses with their ``TrainingArguments`` configs) and ``peft_configs`` (PEFT methods
registered with PEFT on import). The version below is the package's only version string.
"""

__version__ = "0.1.0.dev0"

# Registers the "hf_extensions_metaaug" quantization method with transformers, so that
# `AutoModel...from_pretrained` rebuilds a model saved by MetaAugQuantizer (light: the
# reconstruction and Optimum parts load on first use).
from hf_extensions import quantization  # noqa: F401
