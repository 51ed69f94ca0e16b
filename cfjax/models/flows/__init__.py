"""Invertible layers of the Glow flow, as pure functions over explicit parameter pytrees.

Every layer maps ``(B, H, W, C)`` float32 arrays and returns ``(output, logdet)`` with ``logdet``
of shape ``(B,)``; the inverse returns the log-determinant of the inverse map (minus the forward's).
"""

from cfjax.models.flows import actnorm, conv1x1, coupling, reshape, split

__all__ = ["actnorm", "conv1x1", "coupling", "reshape", "split"]
