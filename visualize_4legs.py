"""Stage 6 of 4-LEGS: where and when is "the prompt"? Relevancy videos and a temporal timeline.

For each prompt and each view (every test camera, every train camera, or one orbit around the
scene), the language features are rendered at every timestep, decoded by the autoencoder and
compared with the prompt and the canonical negatives (feature_extraction/relevancy.py). Outputs
under `results/<exp>/<seq>/<prompt_dir>/`:
- `<view>.mp4`: turbo heatmap of the relevance (normalised over the whole video, never by less
  than the detection threshold) blended 50/50 with the RGB render;
- `timeline.json` / `timeline.png`: per-timestep relevance score (mean of the most relevant 0.1% of
  pixels, averaged over the views) and the detected time span(s): runs where the score exceeds
  the absolute threshold. A prompt that matches nothing has an empty timeline.

    python visualize_4legs.py -s data/synthetic -e exp1 --encoder color -p "a red ball flying in the air"
"""

import argparse
import os

import numpy as np
import torch

import helpers
from feature_extraction.cache import add_cache_dir_option
from feature_extraction.relevancy import (
    ENCODER_OF_STAGES,
    TOP_FRACTION,
    Stages,
    add_prompt_options,
    check_prompt_options,
    detect_spans,
    encode_prompts,
    frame_scores,
    heat,
    overlay,
    prompt_dir,
    render_relevance_video,
)

# timeline.png
TIMELINE_INCHES = (8, 3)  # figure width, height
TIMELINE_DPI = 100  # -> 800 x 300 pixels
LEGEND_MAX_VIEWS = 6  # more views than this plot unlabelled (only mean and threshold in the legend)
RELEVANCE_MAX = 0.5  # relevance lies in [0, 0.5] (relevancy.py): the y axis shows at least all of it
Y_HEADROOM = 1.05  # the y axis reaches 5% above RELEVANCE_MAX or the highest score


def meta_views(seq_dir, split, num_t, device):
    """One view per camera of <split>_meta.json: [(name, [camera settings per timestep])]."""
    meta = helpers.load_meta(seq_dir, split)
    if len(meta["fn"]) < num_t:
        raise helpers.UserError(
            f"{meta['path']} has {len(meta['fn'])} timesteps, {helpers.stage_name('train_d3dgs.py')} has {num_t}"
        )
    return [
        (
            f"cam{cam_id}",
            [
                helpers.setup_camera(meta["w"], meta["h"], meta["k"][t][c], meta["w2c"][t][c], device=device)
                for t in range(num_t)
            ],
        )
        for c, cam_id in enumerate(meta["cam_id"])
    ]


def orbit_view(seq_dir, stages, device):
    """The orbit of helpers.orbit_cameras, as visualize_d3dgs.py shows it: [("orbit", cameras)]."""
    arrays = helpers.read_d3dgs_params(stages.params_path)
    return [
        (
            "orbit",
            helpers.orbit_cameras(
                helpers.load_meta(seq_dir, "train"),
                arrays["means3D"][0],
                helpers.is_foreground(arrays["seg_colors"]),
                stages.num_t,
                device,
            ),
        )
    ]


def plot_timeline(path, prompt, scores, per_view, spans, threshold):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=TIMELINE_INCHES, dpi=TIMELINE_DPI)
    t = np.arange(len(scores))
    for name, view in per_view.items():
        ax.plot(t, view["scores"], lw=0.8, alpha=0.5, label=name if len(per_view) <= LEGEND_MAX_VIEWS else None)
    ax.plot(t, scores, color="k", lw=2, label="mean")
    ax.axhline(threshold, color="r", ls="--", lw=1, label="threshold")
    for first, last in spans:
        ax.axvspan(first - 0.5, last + 0.5, color="orange", alpha=0.25)
    ax.set_xlim(-0.5, len(scores) - 0.5)
    ax.set_ylim(0, Y_HEADROOM * max(RELEVANCE_MAX, max(scores, default=0)))
    ax.set_xlabel("timestep")
    ax.set_ylabel("relevance score")
    ax.set_title(f'"{prompt}": {", ".join(f"{a}-{b}" for a, b in spans) if spans else "not found"}')
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    helpers.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=helpers.stage_help("visualize_4legs.py", __doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    helpers.add_sequence_option(p)
    p.add_argument("-e", "--exp", default="exp1", help="experiment name (default: %(default)s)")
    p.add_argument("--encoder", required=True, help=ENCODER_OF_STAGES)
    p.add_argument(
        "-p",
        "--prompt",
        action="append",
        required=True,
        help="text to localise; repeat -p for several prompts (the text encoder runs once)",
    )
    p.add_argument(
        "--cams",
        choices=("test", "train", "orbit"),
        default="test",
        help="views: every test camera, every train camera, or one orbit (default: %(default)s)",
    )
    p.add_argument(
        "--fg-only",
        action="store_true",
        help="show and score relevance only on the foreground render (stage-1 segmentation colours)",
    )
    p.add_argument("--fps", type=int, default=15, help="frames per second of the videos (default: %(default)s)")
    add_prompt_options(p)
    add_cache_dir_option(p)
    args = p.parse_args(argv)
    args.seq = helpers.find_sequence(args.seq)
    check_prompt_options(args)
    helpers.check_option(args, "fps", at_least=1)
    check_prompts(args.prompt)
    return args


def check_prompts(prompts):
    """Before any rendering: every prompt has text, and a folder of its own (prompt_dir; folder names
    that differ only in case would share a folder on some file systems)."""
    seen = {}
    for prompt in prompts:
        if not prompt.strip():
            raise helpers.UserError('-p: empty prompt; give the text to look for, e.g. -p "a man throwing a ball"')
        if prompt_dir(prompt).casefold() in seen:
            raise helpers.UserError(
                f"-p {prompt!r} and -p {seen[prompt_dir(prompt).casefold()]!r} would share the "
                f"folder {prompt_dir(prompt)}: give each prompt once"
            )
        seen[prompt_dir(prompt).casefold()] = prompt


def main(argv=None):
    args = parse_args(argv)
    device = helpers.pick_device(args.device)
    stages = Stages(args.seq, args.exp, args.encoder, device, args.cache_dir)
    from feature_extraction import load_encoder

    positives, negatives = encode_prompts(load_encoder(args.encoder, device, args.viclip_ckpt), args.prompt, device)
    views = (
        orbit_view(args.seq, stages, device)
        if args.cams == "orbit"
        else meta_views(args.seq, args.cams, stages.num_t, device)
    )
    results = helpers.stage_dir("results", args.exp, args.seq)
    with helpers.stage_lock(results, "visualize_4legs"):
        render_prompts(
            args, stages, views, positives, negatives, [os.path.join(results, prompt_dir(p)) for p in args.prompt]
        )


def render_prompts(args, stages, views, positives, negatives, out_dirs):
    """Per prompt (out_dirs: its folder) the relevance videos of the views and the timeline."""
    per_view = [{} for _ in args.prompt]
    for name, cams in views:
        rgb, relevance = render_relevance_video(
            stages, cams, positives, negatives, args.fg_only, args.relevancy_stride, desc=name
        )
        for q, prompt in enumerate(args.prompt):
            video_heat = heat(relevance[q], args.threshold).numpy()
            helpers.write_video(
                os.path.join(out_dirs[q], f"{name}.mp4"),
                (overlay(h, im) for h, im in zip(video_heat, rgb)),
                fps=args.fps,
            )
            scores = frame_scores(relevance[q])
            per_view[q][name] = {
                "scores": [round(float(s), 5) for s in scores],
                "spans": detect_spans(scores, args.threshold),
                "peak_relevance": round(float(relevance[q].max()), 5),
            }
    for q, prompt in enumerate(args.prompt):
        scores = np.mean([v["scores"] for v in per_view[q].values()], axis=0)
        spans = detect_spans(torch.from_numpy(scores), args.threshold)
        helpers.save_json(
            os.path.join(out_dirs[q], "timeline.json"),
            {
                "prompt": prompt,
                "made_from": stages.provenance(),
                "views": list(per_view[q]),
                "fg_only": args.fg_only,
                "score": f"per timestep: mean relevance (probability - 0.5, clipped at 0) of the top "
                f"{TOP_FRACTION:.1%} pixels, averaged over the views",
                "threshold": args.threshold,
                "scores": [round(float(s), 5) for s in scores],
                "spans": spans,
                "per_view": per_view[q],
            },
        )
        plot_timeline(os.path.join(out_dirs[q], "timeline.png"), prompt, scores, per_view[q], spans, args.threshold)
        found = ", ".join(f"{a}-{b}" for a, b in spans) if spans else "nowhere (empty timeline)"
        print(f'"{prompt}": timesteps {found} -> {out_dirs[q]}/ ({len(views)} videos, timeline.json, timeline.png)')


if __name__ == "__main__":
    helpers.run_main(main, resumes=False)
