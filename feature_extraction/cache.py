"""The Stage-2 cache: tile embeddings per timestep, float16, with the configuration beside them.

Layout (one folder per encoder and timestep; t not zero-padded, as in the original):
    <seq>/interpolators/<encoder>/timestep_<t>/config.json
    <seq>/interpolators/<encoder>/timestep_<t>/level_<i>.npy   float16 [C, rows_i, cols_i, D]
for the 5 levels i of tiles.tile_levels and the C train cameras in train_meta.json's order.
config.json holds everything the embeddings depend on (encoder and weights, image size, cameras,
tile geometry, the clip's frame indices, the sizes of its image files); a timestep counts as done
only when its folder exists and its config equals the one a new run would write, so any change
recomputes it. A timestep is written into a temporary folder and renamed into place, so a
half-written timestep is never seen.
"""
import glob
import json
import os
import shutil

import numpy as np
import torch

from feature_extraction import tiles
from helpers import UserError

FORMAT = 1


def cache_dir(seq_dir, encoder_name):
    """<seq_dir>/interpolators/<encoder_name>."""
    return os.path.join(seq_dir, "interpolators", encoder_name)


def timestep_dir(cache, t):
    return os.path.join(cache, f"timestep_{t}")


def make_config(encoder, seq_dir, meta, t):
    """The configuration timestep t of this sequence gets with this encoder (a JSON-able dict)."""
    h, w = meta["h"], meta["w"]
    frames = tiles.clip_frames(t, len(meta["fn"]))
    files = [[meta["fn"][f][c] for f in frames] for c in range(len(meta["cam_id"]))]
    sizes = [[os.path.getsize(os.path.join(seq_dir, "ims", fn)) for fn in row] for row in files]
    return {"format": FORMAT, "encoder": encoder.name, "encoder_identity": encoder.identity,
            "input_size": encoder.input_size, "dim": encoder.dim, "dtype": "float16",
            "width": w, "height": h, "cam_id": list(meta["cam_id"]), "timestep": t, "clip_frames": frames,
            # Sizes (not times) of the clip's images: a regenerated or edited sequence almost always
            # changes them, while copying the data elsewhere keeps them.
            "image_bytes": sizes, "levels": tiles.tile_levels(h, w)}


def read_config(cache, t):
    """config.json of a finished timestep, or None."""
    path = os.path.join(timestep_dir(cache, t), "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def is_done(cache, t, config):
    """Whether timestep t is cached with exactly this configuration."""
    return read_config(cache, t) == json.loads(json.dumps(config))  # JSON round trip: tuples -> lists


def write_timestep(cache, t, config, embeddings):
    """Write timestep t atomically. embeddings: float16-convertible [M, D] in tiles.tile_index order
    (level, camera, row, col)."""
    emb = np.asarray(embeddings, dtype=np.float16)
    final = timestep_dir(cache, t)
    for stale in glob.glob(os.path.join(cache, f".tmp_timestep_{t}_*")):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = os.path.join(cache, f".tmp_timestep_{t}_{os.getpid()}")
    os.makedirs(tmp)
    try:
        start, cams = 0, len(config["cam_id"])
        for i, lv in enumerate(config["levels"]):
            n = cams * lv["rows"] * lv["cols"]
            np.save(os.path.join(tmp, f"level_{i}.npy"), emb[start:start + n].reshape(cams, lv["rows"], lv["cols"], -1))
            start += n
        if start != len(emb):
            raise ValueError(f"{len(emb)} embeddings for {start} tiles")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checked_config(cache, t):
    config = read_config(cache, t)
    if config is None:
        raise UserError(f"{timestep_dir(cache, t)}: no cached tile embeddings for timestep {t}; run "
                        f"extract_features.py -s <seq> --encoder {os.path.basename(cache)} first")
    return config


def load_level(cache, t, i, mmap_mode=None):
    """float16 [C, rows, cols, D] of level i of timestep t."""
    return np.load(os.path.join(timestep_dir(cache, t), f"level_{i}.npy"), mmap_mode=mmap_mode)


def load_tile_embeddings(cache, t):
    """All tile embeddings of timestep t (every camera and level): float16 tensor [M, D]."""
    config = _checked_config(cache, t)
    return torch.cat([torch.from_numpy(load_level(cache, t, i)).flatten(0, 2) for i in range(len(config["levels"]))])


def dense_feature_map(cache, t, cam_index, height, width, device="cpu"):
    """Per-pixel features of camera cam_index (train_meta's order) at timestep t: float32
    [D, height, width] on `device`, the mean over levels of the bilinear interpolation of the tile
    centres (height x width other than the cached image size maps pixel centres onto it)."""
    config = _checked_config(cache, t)
    cams = len(config["cam_id"])
    if not 0 <= cam_index < cams:
        raise UserError(f"{timestep_dir(cache, t)}: camera index {cam_index} asked for, the cache holds {cams} cameras")
    grids = [load_level(cache, t, i, mmap_mode="r")[cam_index] for i in range(len(config["levels"]))]
    return tiles.dense_from_grids(grids, config["levels"], (config["height"], config["width"]), (height, width),
                                  torch.device(device))
