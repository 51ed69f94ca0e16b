"""Counterfactual explanation methods, as pure functions of arrays and parameter pytrees.

- :mod:`cfjax.methods.ecinn`: closed-form counterfactuals and ECINNh heatmaps from an invertible
  generative classifier (Hvilshoj et al., 2021).
- :mod:`cfjax.methods.disc`: DISC, counterfactuals for any trained (BatchNorm) classifier by deep
  model inversion (Thiagarajan et al., 2021): objective terms, BatchNorm-statistics capture and
  progressive batched optimisation with Optax.

Nothing here reads files, parses command lines or draws progress bars (see cfjax.pipelines).
"""
