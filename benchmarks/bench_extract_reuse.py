"""Stage 3 (extract_features.py) reusing the embeddings of unchanged tile clips, against encoding every clip.

    python benchmarks/bench_extract_reuse.py --seq data/basketball -f 0 -l 9 --encoder viclip-random
    python benchmarks/bench_extract_reuse.py --seq data/basketball -f 0 -l 9 --viclip-ckpt PATH
    python benchmarks/bench_extract_reuse.py --seq data/synthetic --encoder color --device cpu -l 7

Extracts timesteps first..last twice, into fresh cache folders under --work: exact (every clip
encoded, as --exact) and reusing (--reuse-tolerance, as a plain run), and reports:
  reused   the share of clips that kept an earlier embedding, per timestep, per tile level and
           overall (also without the run's first timestep, which has nothing to compare with)
  cosine   of each reused embedding against the exact run's (mean, min, 0.1% quantile), and the
           min over the re-encoded ones (equal up to the order of floating-point sums); also
           centred (both minus the exact run's mean embedding of the timestep) and, as the floor
           either is read against, the same between unrelated clips (each clip against a random
           other clip of its timestep): random ViCLIP weights map every clip near one direction,
           so their plain cosines sit near 1 even for unrelated clips; the centred ones do not
  disk     the bytes of each run's cache (the reusing one stores a reused embedding once, where
           it was encoded), and the seconds to read its last timestep camera by camera, as stage 5
  time     of each run (CUDA events on a GPU, the wall clock on a CPU; the encoder warmed up and
           compiled before either), per timestep, and the speed-up
  sweep    per --sweep tolerance the same share and cosines, replayed from the exact run's
           embeddings and the tiles' shrunken clips (what a run with that tolerance keeps, without
           encoding anything again; its row at --reuse-tolerance repeats the measured run's)
With --shares-only, only the sweep's shares of reused clips, from the pixels alone (which clips a
run reuses does not depend on the encoder): no encoder, no caches, any number of timesteps.
Prints a table and writes every figure to --json (after each step, so a cut-off run keeps them).
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import extract_features
import helpers
from feature_extraction import DEFAULT_CKPT, ENCODER_HELP, ViCLIP, cache_dir, load_encoder, load_tile_embeddings, tiles
from feature_extraction import cache as feature_cache


def build_encoder(spec, device, ckpt, compile):
    """load_encoder's encoder, or with spec 'viclip-random' ViCLIP of the real size with random weights
    (bfloat16 on CUDA), as the other stage-3 benchmarks use it without the checkpoint."""
    if spec != "viclip-random":
        return load_encoder(spec, device, ckpt, compile=compile)
    torch.manual_seed(0)
    with torch.device(device):
        model = ViCLIP().reset_parameters().eval().requires_grad_(False)
    if device.type == "cuda":
        model.to(torch.bfloat16)
    return model.compile_video() if compile else model


def timed(fn, device):
    """(fn(), seconds): CUDA events on a GPU, else the wall clock."""
    if device.type != "cuda":
        start = time.perf_counter()
        return fn(), time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end) / 1000


def cosine_summary(cos):
    """{'n', 'mean', 'min', 'q001'} of a float32 tensor of cosines (None for none)."""
    if not len(cos):
        return {"n": 0, "mean": None, "min": None, "q001": None}
    return {
        "n": len(cos),
        "mean": cos.mean().item(),
        "min": cos.min().item(),
        "q001": torch.quantile(cos[: 2**24].double(), 0.001).item(),
    }


def centred_cosine(a, b, centre):
    """Cosine [M] of the rows of a and b [M, D] after subtracting centre [D] from both."""
    return F.cosine_similarity(a - centre, b - centre)


def unrelated_pairs(num_clips, seed=0):
    """A permutation [M] with no fixed point: clip i is paired with clip pairs[i] != i."""
    perm = torch.randperm(num_clips, generator=torch.Generator().manual_seed(seed))
    return torch.where(perm == torch.arange(num_clips), (perm + 1) % num_clips, perm)


def replay(seq, meta, timesteps, exact, tolerances, batch_size, device):
    """Per tolerance, what a reusing run keeps: the rule of extract_features.encode_timestep (a tile
    keeps the embedding of the clip it was last encoded from while its clip stays within the
    tolerance of that one) applied to the shrunken clips, the embeddings taken from the exact run.
    Returns {tolerance: (reused bool [T, M], cosine to the exact embedding [T, M], the same centred
    on the exact run's mean embedding of the timestep [T, M])}; exact None: the shares alone, the
    cosines None."""
    levels = tiles.tile_levels(meta["h"], meta["w"])
    index = [x.to(device) for x in tiles.tile_index(levels, len(meta["cam_id"]))]
    reader = extract_features.FrameReader(seq, meta)
    state = {tol: None for tol in tolerances}  # tolerance -> (reference clips, reference embeddings)
    out = {tol: ([], [], []) for tol in tolerances}
    for t in timesteps:
        padded, pad = tiles.pad_frames(reader(t).to(device), levels)
        shrunk = extract_features.shrunk_clips(padded, pad, levels, index, batch_size)
        emb = load_tile_embeddings(exact, t).to(device).float() if exact else shrunk.new_zeros(len(shrunk), 0)
        for tol in tolerances:
            if state[tol] is None:  # the run's first timestep encodes every clip
                state[tol] = (shrunk.clone(), emb.clone())
            ref_clips, ref_emb = state[tol]
            reused = (tiles.clip_change(shrunk, ref_clips) <= tol) & (t != timesteps[0])
            ref_clips[~reused], ref_emb[~reused] = shrunk[~reused], emb[~reused]
            out[tol][0].append(reused.cpu())
            if exact:
                out[tol][1].append(F.cosine_similarity(ref_emb, emb).cpu())
                out[tol][2].append(centred_cosine(ref_emb, emb, emb.mean(0)).cpu())
    return {tol: tuple(torch.stack(x) if x else None for x in lists) for tol, lists in out.items()}


def percent(share):
    return "-" if share is None else f"{share:.1%}"


def cosines(summary):
    """'mean 0.99990, min 0.99500, 0.1% quantile 0.99700 (1234 clips)' of cosine_summary's dict."""
    if not summary["n"]:
        return "no clips"
    return (
        f"mean {summary['mean']:.5f}, min {summary['min']:.5f}, 0.1% quantile {summary['q001']:.5f} "
        f"({summary['n']} clips)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seq",
        required=True,
        help="a sequence folder (PanopticSports layout), or its name "
        f"under {helpers.DATA_DIR}/ (as the stage scripts' -s)",
    )
    parser.add_argument("-f", "--first", type=int, default=0, help="first timestep (default: %(default)s)")
    parser.add_argument("-l", "--last", type=int, default=9, help="last timestep, inclusive (default: %(default)s)")
    parser.add_argument(
        "--encoder",
        default="viclip-random",
        help=f"viclip-random (the real size, random weights) or {ENCODER_HELP} (default: %(default)s)",
    )
    parser.add_argument("--viclip-ckpt", default=DEFAULT_CKPT, help="with --encoder viclip (default: %(default)s)")
    parser.add_argument(
        "--reuse-tolerance",
        type=float,
        default=extract_features.REUSE_TOLERANCE,
        help="the reusing run's (default: extract_features.REUSE_TOLERANCE = %(default)s)",
    )
    parser.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        default=[0.0, 0.005, 0.01, 0.02, 0.04],
        help="tolerances replayed from the exact run (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="clips per encoder call (default: the encoder's)")
    parser.add_argument(
        "--shares-only",
        action="store_true",
        help="only the --sweep tolerances' shares of reused clips, from the pixels (no encoder, no caches)",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of ViCLIP on CUDA")
    parser.add_argument(
        "--work", default=None, help="folder for the two caches (default: a temporary one in results/, removed)"
    )
    parser.add_argument(
        "--json", default="results/bench_extract_reuse.json", help="where all figures go (default: %(default)s)"
    )
    args = parser.parse_args()
    args.seq = helpers.find_sequence(args.seq)
    device = helpers.pick_device(args.device)
    meta = helpers.load_meta(args.seq, "train")
    num_t = len(meta["fn"])
    if not 0 <= args.first <= args.last < num_t:
        raise helpers.UserError(
            f"-f {args.first} -l {args.last}: {meta['path']} has timesteps 0..{num_t - 1}; "
            f"need 0 <= first <= last <= {num_t - 1}"
        )
    if not args.sweep and args.shares_only:
        raise helpers.UserError("--shares-only needs at least one --sweep tolerance")
    timesteps = list(range(args.first, args.last + 1))
    if args.shares_only:
        return reused_shares(args, meta, timesteps, device)
    encoder = build_encoder(args.encoder, device, args.viclip_ckpt, device.type == "cuda" and not args.no_compile)
    batch = args.batch_size or encoder.batch_size
    os.makedirs("results", exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="bench_extract_reuse_", dir="results")
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "encoder": encoder.identity,
        "seq": os.path.abspath(args.seq),
        "timesteps": timesteps,
        "batch_size": batch,
        "cameras": len(meta["cam_id"]),
        "reuse_tolerance": args.reuse_tolerance,
        "reuse_grid": tiles.REUSE_GRID,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }

    def save():
        helpers.save_json(args.json, res)

    # warm up (and compile) on one full batch, the shape every later call has on CUDA
    zeros = torch.zeros(batch, 8, 3, encoder.input_size, encoder.input_size, device=device)
    _, res["warmup_s"] = timed(lambda: encoder.encode_video(zeros), device)
    runs = {}
    for name, tol in (("exact", None), ("reuse", args.reuse_tolerance)):
        root = os.path.join(work, name)
        shutil.rmtree(root, ignore_errors=True)  # timed from scratch
        runs[name], sec = timed(
            lambda: extract_features.extract(
                args.seq, encoder, timesteps, batch, device, progress=True, cache_root=root, reuse_tolerance=tol
            ),
            device,
        )
        res[name] = {
            "seconds": sec,
            "timestep_seconds": runs[name]["timestep_seconds"],
            "clips_per_s": runs[name]["clips"] / sec,
        }
        print(
            f"{name}: {sec:.1f} s for {len(timesteps)} timestep(s) ({runs[name]['clips'] / sec:.1f} clips/s)",
            flush=True,
        )
        save()
    exact, reuse = (cache_dir(os.path.join(work, name), encoder.name) for name in ("exact", "reuse"))

    levels = tiles.tile_levels(meta["h"], meta["w"])
    level = tiles.tile_index(levels, len(meta["cam_id"]))[0].numpy()
    reused = np.stack([runs["reuse"]["reused"][t] for t in timesteps])  # [T, M]
    pairs = unrelated_pairs(len(level))
    cos, centred, unrelated, unrelated_centred = [], [], [], []  # each [T, M] once stacked
    for t in timesteps:
        e, r = (load_tile_embeddings(c, t).float() for c in (exact, reuse))
        mean, other = e.mean(0), e[pairs]
        cos.append(F.cosine_similarity(e, r))
        centred.append(centred_cosine(e, r, mean))
        unrelated.append(F.cosine_similarity(e, other))
        unrelated_centred.append(centred_cosine(e, other, mean))
    cos, centred, unrelated, unrelated_centred = map(torch.stack, (cos, centred, unrelated, unrelated_centred))
    mask = torch.from_numpy(reused)
    res["reused"] = {
        "per_timestep": dict(zip(timesteps, reused.mean(1).tolist())),
        "overall": reused.mean().item(),
        "after_first": reused[1:].mean().item() if len(timesteps) > 1 else None,
        "per_level_after_first": [
            reused[1:, level == i].mean().item() if len(timesteps) > 1 else None for i in range(len(levels))
        ],
    }
    res["cosine_reused"] = cosine_summary(cos[mask])
    res["cosine_encoded"] = cosine_summary(cos[~mask])
    res["cosine_reused_centred"] = cosine_summary(centred[mask])
    res["cosine_unrelated"] = cosine_summary(unrelated.flatten())
    res["cosine_unrelated_centred"] = cosine_summary(unrelated_centred.flatten())
    res["speedup"] = res["exact"]["seconds"] / res["reuse"]["seconds"]
    res["disk_bytes"] = {name: folder_bytes(c) for name, c in (("exact", exact), ("reuse", reuse))}
    # reading a timestep as stage 5 does, every camera's levels one by one (a reused embedding from
    # the folder of the timestep that encoded it)
    _, res["read_last_timestep_s"] = timed(
        lambda: [
            feature_cache.load_level(reuse, timesteps[-1], i, c)
            for c in range(len(meta["cam_id"]))
            for i in range(len(levels))
        ],
        torch.device("cpu"),
    )
    save()

    tolerances = sorted(set(args.sweep) | {args.reuse_tolerance})
    replayed = replay(args.seq, meta, timesteps, exact, tolerances, batch, device)
    res["sweep"] = {}
    for tol, (kept, kept_cos, kept_centred) in replayed.items():
        res["sweep"][tol] = {
            "reused": kept.float().mean().item(),
            "reused_after_first": kept[1:].float().mean().item() if len(timesteps) > 1 else None,
            "cosine_reused": cosine_summary(kept_cos[kept]),
            "cosine_reused_centred": cosine_summary(kept_centred[kept]),
        }
    save()

    print(
        f"\n{res['device']}, {res['cameras']} cameras, timesteps {args.first}..{args.last}, {args.encoder}, "
        f"tolerance {args.reuse_tolerance}"
    )
    print(
        f"reused: {percent(res['reused']['overall'])} of the clips, {percent(res['reused']['after_first'])} after "
        f"the first timestep (per level: {', '.join(percent(x) for x in res['reused']['per_level_after_first'])})"
    )
    print(
        f"cosine of reused against recomputed: {cosines(res['cosine_reused'])}; of the re-encoded: "
        f"{cosines(res['cosine_encoded'])}"
    )
    print(f"the same centred: {cosines(res['cosine_reused_centred'])}")
    print(
        f"unrelated clips (the floor): {cosines(res['cosine_unrelated'])}; centred "
        f"{cosines(res['cosine_unrelated_centred'])}"
    )
    print(
        f"time: exact {res['exact']['seconds']:.1f} s, reusing {res['reuse']['seconds']:.1f} s (x{res['speedup']:.2f})"
    )
    print(
        f"disk: exact {res['disk_bytes']['exact']:,} B, reusing {res['disk_bytes']['reuse']:,} B; reading the last "
        f"timestep camera by camera {res['read_last_timestep_s']:.2f} s"
    )
    print("\n| tolerance | reused | after the first timestep | cosine of the reused | centred |\n|---|---|---|---|---|")
    for tol, row in res["sweep"].items():
        print(
            f"| {tol} | {percent(row['reused'])} | {percent(row['reused_after_first'])} | "
            f"{cosines(row['cosine_reused'])} | {cosines(row['cosine_reused_centred'])} |"
        )
    print(f"figures -> {args.json}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def reused_shares(args, meta, timesteps, device):
    """--shares-only: per --sweep tolerance the share of clips a run over `timesteps` reuses."""
    tolerances = sorted(set(args.sweep))
    res = {"device": str(device), "seq": os.path.abspath(args.seq), "timesteps": [timesteps[0], timesteps[-1]]}
    res["command"], res["sweep"] = " ".join(sys.argv), {}
    replayed = replay(args.seq, meta, timesteps, None, tolerances, args.batch_size or 64, device)
    print("\n| tolerance | reused | after the first timestep | per timestep after the first: min / median / max |")
    print("|---|---|---|---|")
    for tol, (kept, _, _) in replayed.items():
        per_t = kept[1:].float().mean(1)
        res["sweep"][tol] = {
            "reused": kept.float().mean().item(),
            "reused_after_first": per_t.mean().item() if len(per_t) else None,
            "per_timestep": kept.float().mean(1).tolist(),
        }
        spread = " / ".join(percent(x) for x in (per_t.min(), per_t.median(), per_t.max())) if len(per_t) else "-"
        after_first = percent(res["sweep"][tol]["reused_after_first"])
        print(f"| {tol} | {percent(kept.float().mean())} | {after_first} | {spread} |")
    helpers.save_json(args.json, res)
    print(f"figures -> {args.json}")


def folder_bytes(folder):
    """Bytes of the files under `folder`."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


if __name__ == "__main__":
    helpers.run_main(main)
