#!/usr/bin/env bash
# The CUDA checks, in one run on a GPU machine with autoprec's [all] extras installed: the CUDA tests,
# the runtimes benchmark (eager against compiled with CUDA graphs; fp8 at GPT-2's 124M shape), the
# README's main job on the GPU in the compiled runtime followed by export and apply, and the rest of the
# suite with the GPU present (in parallel where pytest-xdist is installed). Each step has its own time
# limit, so one slow step cannot take the others' time; logs and tables go to $OUT.
#
#     PYTHON=.venv/bin/python OUT=cuda_out bash benchmarks/cuda_check.sh     (a CUDA GPU present)
#     STEPS="pytest_cuda runtime_ratios_cuda fp8_gpt2_cuda search_cuda export_cuda" ... runs only the steps named
#     (that set takes about 9.5 minutes; apply_cuda and pytest_rest add about 7 more)
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

# The first five steps' limits add up to about 9.5 minutes.
TAIL=25 step pytest_cuda 70 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests
# eager against compiled (mode reduce-overhead: CUDA graphs), MiniLM, every policy (fp8 where the GPU has it)
TAIL=30 step runtime_ratios_cuda 130 "$PY" benchmarks/runtime_ratios.py --device "$DEV" --models minilm --rounds 5 \
    --no-extras --min-round-s 0.1
# fp8 at GPT-2's 124M shape: fp8 against bf16, compiled
TAIL=20 step fp8_gpt2_cuda 100 "$PY" benchmarks/runtime_ratios.py --device "$DEV" --models gpt2 --rounds 5 --no-extras \
    --min-round-s 0.1 --policies all-bf16,all-fp8,fp8-large+bf16
# the README's main job in the compiled runtime (CUDA's default; said explicitly): torch.compile with CUDA
# graphs, a cold inductor cache beside the store (every distinct policy compiles once); --timeout keeps it within
# the step's limit (trials stop starting after it; no re-time of the front, which would compile every member again)
DB="${DB_DIR:-/tmp/autoprec_cuda}"
rm -rf "$DB" && mkdir -p "$DB"
TAIL=45 step search_cuda 230 "$PY" -m autoprec search studies/minilm/model.py --trials 12 --timeout 140 --no-retime \
    --device "$DEV" --runtime compiled --storage "sqlite:///$DB/minilm_cuda.db" --no-progress
TAIL=5 step export_cuda 20 "$PY" -m autoprec export --storage "sqlite:///$DB/minilm_cuda.db" --study minilm \
    --pick fastest -o "$OUT/minilm_cuda_policy.json"
cp "$DB/minilm_cuda.db" "$OUT/" 2>/dev/null
# the apply of the exported policy, and the whole suite with the GPU present
TAIL=20 step apply_cuda 120 "$PY" -m autoprec apply "$OUT/minilm_cuda_policy.json" studies/minilm/model.py --device "$DEV"
PARALLEL=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 12")  # pytest-xdist where installed
TAIL=15 step pytest_rest 300 "$PY" -m pytest -v -rfE -p no:cacheprovider $PARALLEL tests
