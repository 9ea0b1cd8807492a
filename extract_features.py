"""Stage 3 of 4-LEGS: embed every tile clip of every train camera and timestep with a video-language encoder.

Per timestep t: each train camera's 8-frame clip (t-4 .. t+3), cut into the 5-level tile pyramid of
4-LEGS (feature_extraction/tiles.py; 572 tiles per camera at 640x360), each tile's clip resized and
embedded; the embeddings are cached in float16 under <seq>/interpolators/<encoder>/timestep_<t>/
(layout and invalidation: feature_extraction/cache.py). Finished timesteps are skipped, so an
interrupted run resumes.

Speed: all tiles of all cameras and levels go through the encoder in fixed-size batches; tiles are
cut and resized on the GPU; ViCLIP runs in bfloat16 with fused attention (compiled by default on
CUDA); the next timestep's images are decoded in a background thread while the GPU works.
Several GPUs: `torchrun --nproc_per_node=K extract_features.py -s SEQ` gives each rank a contiguous
block of the timesteps (across nodes the same way, by global rank); a plain run uses one device.
"""
import argparse
import concurrent.futures
import os
import time

import numpy as np
import torch

import helpers
from feature_extraction import DEFAULT_CKPT, ENCODER_HELP, cache_dir, load_encoder, tiles
from feature_extraction import cache as feature_cache
from feature_extraction.viclip import CLIP_MEAN, CLIP_STD
from helpers import UserError


def dist_rank():
    """(rank, world_size, local_rank) set by torchrun; (0, 1, 0) for a plain run."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))


def rank_device(name, world, local_rank):
    """This process's device: `name` (default cuda if available) with an explicit GPU index, under
    torchrun the rank's own GPU (cuda:LOCAL_RANK)."""
    device = helpers.pick_device(name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else device.index or 0)
    return device


def shard(timesteps, rank, world):
    """Rank `rank`'s contiguous block of `timesteps` (blocks differ in length by at most one):
    neighbouring timesteps share 7 of their 8 frames, so a block decodes each image once."""
    bounds = np.linspace(0, len(timesteps), world + 1).round().astype(int)
    return list(timesteps[bounds[rank]:bounds[rank + 1]])


class FrameReader:
    """reader(t) -> uint8 tensor [C, 8, H, W, 3]: the clip frames of timestep t for every train
    camera (in page-locked memory when `pin`, for a fast asynchronous copy to the GPU). Frames
    decoded for the previous call are kept, so walking through timesteps in order decodes one new
    image per camera and timestep."""

    def __init__(self, seq_dir, meta, pin=False):
        self.seq_dir, self.meta, self.pin, self.decoded = seq_dir, meta, pin, {}

    def __call__(self, t):
        from PIL import Image
        frames = tiles.clip_frames(t, len(self.meta["fn"]))
        decoded = {}
        for f in sorted(set(frames)):
            for fn in self.meta["fn"][f]:
                if fn not in self.decoded:
                    path = os.path.join(self.seq_dir, "ims", fn)
                    try:
                        self.decoded[fn] = np.asarray(Image.open(path).convert("RGB"))
                    except OSError as e:
                        raise UserError(f"image {path} cannot be read ({e})")
                    if self.decoded[fn].shape[:2] != (self.meta["h"], self.meta["w"]):
                        raise UserError(f"image {path} is {self.decoded[fn].shape[1]}x{self.decoded[fn].shape[0]}, "
                                        f"{self.meta['path']} says {self.meta['w']}x{self.meta['h']}")
                decoded[fn] = self.decoded[fn]
        self.decoded = decoded
        cams = range(len(self.meta["cam_id"]))
        clips = torch.from_numpy(np.stack([np.stack([decoded[self.meta["fn"][f][c]] for f in frames]) for c in cams]))
        return clips.pin_memory() if self.pin else clips


@torch.inference_mode()
def encode_timestep(encoder, frames, levels, index, batch_size, device, fixed_batch, on_batch=None):
    """All tile clips of one timestep through the encoder.

    frames uint8 [C, 8, H, W, 3] (FrameReader's); index: tiles.tile_index tensors on `device`; fixed_batch:
    pad the last batch to batch_size (one input shape, so torch.compile compiles once); on_batch(n)
    is called after each batch of n clips is queued. Returns float16 [M, D] on `device` in
    tiles.tile_index order.
    """
    padded, pad = tiles.pad_frames(frames.to(device, non_blocking=True), levels)
    level, cam, row, col = index
    # Where each level's tiles start and end in the flat order (index is sorted by level).
    sizes = np.array([len(padded) * lv["rows"] * lv["cols"] for lv in levels])
    ends = np.cumsum(sizes)
    starts = ends - sizes
    mean = torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(3, 1, 1)
    out = torch.empty(len(level), encoder.dim, dtype=torch.float16, device=device)
    for start in range(0, len(level), batch_size):
        stop = min(start + batch_size, len(level))
        parts = []  # a batch may span two levels (tile sizes): cut each level's share at its size
        for lv, first, end in zip(levels, starts, ends):
            a, b = max(first, start), min(end, stop)
            if a < b:
                parts.append(tiles.crop_tiles(padded, pad, lv, cam[a:b], row[a:b], col[a:b], encoder.input_size))
        clips = torch.cat(parts).sub_(mean).div_(std)
        if fixed_batch and len(clips) < batch_size:
            clips = torch.cat([clips, clips.new_zeros((batch_size - len(clips),) + clips.shape[1:])])
        out[start:stop] = encoder.encode_video(clips)[:stop - start].to(torch.float16)
        if on_batch:
            on_batch(stop - start)
    return out


def extract(seq_dir, encoder, timesteps, batch_size, device, progress=True, cache_root=None):
    """Embed and cache `timesteps` (skipping finished ones) under cache_root (default: the sequence
    folder), holding the stage's lock of the cache folder (per rank under torchrun). Returns stats:
    clips, seconds, timestep_seconds (per computed timestep), done (computed), skipped, cache."""
    meta = helpers.load_meta(seq_dir, "train")
    cache = cache_dir(cache_root or seq_dir, encoder.name)
    rank, world, _ = dist_rank()
    with helpers.stage_lock(cache, "extract_features" + (f".rank{rank}of{world}" if world > 1 else ""),
                            "; pass --cache-dir DIR to keep the features elsewhere"):
        feature_cache.claim_for_sequence(cache, seq_dir, meta)
        return extract_into(cache, seq_dir, meta, encoder, timesteps, batch_size, device, progress)


def extract_into(cache, seq_dir, meta, encoder, timesteps, batch_size, device, progress):
    """extract's work, in the cache folder it holds."""
    levels = tiles.tile_levels(meta["h"], meta["w"])
    index = [x.to(device) for x in tiles.tile_index(levels, len(meta["cam_id"]))]
    configs = {t: feature_cache.make_config(encoder, seq_dir, meta, t) for t in timesteps}
    todo = [t for t in timesteps if not feature_cache.is_done(cache, t, configs[t])]
    stats = {"clips": 0, "seconds": 0.0, "timestep_seconds": [], "done": len(todo),
             "skipped": len(timesteps) - len(todo), "cache": cache}
    if not todo:
        return stats
    reader = FrameReader(seq_dir, meta, pin=device.type == "cuda")
    bar = helpers.progress(total=len(todo) * len(index[0]), unit="clip", disable=not progress, smoothing=0.05)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as decoder:
        pending = decoder.submit(reader, todo[0])
        for i, t in enumerate(todo):
            t_start = time.perf_counter()
            bar.set_description(f"{encoder.name} t={t}")
            frames = pending.result()
            if i + 1 < len(todo):  # decode the next timestep's images while this one computes
                pending = decoder.submit(reader, todo[i + 1])
            emb = encode_timestep(encoder, frames, levels, index, batch_size, device,
                                  fixed_batch=device.type == "cuda", on_batch=bar.update)
            if not torch.isfinite(emb).all():  # never cache what would poison every later stage
                raise UserError(f"timestep {t}: the {encoder.name} encoder returned NaN/Inf embeddings; nothing "
                                f"cached for it. Check the encoder's weights (--viclip-ckpt) and the images")
            feature_cache.write_timestep(cache, t, configs[t], emb.cpu().numpy())
            stats["timestep_seconds"].append(time.perf_counter() - t_start)
            stats["clips"] += len(index[0])
    bar.close()
    stats["seconds"] = time.perf_counter() - start
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=helpers.stage_description("extract_features.py") + " Embeds the multi-scale tile clips "
                    "of every train camera and timestep with a video-language encoder and caches them (float16) "
                    "under <seq>/interpolators/<encoder>/timestep_<t>/. Finished timesteps are skipped, so an "
                    "interrupted run resumes. Several GPUs: torchrun --nproc_per_node=K extract_features.py -s SEQ "
                    "(each rank takes a contiguous block of the timesteps).")
    helpers.add_sequence_option(parser)
    parser.add_argument("-f", "--first", type=int, default=0, help="first timestep to embed (default: %(default)s)")
    parser.add_argument("-l", "--last", type=int, default=None,
                        help="last timestep to embed, inclusive (default: the sequence's last)")
    parser.add_argument("--encoder", default="viclip", help=f"{ENCODER_HELP} (default: %(default)s)")
    parser.add_argument("--viclip-ckpt", default=DEFAULT_CKPT,
                        help="ViCLIP weights, ViClip-InternVid-10M-FLT.pth from huggingface.co/OpenGVLab/ViCLIP "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="tile clips per encoder call (default: the encoder's own: 64 for viclip and openclip, "
                             "which keeps an H100 busy; 512 for color); lower it if GPU memory runs out")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N or cpu (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip torch.compile of ViCLIP on CUDA: ~25 s less start-up, ~15%% slower encoding")
    feature_cache.add_cache_dir_option(parser)
    args = parser.parse_args(argv)
    args.seq = helpers.find_sequence(args.seq)

    rank, world, local_rank = dist_rank()
    device = rank_device(args.device, world, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device.index)
    helpers.check_option(args, "batch_size", at_least=1)
    meta = helpers.load_meta(args.seq, "train")
    num_t = len(meta["fn"])
    last = num_t - 1 if args.last is None else args.last
    if not 0 <= args.first <= last < num_t:
        raise UserError(f"-f {args.first} -l {last}: {meta['path']} has timesteps 0..{num_t - 1}; "
                        f"need 0 <= first <= last <= {num_t - 1}")
    mine = shard(list(range(args.first, last + 1)), rank, world)
    if mine:  # every image the clips of these timesteps read, before hours of work
        helpers.check_sequence(args.seq, meta, max(0, mine[0] + tiles.CLIP_OFFSETS[0]),
                               min(num_t - 1, mine[-1] + tiles.CLIP_OFFSETS[-1]))
    encoder = load_encoder(args.encoder, device, args.viclip_ckpt,
                           compile=device.type == "cuda" and not args.no_compile)
    stats = extract(args.seq, encoder, mine, args.batch_size or encoder.batch_size, device, progress=rank == 0,
                    cache_root=args.cache_dir)
    rate = (f", {stats['clips'] / stats['seconds']:.1f} clips/s, median "
            f"{np.median(stats['timestep_seconds']):.1f} s/timestep" if stats["seconds"] else "")
    who = f"rank {rank}/{world}: " if world > 1 else ""
    print(f"{who}embedded {stats['done']} timestep(s) ({stats['clips']} clips{rate}), {stats['skipped']} already "
          f"cached -> {stats['cache']}/timestep_<t>/")


if __name__ == "__main__":
    helpers.run_main(main)
