#!/bin/bash
# Build, check and time the CUDA rasterizers on a GPU machine, logs to $OUT (default ./device_out).
#
#   bash benchmarks/device_rasterizer.sh [STEP ...]      (default: build test memcheck bench)
#
# Steps: build    pip-install both rasterizer packages with their CUDA extension (sm_90)
#        test     the GPU tests, tests/test_cuda_rasterizer.py
#        memcheck compute-sanitizer memcheck on benchmarks/rasterizer_memcheck.py
#        bench    the agreed benchmark for ours and gsplat 1.5.3 at 100k, 300k, 1M Gaussians
#        ours     the benchmark for ours alone
#        profile  kernel times, host time and memory at the peak per call at 300k, memory also for
#                 gsplat (benchmarks/rasterizer_profile.py)
# Needs beside the repository: .whl/ (gsplat-1.5.3 and pytest wheels, installed to /tmp/site) and
# .devdata/bench/ (rasterizer_bench.py and train_meta.json, copied from ../shared/bench).
set -u -o pipefail
OUT=${OUT:-./device_out}
mkdir -p "$OUT"
STEPS=${*:-build test memcheck bench}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
BENCH=.devdata/bench/rasterizer_bench.py
SIZES=${SIZES:-"100000 300000 1000000"}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.log"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.log"
nvcc --version | tail -1 | tee -a "$OUT/device.log"

for step in $STEPS; do
  case $step in
  build)
    source benchmarks/device_build.sh || exit 1 ;;
  test)
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_rasterizer.py 2>&1 | tee "$OUT/tests.log" | tail -30 \
      || exit 1 ;;
  memcheck)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
      python3 benchmarks/rasterizer_memcheck.py > "$OUT/memcheck.log" 2>&1
    echo "memcheck exit code $?"; tail -5 "$OUT/memcheck.log" ;;
  profile)
    python3 benchmarks/rasterizer_profile.py --gaussians 300000 --meta .devdata/bench/train_meta.json --gsplat \
      2>&1 | tee "$OUT/profile.log" ;;
  bench|ours)
    for n in $SIZES; do
      python3 $BENCH dgr $n 2>&1 | grep -E "^dgr|Error|error" | tee -a "$OUT/bench.log"
      [ "$step" = bench ] && python3 $BENCH gsplat $n 2>&1 | grep -E "^gsplat|Error|error" | tee -a "$OUT/bench.log"
    done ;;
  *)
    echo "unknown step $step"; exit 2 ;;
  esac
done
