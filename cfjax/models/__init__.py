"""Models: the Glow flow (:mod:`cfjax.models.glow`), its layers (:mod:`cfjax.models.flows`), latents and classifiers."""
