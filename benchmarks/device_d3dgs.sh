#!/bin/bash
# Stage 1 on a GPU machine: build the rasterizers (unless this machine has them), train the
# basketball sequence (continuing a run left there by an earlier call), time the loop's phases,
# and gather what came out in $OUT (default ./device_out). A run longer than one call goes on in
# the next: each call leaves in $OUT what the next one needs.
#
#   bash benchmarks/device_d3dgs.sh DEADLINE_SECONDS [bench]   device: train from the start (or on
#                                                              from output/dev/ left on this machine)
#   bash benchmarks/device_d3dgs.sh prepare RETURNED_DIR       here: .devstate/ from a call's files
#   bash benchmarks/device_d3dgs.sh DEADLINE_SECONDS resume    device, carrying .devstate: go on
#
# Training stops (Ctrl-C, finished timesteps kept) early enough to end by DEADLINE_SECONDS after
# the start, leaving 150 s for the phase benchmark (eager and compiled losses, then a profile of
# 50 compiled iterations) when 'bench' is given. TRAIN_ARGS (e.g. --no-compile) go to
# train_d3dgs.py. Needs .devdata/basketball (the first timesteps of
# ../shared/data/panoptic_sports/basketball: ims, seg, trimmed metas). DEVICE=cpu runs the same
# on a machine without a GPU (no build, no nvidia-smi, no bench): tests/test_d3dgs.py runs the
# hand-over (call, prepare, resume) that way on a tiny sequence.
#
# $OUT (at most 8 files come back): device.log, train.log, bench.log, records.json (time,
# Gaussians and test PSNR per camera of every finished timestep, this call's and the earlier
# ones'), and state.tar.gz.partNN (15 MiB pieces of what train_d3dgs.restore reads to go on:
# timesteps 0, last - 1, last, run.json, records.json). 'prepare' puts the pieces and the images
# of the timesteps still to train (metas cut after the last of them) into .devstate/ and checks
# that everything a call carries stays under 64 MiB; 'resume' trains .devstate/basketball from
# the timestep after the last finished one.
set -u -o pipefail
EXP=dev
TS=output/$EXP/basketball/timesteps
MIB=$((1024 * 1024))

if [ "${1:-}" = prepare ]; then  # here, between two calls
  FROM=${2:?folder holding the files the last call returned}
  ls "$FROM"/state.tar.gz.part* > /dev/null || exit 1
  exclude=$(git rev-parse --git-path info/exclude)  # .devstate/ travels only when carried
  mkdir -p "$(dirname "$exclude")" && { grep -qx '/.devstate/' "$exclude" 2>/dev/null || echo /.devstate/ >> "$exclude"; }
  rm -rf .devstate && mkdir -p .devstate
  cat "$FROM"/state.tar.gz.part* > .devstate/state.tar.gz
  python3 - .devdata/basketball .devstate "${LAST:-}" <<'EOF' || exit 1
import json, os, shutil, subprocess, sys, tarfile
src, dst, last = sys.argv[1:]
tree = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], check=True,
                      capture_output=True).stdout.decode().split("\0")
repo = sum(os.lstat(f).st_size for f in tree if f and os.path.lexists(f))  # the working tree that travels
with tarfile.open(f"{dst}/state.tar.gz") as tar:
    names = tar.getnames()
    records = json.load(tar.extractfile("records.json"))
steps = sorted(int(n[:6]) for n in names if n.endswith(".npz"))
nxt = steps[-1] + 1
need = sorted({0, nxt - 2, nxt - 1} & set(range(nxt)))
if steps != need:
    sys.exit(f"state.tar.gz holds timesteps {steps}, restore at {nxt} reads {need}")
metas = {s: json.load(open(f"{src}/{s}_meta.json")) for s in ("train", "test")}
num_t = len(metas["train"]["fn"])

def files(t):  # images of timestep t, masks of its train images
    out = [f"ims/{fn}" for s in ("train", "test") for fn in metas[s]["fn"][t]]
    return out + [f"seg/{os.path.splitext(fn)[0]}.png" for fn in metas["train"]["fn"][t]]

budget = 64 * 2 ** 20 - repo - os.path.getsize(f"{dst}/state.tar.gz") - 2 ** 20  # 1 MiB spare
budget -= sum(os.path.getsize(f"{src}/{s}_meta.json") for s in metas)
end = nxt - 1
for t in range(nxt, num_t if not last else min(int(last) + 1, num_t)):
    size = sum(os.path.getsize(f"{src}/{f}") for f in files(t))
    if size > budget:
        break
    budget -= size
    end = t
if end < nxt:
    sys.exit(f"no image of timestep {nxt} fits in the 64 MiB a call carries")
seq = f"{dst}/basketball"
for t in range(nxt, end + 1):
    for f in files(t):
        os.makedirs(os.path.dirname(f"{seq}/{f}"), exist_ok=True)
        shutil.copyfile(f"{src}/{f}", f"{seq}/{f}")
for s, meta in metas.items():  # timestep numbering kept: only timesteps after `end` are cut
    cut = {k: (v[:end + 1] if k in ("k", "w2c", "fn") or (k == "cam_id" and isinstance(v[0], list)) else v)
           for k, v in meta.items()}
    json.dump(cut, open(f"{seq}/{s}_meta.json", "w"))
print(f"state: timesteps {need} ({os.path.getsize(f'{dst}/state.tar.gz') / 2 ** 20:.1f} MiB), records of "
      f"{len(records)} timesteps; images of timesteps {nxt}..{end} (of 0..{num_t - 1}) in {seq}")
size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs)
print(f"carried: .devstate {size / 2 ** 20:.1f} MiB + working tree {repo / 2 ** 20:.1f} MiB = "
      f"{(size + repo) / 2 ** 20:.1f} MiB of 64 MiB")
EOF
  split -b $((15 * MIB)) -d -a 2 .devstate/state.tar.gz .devstate/state.tar.gz.part && rm .devstate/state.tar.gz
  echo "next, on the device (carry .devstate): bash benchmarks/device_d3dgs.sh 590 resume"
  exit 0
fi

OUT=${OUT:-./device_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: tar's -C below is relative to the previous -C
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
DEADLINE=${1:?deadline in seconds}
MODE=${2:-}
SEQ=.devdata/basketball
START=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$OUT/device.log"
if [ "$DEVICE" = cpu ]; then
  echo "CPU run: the rasterizers' PyTorch path" | tee -a "$OUT/device.log"
else
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee -a "$OUT/device.log"
  source benchmarks/device_build.sh || exit 1
fi

EARLIER=$(mktemp -d)  # the state a previous call left
mkdir -p "$TS"
if [ "$MODE" = resume ]; then  # ... and the images of the timesteps after it
  SEQ=.devstate/basketball
  cat .devstate/state.tar.gz.part* | tar -xzf - -C "$EARLIER" || exit 1
  mv "$EARLIER"/*.npz "$EARLIER"/run.json "$TS"/
  echo "resuming from $(ls "$TS" | tr '\n' ' ')" | tee -a "$OUT/device.log"
fi

reserve=$([ "$MODE" = bench ] && echo 150 || echo 25)
budget=$(( $(left) - reserve ))
echo "training for at most $budget s" | tee -a "$OUT/device.log"
timeout --signal=INT "$budget" python3 train_d3dgs.py -s $SEQ -e $EXP --device "$DEVICE" ${TRAIN_ARGS:-} 2>&1 \
  | tr '\r' '\n' | grep -v -E '^t [0-9]+/[0-9]+:' > "$OUT/train.log"
tail -4 "$OUT/train.log"

if [ "$MODE" = bench ]; then
  timeout $(( $(left) - 20 )) python3 benchmarks/bench_d3dgs.py -s $SEQ --state $TS --iters 300 --profile 50 2>&1 \
    | tee "$OUT/bench.log" | tail -80
fi

# per-timestep records (time, Gaussians, test metrics) of every finished timestep, earlier calls' too
python3 - "$TS" "$EARLIER/records.json" "$OUT/records.json" <<'EOF' | tee -a "$OUT/device.log"
import glob, json, os, sys
import numpy as np
ts_dir, earlier, out = sys.argv[1:]
records = {r["t"]: r for r in (json.load(open(earlier)) if os.path.isfile(earlier) else [])}
for path in sorted(glob.glob(f"{ts_dir}/[0-9][0-9][0-9][0-9][0-9][0-9].npz")):
    with np.load(path) as f:
        r = json.loads(str(f["record"]))
    t = int(os.path.basename(path)[:6])
    records[t] = {"t": t, "seconds": r["seconds"], "iterations": r["iterations"], "gaussians": r["gaussians"],
                  "psnr": r["test"]["psnr"], "ssim": r["test"]["ssim"],
                  "cameras": {c: round(m["psnr"], 3) for c, m in r["test"]["cameras"].items()}}
records = [records[t] for t in sorted(records)]
json.dump(records, open(out, "w"), indent=1)
if records:
    print(f"{len(records)} timesteps finished (0..{records[-1]['t']}); test PSNR mean "
          f"{np.mean([r['psnr'] for r in records]):.2f} dB")
EOF

# what the next call needs to go on: timesteps 0, last - 1, last (what restore reads), run.json, records
last=$(ls "$TS" | grep -E '^[0-9]{6}\.npz$' | sort | tail -1 | cut -c1-6)
if [ -n "$last" ]; then
  keep=$(printf '%06d.npz\n' 0 $((10#$last - 1)) $((10#$last)) | grep -v -- '^-' | sort -u)
  tar -czf - -C "$OUT" records.json -C "$PWD/$TS" $keep run.json \
    | split -b $((15 * MIB)) -d -a 2 - "$OUT/state.tar.gz.part" \
    || { echo "state for the next call NOT saved (tar failed)" | tee -a "$OUT/device.log"; exit 1; }
  echo "state for the next call: $keep run.json records.json in $(ls "$OUT" | grep -c state.tar.gz.part) pieces," \
       "$(( $(cat "$OUT"/state.tar.gz.part* | wc -c) / 1024 )) KiB" | tr '\n' ' ' | tee -a "$OUT/device.log"
  echo | tee -a "$OUT/device.log"
fi
