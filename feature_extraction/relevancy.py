"""Stages 5-6 of 4-LEGS, shared by train_4legs.py, visualize_4legs.py and evaluate_grounding.py:
where the stage outputs live, rendering the language features of a camera, and relevancy.

Relevancy (LERF, as 4-LEGS uses it): a pixel's rendered 128-d feature is normalised and decoded by
the autoencoder to a 768-d embedding e; against the prompt p and each canonical negative n,
softmax(10 * [e.p, e.n]) gives the probability that the prompt wins; the hardest negative (lowest
probability) decides. We call `relevance` = max(relevancy - 0.5, 0) in [0, 0.5]: 0 means "no more
the prompt than a generic thing". It stays ABSOLUTE for detection (timeline, masks): a prompt that
matches nothing gives zeros, never a blob stretched to 1 by normalisation.
"""

import hashlib
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

import helpers
from feature_extraction.viclip import DEFAULT_CKPT

NEGATIVES = ("object", "things", "stuff", "texture")
TEMPERATURE = 10.0
TOP_FRACTION = 0.001  # a frame's score: mean relevance of its most relevant 0.1% of pixels
DETECT_THRESHOLD = 0.05  # relevance (probability - 0.5) above which a frame holds the prompt
MASK_FRACTION = 0.5  # mask = relevance > half the video's peak (never below the detect threshold)
# Decode the mean feature of stride x stride blocks, upsample the relevance: the features vary on
# the scale of the smallest tile (0.15 x the height: 54 px at 640x360), and the per-pixel decoder is
# most of the CPU's time. One block per 180 rows of height: 2 at 360, every pixel at 180 and below.
STRIDE_ROWS = 180
ENCODER_OF_STAGES = (
    "the --encoder of "
    + ", ".join(
        helpers.stage_name(script) for script in ("extract_features.py", "train_autoencoder.py", "train_4legs.py")
    )
    + ": viclip, color, openclip:<arch>:<ckpt>"
)


# ---------------------------------------------------------------- where stage outputs live


def encoder_name(spec):
    """Cache name of an --encoder spec as extract_features.py takes it: viclip, color, or
    openclip:<arch>:<ckpt> -> openclip-<arch> (a name such as openclip-<arch> passes through)."""
    if spec.startswith("openclip:"):
        return "openclip-" + spec.split(":")[1]
    return spec


def d3dgs_params_path(exp, seq_dir):
    """Stage-1 output, checked: raises UserError naming the command to run first, or saying that it
    was made from another sequence (helpers.check_stage1_sequence)."""
    path = os.path.join(helpers.stage_dir("output", exp, seq_dir), "params.npz")
    if not os.path.isfile(path):
        raise helpers.UserError(
            f"{path} not found: " + helpers.run_first("train_d3dgs.py", f"python train_d3dgs.py -s {seq_dir} -e {exp}")
        )
    helpers.check_stage1_sequence(path, seq_dir)
    return path


def legs_dir(exp, seq_dir):
    return os.path.join(helpers.stage_dir("output", exp, seq_dir), "legs")


def legs_path(out_dir, t):
    return os.path.join(out_dir, f"{t:06d}.pt")


def feature_cache(root, encoder_spec, seq_dir=None):
    """Stage-3 cache folder of the encoder `encoder_spec` (--encoder) under `root` (the sequence
    folder or --cache-dir), checked: raises UserError naming the command."""
    from feature_extraction import cache_dir

    path = cache_dir(root, encoder_name(encoder_spec))
    if not os.path.isdir(path):
        where = "" if seq_dir in (None, root) else f" --cache-dir {root}"
        raise helpers.UserError(
            f"{path} not found: "
            + helpers.run_first(
                "extract_features.py",
                f"python extract_features.py -s {seq_dir or root} --encoder {encoder_spec}{where}",
            )
        )
    return path


# What a stage-5 record must match (train_4legs.py writes these keys) and what it says when it does not.
LEGS_MADE_FROM = {
    "encoder": "was trained on '{old}' features, not '{new}'",
    "ae_run_id": "was trained with another autoencoder (stage 4 was retrained since)",
    "params": "was trained on other stage-1 Gaussians (stage 1 trained this timestep again since)",
    "downscale": "was trained with --downscale {old}, not {new}",
    "tile_mix": "was trained with --tile-mix {old}, not {new}",
}


def legs_made_from(params_path, t, inputs):
    """What the stage-5 record of timestep t must have been made from (the keys of LEGS_MADE_FROM):
    `inputs` (the others) and the fingerprint of what stage 1's params.npz holds for timestep t, so
    the records stay valid when stage 1 appends timesteps."""
    return {**inputs, "params": helpers.d3dgs_identity(params_path, t)["fingerprint"]}


def legs_mismatch(record, made_from):
    """'' when a stage-5 record was made from `made_from` (keys of LEGS_MADE_FROM: the current
    encoder, autoencoder run, stage-1 params fingerprint, settings), else a phrase saying which not."""
    for key, new in made_from.items():
        if record.get(key) != new:
            return LEGS_MADE_FROM[key].format(old=record.get(key), new=new)
    return ""


def check_legs(record, path, made_from):
    """Raise UserError when a stage-5 record was not made from `made_from` (legs_mismatch), saying which."""
    why = legs_mismatch(record, made_from)
    if why:
        raise helpers.UserError(f"{path} {why}: run {helpers.stage_name('train_4legs.py')} again with --restart")


# A stage-5 record (legs/<t>.pt, written by save_legs, read by read_legs / legs_features) holds the
# features of one timestep as int8 rows with a per-row scale (helpers.quantize_rows), and only the
# rows that are not held fixed: a warm-started timestep keeps the background's features of the
# timestep its chain started at (its base, which holds every row; train_4legs.py), so it stores the
# foreground rows alone. Records of format 1 (before LEGS_FORMAT 2) hold float16 features and latents
# [N, 128] of every row, and are read as they are.
LEGS_FORMAT = 2


def save_legs(path, features, rows, base, info):
    """Write a stage-5 record atomically: features [N, 128] of the rows `rows` (int64 [n]; None: all),
    `base` {'t', 'run_id'} of the record holding the other rows (None when all are here), and `info`
    (t, run_id, loss, the keys of LEGS_MADE_FROM, ...). Returns those rows as the record reads back:
    float32 [n or N, 128] on the CPU."""
    values, scales = helpers.quantize_rows(features.detach().cpu() if rows is None else features.detach()[rows].cpu())
    record = {
        **info,
        "format": LEGS_FORMAT,
        "num_gaussians": features.shape[0],
        "rows": None if rows is None else rows.cpu().to(torch.int32),
        "values": values,
        "scales": scales,
        "base": base,
    }
    helpers.save_torch(path, record)
    return helpers.dequantize_rows(values, scales)


def read_legs(path, train_cmd):
    """A stage-5 record as saved (either format), its tensors memory-mapped (reading what check_legs
    compares costs next to nothing); UserError for a truncated or foreign file."""
    again = f"run {helpers.stage_name('train_4legs.py')} again: {train_cmd} --restart"
    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated or foreign file: any unpickling error
        raise helpers.UserError(f"{path} cannot be read ({type(e).__name__}: {e}); {again}") from None
    arrays = (
        ("values", "scales")
        if isinstance(record, dict) and record.get("format") == LEGS_FORMAT
        else ("features", "latents")
    )
    if not isinstance(record, dict) or not all(torch.is_tensor(record.get(k)) for k in arrays):
        raise helpers.UserError(f"{path} is not a stage-5 record ({', '.join(arrays)}, ...); {again}")
    return record


def legs_features(record, path, train_cmd):
    """The features [N, 128] float32 (CPU) of a record read by read_legs: its own rows, the others
    from its base record (checked to be the one it was trained from)."""
    if record.get("format") != LEGS_FORMAT:
        return record["features"].float()
    own = helpers.dequantize_rows(record["values"], record["scales"])
    if record["rows"] is None:
        return own
    base_run_id, base_features = read_base(legs_path(os.path.dirname(path), record["base"]["t"]), train_cmd)
    check_base(record, path, base_run_id, train_cmd)
    features = base_features.clone()
    features[record["rows"].long()] = own
    return features


_BASE_CACHE = {}


def read_base(path, train_cmd):
    """(run_id, features [N, 128] float32) of the base record at `path`, (None, None) where it is
    missing. The last one read stays cached (keyed by its modification time): every timestep of a
    chain shares one base, so a sequence's timesteps read and dequantize it once."""
    if not os.path.isfile(path):
        return None, None
    key = (os.path.abspath(path), os.stat(path).st_mtime_ns)
    if key not in _BASE_CACHE:
        base = read_legs(path, train_cmd)
        _BASE_CACHE.clear()
        _BASE_CACHE[key] = base.get("run_id"), legs_features(base, path, train_cmd)
    return _BASE_CACHE[key]


def check_base(record, path, base_run_id, train_cmd):
    """Raise UserError unless the record at `path` was trained from the base whose run_id (None:
    missing) is `base_run_id`."""
    if record["base"]["run_id"] != base_run_id:
        t = record["base"]["t"]
        raise helpers.UserError(
            f"{path} shares the background features of timestep {t}, which was "
            f"{'trained again since' if base_run_id else 'deleted'}: run {helpers.stage_name('train_4legs.py')} "
            f"again from there: {train_cmd} -f {t} --restart"
        )


def load_legs(path, t, device, made_from, train_cmd):
    """Stage-5 output of one timestep, checked against `made_from` (check_legs) and for NaN/Inf: the
    record (read_legs) with features [N, 128] float32 on `device` (what is rendered), its base's rows
    filled in; loss, iterations, warm_start, run_id; records of format 1 also latents and attention."""
    if not os.path.isfile(path):
        raise helpers.UserError(f"{path} (timestep {t}) not found: {helpers.run_first('train_4legs.py', train_cmd)}")
    record = read_legs(path, train_cmd)
    check_legs(record, path, made_from)
    features = legs_features(record, path, train_cmd)
    # format 1 records also hold the latents, which the warm start reads
    latents_ok = "latents" not in record or torch.isfinite(record["latents"]).all()
    if not (torch.isfinite(features).all() and latents_ok):
        raise helpers.UserError(
            f"{path}: features or latents hold NaN/Inf; run "
            f"{helpers.stage_name('train_4legs.py')} again: {train_cmd} --restart"
        )
    record["features"] = features.to(device=device)
    return record


class Stages:
    """Everything visualize/evaluate read from stages 1, 4 and 5, checked once at start-up: each
    missing piece raises UserError naming the stage and the command to run first."""

    def __init__(self, seq_dir, exp, encoder_spec, device, cache_root=None):
        from feature_extraction.autoencoder import ae_ckpt_path, load_autoencoder

        self.seq_dir, self.exp, self.device = seq_dir, exp, device
        self.encoder_spec, self.encoder_name = encoder_spec, encoder_name(encoder_spec)
        self.params_path = d3dgs_params_path(exp, seq_dir)
        arrays = helpers.read_d3dgs_params(self.params_path)
        self.num_t, self.num_gaussians = arrays["means3D"].shape[:2]
        self.env_map = helpers.load_env_map(self.params_path, device)  # behind the RGB renders; None: black
        self.ae_path = ae_ckpt_path(cache_root or seq_dir)
        self.ae, self.ae_info = load_autoencoder(self.ae_path, encoder_spec, device)
        self.legs_dir = legs_dir(exp, seq_dir)
        self.train_cmd = f"python train_4legs.py -s {seq_dir} -e {exp} --encoder {encoder_spec}"
        self.inputs = {"encoder": self.encoder_name, "ae_run_id": self.ae_info["run_id"]}  # with legs_made_from
        self.legs_run_ids = []
        for t in range(self.num_t):  # fail now rather than after minutes of rendering
            path = legs_path(self.legs_dir, t)
            if not os.path.isfile(path):
                raise helpers.UserError(
                    f"{path} (timestep {t}) not found: " + helpers.run_first("train_4legs.py", self.train_cmd)
                )
            record = read_legs(path, self.train_cmd)
            check_legs(record, path, legs_made_from(self.params_path, t, self.inputs))
            if record.get("base"):  # its base precedes it
                check_base(record, path, self.legs_run_ids[record["base"]["t"]], self.train_cmd)
            self.legs_run_ids.append(record.get("run_id"))

    def provenance(self):
        """The provenance of what is rendered from these stages (for timeline.json, grounding.json)."""
        return {
            "sequence": os.path.abspath(self.seq_dir),
            "encoder": self.encoder_spec,
            "params": helpers.d3dgs_identity(self.params_path),
            "autoencoder": {"path": os.path.abspath(self.ae_path), "run_id": self.ae_info["run_id"]},
            "legs": {"path": os.path.abspath(self.legs_dir), "fingerprint": helpers.fingerprint(self.legs_run_ids)},
        }

    def gaussians(self, t):
        """Rasterizer inputs of timestep t (load_d3dgs_params) plus legs_features [N, 128]."""
        rendervar = helpers.load_d3dgs_params(self.params_path, t, self.device)
        made_from = legs_made_from(self.params_path, t, self.inputs)
        record = load_legs(legs_path(self.legs_dir, t), t, self.device, made_from, self.train_cmd)
        rendervar["legs_features"] = record["features"]
        return rendervar


# ---------------------------------------------------------------- rendering


def render_features(cam, rendervar, features, with_fg=False, background=None):
    """Render Gaussians with per-Gaussian features through the feature rasterizer.

    rendervar: load_d3dgs_params's dict (geometry, colors_precomp, seg_colors; detached);
    features [N, C]. With with_fg the foreground channel of seg_colors rides along as one more
    feature channel (one pass, not two). background: None (rgb over black) or [>= 3, H, W]
    (helpers.view_background's): the colour behind the Gaussians, shown where they let light
    through as helpers.render_d3dgs shows it (their opacity rides along as one more channel).
    Returns rgb [3, H, W], features [C, H, W], fg [H, W] in [0, 1] or None.
    """
    import diff_gaussian_rasterization_feat as dgrf

    channels = features.shape[1]
    extra = [rendervar["seg_colors"][:, :1]] if with_fg else []
    if background is not None:
        extra.append(torch.ones_like(rendervar["seg_colors"][:, :1]))
    means3D = rendervar["means3D"]
    rgb, _, _, out = dgrf.GaussianRasterizer(cam)(
        means3D=means3D,
        means2D=torch.zeros_like(means3D),
        opacities=rendervar["opacities"],
        colors_precomp=rendervar["colors_precomp"],
        legs_features=torch.cat([features, *extra], 1) if extra else features,
        scales=rendervar["scales"],
        rotations=rendervar["rotations"],
    )
    if background is not None:
        rgb = rgb + (1 - out[-1:]) * background[:3]
    return rgb, out[:channels], (out[channels] if with_fg else None)


# ---------------------------------------------------------------- relevancy


def relevancy(embeds, positives, negatives):
    """Probability that each positive beats its hardest negative.

    embeds [P, D], positives [Q, D], negatives [M, D], all unit rows -> [Q, P] in (0, 1).
    softmax(10 [a, b])[0] = sigmoid(10 (a - b)); the negative with the lowest probability wins.
    """
    pos = embeds @ positives.T  # [P, Q]
    neg = embeds @ negatives.T  # [P, M]
    prob = torch.sigmoid(TEMPERATURE * (pos[:, :, None] - neg[:, None, :]))
    return prob.min(dim=2).values.T


def relevancy_stride(height, stride=None):
    """The block size of relevance_map: `stride` when given, else max(1, height // STRIDE_ROWS)."""
    return max(1, height // STRIDE_ROWS) if stride is None else stride


def add_prompt_options(parser):
    """Options visualize_4legs.py and evaluate_grounding.py share: --threshold, --relevancy-stride,
    --viclip-ckpt, --device."""
    parser.add_argument(
        "--threshold",
        type=float,
        default=DETECT_THRESHOLD,
        help="relevance score (probability - 0.5) above which a timestep holds the prompt (default: %(default)s)",
    )
    parser.add_argument(
        "--relevancy-stride",
        type=int,
        default=None,
        help="decode the mean feature of stride x stride pixel blocks and upsample the relevance "
        f"(1 = every pixel; default: height // {STRIDE_ROWS}, at least 1)",
    )
    parser.add_argument(
        "--viclip-ckpt", default=DEFAULT_CKPT, help="ViCLIP checkpoint for --encoder viclip (default: %(default)s)"
    )
    parser.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")


def check_prompt_options(args):
    helpers.check_option(args, "relevancy_stride", at_least=1)
    # relevance lies in [0, 0.5]: a threshold at or below 0 "finds" every frame, at 0.5 or above none
    helpers.check_option(args, "threshold", above=0, below=0.5)


def relevance_map(features, ae, positives, negatives, stride=None, chunk=65536):
    """Rendered features [128, H, W] -> relevance [Q, H, W] in [0, 0.5] (relevancy - 0.5, clipped).

    Features are averaged over stride x stride blocks (stride None: relevancy_stride(H)), normalised
    (the AE works on the unit sphere), decoded, and the relevance is upsampled bilinearly to H x W.
    A pixel no Gaussian covers has a zero feature and decodes to whatever the decoder makes of zero,
    like the original."""
    c, h, w = features.shape
    stride = relevancy_stride(h, stride)
    if stride > 1:
        features = F.avg_pool2d(features[None], stride, ceil_mode=True)[0]
    flat = F.normalize(features.reshape(c, -1).T, dim=-1)
    out = []
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk):
            out.append(relevancy(ae.decode(flat[start : start + chunk]), positives, negatives))
    rel = (torch.cat(out, 1) - 0.5).clamp(min=0).reshape(-1, *features.shape[1:])
    if stride > 1:
        rel = F.interpolate(rel[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return rel


def encode_prompts(encoder, prompts, device):
    """Text embeddings, encoded once: (positives [Q, 768], negatives [4, 768]) on `device`."""
    with torch.no_grad():
        emb = encoder.encode_text(list(prompts) + list(NEGATIVES)).to(device=device, dtype=torch.float32)
    emb = F.normalize(emb, dim=-1)
    return emb[: len(prompts)], emb[len(prompts) :]


def render_relevance_video(
    stages, cams, positives, negatives, fg_only=False, stride=None, desc="rendering", over_env_map=True
):
    """Render one view over time and its relevance to every prompt.

    cams: rasterizer settings per timestep (len T). Returns rgb uint8 [T, H, W, 3] (over stage 1's
    environment map where it has one and over_env_map; else over black) and relevance [Q, T, H, W]
    float16 on the CPU (restricted to the foreground render with fg_only)."""
    rgbs, rel = [], []
    for t, cam in enumerate(helpers.progress(cams, desc=desc, leave=False)):
        rendervar = stages.gaussians(t)
        with torch.no_grad():
            background = helpers.view_background(cam, stages.env_map) if over_env_map else None
            rgb, feats, fg = render_features(cam, rendervar, rendervar["legs_features"], fg_only, background)
            r = relevance_map(feats, stages.ae, positives, negatives, stride)
            if fg is not None:
                r = r * (fg > 0.5)
        rgbs.append(helpers.to_uint8(rgb))
        rel.append(r.to(torch.float16).cpu())
    return np.stack(rgbs), torch.stack(rel, 1)


# ---------------------------------------------------------------- time and space from relevance


def frame_scores(relevance):
    """relevance [..., T, H, W] -> per-frame score [..., T]: mean of the top 0.1% pixels (a peak
    measure robust to single noisy pixels that still sees a small object)."""
    flat = relevance.flatten(-2).float()
    k = max(1, math.ceil(TOP_FRACTION * flat.shape[-1]))
    return flat.topk(k, dim=-1).values.mean(-1)


def detect_spans(scores, threshold=DETECT_THRESHOLD):
    """Runs of consecutive frames whose score exceeds the absolute threshold: [[first, last], ...]
    (inclusive); empty when nothing is relevant."""
    spans = []
    for t, on in enumerate((torch.as_tensor(scores) > threshold).tolist()):
        if on and spans and spans[-1][1] == t - 1:
            spans[-1][1] = t
        elif on:
            spans.append([t, t])
    return spans


def heat(relevance, threshold=DETECT_THRESHOLD):
    """Relevance of a whole video [..., T, H, W] -> heat in [0, 1]: divided by the video's peak,
    but never by less than the detection threshold, so that weak noise stays dark."""
    peak = max(float(relevance.max()), threshold)
    return relevance.float() / peak


def overlay(heat_frame, rgb):
    """Turbo heatmap of heat_frame [H, W] in [0, 1] blended 50/50 with rgb uint8 [H, W, 3]."""
    from matplotlib import colormaps

    colour = colormaps["turbo"](np.asarray(heat_frame, dtype=np.float32))[..., :3]
    return (0.5 * colour * 255 + 0.5 * rgb + 0.5).astype(np.uint8)


PROMPT_DIR_CHARS = 80  # a prompt's folder name at most, before its hash: far below the file systems' 255
_PLAIN_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


def prompt_dir(prompt):
    """A safe folder name, one per prompt. As the original and its benchmark spell it, words joined
    by '_' ('a red ball' -> 'a_red_ball'), where that gives the prompt back and is short; else the
    letters and digits of the prompt joined by '_', cut at PROMPT_DIR_CHARS, then '__' and 8 hex
    digits of its hash: '../x' -> 'x__<hash>', 'a_red_ball' -> 'a_red_ball__<hash>' ('__' never
    occurs in a plain name). Never a path: no '/', '.', '..' or leading '-'."""
    words = prompt.split(" ")
    if all(_PLAIN_WORD.fullmatch(w) for w in words) and len(prompt) <= PROMPT_DIR_CHARS:
        return "_".join(words)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt)[:PROMPT_DIR_CHARS].strip("_") or "prompt"
    return f"{slug}__{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"
