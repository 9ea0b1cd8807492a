"""synthetic_sequence.py: the PanopticSports layout, ground truth consistent with the images,
the grounding benchmark, determinism. On a tiny sequence (64x36, 6 timesteps)."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import helpers
import synthetic_sequence

W, H, T = 64, 36, 6
NUM_CAMS, TEST_CAMS = 14, [0, 7]


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    out = str(root / "data" / "synthetic")
    objects = synthetic_sequence.generate(
        out,
        benchmark=str(root / "grounding"),
        width=W,
        height=H,
        num_timesteps=T,
        seed=0,
        video_dir=str(root / "videos"),
    )
    return {"root": root, "out": out, "objects": objects}


def read_png(path):
    return np.asarray(Image.open(path))


def test_layout(seq):
    out = seq["out"]
    for c in range(NUM_CAMS):
        for t in range(T):
            for sub, ext in (("ims", "jpg"), ("seg", "png"), (os.path.join("gt", "ids"), "png")):
                assert os.path.isfile(os.path.join(out, sub, str(c), f"{t:06d}.{ext}")), (sub, c, t)
    for name in (
        "train_meta.json",
        "test_meta.json",
        "init_pt_cld.npz",
        os.path.join("gt", "params.npz"),
        os.path.join("gt", "objects.json"),
    ):
        assert os.path.isfile(os.path.join(out, name)), name
    for o in seq["objects"]:
        for c in TEST_CAMS:
            assert os.path.isfile(seq["root"] / "grounding" / "synthetic" / o["prompt_dir"] / f"cam{c}.pt")
    for c in TEST_CAMS:
        assert os.path.getsize(seq["root"] / "videos" / "synthetic" / f"cam{c}.mp4") > 1000
    assert not any(name.startswith(".tmp") for _, _, files in os.walk(seq["root"]) for name in files)


def test_meta_loads_and_cameras_ring_the_scene(seq):
    train = helpers.load_meta(seq["out"], "train")
    test = helpers.load_meta(seq["out"], "test")
    assert test["cam_id"] == TEST_CAMS
    assert train["cam_id"] == [c for c in range(NUM_CAMS) if c not in TEST_CAMS]
    assert (train["w"], train["h"], len(train["fn"])) == (W, H, T)
    helpers.check_sequence(seq["out"], train, masks=True)
    helpers.check_sequence(seq["out"], test, masks=True)
    assert helpers.load_image(os.path.join(seq["out"], "ims", train["fn"][3][2]), (W, H)).shape == (3, H, W)
    centres = []
    for meta in (train, test):
        for c in range(len(meta["cam_id"])):
            w2c, k = np.array(meta["w2c"][0][c]), np.array(meta["k"][0][c])
            centres.append(np.linalg.inv(w2c)[:3, 3])
            look = w2c[:3, :3] @ np.array(synthetic_sequence.LOOK_AT) + w2c[:3, 3]
            assert look[2] > 0
            np.testing.assert_allclose((k @ look)[:2] / look[2], [W / 2, H / 2], atol=1e-6)  # looks at the centre
    centres = np.array(centres)
    assert (centres[:, 1] < -1.0).all()  # above the floor (up is -y)
    np.testing.assert_allclose(np.hypot(centres[:, 0], centres[:, 2]), synthetic_sequence.RING_RADIUS, rtol=1e-9)


def test_params_in_dynamic_3dgs_format(seq):
    path = os.path.join(seq["out"], "gt", "params.npz")
    with np.load(path) as f:
        params = {k: f[k] for k in f.files}
    assert sorted(params) == sorted(helpers.D3DGS_PER_TIMESTEP + helpers.D3DGS_SHARED)
    num_t, n, _ = params["means3D"].shape
    assert num_t == T and params["unnorm_rotations"].shape == (T, n, 4) and params["rgb_colors"].shape == (T, n, 3)
    assert params["cam_m"].shape == params["cam_c"].shape == (NUM_CAMS - len(TEST_CAMS), 3)
    assert (params["cam_m"] == 0).all() and (params["cam_c"] == 0).all()
    assert all(v.dtype == np.float32 for v in params.values())
    fg = params["seg_colors"][:, 0]
    assert set(np.unique(fg)) == {0.0, 1.0}
    np.testing.assert_array_equal(params["seg_colors"], np.stack([fg, 0 * fg, 1 - fg], 1))
    helpers.read_d3dgs_params(path)  # the stage-1 reader accepts it
    # the ground truth of objects.json: object Gaussians are foreground, the room is background
    with open(os.path.join(seq["out"], "gt", "objects.json")) as f:
        info = json.load(f)
    for o in info["objects"]:
        start, stop = o["gaussians"]
        assert (fg[start:stop] == 1).all()
    start, stop = info["background_gaussians"]
    assert stop == n and (fg[start:stop] == 0).all()
    cloud = np.load(os.path.join(seq["out"], "init_pt_cld.npz"))["data"]
    assert cloud.shape == (n, 7)
    np.testing.assert_array_equal(cloud[:, 6], fg)
    assert np.abs(cloud[:, :3] - params["means3D"][0]).max() < 0.1
    assert 0 <= cloud[:, 3:6].min() and cloud[:, 3:6].max() <= 1


def test_images_are_renders_of_the_ground_truth(seq):
    """Rendering gt/params.npz as stage 1 does (helpers.render_d3dgs) gives the stored images up
    to JPEG loss, and the rendered segmentation matches seg/."""
    meta = helpers.load_meta(seq["out"], "train")
    for t, c in ((0, 0), (4, 7)):
        cam = helpers.setup_camera(W, H, meta["k"][t][c], meta["w2c"][t][c])
        rendervar = helpers.load_d3dgs_params(os.path.join(seq["out"], "gt", "params.npz"), t)
        im, seg, _, _ = helpers.render_d3dgs(cam, rendervar)
        stored = helpers.load_image(os.path.join(seq["out"], "ims", meta["fn"][t][c]))
        assert helpers.psnr(im.clamp(0, 1), stored) > 33
        mask = helpers.load_mask(helpers.seg_path(seq["out"], meta["fn"][t][c]))
        assert ((seg[0] > seg[2]).float() == mask).float().mean() > 0.97


def test_objects_json(seq):
    with open(os.path.join(seq["out"], "gt", "objects.json")) as f:
        info = json.load(f)
    assert info["num_timesteps"] == T and info["none_id"] == 0
    assert [(o["id"], o["name"], o["colour"], o["prompt"]) for o in info["objects"]] == [
        (1, "ball", "red", "a red ball flying in the air"),
        (2, "box", "blue", "a blue box sliding on the floor"),
        (3, "top", "green", "a green top spinning"),
    ]
    for o in info["objects"]:
        assert o["prompt_dir"] == o["prompt"].replace(" ", "_")
        assert sorted(o["moving_timesteps"] + o["static_timesteps"]) == list(range(T))
    moving = {o["name"]: o["moving_timesteps"] for o in info["objects"]}
    assert moving["top"] == list(range(T))
    assert 0 < len(moving["ball"]) < T and moving["ball"][0] > 0 and moving["ball"][-1] < T - 1
    assert moving["box"][0] > 0 and moving["box"][-1] < T - 1
    assert info == {**info, "objects": seq["objects"]}


def test_motion_matches_moving_timesteps():
    """Per object: the pose changes exactly around the moving timesteps; at the default size,
    moving objects cross several pixels per timestep."""
    params, object_id, objects = synthetic_sequence.build_scene(24, seed=0)
    means, quats = params["means3D"], params["unnorm_rotations"]
    by_name = {o["name"]: o for o in objects}
    centre = {name: means[:, slice(*o["gaussians"])].mean(1) for name, o in by_name.items()}
    ball, box = by_name["ball"], by_name["box"]
    assert ball["moving_timesteps"] == list(range(10, 20)) and box["moving_timesteps"] == list(range(9, 19))
    lift = -(centre["ball"][:, 1] - centre["ball"][0, 1])  # height above its resting height
    assert (lift[ball["moving_timesteps"]] > 0.05).all() and np.abs(lift[ball["static_timesteps"]]).max() < 1e-6
    step = np.linalg.norm(np.diff(centre["box"], axis=0), axis=1)
    assert (step[8:19] > 1e-3).all() and (step[:8] < 1e-6).all() and (step[19:] < 1e-6).all()
    assert np.linalg.norm(centre["top"] - centre["top"][0], axis=1).max() < 2e-3  # spins in place
    assert (np.abs(np.diff(quats[:, slice(*by_name["top"]["gaussians"])], axis=0)).max(axis=(1, 2)) > 0.1).all()
    room = slice(objects[-1]["gaussians"][1], None)
    assert (means[:, room] == means[0, room]).all()
    # at 320x180 every object stays in every camera's view, and moving ones cross several pixels
    # per timestep (fewer where a camera sees the motion mostly in depth)
    medians = {"ball": [], "box": []}
    for k, w2c in synthetic_sequence.ring_cameras(320, 180, NUM_CAMS):
        k, w2c = np.array(k), np.array(w2c)
        for name, o in by_name.items():
            cam = means[:, slice(*o["gaussians"])] @ w2c[:3, :3].T + w2c[:3, 3]
            px = cam[..., :2] / cam[..., 2:] * k[0, 0] + k[:2, 2]
            assert px.min() > 2 and px[..., 0].max() < 318 and px[..., 1].max() < 178, name
        for name in medians:
            cam = centre[name] @ w2c[:3, :3].T + w2c[:3, 3]
            px = cam[:, :2] / cam[:, 2:] * k[0, 0]
            moves = np.linalg.norm(np.diff(px, axis=0), axis=1)[by_name[name]["moving_timesteps"][:-1]]
            medians[name].append(np.median(moves))
    for name, m in medians.items():
        assert min(m) > 3 and np.mean(m) > 6, (name, m)


def test_ids_and_masks_match_colours(seq):
    """Pixels of each object id have that object's colour; seg = id > 0."""
    colour_channel = {1: 0, 2: 2, 3: 1}  # ball red, box blue, top green
    counts = {i: 0 for i in colour_channel}
    for c in range(0, NUM_CAMS, 3):
        for t in range(0, T, 2):
            ids = read_png(os.path.join(seq["out"], "gt", "ids", str(c), f"{t:06d}.png"))
            seg = read_png(os.path.join(seq["out"], "seg", str(c), f"{t:06d}.png"))
            np.testing.assert_array_equal(seg.astype(bool), ids > 0)
            rgb = read_png(os.path.join(seq["out"], "ims", str(c), f"{t:06d}.jpg")).astype(float)
            for i, ch in colour_channel.items():
                inner = ids == i
                counts[i] += inner.sum()
                if inner.sum() > 20:  # slivers (an object mostly hidden) are mostly blended edge pixels
                    mean = rgb[inner].mean(0)
                    assert mean[ch] > mean.sum() - mean[ch], (c, t, i, mean)  # the channel dominates
            assert set(np.unique(ids)) <= {0, 1, 2, 3}
    assert all(v > 50 for v in counts.values()), counts  # every object is seen


def test_benchmark_files(seq):
    for o in seq["objects"]:
        for c in TEST_CAMS:
            data = torch.load(seq["root"] / "grounding" / "synthetic" / o["prompt_dir"] / f"cam{c}.pt")
            assert set(data) == {"masks", "boxes"}
            frames = sorted(data["masks"])
            assert frames == sorted(data["boxes"]) and frames
            assert set(frames) <= set(o["moving_timesteps"])
            for t in o["moving_timesteps"]:
                ids = read_png(os.path.join(seq["out"], "gt", "ids", str(c), f"{t:06d}.png"))
                if t not in data["masks"]:
                    assert not (ids == o["id"]).any()  # absent only when the object is not seen
                    continue
                mask = data["masks"][t]
                assert mask.dtype == torch.bool and mask.shape == (H, W)
                np.testing.assert_array_equal(mask.numpy(), ids == o["id"])
                rows, cols = np.nonzero(ids == o["id"])
                assert list(data["boxes"][t]) == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_deterministic_for_a_seed(seq, tmp_path):
    out = str(tmp_path / "synthetic")
    synthetic_sequence.generate(out, width=W, height=H, num_timesteps=T, seed=0)
    for sub in ("ims", "seg", os.path.join("gt", "ids")):
        for c in (0, 9):
            for t in (0, T - 1):
                ext = "jpg" if sub == "ims" else "png"
                a = os.path.join(seq["out"], sub, str(c), f"{t:06d}.{ext}")
                b = os.path.join(out, sub, str(c), f"{t:06d}.{ext}")
                with open(a, "rb") as fa, open(b, "rb") as fb:
                    assert fa.read() == fb.read(), a
    for name in ("train_meta.json", "test_meta.json", os.path.join("gt", "objects.json")):
        with open(os.path.join(seq["out"], name)) as fa, open(os.path.join(out, name)) as fb:
            assert fa.read() == fb.read()
    for name in (os.path.join("gt", "params.npz"), "init_pt_cld.npz"):
        with np.load(os.path.join(seq["out"], name)) as fa, np.load(os.path.join(out, name)) as fb:
            assert all(np.array_equal(fa[k], fb[k]) for k in fa.files)
    other, _, _ = synthetic_sequence.build_scene(T, seed=1, coarse=160.0 / W)
    same, _, _ = synthetic_sequence.build_scene(T, seed=0, coarse=160.0 / W)
    assert not np.array_equal(other["rgb_colors"], same["rgb_colors"])
    assert np.array_equal(other["means3D"], same["means3D"])


def test_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the sequence goes under data/ of the working directory
    out = tmp_path / "data" / "seq"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "synthetic_sequence.py",
            "--out",
            str(out),
            "--benchmark",
            "",
            "--video-dir",
            "",
            "--width",
            "32",
            "--height",
            "18",
            "--timesteps",
            "3",
            "--train-cams",
            "3",
            "--test-cams",
            "1",
        ],
    )
    synthetic_sequence.main()
    assert f"wrote {out}" in capsys.readouterr().out
    meta = helpers.load_meta(str(out), "test")
    assert meta["cam_id"] == [0] and (meta["w"], meta["h"]) == (32, 18)
    assert not (tmp_path / "grounding").exists()
    with pytest.raises(helpers.UserError, match="at least 16x16"):
        synthetic_sequence.generate(str(out), width=8, height=8)
    with pytest.raises(helpers.UserError, match="at least 2 timesteps"):
        synthetic_sequence.generate(str(out), num_timesteps=1)
