"""Counterfactual explanation methods, as pure functions of arrays and parameter pytrees.

- :mod:`cfjax.methods.ecinn`: closed-form counterfactuals and ECINNh heatmaps from an invertible
  generative classifier (Hvilshoj et al., 2021).
- :mod:`cfjax.methods.disc`: DISC, counterfactuals for any trained (BatchNorm) classifier by deep
  model inversion (Thiagarajan et al., 2021): objective terms and progressive batched
  optimisation with Optax.
- :mod:`cfjax.methods.bn_capture`: running any Flax linen classifier while recording its
  BatchNorm inputs, and DeepInversion's BatchNorm-statistics loss over them.
- :mod:`cfjax.methods.deep_inversion`: DeepInversion (data-free images from a classifier), the one
  total variation and the unrolled-chunk plan DISC shares.

Nothing here reads files, parses command lines or draws progress bars (see cfjax.pipelines).
"""
