"""Rasterizer speed and memory, ours against gsplat: the figures of docs/performance.md's table.

    python benchmarks/bench_rasterizer.py -s basketball --gaussians 300000 100000 1000000 --backends ours gsplat

Cameras: the train cameras of timestep 0 of the sequence (-s), in turn (call i uses camera
i mod C); without -s, a synthetic ring of 27 cameras at 640x360 (focal 465 pixels, as
PanopticSports', on a circle of 3.5 m radius 1.5 m above the centre they all look at).
Scene: N random Gaussians (seed 0), uniform in a ball around the point closest to all the cameras'
optical axes, of half the cameras' mean distance to it; scales 0.6 x the spacing of N points in
the ball x exp(N(0, 0.5^2)) per axis, random rotations, opacities sigmoid(N(0, 1)), random
colours, 128 N(0, 1) feature channels.
Figures, per backend and N:
  rgb_fwd           colour + depth forward (no gradients)
  rgb_fwd_bwd       colour + depth forward + backward, every input needs gradients
  feat128_fwd       128-channel features forward (ours renders colour + depth with them)
  feat128_fwd_bwd   128-channel forward + backward, features only: geometry and colours frozen,
                    as train_4legs.py trains them
each the median milliseconds of --iters calls after --warmup calls, timed with CUDA events on
CUDA (time.perf_counter on the CPU), and on CUDA the peak torch.cuda.max_memory_allocated in MB
(everything allocated, the scene included) and that peak less what was allocated before the
figure (what the figure's calls add).
gsplat (optional, 1.5.3 was measured): gsplat.rasterization(..., packed=False), colour + expected
depth ("RGB+ED") for the colour figures and the 128 channels alone ("RGB") for the feature ones.
Without gsplat installed, or on the CPU, only ours is timed.
"""

import argparse
import math
import statistics
import time

import numpy as np
import torch

import diff_gaussian_rasterization as dgr
import diff_gaussian_rasterization_feat as dgrf
import helpers

BACKENDS = ("ours", "gsplat")
FIGURES = {
    "rgb_fwd": "RGB+depth forward",
    "rgb_fwd_bwd": "RGB+depth forward+backward",
    "feat128_fwd": "128-ch features forward",
    "feat128_fwd_bwd": "128-ch fwd+bwd, features only",
}
FEATURE_CHANNELS = 128  # the latent size 4-LEGS renders
RING_CAMERAS, RING_WIDTH, RING_HEIGHT = 27, 640, 360  # PanopticSports' train rig and image size
RING_FOCAL, RING_RADIUS, RING_HEIGHT_ABOVE = 465.0, 3.5, 1.5  # pixels, metres, metres
NEAR, FAR = 0.01, 100.0  # the clipping planes of helpers.setup_camera's defaults
SCALE_FILL = 0.6  # median scale / the spacing of N Gaussians in the ball: they overlap, as in a trained scene


def ring_meta():
    """load_meta's keys (w, h, k, w2c, cam_id; one timestep) for the synthetic ring of cameras."""
    k = [[RING_FOCAL, 0.0, RING_WIDTH / 2], [0.0, RING_FOCAL, RING_HEIGHT / 2], [0.0, 0.0, 1.0]]
    angles = [2 * math.pi * c / RING_CAMERAS for c in range(RING_CAMERAS)]
    return {
        "w": RING_WIDTH,
        "h": RING_HEIGHT,
        "k": [[k] * RING_CAMERAS],
        "w2c": [[helpers.orbit_w2c((0.0, 0.0, 0.0), RING_RADIUS, RING_HEIGHT_ABOVE, a).tolist() for a in angles]],
        "cam_id": list(range(RING_CAMERAS)),
        "path": f"a ring of {RING_CAMERAS} cameras at {RING_WIDTH}x{RING_HEIGHT}",
    }


def scene_ball(meta):
    """(centre [3], radius) of the ball the Gaussians fill: the least-squares point closest to the
    optical axes of the cameras of timestep 0, and half their mean distance to it."""
    w2c = np.asarray(meta["w2c"][0], dtype=np.float64)
    c2w = np.linalg.inv(w2c)
    origins, axes = c2w[:, :3, 3], c2w[:, :3, 2]
    off_axis = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]  # projects onto each axis' normal plane
    centre = np.linalg.lstsq(off_axis.sum(0), np.einsum("cij,cj->i", off_axis, origins), rcond=None)[0]
    depths = np.einsum("cij,j->ci", w2c[:, :3, :3], centre) + w2c[:, :3, 3]
    if (depths[:, 2] <= NEAR).any():
        raise helpers.UserError(
            f"{meta['path']}: the optical axes of the cameras of timestep 0 meet nowhere in front of all "
            f"of them (the benchmark fills the region they look at); use a sequence whose cameras look at "
            f"one region, or leave out -s for a ring of cameras"
        )
    return centre, 0.5 * float(np.linalg.norm(origins - centre, axis=1).mean())


def random_scene(n, meta, device):
    """n Gaussians in the ball of scene_ball, seed 0 (the same on every device): means3D [n, 3],
    scales [n, 3], rotations [n, 4] unit wxyz, opacities [n, 1], colors_precomp [n, 3], features
    [n, FEATURE_CHANNELS], float32 on `device`."""
    centre, radius = scene_ball(meta)
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=g))
    distance = radius * torch.rand(n, 1, generator=g) ** (1 / 3)  # uniform in the ball's volume
    spacing = (4 / 3 * math.pi * radius**3 / n) ** (1 / 3)
    scene = {
        "means3D": torch.tensor(centre, dtype=torch.float32) + direction * distance,
        "scales": SCALE_FILL * spacing * torch.exp(0.5 * torch.randn(n, 3, generator=g)),
        "rotations": torch.nn.functional.normalize(torch.randn(n, 4, generator=g)),
        "opacities": torch.sigmoid(torch.randn(n, 1, generator=g)),
        "colors_precomp": torch.rand(n, 3, generator=g),
        "features": torch.randn(n, FEATURE_CHANNELS, generator=g),
    }
    return {key: value.to(device) for key, value in scene.items()}


def in_view(scene, meta):
    """Fraction of the Gaussians' centres that camera 0 sees (in front of it, inside the image)."""
    w2c = torch.tensor(meta["w2c"][0][0], dtype=torch.float32)
    k = torch.tensor(meta["k"][0][0], dtype=torch.float32)
    cam = scene["means3D"].cpu() @ w2c[:3, :3].T + w2c[:3, 3]
    pixels = cam @ k.T
    x, y = pixels[:, 0] / pixels[:, 2], pixels[:, 1] / pixels[:, 2]
    seen = (cam[:, 2] > NEAR) & (x >= 0) & (x < meta["w"]) & (y >= 0) & (y < meta["h"])
    return float(seen.float().mean())


# ---------------------------------------------------------------- ours


def ours_cameras(meta, device):
    """Rasterizer settings of the cameras of timestep 0. Built on the CPU, then moved: building them
    on the GPU (torch.inverse, matrix products) would leave cuBLAS's workspace allocated, counted in
    ours' peak memory but not in gsplat's."""
    on_device = ("bg", "viewmatrix", "projmatrix", "campos")
    return [
        cam._replace(**{name: getattr(cam, name).to(device) for name in on_device})
        for cam in helpers.cameras_at(meta, 0, NEAR, FAR)
    ]


def ours_figures(scene, cams):
    """{figure: call(i)} of this repository's rasterizers; call i renders camera i mod len(cams)."""
    geometry = {key: scene[key] for key in ("means3D", "scales", "rotations", "opacities", "colors_precomp")}
    leaves = {key: value.clone().requires_grad_(True) for key, value in scene.items()}

    def render(package, i, inputs, **features):
        means2D = torch.zeros_like(scene["means3D"], requires_grad=inputs["means3D"].requires_grad)
        return package.GaussianRasterizer(cams[i % len(cams)])(means2D=means2D, **inputs, **features)

    def rgb_fwd(i):
        with torch.no_grad():
            render(dgr, i, geometry)

    def rgb_fwd_bwd(i):
        for leaf in leaves.values():  # as after a training step's zero_grad: backward writes fresh gradients
            leaf.grad = None
        image, _, depth = render(dgr, i, {key: leaves[key] for key in geometry})
        (image.sum() + depth.sum()).backward()

    def feat_fwd(i):
        with torch.no_grad():
            render(dgrf, i, geometry, legs_features=scene["features"])

    def feat_fwd_bwd(i):
        leaves["features"].grad = None
        features = render(dgrf, i, geometry, legs_features=leaves["features"])[3]
        features.sum().backward()

    return dict(zip(FIGURES, (rgb_fwd, rgb_fwd_bwd, feat_fwd, feat_fwd_bwd)))


# ---------------------------------------------------------------- gsplat (optional)


def import_gsplat():
    """gsplat.rasterization (gsplat 1.5.3's public API), or None where gsplat is not installed."""
    try:
        from gsplat import rasterization
    except ImportError:
        return None
    return rasterization


def gsplat_figures(rasterization, scene, meta, device):
    """{figure: call(i)} of gsplat's `rasterization` on the same scene and cameras as ours_figures."""
    viewmats = torch.tensor(meta["w2c"][0], dtype=torch.float32, device=device)  # [C, 4, 4] world-to-camera
    intrinsics = torch.tensor(meta["k"][0], dtype=torch.float32, device=device)  # [C, 3, 3]
    leaves = {key: value.clone().requires_grad_(True) for key, value in scene.items()}

    def render(i, inputs, colors, mode):
        c = i % len(viewmats)
        out, _, _ = rasterization(
            inputs["means3D"],
            inputs["rotations"],
            inputs["scales"],
            inputs["opacities"].squeeze(-1),
            colors,
            viewmats[c : c + 1],
            intrinsics[c : c + 1],
            meta["w"],
            meta["h"],
            near_plane=NEAR,
            far_plane=FAR,
            render_mode=mode,
            packed=False,
        )
        return out  # [1, H, W, channels]

    def rgb_fwd(i):
        with torch.no_grad():
            render(i, scene, scene["colors_precomp"], "RGB+ED")

    def rgb_fwd_bwd(i):
        for leaf in leaves.values():
            leaf.grad = None
        render(i, leaves, leaves["colors_precomp"], "RGB+ED").sum().backward()

    def feat_fwd(i):
        with torch.no_grad():
            render(i, scene, scene["features"], "RGB")

    def feat_fwd_bwd(i):
        leaves["features"].grad = None
        render(i, scene, leaves["features"], "RGB").sum().backward()

    return dict(zip(FIGURES, (rgb_fwd, rgb_fwd_bwd, feat_fwd, feat_fwd_bwd)))


# ---------------------------------------------------------------- timing


def measure(call, device, iters, warmup):
    """(median ms of `iters` calls after `warmup` calls, peak MB allocated, peak MB beyond what was
    allocated before); the two memory figures are None on the CPU."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    for i in range(warmup):
        call(i)
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for i in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            call(i)
            times.append((time.perf_counter() - started) * 1e3)
    if not cuda:
        return statistics.median(times), None, None
    peak = torch.cuda.max_memory_allocated(device)
    return statistics.median(times), peak / 2**20, (peak - before) / 2**20


def report(results, sizes, backends, memory):
    """The table of docs/performance.md: per N and figure, each backend's median ms (with memory:
    peak MB, and MB beyond what was allocated before) and gsplat / ours where both ran."""
    both = backends == ["ours", "gsplat"]
    print(
        "\n| N | figure | "
        + " | ".join(f"{b}, ms" + (" (peak MB, +MB)" if memory else "") for b in backends)
        + (" | gsplat / ours |" if both else " |")
    )
    print("|---" * (2 + len(backends) + both) + "|")
    for n in sizes:
        for figure, label in FIGURES.items():
            cells = []
            for backend in backends:
                ms, peak, added = results[backend, n][figure]
                cells.append(f"{ms:.3f}" + (f" ({peak:.1f}, +{added:.1f})" if peak is not None else ""))
            ratio = f" | {results['gsplat', n][figure][0] / results['ours', n][figure][0]:.2f}" if both else ""
            print(f"| {n} | {label} | " + " | ".join(cells) + ratio + " |")


def check_args(args):
    """Raise UserError for an unknown backend, a count of Gaussians below 1 or a bad --iters or
    --warmup; drop repeated sizes. Returns the backends asked for, in BACKENDS' order."""
    for name in args.backends:
        if name not in BACKENDS:
            raise helpers.UserError(f"--backends {name}: unknown backend; choose from {', '.join(BACKENDS)}")
    for n in args.gaussians:
        if n < 1:
            raise helpers.UserError(f"--gaussians {n}: a scene needs at least 1 Gaussian")
    helpers.check_option(args, "iters", at_least=1)
    helpers.check_option(args, "warmup", at_least=0)
    args.gaussians = list(dict.fromkeys(args.gaussians))
    return [b for b in BACKENDS if b in args.backends]


def main(argv=None):
    """Parse `argv` (sys.argv without it), time every backend on every N, print the table. Returns
    {(backend, N): {figure: (median ms, peak MB, + MB)}} (MB None on the CPU)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "-s",
        "--seq",
        help=f"sequence folder, or its name under {helpers.DATA_DIR}/ (as the stage scripts' -s): its train "
        f"cameras of timestep 0 (default: a ring of {RING_CAMERAS} cameras at {RING_WIDTH}x{RING_HEIGHT})",
    )
    parser.add_argument("--gaussians", type=int, nargs="+", default=[300_000], help="scene sizes (default: 300000)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), help="ours, gsplat (default: both)")
    parser.add_argument("--iters", type=int, default=30, help="timed calls per figure (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before them (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    args = parser.parse_args(argv)
    backends = check_args(args)
    device = helpers.pick_device(args.device)
    meta = helpers.load_meta(helpers.find_sequence(args.seq), "train") if args.seq else ring_meta()
    rasterization = import_gsplat() if "gsplat" in backends else None
    if "gsplat" in backends and rasterization is None:
        print("gsplat: not installed (pip install gsplat==1.5.3 to compare); timing ours only")
        backends.remove("gsplat")
    elif "gsplat" in backends and device.type != "cuda":
        print("gsplat: runs on CUDA only; timing ours only")
        backends.remove("gsplat")
    if not backends:
        raise helpers.UserError("--backends gsplat: gsplat cannot run here (see above); add ours, or install gsplat")
    if device.type == "cuda":
        print(f"timing: CUDA events on {torch.cuda.get_device_name(device)}")
    else:
        print(
            f"timing: time.perf_counter on the CPU ({torch.get_num_threads()} torch threads); no peak memory on the CPU"
        )
    if "ours" in backends:
        fast = device.type == "cuda" and dgr.cuda_available() and dgrf.cuda_available()
        print(f"ours: {'CUDA kernels' if fast else 'PyTorch reference path (no CUDA extension used)'}")
    print(f"cameras: {len(meta['cam_id'])} of {meta['path']}, {meta['w']}x{meta['h']}, in turn")
    cams = ours_cameras(meta, device)
    results = {}
    for n in args.gaussians:
        scene = random_scene(n, meta, device)
        print(f"\n{n} Gaussians, {100 * in_view(scene, meta):.1f}% of the centres in view of camera 0")
        for backend in backends:
            figures = (
                ours_figures(scene, cams) if backend == "ours" else gsplat_figures(rasterization, scene, meta, device)
            )
            results[backend, n] = {}
            for figure, call in figures.items():
                results[backend, n][figure] = ms, peak, added = measure(call, device, args.iters, args.warmup)
                memory = f", peak {peak:.1f} MB (+{added:.1f} MB)" if peak is not None else ""
                print(f"  {backend:6s} {FIGURES[figure]:30s} {ms:8.3f} ms{memory}")
            del figures  # the gradient copies of the scene go before the next backend's figures
        del scene  # freed before the next size's scene is drawn
    report(results, args.gaussians, backends, memory=device.type == "cuda")
    return results


if __name__ == "__main__":
    helpers.run_main(main)
