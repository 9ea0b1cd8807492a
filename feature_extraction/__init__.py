"""Stage 3 (extract_features.py): video-language features of tile clips, their cache, and per-pixel feature maps.

    enc = load_encoder("viclip" | "color" | "openclip:<arch>:<ckpt-or-tag>", device, viclip_ckpt)
    enc.name, enc.dim                               # "viclip", 768
    enc.encode_video(clips [B, 8, 3, S, S])         # CLIP-normalised -> [B, dim] unit float32
    enc.encode_text(["a red ball"])                 # -> [B, dim] unit float32
    cache = cache_dir(seq_dir, enc.name)            # <seq>/interpolators/<name>
    load_tile_embeddings(cache, t)                  # [M, dim] float16, all tiles of timestep t
    dense_feature_map(cache, t, cam_index, H, W, device)  # [dim, H, W] float32

The cache is written by extract_features.py; its layout is described in feature_extraction/cache.py.
"""

from feature_extraction.cache import cache_dir, dense_feature_map, load_tile_embeddings
from feature_extraction.color_encoder import ColorEncoder
from feature_extraction.viclip import DEFAULT_CKPT, ViCLIP, load_viclip
from helpers import UserError

__all__ = [
    "DEFAULT_CKPT",
    "ENCODER_HELP",
    "ColorEncoder",
    "ViCLIP",
    "cache_dir",
    "dense_feature_map",
    "load_encoder",
    "load_tile_embeddings",
    "load_viclip",
]

ENCODER_HELP = (
    "viclip (needs --viclip-ckpt), color (deterministic stand-in, no weights), or "
    "openclip:<arch>:<checkpoint file | open_clip tag | random>"
)


def load_encoder(spec, device="cpu", viclip_ckpt=DEFAULT_CKPT, compile=False, fp8=False):
    """The encoder named by `spec` on `device` (bfloat16 on CUDA for viclip). compile: torch.compile
    ViCLIP's video path (worth it only for long extraction runs on a GPU); fp8: ViCLIP's video
    transformer in FP8 matmuls (ViCLIP.use_fp8; viclip only)."""
    if fp8 and spec != "viclip":
        raise UserError(f"--fp8 --encoder {spec}: only the viclip encoder has an FP8 path; drop --fp8")
    if spec == "viclip":
        return load_viclip(viclip_ckpt, device, compile=compile, fp8=fp8)
    if spec == "color":
        return ColorEncoder(device)
    if spec.startswith("openclip:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise UserError(
                f"--encoder {spec}: write openclip:<arch>:<checkpoint-or-tag>, e.g. "
                f"openclip:ViT-L-14:laion2b_s32b_b82k or openclip:ViT-B-16:/path/to/ckpt.pt"
            )
        from feature_extraction.openclip_encoder import OpenCLIPEncoder

        return OpenCLIPEncoder(parts[1], parts[2], device)
    raise UserError(f"--encoder {spec}: unknown encoder; use {ENCODER_HELP}")
