#!/usr/bin/env bash
# The CUDA checks, in one run for a lent GPU: the CUDA tests, the measurement-stability benchmark
# on the GPU, the runtimes benchmark (eager against compiled with CUDA graphs, and torch.compile's
# modes), the README's main job on the GPU followed by export and apply, and the rest of the
# suite with the GPU present (in parallel where pytest-xdist is installed). Each step has its own
# time limit, so one slow step cannot take the others' time; logs and tables go to $OUT.
#
#     PYTHON=.venv/bin/python OUT=/tmp/cuda_out bash benchmarks/cuda_check.sh     (a CUDA GPU present)
#     STEPS="pytest_cuda runtime_ratios_cuda search_cuda export_cuda apply_cuda" ... runs only the steps named
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/cuda_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
PY="${PYTHON:-python3}"
DEV="${DEVICE:-cuda}"  # DEVICE=cpu dry-runs the script without a GPU
step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its log, say how it ended
    local name=$1 limit=$2
    shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi  # STEPS="a b": only those
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - start)) s (limit $limit s)"
    tail -n "${TAIL:-40}" "$OUT/$name.log"
}

"$PY" - <<'EOF'
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF

TAIL=60 step stability_cuda 140 "$PY" benchmarks/measurement_stability.py --device "$DEV" --repeats 5
TAIL=12 step int8_overhead_cuda 60 "$PY" benchmarks/int8_call_overhead.py --device "$DEV"
TAIL=15 step pytest_cuda 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_evaluate.py tests/test_precision.py \
    tests/test_profile.py tests/test_static_int8.py tests/test_runtime.py
# eager against compiled (mode reduce-overhead: CUDA graphs), then MiniLM in the other torch.compile modes
TAIL=30 step runtime_ratios_cuda 180 "$PY" benchmarks/runtime_ratios.py --device "$DEV" --rounds 7
TAIL=20 step runtime_modes_cuda 150 "$PY" benchmarks/runtime_ratios.py --device "$DEV" --models minilm --no-extras \
    --modes default,max-autotune-no-cudagraphs --rounds 5
rm -rf "$OUT/minilm_cuda.db" "$OUT/minilm_cuda.db.inductor"
# the main job in the compiled runtime (CUDA's default; said explicitly): torch.compile with CUDA graphs,
# inductor's cache in $OUT/minilm_cuda.db.inductor (a cold cache: every distinct policy compiles once)
TAIL=40 step search_cuda 300 "$PY" -m autoprec search studies/minilm/model.py --trials 12 --device "$DEV" \
    --runtime compiled --storage "sqlite:///$OUT/minilm_cuda.db" --no-progress
TAIL=5 step export_cuda 30 "$PY" -m autoprec export --storage "sqlite:///$OUT/minilm_cuda.db" --study minilm \
    --pick fastest -o "$OUT/minilm_cuda_policy.json"
TAIL=20 step apply_cuda 120 "$PY" -m autoprec apply "$OUT/minilm_cuda_policy.json" studies/minilm/model.py --device "$DEV"
# the rest of the suite where a GPU is present: models and searches that default to cuda run there
# (-v: each result is logged as it ends, so a run stopped at its limit still names what failed)
PARALLEL=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 12")  # pytest-xdist where installed
TAIL=15 step pytest_rest 300 "$PY" -m pytest -v -rfE -p no:cacheprovider $PARALLEL --ignore tests/test_evaluate.py \
    --ignore tests/test_precision.py tests
