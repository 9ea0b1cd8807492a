#!/bin/bash
# Stages 2 and 4 on a GPU machine; logs to $OUT (default ./device_out).
#
#   bash benchmarks/device_legs.sh [extract] [speed]     (default: both)
#
# 1. Builds the CUDA rasterizers and runs the stage-4 building-block tests on the GPU (the fused
#    Triton attention of legs_attention.py against its PyTorch reference included).
# 2. extract: extract_features.py on the command line, as a user runs it, with a ViCLIP of the real size and
#    random weights saved in the official checkpoint layout ({"model": state_dict}), on one timestep
#    of .devdata/basketball (carried), then the same command again (the timestep is skipped).
#    Needs the open_clip, ftfy and wcwidth wheels in .whl (carried) for the tokenizer's vocabulary.
# 3. speed: stage-4 speed for one basketball-sized timestep: 300k Gaussians, 27 cameras at 640x360, 128
#    channels, random Gaussians and a random stage-2 cache (benchmarks/bench_legs.py speed), cold
#    (2,000 iterations) then warm (500 iterations).
set -u -o pipefail
STEPS=${*:-extract speed}
OUT=${OUT:-./device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.log"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.log"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/open_clip_torch-*.whl .whl/ftfy-*.whl .whl/wcwidth-*.whl && export PYTHONPATH=/tmp/site || exit 1
source benchmarks/device_build.sh || exit 1
python3 -m pytest -q -p no:cacheprovider tests/test_legs_attention.py \
  tests/test_legs.py -k "attention or attend or blend or brute or relevancy" 2>&1 | tail -3 | tee -a "$OUT/device.log"

# stage 2 from the command line
if [[ " $STEPS " == *" extract "* ]]; then
python3 -c "import torch; from feature_extraction.viclip import ViCLIP; torch.manual_seed(0); m = ViCLIP(); \
[torch.nn.init.normal_(p, std=0.02) for p in m.parameters()]; torch.save({'model': m.state_dict()}, '/tmp/viclip_random.pth')" || exit 1
cmd="python3 extract_features.py -s .devdata/basketball -f 10 -l 10 --viclip-ckpt /tmp/viclip_random.pth"
for run in first again; do
  echo "$cmd   ($run)" | tee -a "$OUT/extract.log"
  s=$(date +%s)
  $cmd 2>&1 | tr '\r' '\n' | grep -v "clip/s\]$" | tail -4 | tee -a "$OUT/extract.log"
  echo "wall: $(( $(date +%s) - s )) s" | tee -a "$OUT/extract.log"
done
python3 - <<'PY' 2>&1 | tee -a "$OUT/extract.log"
import numpy as np
from feature_extraction import cache_dir, load_tile_embeddings
emb = load_tile_embeddings(cache_dir(".devdata/basketball", "viclip"), 10).float()
print(f"cached: {tuple(emb.shape)} {emb.dtype}, norms {emb.norm(dim=1).min():.4f}..{emb.norm(dim=1).max():.4f}, finite {bool(emb.isfinite().all())}")
PY
fi

# stage 4 speed
[[ " $STEPS " == *" speed "* ]] || exit 0
cmd="python3 benchmarks/bench_legs.py speed --gaussians 300000 --cams 27 --width 640 --height 360 --iters 2000 --warm-iters 500"
echo "$cmd" | tee "$OUT/bench_legs.log"
$cmd 2>&1 | grep -v "it/s" | tee -a "$OUT/bench_legs.log"
