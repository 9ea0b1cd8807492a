"""Stage 4 of 4-LEGS: train the 768 -> 128 autoencoder on the cached tile embeddings of stage 3.

Trains on the tile-centre embeddings themselves (every tile of every camera and level), not on
interpolated full-resolution maps: those are bilinear blends of the same tiles, 400x more rows for
no new information. Every --val-every-th timestep is held out for validation; the checkpoint with
the lowest validation loss is kept at `<seq>/ae/best_ckpt.pth` (written atomically, with the
encoder name and layer sizes inside).

    python train_autoencoder.py -s data/basketball --encoder viclip
"""
import argparse
import math
import os
import time

import torch

import helpers
from feature_extraction.autoencoder import Autoencoder, ae_ckpt_path, ae_loss, save_autoencoder
from feature_extraction.cache import add_cache_dir_option, cache_identity
from feature_extraction.relevancy import feature_cache

# make demo on 2 CPU cores; fewer steps lose the colour encoder's small motion components
DEMO = {"epochs": 10, "tiles_per_epoch": 32768, "val_tiles": 4096}
EVAL_BATCH = 4096  # validation tiles per forward pass (no gradients: memory is the only limit)


def split_timesteps(num_t, val_every):
    """(train, validation) timestep lists: every val_every-th timestep (t % val_every == val_every-1)
    is held out; with one timestep there is nothing to hold out and validation reuses it."""
    val = [t for t in range(num_t) if t % val_every == val_every - 1]
    train = [t for t in range(num_t) if t not in val]
    if not train or not val:
        return list(range(num_t)), list(range(num_t))
    return train, val


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
            x = tiles[start:start + batch_size].float()
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
        idx = order[start:start + batch_size]
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
    p = argparse.ArgumentParser(description=helpers.stage_help("train_autoencoder.py", __doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    helpers.add_sequence_option(p)
    p.add_argument("--encoder", required=True, help=f"the --encoder of {helpers.stage_name('extract_features.py')} "
                   "(viclip, color, openclip:<arch>:<ckpt>): whose cache to train on; stored in the checkpoint, "
                   "later stages check it")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training tiles (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="tiles per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=7e-4, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--tiles-per-epoch", type=int, default=0, help="train each epoch on a random subset "
                   "of this many tiles (default: %(default)s = all)")
    p.add_argument("--val-every", type=int, default=5, help="hold out every N-th timestep for validation "
                   "(default: %(default)s)")
    p.add_argument("--val-tiles", type=int, default=50000, help="validate on a fixed random subset of at "
                   "most this many held-out tiles (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    add_cache_dir_option(p)
    args = helpers.parse_with_demo(p, argv, DEMO)
    args.seq = helpers.find_sequence(args.seq)
    if args.epochs < 1 or args.batch_size < 2 or args.val_every < 2 or args.val_tiles < 1 or args.tiles_per_epoch < 0:
        raise helpers.UserError("--epochs and --val-tiles must be >= 1, --batch-size and --val-every >= 2, "
                                "--tiles-per-epoch >= 0")
    helpers.check_option(args, "lr", above=0)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = helpers.pick_device(args.device)
    meta = helpers.load_meta(args.seq, "train")
    cache = feature_cache(args.cache_dir or args.seq, args.encoder, args.seq)
    path = ae_ckpt_path(args.cache_dir or args.seq)
    with helpers.stage_lock(os.path.dirname(path), "train_autoencoder",
                            "; pass --cache-dir DIR (the one of stage 3) to keep the autoencoder elsewhere"):
        train(args, meta, cache, path, device)


def train(args, meta, cache, path, device):
    """Train on the tiles of `cache` and save the checkpoint of the best epoch at `path` once
    training ends: an interrupted run leaves the finished checkpoint of an earlier run in place."""
    train_t, val_t = split_timesteps(len(meta["fn"]), args.val_every)
    train_tiles, val_tiles = load_tiles(cache, train_t, device), load_tiles(cache, val_t, device)
    if train_tiles.shape[1] != 768:
        raise helpers.UserError(f"{cache}: tile embeddings are {train_tiles.shape[1]}-d, the autoencoder takes 768")
    torch.manual_seed(args.seed)
    if val_tiles.shape[0] > args.val_tiles:
        val_tiles = val_tiles[torch.randperm(val_tiles.shape[0])[:args.val_tiles].to(device)]
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
            raise helpers.UserError(f"epoch {epoch + 1}: the loss is NaN/Inf (--lr {args.lr}); nothing saved, "
                                    f"{path} stays as it was; try a lower --lr")
        if best is None or val_loss < best["val_loss"]:
            best = {"epoch": epoch + 1, "val_loss": val_loss, "val_cosine": val_cos}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(train_loss=f"{train_loss:.4f}", val_loss=f"{val_loss:.4f}", val_cos=f"{val_cos:.4f}")
    model.load_state_dict(best_state)
    save_autoencoder(path, model, args.encoder, train_timesteps=train_t, val_timesteps=val_t, seed=args.seed,
                     made_from={"sequence": os.path.abspath(args.seq),
                                "cache": cache_identity(cache, range(len(meta["fn"])))}, **best)
    held_out = "held-out timesteps" if val_t != train_t else "the training timestep (only one)"
    print(f"autoencoder: {train_tiles.shape[0]} training tiles ({len(train_t)} timesteps), reconstruction cosine "
          f"{best['val_cosine']:.4f} on {val_tiles.shape[0]} tiles of {held_out} (best epoch {best['epoch']} of "
          f"{args.epochs}), {time.time() - start:.0f} s -> {path}")


if __name__ == "__main__":
    helpers.run_main(main)
