"""Viewer speed (viewer.py) on random basketball-sized Gaussians: no stage outputs needed.

frame: one blended RGB + heatmap frame of one prompt, as the viewer draws it (render_frame: colour +
128 feature channels in one rasterizer pass, autoencoder decode, relevancy, turbo blend, uint8 image
copied to the host), the timestep moving on every frame as in playback; timed with CUDA events on
a GPU. Target: >= 60 frames/s at 350k Gaussians, 640x360. Also the JPEG encoding of that image on
the host, which the viewer adds before sending it (not part of the target).

timeline: a new prompt's whole timeline (prompt_timeline) over every timestep, from 1 view (as the
original's train camera 0) and from 4 (basketball's test cameras, visualize_4legs.py's default
--cams test). Target: <= 3 s over 150 timesteps. The text encoder is not timed (random embeddings).

    python benchmarks/bench_viewer.py                       # GPU: 350k Gaussians, 128-d, 640x360, 150 timesteps
    python benchmarks/bench_viewer.py --device cpu --gaussians 20000 --width 160 --height 90 --timesteps 4 \\
        --frames 5 --repeats 1                              # a quick check on the CPU
"""

import argparse
import io
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

import helpers
import viewer
from feature_extraction.autoencoder import Autoencoder


def random_frames(n, channels, num_t, device, seed=0):
    """num_t rendervars of n Gaussians in a 4 m cube (bench_reference's sizes), moving a little
    each timestep, with their own random unit features [n, channels] per timestep."""
    from bench_reference import make_scene

    g = torch.Generator().manual_seed(seed)
    scene = {k: v.to(device) for k, v in make_scene(n, seed).items()}
    scene["seg_colors"] = (torch.rand(n, 3, generator=g) > 0.5).float().to(device)
    drift = 0.01 * torch.randn(n, 3, generator=g).to(device)
    return [
        {
            **scene,
            "means3D": scene["means3D"] + t * drift,
            "legs_features": F.normalize(torch.randn(n, channels, device=device), dim=-1),
        }
        for t in range(num_t)
    ]


def cuda_seconds(device, run):
    """Seconds `run()` takes: CUDA events on a GPU, the wall clock on the CPU."""
    if device.type != "cuda":
        started = time.perf_counter()
        run()
        return time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    p.add_argument("--gaussians", type=int, default=350_000, help="Gaussians (default: %(default)s)")
    p.add_argument("--channels", type=int, default=128, help="feature channels (default: %(default)s)")
    p.add_argument("--width", type=int, default=640, help="image width (default: %(default)s)")
    p.add_argument("--height", type=int, default=360, help="image height (default: %(default)s)")
    p.add_argument("--timesteps", type=int, default=150, help="timesteps of the timeline (default: %(default)s)")
    p.add_argument("--frames", type=int, default=200, help="timed frames (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed timelines per view count (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = helpers.pick_device(args.device)
    torch.manual_seed(0)
    frames = random_frames(args.gaussians, args.channels, args.timesteps, device)
    w, h = args.width, args.height
    k = [[0.9 * w, 0, w / 2], [0, 0.9 * w, h / 2], [0, 0, 1]]
    cams = [
        helpers.setup_camera(w, h, k, helpers.orbit_w2c((0, 0, 0), 5.0, 1.5, 2 * math.pi * c / 4), device=device)
        for c in range(4)
    ]
    ae = Autoencoder().to(device).eval()
    positive, negatives = (F.normalize(torch.randn(q, 768, device=device), dim=-1) for q in (1, 4))
    lights = [{"positive": positive[0], "colour": (1.0, 0.5, 0.0), "peak": 0.3}]
    turbo = viewer.turbo_table(device)
    import diff_gaussian_rasterization as dgr

    print(
        f"{args.gaussians} Gaussians, {args.channels} channels, {w}x{h}, {args.timesteps} timesteps, {device} "
        f"({'CUDA kernels' if device.type == 'cuda' and dgr.cuda_available() else 'PyTorch reference'})"
    )

    def frame(i):
        return viewer.render_frame(cams[0], frames[i % args.timesteps], "blend", lights, ae, negatives, turbo)

    for i in range(min(5, args.frames)):  # warm-up: kernels loaded, allocator filled
        frame(i)
    frame_s = [cuda_seconds(device, lambda: frame(i)) for i in range(args.frames)]
    image = frame(0)
    import imageio.v3 as iio

    jpeg_s = []
    for _ in range(20):
        started = time.perf_counter()
        iio.imwrite(io.BytesIO(), image, extension=".jpeg", quality=viewer.JPEG_QUALITY)
        jpeg_s.append(time.perf_counter() - started)
    median_frame = statistics.median(frame_s)
    print(
        f"frame: {1000 * median_frame:.2f} ms median over {args.frames} -> {1 / median_frame:.1f} frames/s "
        f"(target >= 60); JPEG encoding on the host {1000 * statistics.median(jpeg_s):.2f} ms"
    )

    results = {
        "frame_ms": round(1000 * median_frame, 3),
        "frames_per_s": round(1 / median_frame, 1),
        "jpeg_ms": round(1000 * statistics.median(jpeg_s), 3),
    }
    for num_views in (1, 4):
        views = [(f"cam{c}", [cams[c]] * args.timesteps) for c in range(num_views)]
        seconds = [
            cuda_seconds(device, lambda: viewer.prompt_timeline(frames, views, ae, positive[0], negatives))
            for _ in range(args.repeats)
        ]
        results[f"timeline_{num_views}_views_s"] = round(statistics.median(seconds), 3)
        print(
            f"timeline, {num_views} view(s) x {args.timesteps} timesteps: {statistics.median(seconds):.3f} s "
            f"median over {args.repeats} (target <= 3)"
        )
    if device.type == "cuda":
        results["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    print(
        json.dumps(
            {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", **vars(args), **results}
        )
    )


if __name__ == "__main__":
    main()
