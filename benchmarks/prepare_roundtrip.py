"""Does a capture prepared by prepare_sequence.py train as well as the sequence written directly?

    python benchmarks/prepare_roundtrip.py                                   # GPU: full stage 1, 320x180
    python benchmarks/prepare_roundtrip.py --width 96 --height 64 --timesteps 8 --train-cams 6 \
        --train-args "--demo --downscale 1"                                  # CPU, about 6 minutes on 2 cores
    python benchmarks/prepare_roundtrip.py --seed 3 --width 128 --height 80 --masks-only   # family member 3

Writes a synthetic sequence (synthetic_sequence.py: the demo scene, or with --seed S member S of
its family), exports it as a capture a user would have: one frame folder (or, with --form mp4, one
H.264 video) per camera plus a cameras file, and no masks (with --clean-plate also a render of the
empty scene per camera: the room, or the floor under the sky); prepares that capture with
prepare_sequence.py, then runs train_d3dgs.py on three sequences and prints their test PSNRs:
  direct           as synthetic_sequence.py wrote it, with init_pt_cld.npz from the true Gaussians
  direct, no init  the same without init_pt_cld.npz: stage 1 builds its point cloud from the masks,
                   as it must for any capture
  prepared         what prepare_sequence.py made of the capture (no init_pt_cld.npz either)
The gap prepared vs direct-no-init is what the preparation costs (masks, frames); the gap to
direct also holds what the true point cloud is worth, which no capture has. Exit code 1 when the
first gap exceeds --tolerance dB. Also prints how well the computed masks match the true ones
(--masks-only: only that, no stage 1).

Everything goes under --workdir (stage 1's outputs in <workdir>/output/<arm>/, the prepared sequences in
<workdir>/data/: prepare_sequence.py runs there, as it writes under data/ only); a rerun continues
where stage 1 stopped, and other variants (--form, --crf, --clean-plate) reuse the direct arms. Other
scene settings (size, timesteps, cameras) need another --workdir.
"""

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

import helpers
import prepare_sequence
import synthetic_sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sequence_cameras(seq):
    """{camera id: (k [3][3], w2c [4][4])} of a sequence's train and test metas."""
    cameras = {}
    for split in ("train", "test"):
        meta = helpers.load_meta(seq, split)
        for c, k, w2c in zip(meta["cam_id"], meta["k"][0], meta["w2c"][0]):
            cameras[c] = (k, w2c)
    return dict(sorted(cameras.items()))


def camera_name(cam_id):
    return f"cam{cam_id:02d}"


def frames_of(seq, cam_id):
    """uint8 [H, W, 3] images of one camera of a sequence, in time order."""
    folder = os.path.join(seq, "ims", str(cam_id))
    return [np.asarray(Image.open(os.path.join(folder, f)).convert("RGB")) for f in sorted(os.listdir(folder))]


def write_video(path, frames, fps=30, crf=0):
    """uint8 [H, W, 3] frames -> H.264 in yuv444p at constant rate factor crf (0: lossless but for
    the RGB -> YUV rounding; a phone records at about 20-23 with yuv420p, which blurs colour edges)."""
    import imageio_ffmpeg

    h, w = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(
        path,
        (w, h),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv444p",
        output_params=["-crf", str(crf)],
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame).tobytes())
    writer.close()


def export_capture(seq, dest, form="frames", crf=0):
    """Write sequence `seq` as a capture: <dest>/videos/cam<id>/ frame folders (the JPEGs as they
    are) or cam<id>.mp4 videos, and <dest>/cameras.json in id order. -> the cameras file's path."""
    cameras = sequence_cameras(seq)
    meta = helpers.load_meta(seq, "train")
    os.makedirs(os.path.join(dest, "videos"), exist_ok=True)
    for c in cameras:
        target = os.path.join(dest, "videos", camera_name(c))
        if form == "mp4":
            write_video(target + ".mp4", frames_of(seq, c), crf=crf)
        elif not os.path.isdir(target):
            os.makedirs(target)
            for f in sorted(os.listdir(os.path.join(seq, "ims", str(c)))):
                os.link(os.path.join(seq, "ims", str(c), f), os.path.join(target, f))
    path = os.path.join(dest, "cameras.json")
    helpers.save_json(
        path,
        {
            "width": meta["w"],
            "height": meta["h"],
            "cameras": [{"name": camera_name(c), "K": k, "w2c": w2c} for c, (k, w2c) in cameras.items()],
        },
    )
    return path


def render_clean_plates(seq, dest):
    """<dest>/cam<id>.png: each camera's view of the scene without the objects (what a user shoots
    before the action), rendered as synthetic_sequence.py renders a frame: the ground-truth
    Gaussians of the floor and walls (gt/params.npz), and where they leave the view transparent
    the sky at infinity of gt/scene.json (above a room's walls too; black without one)."""
    with open(os.path.join(seq, "gt", "objects.json")) as f:
        first_room_gaussian = json.load(f)["background_gaussians"][0]
    with open(os.path.join(seq, "gt", "scene.json")) as f:
        sky = json.load(f)["background"]["sky"]
    with np.load(os.path.join(seq, "gt", "params.npz")) as params:
        inputs = synthetic_sequence.rasterizer_inputs(params, 0)
    room = {key: value[first_room_gaussian:] for key, value in inputs.items()}
    meta = helpers.load_meta(seq, "train")
    os.makedirs(dest, exist_ok=True)
    for c, (k, w2c) in sequence_cameras(seq).items():
        im, _ = synthetic_sequence.render(
            helpers.setup_camera(meta["w"], meta["h"], k, w2c),
            room,
            torch.ones(len(room["means3D"]), 1),
            synthetic_sequence.sky_image(meta["w"], meta["h"], k, w2c, sky),
        )
        Image.fromarray(helpers.to_uint8(im)).save(os.path.join(dest, camera_name(c) + ".png"))
    return dest


def mask_iou(seq, prepared, ignore_ghosts=False):
    """{timestep: IoU} of the prepared masks against the true masks of the objects that move then,
    pooled over cameras (ids match: the capture lists the cameras in id order), for each timestep
    where some object moves. Left out of the comparison, with a 2-pixel fringe (their blurred
    edge is neither right nor wrong): objects at rest, and objects that move at every timestep (the
    top spins in place: its outline never changes, so a subtraction sees only its stripes). With
    ignore_ghosts, foreground found where an object rests at some other timestep does not count
    against the masks: a background estimated from the frames may hold an object that rests
    somewhere for half the sequence, and show a ghost there once it has left."""
    with open(os.path.join(seq, "gt", "objects.json")) as f:
        gt = json.load(f)
    cam_ids = sorted(int(c) for c in os.listdir(os.path.join(seq, "gt", "ids")))
    ids = {
        (c, t): np.asarray(Image.open(os.path.join(seq, "gt", "ids", str(c), f"{t:06d}.png")))
        for c in cam_ids
        for t in range(gt["num_timesteps"])
    }
    rest = {c: np.zeros_like(ids[(c, 0)], bool) for c in cam_ids}
    if ignore_ghosts:
        for o in gt["objects"]:
            for t in o["static_timesteps"]:
                for c in cam_ids:
                    rest[c] |= ids[(c, t)] == o["id"]
    result = {}
    for t in range(gt["num_timesteps"]):
        moving = [o["id"] for o in gt["objects"] if t in o["moving_timesteps"] and o["static_timesteps"]]
        if not moving:
            continue
        inter = union = 0
        for c in cam_ids:
            truth = np.isin(ids[(c, t)], moving)
            others = np.isin(ids[(c, t)], [o["id"] for o in gt["objects"] if o["id"] not in moving])
            counted = ~ndimage.binary_dilation(others, iterations=2) & (
                truth | ~ndimage.binary_dilation(rest[c], iterations=2)
            )
            mask = helpers.load_mask(os.path.join(prepared, "seg", str(c), f"{t:06d}.png")).numpy() > 0.5
            inter += (truth & mask & counted).sum()
            union += ((truth | mask) & counted).sum()
        result[t] = float(inter / max(union, 1))
    return result


def without_init(seq, dest):
    """<dest>/<basename of seq>: the sequence without init_pt_cld.npz (images and masks hard-linked)."""
    out = os.path.join(dest, os.path.basename(seq))
    for sub in ("ims", "seg"):
        for c in os.listdir(os.path.join(seq, sub)):
            os.makedirs(os.path.join(out, sub, c), exist_ok=True)
            for f in os.listdir(os.path.join(seq, sub, c)):
                if not os.path.exists(os.path.join(out, sub, c, f)):
                    os.link(os.path.join(seq, sub, c, f), os.path.join(out, sub, c, f))
    for split in ("train", "test"):
        shutil.copyfile(os.path.join(seq, f"{split}_meta.json"), os.path.join(out, f"{split}_meta.json"))
    return out


def train(seq, exp, workdir, train_args):
    """Run stage 1 on `seq` (outputs in <workdir>/output/<exp>/) -> its test PSNR."""
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "train_d3dgs.py"), "-s", seq, "-e", exp] + train_args,
        cwd=workdir,
        check=True,
    )
    with open(os.path.join(workdir, "output", exp, os.path.basename(seq), "metrics.json")) as f:
        return json.load(f)["psnr"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workdir", default="results/prepare_roundtrip", help="where everything goes (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="round-trip member SEED (>= 1) of synthetic_sequence.py's scene family (default: the demo scene)",
    )
    parser.add_argument("--width", type=int, default=None, help="default: 320 for the demo, drawn for --seed")
    parser.add_argument("--height", type=int, default=None, help="default: 180 for the demo, drawn for --seed")
    parser.add_argument("--timesteps", type=int, default=None, help="default: 24 for the demo, 12 for --seed")
    parser.add_argument("--train-cams", type=int, default=None, help="default: 12 for the demo, drawn for --seed")
    parser.add_argument("--test-cams", type=int, default=None, help="default: 2 for the demo, drawn for --seed")
    parser.add_argument(
        "--form",
        choices=("frames", "mp4"),
        default="frames",
        help="the capture as JPEG frame folders or H.264 videos (default: %(default)s)",
    )
    parser.add_argument("--crf", type=int, default=0, help="with --form mp4: x264's quality, 0 = lossless YUV")
    parser.add_argument(
        "--clean-plate",
        action="store_true",
        help="give prepare_sequence.py an empty-room render per camera (else: estimated)",
    )
    parser.add_argument("--masks-only", action="store_true", help="print the masks' IoU and stop (no stage 1)")
    parser.add_argument("--train-args", default="", help='more options for train_d3dgs.py, e.g. "--demo"')
    parser.add_argument("--tolerance", type=float, default=0.5, help="allowed PSNR gap in dB (default: %(default)s)")
    args = parser.parse_args()
    if args.seed is not None and args.seed < 1:
        raise helpers.UserError(f"--seed {args.seed}: family members are numbered from 1 (no --seed: the demo)")
    args.workdir = os.path.abspath(args.workdir)
    name = "synthetic" if args.seed is None else f"family{args.seed}"
    direct = os.path.join(args.workdir, "direct", name)
    if not os.path.isfile(os.path.join(direct, "test_meta.json")):
        scene, width, height, num_t = synthetic_sequence.scene_settings(
            args.seed, args.width, args.height, args.timesteps, args.train_cams, args.test_cams
        )
        synthetic_sequence.generate(
            direct,
            None,
            width,
            height,
            num_t,
            scene["rig"]["num_train"],
            scene["rig"]["num_test"],
            seed=0,
            scene=scene,
            point_cloud=True,
        )
    # one capture and one prepared sequence per variant, so that variants share the direct arms
    variant = (f"mp4_crf{args.crf}" if args.form == "mp4" else "frames") + ("_plate" if args.clean_plate else "_est")
    capture = os.path.join(args.workdir, f"capture_{variant}", name)
    cameras_file = export_capture(direct, capture, args.form, args.crf)
    prepared = os.path.join(args.workdir, "data", f"prepared_{variant}", name)
    test_names = ",".join(camera_name(c) for c in helpers.load_meta(direct, "test")["cam_id"])
    plates = ["--background", render_clean_plates(direct, os.path.join(capture, "plates"))] if args.clean_plate else []
    with contextlib.chdir(args.workdir):
        prepare_sequence.main(
            [
                "--videos",
                os.path.join(capture, "videos"),
                "--cameras",
                cameras_file,
                "-o",
                prepared,
                "--test-cams",
                test_names,
            ]
            + plates
        )
    ious = mask_iou(direct, prepared)
    without_ghosts = mask_iou(direct, prepared, ignore_ghosts=True)
    print(
        f"masks of {name}: IoU against the moving objects {min(ious.values()):.3f}..{max(ious.values()):.3f} over "
        f"timesteps {min(ious)}..{max(ious)} (ghosts left out: {min(without_ghosts.values()):.3f}.."
        f"{max(without_ghosts.values()):.3f}); {args.form}, "
        f"{'clean plate' if args.clean_plate else 'estimated background'}"
    )
    if args.masks_only:
        return
    train_args = shlex.split(args.train_args)
    psnr = {
        "direct": train(direct, "direct", args.workdir, train_args),
        "direct, no init": train(
            without_init(direct, os.path.join(args.workdir, "direct_no_init")),
            "direct_no_init",
            args.workdir,
            train_args,
        ),
        "prepared": train(prepared, f"prepared_{variant}", args.workdir, train_args),
    }
    gap = psnr["direct, no init"] - psnr["prepared"]
    print(
        "stage 1 test PSNR: "
        + ", ".join(f"{arm} {value:.2f} dB" for arm, value in psnr.items())
        + f"; prepared vs direct-no-init {-gap:+.2f} dB (tolerance {args.tolerance} dB): "
        + ("PASS" if gap <= args.tolerance else "FAIL")
        + f", vs direct {psnr['prepared'] - psnr['direct']:+.2f} dB"
    )
    sys.exit(0 if gap <= args.tolerance else 1)


if __name__ == "__main__":
    helpers.run_main(main)
