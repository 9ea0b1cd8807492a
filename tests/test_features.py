"""Stage 3 (extract_features.py): tile pyramid geometry, clips, crops and resizing against torch.nn.Unfold and
torchvision, the cache (reuse, invalidation, atomicity), dense maps against a per-pixel reference,
sharding, the colour and open_clip encoders, extraction end to end on a tiny sequence, and the reuse
of unchanged clips' embeddings against recomputing them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import extract_features
import helpers
from feature_extraction import (
    ColorEncoder,
    ViCLIP,
    cache_dir,
    dense_feature_map,
    load_encoder,
    load_tile_embeddings,
    tiles,
)
from feature_extraction import cache as feature_cache
from feature_extraction.color_encoder import COLORS, GENERIC_WEIGHT, directions
from feature_extraction.viclip import CLIP_MEAN, CLIP_STD
from helpers import UserError, load_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
    image_size=28,
    patch=14,
    vision_width=32,
    vision_layers=1,
    vision_heads=4,
    frames=8,
    embed_dim=16,
    context_length=32,
    vocab_size=49408,
    text_width=16,
    text_layers=1,
    text_heads=2,
)


def make_sequence(out, w=64, h=36, num_t=6, num_cams=1, seed=0):
    """A tiny PanopticSports-layout sequence of random JPEGs (train cameras only)."""
    rng = np.random.default_rng(seed)
    fns = [[f"{c}/{t:06d}.jpg" for c in range(num_cams)] for t in range(num_t)]
    for row in fns:
        for fn in row:
            os.makedirs(os.path.join(out, "ims", os.path.dirname(fn)), exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(out, "ims", fn))
    k = [[[50.0, 0, w / 2], [0, 50.0, h / 2], [0, 0, 1]]] * num_cams
    meta = {
        "w": w,
        "h": h,
        "k": [k] * num_t,
        "w2c": [[np.eye(4).tolist()] * num_cams] * num_t,
        "fn": fns,
        "cam_id": list(range(num_cams)),
    }
    with open(os.path.join(out, "train_meta.json"), "w") as f:
        json.dump(meta, f)
    return str(out)


def write_frames(seq, frames):
    """Replace the images of make_sequence's `seq` with frames uint8 [T, C, H, W, 3] (JPEG, as there)."""
    for t, row in enumerate(frames):
        for c, image in enumerate(row):
            Image.fromarray(image).save(os.path.join(seq, "ims", str(c), f"{t:06d}.jpg"))


@pytest.fixture()
def seq(tmp_path):
    return make_sequence(tmp_path / "seq")


# ---------------------------------------------------------------- geometry


def test_tile_pyramid_at_640x360():
    levels = tiles.tile_levels(360, 640)
    assert [lv["kernel"] for lv in levels] == [54, 94, 135, 175, 216]
    assert [lv["stride"] for lv in levels] == [27, 47, 67, 87, 108]
    assert [lv["padding"] for lv in levels] == [27, 47, 67, 87, 108]
    assert [(lv["rows"], lv["cols"]) for lv in levels] == [(14, 24), (8, 14), (6, 10), (5, 8), (4, 6)]
    assert sum(lv["rows"] * lv["cols"] for lv in levels) == 572
    assert len(tiles.tile_index(levels, 27)[0]) == 15_444
    np.testing.assert_allclose(tiles.tile_centers(levels[0], 3), [-0.5, 26.5, 53.5])
    np.testing.assert_allclose(tiles.tile_centers(levels[2], 2), [0.0, 67.0])


def test_clip_frames_at_the_ends():
    """t-4 .. t+3 clamped to the sequence: frame t is the fifth of every clip."""
    assert tiles.clip_frames(0, 150) == [0, 0, 0, 0, 0, 1, 2, 3]
    assert tiles.clip_frames(2, 150) == [0, 0, 0, 1, 2, 3, 4, 5]
    assert tiles.clip_frames(10, 150) == list(range(6, 14))
    assert tiles.clip_frames(149, 150) == [145, 146, 147, 148, 149, 149, 149, 149]
    assert tiles.clip_frames(1, 2) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert tiles.clip_frames(0, 1) == [0] * 8
    assert all(tiles.clip_frames(t, 12)[4] == t for t in range(12))


def test_tile_index_order():
    levels = tiles.tile_levels(36, 64)
    level, cam, row, col = tiles.tile_index(levels, 2)
    n0 = levels[0]["rows"] * levels[0]["cols"]
    assert (level[: 2 * n0] == 0).all() and (cam[:n0] == 0).all() and (cam[n0 : 2 * n0] == 1).all()
    assert row[:3].tolist() == [0, 0, 0] and col[:3].tolist() == [0, 1, 2]
    assert level[-1] == 4 and cam[-1] == 1


def test_crops_equal_unfold_and_torchvision_resize():
    """Tiles are the original's torch.nn.Unfold windows of the zero-padded image; resizing matches
    torchvision's Resize((S, S)) (to one grey level on the CPU's uint8 path)."""
    from torchvision.transforms import Resize

    rng = np.random.default_rng(3)
    frames = torch.from_numpy(rng.integers(0, 256, (2, 8, 36, 64, 3), dtype=np.uint8))
    levels = tiles.tile_levels(36, 64)
    padded, pad = tiles.pad_frames(frames, levels)
    for li, lv in enumerate(levels):
        k, n = lv["kernel"], lv["rows"] * lv["cols"]
        unfold = torch.nn.Unfold(k, stride=lv["stride"], padding=lv["padding"])
        image = frames[1].permute(0, 3, 1, 2).float() / 255  # camera 1: [8, 3, H, W]
        ref = unfold(image).reshape(8, 3, k, k, n).permute(4, 0, 1, 2, 3)  # [tiles, 8, 3, k, k]
        rows, cols = torch.meshgrid(torch.arange(lv["rows"]), torch.arange(lv["cols"]), indexing="ij")
        cam = torch.ones(n, dtype=torch.long)
        ours = tiles.crop_tiles(padded, pad, lv, cam, rows.flatten(), cols.flatten(), k)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
        for size in (5, 24):  # shrink (antialiased) and enlarge
            ours = tiles.crop_tiles(padded, pad, lv, cam, rows.flatten(), cols.flatten(), size)
            theirs = Resize((size, size))(ref.flatten(0, 1)).view(n, 8, 3, size, size)
            assert (ours - theirs).abs().max() <= 1.01 / 255, (li, size)  # uint8: one grey level


# ---------------------------------------------------------------- dense maps


def reference_pixel(grids, levels, y, x):
    """The original's per-pixel lookup (LERF's patch loader): floor((p - first centre) / stride),
    the grid padded by repeating its last row and column, two lerps; mean over levels."""
    out = 0
    for grid, lv in zip(grids, levels):
        g = np.asarray(grid, dtype=np.float64)
        g = np.concatenate([g, g[-1:]], 0)
        g = np.concatenate([g, g[:, -1:]], 1)
        cy, cx = tiles.tile_centers(lv, lv["rows"]), tiles.tile_centers(lv, lv["cols"])
        i, j = int(np.floor((y - cy[0]) / lv["stride"])), int(np.floor((x - cx[0]) / lv["stride"]))
        wy, wx = (y - cy[i]) / lv["stride"], (x - cx[j]) / lv["stride"]
        top = g[i, j] + wx * (g[i, j + 1] - g[i, j])
        bottom = g[i + 1, j] + wx * (g[i + 1, j + 1] - g[i + 1, j])
        out = out + top + wy * (bottom - top)
    return out / len(levels)


def write_random_cache(cache, t, h, w, num_cams, dim=8, seed=0):
    levels = tiles.tile_levels(h, w)
    m = num_cams * sum(lv["rows"] * lv["cols"] for lv in levels)
    emb = np.random.default_rng(seed).standard_normal((m, dim)).astype(np.float16)
    config = {
        "format": 1,
        "dtype": "int8",
        "dim": dim,
        "width": w,
        "height": h,
        "cam_id": list(range(num_cams)),
        "levels": levels,
    }
    feature_cache.write_timestep(cache, t, config, emb)
    return emb, levels


def test_dense_map_equals_per_pixel_reference(tmp_path):
    h, w = 36, 64
    emb, levels = write_random_cache(str(tmp_path), 3, h, w, num_cams=2)
    dense = dense_feature_map(str(tmp_path), 3, 1, h, w, "cpu")
    assert dense.shape == (8, h, w) and dense.dtype == torch.float32
    grids = [feature_cache.load_level(str(tmp_path), 3, i)[1] for i in range(len(levels))]
    for y, x in [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (17, 31), (5, 40), (30, 2)]:
        np.testing.assert_allclose(dense[:, y, x].numpy(), reference_pixel(grids, levels, y, x), rtol=0, atol=1e-4)
    # a tile-centre pixel of level 0 (its centres are half-integers there, so take level 2: integer centres)
    stored = load_tile_embeddings(str(tmp_path), 3).float()  # int8 with a scale per embedding
    assert torch.nn.functional.cosine_similarity(stored, torch.from_numpy(emb).float()).min() > 0.9999
    half = dense_feature_map(str(tmp_path), 3, 1, h // 2, w // 2, "cpu")
    assert half.shape == (8, h // 2, w // 2) and torch.isfinite(half).all()
    with pytest.raises(UserError, match="camera index 2"):
        dense_feature_map(str(tmp_path), 3, 2, h, w, "cpu")
    with pytest.raises(UserError, match="extract_features.py"):
        load_tile_embeddings(str(tmp_path), 4)


def test_dense_map_encoded_equals_encoding_every_pixel(tmp_path):
    """dense_feature_map's `encode` (the autoencoder's encoder, eval mode) gives what encoding every
    pixel of the plain map gives: run on the tiles before the purest selection, and on the pixels
    (in chunks) after the mean's interpolation."""
    from feature_extraction.autoencoder import Autoencoder

    h, w = 36, 64
    write_random_cache(str(tmp_path), 3, h, w, num_cams=2, dim=768)
    ae = Autoencoder().eval()
    guide = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for mix in (guide, None):
            plain = dense_feature_map(str(tmp_path), 3, 1, h, w, "cpu", mix)
            every_pixel = ae.encode(plain.reshape(768, -1).T).T.reshape(-1, h, w)
            encoded = dense_feature_map(str(tmp_path), 3, 1, h, w, "cpu", mix, ae.encode)
            assert encoded.shape == (128, h, w)
            torch.testing.assert_close(encoded, every_pixel, rtol=0, atol=1e-5)


def test_float16_cache_of_earlier_runs_is_read_and_counts_as_done(tmp_path):
    """A timestep cached before the int8 storage (float16 level files, config dtype float16) is read
    as it is and not computed again; the int8 one holds half its bytes."""
    h, w = 36, 64
    cache = str(tmp_path / "cache")
    emb, levels = write_random_cache(cache, 3, h, w, num_cams=2, dim=128)
    # what make_config gives (the folder's config.json adds how and when it was written)
    config = {k: v for k, v in feature_cache.read_config(cache, 3).items() if k not in ("layout", "run_id", "sources")}
    values, scales = (x.numpy() for x in helpers.quantize_rows(torch.from_numpy(emb)))
    for t, dtype in ((4, "float16"), (5, "int8")):  # float16, and int8 with every tile's row in the folder
        old = feature_cache.timestep_dir(cache, t)
        os.makedirs(old)
        start = 0
        for i, lv in enumerate(levels):
            n, shape = 2 * lv["rows"] * lv["cols"], (2, lv["rows"], lv["cols"])
            level = (emb if dtype == "float16" else values)[start : start + n].reshape(*shape, -1)
            np.save(os.path.join(old, f"level_{i}.npy"), level)
            if dtype == "int8":
                np.save(os.path.join(old, f"level_{i}_scales.npy"), scales[start : start + n].reshape(shape))
            start += n
        with open(os.path.join(old, "config.json"), "w") as f:
            json.dump({**config, "dtype": dtype}, f)
    assert torch.equal(load_tile_embeddings(cache, 4), torch.from_numpy(emb))
    assert torch.equal(load_tile_embeddings(cache, 5), load_tile_embeddings(cache, 3))
    assert all(feature_cache.is_done(cache, t, config) for t in (3, 4, 5))
    torch.testing.assert_close(
        dense_feature_map(cache, 4, 1, h, w, "cpu"), dense_feature_map(cache, 3, 1, h, w, "cpu"), atol=0.02, rtol=0
    )
    size = {t: sum(e.stat().st_size for e in os.scandir(feature_cache.timestep_dir(cache, t))) for t in (3, 4)}
    assert size[3] < 0.6 * size[4], size


@pytest.mark.gpu
def test_dense_map_on_gpu_equals_cpu(tmp_path):
    write_random_cache(str(tmp_path), 0, 36, 64, num_cams=1)
    cpu = dense_feature_map(str(tmp_path), 0, 0, 36, 64, "cpu")
    gpu = dense_feature_map(str(tmp_path), 0, 0, 36, 64, "cuda")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- cache and extraction


def test_extract_caches_reuses_and_invalidates(seq):
    enc = ColorEncoder()
    stats = extract_features.extract(seq, enc, [0, 1, 2, 3, 4, 5], 64, torch.device("cpu"), progress=False)
    cache = cache_dir(seq, "color")
    assert stats["done"] == 6 and cache == os.path.join(seq, "interpolators", "color")
    levels = tiles.tile_levels(36, 64)
    for i, lv in enumerate(levels):
        arr = feature_cache.load_level(cache, 2, i)
        assert arr.dtype == np.float16 and arr.shape == (1, lv["rows"], lv["cols"], 768)
    emb = load_tile_embeddings(cache, 2)
    assert emb.shape == (sum(lv["rows"] * lv["cols"] for lv in levels), 768) and emb.dtype == torch.float16
    np.testing.assert_allclose(emb.float().norm(dim=1).numpy(), 1, atol=2e-3)
    before = {t: os.stat(os.path.join(cache, f"timestep_{t}", "level_0.npy")).st_mtime_ns for t in range(6)}
    again = extract_features.extract(seq, enc, range(6), 64, torch.device("cpu"), progress=False)
    assert again["done"] == 0 and again["skipped"] == 6
    # a new image of frame 5 of camera 0 touches the clips of timesteps 2..5 (t-4 .. t+3 holds 5) only
    Image.new("RGB", (64, 36), (200, 30, 30)).save(os.path.join(seq, "ims", "0", "000005.jpg"))
    # a killed run's half-written timestep is no cache and is cleaned up (its writer: this pid with
    # another start time, a process that is gone); a config mismatch recomputes
    os.makedirs(os.path.join(cache, f".tmp_{helpers.host_tag()}-{os.getpid()}-1-0000_timestep_0"))
    with open(os.path.join(cache, "timestep_0", "config.json"), "w") as f:
        json.dump({"format": 0}, f)
    third = extract_features.extract(seq, enc, range(6), 64, torch.device("cpu"), progress=False)
    assert third["done"] == 5 and third["skipped"] == 1
    after = {t: os.stat(os.path.join(cache, f"timestep_{t}", "level_0.npy")).st_mtime_ns for t in range(6)}
    assert [t for t in range(6) if after[t] != before[t]] == [0, 2, 3, 4, 5]
    assert not [d for d in os.listdir(cache) if d.startswith(".tmp")]


def test_extract_with_tiny_viclip_matches_direct_encoding(tmp_path):
    """A cached embedding equals the encoder applied to the clip built by hand (Unfold, torchvision
    Resize, CLIP normalisation), here for timestep 0 (clip 0,0,0,0,0,1,2,3), level 1, camera 1."""
    from torchvision.transforms import Normalize, Resize

    seq = make_sequence(tmp_path / "seq", num_cams=2)
    model = ViCLIP(**TINY).reset_parameters(torch.Generator().manual_seed(0)).eval()
    extract_features.extract(seq, model, [0], 16, torch.device("cpu"), progress=False)
    lv = tiles.tile_levels(36, 64)[1]
    cached = feature_cache.load_level(cache_dir(seq, "viclip"), 0, 1)[1]  # [rows, cols, 16]
    frames = (
        torch.stack(
            [
                torch.from_numpy(np.array(Image.open(os.path.join(seq, "ims", "1", f"{f:06d}.jpg"))))
                for f in tiles.clip_frames(0, 6)
            ]
        )
        .permute(0, 3, 1, 2)
        .float()
        / 255
    )
    k = lv["kernel"]
    windows = torch.nn.Unfold(k, stride=lv["stride"], padding=lv["padding"])(frames)
    windows = windows.reshape(8, 3, k, k, lv["rows"], lv["cols"])
    clip = Normalize(CLIP_MEAN, CLIP_STD)(Resize((28, 28))(windows[..., 2, 3]))
    direct = model.encode_video(clip[None])[0]
    np.testing.assert_allclose(cached[2, 3].astype(np.float32), direct.numpy(), rtol=0, atol=3e-3)


@pytest.mark.gpu
def test_extract_on_gpu_matches_cpu(tmp_path):
    """GPU extraction (float resize, fixed batches) gives the CPU's embeddings (uint8 resize)."""
    seqs = [make_sequence(tmp_path / name, num_t=2) for name in ("cpu", "gpu")]
    for seq, device in zip(seqs, ("cpu", "cuda")):
        extract_features.extract(seq, ColorEncoder(device), [1], 48, torch.device(device), progress=False)
    a, b = (load_tile_embeddings(cache_dir(seq, "color"), 1).float() for seq in seqs)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999


def test_colour_features_find_the_red_ball_on_the_synthetic_sequence(tmp_path):
    """On the demo's synthetic scene, the dense colour features of each object's pixels (ground-truth
    ids) point at that object's colour more than the other objects' pixels do. Timestep 1: its clip
    (frames 0..5) shows the objects before the ball is thrown."""
    from synthetic_sequence import generate

    seq = str(tmp_path / "syn")
    generate(seq, width=128, height=72, num_timesteps=24, num_train=1, num_test=0)
    enc = ColorEncoder()
    extract_features.extract(seq, enc, [1], 512, torch.device("cpu"), progress=False)
    dense = torch.nn.functional.normalize(dense_feature_map(cache_dir(seq, "color"), 1, 0, 72, 128), dim=0)
    sims = (enc.encode_text(["a red ball", "a blue box", "a green top"]) @ dense.flatten(1)).view(3, 72, 128)
    ids = torch.from_numpy(np.array(Image.open(os.path.join(seq, "gt", "ids", "0", "000001.png"))))
    for i in range(3):
        mean_on = [sims[i][ids == obj].mean() for obj in (1, 2, 3)]  # this text on ball, box, top
        assert (ids == i + 1).sum() > 20 and mean_on[i] > 1.5 * max(m for j, m in enumerate(mean_on) if j != i)


def test_nan_embeddings_are_never_cached(seq):
    class Broken(ColorEncoder):
        def encode_video(self, frames):
            return super().encode_video(frames) * float("nan")

    with pytest.raises(UserError, match="timestep 0: the color encoder returned NaN/Inf"):
        extract_features.extract(seq, Broken(), [0], 64, torch.device("cpu"), progress=False)
    assert not feature_cache.is_done(
        cache_dir(seq, "color"), 0, feature_cache.make_config(ColorEncoder(), seq, load_meta(seq, "train"), 0)
    )


# ---------------------------------------------------------------- reuse of unchanged clips


def cosines(seq, runs, t):
    """float32 [M]: cosine of each tile embedding of timestep t between the caches of runs[0] and runs[1]
    (cache roots under seq)."""
    a, b = (load_tile_embeddings(cache_dir(os.path.join(seq, run), "color"), t).float() for run in runs)
    return torch.nn.functional.cosine_similarity(a, b)


def extract_run(seq, run, timesteps, tolerance):
    return extract_features.extract(
        seq,
        ColorEncoder(),
        timesteps,
        512,
        torch.device("cpu"),
        progress=False,
        cache_root=os.path.join(seq, run),
        reuse_tolerance=tolerance,
    )


def test_reused_embeddings_match_recomputed_ones_on_a_moving_scene(tmp_path):
    """The synthetic scene (a ball thrown, a box sliding, a top spinning; 2 still cameras): about half
    of the clips keep an earlier embedding, and those are within cosine 0.999 (mean) and 0.99 (each)
    of what encoding them gives; the others are what encoding them gives."""
    from synthetic_sequence import generate

    seq = str(tmp_path / "syn")
    generate(seq, width=96, height=54, num_timesteps=12, num_train=2, num_test=0)
    exact = extract_run(seq, "exact", range(12), None)
    reuse = extract_run(seq, "reuse", range(12), extract_features.REUSE_TOLERANCE)
    assert not np.concatenate(list(exact["reused"].values())).any() and not reuse["reused"][0].any()
    reused = np.concatenate([reuse["reused"][t] for t in range(12)])
    assert 0.3 < reused.mean() < 0.8, reused.mean()  # the scene moves, its background does not
    cos = torch.cat([cosines(seq, ("exact", "reuse"), t) for t in range(12)])
    assert cos[reused].mean() >= 0.999 and cos[reused].min() >= 0.99, (cos[reused].mean(), cos[reused].min())
    assert cos[~reused].min() > 0.9999
    config = feature_cache.read_config(cache_dir(os.path.join(seq, "reuse"), "color"), 5)
    assert config["reuse"] == {"tolerance": extract_features.REUSE_TOLERANCE, "grid": tiles.REUSE_GRID}
    assert feature_cache.read_config(cache_dir(os.path.join(seq, "exact"), "color"), 5)["reuse"] is None


def test_a_resumed_run_reuses_as_the_uninterrupted_one(tmp_path):
    """A reusing run stopped after timestep 4 and started again goes on reusing from the cache (its
    first timestep too, where it used to encode every clip) and caches what one run over all the
    timesteps caches, file for file: the same clips encoded, the same sources."""
    from synthetic_sequence import generate

    seq = str(tmp_path / "syn")
    generate(seq, width=96, height=54, num_timesteps=10, num_train=2, num_test=0)
    whole = extract_run(seq, "whole", range(10), extract_features.REUSE_TOLERANCE)
    extract_run(seq, "resumed", range(5), extract_features.REUSE_TOLERANCE)
    resumed = extract_run(seq, "resumed", range(10), extract_features.REUSE_TOLERANCE)
    assert resumed["done"] == 5 and resumed["reused"][5].mean() > 0.1  # the old resume: 0
    for t in range(5, 10):
        np.testing.assert_array_equal(resumed["reused"][t], whole["reused"][t])
    for t in range(10):
        folders = [
            os.path.join(cache_dir(os.path.join(seq, run), "color"), f"timestep_{t}") for run in ("whole", "resumed")
        ]
        names = sorted(n for n in os.listdir(folders[0]) if n.endswith(".npy"))
        assert names == sorted(n for n in os.listdir(folders[1]) if n.endswith(".npy"))
        for name in names:
            np.testing.assert_array_equal(*(np.load(os.path.join(f, name)) for f in folders), err_msg=f"{t} {name}")


def test_a_still_scene_reuses_almost_everything(tmp_path):
    """A still 640x360 camera whose frames differ by sensor-like noise only (+-1 grey level, then JPEG):
    after the run's first timestep almost every clip keeps its embedding."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:360, 0:640] / 4.0
    still = np.stack([128 + 60 * np.sin(x / 9.0), 128 + 60 * np.cos(y / 7.0), 100 + 0 * x], -1)
    frames = (still + rng.integers(-1, 2, (6, 1, 360, 640, 3))).clip(0, 255).astype(np.uint8)
    seq = make_sequence(tmp_path / "seq", w=640, h=360, num_t=6)
    write_frames(seq, frames)
    stats = extract_run(seq, "reuse", range(6), extract_features.REUSE_TOLERANCE)
    assert not stats["reused"][0].any() and len(stats["reused"][1]) == 572
    shares = [stats["reused"][t].mean() for t in range(1, 6)]
    assert min(shares) >= 0.95, shares
    assert extract_features.reused_share(stats["reused"], [0]) == "0/572 (0.0%)"


def overlapping_tiles(levels, num_cams, cam_index, rows, cols):
    """bool [M] in tiles.tile_index order: the tiles of camera cam_index whose window covers a pixel of
    rows x cols (ranges)."""
    level, cam, row, col = tiles.tile_index(levels, num_cams)
    k, s, p = (torch.tensor([lv[key] for lv in levels])[level] for key in ("kernel", "stride", "padding"))
    top, left = s * row - p, s * col - p
    inside = (top < rows.stop) & (top + k > rows.start) & (left < cols.stop) & (left + k > cols.start)
    return (inside & (cam == cam_index)).numpy()


def test_a_changed_tile_is_encoded_again(tmp_path):
    """A still scene in which a red square appears at frame 8 and stays: the tiles whose window holds a
    pixel of it are reused up to timestep 4 (clip 0..7) and encoded again at each of 5..11 (clip t-4 ..
    t+3 holds the square in one more frame each time), although the colour encoder, which looks at the
    clip's centre frame t, embeds them as before until 8; from 8 on it embeds them differently (cosine
    < 0.9 to timestep 7), and the reusing run agrees with the exact one."""
    rng = np.random.default_rng(2)
    frames = np.repeat(rng.integers(0, 256, (1, 2, 36, 64, 3), dtype=np.uint8), 12, axis=0)
    rows, cols = range(10, 20), range(30, 42)
    frames[8:, 1, rows.start : rows.stop, cols.start : cols.stop] = (220, 20, 20)
    seq = make_sequence(tmp_path / "seq", num_t=12, num_cams=2)
    write_frames(seq, frames)
    extract_run(seq, "exact", range(12), None)
    reuse = extract_run(seq, "reuse", range(12), extract_features.REUSE_TOLERANCE)
    square = overlapping_tiles(tiles.tile_levels(36, 64), 2, 1, rows, cols)
    other_camera = (tiles.tile_index(tiles.tile_levels(36, 64), 2)[1] == 0).numpy()
    assert square.sum() > 10
    for t in range(1, 12):
        assert reuse["reused"][t][square].all() if t <= 4 else not reuse["reused"][t][square].any(), t
        assert reuse["reused"][t][other_camera].all(), t  # (camera 1's JPEG blocks around the square change too)
        assert cosines(seq, ("exact", "reuse"), t).min() > 0.999, t
    a, b = (load_tile_embeddings(cache_dir(os.path.join(seq, "exact"), "color"), t).float() for t in (7, 8))
    assert torch.nn.functional.cosine_similarity(a, b)[torch.from_numpy(square)].min() < 0.9


def test_a_reused_embedding_is_stored_once_where_it_was_encoded(tmp_path):
    """A reusing run stores in each timestep's folder the clips that timestep encoded; a reused
    embedding is read from the folder of the timestep that encoded it (the same as the timestep
    before reads), so the still timesteps take a fraction of the first's bytes. A source computed
    again leaves the timesteps that read it not done: reading one says so, and a run computes them
    again, also when it is the source's own change that makes it compute the source."""
    rng = np.random.default_rng(2)
    frames = np.repeat(rng.integers(0, 256, (1, 2, 36, 64, 3), dtype=np.uint8), 12, axis=0)
    frames[8:, 1, 10:20, 30:42] = (220, 20, 20)  # a red square from frame 8 on (clips of t >= 5 hold it)
    seq = make_sequence(tmp_path / "seq", num_t=12, num_cams=2)
    write_frames(seq, frames)
    meta, enc, cache = load_meta(seq, "train"), ColorEncoder(), cache_dir(seq, "color")

    def run():
        return extract_features.extract(
            seq,
            enc,
            range(12),
            512,
            torch.device("cpu"),
            progress=False,
            reuse_tolerance=extract_features.REUSE_TOLERANCE,
        )

    def folder_bytes(t):
        return sum(e.stat().st_size for e in os.scandir(feature_cache.timestep_dir(cache, t)))

    stats = run()
    for t in range(1, 12):
        reused = torch.from_numpy(stats["reused"][t])
        assert torch.equal(load_tile_embeddings(cache, t)[reused], load_tile_embeddings(cache, t - 1)[reused]), t
        folder = feature_cache.timestep_dir(cache, t)
        sources = np.concatenate([np.load(f"{folder}/level_{i}_sources.npy").ravel() for i in range(5)])
        assert np.array_equal(sources == t, ~stats["reused"][t]), t
    assert stats["reused"][4].all() and not stats["reused"][5].all()
    assert folder_bytes(4) < 0.1 * folder_bytes(0) < folder_bytes(5), [folder_bytes(t) for t in (0, 4, 5)]
    # timestep 0 computed again: the others read from it are lost until computed again
    feature_cache.write_timestep(
        cache, 0, feature_cache.make_config(enc, seq, meta, 0, 0.01), load_tile_embeddings(cache, 0).numpy()
    )
    assert not feature_cache.is_done(cache, 3, feature_cache.make_config(enc, seq, meta, 3, 0.01), log=lambda _: None)
    with pytest.raises(UserError, match="reuses embeddings of timestep 0, which was computed again"):
        load_tile_embeddings(cache, 3)
    assert run()["done"] == 11  # (it went on from timestep 0's state: the later ones read from 0 again)
    # a run that computes timestep 0 again (its config differs, its run_id stays) computes the
    # timesteps read from it too
    config = feature_cache.read_config(cache, 0)
    with open(os.path.join(feature_cache.timestep_dir(cache, 0), "config.json"), "w") as f:
        json.dump({**config, "width": 1}, f)
    assert run()["done"] == 12 and load_tile_embeddings(cache, 11).shape[0] == len(stats["reused"][11])
    # a config.json without its run_id and sources: not done, and read as missing (one line, no traceback)
    config = feature_cache.read_config(cache, 11)
    with open(os.path.join(feature_cache.timestep_dir(cache, 11), "config.json"), "w") as f:
        json.dump({k: v for k, v in config.items() if k != "sources"}, f)
    with pytest.raises(UserError, match="no cached tile embeddings for timestep 11"):
        load_tile_embeddings(cache, 11)
    assert run()["done"] == 1


def test_bench_cache_read_runs_small():
    """benchmarks/bench_cache_read.py, tiny: it wrote a reusing cache, read it back and removed it."""
    before = set(os.listdir("results")) if os.path.isdir("results") else set()
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_cache_read.py",
            "--timesteps",
            "4",
            "--cams",
            "2",
            "--width",
            "64",
            "--height",
            "36",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "timestep 3: every camera's levels read in" in done.stdout and "timestep 0:" in done.stdout
    assert set(os.listdir("results")) == before  # its cache is gone


def test_bench_reuse_shares_replay_a_real_run(tmp_path):
    """benchmarks/bench_extract_reuse.py --shares-only (the reuse rule replayed on the pixels, no
    encoder) counts, timestep by timestep, the clips that extract_features actually reused."""
    from synthetic_sequence import generate

    seq = str(tmp_path / "syn")
    generate(seq, width=96, height=54, num_timesteps=6, num_train=2, num_test=0)
    shares = {}
    for tolerance in (0.01, 0.08):
        run = extract_run(seq, f"reuse{tolerance}", range(6), tolerance)
        shares[tolerance] = [float(run["reused"][t].mean()) for t in range(6)]
    out = str(tmp_path / "shares.json")
    command = [sys.executable, "benchmarks/bench_extract_reuse.py", "--seq", seq, "--device", "cpu", "-l", "5"]
    done = subprocess.run(
        [*command, "--shares-only", "--sweep", "0.01", "0.08", "--json", out], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    replayed = helpers.read_json(out)["sweep"]
    for tolerance, per_t in shares.items():
        np.testing.assert_allclose(replayed[str(tolerance)]["per_timestep"], per_t, atol=1e-9)
    assert 0 < shares[0.01][5] < shares[0.08][5] < 1  # the scene moves; a looser rule reuses more
    bad = subprocess.run([*command[:-1], "9", "--shares-only"], capture_output=True, text=True)
    assert bad.returncode != 0 and "has timesteps 0..5" in bad.stderr and "Traceback" not in bad.stderr


def test_exact_reuses_nothing_and_settings_resume(seq, monkeypatch, capsys):
    """--exact encodes every clip and recomputes what a reusing run cached; a reusing run keeps exact
    timesteps and those of a tolerance at most its own; a resumed run starts with a full timestep."""
    meta, enc = load_meta(seq, "train"), ColorEncoder()
    extract_features.main(["-s", seq, "--encoder", "color", "-l", "2"])
    assert "reused" in capsys.readouterr().out
    cache = cache_dir(seq, "color")
    assert feature_cache.read_config(cache, 2)["reuse"]["tolerance"] == extract_features.REUSE_TOLERANCE
    extract_features.main(["-s", seq, "--encoder", "color", "--exact"])
    out = capsys.readouterr().out
    assert "embedded 6 timestep(s)" in out and "reused" not in out
    assert all(feature_cache.read_config(cache, t)["reuse"] is None for t in range(6))
    wider = extract_features.extract(seq, enc, range(6), 512, torch.device("cpu"), progress=False, reuse_tolerance=0.05)
    assert wider["done"] == 0  # exact timesteps serve a reusing run
    for t in (3, 4, 5):  # as if cached with tolerance 0.02: a run with 0.05 keeps them, one with 0.01 does not
        feature_cache.write_timestep(
            cache, t, feature_cache.make_config(enc, seq, meta, t, 0.02), load_tile_embeddings(cache, t).numpy()
        )
    assert feature_cache.is_done(cache, 3, feature_cache.make_config(enc, seq, meta, 3, 0.05))
    assert not feature_cache.is_done(cache, 3, feature_cache.make_config(enc, seq, meta, 3, 0.01))
    assert not feature_cache.is_done(cache, 3, feature_cache.make_config(enc, seq, meta, 3))
    resumed = extract_features.extract(
        seq, enc, range(6), 512, torch.device("cpu"), progress=False, reuse_tolerance=0.01
    )
    assert list(resumed["reused"]) == [3, 4, 5] and not resumed["reused"][3].any()  # first: nothing to compare with
    with pytest.raises(UserError, match="--reuse-tolerance -0.1"):
        extract_features.main(["-s", seq, "--encoder", "color", "--reuse-tolerance", "-0.1"])


def test_shard_covers_timesteps_once():
    timesteps = list(range(3, 13))
    for world in (1, 2, 3, 4, 16):
        parts = [extract_features.shard(timesteps, r, world) for r in range(world)]
        assert sum(parts, []) == timesteps
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    assert extract_features.shard(timesteps, 1, 3) == [6, 7, 8, 9]


def test_rank_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert extract_features.rank_device(None, 1, 0) == torch.device("cuda", 0)
    assert extract_features.rank_device("cuda:3", 1, 0) == torch.device("cuda", 3)
    assert extract_features.rank_device("cuda", 4, 2) == torch.device("cuda", 2)  # torchrun: LOCAL_RANK
    assert extract_features.rank_device("cpu", 4, 2) == torch.device("cpu")


def test_main_and_bad_inputs(seq, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    extract_features.main(["-s", seq, "--encoder", "color", "-f", "0", "-l", "2"])
    out = capsys.readouterr().out
    assert "embedded 3 timestep(s)" in out and os.path.join(seq, "interpolators", "color") in out
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    extract_features.main(["-s", seq, "--encoder", "color"])  # rank 1 of 2: timesteps 3..5
    assert "rank 1/2: embedded 3 timestep(s)" in capsys.readouterr().out
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    with pytest.raises(UserError, match="-f 4 -l 2"):
        extract_features.main(["-s", seq, "--encoder", "color", "-f", "4", "-l", "2"])
    with pytest.raises(UserError, match="unknown encoder"):
        extract_features.main(["-s", seq, "--encoder", "clip"])
    with pytest.raises(UserError, match="openclip:<arch>:<checkpoint-or-tag>"):
        load_encoder("openclip:ViT-B-32")
    with pytest.raises(UserError, match="not found"):
        load_encoder("openclip:ViT-B-32:/no/such/file.pt")
    os.remove(os.path.join(seq, "ims", "0", "000004.jpg"))
    extract_features.main(["-s", seq, "--encoder", "color", "-f", "0", "-l", "0"])  # clip 0..3: fine
    with pytest.raises(UserError, match="000004.jpg"):
        extract_features.main(["-s", seq, "--encoder", "color", "-f", "1", "-l", "1"])  # clip 0..4


def test_missing_viclip_checkpoint_is_one_line(seq, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "extract_features.py"),
            "-s",
            seq,
            "--viclip-ckpt",
            str(tmp_path / "none.pth"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2 and result.stdout == f"sequence folder: {os.path.normpath(seq)}\n"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "none.pth" in lines[0] and "huggingface.co/OpenGVLab/ViCLIP" in lines[0]


# ---------------------------------------------------------------- encoders


def clip_of(rgb, frames=8, size=8, square=None, speed=1):
    """A CLIP-normalised clip [1, T, 3, S, S] of one colour, plus a 3x3 square of colour `square`
    moving `speed` pixels per frame to the right (0: standing)."""
    x = torch.tensor(rgb, dtype=torch.float32).view(1, 1, 3, 1, 1).expand(1, frames, 3, size, size).clone()
    if square is not None:
        for f in range(frames):
            x[0, f, :, 2:5, f * speed % 6 : f * speed % 6 + 3] = torch.tensor(square).view(3, 1, 1)
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def test_color_encoder_formula():
    dirs = directions()
    np.testing.assert_allclose(dirs @ dirs.T, np.eye(2 * len(COLORS) + 1), atol=1e-12)
    np.testing.assert_array_equal(dirs, directions())  # seeded: the same every time
    enc = ColorEncoder()
    red, floor = enc.encode_video(clip_of((0.85, 0.1, 0.1))), enc.encode_video(clip_of((0.5, 0.5, 0.5)))
    text = enc.encode_text(["a red ball", "object", "things", "a grey floor", "a gray floor", "a blue box sliding"])
    assert text.shape == (6, 768) and torch.allclose(text.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(text[1], torch.tensor(dirs[-1], dtype=torch.float32))  # negatives: generic
    torch.testing.assert_close(text[1], text[2])
    torch.testing.assert_close(text[3], text[4])  # grey == gray
    # a still red clip: h_red ~ 1, no motion -> normalize(d_red + GENERIC_WEIGHT d_generic)
    np.testing.assert_allclose((red @ text[0]).item(), 1 / np.sqrt(1 + GENERIC_WEIGHT**2), atol=1e-3)
    assert (red @ text[0]) > (floor @ text[0]) + 0.5 and (floor @ text[3]) > (red @ text[3]) + 0.5
    # "a blue box sliding" = normalize(d_blue + 4 m_blue): a moving blue square beats a standing one,
    # and a moving red square is no answer at all (coloured motion, not motion anywhere)
    grey, blue, other = (0.5, 0.5, 0.5), (0.1, 0.2, 0.85), (0.85, 0.1, 0.1)
    moving = enc.encode_video(clip_of(grey, square=blue))
    standing = enc.encode_video(clip_of(grey, square=blue, speed=0))
    moving_red = enc.encode_video(clip_of(grey, square=other))
    assert (moving @ text[5]) > 2 * (standing @ text[5]) > 0.05 and abs((moving_red @ text[5]).item()) < 1e-3
    # motion is what passes through the centre frame (4), into it and on out of it: a square that
    # stops there (or, the same, a sequence's end padded by repeating its last frame), or that
    # starts only there, is not moving at this timestep
    for still in (slice(5, None), slice(None, 4)):
        clip = clip_of(grey, square=blue)
        clip[:, still] = clip[:, 4:5]
        assert (enc.encode_video(clip) @ text[5]) < 0.5 * (moving @ text[5])


def test_openclip_encoder_averages_frames(tmp_path):
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    (tmp_path / "Tiny-Test-4legs.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "Tiny-Test-4legs.json"))
    torch.manual_seed(0)
    enc = load_encoder("openclip:Tiny-Test-4legs:random")
    assert enc.name == "openclip-Tiny-Test-4legs" and enc.dim == 16 and enc.input_size == 32
    clips = torch.randn(3, 8, 3, 32, 32)
    out = enc.encode_video(clips)
    per_frame = torch.nn.functional.normalize(enc.model.encode_image(clips.flatten(0, 1)), dim=-1).view(3, 8, -1)
    torch.testing.assert_close(out, torch.nn.functional.normalize(per_frame.mean(1), dim=-1), rtol=1e-5, atol=1e-5)
    assert enc.encode_text(["a red ball", "stuff"]).shape == (2, 16)


@pytest.mark.parametrize("chunk", [50, None])
def test_tile_histograms_equal_average_pooling_of_the_soft_bins(chunk):
    """The separable box products of tile_histograms against the tiles' definition as pooling: each
    tile's mean of the soft colour bins over its kernel x kernel window, zero padding counted; in
    chunks of 50 bins (the last one short) and at the default (every bin at once at this size)."""
    gen = torch.Generator().manual_seed(1)
    h, w = 37, 53
    image = torch.rand(3, h, w, generator=gen)
    levels = tiles.tile_levels(h, w)
    bins, weights = tiles.soft_colour_bins(image)
    soft = torch.zeros(tiles.COLOUR_BINS**3, h, w).scatter_add_(0, bins, weights)
    for lv, hist in zip(levels, tiles.tile_histograms(image, levels, chunk=chunk)):
        pooled = F.avg_pool2d(soft[None], lv["kernel"], lv["stride"], lv["padding"], count_include_pad=True)[0]
        expected = pooled[:, : lv["rows"], : lv["cols"]].flatten(1)
        assert hist.shape == expected.shape
        assert torch.allclose(hist, expected, atol=1e-6), float((hist - expected).abs().max())


def test_purest_tiles_match_a_tile_by_tile_reference():
    """purest_tiles (histograms by pooling, gathers) against the definition, tile by tile: among the
    tiles whose centres surround a pixel on every level, the largest share of the tile's pixels (soft
    colour bins, zero padding counting as no colour) in the pixel's bins; the coarser on a tie."""
    gen = torch.Generator().manual_seed(0)
    h, w = 26, 33
    image = torch.rand(3, h, w, generator=gen) * 0.2 + 0.4  # a grey field ...
    image[:, 8:14, 10:17] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)  # ... with a red block
    levels = tiles.tile_levels(h, w)
    bins, weights = tiles.soft_colour_bins(image)
    soft = torch.zeros(tiles.COLOUR_BINS**3, h, w).scatter_add_(0, bins, weights)  # [B, H, W]
    expected = []
    for y in range(h):
        for x in range(w):
            a = soft[:, y, x]
            best, choice, offset = -1.0, None, 0
            candidates = []
            for li, lv in enumerate(levels):
                rows = tiles.interp_matrix(lv, lv["rows"], h, h, "cpu")[y].nonzero()[:, 0]
                cols = tiles.interp_matrix(lv, lv["cols"], w, w, "cpu")[x].nonzero()[:, 0]
                candidates += [(li, int(r), int(c), offset) for r in rows for c in cols]
                offset += lv["rows"] * lv["cols"]
            for li, r, c, off in sorted(candidates, key=lambda cand: -cand[0]):  # coarse first
                lv = levels[li]
                top, left = lv["stride"] * r - lv["padding"], lv["stride"] * c - lv["padding"]
                inside = soft[:, max(top, 0) : top + lv["kernel"], max(left, 0) : left + lv["kernel"]]
                share = float(a @ inside.sum((1, 2))) / lv["kernel"] ** 2 / float(a @ a)
                if share > best + 1e-6:
                    best, choice = share, off + r * lv["cols"] + c
            expected.append(choice)
    got = tiles.purest_tiles(levels, image, (h, w))
    assert (got == torch.tensor(expected)).float().mean() > 0.99  # float ties may fall either way
    red = got.view(h, w)[10, 13]  # a pixel inside the red block takes a tile of the finest level
    assert red < levels[0]["rows"] * levels[0]["cols"]
