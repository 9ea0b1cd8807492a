"""Stage 1 and the grounding on members of the scene family (synthetic_sequence.py --seed S).

    python benchmarks/bench_family.py --seeds 1 2 3 4 5 [--jobs 3] [--exp fam] [-- STAGE-1 OPTIONS]

For each seed: draw the member (data/family<S>, benchmark under data/grounding/family<S>), then run
the stages from the command line as a user would, with their defaults unless told otherwise:
stage 1 (train_d3dgs.py), 3 (extract_features.py, colour encoder), 4 (train_autoencoder.py),
5 (train_4legs.py) and the grounding scores (evaluate_grounding.py). Every stage resumes, so a
second run only reports. Members run side by side (--jobs), each with --threads CPU threads.

Prints and writes results/<exp>/family.md and family.json: per seed, the test PSNR of each test
camera (mean over timesteps) and per prompt temporal, mask and vIoU and the timesteps detected in
each test camera beside the truth's (a span that starts early or ends late shows), with the
targets of the unseen-scenes work (mean PSNR >= 26 dB, no camera below 22; mean mask IoU >= 0.5,
mean temporal IoU >= 0.7, no prompt below 0.3 mask IoU) checked. Options after `--` go to stage 1
(e.g. `-- --demo` on a CPU).
"""

import argparse
import concurrent.futures
import os
import subprocess
import sys
import time

import numpy as np

import helpers
from feature_extraction.relevancy import detect_spans

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the stage scripts' folder
TARGETS = {
    "mean_psnr": 26.0,
    "min_camera_psnr": 22.0,
    "mean_mask_iou": 0.5,
    "mean_temporal_iou": 0.7,
    "min_prompt_mask_iou": 0.3,
}


def run_member(seed, args, stage1_extra):
    """Draw member `seed` and run stages 1, 3, 4, 5 and the grounding on it -> {stage: seconds}."""
    seq, name = f"data/family{seed}", f"family{seed}"

    def script(name):
        return [sys.executable, os.path.join(REPO, name)]

    draw = [
        *script("synthetic_sequence.py"),
        "--seed",
        str(seed),
        "--out",
        seq,
        "--benchmark",
        "data/grounding",
        "--video-dir",
        "",
        *args.draw,
    ]
    steps = {
        "draw": draw,
        "1 train_d3dgs": [*script("train_d3dgs.py"), "-s", seq, "-e", args.exp, *stage1_extra],
        "3 extract_features": [*script("extract_features.py"), "-s", seq, "--encoder", "color"],
        "4 train_autoencoder": [*script("train_autoencoder.py"), "-s", seq, "--encoder", "color", "--resume"],
        "5 train_4legs": [*script("train_4legs.py"), "-s", seq, "-e", args.exp, "--encoder", "color"],
        "grounding": [
            *script("evaluate_grounding.py"),
            "-s",
            seq,
            "-e",
            args.exp,
            "--encoder",
            "color",
            "--benchmark",
            f"data/grounding/{name}",
        ],
    }
    if os.path.exists(os.path.join(seq, "train_meta.json")):
        del steps["draw"]  # drawn before: the member is deterministic, and its outputs build on this copy
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    log_path = os.path.join("results", args.exp, f"{name}.log")
    seconds = {}
    with open(log_path, "a") as log:
        for stage, command in steps.items():
            start = time.perf_counter()
            log.write(f"== {stage}: {' '.join(command)}\n")
            log.flush()
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            seconds[stage] = round(time.perf_counter() - start, 1)
            if done.returncode:
                raise helpers.UserError(f"seed {seed}: {stage} exited {done.returncode}; its output: {log_path}")
    return seconds


def member_report(seed, exp):
    """The measured figures of member `seed`: per test camera PSNR (mean over timesteps), per prompt
    grounding."""
    name = f"family{seed}"
    metrics = helpers.read_json(os.path.join("output", exp, name, "metrics.json"))
    grounding = helpers.read_json(os.path.join("results", exp, name, "grounding.json"))
    scene = helpers.read_json(os.path.join("data", name, "gt", "scene.json"))
    cams = metrics["per_timestep"][0]["cameras"]
    psnr = {cam: float(np.mean([r["cameras"][cam]["psnr"] for r in metrics["per_timestep"]])) for cam in cams}
    rig = f"{scene['rig']['shape']}, {scene['rig']['num_train']} cams"
    return {
        "seed": seed,
        "rig": rig,
        "background": scene["background"]["kind"],
        "timesteps": metrics["timesteps"],
        "resolution": metrics["resolution"],
        "psnr": psnr,
        "grounding": grounding["per_prompt"],
        "grounding_mean": grounding["mean"],
        "spans": {
            prompt: {cam: {"detected": m["pred_spans"], "truth": m["gt_frames"]} for cam, m in cams.items()}
            for prompt, cams in grounding.get("per_camera", {}).items()  # (older grounding.json: none)
        },
    }


def span_text(spans):
    """Detected spans [[first, last], ...] -> 'first-last, ...' ('none' when empty)."""
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans) or "none"


def frame_spans(frames):
    """Timesteps [int] -> their runs [[first, last], ...] (detect_spans of a 0/1 score per timestep)."""
    return detect_spans([float(t in frames) for t in range(max(frames, default=-1) + 1)], 0.5)


def summary(reports):
    """Means over the members and which targets they meet."""
    camera_psnr = [v for r in reports for v in r["psnr"].values()]
    prompts = [m for r in reports for m in r["grounding"].values()]
    figures = {
        "mean_psnr": float(np.mean(camera_psnr)),
        "min_camera_psnr": float(np.min(camera_psnr)),
        "mean_mask_iou": float(np.mean([m["mask_iou"] for m in prompts])),
        "mean_temporal_iou": float(np.mean([m["temporal_iou"] for m in prompts])),
        "min_prompt_mask_iou": float(np.min([m["mask_iou"] for m in prompts])),
    }
    return {k: {"value": v, "target": TARGETS[k], "met": bool(v >= TARGETS[k])} for k, v in figures.items()}


def markdown(reports, met, command):
    """The per-seed table of docs/benchmark.md."""
    lines = [f"`{command}`", "", "| seed | rig | background | size | test camera PSNR (dB) |", "|---|---|---|---|---|"]
    for r in reports:
        cams = ", ".join(f"{cam} {v:.2f}" for cam, v in r["psnr"].items())
        lines.append(
            f"| {r['seed']} | {r['rig']} | {r['background']} | "
            f"{r['resolution'][0]}x{r['resolution'][1]}, {r['timesteps']} t | {cams} |"
        )
    lines += [
        "",
        "| seed | prompt | tIoU | mIoU | vIoU | detected timesteps per test camera (truth) |",
        "|---|---|---|---|---|---|",
    ]
    for r in reports:
        for prompt, m in r["grounding"].items():
            scores = " | ".join(f"{m[k]:.3f}" for k in ("temporal_iou", "mask_iou", "viou"))
            spans = "; ".join(
                f"{cam} {span_text(s['detected'])} ({span_text(frame_spans(s['truth']))})"
                for cam, s in r["spans"].get(prompt, {}).items()
            )
            lines.append(f"| {r['seed']} | {prompt} | {scores} | {spans} |")
    lines += ["", "| figure | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['value']:.3f} | {v['target']} | {'yes' if v['met'] else 'no'} |" for k, v in met.items()]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/bench_family.py " + " ".join(argv)
    stage1_extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="family members (default: 1-5)")
    p.add_argument("--exp", default="fam", help="experiment name (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="members run side by side (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each member (default: %(default)s)")
    p.add_argument(
        "--draw",
        nargs=argparse.REMAINDER,
        default=[],
        help="options for synthetic_sequence.py (e.g. --draw --width 128 --timesteps 8); last",
    )
    args = p.parse_args(argv)
    helpers.check_experiment(args.exp)
    for option in ("jobs", "threads"):
        helpers.check_option(args, option, at_least=1)
    if min(args.seeds) < 1:
        raise helpers.UserError(f"--seeds {min(args.seeds)}: family members are 1, 2, 3, ...")
    os.makedirs(os.path.join("results", args.exp), exist_ok=True)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        seconds = dict(zip(args.seeds, pool.map(lambda s: run_member(s, args, stage1_extra), args.seeds)))
    reports = [{**member_report(s, args.exp), "seconds": seconds[s]} for s in args.seeds]
    met = summary(reports)
    text = markdown(reports, met, command)
    print(text)
    print(f"\n{len(reports)} members in {time.perf_counter() - start:.0f} s; per member and stage (s):")
    for r in reports:
        print(f"  seed {r['seed']}: {r['seconds']}")

    def write(path):
        with open(path, "w") as f:
            f.write(text + "\n")

    helpers.atomic_write(os.path.join("results", args.exp, "family.md"), write)
    helpers.save_json(os.path.join("results", args.exp, "family.json"), {"members": reports, "targets": met})


if __name__ == "__main__":
    helpers.run_main(main)
