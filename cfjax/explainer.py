"""A one-call object for users who want ``explain(x, target)`` and nothing else.

>>> import cfjax
>>> ex = cfjax.Explainer.pretrained("mnist5k")          # the shipped ECINN model
>>> out = ex.explain(images, target="next")            # images (N, 28, 28, 1) in [0, 1]
>>> out["x_cf"].shape, out["heatmap"].shape
((N, 28, 28, 1), (N, 28, 28))

Underneath it calls the pure functions of :mod:`cfjax.methods.ecinn`, which JAX code can use
directly (jit, vmap, grad) with ``ex.params`` and ``ex.config``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.validation import validate_images


class Explainer:
    """ECINN counterfactual explainer around a trained flow classifier."""

    def __init__(self, params: dict, config, info: dict | None = None, step=None, direction: str = "predicted_means", refine: int | None = None,
                 residual: float = 1.0):
        """``step`` / ``refine`` default to the CLI's (``adaptive`` with 2 refinement rounds);
        ``step="paper", refine=0`` is the paper's exact two-pass method. ``residual`` < 1 keeps
        less of the query's style (see :func:`cfjax.methods.ecinn.latent_step`)."""
        from cfjax.methods.ecinn import check_options, check_residual, parse_step
        from cfjax.pipelines.explain_ecinn import DEFAULT_REFINE, DEFAULT_STEP

        step = parse_step(DEFAULT_STEP if step is None else step)
        refine = DEFAULT_REFINE if refine is None else int(refine)
        residual = check_residual(residual)
        check_options(step, direction)
        self.params, self.config, self.info = params, config, info or {}
        self.step, self.direction, self.refine, self.residual = step, direction, refine, residual

    @classmethod
    def load(cls, model_dir: str | Path, **kwargs) -> "Explainer":
        """From a model directory written by ``cfjax train flow``."""
        from cfjax import model_dirs

        m = model_dirs.load("flow", model_dir)
        return cls(m.params, m.config, m.info, **kwargs)

    @classmethod
    def pretrained(cls, dataset: str = "mnist5k", **kwargs) -> "Explainer":
        """The model shipped inside the package for ``dataset``."""
        from cfjax.pretrained import default_model_dir

        return cls.load(default_model_dir("flow", dataset), **kwargs)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def predict_proba(self, x) -> np.ndarray:
        """p(y|x): (N, H, W, C) in [0, 1] -> (N, num_classes)."""
        from cfjax.models.flow_classifier import predict_proba

        x = validate_images(x, self.config.image_shape)
        return np.asarray(jax.jit(predict_proba, static_argnums=1)(self.params, self.config, jnp.asarray(x)))

    def predict(self, x) -> np.ndarray:
        return np.argmax(self.predict_proba(x), -1).astype(np.int32)

    def explain(self, x, target="next", batch_size: int = 256) -> dict:
        """Counterfactuals and heatmaps. ``target``: 'next', a class index, or (N,) class indices.

        Returns numpy arrays: x_cf (N, H, W, C), heatmap (N, H, W), y_pred, y_target, y_cf_pred,
        p_pred, p_cf (N,), alpha0, alpha (N,). Raises CfjaxError on bad images or targets.
        """
        from cfjax.pipelines.explain_ecinn import explain_arrays

        return explain_arrays(self.params, self.config, x, target, self.step, self.direction, batch_size, refine=self.refine,
                              residual=self.residual)

    def explain_all_classes(self, x) -> np.ndarray:
        """Counterfactuals of each image to every class: (N, H, W, C) -> (N, num_classes, H, W, C)."""
        from cfjax.methods.ecinn import counterfactuals_all_classes

        x = validate_images(x, self.config.image_shape)
        fn = jax.jit(counterfactuals_all_classes, static_argnames=("config", "step", "direction", "residual"))
        return np.asarray(fn(self.params, self.config, jnp.asarray(x), step=self.step, direction=self.direction,
                             residual=self.residual)["x_cf"])


class DISCExplainer:
    """DISC counterfactuals for any Flax classifier (ideally with BatchNorm), in one call.

    >>> ex = cfjax.DISCExplainer.pretrained("mnist5k")        # shipped CNN + DUQ manifold model
    >>> out = ex.explain(images, target="next")               # images (N, 28, 28, 1) in [0, 1]
    >>> ex = cfjax.DISCExplainer(model.apply, variables)      # your own classifier
    >>> out = ex.explain(images, target=np.array([3, 1, ...]))

    ``apply_fn(variables, x) -> logits (N, C)`` in evaluation mode; ``duq = (log_kernel_fn,
    duq_variables)`` adds manifold consistency (see :func:`cfjax.methods.disc.generate`);
    ``config``: a :class:`cfjax.methods.disc.DISCConfig` (its defaults are the CLI's). All queries
    of a call are optimised together in batches of ``batch_size`` under one compiled program.
    """

    def __init__(self, apply_fn, variables, config=None, duq: tuple | None = None):
        from cfjax.methods.disc import DISCConfig

        self.apply_fn, self.variables, self.duq = apply_fn, variables, duq
        self.config = DISCConfig() if config is None else config
        if not isinstance(self.config, DISCConfig):
            from cfjax.errors import CfjaxError

            raise CfjaxError(f"config must be a DISCConfig, got {type(self.config).__name__}")

    @classmethod
    def load(cls, classifier_dir: str | Path, duq_dir: str | Path | None = None, config=None) -> "DISCExplainer":
        """From model directories written by ``cfjax train classifier`` (and ``train duq``)."""
        from cfjax import model_dirs
        from cfjax.pipelines.explain_disc import duq_from_dir

        m = model_dirs.load("classifier", classifier_dir)
        return cls(m.apply, m.params, config, duq_from_dir(duq_dir) if duq_dir is not None else None)

    @classmethod
    def pretrained(cls, dataset: str = "mnist5k", manifold: bool = True, config=None) -> "DISCExplainer":
        """The classifier (and, with ``manifold``, the DUQ model) shipped for ``dataset``; without
        ``config``, the CLI's defaults for that dataset (the "strokes" style for MNIST, see
        :func:`cfjax.pipelines.explain_disc.default_style`)."""
        from cfjax.methods.disc import DISCConfig, styled
        from cfjax.pipelines.explain_disc import default_style
        from cfjax.pretrained import default_model_dir

        if config is None:
            config = styled(DISCConfig(), default_style(dataset))
        duq = default_model_dir("duq", dataset) if manifold else None
        return cls.load(default_model_dir("classifier", dataset), duq, config)

    def predict_proba(self, x, batch_size: int = 256) -> np.ndarray:
        """Classifier probabilities (N, C) of images (N, H, W, C) in [0, 1]."""
        from cfjax.pipelines.explain_disc import predict_proba_batched

        return predict_proba_batched(self.apply_fn, self.variables, validate_images(x, None, "queries"), batch_size)

    def predict(self, x) -> np.ndarray:
        return np.argmax(self.predict_proba(x), -1).astype(np.int32)

    def explain(self, x, target="next", batch_size: int = 256, seed: int | None = None) -> dict:
        """Counterfactuals of x (N, H, W, C) in [0, 1]. ``target``: 'next', a class index, or (N,)
        class indices. Returns NumPy arrays: x_cf, trajectory, success, y_pred, p_pred, y_target,
        y_cf_pred, p_cf, fit_mse (see :func:`cfjax.pipelines.explain_disc.explain_arrays`)."""
        from cfjax.pipelines.explain_common import resolve_targets
        from cfjax.pipelines.explain_disc import explain_arrays
        from cfjax.validation import validate_targets

        x = validate_images(x, None, "queries")
        probs = self.predict_proba(x, batch_size)
        c = probs.shape[-1]
        if isinstance(target, (str, int, np.integer)):
            target = resolve_targets(target, np.argmax(probs, -1).astype(np.int32), c)
        t = validate_targets(np.asarray(target), c, len(x))
        return explain_arrays(self.apply_fn, self.variables, x, t, self.config, duq=self.duq, batch_size=batch_size, seed=seed)
