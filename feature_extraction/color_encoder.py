"""A deterministic stand-in for ViCLIP: colour words and motion, no weights, fast on a CPU.

Used by the tests and by the demo when no ViCLIP checkpoint is present. It embeds what a colour
histogram and frame differences can see, in the same 768-d unit space for clips and texts, so the
whole pipeline (cache, autoencoder, 4-LEGS features, relevancy) runs and can be checked.

The exact formula:
- Directions: 12 orthonormal unit vectors in R^768, d_0..d_9 for the palette (red, green, blue,
  yellow, orange, purple, white, grey, black, brown; "gray" = "grey"), d_motion = d_10,
  d_generic = d_11: Gram-Schmidt (QR with a positive diagonal) of the columns of
  numpy.random.default_rng(SEED).standard_normal((768, 12)), SEED = 4100004.
- Clip [B, T, 3, S, S], CLIP-normalised: un-normalise to RGB x = clip * CLIP_STD + CLIP_MEAN.
  Palette: the RGB values PALETTE_RGB of the 10 colours and, for the 7 chromatic ones (not white,
  grey, black), the same times SHADE = 0.6 (the colour in shadow: a lit red ball is half dark red,
  which plain RGB distance would call brown). Palette histogram h [B, 10]: per pixel p of every
  frame, soft assignment a_e(p) = softmax_e(-||x(p) - rgb_e||^2 / (2 SIGMA^2)) over the 17 entries
  e, SIGMA = 0.1; h_c = mean over pixels and frames of the sum of a_e over colour c's entries
  (so sum_c h_c = 1).
  Motion m [B] = clip(MOTION_GAIN * mean over frames f = 1..T-1, pixels and channels of
  |x_f - x_(f-1)|, 0, 1), MOTION_GAIN = 10.
  embedding = normalize(sum_c h_c d_c + m d_motion + 0.8 d_generic).
- Text: lower-cased words (runs of letters). embedding = normalize(sum of d_c over the colour words
  present (each colour once) + d_motion if a motion word is present); a text with neither embeds
  to d_generic (the canonical negatives "object", "things", "stuff", "texture" do).
"""
import numpy as np
import regex
import torch
import torch.nn.functional as F

from feature_extraction.viclip import CLIP_MEAN, CLIP_STD

SEED = 4100004
DIM = 768
COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "grey", "black", "brown")
PALETTE_RGB = ((0.85, 0.10, 0.10), (0.10, 0.65, 0.15), (0.10, 0.20, 0.85), (0.95, 0.85, 0.10),
               (0.95, 0.50, 0.05), (0.50, 0.10, 0.60), (0.95, 0.95, 0.95), (0.50, 0.50, 0.50),
               (0.05, 0.05, 0.05), (0.45, 0.28, 0.12))
ACHROMATIC = ("white", "grey", "black")  # no shaded entry: a shaded white is grey
SHADE = 0.6
SYNONYMS = {"gray": "grey"}
MOTION_WORDS = frozenset(("moving", "flying", "flies", "fly", "sliding", "slides", "thrown", "throwing",
                          "rolling", "spinning", "spins", "bouncing", "running", "jumping", "falling", "moves"))
SIGMA = 0.1
MOTION_GAIN = 10.0
GENERIC_WEIGHT = 0.8


def directions():
    """[12, 768] float64 orthonormal rows: the 10 palette colours, motion, generic."""
    q, r = np.linalg.qr(np.random.default_rng(SEED).standard_normal((DIM, len(COLORS) + 2)))
    return (q * np.sign(np.diag(r))).T  # positive diagonal of R: a unique basis whatever LAPACK does


class ColorEncoder:
    """The encoder interface (.name, .dim, .identity, .input_size, .batch_size, encode_video,
    encode_text) of the
    formula in this module's docstring. Any clip resolution works; extraction resizes tiles to
    `input_size` = 8 px (antialiased, so each pixel averages a patch of the tile): enough for a
    colour histogram and frame differences, and it keeps the CPU demo at ~1.5 s per timestep."""
    name = "color"
    dim = DIM
    input_size = 8
    batch_size = 512  # clips per call: large batches amortise the per-call cost on a CPU

    @property
    def identity(self):
        """What the cache records: every constant of the formula, so changing one recomputes."""
        return (f"color-v1:seed={SEED}:sigma={SIGMA}:shade={SHADE}:motion={MOTION_GAIN}:generic={GENERIC_WEIGHT}:"
                f"palette={PALETTE_RGB}")

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.dirs = torch.tensor(directions(), dtype=torch.float32, device=self.device)
        entries = [(i, rgb) for i, rgb in enumerate(PALETTE_RGB)]
        entries += [(i, tuple(SHADE * v for v in rgb)) for i, rgb in enumerate(PALETTE_RGB) if COLORS[i] not in ACHROMATIC]
        self.palette = torch.tensor([rgb for _, rgb in entries], dtype=torch.float32, device=self.device)  # [E, 3]
        # [E, 10]: which colour each palette entry counts for
        self.entry_colour = F.one_hot(torch.tensor([i for i, _ in entries]), len(COLORS)).float().to(self.device)

    @torch.inference_mode()
    def encode_video(self, frames):
        """frames [B, T, 3, S, S] CLIP-normalised -> [B, 768] float32, L2-normalised."""
        frames = frames.to(self.device, torch.float32)
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(3, 1, 1)
        rgb = frames * std + mean  # [B, T, 3, S, S] in [0, 1]
        pixels = rgb.movedim(2, -1).flatten(1, 3)  # [B, T*S*S, 3]
        dist2 = ((pixels[:, :, None, :] - self.palette) ** 2).sum(-1)  # [B, P, E]
        hist = torch.softmax(-dist2 / (2 * SIGMA ** 2), dim=-1).mean(1) @ self.entry_colour  # [B, 10]
        if rgb.shape[1] > 1:
            motion = (MOTION_GAIN * (rgb[:, 1:] - rgb[:, :-1]).abs().mean((1, 2, 3, 4))).clamp(0, 1)
        else:
            motion = torch.zeros(len(rgb), device=self.device)
        emb = hist @ self.dirs[:len(COLORS)] + motion[:, None] * self.dirs[-2] + GENERIC_WEIGHT * self.dirs[-1]
        return F.normalize(emb, dim=-1)

    def encode_text(self, texts):
        """list of str -> [B, 768] float32, L2-normalised."""
        rows = []
        for text in texts:
            words = {SYNONYMS.get(w, w) for w in regex.findall(r"\p{L}+", text.lower())}
            emb = sum((self.dirs[i] for i, c in enumerate(COLORS) if c in words), torch.zeros(DIM, device=self.device))
            if words & MOTION_WORDS:
                emb = emb + self.dirs[-2]
            rows.append(emb if emb.abs().sum() > 0 else self.dirs[-1])
        return F.normalize(torch.stack(rows), dim=-1)
