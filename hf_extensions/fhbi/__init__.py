"""Flat Hilbert Bayesian Inference (FHBI): the particle machinery of the method.

Truong et al., "Improving Generalization with Flat Hilbert Bayesian Inference", ICML 2025
(arXiv 2410.04196). The trainer is :class:`trainers.FHBITrainer` (SVGD = FHBI with ρ = 0);
here:

- :mod:`~hf_extensions.fhbi.kernels`: the RBF particle kernel, its median bandwidth and gradient;
- :mod:`~hf_extensions.fhbi.particles`: :class:`~hf_extensions.fhbi.particles.ParticleEnsemble`,
  m LoRA particles (+ one head each) over one frozen backbone, evaluated at once.
"""
