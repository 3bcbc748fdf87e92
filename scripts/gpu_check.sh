#!/usr/bin/env bash
# The GPU check anyone with a CUDA GPU can run: GPU-marked tests, the throughput benchmark at 224 px for
# efficientnet_lite0 and resnet50, the loader (PIL against the decode-once store) and feature-cache benchmarks, and a
# 1-epoch finetune-compare on the default data. Everything lands in OUTDIR.
# Needs only a CUDA PyTorch install plus this project's requirements and peft (strategy=lora; without it lora's
# compare job fails alone, saying so); runs the project as modules, so it also works
# where the console scripts are not installed (set PYTHONPATH=src).
#   usage: scripts/gpu_check.sh OUTDIR        (PYTHON=python3.12 to pick the interpreter)
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
status=0

echo "== device" | tee "$out/gpu.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ; } 2>&1 | tee -a "$out/gpu.txt"

echo "== GPU tests"
"$py" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log" || status=1

echo "== benchmark (224 px, batch 256)"
"$py" -m finetune.bench --device cuda --models efficientnet_lite0 resnet50 --image-size 224 --batch-size 256 \
  --out "$out/bench.json" 2>&1 | grep -vE "Warning|warnings.warn|LitLogger|Tip:" | tee "$out/bench.log" || status=1

echo "== loader: 10,000 JPEGs, PIL path against the store (nvJPEG decode, roi_align augmentation on the GPU)"
"$py" -m finetune.bench loader --device cuda --work-dir "$out/bench_loader_work" --out "$out/bench_loader.json" \
  2>&1 | grep -vE "Warning|warnings.warn" | tail -n 6 | tee "$out/bench_loader.log" || status=1

echo "== feature cache: build, hit and resume at 50k rows (extraction on the GPU)"
"$py" -m finetune.bench cache --sizes 50000 --work-dir "$out/bench_cache_work" \
  --out "$out/bench_cache.json" 2>&1 | tail -n 8 | tee "$out/bench_cache.log" || status=1

echo "== finetune-compare, 1 epoch on the default data, one seed"
"$py" -m finetune.compare trainer.max_epochs=1 "compare.seeds=[42]" "hydra.run.dir=$out/compare" ~callbacks.progress_bar \
  > "$out/compare.log" 2>&1 || status=1
tail -n 8 "$out/compare.log"
exit $status
