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

- ``--xla_force_host_platform_device_count=N`` (N = the CPU cores this process may use) for DISC:
  XLA:CPU runs each of DISC's small convolutions on one core, so one device leaves the other
  cores idle; as N host devices, ``cfjax explain disc`` (``--devices`` defaults to all) splits
  the queries over them and every device optimises its own slice (``cfjax.parallel``).
  Measured on 2 cores: DISC's defaults 1.39x on 64 queries (22.7 s -> 16.3 s after compilation),
  the pixel-prior benchmark configuration 1.50x at batch 256; results equal one device's on each
  slice up to float32 rounding. ECINN gains little from it (its program already keeps both
  cores busy at its CLI batch: 0.97x at 256, 1.09x at 4, 1.26x at 16; ``benchmarks.scaling``),
  so it does not get it. Inert where the default backend is a GPU or TPU.

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


HOST_DEVICES = "--xla_force_host_platform_device_count"
# workloads that run as one host device per usable core (see the module docstring)
HOST_DEVICE_WORKLOADS = ("disc",)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def flags_for(workload: str | None) -> tuple[str, ...]:
    """The XLA flags cfjax uses for ``workload`` (``()`` for None or an unlisted workload)."""
    flags = WORKLOADS.get(workload or "", ())
    if workload in HOST_DEVICE_WORKLOADS and usable_cores() > 1:
        flags = (*flags, f"{HOST_DEVICES}={usable_cores()}")
    return flags


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
