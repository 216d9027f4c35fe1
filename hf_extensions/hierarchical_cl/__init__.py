"""Hierarchical-taxonomy prompt continual learning with optimal transport: the method's machinery.

"Leveraging Hierarchical Taxonomies in Prompt-based Continual Learning" (arXiv 2410.04327). The
trainer is :class:`trainers.HierarchicalPromptCLTrainer` over the task-indexed prompt pool of
:mod:`peft_configs.prompt_pool`; here:

- :mod:`~hf_extensions.hierarchical_cl.taxonomy`: label trees, class mixtures, OT class distances;
- :mod:`~hf_extensions.hierarchical_cl.supcon`: the Γ-weighted SupCon terms in one fused pass.
"""
