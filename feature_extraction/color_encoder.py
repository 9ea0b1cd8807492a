"""A deterministic stand-in for ViCLIP: colour words and coloured motion, no weights, fast on a CPU.

Used by the tests and by the demo when no ViCLIP checkpoint is present. It embeds what a colour
histogram and frame differences can see, in the same 768-d unit space for clips and texts, so the
whole pipeline (cache, autoencoder, 4-LEGS features, relevancy) runs and can be checked.

The exact formula:
- Directions: 21 orthonormal unit vectors in R^768: d_0..d_9 for the palette colours (red, green,
  blue, yellow, orange, purple, white, grey, black, brown; "gray" = "grey"), d_10..d_19 for "colour c
  moving" (m_0..m_9), d_generic = d_20: Gram-Schmidt (QR with a positive diagonal) of the columns of
  numpy.random.default_rng(SEED).standard_normal((768, 21)), SEED = 4100004.
- Clip [B, T, 3, S, S], CLIP-normalised: un-normalise to RGB x = clip * CLIP_STD + CLIP_MEAN. The
  clip's centre frame is c = T // 2 (frame t of the clip t-4 .. t+3): a clip says what is where at
  its own timestep and what moves through it (frames c-1 .. c+1: what moved into frame c and on
  out of it, so a span of motion is found where it happens, neither before nor after; where a
  frame next to c repeats it, at the sequence's first and last timesteps (tiles.clip_frames
  clamps the clip to the sequence), nothing moves).
  Palette: the RGB values PALETTE_RGB of the 10 colours; the 7 chromatic ones (not white, grey,
  black) stand for the whole segment s * rgb, SHADE <= s <= 1, SHADE = 0.3 (the colour in shadow: a
  lit red ball is half dark red, which plain RGB distance would call brown). Soft assignment of a
  pixel p of frame f to colour c: a_c(p, f) = softmax_c(-dist_c(x_f(p))^2 / (2 SIGMA^2)) over the
  10 colours, dist_c the distance of the pixel to c's point or segment, SIGMA = 0.1.
  Colours: h_c = mean over the pixels of a_c(p, c) (so sum_c h_c = 1).
  Coloured motion: for each of the frame pairs (c-1, c) and (c, c+1), the pixel change
  delta(p) = mean over channels of |x_f2(p) - x_f1(p)| and the presence of c in either frame
  w_c(p) = max(a_c(p, f1), a_c(p, f2)), the pair's speed sum delta w_c / sum w_c (over the pixels:
  how much c's pixels change); speed_c = the smaller of the two pairs' speeds (the pairs inside
  the clip: one when T = 2), u_c = h_c clip(MOTION_GAIN speed_c, 0, 1), MOTION_GAIN = 20 (as much
  of the tile as the colour covers, if it moves; T = 1: u = 0).
  embedding = normalize(sum_c h_c d_c + sum_c u_c m_c + GENERIC_WEIGHT d_generic), GENERIC_WEIGHT = 0.3.
- Text: lower-cased words (runs of letters); C = the colour words present (each once), M = whether
  a motion word is present. embedding = normalize(sum over c in C of (d_c + ACTION_WEIGHT M m_c)),
  ACTION_WEIGHT = 4; with motion words and no colour, normalize(sum of all m_c); with neither,
  d_generic (the canonical negatives "object", "things", "stuff", "texture" do). So "a red ball
  flying" asks for red AND red motion, the motion weighing four times: a moving blue box is no
  answer to it, and a resting red ball is none either, however much of its tile it fills (against
  a tile all red at rest the prompt scores 1/sqrt(17) = 0.24 before normalisation, below the
  generic 0.3 that the canonical negatives score).

The constants were chosen on the synthetic sequence (tests/test_legs.py, 96x54): the generic
weight sits between what a resting and what a moving red ball score against "a red ball flying";
the action weight and the motion window (c-1 .. c+1) on the scene family, where a tile can hold
one object alone (tests/test_family.py, docs/benchmark.md).
"""

import numpy as np
import regex
import torch
import torch.nn.functional as F

from feature_extraction.viclip import CLIP_MEAN, CLIP_STD

SEED = 4100004
DIM = 768
COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "grey", "black", "brown")
PALETTE_RGB = (
    (0.85, 0.10, 0.10),
    (0.10, 0.65, 0.15),
    (0.10, 0.20, 0.85),
    (0.95, 0.85, 0.10),
    (0.95, 0.50, 0.05),
    (0.50, 0.10, 0.60),
    (0.95, 0.95, 0.95),
    (0.50, 0.50, 0.50),
    (0.05, 0.05, 0.05),
    (0.45, 0.28, 0.12),
)
ACHROMATIC = ("white", "grey", "black")  # no shaded entry: a shaded white is grey
SHADE = 0.3
SYNONYMS = {"gray": "grey"}
MOTION_WORDS = frozenset(
    (
        "moving",
        "flying",
        "flies",
        "fly",
        "sliding",
        "slides",
        "thrown",
        "throwing",
        "rolling",
        "spinning",
        "spins",
        "bouncing",
        "running",
        "jumping",
        "falling",
        "moves",
    )
)
SIGMA = 0.1
MOTION_GAIN = 20.0
GENERIC_WEIGHT = 0.3
ACTION_WEIGHT = 4.0
NUM_DIRECTIONS = 2 * len(COLORS) + 1  # colours, coloured motion, generic


def directions():
    """[21, 768] float64 orthonormal rows: the 10 palette colours, their 10 motions, generic."""
    q, r = np.linalg.qr(np.random.default_rng(SEED).standard_normal((DIM, NUM_DIRECTIONS)))
    return (q * np.sign(np.diag(r))).T  # positive diagonal of R: a unique basis whatever LAPACK does


class ColorEncoder:
    """The encoder interface (.name, .dim, .identity, .input_size, .batch_size, encode_video,
    encode_text) of the formula in this module's docstring. Any clip resolution works; extraction
    resizes tiles to `input_size` = 8 px (antialiased, so each pixel averages a patch of the tile):
    enough for a colour histogram and frame differences, and it keeps the CPU demo fast."""

    name = "color"
    dim = DIM
    input_size = 8
    batch_size = 512  # clips per call: large batches amortise the per-call cost on a CPU

    @property
    def identity(self):
        """What the cache records: every constant of the formula, so changing one recomputes."""
        return (
            f"color-v4:seed={SEED}:sigma={SIGMA}:shade={SHADE}:motion={MOTION_GAIN}:generic={GENERIC_WEIGHT}:"
            f"action={ACTION_WEIGHT}:palette={PALETTE_RGB}"
        )

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        dirs = torch.tensor(directions(), dtype=torch.float32, device=self.device)
        self.colour_dirs, self.motion_dirs, self.generic = dirs[: len(COLORS)], dirs[len(COLORS) : -1], dirs[-1]
        self.palette = torch.tensor(PALETTE_RGB, dtype=torch.float32, device=self.device)  # [10, 3]
        # the darkest shade of each colour: itself for the achromatic ones (a shaded white is grey)
        self.darkest = torch.tensor([1.0 if c in ACHROMATIC else SHADE for c in COLORS], device=self.device)

    def assign(self, rgb):
        """rgb [..., 3] in [0, 1] -> soft colour assignment [..., 10] (sums to 1)."""
        scale = (rgb @ self.palette.T) / (self.palette**2).sum(1)  # [..., 10]: the best shade of each colour
        nearest = torch.maximum(scale, self.darkest).clamp(max=1.0)[..., None] * self.palette  # [..., 10, 3]
        dist2 = ((rgb[..., None, :] - nearest) ** 2).sum(-1)
        return torch.softmax(-dist2 / (2 * SIGMA**2), dim=-1)

    @torch.inference_mode()
    def encode_video(self, frames):
        """frames [B, T, 3, S, S] CLIP-normalised -> [B, 768] float32, L2-normalised."""
        frames = frames.to(self.device, torch.float32)
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(3, 1, 1)
        centre = frames.shape[1] // 2
        near = range(max(centre - 1, 0), min(centre + 2, frames.shape[1]))  # frames c-1 .. c+1
        rgb = (frames[:, near] * std + mean).movedim(2, -1).flatten(2, 3)  # [B, F, S*S, 3] in [0, 1]
        assigned = self.assign(rgb)  # [B, F, P, 10]
        hist = assigned[:, centre - near.start].mean(1)  # [B, 10], the centre frame
        if rgb.shape[1] > 1:
            delta = (rgb[:, 1:] - rgb[:, :-1]).abs().mean(-1, keepdim=True)  # [B, F-1, P, 1]
            present = torch.maximum(assigned[:, 1:], assigned[:, :-1])  # [B, F-1, P, 10]
            pair_speed = (delta * present).sum(2) / (present.sum(2) + 1e-6)  # [B, F-1, 10]: change of c's pixels
            motion = hist * (MOTION_GAIN * pair_speed.amin(1)).clamp(0, 1)  # [B, 10]
        else:
            motion = torch.zeros_like(hist)
        emb = hist @ self.colour_dirs + motion @ self.motion_dirs + GENERIC_WEIGHT * self.generic
        return F.normalize(emb, dim=-1)

    def encode_text(self, texts):
        """list of str -> [B, 768] float32, L2-normalised."""
        rows = []
        for text in texts:
            words = {SYNONYMS.get(w, w) for w in regex.findall(r"\p{L}+", text.lower())}
            colours = [i for i, c in enumerate(COLORS) if c in words]
            moving = bool(words & MOTION_WORDS)
            if colours:
                action = ACTION_WEIGHT * self.motion_dirs[colours].sum(0) if moving else 0
                emb = self.colour_dirs[colours].sum(0) + action
            elif moving:
                emb = self.motion_dirs.sum(0)
            else:
                emb = self.generic
            rows.append(emb)
        return F.normalize(torch.stack(rows), dim=-1)
