"""Render a stage-1 reconstruction (output/<exp>/<seq>/params.npz) over time to mp4 videos.

Under results/<exp>/<seq>/: test_cam<id>.mp4 and train_cam<id>.mp4 (render | ground truth side by
side; train renders with their camera's colour correction, test renders without: test cameras
have none) and orbit.mp4 (a novel view circling the foreground once over the sequence). With
--fg-only, the same from the foreground Gaussians alone, named *_fg.mp4.
"""
import argparse
import math
import os

import numpy as np
import torch
from tqdm import tqdm

import helpers

DEMO = {"train_cams": 0, "downscale": 2}


def orbit_camera(meta, fg_means, num_t):
    """w2c per timestep [T, 4, 4] of a camera circling the foreground's centre once, at the train
    cameras' mean horizontal distance and height (+y is down), and the first train camera's k."""
    centers = np.linalg.inv(np.asarray(meta["w2c"][0]))[:, :3, 3]
    target = fg_means.mean(0) if len(fg_means) else centers.mean(0)
    offset = centers - target
    radius = float(np.linalg.norm(offset[:, [0, 2]], axis=1).mean())
    height = float(-offset[:, 1].mean())
    return [helpers.orbit_w2c(target, radius, height, 2 * math.pi * t / max(num_t, 1)) for t in range(num_t)]


def render_frames(params_path, views, timesteps, fg_only, device, bar):
    """One video's frames: uint8 [H, W(x2), 3] per timestep. views[t] = (cam, colour correction
    (cam_m, cam_c) or None, ground-truth image path or None)."""
    for t in timesteps:
        cam, correction, gt_path, size = views[t]
        gaussians = helpers.load_d3dgs_params(params_path, t, device)
        if fg_only:
            keep = gaussians["seg_colors"][:, 0] > 0.5
            gaussians = {k: v[keep] for k, v in gaussians.items()}
        with torch.no_grad():
            im, _, _, _ = helpers.render_d3dgs(cam, gaussians)
            if correction is not None:
                im = helpers.color_correct(im, *correction)
        frame = helpers.to_uint8(im)
        if gt_path is not None:
            gt = helpers.resize_images(helpers.load_image(gt_path, size)[None], {"w": frame.shape[1], "h": frame.shape[0]})
            frame = np.concatenate([frame, helpers.to_uint8(gt[0])], 1)
        bar.update(1)
        yield frame


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Render a Dynamic 3D Gaussians reconstruction (train_d3dgs.py's params.npz) from the test "
                    "and train cameras and an orbiting novel view, one mp4 per view.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-s", "--seq", required=True, help="sequence folder (train_meta.json, test_meta.json, ims/)")
    parser.add_argument("-e", "--exp", default="exp1", help="experiment: reads output/<exp>/<seq>/params.npz")
    parser.add_argument("-f", "--first", type=int, default=0, help="first timestep")
    parser.add_argument("-l", "--last", type=int, default=None, help="last timestep (default: the last trained)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument("--train-cams", type=int, default=None,
                        help="render only this many train cameras (evenly spread); default all, 0 for none")
    parser.add_argument("--downscale", type=int, default=1, help="render this many times smaller")
    parser.add_argument("--fg-only", action="store_true", help="also render the foreground alone (*_fg.mp4)")
    parser.add_argument("--fps", type=int, default=15, help="frames per second of the videos")
    args = helpers.parse_with_demo(parser, argv, DEMO)
    device = helpers.pick_device(args.device)
    seq_dir = os.path.normpath(args.seq)
    seq = os.path.basename(seq_dir)
    params_path = os.path.join("output", args.exp, seq, "params.npz")
    num_t = helpers.read_d3dgs_params(params_path)["means3D"].shape[0]
    last = num_t - 1 if args.last is None else args.last
    if not 0 <= args.first <= last < num_t:
        raise helpers.UserError(f"-f {args.first} -l {last}: {params_path} holds timesteps 0..{num_t - 1}")
    timesteps = range(args.first, last + 1)
    full = {split: helpers.load_meta(seq_dir, split) for split in ("train", "test")}
    metas = {split: helpers.scale_meta(m, args.downscale) for split, m in full.items()}
    arrays = helpers.read_d3dgs_params(params_path)
    cam_m, cam_c = (torch.as_tensor(arrays[k], device=device) for k in ("cam_m", "cam_c"))
    num_train = len(metas["train"]["cam_id"])
    count = num_train if args.train_cams is None else min(args.train_cams, num_train)
    train_idx = np.linspace(0, num_train - 1, count).round().astype(int).tolist() if count else []

    def camera_views(split, c):
        meta = metas[split]
        size = (full[split]["w"], full[split]["h"])
        correction = (cam_m[c], cam_c[c]) if split == "train" and c < len(cam_m) else None
        return {t: (helpers.setup_camera(meta["w"], meta["h"], meta["k"][t][c], meta["w2c"][t][c], device=device),
                    correction, os.path.join(seq_dir, "ims", meta["fn"][t][c]), size) for t in timesteps}

    videos = {f"test_cam{cam_id}": camera_views("test", c) for c, cam_id in enumerate(metas["test"]["cam_id"])}
    videos.update({f"train_cam{metas['train']['cam_id'][c]}": camera_views("train", c) for c in train_idx})
    fg_means = arrays["means3D"][0][arrays["seg_colors"][:, 0] > 0.5]
    meta = metas["train"]
    videos["orbit"] = {t: (helpers.setup_camera(meta["w"], meta["h"], meta["k"][0][0], w2c, device=device), None, None, None)
                       for t, w2c in zip(range(num_t), orbit_camera(meta, fg_means, num_t)) if t in timesteps}
    jobs = [(name, False) for name in videos] + ([(name, True) for name in videos] if args.fg_only else [])
    out_dir = os.path.join("results", args.exp, seq)
    bar = tqdm(total=len(jobs) * len(timesteps), unit="frame", dynamic_ncols=True)
    for name, fg_only in jobs:
        bar.set_description(name + ("_fg" if fg_only else ""))
        path = os.path.join(out_dir, f"{name}{'_fg' if fg_only else ''}.mp4")
        helpers.write_video(path, render_frames(params_path, videos[name], timesteps, fg_only, device, bar), args.fps)
    bar.close()
    print(f"wrote {len(jobs)} videos of {len(timesteps)} frames to {out_dir}/ "
          f"({', '.join(n + ('_fg' if f else '') for n, f in jobs[:4])}{', ...' if len(jobs) > 4 else ''})")


if __name__ == "__main__":
    helpers.run_main(main)
