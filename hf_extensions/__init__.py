"""hf-extensions: Hugging Face ecosystem plug-ins for ten recent research methods.

The import packages are ``hf_extensions`` (the shared core plus the diffusers and Optimum
plug-ins), ``trainers`` (``Trainer`` subclasses with their ``TrainingArguments`` configs) and
``peft_configs`` (PEFT methods registered with PEFT on import).
"""

__version__ = "0.1.0.dev0"
