"""PromptDSI (prompt-based rehearsal-free incremental indexing): the retrieval machinery.

"PromptDSI: Prompt-based Rehearsal-free Instance-wise Incremental Learning for Document
Retrieval" (arXiv 2406.12593). The trainer is :class:`trainers.PromptDSITrainer` over the
topic-aware prompt pool of :mod:`peft_configs.prompt_pool`; here:

- :mod:`~hf_extensions.prompt_dsi.dsi`: the classification DSI with growing docid rows and
  IncDSI's row solver;
- :mod:`~hf_extensions.prompt_dsi.retrieval`: the embedded standard-library docstring corpus
  (D0 + increments, disjoint train / test query spans).
"""
