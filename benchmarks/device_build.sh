#!/bin/bash
# Build both rasterizer packages on the device (in parallel, each in its own build/ folder) unless
# this machine has them already; build logs under /tmp, their tail into $OUT/device.log on failure.
# Sourced by the other device_*.sh scripts: `source benchmarks/device_build.sh || exit 1`.
if python3 -c "import sys, diff_gaussian_rasterization as a, diff_gaussian_rasterization_feat as b; \
sys.exit(not (a.cuda_available() and b.cuda_available()))" 2>/dev/null; then
  echo "rasterizers: already built on this machine" | tee -a "$OUT/device.log"
else
  build_start=$(date +%s)
  python3 -m pip install --no-build-isolation --no-deps ./diff-gaussian-rasterization-w-depth > /tmp/build.log 2>&1 &
  build_first=$!
  python3 -m pip install --no-build-isolation --no-deps ./diff-gaussian-rasterization-w-depth-feat > /tmp/build_feat.log 2>&1
  build_feat=$?
  if ! wait $build_first || [ $build_feat != 0 ]; then
    tail -30 /tmp/build.log /tmp/build_feat.log | tee -a "$OUT/device.log"
    return 1
  fi
  echo "rasterizers built in $(( $(date +%s) - build_start )) s" | tee -a "$OUT/device.log"
fi
python3 -c "import diff_gaussian_rasterization as a, diff_gaussian_rasterization_feat as b; \
print('CUDA path:', a.cuda_available(), b.cuda_available())" | tee -a "$OUT/device.log"
