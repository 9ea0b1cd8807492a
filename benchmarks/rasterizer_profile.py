"""Where the time and memory of the CUDA rasterizer go: per mode, the CUDA-event median (as the
agreed benchmark times it), the host time of one call, the GPU time of each kernel (torch.profiler),
and the allocations alive at the call's peak (beyond what existed before it; the figure the
benchmark's peakMB adds to the inputs), also for gsplat with --gsplat.

    python benchmarks/rasterizer_profile.py --gaussians 300000 --meta data/basketball/train_meta.json

The scene follows the agreed benchmark (rasterizer_bench.py, docs/performance.md): Gaussians in a
ball at the point closest to the optical axes of the cameras of train_meta.json (its first
timestep), seen by its first camera.
A gap between the event median and the summed kernel time is time the GPU waits for the host.
"""

import argparse
import json
import math
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import diff_gaussian_rasterization as dgr
import diff_gaussian_rasterization_feat as dgrf


def bench_scene(n, meta_path, device="cuda"):
    """Inputs like the agreed benchmark's, and the settings of its first camera."""
    meta = json.load(open(meta_path))
    width, height = meta["w"], meta["h"]
    w2cs, ks = np.array(meta["w2c"][0]), np.array(meta["k"][0])
    c2w = np.linalg.inv(w2cs)
    origins, axes = c2w[:, :3, 3], c2w[:, :3, 2]
    lhs, rhs = np.zeros((3, 3)), np.zeros(3)
    for o, d in zip(origins, axes):
        proj = np.eye(3) - np.outer(d, d)
        lhs += proj
        rhs += proj @ o
    center = np.linalg.solve(lhs, rhs)
    radius = 0.5 * np.mean(np.linalg.norm(origins - center, axis=1))
    g = torch.Generator().manual_seed(0)
    u = torch.randn(n, 3, generator=g)
    u = u / u.norm(dim=1, keepdim=True) * torch.rand(n, 1, generator=g) ** (1 / 3) * radius
    s0 = (4 / 3 * math.pi * radius**3 / n) ** (1 / 3) * 0.6
    scene = {
        "means3D": u + torch.tensor(center, dtype=torch.float32),
        "scales": s0 * torch.exp(0.5 * torch.randn(n, 3, generator=g)),
        "rotations": torch.nn.functional.normalize(torch.randn(n, 4, generator=g)),
        "opacities": torch.sigmoid(torch.randn(n, 1, generator=g)),
        "colors": torch.rand(n, 3, generator=g),
        "features": torch.randn(n, 128, generator=g),
    }
    scene = {k: v.to(device).contiguous() for k, v in scene.items()}
    k, near, far = ks[0], 0.01, 100.0
    fx, fy, cx, cy = k[0][0], k[1][1], k[0][2], k[1][2]
    view = torch.tensor(w2cs[0], dtype=torch.float32).T.contiguous()
    proj = torch.tensor(
        [
            [2 * fx / width, 0.0, -(width - 2 * cx) / width, 0.0],
            [0.0, 2 * fy / height, -(height - 2 * cy) / height, 0.0],
            [0.0, 0.0, far / (far - near), -(far * near) / (far - near)],
            [0.0, 0.0, 1.0, 0.0],
        ],
        dtype=torch.float32,
    ).T
    settings = dgr.GaussianRasterizationSettings(
        image_height=height,
        image_width=width,
        tanfovx=width / (2 * fx),
        tanfovy=height / (2 * fy),
        bg=torch.zeros(3, device=device),
        scale_modifier=1.0,
        viewmatrix=view.to(device),
        projmatrix=(view @ proj).to(device),
        sh_degree=0,
        campos=torch.inverse(torch.tensor(w2cs[0], dtype=torch.float32))[:3, 3].to(device),
        prefiltered=False,
    )
    return scene, settings


def modes(scene, settings):
    """The four figures of the agreed benchmark, as functions of no arguments."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in scene.items()}
    rgb, feat = dgr.GaussianRasterizer(settings), dgrf.GaussianRasterizer(settings)

    def rgb_fwd():
        with torch.no_grad():
            rgb(
                scene["means3D"],
                torch.zeros_like(scene["means3D"]),
                scene["opacities"],
                colors_precomp=scene["colors"],
                scales=scene["scales"],
                rotations=scene["rotations"],
            )

    def rgb_fwd_bwd():
        means2D = torch.zeros_like(scene["means3D"], requires_grad=True)
        image, _, depth = rgb(
            leaves["means3D"],
            means2D,
            leaves["opacities"],
            colors_precomp=leaves["colors"],
            scales=leaves["scales"],
            rotations=leaves["rotations"],
        )
        (image.sum() + depth.sum()).backward()

    def feat_fwd():
        with torch.no_grad():
            feat(
                scene["means3D"],
                torch.zeros_like(scene["means3D"]),
                scene["opacities"],
                colors_precomp=scene["colors"],
                legs_features=scene["features"],
                scales=scene["scales"],
                rotations=scene["rotations"],
            )

    def feat_fwd_bwd():  # frozen geometry: only the features need gradients
        out = feat(
            scene["means3D"],
            torch.zeros_like(scene["means3D"]),
            scene["opacities"],
            colors_precomp=scene["colors"],
            legs_features=leaves["features"],
            scales=scene["scales"],
            rotations=scene["rotations"],
        )
        out[3].sum().backward()

    return {"rgb_fwd": rgb_fwd, "rgb_fwd_bwd": rgb_fwd_bwd, "feat128_fwd": feat_fwd, "feat128_fwd_bwd": feat_fwd_bwd}


def event_median(fn, iters=30, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def host_median(fn, iters=30):
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)  # until the last launch returned
    torch.cuda.synchronize()
    return float(np.median(times))


def kernel_table(fn, iters=10):
    """Per call: GPU milliseconds of each kernel (and memset/memcpy), largest first, and host
    milliseconds of the CUDA runtime calls (launches, allocations, the synchronisation)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    gpu, host = [], []
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if device_us > 0:
            gpu.append((device_us / 1e3 / iters, e.count // iters, e.key))
        elif e.key.startswith("cuda") and e.self_cpu_time_total > 0:
            host.append((e.self_cpu_time_total / 1e3 / iters, e.count // iters, e.key))
    return sorted(gpu, reverse=True), sorted(host, reverse=True)


def gsplat_modes(scene, settings, meta_path):
    """The agreed benchmark's gsplat calls (rasterization, packed=False) for the same camera."""
    from gsplat import rasterization

    meta = json.load(open(meta_path))
    view = torch.tensor(meta["w2c"][0][0], dtype=torch.float32, device="cuda")[None]
    intrinsics = torch.tensor(meta["k"][0][0], dtype=torch.float32, device="cuda")[None]
    leaves = {k: v.clone().requires_grad_(True) for k, v in scene.items()}

    def run(inputs, colors, mode):
        out, _, _ = rasterization(
            inputs["means3D"],
            inputs["rotations"],
            inputs["scales"],
            inputs["opacities"].squeeze(-1),
            colors,
            view,
            intrinsics,
            settings.image_width,
            settings.image_height,
            near_plane=0.01,
            far_plane=100,
            render_mode=mode,
            packed=False,
        )
        return out

    def rgb_fwd():
        with torch.no_grad():
            run(scene, scene["colors"], "RGB+ED")

    def rgb_fwd_bwd():
        run(leaves, leaves["colors"], "RGB+ED").sum().backward()

    return {"gsplat_rgb_fwd": rgb_fwd, "gsplat_rgb_fwd_bwd": rgb_fwd_bwd}


def memory_at_peak(fn):
    """(peak MB beyond the allocations alive before the call, [MB of each block alive at that
    peak], largest first), from the caching allocator's trace of one call."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    fn()
    torch.cuda.synchronize()
    trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak = {}, 0, 0, []
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event["size"]
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])
        if total > peak:
            peak, at_peak = total, sorted(live.values(), reverse=True)
    return peak / 2**20, [size / 2**20 for size in at_peak]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gaussians", type=int, default=300_000, help="number of Gaussians")
    parser.add_argument(
        "--meta", required=True, help="train_meta.json of PanopticSports basketball (the benchmark's cameras)"
    )
    parser.add_argument("--gsplat", action="store_true", help="also the memory of gsplat's RGB calls")
    args = parser.parse_args()
    if not dgr.cuda_available():
        raise SystemExit("the CUDA extension is not built or no GPU is visible")
    scene, settings = bench_scene(args.gaussians, args.meta)
    for name, fn in modes(scene, settings).items():
        median = event_median(fn)
        host = host_median(fn)
        gpu, runtime = kernel_table(fn)
        print(
            f"\n{name}: event median {median:.3f} ms, host time per call {host:.3f} ms, "
            f"kernels {sum(r[0] for r in gpu):.3f} ms"
        )
        for ms, count, key in gpu:
            print(f"  {ms:8.4f} ms  x{count:<3d} {key[:100]}")
        print("  host, CUDA runtime calls:")
        for ms, count, key in runtime:
            print(f"  {ms:8.4f} ms  x{count:<3d} {key[:100]}")
    memory_modes = modes(scene, settings)
    if args.gsplat:
        memory_modes.update(gsplat_modes(scene, settings, args.meta))
    for name, fn in memory_modes.items():
        peak, blocks = memory_at_peak(fn)
        print(
            f"\n{name}: {peak:.1f} MB at the peak beyond the inputs, in {len(blocks)} blocks (MB):",
            " ".join(f"{mb:.2f}" for mb in blocks),
        )


if __name__ == "__main__":
    main()
