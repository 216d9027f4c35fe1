"""Prompt gradient alignment (PGA) for unsupervised domain adaptation: the CLIP prompt learner.

Phan et al., "Enhancing Domain Adaptation through Prompt Gradient Alignment", NeurIPS 2024
(arXiv 2406.09353). The trainer is :class:`trainers.PGATrainer`; here
:mod:`~hf_extensions.pga.clip_prompts` holds the CoOp-style shared + per-domain prompt learner
over a frozen ``transformers.CLIPModel`` and its zero-shot pseudo-labels.
"""
