"""Stages 5-6 of 4-LEGS, shared by train_4legs.py, visualize_4legs.py and evaluate_grounding.py:
where the stage outputs live, rendering the language features of a camera, and relevancy.

Relevancy (LERF, as 4-LEGS uses it): a pixel's rendered 128-d feature is normalised and decoded by
the autoencoder to a 768-d embedding e; against the prompt p and each canonical negative n,
softmax(10 * [e.p, e.n]) gives the probability that the prompt wins; the hardest negative (lowest
probability) decides. We call `relevance` = max(relevancy - 0.5, 0) in [0, 0.5]: 0 means "no more
the prompt than a generic thing". It stays ABSOLUTE for detection (timeline, masks): a prompt that
matches nothing gives zeros, never a blob stretched to 1 by normalisation.
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

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


# ---------------------------------------------------------------- where stage outputs live

def encoder_name(spec):
    """Cache name of an --encoder spec as extract_features.py takes it: viclip, color, or
    openclip:<arch>:<ckpt> -> openclip-<arch> (a name such as openclip-<arch> passes through)."""
    if spec.startswith("openclip:"):
        return "openclip-" + spec.split(":")[1]
    return spec


def seq_name(seq_dir):
    return os.path.basename(os.path.normpath(seq_dir))


def d3dgs_params_path(exp, seq_dir):
    """Stage-1 output, checked: raises UserError naming the command to run first."""
    path = os.path.join("output", exp, seq_name(seq_dir), "params.npz")
    if not os.path.isfile(path):
        raise helpers.UserError(f"{path} not found: run stage 1 first: python train_d3dgs.py -s {seq_dir} -e {exp}")
    return path


def legs_dir(exp, seq_dir):
    return os.path.join("output", exp, seq_name(seq_dir), "legs")


def legs_path(out_dir, t):
    return os.path.join(out_dir, f"{t:06d}.pt")


def feature_cache(seq_dir, encoder_name):
    """Stage-2 cache folder of `encoder_name`, checked: raises UserError naming the command."""
    from feature_extraction import cache_dir
    path = cache_dir(seq_dir, encoder_name)
    if not os.path.isdir(path):
        raise helpers.UserError(f"{path} not found: extract the '{encoder_name}' features (stage 2) first: "
                                f"python extract_features.py -s {seq_dir} --encoder {encoder_name}")
    return path


def check_legs(record, path, encoder_name, ae_info, num_gaussians):
    """Raise UserError when a stage-4 output does not belong to the current encoder, autoencoder
    and stage-1 Gaussians (one of them was retrained after it)."""
    why = None
    if record.get("encoder") != encoder_name:
        why = f"was trained on '{record.get('encoder')}' features, not '{encoder_name}'"
    elif record.get("ae_run_id") != ae_info["run_id"]:
        why = "was trained with another autoencoder checkpoint (the autoencoder was retrained since)"
    elif record["features"].shape[0] != num_gaussians:
        why = (f"holds {record['features'].shape[0]} Gaussians, stage 1 now has {num_gaussians} "
               f"(stage 1 was retrained since)")
    if why:
        raise helpers.UserError(f"{path} {why}: train stage 4 again with train_4legs.py --restart")


def load_legs(path, t, device, encoder_name, ae_info, num_gaussians, train_cmd):
    """Stage-4 output of one timestep: dict with features [N, 128] float32 (what is rendered),
    latents, attention state dict, loss, iterations, warm_start; checked against the current stages."""
    if not os.path.isfile(path):
        raise helpers.UserError(f"{path} (timestep {t}) not found: run stage 4 first: {train_cmd}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise helpers.UserError(f"{path} cannot be read ({e}): run stage 4 again: {train_cmd} --restart")
    check_legs(record, path, encoder_name, ae_info, num_gaussians)
    record["features"] = record["features"].to(device=device, dtype=torch.float32)
    return record


class Stages:
    """Everything visualize/evaluate read from stages 1-4, checked once at start-up: each missing
    piece raises UserError naming the stage and the command to run first."""

    def __init__(self, seq_dir, exp, encoder_spec, device):
        from feature_extraction.autoencoder import ae_ckpt_path, load_autoencoder
        self.seq_dir, self.exp, self.device = seq_dir, exp, device
        self.encoder_name = encoder_name(encoder_spec)
        self.params_path = d3dgs_params_path(exp, seq_dir)
        arrays = helpers.read_d3dgs_params(self.params_path)
        self.num_t, self.num_gaussians = arrays["means3D"].shape[:2]
        self.ae, self.ae_info = load_autoencoder(ae_ckpt_path(seq_dir), self.encoder_name, device)
        self.legs_dir = legs_dir(exp, seq_dir)
        self.train_cmd = f"python train_4legs.py -s {seq_dir} -e {exp} --encoder {encoder_spec}"
        for t in range(self.num_t):  # fail now rather than after minutes of rendering
            if not os.path.isfile(legs_path(self.legs_dir, t)):
                raise helpers.UserError(f"{legs_path(self.legs_dir, t)} (timestep {t}) not found: "
                                        f"run stage 4 first: {self.train_cmd}")

    def gaussians(self, t):
        """Rasterizer inputs of timestep t (load_d3dgs_params) plus legs_features [N, 128]."""
        rendervar = helpers.load_d3dgs_params(self.params_path, t, self.device)
        record = load_legs(legs_path(self.legs_dir, t), t, self.device, self.encoder_name, self.ae_info,
                           self.num_gaussians, self.train_cmd)
        rendervar["legs_features"] = record["features"]
        return rendervar


# ---------------------------------------------------------------- rendering

def render_features(cam, rendervar, features, with_fg=False):
    """Render Gaussians with per-Gaussian features through the feature rasterizer.

    rendervar: load_d3dgs_params's dict (geometry, colors_precomp, seg_colors; detached);
    features [N, C]. With with_fg the foreground channel of seg_colors rides along as one more
    feature channel (one pass, not two). Returns rgb [3, H, W], features [C, H, W], fg [H, W] in
    [0, 1] or None.
    """
    import diff_gaussian_rasterization_feat as dgrf
    channels = features.shape[1]
    if with_fg:
        features = torch.cat([features, rendervar["seg_colors"][:, :1]], 1)
    means3D = rendervar["means3D"]
    rgb, _, _, out = dgrf.GaussianRasterizer(cam)(
        means3D=means3D, means2D=torch.zeros_like(means3D), opacities=rendervar["opacities"],
        colors_precomp=rendervar["colors_precomp"], legs_features=features, scales=rendervar["scales"],
        rotations=rendervar["rotations"])
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
    parser.add_argument("--threshold", type=float, default=DETECT_THRESHOLD,
                        help="relevance score (probability - 0.5) above which a timestep holds the prompt "
                        "(default: %(default)s)")
    parser.add_argument("--relevancy-stride", type=int, default=None,
                        help="decode the mean feature of stride x stride pixel blocks and upsample the relevance "
                        f"(1 = every pixel; default: height // {STRIDE_ROWS}, at least 1)")
    parser.add_argument("--viclip-ckpt", default=DEFAULT_CKPT,
                        help="ViCLIP checkpoint for --encoder viclip (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")


def check_prompt_options(args):
    if args.relevancy_stride is not None and args.relevancy_stride < 1:
        raise helpers.UserError(f"--relevancy-stride {args.relevancy_stride}: must be at least 1")


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
            out.append(relevancy(ae.decode(flat[start:start + chunk]), positives, negatives))
    rel = (torch.cat(out, 1) - 0.5).clamp(min=0).reshape(-1, *features.shape[1:])
    if stride > 1:
        rel = F.interpolate(rel[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return rel


def encode_prompts(encoder, prompts, device):
    """Text embeddings, encoded once: (positives [Q, 768], negatives [4, 768]) on `device`."""
    with torch.no_grad():
        emb = encoder.encode_text(list(prompts) + list(NEGATIVES)).to(device=device, dtype=torch.float32)
    emb = F.normalize(emb, dim=-1)
    return emb[:len(prompts)], emb[len(prompts):]


def render_relevance_video(stages, cams, positives, negatives, fg_only=False, stride=None,
                           desc="rendering"):
    """Render one view over time and its relevance to every prompt.

    cams: rasterizer settings per timestep (len T). Returns rgb uint8 [T, H, W, 3] and relevance
    [Q, T, H, W] float16 on the CPU (restricted to the foreground render with fg_only)."""
    rgbs, rel = [], []
    for t, cam in enumerate(tqdm(cams, desc=desc, leave=False)):
        rendervar = stages.gaussians(t)
        with torch.no_grad():
            rgb, feats, fg = render_features(cam, rendervar, rendervar["legs_features"], with_fg=fg_only)
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


def prompt_dir(prompt):
    """Folder name of a prompt, as the original and its benchmark spell it: words joined by '_'."""
    return "_".join(prompt.split())
