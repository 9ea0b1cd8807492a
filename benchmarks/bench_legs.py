"""Stage-5 (train_4legs.py) benchmarks: speed per timestep, and what the warm start saves.

speed: seconds per basketball-sized timestep, on random Gaussians in front of a ring of cameras
and a stage-3 cache of random tile embeddings (no stage outputs needed); a timestep = neighbours +
target maps (interpolation + autoencoder) + the iterations (blend matrices, where used, included):

    python benchmarks/bench_legs.py speed --gaussians 300000 --cams 27 --width 640 --height 360 [--profile 50]

--profile N then runs N warm iterations and every camera's target map under torch.profiler.

warmstart: on a sequence whose stages 1, 3 and 4 are done, train timestep t cold (zero latents, fresh
attention, as the original) and warm (from timestep t-1, trained cold first), evaluating the L1
loss over ALL train cameras every --eval-every iterations; prints the curves and how many
iterations the warm start needs to reach the cold run's final loss:

    python benchmarks/bench_legs.py warmstart -s data/synthetic -e demo --encoder color -t 12
"""

import argparse
import atexit
import math
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

import bench_d3dgs
import helpers
import train_4legs
from feature_extraction.autoencoder import Autoencoder, ae_ckpt_path, load_autoencoder
from feature_extraction.relevancy import d3dgs_params_path, encoder_name, feature_cache


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_scene(n, device):
    """bench_reference's scene (sizes as a trained scene) plus segmentation colours, on `device`."""
    from bench_reference import make_scene

    scene = make_scene(n)
    scene["seg_colors"] = torch.rand(n, 3, generator=torch.Generator().manual_seed(1))
    return {k: v.to(device) for k, v in scene.items()}


def speed(args):
    device = helpers.pick_device(args.device)
    import diff_gaussian_rasterization_feat as dgrf

    use_rasterizer = device.type == "cuda" and dgrf.cuda_available()
    w, h = args.width, args.height
    k = np.array([[0.9 * w, 0, w / 2], [0, 0.9 * w, h / 2], [0, 0, 1]])
    cams = [
        helpers.setup_camera(
            w, h, k, helpers.orbit_w2c((0, 0, 0), 5.0, 1.5, 2 * math.pi * c / args.cams), device=device
        )
        for c in range(args.cams)
    ]
    rendervar = random_scene(args.gaussians, device)
    timings = {}

    sync(device)
    t0 = time.perf_counter()
    neighbours = train_4legs.neighbour_indices(rendervar["means3D"])
    sync(device)
    timings["neighbours_s"] = time.perf_counter() - t0
    # a warm-started timestep trains the foreground's rows alone (train_4legs.prepare_timestep)
    foreground = torch.randperm(args.gaussians, generator=torch.Generator().manual_seed(1))
    foreground = foreground[: round(args.foreground * args.gaussians)].sort().values.to(device)
    sync(device)
    t0 = time.perf_counter()
    foreground_neighbours = train_4legs.neighbour_indices(rendervar["means3D"], rows=foreground)
    sync(device)
    timings["neighbours_foreground_s"] = time.perf_counter() - t0
    if device.type == "cuda":  # the GPU's k-NN on grids against brute force, the same rows
        t0 = time.perf_counter()
        brute = train_4legs.knn_brute_force(rendervar["means3D"], train_4legs.NUM_NEIGHBOURS, foreground)
        sync(device)
        timings["neighbours_foreground_brute_force_s"] = time.perf_counter() - t0
        timings["neighbours_foreground_same_as_brute_force"] = float(
            (brute[:, 1:].sort(1).values == foreground_neighbours[:, 1:].sort(1).values).all(1).float().mean()
        )

    # a stage-3 cache of random tile embeddings (the real layout), so that the targets are made
    # exactly as train_4legs.py makes them: dense_feature_map (purest tiles), then the autoencoder's encoder
    from feature_extraction import cache as feature_cache, tiles

    levels = tiles.tile_levels(h, w)
    os.makedirs("results", exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench_legs_", dir="results")
    atexit.register(shutil.rmtree, work, True)  # removed when the benchmark ends, however it ends
    cache = os.path.join(work, "color")
    os.makedirs(cache)
    num_tiles = sum(args.cams * lv["rows"] * lv["cols"] for lv in levels)
    emb = torch.nn.functional.normalize(torch.randn(num_tiles, 768), dim=1).numpy()
    feature_cache.write_timestep(
        cache,
        0,
        {
            "cam_id": list(range(args.cams)),
            "levels": levels,
            "width": w,
            "height": h,
            "dim": emb.shape[1],
            "dtype": feature_cache.DTYPES[0],
        },
        emb,
    )
    ae = Autoencoder().to(device).eval()
    sync(device)
    t0 = time.perf_counter()
    guides = torch.rand(args.cams, 3, h, w, generator=torch.Generator().manual_seed(0))  # the default --tile-mix
    targets = train_4legs.encode_targets(cache, 0, ae, cams, device, lambda c: guides[c])
    for c in range(args.cams):
        targets[c]
    sync(device)
    timings["encode_targets_s"] = time.perf_counter() - t0
    renderers = train_4legs.make_renderers(cams, rendervar, use_rasterizer)
    setup = {
        "rendervar": rendervar,
        "neighbours": neighbours,
        "renderers": renderers,
        "targets": targets,
        "lrs": {"latents": 0.0025, "attention": 0.00016},
        "device": device,
        "seed": 0,
    }

    def median_ms(fn, reps=20):
        """Median wall time of fn() in ms (after two warm-up calls)."""
        times = []
        for i in range(reps + 2):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times[2:])

    latents = torch.nn.Parameter(0.1 * torch.randn(args.gaussians, 128, device=device))
    attention = train_4legs.NeighbourAttention().to(device)
    weights = [
        attention.query.weight,
        attention.query.bias,
        attention.key.weight,
        attention.value.weight,
        attention.value.bias,
        attention.out.weight,
        attention.out.bias,
    ]
    forms = {
        "by_slot": lambda: train_4legs.attention_function(
            latents, neighbours, *weights, attend=train_4legs.attend_by_slot
        ),
        "batched": lambda: train_4legs.attention_function(latents, neighbours, *weights),
    }
    if device.type == "cuda":  # the training path (fused Triton kernels) and torch.compile's best, beside it
        from legs_attention import attend_fused

        compiled = torch.compile(train_4legs.attention_function, dynamic=False)
        forms["compiled"] = lambda: compiled(latents, neighbours, *weights)
        forms["fused"] = lambda: train_4legs.attention_function(latents, neighbours, *weights, attend=attend_fused)
    for name, features in forms.items():  # features [N, 128] and the gradients of latents and weights
        timings[f"attention_{name}_ms"] = median_ms(lambda: features().sum().backward())
    if device.type == "cuda":
        q_k = torch.randn_like(latents, requires_grad=True)  # the fused kernels alone, per launch shape
        for block_n, num_warps in ((8, 8), (16, 8), (16, 4), (32, 8), (4, 4)):
            timings[f"attend_fused_{block_n}x{num_warps}_ms"] = median_ms(
                lambda: attend_fused(latents, neighbours, q_k, block_n, num_warps).sum().backward()
            )
        outputs = []  # the training path computes the same function (forward and latents' gradient)
        for name in ("batched", "fused"):
            latents.grad = None
            out = forms[name]()
            (out * torch.linspace(-1, 1, 128, device=device)).sum().backward()
            outputs.append((out.detach(), latents.grad.clone()))
        for what, a, b in zip(("forward", "gradient"), *outputs):
            print(
                f"  fused vs eager attention, {what}: max relative difference "
                f"{float((a - b).abs().max() / b.abs().max()):.2e}"
            )
    renderers[0](latents)  # the first use builds what the renderer needs
    timings["render_fwd_bwd_ms"] = median_ms(lambda: helpers.l1_loss(renderers[0](latents), targets[0]).backward())

    block_times, marks = {"cold": [], "warm": []}, {}

    def on_iter(i, params, attention):
        if (i + 1) % args.block == 0:
            sync(device)
            marks[i] = time.perf_counter()

    def timed_timestep(name, previous, num_iters):
        """Train timestep 1 from `previous` (cold: every row; warm: the foreground's, the others held
        at the previous features); records its time and its per-iteration block times."""
        marks.clear()
        held = {} if previous is None else {"neighbours": foreground_neighbours, "held_features": previous["features"]}
        sync(device)
        t0 = time.perf_counter()
        params, attention, _ = train_4legs.train_timestep(
            1, {**setup, **held}, previous, num_iters, show_progress=False, on_iter=on_iter
        )
        sync(device)
        timings[f"{name}_train_s"] = time.perf_counter() - t0
        times = [t0] + [marks[i] for i in sorted(marks)]
        block_times[name] = [(b - a) / args.block for a, b in zip(times[1:-1], times[2:])]  # not the first block
        with torch.no_grad():
            features = train_4legs.lifted_features(params, attention, {**setup, **held})
        return {"latents": params["latents"].detach(), "attention": attention.state_dict(), "features": features}

    cold_state = timed_timestep("cold", None, args.iters)
    timed_timestep("warm", cold_state, args.warm_iters)
    per_iter = {name: statistics.median(times) if times else float("nan") for name, times in block_times.items()}
    cold_fixed = timings["neighbours_s"] + timings["encode_targets_s"]
    warm_fixed = timings["neighbours_foreground_s"] + timings["encode_targets_s"]
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
        f"render: {'CUDA rasterizer' if use_rasterizer else 'precomputed blend matrices'}"
    )
    print(f"{args.gaussians} Gaussians, {args.cams} cameras {w}x{h}, 128 channels")
    for key, value in timings.items():
        print(f"  {key}: {value:.2f}")
    if device.type == "cuda":
        print(f"  peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(
        f"  median per iteration: cold {1000 * per_iter['cold']:.2f} ms, warm {1000 * per_iter['warm']:.2f} ms "
        f"(blocks of {args.block})"
    )
    print(
        f"seconds per timestep: cold ({args.iters} it) {cold_fixed + timings['cold_train_s']:.1f}, "
        f"warm ({args.warm_iters} it, {args.foreground:.0%} of the Gaussians trained) "
        f"{warm_fixed + timings['warm_train_s']:.1f}"
    )
    if args.profile:  # where a warm timestep's time goes, kernel by kernel
        warm_setup = {**setup, "neighbours": foreground_neighbours, "held_features": cold_state["features"]}
        bench_d3dgs.profile(
            lambda n: train_4legs.train_timestep(1, warm_setup, cold_state, n, show_progress=False),
            args.profile,
            "a warm-started timestep's training (train_4legs.train_timestep)",
            unit="warm iteration",
        )

        def target_maps(n):  # n cameras' target maps, each made anew
            for i in range(n):
                train_4legs.encode_targets(cache, 0, ae, cams, device, lambda c: guides[c])[i % args.cams]

        bench_d3dgs.profile(target_maps, args.cams, "the target maps (train_4legs.encode_targets)", unit="camera")


def warmstart(args):
    device = helpers.pick_device(args.device)
    name = encoder_name(args.encoder)
    meta = helpers.load_meta(args.seq, "train")
    params_path = d3dgs_params_path(args.exp, args.seq)
    ae, _ = load_autoencoder(ae_ckpt_path(args.seq), name, device)
    cache = feature_cache(args.seq, name)
    run = argparse.Namespace(downscale=args.downscale, lr_features=0.0025, lr_attention=0.00016, seed=0)

    def full_loss(setup, params, attention):
        """Mean L1 over all train cameras."""
        with torch.no_grad():
            feats = attention(params["latents"], setup["neighbours"])
            return float(
                np.mean([float(helpers.l1_loss(r(feats), tgt)) for r, tgt in zip(setup["renderers"], setup["targets"])])
            )

    def curve(t, previous, setup):
        points = []

        def on_iter(i, params, attention):
            if (i + 1) % args.eval_every == 0:
                points.append((i + 1, full_loss(setup, params, attention)))

        params, attention, _ = train_4legs.train_timestep(
            t, setup, previous, args.iters, show_progress=False, on_iter=on_iter
        )
        return params, attention, points

    setup_prev = train_4legs.prepare_timestep(args.t - 1, run, meta, params_path, ae, cache, device, False)
    params, attention, _ = curve(args.t - 1, None, setup_prev)
    previous = {"latents": params["latents"].detach(), "attention": attention.state_dict()}
    setup = train_4legs.prepare_timestep(args.t, run, meta, params_path, ae, cache, device, False)
    p0, a0, _ = train_4legs.initialize(setup["rendervar"]["means3D"].shape[0], None, setup["lrs"], device, 0)
    p1, a1, _ = train_4legs.initialize(setup["rendervar"]["means3D"].shape[0], previous, setup["lrs"], device, 0)
    start = {"cold": full_loss(setup, p0, a0), "warm": full_loss(setup, p1, a1)}
    curves = {"cold": curve(args.t, None, setup)[2], "warm": curve(args.t, previous, setup)[2]}
    print(
        f"timestep {args.t} of {args.seq} ({len(setup['renderers'])} cameras at 1/{args.downscale} resolution, "
        f"{setup['rendervar']['means3D'].shape[0]} Gaussians), L1 over all cameras"
    )
    print(f"  iteration 0: cold {start['cold']:.4f}, warm {start['warm']:.4f}")
    for (i, cold), (_, warm) in zip(curves["cold"], curves["warm"]):
        print(f"  iteration {i:5d}: cold {cold:.4f}  warm {warm:.4f}")
    final = curves["cold"][-1][1]
    reached = next((i for i, loss in [(0, start["warm"])] + curves["warm"] if loss <= final), None)
    print(
        f"cold start after {args.iters} iterations: {final:.4f}; the warm start reaches it after "
        f"{reached if reached is not None else f'more than {args.iters}'} iterations"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("speed", help="seconds per timestep on random data")
    p.add_argument("--gaussians", type=int, default=300_000, help="(default: %(default)s)")
    p.add_argument("--cams", type=int, default=27, help="train cameras (default: %(default)s)")
    p.add_argument("--width", type=int, default=640, help="(default: %(default)s)")
    p.add_argument("--height", type=int, default=360, help="(default: %(default)s)")
    p.add_argument("--iters", type=int, default=2000, help="cold-start iterations (default: %(default)s)")
    p.add_argument("--warm-iters", type=int, default=500, help="warm-start iterations (default: %(default)s)")
    p.add_argument("--block", type=int, default=100, help="iterations per timed block (default: %(default)s)")
    p.add_argument(
        "--foreground",
        type=float,
        default=0.3,
        help="share of the Gaussians a warm-started timestep trains (the foreground's; basketball: 0.31) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="then profile N warm iterations and the target maps of every camera under torch.profiler: the "
        "top CUDA kernels, GPU busy against wall time, the host operators; 0: no profile (default: %(default)s)",
    )
    p.add_argument("--device", default=None)
    p = sub.add_parser("warmstart", help="cold against warm start on a real sequence")
    p.add_argument(
        "-s",
        "--seq",
        required=True,
        help=f"sequence folder, or its name under {helpers.DATA_DIR}/ (as the stage scripts' -s)",
    )
    p.add_argument("-e", "--exp", default="exp1")
    p.add_argument("--encoder", required=True)
    p.add_argument("-t", type=int, default=1, help="timestep to compare (t-1 is trained first; default: %(default)s)")
    p.add_argument("--iters", type=int, default=300, help="iterations of each run (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=20, help="(default: %(default)s)")
    p.add_argument("--downscale", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--device", default=None)
    args = parser.parse_args()
    if args.mode == "warmstart":
        args.seq = helpers.find_sequence(args.seq)
    if args.mode == "warmstart" and args.t < 1:
        raise helpers.UserError("-t must be >= 1 (timestep t-1 is the warm start's source)")
    if args.mode == "speed":
        helpers.check_option(args, "profile", at_least=0)
    if args.mode == "speed" and not (args.foreground * args.gaussians >= 1 and args.foreground <= 1):
        raise helpers.UserError(
            f"--foreground {args.foreground}: the share of the Gaussians a warm timestep trains, in (0, 1], "
            f"at least one of --gaussians {args.gaussians}"
        )
    speed(args) if args.mode == "speed" else warmstart(args)


if __name__ == "__main__":
    helpers.run_main(main)
