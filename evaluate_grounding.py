"""Spatio-temporal grounding of text prompts, scored on a benchmark in the Grounding-PanopticSports
format (docs/benchmark.md): `<benchmark>/<prompt_dir>/cam<N>.pt` holds {"masks": {frame: mask},
"boxes": {frame: box}} for the frames where the prompted action happens (prompt = folder name with
'_' as spaces; N = a cam_id of test_meta.json or train_meta.json).

For every prompt and camera, the 4-LEGS features are rendered from camera N at every timestep and
turned into relevance (exactly as visualize_4legs.py does). Reported per prompt (mean over its
cameras) and averaged over prompts:
- temporal IoU: detected frames (score > threshold) against the ground-truth frames;
- mask IoU: mean over the ground-truth frames of the IoU of the predicted mask (relevance above
  half the video's peak, never below the threshold) with the ground-truth mask;
- vIoU: sum of mask IoUs over the frames in BOTH sets, divided by the frames in EITHER set.

    python evaluate_grounding.py -s data/synthetic -e exp1 --encoder color --benchmark data/grounding/synthetic
"""

import argparse
import glob
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

import helpers
from feature_extraction.cache import add_cache_dir_option
from feature_extraction.relevancy import (
    DETECT_THRESHOLD,
    ENCODER_OF_STAGES,
    MASK_FRACTION,
    Stages,
    add_prompt_options,
    check_prompt_options,
    detect_spans,
    encode_prompts,
    frame_scores,
    heat,
    render_relevance_video,
)


def read_benchmark(folder):
    """{prompt: {cam_id: {frame: mask bool [H, W]}}} from a benchmark folder; UserError on bad input."""
    if not os.path.isdir(folder):
        raise helpers.UserError(f"{folder}: benchmark folder not found (expected <folder>/<prompt_dir>/cam<N>.pt)")
    benchmark = {}
    for path in sorted(glob.glob(os.path.join(folder, "*", "cam*.pt"))):
        match = re.fullmatch(r"cam(\d+)\.pt", os.path.basename(path))
        if not match:
            continue
        try:
            entry = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # any unpickling problem: the file is not what the format says
            raise helpers.UserError(f"{path} cannot be read ({e}); expected a torch-saved dict with 'masks'")
        if not isinstance(entry, dict) or not isinstance(entry.get("masks"), dict):
            raise helpers.UserError(f"{path}: expected a dict with 'masks': {{frame: mask}} (and 'boxes')")
        masks = {}
        for frame, mask in entry["masks"].items():
            m = torch.as_tensor(np.asarray(mask)).squeeze()
            if m.dim() != 2:
                raise helpers.UserError(f"{path}: mask of frame {frame} has shape {list(m.shape)}, expected [H, W]")
            masks[int(frame)] = m > 0
        prompt = os.path.basename(os.path.dirname(path)).replace("_", " ")
        benchmark.setdefault(prompt, {})[int(match.group(1))] = masks
    if not benchmark:
        raise helpers.UserError(f"{folder}: no <prompt_dir>/cam<N>.pt files; is it a benchmark folder?")
    return benchmark


def mask_iou(pred, gt):
    """IoU of two bool masks [H, W]; 1 when both are empty."""
    union = (pred | gt).sum()
    return float((pred & gt).sum()) / float(union) if union > 0 else 1.0


def grounding_metrics(relevance, gt_masks, threshold=DETECT_THRESHOLD):
    """relevance [T, H, W] of one prompt in one camera; gt_masks {frame: bool [h, w]} -> metrics.

    Predicted frames: score > threshold (detect_spans); predicted mask of a frame: heat > 0.5
    (relevance above half the video's peak, never below the threshold), resized to the ground
    truth's size when they differ."""
    num_t = relevance.shape[0]
    gt_masks = {t: m for t, m in gt_masks.items() if 0 <= t < num_t}
    spans = detect_spans(frame_scores(relevance), threshold)
    pred_frames = {t for a, b in spans for t in range(a, b + 1)}
    gt_frames = set(gt_masks)
    video_heat = heat(relevance, threshold)

    def pred_mask(t, shape):
        h = video_heat[t]
        if tuple(h.shape) != tuple(shape):
            h = F.interpolate(h[None, None], size=tuple(shape), mode="bilinear", align_corners=False)[0, 0]
        return h > MASK_FRACTION

    ious = {t: mask_iou(pred_mask(t, m.shape), m) for t, m in gt_masks.items()}
    union = pred_frames | gt_frames
    return {
        "temporal_iou": len(pred_frames & gt_frames) / len(union) if union else 1.0,
        "mask_iou": float(np.mean(list(ious.values()))) if ious else 0.0,
        "viou": sum(ious[t] for t in pred_frames & gt_frames) / len(union) if union else 1.0,
        "pred_spans": spans,
        "gt_frames": sorted(gt_frames),
    }


def find_camera(seq_dir, cam_id, num_t, device):
    """Camera settings per timestep of the camera with this cam_id (test cameras first)."""
    for split in ("test", "train"):
        meta = helpers.load_meta(seq_dir, split)
        if cam_id in meta["cam_id"]:
            c = meta["cam_id"].index(cam_id)
            return [
                helpers.setup_camera(meta["w"], meta["h"], meta["k"][t][c], meta["w2c"][t][c], device=device)
                for t in range(num_t)
            ]
    raise helpers.UserError(
        f"benchmark camera cam{cam_id}: no camera with cam_id {cam_id} in {seq_dir}/test_meta.json or train_meta.json"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helpers.add_sequence_option(p)
    p.add_argument("-e", "--exp", default="exp1", help="experiment name (default: %(default)s)")
    p.add_argument("--encoder", required=True, help=ENCODER_OF_STAGES)
    p.add_argument(
        "--benchmark",
        required=True,
        help="benchmark folder of this sequence, e.g. data/grounding/synthetic (<prompt_dir>/cam<N>.pt)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="json report, a file under results/ or output/ (default: results/<exp>/<seq>/grounding.json)",
    )
    add_prompt_options(p)
    add_cache_dir_option(p)
    args = p.parse_args(argv)
    args.seq = helpers.find_sequence(args.seq)
    check_prompt_options(args)
    if args.out is not None:
        helpers.check_output(
            "--out", args.out, "--out results/exp1/synthetic/grounding.json", roots=("results", "output")
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    device = helpers.pick_device(args.device)
    benchmark = read_benchmark(args.benchmark)
    stages = Stages(args.seq, args.exp, args.encoder, device, args.cache_dir)
    from feature_extraction import load_encoder

    prompts = list(benchmark)
    positives, negatives = encode_prompts(load_encoder(args.encoder, device, args.viclip_ckpt), prompts, device)
    results = {p: {} for p in prompts}
    for cam_id in sorted({c for cams in benchmark.values() for c in cams}):
        on_cam = [q for q, p in enumerate(prompts) if cam_id in benchmark[p]]
        cams = find_camera(args.seq, cam_id, stages.num_t, device)
        _, relevance = render_relevance_video(  # the relevance alone: no environment map behind the colours
            stages,
            cams,
            positives[on_cam],
            negatives,
            stride=args.relevancy_stride,
            desc=f"cam{cam_id}",
            over_env_map=False,
        )
        for i, q in enumerate(on_cam):
            results[prompts[q]][f"cam{cam_id}"] = grounding_metrics(
                relevance[i], benchmark[prompts[q]][cam_id], args.threshold
            )
    keys = ("temporal_iou", "mask_iou", "viou")
    per_prompt = {p: {k: float(np.mean([r[k] for r in results[p].values()])) for k in keys} for p in prompts}
    mean = {k: float(np.mean([m[k] for m in per_prompt.values()])) for k in keys}
    out = args.out or os.path.join(helpers.stage_dir("results", args.exp, args.seq), "grounding.json")
    helpers.save_json(
        out,
        {
            "benchmark": os.path.abspath(args.benchmark),
            "made_from": stages.provenance(),
            "threshold": args.threshold,
            "mask": f"relevance > {MASK_FRACTION} x max(video peak, threshold)",
            "mean": mean,
            "per_prompt": per_prompt,
            "per_camera": results,
        },
    )
    width = max(len(p) for p in prompts + ["mean"])
    print(f"{'prompt':<{width}}  tIoU   mIoU   vIoU")
    for p in prompts + ["mean"]:
        m = per_prompt.get(p, mean)
        print(f"{p:<{width}}  {m['temporal_iou']:.3f}  {m['mask_iou']:.3f}  {m['viou']:.3f}")
    print(f"grounding: {len(prompts)} prompts, {sum(len(c) for c in benchmark.values())} prompt-camera pairs -> {out}")


if __name__ == "__main__":
    helpers.run_main(main)
