"""cfjax: counterfactual explanations for image classifiers in JAX.

Pure functions (jit/vmap/grad-able, explicit parameter pytrees):
  cfjax.models.glow              Glow flow: GlowConfig, init_glow, glow_forward, glow_inverse
  cfjax.models.flows             its layers: actnorm, conv1x1, coupling, reshape (squeeze/Haar), split
  cfjax.models.latent            class-conditional Gaussians, Bayes classifier, IB-INN loss
  cfjax.models.flow_classifier   the ECINN model bundle: encode, decode, predict_proba, loss_fn
  cfjax.methods.ecinn            counterfactual, counterfactuals_all_classes, heatmap
  cfjax.methods.disc             DISC objective terms and batched optimisation
Ground: cfjax.validation (checks on images, targets, numbers), cfjax.model_dirs (load / export
every model kind), cfjax.data, cfjax.metrics.
One-call objects: cfjax.Explainer.pretrained("mnist5k").explain(x, target="next") (ECINN) and
cfjax.DISCExplainer.pretrained("mnist5k") or cfjax.DISCExplainer(apply_fn, variables) (DISC).
"""

from cfjax.errors import CfjaxError, CheckpointError

__version__ = "0.1.0"

__all__ = ["CfjaxError", "CheckpointError", "DISCExplainer", "Explainer", "__version__",
           *sorted(["glow", "flows", "latent", "flow_classifier", "ecinn", "disc", "metrics", "data", "validation", "model_dirs"])]

# The pure-function modules, importable as attributes (cfjax.ecinn.counterfactual, ...), loaded
# on first use so that `import cfjax` stays light.
_LAZY = {
    "glow": "cfjax.models.glow",
    "flows": "cfjax.models.flows",
    "latent": "cfjax.models.latent",
    "flow_classifier": "cfjax.models.flow_classifier",
    "ecinn": "cfjax.methods.ecinn",
    "disc": "cfjax.methods.disc",
    "metrics": "cfjax.metrics",
    "data": "cfjax.data",
    "validation": "cfjax.validation",
    "model_dirs": "cfjax.model_dirs",
}


def __getattr__(name):
    if name in ("Explainer", "DISCExplainer"):  # loaded on first use too: `import cfjax` (and the CLI's start) needs no JAX
        from cfjax import explainer

        return getattr(explainer, name)
    if name in _LAZY:
        import importlib

        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'cfjax' has no attribute {name!r}")
