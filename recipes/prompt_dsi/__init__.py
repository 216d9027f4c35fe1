"""PromptDSI incremental-indexing recipe (see README.md)."""
