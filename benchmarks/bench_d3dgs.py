"""Where the time of a stage-1 iteration goes: CUDA-event timings per phase of train_d3dgs.py's loop.

    python benchmarks/bench_d3dgs.py -s .devdata/basketball [--state output/dev/basketball/timesteps]

Runs the loop's own functions (train_d3dgs.get_losses, external.densify, ...) phase by phase with
CUDA events between them, in two settings:
  t = 0   image + segmentation losses, densification statistics every iteration and one clone /
          split / prune step every 100 iterations (timed apart), all 7 parameter tensors in Adam;
  t > 0   the priors on top (rigidity, rotation, isometry, floor, background, colour), Adam on
          means, rotations and colours.
The Gaussians are those of timestep 0 of a finished run (--state, realistic counts after
densification), else the initial point cloud (built if the sequence has none). Prints one table
per setting: median and mean milliseconds per phase and per iteration.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import external  # noqa: E402
import helpers  # noqa: E402
import train_d3dgs as td  # noqa: E402


def table(title, times):
    """times: {phase: [ms per iteration]} -> printed table."""
    total = np.sum([v for v in times.values()], 0)
    print(f"\n{title} ({len(total)} iterations)")
    print(f"| phase | median ms | mean ms |\n| --- | --- | --- |")
    for name, v in times.items():
        print(f"| {name} | {np.median(v):.3f} | {np.mean(v):.3f} |")
    print(f"| **iteration** | **{np.median(total):.3f}** | **{np.mean(total):.3f}** |")


def timed_iterations(params, variables, optimizer, dataset, num_iters, first, rng):
    """Run the training iteration of train_d3dgs.train_timestep with events between the phases."""
    phases = ["render", "image losses", "prior losses", "backward", "optimizer step"] + (["densify stats"] if first else [])
    events, densify_ms = [], []
    todo = []
    schedule = {"start": 0, "stop": 10 ** 9, "every": 100, "reset": None, "big_from": 10 ** 9, "grad_thresh": 0.0002}
    for i in range(num_iters):
        data = td.get_batch(todo, dataset, rng)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(phases) + 1)]
        marks[0].record()
        rendervar = helpers.params2rendervar(params)
        im, seg, radii, _ = helpers.render_d3dgs(data["cam"], rendervar)
        marks[1].record()
        losses, im = td.get_losses(params, rendervar, im, seg, data, variables, True)
        marks[2].record()
        if not first:
            losses.update(td.prior_losses(params, rendervar, variables))
        marks[3].record()
        loss = sum(td.LOSS_WEIGHTS[k] * v for k, v in losses.items())
        loss.backward()
        marks[4].record()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks[5].record()
        if first:
            with torch.no_grad():
                if i % 100 == 99:  # a clone / split / prune step, timed on its own
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    params, variables = external.densify(params, variables, optimizer, 100, schedule,
                                                         rendervar["means2D"].grad, radii)
                    end.record()
                    densify_ms.append((start, end))
                else:
                    variables = external.accumulate_mean2d_gradient(variables, rendervar["means2D"].grad, radii)
            marks[6].record()
        events.append(marks)
    torch.cuda.synchronize()
    warm = events[len(events) // 10:]  # skip the first 10%: allocator and kernel warm-up
    times = {name: [m[k].elapsed_time(m[k + 1]) for m in warm] for k, name in enumerate(phases)}
    return params, variables, times, [s.elapsed_time(e) for s, e in densify_ms]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-s", "--seq", required=True, help="sequence folder")
    parser.add_argument("--state", help="timesteps/ folder of a finished run: its timestep 0 is the scene")
    parser.add_argument("--iters", type=int, default=500, help="timed iterations per setting")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise helpers.UserError("this benchmark times CUDA kernels: it needs a GPU")
    device = torch.device("cuda")
    meta, test_meta = helpers.load_meta(args.seq, "train"), helpers.load_meta(args.seq, "test")
    sizes = (meta["w"], meta["h"]), (test_meta["w"], test_meta["h"])
    dataset, _ = td.get_dataset(td.load_timestep(args.seq, meta, test_meta, 1, *sizes), meta, test_meta, 1, device)
    if args.state:
        state, _ = td.load_timestep_file(args.state, 0, device)
        params = {k: v.clone().requires_grad_(k != "seg_colors") for k, v in state.items()}
        source = f"timestep 0 of {args.state}"
    else:
        params = td.initialize_params(td.initial_point_cloud(args.seq, meta, "/tmp", argparse.Namespace(
            fg_points=100_000, bg_points=60_000, seed=0)), len(meta["cam_id"]), device)
        source = "the initial point cloud"
    n = params["means3D"].shape[0]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA rasterizer: "
          f"{__import__('diff_gaussian_rasterization_feat').cuda_available()}")
    print(f"scene: {source}, {n} Gaussians ({int((params['seg_colors'][:, 0] > 0.5).sum())} foreground), "
          f"{meta['w']}x{meta['h']}, {len(dataset)} train cameras")
    rng = np.random.default_rng(0)
    radius = td.scene_radius(meta)
    variables = {"scene_radius": radius, "means2D_gradient_accum": torch.zeros(n, device=device),
                 "denom": torch.zeros(n, device=device)}
    optimizer = td.initialize_optimizer(params, radius, td.LEARNING_RATES)
    params, _, times, densify_ms = timed_iterations(params, variables, optimizer, dataset, args.iters, True, rng)
    table("t = 0 (densification statistics every iteration)", times)
    print(f"clone/split/prune step (every 100 iterations up to 5,000): median {np.median(densify_ms):.2f} ms "
          f"over {len(densify_ms)} steps, {params['means3D'].shape[0]} Gaussians after")

    params = {k: v.detach() for k, v in params.items()}
    variables = td.initialize_post_first_timestep(params)
    params, variables = td.initialize_per_timestep(params, variables)
    optimizer = td.initialize_optimizer(params, radius, td.MOVING, no_bias_correction=("means3D", "unnorm_rotations"))
    _, _, times, _ = timed_iterations(params, variables, optimizer, dataset, args.iters, False, rng)
    table("t > 0 (priors on the foreground's 20 neighbours)", times)


if __name__ == "__main__":
    helpers.run_main(main)
