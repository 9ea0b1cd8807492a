"""Where the time and memory of the CUDA rasterizer go: per mode, the CUDA-event median (as
bench_rasterizer.py times it), the host time of one call, the GPU time of each kernel
(torch.profiler), and the allocations alive at the call's peak (beyond what existed before it; the
figure bench_rasterizer.py's "+MB" gives), also for gsplat with --gsplat.

    python benchmarks/rasterizer_profile.py --gaussians 300000 -s basketball

The scene and calls are bench_rasterizer.py's (docs/performance.md), seen by the first train
camera of timestep 0 of the sequence (without -s, of bench_rasterizer.py's ring of cameras).
A gap between the event median and the summed kernel time is time the GPU waits for the host.
"""

import argparse
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import diff_gaussian_rasterization as dgr
import helpers
from bench_rasterizer import gsplat_figures, import_gsplat, measure, ours_cameras, ours_figures, random_scene, ring_meta


def host_median(fn, iters=30):
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(0)
        times.append((time.perf_counter() - t0) * 1e3)  # until the last launch returned
    torch.cuda.synchronize()
    return float(np.median(times))


def kernel_table(fn, iters=10):
    """Per call: GPU milliseconds of each kernel (and memset/memcpy), largest first, and host
    milliseconds of the CUDA runtime calls (launches, allocations, the synchronisation)."""
    fn(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn(0)
        torch.cuda.synchronize()
    gpu, host = [], []
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if device_us > 0:
            gpu.append((device_us / 1e3 / iters, e.count // iters, e.key))
        elif e.key.startswith("cuda") and e.self_cpu_time_total > 0:
            host.append((e.self_cpu_time_total / 1e3 / iters, e.count // iters, e.key))
    return sorted(gpu, reverse=True), sorted(host, reverse=True)


def memory_at_peak(fn):
    """(peak MB beyond the allocations alive before the call, [MB of each block alive at that
    peak], largest first), from the caching allocator's trace of one call."""
    fn(0)
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    fn(0)
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
    parser.add_argument("--gaussians", type=int, default=300_000, help="number of Gaussians (default: %(default)s)")
    parser.add_argument(
        "-s",
        "--seq",
        help=f"sequence folder, or its name under {helpers.DATA_DIR}/: its first train camera of timestep 0 "
        f"(default: bench_rasterizer.py's ring of cameras)",
    )
    parser.add_argument("--gsplat", action="store_true", help="also the memory of gsplat's calls")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and dgr.cuda_available()):
        raise helpers.UserError("this profile times the CUDA kernels: it needs a GPU and the built extension")
    if args.gaussians < 1:
        raise helpers.UserError(f"--gaussians {args.gaussians}: a scene needs at least 1 Gaussian")
    rasterization = import_gsplat() if args.gsplat else None
    if args.gsplat and rasterization is None:
        raise helpers.UserError("--gsplat: gsplat is not installed (pip install gsplat==1.5.3)")
    device = torch.device("cuda")
    meta = helpers.load_meta(helpers.find_sequence(args.seq), "train") if args.seq else ring_meta()
    scene = random_scene(args.gaussians, meta, device)  # the ball where all the cameras look
    first = {**meta, "k": [meta["k"][0][:1]], "w2c": [meta["w2c"][0][:1]], "cam_id": meta["cam_id"][:1]}
    modes = ours_figures(scene, ours_cameras(first, device))
    for name, fn in modes.items():
        median = measure(fn, device, iters=30, warmup=5)[0]
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
    if args.gsplat:
        modes.update({f"gsplat_{k}": v for k, v in gsplat_figures(rasterization, scene, first, device).items()})
    for name, fn in modes.items():
        peak, blocks = memory_at_peak(fn)
        print(
            f"\n{name}: {peak:.1f} MB at the peak beyond the inputs, in {len(blocks)} blocks (MB):",
            " ".join(f"{mb:.2f}" for mb in blocks),
        )


if __name__ == "__main__":
    helpers.run_main(main)
