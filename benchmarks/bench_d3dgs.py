"""Where the time of a stage-1 iteration goes: CUDA-event timings per phase of train_d3dgs.py's loop.

    python benchmarks/bench_d3dgs.py -s data/basketball [--state output/exp1/basketball/timesteps] [--profile 50]
    python benchmarks/bench_d3dgs.py -s data/basketball --state ... --compare 1000 [--cuda-graphs] [--profile 50]

Runs the loop's own functions (train_d3dgs.get_loss, external.densify, ...) phase by phase with
CUDA events between them, in two settings:
  t = 0   image + segmentation losses, densification statistics every iteration and one clone /
          split / prune step every 100 iterations (timed apart), all 7 parameter tensors in Adam;
  t > 0   the priors on top (rigidity, rotation, isometry, floor, background, colour), Adam on
          means, rotations and colours; twice from the same start, side by side: the losses run
          eagerly and compiled (train_d3dgs.pick_loss, as the training loop runs them on CUDA; the
          compile itself is timed apart, before the timed iterations).
The Gaussians are those of timestep 0 of a finished run (--state, realistic counts after
densification), else the initial point cloud (built if the sequence has none). Prints one table
per setting: median and mean milliseconds per phase and per iteration. With --profile N, then N
more t > 0 iterations as the loop runs them under torch.profiler: the CUDA kernels that take the
most GPU time, and the GPU's busy time against the wall time per iteration (a GPU idle much of
the time means the host, Python and launches, is what limits the loop).

With --compare N, only the t > 0 loop instead, the plain loop and the current one side by side in one
process (compare_loops): the loop as it was (plain_iterations) and train_d3dgs.train_timestep as stage 1
runs it now (with --cuda-graphs also its --cuda-graphs), --rounds fresh timesteps of N iterations
each in turns, ms per iteration by CUDA events and by the host clock; --profile then profiles the
new loop.
"""

import argparse
import collections
import os
import time

import numpy as np
import torch

import external
import helpers
import train_d3dgs as td

HOST_WAITS = ("cudaMemcpyAsync", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel")  # runtime (aten, rasterizer) and driver (Triton) launches


def table(title, times):
    """times: {phase: [ms per iteration]} -> printed table."""
    total = np.sum([v for v in times.values()], 0)
    print(f"\n{title} ({len(total)} iterations)")
    print("| phase | median ms | mean ms |\n| --- | --- | --- |")
    for name, v in times.items():
        print(f"| {name} | {np.median(v):.3f} | {np.mean(v):.3f} |")
    print(f"| **iteration** | **{np.median(total):.3f}** | **{np.mean(total):.3f}** |")


def timed_iterations(params, variables, optimizer, dataset, num_iters, loss_fn, with_priors, rng):
    """Run the training iteration of train_d3dgs.train_timestep with events between the phases;
    with_priors False: timestep 0 (densification statistics instead of priors)."""
    first = not with_priors
    phases = ["render", "losses", "backward", "optimizer step"] + (["densify stats"] if first else [])
    events, densify_ms = [], []
    todo, first_bad = [], None
    schedule = {"start": 0, "stop": 10**9, "every": 100, "reset": None, "big_from": 10**9, "grad_thresh": 0.0002}
    for i in range(num_iters):
        data = td.get_batch(todo, dataset, rng)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(phases) + 1)]
        marks[0].record()
        rendervar = helpers.params2rendervar(params)
        im, seg, radii, _ = helpers.render_d3dgs(data["cam"], rendervar, data["background"])
        marks[1].record()
        loss, terms, im = loss_fn(params, rendervar, im, seg, data, variables, with_priors)
        if first_bad is None:  # the loop's NaN watch, as in train_d3dgs.train_timestep
            first_bad = torch.full((len(terms),), -1, dtype=torch.long, device=loss.device)
        first_bad.masked_fill_((first_bad < 0) & ~torch.isfinite(torch.stack(list(terms.values()))), i)
        marks[2].record()
        loss.backward()
        marks[3].record()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks[4].record()
        if first:
            with torch.no_grad():
                if i % 100 == 99:  # a clone / split / prune step, timed on its own
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    params, variables = external.densify(
                        params, variables, optimizer, 100, schedule, rendervar["means2D"].grad, radii
                    )
                    end.record()
                    densify_ms.append((start, end))
                else:
                    variables = external.accumulate_mean2d_gradient(variables, rendervar["means2D"].grad, radii)
            marks[5].record()
        events.append(marks)
    torch.cuda.synchronize()
    warm = events[len(events) // 10 :]  # skip the first 10%: allocator and kernel warm-up
    times = {name: [m[k].elapsed_time(m[k + 1]) for m in warm] for k, name in enumerate(phases)}
    return params, variables, times, [s.elapsed_time(e) for s, e in densify_ms]


def plain_iterations(params, variables, optimizer, dataset, num_iters, loss_fn, rng, bar=None):
    """num_iters t > 0 iterations as the plain loop (stage 1 before its one-copy loop) ran them (no events):
    the rasterizer inputs from params2rendervar at every iteration, the NaN watch in eager kernels
    after the loss, the progress bar updated at every iteration (bar: a tqdm, or None) and, every
    FINITE_CHECK_EVERY iterations, the NaN flags, the loss and the train PSNR read in three copies."""
    todo, first_bad = [], None
    for i in range(num_iters):
        data = td.get_batch(todo, dataset, rng)
        rendervar = helpers.params2rendervar(params)
        im, seg, _, _ = helpers.render_d3dgs(data["cam"], rendervar, data["background"])
        loss, terms, im = loss_fn(params, rendervar, im, seg, data, variables, True)
        if first_bad is None:
            first_bad = torch.full((len(terms),), -1, dtype=torch.long, device=loss.device)
        first_bad.masked_fill_((first_bad < 0) & ~torch.isfinite(torch.stack(list(terms.values()))), i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if bar is not None:
            if i % td.FINITE_CHECK_EVERY == 0 or i == num_iters - 1:
                first_bad.tolist()
                bar.set_postfix_str(
                    f"it {i} loss {float(loss.detach()):.4f} train PSNR {helpers.psnr(im.detach(), data['im']):.2f}",
                    refresh=False,
                )
            bar.update(1)


def compare_loops(scene, radius, dataset, num_iters, rounds, device, compile_loss, cuda_graphs):
    """t > 0 loops side by side from the same start, in turns (before, after, before, after, ...):
    'before' the plain loop (plain_iterations), 'after' train_d3dgs.train_timestep
    as stage 1 runs it (and 'after, CUDA graphs': its --cuda-graphs). Each timed run is a fresh
    timestep of num_iters iterations (initialize_per_timestep, a new Adam) with a progress bar
    writing to /dev/null, timed by CUDA events around the loop and by the host clock. Prints
    the median ms per iteration of each."""
    from tqdm import tqdm

    monitor = td.new_monitor(device)
    variants = {
        "before": (td.pick_loss(device, compile_loss), None),
        "after": (td.pick_loss(device, compile_loss), monitor),
    }
    if cuda_graphs:
        graphs_monitor = td.new_monitor(device)  # its own: static, as train_d3dgs.train marks it
        td.mark_static(graphs_monitor)
        variants["after, CUDA graphs"] = (td.pick_loss(device, compile_loss, cuda_graphs=True), graphs_monitor)
    times = {name: [] for name in variants}
    first = td.initialize_post_first_timestep(scene)  # the neighbour search once (initialize_per_timestep adds keys)
    with open(os.devnull, "w") as devnull:
        for r in range(rounds + 1):  # round 0 warms up: compiles, cuDNN's algorithm search, the allocator
            for name, (loss_fn, watch) in variants.items():
                params, variables = td.initialize_per_timestep(scene, dict(first))
                optimizer = td.initialize_optimizer(params, radius, td.MOVING, ("means3D", "unnorm_rotations"))
                iters = num_iters if r else 20
                bar, rng = tqdm(total=iters, file=devnull), np.random.default_rng(r)
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                started = time.perf_counter()
                start.record()
                if watch is None:
                    plain_iterations(params, variables, optimizer, dataset, iters, loss_fn, rng, bar)
                else:
                    td.train_timestep(params, variables, optimizer, dataset, 1, iters, None, loss_fn, rng, bar, watch)
                end.record()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - started) * 1e3 / iters
                if r:
                    times[name].append((start.elapsed_time(end) / iters, wall))
                else:
                    print(f"warm-up of '{name}' (compiles included): {wall * iters / 1e3:.1f} s")
    print(
        f"\nt > 0 loop, plain and current, {'compiled' if compile_loss else 'eager'} losses: "
        f"{rounds} runs of {num_iters} iterations each, in turns; median (min-max) ms per iteration"
    )
    print("| loop | CUDA events | host clock |\n| --- | --- | --- |")
    for name, v in times.items():
        ev, wall = np.array(v).T
        print(
            f"| {name} | **{np.median(ev):.3f}** ({ev.min():.3f}-{ev.max():.3f}) | "
            f"{np.median(wall):.3f} ({wall.min():.3f}-{wall.max():.3f}) |"
        )
    after, before = np.median(np.array(times["after"])[:, 0]), np.median(np.array(times["before"])[:, 0])
    print(f"after / before: {after / before:.3f}; 2,000 iterations: {2 * before:.2f} s -> {2 * after:.2f} s")
    return variants["after"][0], monitor


def busy_us(intervals):
    """Length of the union of [start, end] intervals (microseconds)."""
    total, end = 0.0, -np.inf
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def profile(run, num_iters, name, unit="t > 0 iteration", top=25):
    """Wall time of run(num_iters) (num_iters units of work), then the same under torch.profiler: the
    top CUDA kernels by GPU time, GPU busy vs wall time and the host time blocked on the GPU where run
    used the GPU; the host operators by self time in any case."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    run(5)  # warm
    sync()
    started = time.perf_counter()
    run(num_iters)
    sync()
    wall_ms = (time.perf_counter() - started) * 1e3 / num_iters
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        run(num_iters)
        sync()
        profiled_ms = (time.perf_counter() - started) * 1e3 / num_iters
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"\nprofile of {num_iters} x {unit}, {name}")
    print(f"wall {wall_ms:.3f} ms per {unit} ({profiled_ms:.3f} under the profiler)")
    if kernels:
        per_name = collections.defaultdict(lambda: [0, 0.0])
        for e in kernels:
            per_name[e.name][0] += 1
            per_name[e.name][1] += e.time_range.elapsed_us()
        busy_ms = busy_us([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e3 / num_iters
        waits_us = launch_us = launches = 0
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CPU and e.name in HOST_WAITS:
                waits_us += e.time_range.elapsed_us()
            elif e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(LAUNCHES):
                launch_us += e.time_range.elapsed_us()
                launches += 1
        print(
            f"GPU busy {busy_ms:.3f} ms per {unit} ({100 * busy_ms / wall_ms:.0f}% of the unprofiled wall time); host "
            f"blocked on the GPU (syncs, copies to the host) {waits_us / 1e3 / num_iters:.3f} ms; "
            f"{launches / num_iters:.0f} kernel launches ({launch_us / 1e3 / num_iters:.3f} ms of host time)"
        )
        print(f"\n| CUDA kernel (top {top} by GPU time) | calls per {unit} | ms | % of busy |")
        print("| --- | --- | --- | --- |")
        ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])
        for kernel, (calls, us) in ranked[:top]:
            ms = us / 1e3 / num_iters
            print(f"| {kernel[:90]} | {calls / num_iters:.1f} | {ms:.3f} | {100 * ms / busy_ms:.1f} |")
        rest = sum(us for _, (_, us) in ranked[top:])
        print(
            f"| (the other {max(len(ranked) - top, 0)} kernels) | | {rest / 1e3 / num_iters:.3f} | "
            f"{100 * rest / 1e3 / num_iters / busy_ms:.1f} |"
        )
    print(f"\nhost (CPU) operators by self time, over the {num_iters} x {unit}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "-s",
        "--seq",
        required=True,
        help=f"sequence folder, or its name under {helpers.DATA_DIR}/ (as the stage scripts' -s)",
    )
    parser.add_argument("--state", help="timesteps/ folder of a finished run: its timestep 0 is the scene")
    parser.add_argument("--iters", type=int, default=500, help="timed iterations per setting")
    parser.add_argument("--no-compile", action="store_true", help="time t > 0 with eager losses only")
    parser.add_argument(
        "--compare",
        type=int,
        default=0,
        metavar="N",
        help="only time the plain and the current t > 0 loop side by side (compare_loops), "
        "--rounds runs of N iterations each; 0: the phase tables instead",
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --compare: timed runs per loop")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="with --compare: also the loop with train_d3dgs --cuda-graphs"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="then profile N t > 0 iterations (compiled unless --no-compile; with --compare, of the "
        "current loop): top kernels, GPU busy vs wall time; 0: no profile",
    )
    args = parser.parse_args()
    helpers.check_option(args, "profile", at_least=0)
    args.seq = helpers.find_sequence(args.seq)
    if not torch.cuda.is_available():
        raise helpers.UserError("this benchmark times CUDA kernels: it needs a GPU")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True  # as train_d3dgs.main
    meta, test_meta = helpers.load_meta(args.seq, "train"), helpers.load_meta(args.seq, "test")
    sizes = (meta["w"], meta["h"]), (test_meta["w"], test_meta["h"])
    dataset, _ = td.get_dataset(td.load_timestep(args.seq, meta, test_meta, 1, *sizes), meta, test_meta, 1, device)
    if args.state:
        state, _ = td.torch_timestep(td.read_timesteps(args.state, [0])[0], device)
        params = {k: v.clone().requires_grad_(k in td.LEARNING_RATES) for k, v in state.items()}
        source = f"timestep 0 of {args.state}"
    else:
        params = td.initial_params(
            td.initial_point_cloud(
                args.seq, meta, "results/bench_d3dgs", argparse.Namespace(fg_points=100_000, bg_points=60_000, seed=0)
            ),
            meta,
            dataset,
            device,
        )
        source = "the initial point cloud"
    td.add_backgrounds(dataset, params.get(helpers.D3DGS_ENV_MAP))
    n = params["means3D"].shape[0]
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA rasterizer: "
        f"{__import__('diff_gaussian_rasterization_feat').cuda_available()}"
    )
    print(
        f"scene: {source}, {n} Gaussians ({int((params['seg_colors'][:, 0] > 0.5).sum())} foreground), "
        f"{meta['w']}x{meta['h']}, {len(dataset)} train cameras"
    )
    rng = np.random.default_rng(0)
    radius = td.scene_radius(meta)
    if args.compare:
        scene = {k: v.detach() for k, v in params.items()}
        loss_fn, monitor = compare_loops(
            scene, radius, dataset, args.compare, args.rounds, device, not args.no_compile, args.cuda_graphs
        )
        if args.profile:
            params, variables = td.initialize_per_timestep(scene, td.initialize_post_first_timestep(scene))
            optimizer = td.initialize_optimizer(params, radius, td.MOVING, ("means3D", "unnorm_rotations"))
            bar, rng = td.tqdm(total=None, disable=True), np.random.default_rng(2)

            def run(n):
                td.train_timestep(params, variables, optimizer, dataset, 1, n, None, loss_fn, rng, bar, monitor)

            profile(run, args.profile, "the current loop (train_d3dgs.train_timestep)")
        return
    variables = {
        "scene_radius": radius,
        "means2D_gradient_accum": torch.zeros(n, device=device),
        "denom": torch.zeros(n, device=device),
    }
    optimizer = td.initialize_optimizer(params, radius, td.LEARNING_RATES)
    params, _, times, densify_ms = timed_iterations(
        params, variables, optimizer, dataset, args.iters, td.get_loss, False, rng
    )
    table("t = 0 (densification statistics every iteration)", times)
    print(
        f"clone/split/prune step (every 100 iterations up to 5,000): median {np.median(densify_ms):.2f} ms "
        f"over {len(densify_ms)} steps, {params['means3D'].shape[0]} Gaussians after"
    )

    scene = {k: v.detach() for k, v in params.items()}
    variants = [("eager", td.get_loss)] + ([] if args.no_compile else [("compiled", td.pick_loss(device))])
    medians = {}
    for name, loss_fn in variants:  # the same start and camera order for each
        params, variables = td.initialize_per_timestep(scene, td.initialize_post_first_timestep(scene))
        optimizer = td.initialize_optimizer(
            params, radius, td.MOVING, no_bias_correction=("means3D", "unnorm_rotations")
        )
        if name == "compiled":  # compile (forward and backward) outside the timed iterations
            started = time.perf_counter()
            rendervar = helpers.params2rendervar(params)
            im, seg, _, _ = helpers.render_d3dgs(dataset[0]["cam"], rendervar, dataset[0]["background"])
            loss_fn(params, rendervar, im, seg, dataset[0], variables, True)[0].backward()
            torch.cuda.synchronize()
            print(f"\ncompiling the losses (forward + backward): {time.perf_counter() - started:.1f} s")
            optimizer.zero_grad(set_to_none=True)
        _, _, times, _ = timed_iterations(
            params, variables, optimizer, dataset, args.iters, loss_fn, True, np.random.default_rng(1)
        )
        table(f"t > 0, {name} losses (priors on the foreground's 20 neighbours)", times)
        medians[name] = {k: float(np.median(v)) for k, v in times.items()}
        medians[name]["iteration"] = float(np.median(np.sum(list(times.values()), 0)))
    if len(medians) == 2:
        print("\n| phase | eager median ms | compiled median ms |\n| --- | --- | --- |")
        for k in medians["eager"]:
            print(f"| {k} | {medians['eager'][k]:.3f} | {medians['compiled'][k]:.3f} |")
    if args.profile:
        rng = np.random.default_rng(2)
        profile(
            lambda n: plain_iterations(params, variables, optimizer, dataset, n, loss_fn, rng),
            args.profile,
            f"{name} losses, as the plain loop ran them",
        )


if __name__ == "__main__":
    helpers.run_main(main)
