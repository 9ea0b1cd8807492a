#!/bin/bash
# Stage 1 on a GPU machine: build the rasterizers (unless this machine has them), train the
# basketball sequence's first timesteps (continuing a run left there by an earlier call), time
# the loop's phases, and gather what came out in $OUT (default ./device_out).
#
#   bash benchmarks/device_d3dgs.sh DEADLINE_SECONDS [bench]
#
# Training stops (Ctrl-C, finished timesteps kept) early enough to end by DEADLINE_SECONDS after
# the start, leaving 75 s for the phase benchmark when 'bench' is given. Needs .devdata/basketball
# (the first timesteps of ../shared/data/panoptic_sports/basketball: ims, seg, trimmed metas).
set -u -o pipefail
OUT=${OUT:-./device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
DEADLINE=${1:?deadline in seconds}
BENCH=${2:-}
SEQ=.devdata/basketball
EXP=dev
START=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/device.log"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.log"
if python3 -c "import sys, diff_gaussian_rasterization_feat as b; sys.exit(not b.cuda_available())" 2>/dev/null; then
  echo "rasterizers: already built on this machine" | tee -a "$OUT/device.log"
else
  t0=$(date +%s)
  python3 -m pip install --no-build-isolation --no-deps ./diff-gaussian-rasterization-w-depth > "$OUT/build.log" 2>&1 &
  first=$!
  python3 -m pip install --no-build-isolation --no-deps ./diff-gaussian-rasterization-w-depth-feat >> "$OUT/build_feat.log" 2>&1
  feat=$?
  wait $first && [ $feat = 0 ] || { tail -30 "$OUT/build.log" "$OUT/build_feat.log"; exit 1; }
  echo "rasterizers built in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/device.log"
fi
python3 -c "import diff_gaussian_rasterization_feat as b; print('CUDA path:', b.cuda_available())" | tee -a "$OUT/device.log"

reserve=$([ "$BENCH" = bench ] && echo 75 || echo 15)
budget=$(( $(left) - reserve ))
echo "training for at most $budget s" | tee -a "$OUT/device.log"
timeout --signal=INT "$budget" python3 train_d3dgs.py -s $SEQ -e $EXP --device cuda 2>&1 \
  | tr '\r' '\n' | grep -v -E '^t [0-9]+/[0-9]+:' > "$OUT/train.log"
tail -4 "$OUT/train.log"

if [ "$BENCH" = bench ]; then
  timeout $(( $(left) - 10 )) python3 benchmarks/bench_d3dgs.py -s $SEQ --state output/$EXP/basketball/timesteps \
    --iters 300 2>&1 | tee "$OUT/bench.log" | tail -30
fi

# per-timestep records (time, Gaussians, test metrics) of every finished timestep
python3 - "$OUT/records.json" <<'EOF'
import glob, json, sys
import numpy as np
records = []
for path in sorted(glob.glob("output/dev/basketball/timesteps/*.npz")):
    with np.load(path) as f:
        r = json.loads(str(f["record"]))
    records.append({"t": int(path[-10:-4]), "seconds": r["seconds"], "iterations": r["iterations"],
                    "gaussians": r["gaussians"], "psnr": r["test"]["psnr"], "ssim": r["test"]["ssim"],
                    "cameras": {c: round(m["psnr"], 3) for c, m in r["test"]["cameras"].items()}})
json.dump(records, open(sys.argv[1], "w"), indent=1)
if records:
    print(f"{len(records)} timesteps finished; test PSNR mean {np.mean([r['psnr'] for r in records]):.2f} dB")
EOF
