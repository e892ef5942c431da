#!/usr/bin/env bash
# The CUDA checks on a GPU machine: the CUDA tests, the runtimes benchmark (eager against compiled
# with CUDA graphs, and torch.compile's modes), the README's main job on the GPU followed by export
# and apply, the ~1B Llama decoder study from a cold start, and the rest of the suite with the GPU
# present (in parallel where pytest-xdist is installed). Each step has its own time limit, so one
# slow step cannot take the others' time; logs and tables go to $OUT.
#
#     PYTHON=.venv/bin/python OUT=/tmp/cuda_out bash benchmarks/cuda_check.sh     (a CUDA GPU present)
#     STEPS="pytest_cuda runtime_ratios_cuda fp8_gpt2_cuda search_cuda export_cuda" ... runs only the steps named
#     (that set is the quick check, about 9.5 minutes)
#     STEPS=llama_1b_cuda ... the 1B decoder study alone, at most 8 minutes
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

# The quick check: the limits of the next five steps add up to about 9.5 minutes.
TAIL=25 step pytest_cuda 70 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests
# eager against compiled (mode reduce-overhead: CUDA graphs), MiniLM, every policy (fp8 where the GPU has it)
TAIL=30 step runtime_ratios_cuda 130 "$PY" benchmarks/runtime_ratios.py --device "$DEV" --models minilm --rounds 5 \
    --no-extras --min-round-s 0.1
# fp8 at GPT-2's 124M shape: fp8 against bf16, compiled
TAIL=20 step fp8_gpt2_cuda 100 "$PY" benchmarks/runtime_ratios.py --device "$DEV" --models gpt2 --rounds 5 --no-extras \
    --min-round-s 0.1 --policies all-bf16,all-fp8,fp8-large+bf16
# the README's main job in the compiled runtime (CUDA's default; said explicitly): torch.compile with CUDA
# graphs, a cold inductor cache beside the store (every distinct policy compiles once); --timeout keeps it in
# its limit (trials stop starting after it; no re-time of the front, which would compile every member again)
DB="${DB_DIR:-/tmp/autoprec_cuda}"
rm -rf "$DB" && mkdir -p "$DB"
TAIL=45 step search_cuda 230 "$PY" -m autoprec search studies/minilm/model.py --trials 12 --timeout 140 --no-retime \
    --device "$DEV" --runtime compiled --storage "sqlite:///$DB/minilm_cuda.db" --no-progress
TAIL=5 step export_cuda 20 "$PY" -m autoprec export --storage "sqlite:///$DB/minilm_cuda.db" --study minilm \
    --pick fastest -o "$OUT/minilm_cuda_policy.json"
cp "$DB/minilm_cuda.db" "$OUT/" 2>/dev/null
# not in the quick check (run them with STEPS=...): the apply of the exported policy, the 1B decoder study and
# the whole suite
TAIL=20 step apply_cuda 120 "$PY" -m autoprec apply "$OUT/minilm_cuda_policy.json" studies/minilm/model.py --device "$DEV"

# The ~1B Llama decoder (studies/llama with AUTOPREC_LLAMA_SIZE=1b: hidden 2048, 16 layers, 1.2B parameters,
# 4.8 GB in fp32), prefill 4 x 512 tokens, in the compiled runtime (CUDA graphs), from a cold start: a new
# store and empty inductor and Triton caches. 24 trials, none started after 330 s; the step ends within 8
# minutes. Then the trials (compile seconds and the forward's peak memory per trial), the front, and the
# search process's peak device memory against the model's fp32 size. LLAMA_MAX_DROP: the largest allowed
# drop of the score, a mean KL divergence in nats per token (studies/llama/README.md). A dry run without a GPU:
# DEVICE=cpu LLAMA_SIZE=tiny STEPS=llama_1b_cuda bash benchmarks/cuda_check.sh
LLAMA_PEAK='
import sys

import torch

from autoprec.cli import main

# autoprec resets the peak statistics before each forward it measures: keep the largest seen before each reset
peak = {"allocated": 0, "reserved": 0}
reset = torch.cuda.reset_peak_memory_stats


def keep_peak_then_reset(device=None):
    peak["allocated"] = max(peak["allocated"], torch.cuda.max_memory_allocated(device))
    peak["reserved"] = max(peak["reserved"], torch.cuda.max_memory_reserved(device))
    reset(device)


torch.cuda.reset_peak_memory_stats = keep_peak_then_reset
code = main(sys.argv[1:])
if torch.cuda.is_available():
    keep_peak_then_reset()
    gib = 2 ** 30
    print("search process peak device memory: %.2f GiB allocated, %.2f GiB reserved by torch"
          % (peak["allocated"] / gib, peak["reserved"] / gib))
sys.exit(code)
'
LLAMA_SUMMARY='
import csv
import statistics
import sys
from pathlib import Path

GIB = 2 ** 30
rows = list(csv.DictReader(open(sys.argv[1])))


def num(row, key):
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return None


print("trial  state    feasible      drop  latency_ms  vs fp32  compile_s  peak GiB  default  bf16 int8  fp8 int4  origin")
for r in rows:
    drop, ms, ratio, comp, peak = (num(r, k) for k in ("score_drop", "latency_ms", "latency_ratio", "compile_s",
                                                         "peak_bytes"))
    cells = ["-" if v is None else "%.3g" % v for v in (drop, ms, ratio, comp)]
    counts = " ".join("%4d" % int(num(r, f) or 0) for f in ("bf16", "int8", "fp8", "int4"))
    line = "%5s  %-8s %-8s %9s  %10s %8s %10s %9.2f  %-7s  %s  %s %s" % (
        r["trial"], r["state"], r["feasible"], *cells, (peak or 0) / GIB, r["default"], counts, r["origin"],
        r.get("reason") or "")
    print(line.rstrip())
uniform = [num(r, "compile_s") for r in rows if r["origin"].startswith("uniform") and num(r, "compile_s") is not None]
later = [num(r, "compile_s") for r in rows if not r["origin"].startswith("uniform") and num(r, "compile_s") is not None]
print("trials: %d; compile seconds of the uniform trials: %s; %s" % (
    len(rows), [round(v, 1) for v in uniform],
    "median after them: %.1f over %d trials" % (statistics.median(later), len(later)) if later else "none after them"))
fp32 = next((num(r, "memory_bytes") for r in rows if r["origin"] == "uniform fp32"), None)
peaks = [num(r, "peak_bytes") for r in rows if num(r, "peak_bytes")]
if fp32:
    print("fp32 model: %.2f GiB" % (fp32 / GIB) + ("; largest forward peak of a trial: %.2f GiB (%.2fx)" % (
        max(peaks) / GIB, max(peaks) / fp32) if peaks else ""))
smi = Path(sys.argv[2])
samples = [int(v) for v in smi.read_text().split() if v.isdigit()] if smi.exists() else []
if samples:
    used = max(samples) * 2 ** 20
    print("device memory used (nvidia-smi every 0.5 s, whole GPU), peak: %.2f GiB" % (used / GIB)
          + (" = %.2fx the fp32 model" % (used / fp32) if fp32 else ""))
'
llama_1b() {
    local dir="${LLAMA_DIR:-/tmp/autoprec_llama}" smi="" start=$SECONDS
    local url="sqlite:///$dir/llama_1b.db"
    rm -rf "$dir" && mkdir -p "$dir"
    export AUTOPREC_LLAMA_SIZE="${LLAMA_SIZE:-1b}" TRITON_CACHE_DIR="$dir/triton"
    if command -v nvidia-smi >/dev/null; then  # device memory as the driver sees it (CUDA graph pools included)
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$dir/smi.txt" 2>/dev/null &
        smi=$!
    fi
    timeout 420 "$PY" -c "$LLAMA_PEAK" search studies/llama/model.py --study llama_1b --space studies/llama/gpu.yaml \
        --device "$DEV" --runtime compiled --trials 24 --timeout 330 --no-retime --max-drop "${LLAMA_MAX_DROP:-0.01}" \
        --storage "$url" --no-progress
    echo "search: exit $? in $((SECONDS - start)) s"
    [ -n "$smi" ] && kill "$smi" 2>/dev/null
    "$PY" -m autoprec trials --storage "$url" --study llama_1b -o "$OUT/llama_1b_trials.csv"
    cp "$dir/llama_1b.db" "$OUT/" 2>/dev/null
    "$PY" -c "$LLAMA_SUMMARY" "$OUT/llama_1b_trials.csv" "$dir/smi.txt"
    "$PY" -m autoprec front --storage "$url" --study llama_1b
}
export -f llama_1b
export PY DEV OUT LLAMA_PEAK LLAMA_SUMMARY
TAIL=80 step llama_1b_cuda 480 bash -c llama_1b

PARALLEL=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 12")  # pytest-xdist where installed
TAIL=15 step pytest_rest 300 "$PY" -m pytest -v -rfE -p no:cacheprovider $PARALLEL tests
