"""Stage 3 of 4-LEGS: embed every tile clip of every train camera and timestep with a video-language encoder.

Per timestep t: each train camera's 8-frame clip (t-4 .. t+3), cut into the 5-level tile pyramid of
4-LEGS (feature_extraction/tiles.py; 572 tiles per camera at 640x360), each tile's clip resized and
embedded; the embeddings are cached as int8 under <seq>/interpolators/<encoder>/timestep_<t>/
(layout and invalidation: feature_extraction/cache.py). Finished timesteps are skipped, so an
interrupted run resumes.

Reuse: the clip of t+1 shares 7 of its 8 frames with that of t, and on a still camera most tiles
show a still background. A tile's clip is encoded only when it differs by more than --reuse-tolerance
(REUSE_TOLERANCE; tiles.clip_change on REUSE_GRID x REUSE_GRID shrunken frames) from the clip its
current embedding was encoded from, the same tile, camera and level at an earlier timestep of the
run; otherwise that embedding is reused. The comparison is with the clip actually encoded, never
with the last reused one, so changes below the tolerance cannot add up. A reused embedding is
stored once, in the folder of the timestep that encoded it (feature_extraction/cache.py), and a
timestep whose source is computed again is computed again too. A run whose first timestep
follows a cached one goes on from that one's state (resumed_reference: the clips of its sources
made again from their frames), so a resumed run caches what an uninterrupted one would; a run with
nothing cached before it (and a torchrun rank whose previous block is not cached yet) encodes every
clip of its first timestep; --exact encodes every clip of every timestep. The cache records the setting
(feature_extraction/cache.py: --exact recomputes what a reusing run wrote).

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
    return list(timesteps[bounds[rank] : bounds[rank + 1]])


DECODE_THREADS = min(8, os.cpu_count() or 1)  # FrameReader's threads decoding a timestep's new images


class FrameReader:
    """reader(t) -> uint8 tensor [C, 8, H, W, 3]: the clip frames of timestep t for every train
    camera (in page-locked memory when `pin`, for a fast asynchronous copy to the GPU). Frames
    decoded for the previous call are kept, so walking through timesteps in order decodes one new
    image per camera and timestep; new images are decoded in DECODE_THREADS threads."""

    def __init__(self, seq_dir, meta, pin=False):
        self.seq_dir, self.meta, self.pin, self.decoded = seq_dir, meta, pin, {}

    def __call__(self, t):
        frames = tiles.clip_frames(t, len(self.meta["fn"]))
        wanted = [fn for f in sorted(set(frames)) for fn in self.meta["fn"][f]]
        new = [fn for fn in wanted if fn not in self.decoded]
        with concurrent.futures.ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:  # PIL lets go of the GIL
            self.decoded.update(zip(new, pool.map(self.decode, new)))
        self.decoded = decoded = {fn: self.decoded[fn] for fn in wanted}
        cams = range(len(self.meta["cam_id"]))
        clips = torch.from_numpy(np.stack([np.stack([decoded[self.meta["fn"][f][c]] for f in frames]) for c in cams]))
        return clips.pin_memory() if self.pin else clips

    def decode(self, fn):
        """uint8 [H, W, 3] of the image `fn` (train_meta's name under ims/), checked against the meta's size."""
        from PIL import Image

        path = os.path.join(self.seq_dir, "ims", fn)
        try:
            image = np.asarray(Image.open(path).convert("RGB"))
        except OSError as e:
            raise UserError(f"image {path} cannot be read ({e})")
        if image.shape[:2] != (self.meta["h"], self.meta["w"]):
            raise UserError(
                f"image {path} is {image.shape[1]}x{image.shape[0]}, "
                f"{self.meta['path']} says {self.meta['w']}x{self.meta['h']}"
            )
        return image


REUSE_TOLERANCE = 0.01
"""Default --reuse-tolerance: a tile's clip is encoded again when one cell of one frame of its shrunken
clip has changed by more than this (mean over RGB of |difference|, pixel values in [0, 1]: 2.55 of 255
grey levels over a cell of the tile) against the clip its embedding was encoded from. On the synthetic
scene with the colour encoder (whose 8x8 input is the shrunken clip itself, so it sees every change the
test lets pass), 96x54 and 160x90 pixels, 12-16 timesteps: cosine to recomputed embeddings >= 0.998 at
0.01, down to 0.988 at 0.02 (96x54)."""


def encode_tiles(encoder, padded, pad, levels, index, batch_size, fixed_batch, on_batch=None):
    """The tile clips of `index` (tiles.crop_batches' order) through the encoder: float16 [len, D] on
    padded's device. fixed_batch: pad the last batch to batch_size (one input shape, so torch.compile
    compiles once); on_batch(n) is called after each batch of n clips is queued."""
    device = padded.device
    mean = torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(3, 1, 1)
    out = torch.empty(len(index[0]), encoder.dim, dtype=torch.float16, device=device)
    for start, stop, clips in tiles.crop_batches(padded, pad, levels, index, batch_size, encoder.input_size):
        clips = clips.sub_(mean).div_(std)
        if fixed_batch and len(clips) < batch_size:
            clips = torch.cat([clips, clips.new_zeros((batch_size - len(clips),) + clips.shape[1:])])
        out[start:stop] = encoder.encode_video(clips)[: stop - start].to(torch.float16)
        if on_batch:
            on_batch(stop - start)
    return out


def shrunk_clips(padded, pad, levels, index, batch_size):
    """Every tile clip of `index` at tiles.REUSE_GRID x REUSE_GRID: float16 [M, T, 3, G, G] on padded's device."""
    grid, frames = tiles.REUSE_GRID, padded.shape[-1] // 3
    out = torch.empty(len(index[0]), frames, 3, grid, grid, dtype=torch.float16, device=padded.device)
    for start, stop, clips in tiles.crop_batches(padded, pad, levels, index, batch_size, grid):
        out[start:stop] = clips
    return out


@torch.inference_mode()
def encode_timestep(
    encoder,
    frames,
    levels,
    index,
    batch_size,
    device,
    fixed_batch,
    on_batch=None,
    reference=None,
    tolerance=REUSE_TOLERANCE,
):
    """All tile clips of one timestep through the encoder, or the embeddings of those that did not change.

    frames uint8 [C, 8, H, W, 3] (FrameReader's); index: tiles.tile_index tensors on `device`;
    fixed_batch, on_batch: as encode_tiles (on_batch is also told the reused clips). reference: None
    to encode every clip (--exact), else a dict kept across the timesteps of a run (empty at first)
    holding per tile the shrunken clip its embedding was encoded from, 'clips' float16 [M, 8, 3, G, G],
    and that embedding, 'embeddings' float16 [M, D]: a tile whose clip changed by at most `tolerance`
    (tiles.clip_change) keeps its embedding, the others are encoded and replace their entries.
    Returns (float16 [M, D] on `device` in tiles.tile_index order, reused bool [M] on `device`).
    """
    padded, pad = tiles.pad_frames(frames.to(device, non_blocking=True), levels)
    if reference is None:
        emb = encode_tiles(encoder, padded, pad, levels, index, batch_size, fixed_batch, on_batch)
        return emb, torch.zeros(len(emb), dtype=torch.bool, device=device)
    shrunk = shrunk_clips(padded, pad, levels, index, batch_size)
    if reference:
        reused = tiles.clip_change(shrunk, reference["clips"]) <= tolerance
    else:  # the run's first timestep, with no cached timestep before it: nothing to compare with
        reused = torch.zeros(len(shrunk), dtype=torch.bool, device=device)
        reference.update(
            clips=shrunk, embeddings=torch.empty(len(shrunk), encoder.dim, dtype=torch.float16, device=device)
        )
    changed = (~reused).nonzero()[:, 0]
    if on_batch:
        on_batch(len(shrunk) - len(changed))
    reference["clips"][changed] = shrunk[changed]
    reference["embeddings"][changed] = encode_tiles(
        encoder, padded, pad, levels, [x[changed] for x in index], batch_size, fixed_batch, on_batch
    )
    return reference["embeddings"].clone(), reused


@torch.inference_mode()
def resumed_reference(cache, seq_dir, meta, encoder, t, reader, levels, index, batch_size, device, reuse_tolerance):
    """What a reusing run starting at timestep t would hold had it also computed t - 1, read back
    from the cache when t - 1 is cached in a way this run accepts (written with its run_id and
    sources): (reference, source, run_ids) as extract_into keeps them (the shrunken clips of each
    tile's source timestep, made again from its frames by `reader`; the embeddings [M, D] float16
    of t - 1; each tile's source timestep, int [M]; {source timestep: run_id}), else None. So a
    resumed run reuses from its first timestep on, exactly as the interrupted run would have."""
    if t == 0:
        return None
    previous = feature_cache.make_config(encoder, seq_dir, meta, t - 1, reuse_tolerance)
    if not feature_cache.is_done(cache, t - 1, previous, log=lambda _: None):
        return None
    config = feature_cache.read_config(cache, t - 1)
    if config.get("layout") != feature_cache.OWN_ROWS:  # written before the sources were recorded
        return None
    source = np.concatenate(
        [feature_cache.read_sources(cache, t - 1, i).reshape(-1) for i in range(len(config["levels"]))]
    )
    clips = None
    for s in np.unique(source).tolist():  # in order: the reader decodes each image once
        rows = torch.from_numpy(np.nonzero(source == s)[0]).to(device)
        padded, pad = tiles.pad_frames(reader(s).to(device), levels)
        shrunk = shrunk_clips(padded, pad, levels, [x[rows] for x in index], batch_size)
        clips = shrunk.new_empty((len(source),) + shrunk.shape[1:]) if clips is None else clips
        clips[rows] = shrunk
    reference = {"clips": clips, "embeddings": feature_cache.load_tile_embeddings(cache, t - 1).to(device)}
    run_ids = {int(s): run_id for s, run_id in config["sources"].items()} | {t - 1: config["run_id"]}
    return reference, source, run_ids


def extract(seq_dir, encoder, timesteps, batch_size, device, progress=True, cache_root=None, reuse_tolerance=None):
    """Embed and cache `timesteps` (skipping finished ones) under cache_root (default: the sequence
    folder), holding the stage's lock of the cache folder (shared by the ranks of one torchrun job).
    reuse_tolerance: reuse the embeddings of clips that changed by at most this (encode_timestep),
    None: encode every clip. Returns stats: clips, seconds, timestep_seconds (per computed timestep), done (computed),
    skipped, cache, reused ({computed timestep: bool [M] numpy, which clips kept an earlier embedding}
    in tiles.tile_index order)."""
    meta = helpers.load_meta(seq_dir, "train")
    cache = cache_dir(cache_root or seq_dir, encoder.name)
    with helpers.stage_lock(cache, "extract_features", "; pass --cache-dir DIR to keep the features elsewhere"):
        feature_cache.claim_for_sequence(cache, seq_dir, meta)
        return extract_into(cache, seq_dir, meta, encoder, timesteps, batch_size, device, progress, reuse_tolerance)


def extract_into(cache, seq_dir, meta, encoder, timesteps, batch_size, device, progress, reuse_tolerance):
    """extract's work, in the cache folder it holds."""
    levels = tiles.tile_levels(meta["h"], meta["w"])
    index = [x.to(device) for x in tiles.tile_index(levels, len(meta["cam_id"]))]
    configs = {t: feature_cache.make_config(encoder, seq_dir, meta, t, reuse_tolerance) for t in timesteps}
    todo = [t for t in timesteps if not feature_cache.is_done(cache, t, configs[t])]
    for t in sorted(set(timesteps) - set(todo)):  # one that reuses embeddings of a timestep computed again goes too
        if {int(s) for s in (feature_cache.read_config(cache, t) or {}).get("sources", {})} & set(todo):
            todo.append(t)
    todo.sort()
    stats = {
        "clips": 0,
        "seconds": 0.0,
        "timestep_seconds": [],
        "done": len(todo),
        "skipped": len(timesteps) - len(todo),
        "cache": cache,
        "reused": {},
    }
    if not todo:
        return stats
    reader = FrameReader(seq_dir, meta, pin=device.type == "cuda")
    start = time.perf_counter()
    reference = None if reuse_tolerance is None else {}
    # per tile, the timestep whose folder holds its embedding (where it was encoded, stored once:
    # feature_cache.write_timestep), and the run_id each such timestep was written with
    source, run_ids = None, {}
    if reference is not None:
        resumed = resumed_reference(
            cache, seq_dir, meta, encoder, todo[0], reader, levels, index, batch_size, device, reuse_tolerance
        )
        if resumed:
            reference, source, run_ids = resumed
            if progress:
                print(
                    f"reuse goes on from the cached timestep {todo[0] - 1} ({len(run_ids)} source timesteps read again)"
                )
    bar = helpers.progress(total=len(todo) * len(index[0]), unit="clip", disable=not progress, smoothing=0.05)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as decoder:
        pending = decoder.submit(reader, todo[0])
        for i, t in enumerate(todo):
            t_start = time.perf_counter()
            bar.set_description(f"{encoder.name} t={t}")
            frames = pending.result()
            if i + 1 < len(todo):  # decode the next timestep's images while this one computes
                pending = decoder.submit(reader, todo[i + 1])
            emb, reused = encode_timestep(
                encoder,
                frames,
                levels,
                index,
                batch_size,
                device,
                fixed_batch=device.type == "cuda",
                on_batch=bar.update,
                reference=reference,
                tolerance=reuse_tolerance,
            )
            if not torch.isfinite(emb).all():  # never cache what would poison every later stage
                raise UserError(
                    f"timestep {t}: the {encoder.name} encoder returned NaN/Inf embeddings; nothing "
                    f"cached for it. Check the encoder's weights (--viclip-ckpt) and the images"
                )
            reused = reused.cpu().numpy()
            source = np.where(reused, source, t) if reused.any() else np.full(len(reused), t)
            run_ids[t] = feature_cache.write_timestep(cache, t, configs[t], emb.cpu().numpy(), source, run_ids)
            stats["timestep_seconds"].append(time.perf_counter() - t_start)
            stats["clips"] += len(index[0])
            stats["reused"][t] = reused
            if reference is not None and progress:
                bar.write(f"t={t}: {reused_share(stats['reused'], [t])} of the clips reused")
    bar.close()
    stats["seconds"] = time.perf_counter() - start
    return stats


def reused_share(reused, timesteps):
    """'12,345/15,444 (79.9%)': the clips of `timesteps` that kept an earlier embedding (extract's stats['reused'])."""
    n, total = sum(int(reused[t].sum()) for t in timesteps), sum(len(reused[t]) for t in timesteps)
    return f"{n:,}/{total:,} ({n / max(total, 1):.1%})"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=helpers.stage_description("extract_features.py") + " Embeds the multi-scale tile clips "
        "of every train camera and timestep with a video-language encoder and caches them (float16) "
        "under <seq>/interpolators/<encoder>/timestep_<t>/. Finished timesteps are skipped, so an "
        "interrupted run resumes. Several GPUs: torchrun --nproc_per_node=K extract_features.py -s SEQ "
        "(each rank takes a contiguous block of the timesteps)."
    )
    helpers.add_sequence_option(parser)
    parser.add_argument("-f", "--first", type=int, default=0, help="first timestep to embed (default: %(default)s)")
    parser.add_argument(
        "-l", "--last", type=int, default=None, help="last timestep to embed, inclusive (default: the sequence's last)"
    )
    parser.add_argument("--encoder", default="viclip", help=f"{ENCODER_HELP} (default: %(default)s)")
    parser.add_argument(
        "--viclip-ckpt",
        default=DEFAULT_CKPT,
        help="ViCLIP weights, ViClip-InternVid-10M-FLT.pth from huggingface.co/OpenGVLab/ViCLIP (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tile clips per encoder call (default: the encoder's own: 64 for viclip and openclip, "
        "which keeps an H100 busy; 512 for color); lower it if GPU memory runs out",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cuda, cuda:N or cpu (default: cuda if available; under torchrun cuda:LOCAL_RANK)",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip torch.compile of ViCLIP on CUDA: ~25 s less start-up, ~15%% slower encoding",
    )
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="run ViCLIP's video transformer matmuls (q/k/v, attention output, MLP) in FP8 (e4m3, "
        "per-channel weight and per-token activation scales) instead of bfloat16, for speed; the "
        "embeddings differ slightly and are cached apart from bfloat16 ones. Needs an NVIDIA GPU of "
        "compute capability >= 8.9 (Ada, Hopper) and --encoder viclip. Its accuracy was measured on "
        "random weights only: check the cosine to bfloat16 on your checkpoint with "
        "benchmarks/bench_viclip.py first",
    )
    parser.add_argument(
        "--reuse-tolerance",
        type=float,
        default=REUSE_TOLERANCE,
        help="keep a tile's embedding while its clip differs from the clip that embedding was "
        "encoded from by at most this: the largest change of one cell of one frame of the "
        f"tile shrunk to {tiles.REUSE_GRID}x{tiles.REUSE_GRID} cells, mean over RGB, pixel "
        "values in [0, 1] (default: %(default)s, 2.55 grey levels; 0: identical clips only)",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="encode every clip of every timestep, no reuse; timesteps a reusing run cached are computed again",
    )
    feature_cache.add_cache_dir_option(parser)
    args = parser.parse_args(argv)
    args.seq = helpers.find_sequence(args.seq)
    if args.cache_dir is not None:
        helpers.check_output("--cache-dir", args.cache_dir, "--cache-dir data/cache", folder=True)

    rank, world, local_rank = dist_rank()
    device = rank_device(args.device, world, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device.index)
    helpers.check_option(args, "batch_size", at_least=1)
    helpers.check_option(args, "reuse_tolerance", at_least=0)
    meta = helpers.load_meta(args.seq, "train")
    num_t = len(meta["fn"])
    last = num_t - 1 if args.last is None else args.last
    if not 0 <= args.first <= last < num_t:
        raise UserError(
            f"-f {args.first} -l {last}: {meta['path']} has timesteps 0..{num_t - 1}; "
            f"need 0 <= first <= last <= {num_t - 1}"
        )
    mine = shard(list(range(args.first, last + 1)), rank, world)
    if mine:  # every image the clips of these timesteps read, before hours of work
        helpers.check_sequence(
            args.seq, meta, max(0, mine[0] + tiles.CLIP_OFFSETS[0]), min(num_t - 1, mine[-1] + tiles.CLIP_OFFSETS[-1])
        )
    encoder = load_encoder(
        args.encoder, device, args.viclip_ckpt, compile=device.type == "cuda" and not args.no_compile, fp8=args.fp8
    )
    stats = extract(
        args.seq,
        encoder,
        mine,
        args.batch_size or encoder.batch_size,
        device,
        progress=rank == 0,
        cache_root=args.cache_dir,
        reuse_tolerance=None if args.exact else args.reuse_tolerance,
    )
    reused = f", {reused_share(stats['reused'], stats['reused'])} reused" if stats["done"] and not args.exact else ""
    rate = (
        f", {stats['clips'] / stats['seconds']:.1f} clips/s, median "
        f"{np.median(stats['timestep_seconds']):.1f} s/timestep"
        if stats["seconds"]
        else ""
    )
    who = f"rank {rank}/{world}: " if world > 1 else ""
    print(
        f"{who}embedded {stats['done']} timestep(s) ({stats['clips']} clips{reused}{rate}), {stats['skipped']} "
        f"already cached -> {stats['cache']}/timestep_<t>/"
    )


if __name__ == "__main__":
    helpers.run_main(main)
