"""Recipe: diversity-enhanced deep mutual learning of Bayesian neural networks."""
