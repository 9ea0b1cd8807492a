"""What stage 1's float16 colours and rotations (train_d3dgs.STORED_FLOAT16) cost in test PSNR.

    python benchmarks/bench_stored_precision.py -s data/basketball -e exp1
    python benchmarks/bench_stored_precision.py -s data/family1 -e fam --device cpu

Reads a params.npz written in float32 (by the original, or by this project before it stored float16),
renders every timestep's test cameras from it as it is and with STORED_FLOAT16 rounded to float16, as
stage 1 now stores them, and prints per timestep the test PSNR of both (the mean over the test
cameras, as train_d3dgs.evaluate computes it) and the PSNR of the rounded render against the float32
one; then the bytes per Gaussian and timestep of both. The renders differ by the rounding alone: a
run that rounds as it trains also starts each timestep from other values, and its PSNR differs by as
much as training is sensitive to them.
"""

import argparse
import os

import numpy as np
import torch

import helpers
import train_d3dgs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-s", "--seq", required=True, help="the sequence folder (data/<name>)")
    parser.add_argument("-e", "--exp", required=True, help="experiment: reads output/<exp>/<seq>/params.npz")
    parser.add_argument("--downscale", type=int, default=1, help="as stage 1 was trained (default 1)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda where there is one)")
    args = parser.parse_args()
    device = torch.device(helpers.pick_device(args.device))
    seq_dir = helpers.find_sequence(args.seq)
    path = os.path.join(helpers.stage_dir("output", args.exp, seq_dir), "params.npz")
    arrays = helpers.read_d3dgs_params(path)
    stored = [k for k in train_d3dgs.STORED_FLOAT16 if arrays[k].dtype != np.float32]
    if stored:
        raise helpers.UserError(f"{path}: {', '.join(stored)} are not float32; give a params.npz written in float32")
    full = {split: helpers.load_meta(seq_dir, split) for split in ("train", "test")}
    meta, test_meta = (helpers.scale_meta(full[split], args.downscale) for split in ("train", "test"))
    sizes = (full["train"]["w"], full["train"]["h"]), (full["test"]["w"], full["test"]["h"])
    env_map = arrays.get(helpers.D3DGS_ENV_MAP)
    num_t = arrays["means3D"].shape[0]
    print(f"{path}: {num_t} timesteps, {arrays['means3D'].shape[1]} Gaussians; test PSNR (dB)")
    print("t | float32 | float16 colours and rotations | rounded render against the float32 one")
    rows = []
    for t in range(num_t):
        _, test_views = train_d3dgs.get_dataset(
            train_d3dgs.load_timestep(seq_dir, meta, test_meta, t, *sizes), meta, test_meta, t, device
        )
        train_d3dgs.add_backgrounds(test_views, None if env_map is None else torch.as_tensor(env_map, device=device))
        params = {
            k: torch.as_tensor(v[t] if k in helpers.D3DGS_PER_TIMESTEP else v, dtype=torch.float32, device=device)
            for k, v in arrays.items()
        }
        rounded = {**params, **{k: params[k].clone() for k in train_d3dgs.STORED_FLOAT16}}
        train_d3dgs.round_stored(rounded)
        full_psnr, rounded_psnr, between = [], [], []  # per test camera
        with torch.no_grad():
            rendervars = [helpers.params2rendervar(p) for p in (params, rounded)]
            for view in test_views:
                full_im, rounded_im = (
                    helpers.render_d3dgs(view["cam"], r, view["background"])[0].clamp(0, 1) for r in rendervars
                )
                full_psnr.append(helpers.psnr(full_im, view["im"]))
                rounded_psnr.append(helpers.psnr(rounded_im, view["im"]))
                between.append(helpers.psnr(rounded_im, full_im))
        rows.append((np.mean(full_psnr), np.mean(rounded_psnr), np.mean(between)))
        print(f"{t} | {rows[-1][0]:.4f} | {rows[-1][1]:.4f} | {rows[-1][2]:.1f}")
    full_mean, rounded_mean, between_mean = np.mean(rows, 0)
    diffs = [r[1] - r[0] for r in rows]
    print(
        f"mean | {full_mean:.4f} | {rounded_mean:.4f} ({rounded_mean - full_mean:+.4f}; per timestep "
        f"{min(diffs):+.4f} to {max(diffs):+.4f}) | {between_mean:.1f}"
    )
    widths = {k: arrays[k].shape[-1] for k in helpers.D3DGS_PER_TIMESTEP}
    before = 4 * sum(widths.values())
    after = sum((2 if k in train_d3dgs.STORED_FLOAT16 else 4) * w for k, w in widths.items())
    print(f"bytes per Gaussian and timestep: {before} -> {after}")


if __name__ == "__main__":
    helpers.run_main(main)
