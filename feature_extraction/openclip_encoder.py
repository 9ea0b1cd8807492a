"""An image CLIP from open_clip as a video encoder, for users without ViCLIP weights: each frame of
a clip is embedded on its own, the unit frame embeddings are averaged and normalised again."""

import os

import torch
import torch.nn.functional as F

from feature_extraction.viclip import CLIP_MEAN, CLIP_STD
from helpers import UserError


class OpenCLIPEncoder:
    """open_clip model `arch` with weights `pretrained`: a checkpoint file, an open_clip tag (it
    downloads), or "random" (untrained weights, for tests and benchmarks). Same interface as
    ViCLIP: .name ("openclip-<arch>"), .dim, .identity, .input_size, .batch_size, encode_video,
    encode_text."""

    batch_size = 64

    def __init__(self, arch, pretrained, device="cpu"):
        import open_clip

        if arch not in open_clip.list_models():
            raise UserError(
                f"--encoder openclip:{arch}:...: unknown open_clip architecture; "
                f"choose one of open_clip.list_models(), e.g. ViT-L-14, ViT-B-16"
            )
        looks_like_file = os.sep in pretrained or os.path.splitext(pretrained)[1] in (
            ".pt",
            ".pth",
            ".bin",
            ".safetensors",
        )
        if looks_like_file and not os.path.isfile(pretrained):
            raise UserError(
                f"{pretrained}: open_clip checkpoint not found; give a file, an open_clip "
                f"pretrained tag (open_clip.list_pretrained()) or 'random'"
            )
        self.device = torch.device(device)
        try:
            self.model = open_clip.create_model(
                arch, pretrained=None if pretrained == "random" else pretrained, device=self.device
            )
        except Exception as e:  # a file that is no checkpoint fails in torch.load's unpickler in many ways
            raise UserError(
                f"--encoder openclip:{arch}:{pretrained}: open_clip could not load it "
                f"({type(e).__name__}: {str(e)[:200]}); give an open_clip checkpoint of {arch}, "
                f"a tag of open_clip.list_pretrained() or 'random'"
            ) from None
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        cfg = self.model.visual.preprocess_cfg
        size = cfg["size"] if isinstance(cfg["size"], int) else tuple(cfg["size"])
        if isinstance(size, tuple) and size[0] != size[1]:
            raise UserError(f"open_clip {arch}: non-square input {size} is not supported")
        self.input_size = size if isinstance(size, int) else size[0]
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=self.device).view(3, 1, 1)
        self.name = f"openclip-{arch}"
        self.identity = f"{arch}:{pretrained}" + (f":{os.path.getsize(pretrained)}" if looks_like_file else "")
        self.dim = self.encode_text([""]).shape[-1]

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.inference_mode()
    def encode_video(self, frames):
        """frames [B, T, 3, S, S] CLIP-normalised -> [B, dim] float32, L2-normalised."""
        b, t = frames.shape[:2]
        clip_mean = torch.tensor(CLIP_MEAN, device=self.device).view(3, 1, 1)
        clip_std = torch.tensor(CLIP_STD, device=self.device).view(3, 1, 1)
        # from CLIP's normalisation to this model's
        x = ((frames.to(self.device, torch.float32) * clip_std + clip_mean) - self.mean) / self.std
        with self._autocast():
            per_frame = self.model.encode_image(x.flatten(0, 1))
        per_frame = F.normalize(per_frame.float(), dim=-1).view(b, t, -1)
        return F.normalize(per_frame.mean(1), dim=-1)

    @torch.inference_mode()
    def encode_text(self, texts):
        """list of str -> [B, dim] float32, L2-normalised (the architecture's own tokeniser)."""
        with self._autocast():
            x = self.model.encode_text(self.tokenizer(list(texts)).to(self.device))
        return F.normalize(x.float(), dim=-1)
