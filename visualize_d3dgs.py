"""Stage 2 of 4-LEGS: videos of the stage-1 reconstruction (output/<exp>/<seq>/params.npz) over time.

Under results/<exp>/<seq>/: test_cam<id>.mp4 and train_cam<id>.mp4 (render | ground truth side by
side; train renders with their camera's colour correction, test renders without: test cameras
have none) and orbit.mp4 (a novel view circling the foreground once over the sequence). With
--fg-only, the same from the foreground Gaussians alone, named *_fg.mp4. videos.json says what
each video was made from (params.npz and its fingerprint, the sequence, the settings).
"""

import argparse
import os

import numpy as np
import torch

import helpers

DEMO = {"train_cams": 0, "downscale": 2}


def render_frames(params_path, views, timesteps, fg_only, device, bar):
    """One video's frames: uint8 [H, W(x2), 3] per timestep. views[t] = (cam, colour correction
    (cam_m, cam_c) or None, ground-truth image path or None)."""
    env_map = None if fg_only else helpers.load_env_map(params_path, device)
    for t in timesteps:
        cam, correction, gt_path, size = views[t]
        gaussians = helpers.load_d3dgs_params(params_path, t, device)
        if fg_only:
            keep = helpers.is_foreground(gaussians["seg_colors"])
            gaussians = {k: v[keep] for k, v in gaussians.items()}
        with torch.no_grad():
            im = helpers.render_view(cam, gaussians, env_map)
            if correction is not None:
                im = helpers.color_correct(im, *correction)
        frame = helpers.to_uint8(im)
        if gt_path is not None:
            gt = helpers.resize_images(
                helpers.load_image(gt_path, size)[None], {"w": frame.shape[1], "h": frame.shape[0]}
            )
            frame = np.concatenate([frame, helpers.to_uint8(gt[0])], 1)
        bar.update(1)
        yield frame


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=helpers.stage_description("visualize_d3dgs.py") + " Renders the reconstruction from the "
        "test and train cameras and an orbiting novel view, one mp4 per view.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    helpers.add_sequence_option(parser)
    parser.add_argument("-e", "--exp", default="exp1", help="experiment: reads output/<exp>/<seq>/params.npz")
    parser.add_argument("-f", "--first", type=int, default=0, help="first timestep")
    parser.add_argument("-l", "--last", type=int, default=None, help="last timestep (default: the last trained)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument(
        "--train-cams",
        type=int,
        default=None,
        help="render only this many train cameras (evenly spread); default all, 0 for none",
    )
    parser.add_argument("--downscale", type=int, default=1, help="render this many times smaller")
    parser.add_argument("--fg-only", action="store_true", help="also render the foreground alone (*_fg.mp4)")
    parser.add_argument("--fps", type=int, default=15, help="frames per second of the videos")
    args = helpers.parse_with_demo(parser, argv, DEMO)
    helpers.check_option(args, "train_cams", at_least=0)
    helpers.check_option(args, "downscale", at_least=1)
    helpers.check_option(args, "fps", at_least=1)
    device = helpers.pick_device(args.device)
    seq_dir = helpers.find_sequence(args.seq)
    params_path = os.path.join(helpers.stage_dir("output", args.exp, seq_dir), "params.npz")
    num_t = helpers.read_d3dgs_params(params_path)["means3D"].shape[0]
    helpers.check_stage1_sequence(params_path, seq_dir)
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
        return {
            t: (
                helpers.setup_camera(meta["w"], meta["h"], meta["k"][t][c], meta["w2c"][t][c], device=device),
                correction,
                os.path.join(seq_dir, "ims", meta["fn"][t][c]),
                size,
            )
            for t in timesteps
        }

    videos = {f"test_cam{cam_id}": camera_views("test", c) for c, cam_id in enumerate(metas["test"]["cam_id"])}
    videos.update({f"train_cam{metas['train']['cam_id'][c]}": camera_views("train", c) for c in train_idx})
    is_fg = helpers.is_foreground(arrays["seg_colors"])
    orbit = helpers.orbit_cameras(metas["train"], arrays["means3D"][0], is_fg, num_t, device)
    videos["orbit"] = {t: (orbit[t], None, None, None) for t in timesteps}
    jobs = [(name, False) for name in videos] + ([(name, True) for name in videos] if args.fg_only else [])
    out_dir = helpers.stage_dir("results", args.exp, seq_dir)
    # what each video is made from, in videos.json beside them (updated as each one is written)
    made_from = {
        "params": helpers.d3dgs_identity(params_path),
        "sequence": os.path.abspath(seq_dir),
        "downscale": args.downscale,
        "timesteps": [args.first, last],
        "fps": args.fps,
    }
    with helpers.stage_lock(out_dir, "visualize_d3dgs"):
        record = helpers.read_json(os.path.join(out_dir, "videos.json")) or {}
        bar = helpers.progress(total=len(jobs) * len(timesteps), unit="frame")
        for name, fg_only in jobs:
            video = f"{name}{'_fg' if fg_only else ''}.mp4"
            bar.set_description(video)
            helpers.write_video(
                os.path.join(out_dir, video),
                render_frames(params_path, videos[name], timesteps, fg_only, device, bar),
                args.fps,
            )
            record[video] = made_from
            helpers.save_json(os.path.join(out_dir, "videos.json"), record)
        bar.close()
    print(
        f"wrote {len(jobs)} videos of {len(timesteps)} frames to {out_dir}/ "
        f"({', '.join(n + ('_fg' if f else '') for n, f in jobs[:4])}{', ...' if len(jobs) > 4 else ''})"
    )


if __name__ == "__main__":
    helpers.run_main(main, resumes=False)
