"""XLA:CPU compiler settings that cfjax chooses per workload.

XLA reads ``XLA_FLAGS`` once, when JAX creates its backend (the first computation), so a setting
must be in the environment before then. :func:`apply` appends a workload's flags; the ``cfjax``
command line calls it for each command before it computes anything, and library users may call
it themselves at the top of a script::

    import cfjax.xla_cpu
    cfjax.xla_cpu.apply("ecinn")        # before the first JAX computation
    import jax ...

What is applied, and why (measured on 2 Xeon cores with AVX-512, jax/jaxlib 0.10.2; the commands
and numbers are in ``benchmarks/results/xla_cpu_flags_cpu.json``):

- ``--xla_cpu_experimental_ynn_fusion_type=eltwise`` lets XLA put elementwise ops into YNNPACK
  fusions; a coupling subnet (conv3x3, bias, ReLU, conv1x1, bias, ReLU, conv3x3, bias) then
  compiles to one YNNPACK call instead of convolutions separated by XLA passes that write and
  re-read the (B, H, W, hidden) activations. Those passes dominated at these small channel counts;
  with the flag a subnet runs faster. Flow encode/decode, ECINN and flow training get it; DISC
  does not (it runs slower with it). The IB-INN flow's eval mode folds each BatchNorm into its
  convolution (``cfjax.models.ibinn._conv_norm``) so that its subnets are conv + bias + ReLU too:
  with the BatchNorm left as a separate affine map the flag slowed the IB-INN ECINN program down
  (0.8-0.9x), folded it speeds it up (``python -m benchmarks.xla_flags --workloads ecinn_ibinn``).

Nothing is changed when the user's ``XLA_FLAGS`` already names the flag (theirs wins), when
``CFJAX_XLA_DEFAULTS=0`` is set, or once JAX's backend exists (too late to take effect). The
flags only concern XLA's CPU compiler; on GPU/TPU they are inert.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

YNN_ELTWISE = "--xla_cpu_experimental_ynn_fusion_type=eltwise"
OPT_OUT_ENV = "CFJAX_XLA_DEFAULTS"

# workload -> flags; a workload not listed gets none.
WORKLOADS: dict[str, tuple[str, ...]] = {
    "ecinn": (YNN_ELTWISE,),
    "train_flow": (YNN_ELTWISE,),
    "disc": (),
}


def flags_for(workload: str | None) -> tuple[str, ...]:
    """The XLA flags cfjax uses for ``workload`` (``()`` for None or an unlisted workload)."""
    return WORKLOADS.get(workload or "", ())


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0].lstrip("-")


def backend_started() -> bool:
    """True once JAX has created a backend (XLA_FLAGS changes no longer take effect)."""
    import sys

    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - layout of a future jax
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else False


def apply(workload: str | None, environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Append ``workload``'s flags to ``environ["XLA_FLAGS"]`` (default ``os.environ``).

    Returns the flags added: none for a flag whose name the user's XLA_FLAGS already holds, none
    at all under ``CFJAX_XLA_DEFAULTS=0`` or (for the real environment) once a JAX backend exists.
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    if environ is None and backend_started():
        return []
    current = env.get("XLA_FLAGS", "")
    have = {_flag_name(tok) for tok in current.split()}
    added = [f for f in flags_for(workload) if _flag_name(f) not in have]
    if added:
        env["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
    return added
