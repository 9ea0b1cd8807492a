"""Speed of the PyTorch reference rasterizer on CPU: forward and forward + backward.

    python benchmarks/bench_reference.py --gaussians 20000 --width 320 --height 180 --threads 2
    git show e511fc9:diff-gaussian-rasterization-w-depth/diff_gaussian_rasterization/_torch_impl.py > /tmp/old.py
    python benchmarks/bench_reference.py --impl /tmp/old.py     # time another version of the file

A deterministic scene of random Gaussians in front of one ring camera (sizes spread like a trained
Dynamic 3D Gaussians scene: mostly a few pixels, some tens); colours + depth through the colour
rasterizer, or colours + C feature channels through the feature rasterizer (--feat 3: what
train_d3dgs.py renders; --feat 128 --frozen: what train_4legs.py does). Prints the median wall
and CPU times of --repeats runs and the load average (other processes on the cores inflate the
wall time, with 2 threads far more than with 1).
"""

import argparse
import importlib.util
import math
import os
import time

import numpy as np
import torch

import diff_gaussian_rasterization as dgr
import diff_gaussian_rasterization_feat as dgrf
import helpers


def make_scene(n, seed=0):
    """n Gaussians in a 4 m cube around the origin: means3D [n, 3], log scales ~ N(log 0.02, 0.6)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "means3D": (torch.rand(n, 3, generator=g) - 0.5) * 4.0,
        "scales": torch.exp(math.log(0.02) + 0.6 * torch.randn(n, 3, generator=g)),
        "rotations": torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=1),
        "opacities": torch.rand(n, 1, generator=g) * 0.9 + 0.05,
        "colors_precomp": torch.rand(n, 3, generator=g),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gaussians", type=int, default=20000, help="number of Gaussians (default: %(default)s)")
    parser.add_argument("--width", type=int, default=320, help="image width in pixels (default: %(default)s)")
    parser.add_argument("--height", type=int, default=180, help="image height in pixels (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed runs; the median is printed (default: %(default)s)"
    )
    parser.add_argument(
        "--feat",
        type=int,
        default=0,
        metavar="C",
        help="feature rasterizer with C channels (3: train_d3dgs.py's colour + segmentation "
        "call; 128: train_4legs.py's); 0 = colour rasterizer (default: %(default)s)",
    )
    parser.add_argument(
        "--frozen", action="store_true", help="only the features need gradients (train_4legs.py: geometry frozen)"
    )
    parser.add_argument(
        "--impl", metavar="FILE", help="time this version of _torch_impl.py instead of the installed one"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.impl:
        spec = importlib.util.spec_from_file_location("timed_torch_impl", args.impl)
        impl = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(impl)
        dgr._api._torch_impl = impl  # each package has its own module object of the shared _api.py
        dgrf._api._torch_impl = impl

    w, h = args.width, args.height
    k = np.array([[0.9 * w, 0, w / 2], [0, 0.9 * w, h / 2], [0, 0, 1]])
    cam = helpers.setup_camera(w, h, k, helpers.orbit_w2c((0, 0, 0), 5.0, 1.5, 0.3))
    scene = make_scene(args.gaussians)

    def run(backward):
        geometry_grad = backward and not args.frozen
        inputs = {key: v.clone().requires_grad_(geometry_grad) for key, v in scene.items()}
        inputs["means2D"] = torch.zeros_like(scene["means3D"], requires_grad=geometry_grad)
        features = torch.rand(args.gaussians, max(args.feat, 1), generator=torch.Generator().manual_seed(1))
        features.requires_grad_(backward)
        start, cpu_start = time.perf_counter(), time.process_time()
        if args.feat:
            im, radii, depth, feat = dgrf.GaussianRasterizer(cam)(legs_features=features, **inputs)
            loss = im.sum() + depth.sum() + feat.sum()
        else:
            im, radii, depth = dgr.GaussianRasterizer(cam)(**inputs)
            loss = im.sum() + depth.sum()
        if backward:
            loss.backward()
        return time.perf_counter() - start, time.process_time() - cpu_start

    run(True)  # warm-up
    fwd = np.array([run(False) for _ in range(args.repeats)]) * 1e3
    both = np.array([run(True) for _ in range(args.repeats)]) * 1e3
    what = f"feat ({args.feat} ch{', frozen geometry' if args.frozen else ''})" if args.feat else "colour"
    # CPU time of all threads: with --threads 1 it is what the wall time would be on an idle
    # machine, which makes it the figure to compare on a shared one
    print(
        f"{args.gaussians} Gaussians {w}x{h}, {args.threads} threads, {what}: "
        f"forward {np.median(fwd[:, 0]):.0f} ms, forward + backward {np.median(both[:, 0]):.0f} ms "
        f"(wall, median of {args.repeats}); CPU time {np.median(fwd[:, 1]):.0f} ms and "
        f"{np.median(both[:, 1]):.0f} ms; load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
