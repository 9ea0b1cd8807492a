"""Stage 4 of 4-LEGS: train the 768 -> 128 autoencoder on the cached tile embeddings of stage 3.

Trains on the tile-centre embeddings themselves (every tile of every camera and level), not on
interpolated full-resolution maps: those are bilinear blends of the same tiles, 400x more rows for
no new information. Trains on the timesteps stage 3 has cached (all of them, or --max-timesteps of
them evenly spaced) and says which it used and which are missing. Every --val-every-th of those is
held out for validation; the checkpoint with the lowest validation loss is kept at
`<seq>/ae/best_ckpt.pth` (written atomically, with the encoder name, layer sizes and the timesteps
used inside). --resume keeps a checkpoint trained with the same settings on timesteps whose features
are still cached as they were, also when stage 3 has cached more timesteps since (a sequence run on
to later timesteps keeps its autoencoder, and so stage 5 its finished timesteps).

    python train_autoencoder.py -s data/basketball --encoder viclip
    python train_autoencoder.py -s data/basketball --encoder viclip --max-timesteps 30
"""

import argparse
import math
import os
import time

import numpy as np
import torch

import helpers
from feature_extraction.autoencoder import ENCODER_DIMS, Autoencoder, ae_ckpt_path, ae_loss, save_autoencoder
from feature_extraction.cache import add_cache_dir_option, cache_identity, read_config
from feature_extraction.relevancy import feature_cache

# make demo on 2 CPU cores; fewer steps lose the colour encoder's small motion components
DEMO = {"epochs": 10, "tiles_per_epoch": 32768, "val_tiles": 4096}
EVAL_BATCH = 4096  # validation tiles per forward pass (no gradients: memory is the only limit)
# the options the checkpoint depends on: --resume keeps it only when these are the same
SETTINGS = ("epochs", "batch_size", "lr", "tiles_per_epoch", "val_every", "val_tiles", "max_timesteps", "seed")


def cached_timesteps(cache, num_t, max_timesteps=0):
    """(used, missing): the timesteps in 0..num_t-1 whose tile embeddings stage 3 has cached, at most
    max_timesteps of them (> 0) evenly spaced from the first to the last, and those not cached."""
    cached = [t for t in range(num_t) if read_config(cache, t) is not None]
    missing = [t for t in range(num_t) if t not in cached]
    if 0 < max_timesteps < len(cached):
        cached = [cached[i] for i in np.linspace(0, len(cached) - 1, max_timesteps).round().astype(int)]
    return cached, missing


def split_timesteps(timesteps, val_every):
    """(train, validation) lists of `timesteps`: every val_every-th of them is held out; fewer than
    val_every hold out the middle one when there are 3 or more, else validation reuses them all."""
    val = timesteps[val_every - 1 :: val_every]
    if not val and len(timesteps) >= 3:
        val = [timesteps[len(timesteps) // 2]]
    if not val:  # one or two timesteps: none to spare
        return list(timesteps), list(timesteps)
    return [t for t in timesteps if t not in val], val


def spans(timesteps):
    """'0-2, 5, 7-9' for [0, 1, 2, 5, 7, 8, 9]; 'none' for []."""
    runs = []
    for t in timesteps:
        if runs and t == runs[-1][1] + 1:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs) or "none"


def load_tiles(cache, timesteps, device):
    """All tile embeddings of these timesteps: [M, 768] float16 on `device`."""
    from feature_extraction import load_tile_embeddings

    tiles = [load_tile_embeddings(cache, t) for t in helpers.progress(timesteps, desc="loading tiles", leave=False)]
    return torch.cat([torch.as_tensor(x, dtype=torch.float16) for x in tiles]).to(device)


def evaluate(model, tiles, batch_size):
    """Mean loss and mean reconstruction cosine over tiles [M, 768] (eval mode)."""
    model.eval()
    loss_sum, cos_sum = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, tiles.shape[0], batch_size):
            x = tiles[start : start + batch_size].float()
            _, recon = model(x)
            loss_sum += float(ae_loss(recon, x)) * x.shape[0]
            cos_sum += float(torch.nn.functional.cosine_similarity(recon, x, dim=-1).sum())
    model.train()
    return loss_sum / tiles.shape[0], cos_sum / tiles.shape[0]


def train_epoch(model, optimizer, tiles, batch_size, generator, max_tiles=0):
    """One pass over the tiles (a random subset of max_tiles of them when > 0) in random order;
    returns the mean training loss."""
    order = torch.randperm(tiles.shape[0], generator=generator).to(tiles.device)
    if max_tiles > 0:
        order = order[:max_tiles]
    total, count = 0.0, 0
    for start in range(0, order.shape[0], batch_size):
        idx = order[start : start + batch_size]
        if idx.shape[0] < 2:  # BatchNorm needs two rows
            continue
        x = tiles[idx].float()
        _, recon = model(x)
        loss = ae_loss(recon, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total += float(loss.detach()) * x.shape[0]
        count += x.shape[0]
    return total / max(count, 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=helpers.stage_help("train_autoencoder.py", __doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    helpers.add_sequence_option(p)
    p.add_argument(
        "--encoder",
        required=True,
        help=f"the --encoder of {helpers.stage_name('extract_features.py')} "
        "(viclip, color, openclip:<arch>:<ckpt>): whose cache to train on; stored in the checkpoint, "
        "later stages check it",
    )
    p.add_argument("--epochs", type=int, default=10, help="passes over the training tiles (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="tiles per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=7e-4, help="Adam learning rate (default: %(default)s)")
    p.add_argument(
        "--tiles-per-epoch",
        type=int,
        default=0,
        help="train each epoch on a random subset of this many tiles (default: %(default)s = all)",
    )
    p.add_argument(
        "--val-every", type=int, default=5, help="hold out every N-th timestep for validation (default: %(default)s)"
    )
    p.add_argument(
        "--val-tiles",
        type=int,
        default=50000,
        help="validate on a fixed random subset of at most this many held-out tiles (default: %(default)s)",
    )
    p.add_argument(
        "--max-timesteps",
        type=int,
        default=0,
        help="train and validate on at most this many of the "
        "cached timesteps, evenly spaced (default: %(default)s = all cached ones)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the checkpoint when it was trained with the same "
        "settings on timesteps whose features are cached as they were, also when more are cached now "
        "(retraining it makes stage 5's finished timesteps stale); run_all.sh passes it",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    add_cache_dir_option(p)
    args = helpers.parse_with_demo(p, argv, DEMO)
    args.seq = helpers.find_sequence(args.seq)
    if (
        args.epochs < 1
        or args.batch_size < 2
        or args.val_every < 2
        or args.val_tiles < 1
        or args.tiles_per_epoch < 0
        or args.max_timesteps < 0
    ):
        raise helpers.UserError(
            "--epochs and --val-tiles must be >= 1, --batch-size and --val-every >= 2, "
            "--tiles-per-epoch and --max-timesteps >= 0"
        )
    helpers.check_option(args, "lr", above=0)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = helpers.pick_device(args.device)
    meta = helpers.load_meta(args.seq, "train")
    cache = feature_cache(args.cache_dir or args.seq, args.encoder, args.seq)
    path = ae_ckpt_path(args.cache_dir or args.seq)
    with helpers.stage_lock(
        os.path.dirname(path),
        "train_autoencoder",
        "; pass --cache-dir DIR (the one of stage 3) to keep the autoencoder elsewhere",
    ):
        used, missing = cached_timesteps(cache, len(meta["fn"]), args.max_timesteps)
        if not used:
            raise helpers.UserError(
                f"{cache}: no cached tile embeddings for any of the {len(meta['fn'])} timesteps: "
                + helpers.run_first(
                    "extract_features.py", f"python extract_features.py -s {args.seq} --encoder {args.encoder}"
                )
            )
        made_from = {
            "sequence": os.path.abspath(args.seq),
            "timesteps": used,
            "cache": cache_identity(cache, used),
            "settings": {k: getattr(args, k) for k in SETTINGS},
        }
        cached = len(meta["fn"]) - len(missing)
        sample = f" ({len(used)} of the {cached} cached: --max-timesteps)" if len(used) < cached else ""
        print(
            f"autoencoder: timesteps {spans(used)}{sample}; not cached by {helpers.stage_name('extract_features.py')}"
            f": {spans(missing)}"
        )
        if args.resume:
            before = trained_on(path)
            if still_fits(before, made_from, cache):
                added = [t for t in range(len(meta["fn"])) if t not in missing and t not in before["timesteps"]]
                since = (
                    f"; to train it on timesteps {spans(added)} too, cached since, run it without --resume "
                    "(stage 5's finished timesteps then go stale)"
                    if added
                    else ""
                )
                print(
                    f"autoencoder: {path} is trained with these settings on timesteps {spans(before['timesteps'])}, "
                    f"whose features are cached as they were: kept (--resume){since}"
                )
                return
            if before is not None:
                changed = ", ".join(k for k in made_from if before.get(k) != made_from[k])
                print(
                    f"autoencoder: {path} was trained on other {changed}: trained again (--resume keeps only a "
                    "checkpoint of the same features and settings)"
                )
        train(args, used, cache, path, device, made_from)


def still_fits(before, made_from, cache):
    """Whether a checkpoint made from `before` (its 'made_from') serves a run that would be made from
    `made_from`: the same sequence and settings, and the features of the timesteps it was trained
    on still cached as they were (stage 3 may have cached more timesteps since; one gone changes
    the fingerprint of their configs too)."""
    timesteps = (before or {}).get("timesteps")
    return (
        timesteps is not None
        and all(before.get(k) == made_from[k] for k in ("sequence", "settings"))
        and before.get("cache") == cache_identity(cache, timesteps)
    )


def trained_on(path):
    """What the checkpoint at `path` was made from, or None (no checkpoint, or not readable)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("made_from")
    except Exception:  # missing, truncated or foreign: trained again
        return None


def train(args, timesteps, cache, path, device, made_from):
    """Train on the tiles of `timesteps` in `cache` and save the checkpoint of the best epoch at `path`
    once training ends: an interrupted run leaves the finished checkpoint of an earlier run in place."""
    train_t, val_t = split_timesteps(timesteps, args.val_every)
    train_tiles, val_tiles = load_tiles(cache, train_t, device), load_tiles(cache, val_t, device)
    if train_tiles.shape[1] != ENCODER_DIMS[0]:
        raise helpers.UserError(
            f"{cache}: tile embeddings are {train_tiles.shape[1]}-d, the autoencoder takes {ENCODER_DIMS[0]}"
        )
    torch.manual_seed(args.seed)
    if val_tiles.shape[0] > args.val_tiles:
        val_tiles = val_tiles[torch.randperm(val_tiles.shape[0])[: args.val_tiles].to(device)]
    model = Autoencoder().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    best = None
    start = time.time()
    bar = helpers.progress(range(args.epochs), desc="autoencoder epochs")
    for epoch in bar:
        train_loss = train_epoch(model, optimizer, train_tiles, args.batch_size, generator, args.tiles_per_epoch)
        val_loss, val_cos = evaluate(model, val_tiles, EVAL_BATCH)
        if not math.isfinite(train_loss + val_loss):
            raise helpers.UserError(
                f"epoch {epoch + 1}: the loss is NaN/Inf (--lr {args.lr}); nothing saved, "
                f"{path} stays as it was; try a lower --lr"
            )
        if best is None or val_loss < best["val_loss"]:
            best = {"epoch": epoch + 1, "val_loss": val_loss, "val_cosine": val_cos}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(train_loss=f"{train_loss:.4f}", val_loss=f"{val_loss:.4f}", val_cos=f"{val_cos:.4f}")
    model.load_state_dict(best_state)
    save_autoencoder(
        path,
        model,
        args.encoder,
        train_timesteps=train_t,
        val_timesteps=val_t,
        seed=args.seed,
        made_from=made_from,
        **best,
    )
    held_out = f"held-out timesteps {spans(val_t)}" if val_t != train_t else "the training timesteps (too few to spare)"
    print(
        f"autoencoder: {train_tiles.shape[0]} training tiles (timesteps {spans(train_t)}), reconstruction cosine "
        f"{best['val_cosine']:.4f} on {val_tiles.shape[0]} tiles of {held_out} (best epoch {best['epoch']} of "
        f"{args.epochs}), {time.time() - start:.0f} s -> {path}"
    )


if __name__ == "__main__":
    helpers.run_main(main)
