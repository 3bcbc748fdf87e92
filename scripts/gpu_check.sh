#!/usr/bin/env bash
# The GPU check anyone with a CUDA GPU can run: GPU-marked tests, the throughput benchmark at 224 px for
# efficientnet_lite0 and resnet50, the loader (PIL against the decode-once store) and feature-cache benchmarks, and a
# head grid benchmark, and a 1-epoch finetune-compare on the default data (each strategy tuned on COMPARE_TRIALS
# configurations, default 4). Everything lands in OUTDIR.
# Needs only a CUDA PyTorch install plus this project's requirements and peft (strategy=lora; without it lora's
# compare job fails alone, saying so); runs the project as modules, so it also works
# where the console scripts are not installed (set PYTHONPATH=src).
#   usage: scripts/gpu_check.sh OUTDIR        (PYTHON=python3.12 to pick the interpreter)
# Time boxes for a lease of fixed length (seconds; 0 = none): LIMIT_TESTS LIMIT_BENCH LIMIT_LOADER LIMIT_CACHE
# LIMIT_GRID LIMIT_COMPARE. BENCH_STRATEGIES narrows the throughput table (default: every strategy config);
# COMPARE_STRATEGIES the comparison (a Hydra list, e.g. [full,freeze,cached]; default: every strategy).
# More arguments: TEST_ARGS (pytest, e.g. "-n 6" with pytest-xdist), BENCH_ARGS (e.g. "--models resnet50
# --repeats 1"), LOADER_ARGS (e.g. "--images 3000"), CACHE_ARGS (e.g. "--sizes 20000"). A benchmark run that
# failed leaves its log as OUTDIR/<benchmark>_failed_run.log. SKIP leaves sections out:
# "tests bench loader cache grid compare".
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
status=0

wanted() { [[ " ${SKIP:-} " != *" $1 "* ]]; }

step() {  # step LIMIT command...: runs the command, killed after LIMIT seconds (0: no limit); a failure marks the check
  local limit=$1; shift
  if [ "$limit" -gt 0 ]; then timeout --kill-after=10 "$limit" "$@"; else "$@"; fi
  local rc=$?
  if [ $rc -ne 0 ]; then
    status=1
    [ $rc -eq 124 ] && echo "   (stopped at its ${limit}s time box)"
  fi
  return 0
}

echo "== device" | tee "$out/gpu.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ; } 2>&1 | tee -a "$out/gpu.txt"

if wanted tests; then
echo "== GPU tests"
read -r -a test_args <<< "${TEST_ARGS:-}"
step "${LIMIT_TESTS:-0}" "$py" -m pytest -m gpu -q -p no:cacheprovider ${test_args[@]:+"${test_args[@]}"} tests \
  -o junit_family=xunit2 --junitxml="$out/gpu_tests.xml" > "$out/gpu_tests.log" 2>&1
tail -n 25 "$out/gpu_tests.log"
fi

if wanted bench; then
echo "== benchmark (224 px, batch 256)"
read -r -a strategies <<< "${BENCH_STRATEGIES:-}"
read -r -a bench_args <<< "${BENCH_ARGS:---models efficientnet_lite0 resnet50}"
step "${LIMIT_BENCH:-0}" "$py" -m finetune.bench --device cuda --image-size 224 --batch-size 256 "${bench_args[@]}" \
  ${strategies[@]:+--strategies "${strategies[@]}"} --out "$out/bench.json" > "$out/bench.log" 2>&1
grep -vE "Warning|warnings.warn|LitLogger|Tip:" "$out/bench.log" | tail -n 30
fi

if wanted loader; then
echo "== loader: 10,000 JPEGs, PIL path against the store (nvJPEG decode, roi_align augmentation on the GPU)"
read -r -a loader_args <<< "${LOADER_ARGS:-}"
step "${LIMIT_LOADER:-0}" "$py" -m finetune.bench loader --device cuda --work-dir "$out/bench_loader_work" \
  ${loader_args[@]:+"${loader_args[@]}"} --out "$out/bench_loader.json" > "$out/bench_loader.log" 2>&1
grep -vE "Warning|warnings.warn" "$out/bench_loader.log" | tail -n 8
fi

if wanted cache; then
echo "== feature cache: build, hit and resume at 50k rows (extraction on the GPU)"
read -r -a cache_args <<< "${CACHE_ARGS:---sizes 50000}"
step "${LIMIT_CACHE:-0}" "$py" -m finetune.bench cache --work-dir "$out/bench_cache_work" "${cache_args[@]}" \
  --out "$out/bench_cache.json" > "$out/bench_cache.log" 2>&1
find "$out/bench_cache_work" -name bench.log -exec cat {} + 2>/dev/null | tail -n 60 > "$out/bench_cache_failed_run.log"
[ -s "$out/bench_cache_failed_run.log" ] || rm -f "$out/bench_cache_failed_run.log"
tail -n 10 "$out/bench_cache.log"
fi

if wanted grid; then
echo "== head grid: 1 to 64 heads in one pass over cached features (on the GPU)"
step "${LIMIT_GRID:-0}" "$py" -m finetune.bench head_grid --device cuda --work-dir "$out/bench_head_grid_work" \
  --out "$out/bench_head_grid.json" > "$out/bench_head_grid.log" 2>&1
tail -n 8 "$out/bench_head_grid.log"
fi

if wanted compare; then
echo "== finetune-compare, 1 epoch on the default data, one seed"
step "${LIMIT_COMPARE:-0}" "$py" -m finetune.compare trainer.max_epochs=1 "compare.seeds=[42]" \
  "compare.tune.trials=${COMPARE_TRIALS:-4}" \
  ${COMPARE_STRATEGIES:+"compare.strategies=$COMPARE_STRATEGIES"} "hydra.run.dir=$out/compare" \
  ~callbacks.progress_bar > "$out/compare.log" 2>&1
tail -n 20 "$out/compare.log"
fi
exit $status
