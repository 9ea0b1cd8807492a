"""Speed and accuracy of stage 3 (extract_features.py) with ViCLIP of the real size (random weights
unless --viclip-ckpt) on a CUDA GPU.

    python benchmarks/bench_viclip.py --seq data/bench_viclip/basketball --timesteps 4 5
    python benchmarks/bench_viclip.py --timesteps 4 5      # synthetic 27-camera 640x360 frames
    python benchmarks/bench_viclip.py --viclip-ckpt data/checkpoints/ViClip-InternVid-10M-FLT.pth

In one run, on the same weights:
  original   the original's way: float32, nn.MultiheadAttention blocks (sequence first, fp32
             LayerNorm, Conv3d patches, patch-major tokens), 20 clips per call
  eager      our network, bfloat16, fused attention (per SDPA backend and batch size)
  bare       our network compiled (torch.compile), the chosen backend, --batch-size clips per call;
             also with its last block on every token (whole_last_block, as the original) instead of
             the class token alone, and with --profile the GPU time of one call by kernel class
  fp8        as bare, the video transformer's matmuls in FP8 (ViCLIP.use_fp8, extract_features.py
             --fp8), the same clips (not with --no-fp8; compiled unless --no-compile)
  end2end    extract_features.extract on a whole timestep: decode, tile, resize, encode, cache
  accuracy   cosine of our bfloat16 embeddings against float32 ones (ours and the original-style
             module) on real tile clips of the first timestep, and of the FP8 ones against both
Prints a table and writes every figure to --json (after each stage, so a cut-off run keeps them).
"""

import argparse
import collections
import os
import shutil
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import extract_features
import helpers
from feature_extraction import ViCLIP, load_tile_embeddings, tiles
from feature_extraction.viclip import CLIP_MEAN, CLIP_STD, load_viclip

# 2,049 tokens x 24 blocks x (24 x 1,024^2 linear + 4 x 2,049 x 1,024 attention) = 1.65 TFLOP, less
# the last block's work for every token but the class token (only its keys and values): 1.59 TFLOP
FLOP_PER_CLIP = 1.59e12
KERNEL_CLASSES = (  # (class, substrings of a CUDA kernel's name), the first match wins
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "scaled_mm")),
    ("fused pointwise and norms (Triton)", ("triton",)),
)


# ---------------------------------------------------------------- the original's way


class OriginalBlock(nn.Module):
    """The original ResidualAttentionBlock: nn.MultiheadAttention on [N, B, D], LayerNorm in fp32."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.ln_1(x.float()).type(x.dtype)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x.float()).type(x.dtype))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


class OriginalVision(nn.Module):
    """The original vision encoder's computation, loading the same `vision_encoder.*` weights."""

    def __init__(self, width=1024, layers=24, heads=16, patch=14, frames=8, embed_dim=768, grid=16):
        super().__init__()
        self.conv1 = nn.Conv3d(3, width, (1, patch, patch), (1, patch, patch), bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.temporal_positional_embedding = nn.Parameter(torch.empty(1, frames, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(OriginalBlock(width, heads) for _ in range(layers))
        self.proj = nn.Parameter(torch.empty(width, embed_dim))

    def forward(self, video):  # [B, T, 3, S, S]
        x = self.conv1(video.permute(0, 2, 1, 3, 4))  # [B, D, T, g, g]
        b, d, t = x.shape[:3]
        x = x.permute(0, 2, 3, 4, 1).reshape(b * t, -1, d)
        cls = self.class_embedding + torch.zeros(len(x), 1, d, dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], 1) + self.positional_embedding
        cls, x = x[:b, :1], x[:, 1:]
        x = x.reshape(b, t, -1, d).transpose(1, 2) + self.temporal_positional_embedding  # [B, P, T, D]
        x = torch.cat([cls, x.reshape(b, -1, d)], 1)  # patch-major, frame-minor
        x = self.ln_pre(x).permute(1, 0, 2)  # [N, B, D]
        for block in self.transformer.resblocks:
            x = block(x)
        return F.normalize((self.ln_post(x[0]) @ self.proj).float(), dim=-1)


# ---------------------------------------------------------------- timing


def time_calls(fn, inputs, repeats, warmup=1):
    """Median seconds of fn(x) over `repeats` calls (after `warmup`), inputs cycled."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def random_clips(n, batch, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(batch, 8, 3, 224, 224, device=device, generator=g) for _ in range(n)]


def synthetic_sequence(out, num_t, num_cams=27, w=640, h=360):
    """Random smooth 640x360 JPEGs of 27 cameras (when no real sequence is given)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    fns = [[f"{c}/{t:06d}.jpg" for c in range(num_cams)] for t in range(num_t)]
    base = rng.integers(0, 256, (num_cams, h // 8, w // 8, 3), dtype=np.uint8)
    for t, row in enumerate(fns):
        for c, fn in enumerate(row):
            os.makedirs(os.path.join(out, "ims", str(c)), exist_ok=True)
            im = Image.fromarray(np.roll(base[c], t, axis=1)).resize((w, h), Image.BILINEAR)
            im.save(os.path.join(out, "ims", fn), quality=90)
    meta = {
        "w": w,
        "h": h,
        "fn": fns,
        "cam_id": list(range(num_cams)),
        "k": [[[[500, 0, w / 2], [0, 500, h / 2], [0, 0, 1]]] * num_cams] * num_t,
        "w2c": [[np.eye(4).tolist()] * num_cams] * num_t,
    }
    helpers.save_json(os.path.join(out, "train_meta.json"), meta)
    return out


def kernel_class_ms(fn, x, calls=3):
    """GPU milliseconds per call of fn(x) by KERNEL_CLASSES (torch.profiler; the rest as 'other')."""
    from torch.profiler import ProfilerActivity, profile

    fn(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(x)
        torch.cuda.synchronize()
    out = collections.Counter()
    for event in prof.key_averages():
        name = event.key.lower()
        kind = next((k for k, parts in KERNEL_CLASSES if any(p in name for p in parts)), "other")
        out[kind] += event.self_device_time_total / calls / 1000
    return {k: round(v, 2) for k, v in out.items() if v > 0}


def compile_seconds(model, first_input):
    """torch.compile the model's video path; returns the seconds of its first call (the compiling)."""
    model.compile_video()
    t0 = time.perf_counter()
    model.encode_video(first_input)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seq",
        help=f"a sequence folder with 640x360 images, or its name under {helpers.DATA_DIR}/ "
        "(default: synthetic frames in results/bench_viclip/synthetic)",
    )
    parser.add_argument("--timesteps", type=int, nargs="+", default=[4, 5], help="timesteps timed end to end")
    parser.add_argument("--batch-size", type=int, default=64, help="clips per call of our network")
    parser.add_argument("--repeats", type=int, default=8, help="timed calls per variant (median)")
    parser.add_argument("--original-calls", type=int, default=5, help="timed 20-clip calls of the original's way")
    parser.add_argument(
        "--backends",
        nargs="*",
        default=["default", "flash", "cudnn", "efficient"],
        help="SDPA backends timed in eager mode; the fastest is compiled",
    )
    parser.add_argument(
        "--eager-batches",
        type=int,
        nargs="*",
        default=[32, 64, 128],
        help="batch sizes timed in eager mode (default backend)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument(
        "--profile", action="store_true", help="the compiled network's GPU time per call by kernel class"
    )
    parser.add_argument("--no-fp8", action="store_true", help="skip the FP8 variant (speed and accuracy)")
    parser.add_argument(
        "--viclip-ckpt",
        help="measure with these ViCLIP weights (ViClip-InternVid-10M-FLT.pth) instead of random ones; "
        "the FP8 accuracy on real weights is worth checking before extract_features.py --fp8",
    )
    parser.add_argument(
        "--json", default="results/bench_viclip.json", help="where all figures go (default: %(default)s)"
    )
    parser.add_argument("--device", default="cuda", help="a CUDA device")
    args = parser.parse_args()
    if args.seq is not None:
        args.seq = helpers.find_sequence(args.seq)
    from torch.nn.attention import SDPBackend

    backends = {
        "default": None,
        "flash": [SDPBackend.FLASH_ATTENTION],
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    }
    device = torch.device(args.device)
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }

    def save():
        helpers.save_json(args.json, res)

    def log(msg):
        print(msg, flush=True)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.viclip_ckpt:  # float32, the weights every variant loads
        ref32 = load_viclip(args.viclip_ckpt, device, dtype=torch.float32)
    else:
        with torch.device(device):
            ref32 = ViCLIP().reset_parameters()
        ref32.eval().requires_grad_(False)
    res["weights"] = ref32.identity

    def bf16_copy():
        """Our network in bfloat16 with ref32's weights."""
        with torch.device(device):
            copy = ViCLIP().eval().requires_grad_(False)
        copy.load_state_dict(ref32.state_dict())
        return copy.to(torch.bfloat16)

    model = bf16_copy()
    original = OriginalVision().to(device).eval().requires_grad_(False)
    original.load_state_dict(
        {k[len("vision_encoder.") :]: v for k, v in ref32.state_dict().items() if k.startswith("vision_encoder.")},
        strict=True,
    )
    log(f"models built in {time.perf_counter() - t0:.1f} s on {res['device']}")

    # -- the original's way: float32, nn.MultiheadAttention, 20 clips per call
    inputs20 = random_clips(2, 20, device, 1)
    with torch.inference_mode():
        sec = time_calls(original, inputs20, args.original_calls)
    res["original"] = {"clips_per_s": 20 / sec, "s_per_call": sec}
    log(f"original way (fp32, nn.MultiheadAttention, 20/call): {20 / sec:.1f} clips/s")
    save()

    # -- eager bf16 per SDPA backend, then batch sizes
    inputs = random_clips(2, args.batch_size, device, 2)
    res["eager"] = {}
    for name in args.backends:
        model.sdpa_backends = backends[name]
        try:
            sec = time_calls(model.encode_video, inputs, max(3, args.repeats // 2))
            res["eager"][name] = args.batch_size / sec
            log(f"eager bf16 {name:>9}: {args.batch_size / sec:.1f} clips/s (batch {args.batch_size})")
        except Exception as e:  # a backend this GPU or build lacks
            res["eager"][name] = f"unavailable: {str(e)[:120]}"
            log(f"eager bf16 {name:>9}: unavailable ({str(e)[:80]})")
        save()
    timed = {k: v for k, v in res["eager"].items() if isinstance(v, float)}
    best = max(timed, key=timed.get)
    model.sdpa_backends = backends[best]
    res["backend"] = best
    res["eager_batches"] = {}
    for b in args.eager_batches:
        sec = time_calls(model.encode_video, random_clips(2, b, device, 3), max(3, args.repeats // 2))
        res["eager_batches"][b] = b / sec
        log(f"eager bf16 {best} batch {b}: {b / sec:.1f} clips/s")
    save()

    # -- bare network, compiled
    if not args.no_compile:
        res["compile_s"] = compile_seconds(model, inputs[0])
        sec = time_calls(model.encode_video, inputs, args.repeats)
        res["bare"] = {"clips_per_s": args.batch_size / sec, "tflops": args.batch_size * FLOP_PER_CLIP / sec / 1e12}
        log(
            f"bare compiled bf16 ({best}, batch {args.batch_size}): {args.batch_size / sec:.1f} clips/s, "
            f"{res['bare']['tflops']:.0f} TFLOP/s (compile {res['compile_s']:.0f} s)"
        )
        whole = torch.compile(lambda v: model.vision_encoder(v.to(torch.bfloat16), class_only=False))
        with torch.inference_mode(), model._attention_kernels():
            sec = time_calls(whole, inputs, args.repeats)
        res["bare_whole_last_block"] = {"clips_per_s": args.batch_size / sec}
        log(f"the same, the last block on every token: {args.batch_size / sec:.1f} clips/s")
        if args.profile:
            with torch.inference_mode():
                res["bare_profile_ms"] = kernel_class_ms(model.encode_video, inputs[0])
            log(f"GPU ms per call by kernel class: {res['bare_profile_ms']}")
        save()

    # -- FP8 matmuls: the same weights, backend, batch size and clips as bare
    fp8_model = None
    if not args.no_fp8:
        try:
            fp8_model = bf16_copy().use_fp8()
        except helpers.UserError as e:  # a GPU without FP8 tensor cores
            res["fp8"] = f"unavailable: {e}"
            log(f"fp8: unavailable ({e})")
    if fp8_model is not None:
        fp8_model.sdpa_backends = backends[best]
        if not args.no_compile:
            res["fp8_compile_s"] = compile_seconds(fp8_model, inputs[0])
        sec = time_calls(fp8_model.encode_video, inputs, args.repeats)
        mode, bf16_rate = ("eager", res["eager"][best]) if args.no_compile else ("compiled", res["bare"]["clips_per_s"])
        res["fp8"] = {"clips_per_s": args.batch_size / sec, "mode": mode, "vs_bf16": args.batch_size / sec / bf16_rate}
        log(
            f"{mode} fp8 ({best}, batch {args.batch_size}): {args.batch_size / sec:.1f} clips/s, "
            f"x{res['fp8']['vs_bf16']:.2f} the {mode} bf16 rate"
        )
        save()

    # -- end to end on whole timesteps
    seq = args.seq or synthetic_sequence("results/bench_viclip/synthetic", max(args.timesteps) + 4)
    meta = helpers.load_meta(seq, "train")
    cache = os.path.join(seq, "interpolators", model.name)
    for t in args.timesteps:  # timed from scratch
        shutil.rmtree(os.path.join(cache, f"timestep_{t}"), ignore_errors=True)
    stats = extract_features.extract(seq, model, args.timesteps, args.batch_size, device, progress=False)
    per_t = stats["timestep_seconds"]
    res["end2end"] = {
        "clips_per_timestep": stats["clips"] // max(1, stats["done"]),
        "timestep_s": per_t,
        "median_timestep_s": statistics.median(per_t),
        "clips_per_s": stats["clips"] / stats["seconds"],
        "cameras": len(meta["cam_id"]),
        "source": args.seq or "synthetic frames",
    }
    log(
        f"end to end ({len(meta['cam_id'])} cameras, {res['end2end']['clips_per_timestep']} clips/timestep): "
        f"{res['end2end']['clips_per_s']:.1f} clips/s, {res['end2end']['median_timestep_s']:.1f} s/timestep "
        f"(each: {', '.join(f'{s:.1f}' for s in per_t)})"
    )
    save()

    # -- accuracy on real tile clips of the first timestep: bf16 (compiled) vs float32
    t = args.timesteps[0]
    frames = extract_features.FrameReader(seq, meta)(t)
    levels = tiles.tile_levels(meta["h"], meta["w"])
    padded, pad = tiles.pad_frames(frames.to(device), levels)
    level, cam, row, col = tiles.tile_index(levels, len(meta["cam_id"]))
    pick = torch.randperm(len(level), generator=torch.Generator().manual_seed(0))[: args.batch_size].sort().values
    clips = torch.cat(
        [
            tiles.crop_tiles(
                padded, pad, levels[int(li)], *(x[pick][level[pick] == li].to(device) for x in (cam, row, col)), 224
            )
            for li in level[pick].unique()
        ]
    )
    mean, std = (torch.tensor(x, device=device).view(3, 1, 1) for x in (CLIP_MEAN, CLIP_STD))
    clips = (clips - mean) / std
    ours_bf16 = model.encode_video(clips)
    ours_fp32 = ref32.encode_video(clips)
    with torch.inference_mode():
        orig_fp32 = original(clips)
    cached = load_tile_embeddings(cache, t)[pick].to(device).float()

    def cos(a, b):
        return F.cosine_similarity(a, b, dim=-1)

    res["accuracy"] = {
        "tiles": len(pick),
        "cos_bf16_vs_fp32_min": cos(ours_bf16, ours_fp32).min().item(),
        "cos_bf16_vs_fp32_mean": cos(ours_bf16, ours_fp32).mean().item(),
        "cos_cache_fp16_vs_fp32_min": cos(cached, ours_fp32).min().item(),
        "cos_ours_fp32_vs_original_fp32_min": cos(ours_fp32, orig_fp32).min().item(),
        "spread_of_embeddings_mean_cos": (ours_fp32 @ ours_fp32.T).mean().item(),
    }
    a = res["accuracy"]
    log(
        f"accuracy on {len(pick)} real tiles: cos(bf16, fp32) min {a['cos_bf16_vs_fp32_min']:.5f} mean "
        f"{a['cos_bf16_vs_fp32_mean']:.5f}; cache (fp16) vs fp32 min {a['cos_cache_fp16_vs_fp32_min']:.5f}; "
        f"ours fp32 vs original-style fp32 min {a['cos_ours_fp32_vs_original_fp32_min']:.7f}"
    )
    if fp8_model is not None:
        ours_fp8 = fp8_model.encode_video(clips)
        for name, other in (("bf16", ours_bf16), ("fp32", ours_fp32)):
            a[f"cos_fp8_vs_{name}_min"] = cos(ours_fp8, other).min().item()
            a[f"cos_fp8_vs_{name}_mean"] = cos(ours_fp8, other).mean().item()
        log(
            f"fp8 on the same tiles: cos(fp8, bf16) min {a['cos_fp8_vs_bf16_min']:.5f} mean "
            f"{a['cos_fp8_vs_bf16_mean']:.5f}; cos(fp8, fp32) min {a['cos_fp8_vs_fp32_min']:.5f} mean "
            f"{a['cos_fp8_vs_fp32_mean']:.5f}"
        )
    save()

    log("\n| variant | clips/s | s per basketball timestep (15,444 clips) |\n|---|---|---|")
    rows = [("original way (fp32, MHA, 20/call)", res["original"]["clips_per_s"])]
    rows += [(f"eager bf16 {k}", v) for k, v in res["eager"].items() if isinstance(v, float)]
    if "bare" in res:
        rows.append((f"bare compiled bf16 ({best})", res["bare"]["clips_per_s"]))
        rows.append(
            (f"bare compiled bf16 ({best}), the last block on every token", res["bare_whole_last_block"]["clips_per_s"])
        )
    if isinstance(res.get("fp8"), dict):
        rows.append((f"{res['fp8']['mode']} fp8 ({best})", res["fp8"]["clips_per_s"]))
    rows.append(("end to end (ours)", res["end2end"]["clips_per_s"]))
    for name, rate in rows:
        log(f"| {name} | {rate:.1f} | {15444 / rate:.0f} |")


if __name__ == "__main__":
    helpers.run_main(main)
