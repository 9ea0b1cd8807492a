"""ViCLIP (InternVid), inference only: a ViT-L/14 video encoder and CLIP's text encoder.

Parameter names and shapes are those of the official `ViClip-InternVid-10M-FLT.pth` (its "model"
entry loads strictly into `ViCLIP()`; tests/test_viclip.py lists them). The computation is
the original's: pre-norm residual blocks with a packed q/k/v in-projection, QuickGELU MLPs,
LayerNorm eps 1e-5; a video's patch tokens of all 8 frames and ONE class token attend jointly.
The speed-up is in how it is computed: one fused attention call (scaled_dot_product_attention,
flash/cuDNN kernels on CUDA) instead of nn.MultiheadAttention, bfloat16 weights on CUDA, the patch
embedding as one conv2d over all frames, the last block on the class token alone (the only token
read), and optionally torch.compile. Opt-in (ViCLIP.use_fp8): the
video encoder's transformer matmuls in FP8 (e4m3, per-channel weight and per-token activation
scales; fp8_linear, specified by fp8_linear_reference) on GPUs of compute capability >= 8.9.
"""

import collections
import contextlib
import os
import pickle

import torch
import torch.nn.functional as F
from torch import nn

from helpers import UserError

DEFAULT_CKPT = "data/checkpoints/ViClip-InternVid-10M-FLT.pth"
MODEL_PAGE = "https://huggingface.co/OpenGVLab/ViCLIP"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first NVIDIA GPUs with FP8 tensor cores


# ---------------------------------------------------------------- FP8 matmuls


def quantize_rows(a):
    """a [R, K] float -> (q [R, K] float8_e4m3fn, scale [R, 1] float32) with a ~= q * scale: each row
    scaled so that its largest magnitude becomes FP8_MAX. An all-zero row gets a tiny scale and q = 0."""
    amax = a.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    # |a / scale| exceeds FP8_MAX by float32 rounding at most: the cast rounds that to FP8_MAX (the
    # next e4m3 step, 480, is where it would give NaN)
    return (a.float() / scale).to(FP8_DTYPE), scale


def quantize_weight(weight):
    """A linear layer's weight [N, K] -> (q_weight [N, K] float8_e4m3fn, scale [1, N] float32),
    one scale per output channel (weight ~= q_weight * scale.T)."""
    q, scale = quantize_rows(weight)
    return q, scale.reshape(1, -1)


def fp8_linear(x, q_weight, weight_scale, bias=None):
    """F.linear in FP8: x [..., K] bfloat16/float32, q_weight [N, K] and weight_scale [1, N]
    (quantize_weight's), bias [N] or None -> [..., N] in x.dtype.

    x is quantised per row (token) at each call; torch._scaled_mm multiplies the e4m3 values with
    float32 accumulation and applies both scales. The bias is added after, in x.dtype."""
    x_q, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    # mat2 must be column-major: the row-major [N, K] weight transposed is
    out = torch._scaled_mm(x_q, q_weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=x.dtype)
    out = out.view(*x.shape[:-1], -1)
    return out if bias is None else out + bias


def fp8_linear_reference(x, q_weight, weight_scale, bias=None):
    """What fp8_linear computes, in plain PyTorch: both operands dequantised to float32 and multiplied."""
    x_q, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    out = (x_q.float() * x_scale) @ (q_weight.float() * weight_scale.t()).t()
    out = out.to(x.dtype).view(*x.shape[:-1], -1)
    return out if bias is None else out + bias


def linear(x, weight, bias, fp8=None):
    """F.linear(x, weight, bias), or fp8_linear with fp8 = quantize_weight(weight) when given."""
    return F.linear(x, weight, bias) if fp8 is None else fp8_linear(x, *fp8, bias)


def check_fp8_device(device, dtype):
    """Raise UserError unless fp8_linear runs on `device` with `dtype` activations: a CUDA GPU needs
    compute capability >= 8.9; any device is probed with one small call (the CPU runs it, slowly)."""
    device = torch.device(device)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise UserError(
                f"--fp8: {torch.cuda.get_device_name(device)} ({device}) has compute capability "
                f"{capability[0]}.{capability[1]}; FP8 matmuls need >= 8.9 (Ada, Hopper): drop --fp8"
            )
    try:
        fp8_linear(torch.ones(16, 32, device=device, dtype=dtype), *quantize_weight(torch.ones(32, 32, device=device)))
    except Exception as e:
        why = str(e).split("\n")[0]
        raise UserError(
            f"--fp8: FP8 matmuls (torch._scaled_mm) fail on {device} with {dtype} activations "
            f"({type(e).__name__}: {why}): drop --fp8"
        )


# ---------------------------------------------------------------- the network


class Linear(nn.Linear):
    """nn.Linear whose matmul is fp8_linear once `fp8` holds quantize_weight(weight) (ViCLIP.use_fp8)."""

    fp8 = None

    def forward(self, x):
        return linear(x, self.weight, self.bias, self.fp8)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (in_proj_weight
    [3D, D] packing q, k, v in that order; out_proj), computed by one fused SDPA call.
    in_proj_fp8: quantize_weight(in_proj_weight) once ViCLIP.use_fp8 ran (the in-projection in FP8)."""

    in_proj_fp8 = None

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = Linear(width, width)

    def forward(self, x, causal=False, first_only=False):
        """x [B, N, D] -> [B, N, D]; causal: token i sees tokens <= i only (the text encoder);
        first_only: the output of token 0 alone, [B, 1, D] (every token is still a key and value)."""
        b, n, d = x.shape
        if not first_only:
            qkv = linear(x, self.in_proj_weight, self.in_proj_bias, self.in_proj_fp8).view(b, n, 3, self.heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, D / heads]
        else:
            fp8 = self.in_proj_fp8  # the rows of q, then of k and v, as those of the weight
            q_fp8, kv_fp8 = (None, None) if fp8 is None else ((fp8[0][:d], fp8[1][:, :d]), (fp8[0][d:], fp8[1][:, d:]))
            q = linear(x[:, :1], self.in_proj_weight[:d], self.in_proj_bias[:d], q_fp8)
            kv = linear(x, self.in_proj_weight[d:], self.in_proj_bias[d:], kv_fp8)
            q = q.view(b, 1, self.heads, -1).transpose(1, 2)
            k, v = kv.view(b, n, 2, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, q.shape[2], d))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = nn.Sequential(
            collections.OrderedDict(c_fc=Linear(width, 4 * width), gelu=QuickGELU(), c_proj=Linear(4 * width, width))
        )

    def forward(self, x, causal=False, first_only=False):
        """x [B, N, D] -> [B, N, D], or [B, 1, D] with first_only: token 0's output alone."""
        h = self.ln_1(x)
        x = (x[:, :1] if first_only else x) + self.attn(h, causal, first_only)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads) for _ in range(layers))

    def forward(self, x, causal=False, first_only=False):
        """x [B, N, D] -> [B, N, D]; first_only: [B, 1, D], the last block computing token 0 alone
        (what the video encoder reads: its class token): 3.6% fewer FLOPs for ViCLIP-L, 3.6% more
        clips/s compiled on an H100 (docs/performance.md)."""
        for i, block in enumerate(self.resblocks):
            x = block(x, causal, first_only and i == len(self.resblocks) - 1)
        return x


class VisionEncoder(nn.Module):
    """Video [B, T, 3, S, S] -> [B, embed_dim] (not normalised)."""

    def __init__(self, image_size=224, patch=14, width=1024, layers=24, heads=16, frames=8, embed_dim=768):
        super().__init__()
        grid = image_size // patch
        self.conv1 = nn.Conv3d(3, width, kernel_size=(1, patch, patch), stride=(1, patch, patch), bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.temporal_positional_embedding = nn.Parameter(torch.empty(1, frames, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-5)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width, eps=1e-5)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))

    def forward(self, video, class_only=True):
        """class_only: the last block computes the class token alone (Transformer's first_only), the
        only token read; False computes every token there, as the original (the same result)."""
        b, t = video.shape[:2]
        # The Conv3d's kernel spans one frame, so it is a conv2d of every frame.
        x = F.conv2d(video.flatten(0, 1), self.conv1.weight[:, :, 0], stride=self.conv1.stride[1:])
        x = x.flatten(2).transpose(1, 2)  # [B*T, P, D]: patches row-major
        x = x + self.positional_embedding[1:]
        x = x.view(b, t, -1, x.shape[-1]) + self.temporal_positional_embedding[0, :t, None]
        # The original orders patches patch-major/frame-minor; attention is blind to token order
        # (positions are added, not attended), so frame-major gives the same class token.
        cls = (self.class_embedding + self.positional_embedding[0]).expand(b, 1, -1)
        x = torch.cat([cls.to(x.dtype), x.flatten(1, 2)], dim=1)  # [B, 1 + T*P, D]
        x = self.transformer(self.ln_pre(x), first_only=class_only)
        return self.ln_post(x[:, 0]) @ self.proj


class TextEncoder(nn.Module):
    """Token ids [B, L] -> [B, embed_dim] (not normalised), read at the EOT position."""

    def __init__(self, context_length=32, vocab_size=49408, width=768, layers=12, heads=12, embed_dim=768):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width, eps=1e-5)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))

    def forward(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        eot = tokens.argmax(dim=-1)  # EOT has the largest id
        return x[torch.arange(len(tokens), device=tokens.device), eot] @ self.text_projection


class ViCLIP(nn.Module):
    """ViCLIP with constructor arguments for its sizes; ViCLIP() is the released ViT-L/14 model.

    encode_video(frames [B, T, 3, S, S] CLIP-normalised) -> [B, embed_dim] float32, L2-normalised;
    encode_text(list of str) -> [B, embed_dim] float32, L2-normalised. Weights may be float32 or
    bfloat16; inputs are cast to the weights' dtype and outputs returned in float32. use_fp8() runs
    the video encoder's transformer matmuls in FP8.
    """

    name = "viclip"
    batch_size = 64  # clips per call that keep an H100 busy (measured: 32..128 run at the same speed)

    def __init__(
        self,
        image_size=224,
        patch=14,
        vision_width=1024,
        vision_layers=24,
        vision_heads=16,
        frames=8,
        embed_dim=768,
        context_length=32,
        vocab_size=49408,
        text_width=768,
        text_layers=12,
        text_heads=12,
    ):
        super().__init__()
        self.vision_encoder = VisionEncoder(
            image_size, patch, vision_width, vision_layers, vision_heads, frames, embed_dim
        )
        self.text_encoder = TextEncoder(context_length, vocab_size, text_width, text_layers, text_heads, embed_dim)
        self.temp = nn.Parameter(torch.tensor(1 / 100.0))  # logit temperature of training; unused here
        self.input_size, self.frames, self.context_length, self.dim = image_size, frames, context_length, embed_dim
        self.sdpa_backends = None  # None: PyTorch's choice; else the list of SDPBackend allowed
        self._video_forward = None  # the compiled vision forward, once compile_video() ran
        self.fp8 = False  # whether use_fp8() ran

    @property
    def identity(self):
        """What the cache records about this encoder (set by load_viclip to the checkpoint's name),
        ending in ':fp8' after use_fp8(): its embeddings are not those of the bfloat16 model."""
        weights = getattr(self, "_identity", f"viclip-random-{sum(p.numel() for p in self.parameters())}")
        return weights + (":fp8" if self.fp8 else "")

    def reset_parameters(self, generator=None):
        """CLIP's initialisation (normal, scaled by width and depth); for tests and benchmarks."""

        def normal(p, std):
            with torch.no_grad():
                p.normal_(0.0, std, generator=generator)

        for width, tr in (
            (self.vision_encoder.proj.shape[0], self.vision_encoder.transformer),
            (self.text_encoder.text_projection.shape[0], self.text_encoder.transformer),
        ):
            proj_std = width**-0.5 * (2 * len(tr.resblocks)) ** -0.5
            for block in tr.resblocks:
                normal(block.attn.in_proj_weight, width**-0.5)
                normal(block.attn.out_proj.weight, proj_std)
                normal(block.mlp.c_fc.weight, (2 * width) ** -0.5)
                normal(block.mlp.c_proj.weight, proj_std)
                for lin in (block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
                    nn.init.zeros_(lin.bias)
                nn.init.zeros_(block.attn.in_proj_bias)
                for ln in (block.ln_1, block.ln_2):
                    nn.init.ones_(ln.weight)
                    nn.init.zeros_(ln.bias)
        v, t = self.vision_encoder, self.text_encoder
        for p, std in (
            (v.conv1.weight, 0.02),
            (v.class_embedding, v.proj.shape[0] ** -0.5),
            (v.positional_embedding, v.proj.shape[0] ** -0.5),
            (v.temporal_positional_embedding, 0.02),
            (v.proj, v.proj.shape[0] ** -0.5),
            (t.token_embedding.weight, 0.02),
            (t.positional_embedding, 0.01),
            (t.text_projection, t.text_projection.shape[0] ** -0.5),
        ):
            normal(p, std)
        for ln in (v.ln_pre, v.ln_post, t.ln_final):
            nn.init.ones_(ln.weight)
            nn.init.zeros_(ln.bias)
        return self

    def use_fp8(self):
        """Run the video encoder's transformer matmuls (each block's q/k/v in-projection, out_proj,
        c_fc, c_proj) as fp8_linear: their weights are quantised here, once, per output channel,
        the activations per token at each call. The patch embedding, LayerNorms, final projection
        and the text encoder stay as they are; so do the parameters (the state dict is unchanged),
        the FP8 copies are plain attributes (which .to() does not move: call this on the model's
        device, before compile_video()). Raises UserError where FP8 matmuls cannot run
        (check_fp8_device)."""
        check_fp8_device(self.vision_encoder.proj.device, self.vision_encoder.proj.dtype)
        with torch.no_grad():
            for block in self.vision_encoder.transformer.resblocks:
                block.attn.in_proj_fp8 = quantize_weight(block.attn.in_proj_weight)
                for layer in (block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
                    layer.fp8 = quantize_weight(layer.weight)
        self.fp8 = True
        return self

    def compile_video(self, **kwargs):
        """torch.compile the video path (the text path is cheap); kwargs go to torch.compile.
        Kept as a plain function attribute so the state dict keeps its keys."""
        self._video_forward = torch.compile(self.vision_encoder.forward, **kwargs)
        return self

    def _attention_kernels(self):
        if self.sdpa_backends is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self.sdpa_backends)

    @torch.inference_mode()
    def encode_video(self, frames):
        """frames [B, T, 3, S, S] CLIP-normalised -> [B, embed_dim] float32, L2-normalised."""
        dtype = self.vision_encoder.proj.dtype
        with self._attention_kernels():
            x = (self._video_forward or self.vision_encoder)(frames.to(self.vision_encoder.proj.device, dtype))
        return F.normalize(x.float(), dim=-1)

    @torch.inference_mode()
    def encode_text(self, texts):
        """list of str -> [B, embed_dim] float32, L2-normalised (CLIP BPE, context 32)."""
        from feature_extraction.tokenizer import default_tokenizer

        tokens = default_tokenizer()(texts, self.context_length).to(self.text_encoder.text_projection.device)
        with self._attention_kernels():
            x = self.text_encoder(tokens)
        return F.normalize(x.float(), dim=-1)


def expected_shapes(**arch):
    """{key: shape} of a ViCLIP state dict with these constructor arguments (none: the release),
    built on the meta device so nothing is allocated."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in ViCLIP(**arch).state_dict().items()}


def load_viclip(path=DEFAULT_CKPT, device="cpu", dtype=None, compile=False, arch=None, fp8=False):
    """The ViCLIP of checkpoint `path` on `device`, ready for inference.

    dtype: None = bfloat16 on CUDA, float32 elsewhere. compile: torch.compile the video encoder.
    arch: ViCLIP constructor arguments (None = the released ViT-L/14; tests pass tiny sizes).
    fp8: FP8 matmuls in the video encoder (ViCLIP.use_fp8).
    Raises UserError when the file is missing (saying where to put it and where to get it), is
    not a ViCLIP checkpoint (saying which keys differ) or holds NaN/Inf weights, and for fp8 on a
    device that cannot run it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(
            f"{path}: ViCLIP checkpoint not found; download ViClip-InternVid-10M-FLT.pth from "
            f"{MODEL_PAGE} (log in and accept the model's conditions first) and put it at "
            f"{path} (default {DEFAULT_CKPT}), or run with --encoder color / openclip:<arch>:<ckpt>"
        )
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # an old (non-zip) file cannot be memory-mapped
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Training checkpoints may pickle a config object beside the weights; the original
            # code loads this file with a plain torch.load, so we do too for the official file.
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise UserError(
            f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}); "
            f"download it again from {MODEL_PAGE}"
        )
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(
            f"{path}: not a ViCLIP checkpoint: expected a dict with a 'model' state dict, "
            f"found {keys}; get ViClip-InternVid-10M-FLT.pth from {MODEL_PAGE}"
        )
    want = expected_shapes(**(arch or {}))
    got = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or wrong:

        def few(keys, show=lambda k: k):
            return ", ".join(show(k) for k in keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = [
            f"{len(missing)} missing ({few(missing)})" if missing else "",
            f"{len(unexpected)} unexpected ({few(unexpected)})" if unexpected else "",
            f"{len(wrong)} with other shapes ({few(wrong, lambda k: f'{k} {list(got[k])} != {list(want[k])}')})"
            if wrong
            else "",
        ]
        raise UserError(
            f"{path}: not the ViCLIP ViT-L/14 checkpoint: keys of its 'model' differ: "
            f"{'; '.join(p for p in parts if p)}; get ViClip-InternVid-10M-FLT.pth from {MODEL_PAGE}"
        )
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.device("meta"):
        model = ViCLIP(**(arch or {}))
    model.load_state_dict(state, strict=True, assign=True)  # assign: no random init of 428 M weights
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    # checked on the device (one pass over weights already there, not a second read of the file),
    # one flag per tensor and a single copy of them to the host
    weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    finite = torch.stack([torch.isfinite(v).all() for v in weights.values()]).tolist()
    bad = [k for k, ok in zip(weights, finite) if not ok]
    if bad:
        raise UserError(
            f"{path}: {len(bad)} tensors hold NaN/Inf ({', '.join(bad[:3])}); the file is damaged or "
            f"not trained: download ViClip-InternVid-10M-FLT.pth again from {MODEL_PAGE}"
        )
    model._identity = f"{os.path.basename(path)}:{os.path.getsize(path)}"
    if fp8:
        model.use_fp8()
    return model.compile_video() if compile else model
