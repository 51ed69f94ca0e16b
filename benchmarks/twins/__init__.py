"""PyTorch twins of cfjax's models and methods, with weights copied from cfjax checkpoints.

- :mod:`benchmarks.twins.flow`: the Glow generative classifier (FrEIA blocks), its ECINN
  counterfactuals and its IB-INN training step.
- :mod:`benchmarks.twins.disc`: the BatchNorm CNN classifier and the DISC optimisation loop.
"""
