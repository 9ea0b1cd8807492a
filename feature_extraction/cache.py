"""The stage-3 cache (extract_features.py): tile embeddings per timestep, int8 with a scale per
embedding (helpers.quantize_rows: cosine to float16 above 0.9999, half float16's bytes), with the
configuration beside them.

Layout (one folder per encoder and timestep; t not zero-padded, as in the original):
    <seq>/interpolators/<encoder>/timestep_<t>/config.json
    <seq>/interpolators/<encoder>/timestep_<t>/level_<i>_sources.npy  int32 [C, rows_i, cols_i]
    <seq>/interpolators/<encoder>/timestep_<t>/level_<i>.npy          int8 [n_i, D]
    <seq>/interpolators/<encoder>/timestep_<t>/level_<i>_scales.npy   float32 [n_i]
for the 5 levels i of tiles.tile_levels and the C train cameras in train_meta.json's order. A
tile's source is the timestep whose folder holds its embedding: this one for the n_i tiles it
encoded (their rows in (camera, row, col) order), an earlier one of the same run for a tile whose
embedding extract_features.py reused, which is stored once, where it was encoded (config.json's
`layout` "own_rows"; its `run_id`, and `sources` {timestep: run_id} of the folders it reads, so a
source computed again since, or deleted, is noticed: the timestep counts as not done, and reading
it says so). Timesteps written before are read as they are and count as done: every tile's row
in the folder (int8 level_<i>.npy [C, rows_i, cols_i, D] with scales [C, rows_i, cols_i]; config
dtype "float16": float16 level files, no scales).
config.json holds everything the embeddings depend on (encoder and weights, image size, cameras,
tile geometry, the clip's frame indices, the sizes of its image files); a timestep counts as done
only when its folder exists, its config equals the one a new run would write and its level files
are whole, so any change or damage recomputes it. Its `reuse` entry says how the embeddings were
made: null when every clip was encoded (--exact, and caches written before reuse existed), else
{"tolerance", "grid"} of extract_features.py's reuse of unchanged clips. That entry alone need not
be equal: a timestep serves a run that asks for at most its exactness (reuse_serves: exact ones
serve every run, reused ones a run reusing with the same grid and at least their tolerance), so
--exact recomputes what a reusing run wrote and a reusing run keeps exact timesteps. A timestep is
written into a temporary folder and renamed into place, so a half-written timestep is never seen.
With --cache-dir DIR, DIR takes the place of <seq>; <cache>/sequence.json says which sequence the
features are of.
"""

import functools
import json
import os
import shutil
import uuid

import numpy as np
import torch

import helpers
from feature_extraction import tiles
from helpers import UserError

FORMAT = 1
ENCODE_ROWS = 65536  # pixels through dense_feature_map's `encode` per call (bounded memory at any size)
DTYPES = ("int8", "float16")  # how level files store the embeddings: what is written, what is still read
OWN_ROWS = "own_rows"  # config.json's layout of the folders written now (module docstring)


def cache_dir(seq_dir, encoder_name):
    """<seq_dir>/interpolators/<encoder_name>."""
    return os.path.join(seq_dir, "interpolators", encoder_name)


def add_cache_dir_option(parser):
    """--cache-dir of the stages that write (3, 4) or read (5, 6) the tile features and the autoencoder."""
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="folder for the tile features (interpolators/<encoder>/) and the autoencoder (ae/) "
        "instead of the sequence folder, e.g. when that cannot be written; give every stage "
        "from 3 on the same (default: the sequence folder)",
    )


def timestep_dir(cache, t):
    return os.path.join(cache, f"timestep_{t}")


def make_config(encoder, seq_dir, meta, t, reuse_tolerance=None):
    """The configuration timestep t of this sequence gets with this encoder (a JSON-able dict);
    reuse_tolerance: that of extract_features.py's reuse of unchanged clips, None for --exact."""
    h, w = meta["h"], meta["w"]
    frames = tiles.clip_frames(t, len(meta["fn"]))
    files = [[meta["fn"][f][c] for f in frames] for c in range(len(meta["cam_id"]))]
    sizes = [[os.path.getsize(os.path.join(seq_dir, "ims", fn)) for fn in row] for row in files]
    return {
        "format": FORMAT,
        "encoder": encoder.name,
        "encoder_identity": encoder.identity,
        "input_size": encoder.input_size,
        "dim": encoder.dim,
        "dtype": DTYPES[0],
        "width": w,
        "height": h,
        "cam_id": list(meta["cam_id"]),
        "timestep": t,
        "clip_frames": frames,
        # Sizes (not times) of the clip's images: a regenerated or edited sequence almost always
        # changes them, while copying the data elsewhere keeps them.
        "image_bytes": sizes,
        "levels": tiles.tile_levels(h, w),
        "reuse": None if reuse_tolerance is None else {"tolerance": reuse_tolerance, "grid": tiles.REUSE_GRID},
    }


def claim_for_sequence(cache, seq_dir, meta):
    """Refuse a cache folder that holds the features of another sequence (a --cache-dir shared by two),
    and record in <cache>/sequence.json which sequence (helpers.sequence_identity) it is of: another
    folder whose metas or init_pt_cld.npz differ. The same sequence moved, or its images changed,
    passes: each timestep's config decides what is computed again."""
    path = os.path.join(cache, "sequence.json")
    recorded, current = helpers.read_json(path), helpers.sequence_identity(seq_dir, [meta])
    if isinstance(recorded, dict) and recorded.get("path") != current["path"]:
        why, _ = helpers.sequence_mismatch(recorded, seq_dir, [meta], num_t=0)
        if why:
            raise UserError(f"{cache}: its features {why}; give each sequence its own --cache-dir")
    if recorded != current:
        helpers.save_json(path, current)


def read_config(cache, t):
    """config.json of a finished timestep, or None (also for one that is not a dict, or says OWN_ROWS
    without its run_id and sources: a damaged folder, computed again by the next run)."""
    path = os.path.join(timestep_dir(cache, t), "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict) or (
        config.get("layout") == OWN_ROWS
        and not (isinstance(config.get("run_id"), str) and isinstance(config.get("sources"), dict))
    ):
        return None
    return config


def is_done(cache, t, config, log=print):
    """Whether timestep t is cached with this configuration (its `reuse` at most as lax, see
    reuse_serves) and whole level files (a damaged one is reported through log and counts as not done)."""
    recorded, wanted = read_config(cache, t), json.loads(json.dumps(config))  # JSON round trip: tuples -> lists
    if recorded is None or not reuse_serves(recorded.pop("reuse", None), wanted.pop("reuse", None)):
        return False
    if recorded.get("dtype") in DTYPES:  # the same embeddings in either storage
        recorded["dtype"] = wanted["dtype"]
    sources = recorded.pop("sources", {})
    for key in ("layout", "run_id"):
        recorded.pop(key, None)
    if recorded != wanted:
        return False
    damage = damaged_level(cache, t, config) or lost_source(cache, t, sources)
    if damage:
        log(f"{damage}: computing timestep {t} again")
    return not damage


def lost_source(cache, t, sources):
    """'' when every timestep in `sources` ({timestep: run_id}, config.json's) still holds what
    timestep t reused from it, else what is wrong."""
    for s, run_id in sources.items():
        if written_run(cache, int(s)) != run_id:
            return (
                f"{timestep_dir(cache, t)} reuses embeddings of timestep {s}, which was computed again since or deleted"
            )
    return ""


def written_run(cache, t):
    """The run_id timestep t's folder was written with (None: missing, or written before run ids),
    read once per version of its config.json (a timestep's readers ask for it again and again)."""
    path = os.path.join(timestep_dir(cache, t), "config.json")
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _run_of_config(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _run_of_config(path, mtime_ns, size):
    try:
        with open(path) as f:
            return json.load(f).get("run_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def reuse_serves(cached, wanted):
    """Whether embeddings made with the `reuse` entry `cached` may stand for those a run with `wanted`
    would make (None: every clip encoded): exact ones always, reused ones only for a run that reuses
    with the same grid and a tolerance at least theirs."""
    return cached is None or (
        wanted is not None and cached["grid"] == wanted["grid"] and cached["tolerance"] <= wanted["tolerance"]
    )


def level_files(cache, t, i, config):
    """{path: dtype of its array} of the files of level i of timestep t, whose config.json is `config`:
    the embeddings (int8, or float16 as stored before), their scales (int8), their sources (OWN_ROWS)."""
    path = os.path.join(timestep_dir(cache, t), f"level_{i}.npy")
    if config["dtype"] == "float16":
        return {path: "float16"}
    files = {path: "int8", path.replace(".npy", "_scales.npy"): "float32"}
    if config.get("layout") == OWN_ROWS:
        files[path.replace(".npy", "_sources.npy")] = "int32"
    return files


def damaged_level(cache, t, config):
    """What is wrong with the level files of timestep t ('' when each has the header of the shape of
    `config`, of the dtype its config.json says, and all its bytes; the values are checked where
    they are read)."""
    cams, stored = len(config["cam_id"]), _checked_config(cache, t)
    for i, lv in enumerate(config["levels"]):
        grid = (cams, lv["rows"], lv["cols"])
        own = None  # (OWN_ROWS) how many tiles this timestep encoded: the rows of its level files
        for path, dtype in reversed(level_files(cache, t, i, stored).items()):  # the sources first
            want = (grid if own is None else (own,)) + ((config["dim"],) if dtype in ("int8", "float16") else ())
            try:
                level = np.load(path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:
                return f"{path} is damaged ({type(e).__name__}: {e})"
            if level.dtype != dtype or level.shape != want:
                return f"{path} is damaged (it holds {level.dtype} {list(level.shape)}, not {dtype} {list(want)})"
            if dtype == "int32":
                own = int((level == t).sum())
                unknown = set(np.unique(level).tolist()) - {t} - {int(x) for x in stored.get("sources", {})}
                if unknown:
                    return f"{path} is damaged (it names timesteps {sorted(unknown)} that config.json does not)"
    return ""


def cache_identity(cache, timesteps):
    """What the cached features of `timesteps` are, for the provenance of what is trained on them:
    {'path': absolute, 'fingerprint': of their config.json files}."""
    configs = [read_config(cache, t) for t in timesteps]
    return {"path": os.path.abspath(cache), "fingerprint": helpers.fingerprint(*configs)}


def write_timestep(cache, t, config, embeddings, sources=None, source_runs=None):
    """Write timestep t atomically; returns its run_id. embeddings: float [M, D] in tiles.tile_index
    order (level, camera, row, col); sources: int [M], the timestep whose folder holds each one
    (None: all this one), stored here only where it is t; source_runs: {timestep: run_id} of the
    other sources (write_timestep's returns of this run)."""
    sources = np.full(len(embeddings), t) if sources is None else np.asarray(sources)
    own = sources == t
    values, scales = (x.numpy() for x in helpers.quantize_rows(torch.as_tensor(embeddings[own])))
    run_id = uuid.uuid4().hex
    others = sorted({int(x) for x in np.unique(sources)} - {t})
    config = {**config, "layout": OWN_ROWS, "run_id": run_id, "sources": {str(x): source_runs[x] for x in others}}
    final = timestep_dir(cache, t)
    helpers.clean_stale_tmp(cache)  # what killed runs left; a live run's folders stay
    tmp = helpers.tmp_path(cache, f"_timestep_{t}")
    os.makedirs(tmp)
    try:
        start, first_row, cams = 0, 0, len(config["cam_id"])
        for i, lv in enumerate(config["levels"]):
            n, shape = cams * lv["rows"] * lv["cols"], (cams, lv["rows"], lv["cols"])
            rows = slice(first_row, first_row + int(own[start : start + n].sum()))
            np.save(
                os.path.join(tmp, f"level_{i}_sources.npy"), sources[start : start + n].astype(np.int32).reshape(shape)
            )
            np.save(os.path.join(tmp, f"level_{i}.npy"), values[rows])
            np.save(os.path.join(tmp, f"level_{i}_scales.npy"), scales[rows])
            start, first_row = start + n, rows.stop
        if start != len(sources):
            raise ValueError(f"{len(sources)} embeddings for {start} tiles")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        for name in os.listdir(tmp):  # on the disk before the rename, which a power cut must not undo
            helpers.fsync(os.path.join(tmp, name))
        helpers.fsync(tmp)
        old = helpers.tmp_path(cache, f"_timestep_{t}_replaced")
        if os.path.exists(final):  # a folder cannot be renamed onto another: the old one steps aside first
            os.replace(final, old)
        os.replace(tmp, final)
        helpers.fsync(cache)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return run_id


def _checked_config(cache, t):
    config = read_config(cache, t)
    if config is None:
        raise UserError(
            f"{timestep_dir(cache, t)}: no cached tile embeddings for timestep {t}; run "
            f"extract_features.py -s <seq> --encoder {os.path.basename(cache)} first"
        )
    return config


def load_level(cache, t, i, cam=None):
    """float16 [C, rows, cols, D] of level i of timestep t, or [rows, cols, D] of camera index `cam`
    alone (read from the memory-mapped files; a reused embedding from the folder of its source);
    UserError for a damaged file or a source computed again since."""
    config = _checked_config(cache, t)
    if config.get("layout") != OWN_ROWS:  # written before: every tile's row in this folder
        arrays = [read_array(path, cam) for path in level_files(cache, t, i, config)]
        if len(arrays) == 1:  # float16, as written before the int8 storage
            return arrays[0]
        return dequantized(*arrays)
    lost = lost_source(cache, t, config["sources"])
    if lost:
        raise UserError(f"{lost}; run extract_features.py again (it computes timestep {t} again)")
    sources = read_sources(cache, t, i, cam)
    out = np.empty(sources.shape + (config["dim"],), dtype=np.float16)
    for s in np.unique(sources).tolist():
        if s != t and str(s) not in config["sources"]:
            raise UserError(
                f"{timestep_dir(cache, t)} is damaged (level {i} names timestep {s} as a source, its "
                f"config.json does not); run extract_features.py again (it computes timestep {t} again)"
            )
        values, scales, row = own_rows(cache, s, i, config["run_id"] if s == t else config["sources"][str(s)])
        picked = sources == s
        rows = (row if cam is None else row[cam])[picked]
        out[picked] = dequantized(np.asarray(values[rows]), np.asarray(scales[rows]))
    return out


def read_sources(cache, t, i, cam=None):
    """Each tile's source timestep of level i of timestep t (the folder holding its embedding), int32
    [C, rows, cols], or [rows, cols] of camera index `cam`; UserError for a damaged file."""
    return read_array(os.path.join(timestep_dir(cache, t), f"level_{i}_sources.npy"), cam)


@functools.lru_cache(maxsize=1024)
def own_rows(cache, t, i, run_id):
    """The rows timestep t encoded of level i (its folder written with `run_id`, checked by the
    caller): int8 values [n, D] and scales [n] (memory-mapped, nothing read yet) and each tile's
    row among them, int64 [C, rows, cols] (-1 where another timestep holds it). Kept for the
    timesteps that read them after it (a folder written again has another run_id)."""
    values, scales, sources = (
        read_array(path, mapped=True) for path in level_files(cache, t, i, {"dtype": "int8", "layout": OWN_ROWS})
    )
    return values, scales, (np.cumsum(sources == t) - 1).reshape(sources.shape)


def read_array(path, cam=None, mapped=False):
    """The array of an .npy file, or its first axis' index `cam`; mapped: the memory-mapped file as
    it is (nothing read yet). UserError for a damaged file."""
    try:
        level = np.load(path, mmap_mode="r")
        return level if mapped else np.array(level if cam is None else level[cam])
    except (OSError, ValueError, EOFError, IndexError) as e:
        raise UserError(
            f"{path} cannot be read ({type(e).__name__}: {e}); run extract_features.py again "
            f"(it recomputes damaged timesteps)"
        ) from None


def dequantized(values, scales):
    """int8 values [..., D] and their scales [...] -> float16 [..., D]."""
    values, scales = torch.from_numpy(values), torch.from_numpy(scales)
    rows = helpers.dequantize_rows(values.reshape(-1, values.shape[-1]), scales.flatten())
    return rows.to(torch.float16).reshape(values.shape).numpy()


def check_finite(values, cache, t):
    """Raise UserError when tile embeddings read from timestep t hold NaN/Inf (a damaged cache)."""
    if not np.isfinite(values).all():
        raise UserError(
            f"{timestep_dir(cache, t)}: the cached embeddings hold NaN/Inf; delete the folder and run "
            f"extract_features.py again"
        )


def load_tile_embeddings(cache, t):
    """All tile embeddings of timestep t (every camera and level): float16 tensor [M, D]."""
    config = _checked_config(cache, t)
    levels = [load_level(cache, t, i) for i in range(len(config["levels"]))]
    for level in levels:
        check_finite(level, cache, t)
    return torch.cat([torch.from_numpy(level).flatten(0, 2) for level in levels])


def camera_levels(cache, t, cam_index):
    """The tile grids of camera cam_index (train_meta's order) at timestep t: per level float16
    [rows, cols, D], checked finite (CPU work: files and dequantising, no device)."""
    config = _checked_config(cache, t)
    cams = len(config["cam_id"])
    if not 0 <= cam_index < cams:
        raise UserError(f"{timestep_dir(cache, t)}: camera index {cam_index} asked for, the cache holds {cams} cameras")
    grids = [load_level(cache, t, i, cam_index) for i in range(len(config["levels"]))]
    for grid in grids:
        check_finite(grid, cache, t)
    return grids


def dense_feature_map(cache, t, cam_index, height, width, device="cpu", guide=None, encode=None, grids=None):
    """Per-pixel features of camera cam_index (train_meta's order) at timestep t: float32
    [D, height, width] on `device` (height x width other than the cached image size maps pixel
    centres onto it). guide None: the mean over levels of the bilinear interpolation of the tile
    centres (the original's); guide float [3, H, W] in [0, 1], the camera's image at timestep t at the
    cached size: each pixel's purest tile (tiles.dense_purest). encode: a function of rows [M, D] ->
    [M, D'] that treats each row alone (the autoencoder's encoder in eval mode), applied to every
    pixel's feature -> [D', height, width]; with a guide it runs on the tiles before the selection
    (the same values, at a fraction of the cost), else on the pixels, ENCODE_ROWS at a time. grids:
    camera_levels(cache, t, cam_index) when already read (None: read here)."""
    config = _checked_config(cache, t)
    grids = camera_levels(cache, t, cam_index) if grids is None else grids
    if guide is not None:
        if tuple(guide.shape) != (3, config["height"], config["width"]):
            raise UserError(
                f"{timestep_dir(cache, t)}: guide image of shape {tuple(guide.shape)}, the tiles were cut "
                f"from {config['width']}x{config['height']} images"
            )
        return tiles.dense_purest(grids, config["levels"], guide, (height, width), torch.device(device), encode)
    dense = tiles.dense_from_grids(
        grids, config["levels"], (config["height"], config["width"]), (height, width), torch.device(device)
    )
    if encode is None:
        return dense
    flat = dense.reshape(dense.shape[0], -1).T
    encoded = torch.cat([encode(flat[i : i + ENCODE_ROWS]) for i in range(0, flat.shape[0], ENCODE_ROWS)])
    return encoded.T.reshape(-1, height, width)
