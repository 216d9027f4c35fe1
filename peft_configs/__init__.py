"""PEFT methods of hf-extensions, registered with PEFT when this package is imported."""
