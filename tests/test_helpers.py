"""helpers.py, data and camera section: bad input gives one clear UserError naming the file and the
problem; cameras follow the OpenCV convention of the data."""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import helpers

W, H = 24, 16
CAMS = [3, 5]


def good_meta(num_t=3):
    """A valid two-camera meta dict (PanopticSports layout, cam_id repeated per timestep)."""
    k = [[20.0, 0.0, W / 2], [0.0, 20.0, H / 2], [0.0, 0.0, 1.0]]
    w2cs = [helpers.orbit_w2c((0, 0, 0), 3.0, 1.0, a).tolist() for a in (0.0, 1.0)]
    return {
        "w": W,
        "h": H,
        "k": [[k, k] for _ in range(num_t)],
        "w2c": [list(w2cs) for _ in range(num_t)],
        "fn": [[f"{c}/{t:06d}.jpg" for c in CAMS] for t in range(num_t)],
        "cam_id": [list(CAMS) for _ in range(num_t)],
    }


def write_sequence(root, meta=None, images=True, masks=True):
    """A sequence folder: train_meta.json (raw text when `meta` is a str) and its images/masks."""
    meta = good_meta() if meta is None else meta
    root.mkdir(parents=True, exist_ok=True)
    (root / "train_meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    if images or masks:
        for fns in meta["fn"]:
            for fn in fns:
                if images:
                    (root / "ims" / fn).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(root / "ims" / fn)
                if masks:
                    (root / "seg" / fn).parent.mkdir(parents=True, exist_ok=True)
                    mask = np.zeros((H, W), bool)
                    mask[4:9, 5:12] = True
                    Image.fromarray(mask).save(root / "seg" / fn.replace(".jpg", ".png"))
    return root


def meta_error(tmp_path, meta):
    """The UserError load_meta raises for `meta`; checks that it names the file."""
    write_sequence(tmp_path, meta, images=False, masks=False)
    with pytest.raises(helpers.UserError) as e:
        helpers.load_meta(str(tmp_path), "train")
    assert os.path.join(str(tmp_path), "train_meta.json") in str(e.value)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_good_meta_loads(tmp_path):
    write_sequence(tmp_path)
    meta = helpers.load_meta(str(tmp_path), "train")
    assert (meta["w"], meta["h"], meta["cam_id"]) == (W, H, CAMS)
    assert len(meta["fn"]) == 3 and meta["path"].endswith("train_meta.json")
    helpers.check_sequence(str(tmp_path), meta, masks=True)
    flat = good_meta()
    flat["cam_id"] = list(CAMS)  # cam_id given once, not per timestep
    write_sequence(tmp_path, flat)
    assert helpers.load_meta(str(tmp_path), "train")["cam_id"] == CAMS


def test_missing_meta(tmp_path):
    with pytest.raises(helpers.UserError, match="test_meta.json not found"):
        helpers.load_meta(str(tmp_path), "test")


@pytest.mark.parametrize(
    "text,problem",
    [
        ('{"w": 24, "h": 16, "k": [', "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "JSON list, not an object"),
    ],
)
def test_malformed_json(tmp_path, text, problem):
    assert problem in meta_error(tmp_path, text)


def edit(path, value=None, delete=False):
    """good_meta() with meta[path...] replaced by value (or deleted)."""
    meta = good_meta()
    node = meta
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return meta


@pytest.mark.parametrize(
    "meta,problem",
    [
        (edit(["fn"], delete=True), "lacks key(s) fn"),
        (edit(["w"], "640"), "'w' is '640'"),
        (edit(["h"], -5), "'h' is -5"),
        (edit(["fn"], []), "'fn' must be a non-empty list"),
        (edit(["k"], good_meta()["k"][:2]), "'k' must be a list over the 3 timesteps"),
        # camera count mismatch between k / w2c / fn / cam_id
        (edit(["k", 1], good_meta()["k"][1][:1]), "timestep 1 has 1 entries in 'k' but cam_id lists 2"),
        (edit(["w2c", 2], good_meta()["w2c"][2] * 2), "timestep 2 has 4 entries in 'w2c' but cam_id lists 2"),
        (edit(["fn", 0], ["3/000000.jpg"]), "timestep 0 has 1 entries in 'fn' but cam_id lists 2"),
        (edit(["cam_id"], [[3, 5, 7]] * 3), "timestep 0 has 2 entries in 'k' but cam_id lists 3"),
        (edit(["cam_id"], [[3, 5]] * 2), "'cam_id' lists 2 timesteps, 'fn' 3"),
        (edit(["cam_id"], "3,5"), "'cam_id' must be a non-empty list"),
        # cameras differing between timesteps
        (edit(["cam_id", 2], [5, 3]), "the cameras differ between timesteps"),
        (edit(["fn", 1], ["5/000001.jpg", "3/000001.jpg"]), "the cameras differ"),
        (edit(["fn", 1, 0], "000001.jpg"), "not '<camera>/<image file>'"),
        # wrong array shapes, bad numbers
        (edit(["k", 0, 0], [[20.0, 0.0], [0.0, 20.0], [0.0, 0.0]]), "'k' is not a [3][2][3][3] array"),
        (edit(["k"], [[[[20.0, 0.0, 1.0]] * 2] * 2] * 3), "'k' has shape [3, 2, 2, 3], expected [3, 2, 3, 3]"),
        (edit(["w2c"], [[np.eye(4)[:3].tolist()] * 2] * 3), "'w2c' has shape [3, 2, 3, 4], expected [3, 2, 4, 4]"),
        (edit(["w2c", 0, 1, 0, 3], "far"), "'w2c' is not a [3][2][4][4] array of numbers"),
        (edit(["w2c", 1, 0, 2, 3], float("nan")), "'w2c' holds NaN or Inf"),
        (edit(["w2c", 1, 0, 0], [2.0, 0.0, 0.0, 0.0]), "not a rigid world-to-camera transform"),
        (edit(["k", 0, 1, 0, 0], -20.0), "not an intrinsics matrix"),
    ],
)
def test_bad_meta(tmp_path, meta, problem):
    message = meta_error(tmp_path, meta)
    assert problem in message, message


def test_missing_and_bad_images(tmp_path):
    write_sequence(tmp_path)
    meta = helpers.load_meta(str(tmp_path), "train")
    image = tmp_path / "ims" / "5" / "000002.jpg"
    mask = tmp_path / "seg" / "5" / "000001.png"
    assert helpers.load_image(str(image), (W, H)).shape == (3, H, W)
    os.remove(image)
    with pytest.raises(helpers.UserError, match=f"image {image} listed in .*train_meta.json not found"):
        helpers.check_sequence(str(tmp_path), meta)
    helpers.check_sequence(str(tmp_path), meta, 0, 1)  # timestep 2 not asked for
    with pytest.raises(helpers.UserError, match=f"image {image} not found"):
        helpers.load_image(str(image))
    os.remove(mask)
    helpers.check_sequence(str(tmp_path), meta, 0, 1)
    with pytest.raises(helpers.UserError, match=f"mask {mask} of image .* not found"):
        helpers.check_sequence(str(tmp_path), meta, 0, 1, masks=True)
    with pytest.raises(helpers.UserError, match=r"timesteps 1\.\.3 asked for, but .* has timesteps 0\.\.2"):
        helpers.check_sequence(str(tmp_path), meta, 1, 3)
    broken = tmp_path / "ims" / "3" / "000000.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(helpers.UserError, match=f"image {broken} cannot be read"):
        helpers.load_image(str(broken))
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((H, W - 1, 3), np.uint8)).save(small)
    with pytest.raises(helpers.UserError, match=f"image {small} is {W - 1}x{H}, the meta file says {W}x{H}"):
        helpers.load_image(str(small), (W, H))
    with pytest.raises(helpers.UserError, match="mask .* is"):
        helpers.load_mask(str(small), (W, H + 1))


def test_masks_one_bit_and_eight_bit(tmp_path):
    mask = np.zeros((H, W), bool)
    mask[2:5, 3:9] = True
    Image.fromarray(mask).save(tmp_path / "a.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        m = helpers.load_mask(str(tmp_path / name), (W, H))
        assert m.dtype == torch.float32 and torch.equal(m, torch.from_numpy(mask.astype(np.float32)))
    assert helpers.seg_path("seq", "3/000007.jpg") == os.path.join("seq", "seg", "3", "000007.png")


def test_run_main_turns_user_error_into_one_line(capsys):
    def main():
        raise helpers.UserError("data/x/train_meta.json not found: do this")

    with pytest.raises(SystemExit) as e:
        helpers.run_main(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: data/x/train_meta.json not found: do this\n"


# ---------------------------------------------------------------- cameras


def test_setup_camera_pixel_convention():
    """A point at camera coordinates (x, y, z) lands at column fx x / z + cx - 0.5 and row
    fy y / z + cy - 0.5 (the original's NDC-to-pixel mapping), with tan(fov/2) = size / (2 f)."""
    k = np.array([[50.0, 0.0, 31.0], [0.0, 55.0, 22.0], [0.0, 0.0, 1.0]])
    w2c = helpers.orbit_w2c((0.3, -0.2, 0.1), 4.0, 1.5, 2.0)
    cam = helpers.setup_camera(64, 48, k, w2c, dtype=torch.float64)
    assert (cam.image_width, cam.image_height) == (64, 48)
    assert math.isclose(cam.tanfovx, 64 / 100) and math.isclose(cam.tanfovy, 48 / 110)
    world = np.array([0.5, -0.4, 0.2])
    x, y, z = w2c[:3, :3] @ world + w2c[:3, 3]
    p = torch.cat([torch.tensor(world), torch.ones(1, dtype=torch.float64)]) @ cam.projmatrix
    ndc = p[:2] / p[3]
    pixel = ((ndc + 1) * torch.tensor([64.0, 48.0], dtype=torch.float64) - 1) / 2
    np.testing.assert_allclose(pixel.numpy(), [50 * x / z + 31 - 0.5, 55 * y / z + 22 - 0.5], atol=1e-9)
    view = torch.cat([torch.tensor(world), torch.ones(1, dtype=torch.float64)]) @ cam.viewmatrix
    assert math.isclose(view[2].item(), z, rel_tol=1e-12)
    np.testing.assert_allclose(cam.campos.numpy(), np.linalg.inv(w2c)[:3, 3], atol=1e-12)


def test_orbit_w2c_looks_at_the_centre_upright():
    centre = np.array([0.5, -0.3, 0.2])
    for angle in np.linspace(0, 2 * math.pi, 7):
        w2c = helpers.orbit_w2c(centre, 4.0, 1.5, angle)
        rot = w2c[:3, :3]
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
        assert math.isclose(np.linalg.det(rot), 1.0, rel_tol=1e-12)
        position = np.linalg.inv(w2c)[:3, 3]
        assert math.isclose(position[1], centre[1] - 1.5, abs_tol=1e-12)  # 'up' is -y
        assert math.isclose(np.hypot(*(position - centre)[[0, 2]]), 4.0, rel_tol=1e-12)
        look = w2c[:3, :3] @ centre + w2c[:3, 3]
        np.testing.assert_allclose(look[:2], 0, atol=1e-12)  # the centre is straight ahead
        above = w2c[:3, :3] @ (centre + [0, -1.0, 0]) + w2c[:3, 3]
        assert above[1] / above[2] < 0  # a point above the centre is higher in the image (row < cy)


def test_orbit_cameras_circle_the_foreground_at_the_cameras_median_distance():
    centre = np.array([0.5, -0.3, 0.2])
    distances = (3.0, 4.0, 9.0)  # the median, not the mean: one far camera does not move the orbit
    meta = {
        "w": W,
        "h": H,
        "k": [[[[20.0, 0.0, W / 2], [0.0, 20.0, H / 2], [0.0, 0.0, 1.0]]] * 3],
        "w2c": [[helpers.orbit_w2c(centre, d, 1.5, a).tolist() for d, a in zip(distances, (0.0, 2.0, 4.0))]],
    }
    means3D = np.concatenate([centre + 0.01 * np.eye(3), centre - 0.01 * np.eye(3), [[9.0, 9.0, 9.0]]])
    cams = helpers.orbit_cameras(meta, means3D, np.arange(7) < 6, 8)  # the far point is background
    assert len(cams) == 8
    for cam in cams:
        w2c = cam.viewmatrix.T.numpy().astype(np.float64)
        position = np.linalg.inv(w2c)[:3, 3]
        assert math.isclose(np.hypot(*(position - centre)[[0, 2]]), 4.0, rel_tol=1e-5)
        assert math.isclose(centre[1] - position[1], 1.5, rel_tol=1e-5)
        np.testing.assert_allclose((w2c[:3, :3] @ centre + w2c[:3, 3])[:2], 0, atol=1e-5)


def test_scale_intrinsics_matches_the_rasterizer_on_downscaled_images():
    """A small Gaussian rendered at 64x48 and area-averaged to 16x12 lies where it renders at 16x12
    with the scaled intrinsics (k counts from the corner: c -> c / 4, not (c + 0.5) / 4 - 0.5)."""
    k = np.array([[50.0, 0.0, 31.0], [0.0, 55.0, 22.0], [0.0, 0.0, 1.0]])
    gaussian = {
        "means3D": torch.tensor([[0.3, -0.2, 2.0]]),
        "rotations": torch.tensor([[1.0, 0, 0, 0]]),
        "opacities": torch.ones(1, 1),
        "scales": torch.full((1, 3), 0.02),
        "colors_precomp": torch.ones(1, 3),
        "seg_colors": torch.ones(1, 3),
        "means2D": torch.zeros(1, 3),
    }

    def centre(w, h, k):
        with torch.no_grad():
            im = helpers.render_d3dgs(
                helpers.setup_camera(w, h, k, np.eye(4), dtype=torch.float64),
                {key: v.double() for key, v in gaussian.items()},
            )[0][0]
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        return float((im * xs).sum() / im.sum()), float((im * ys).sum() / im.sum())

    meta = {"w": 64, "h": 48, "k": [[k.tolist()]], "path": "meta"}
    small = helpers.scale_meta(meta, 4)
    assert (small["w"], small["h"]) == (16, 12)
    np.testing.assert_allclose(small["k"][0][0], k * [[0.25], [0.25], [1]])
    large = np.array(centre(64, 48, k)) / 4  # the area-averaged image's centroid, in its own pixels
    np.testing.assert_allclose(centre(16, 12, small["k"][0][0]), large, atol=0.05)


def test_ray_directions_pass_through_the_pixel_centres():
    """Pixel (u, v) looks along R^T ((u + 0.5 - cx) / fx, (v + 0.5 - cy) / fy, 1): the direction
    that setup_camera's convention projects back onto that pixel."""
    k = np.array([[50.0, 0.0, 31.0], [0.0, 55.0, 22.0], [0.0, 0.0, 1.0]])
    w2c = helpers.orbit_w2c((0.3, -0.2, 0.1), 4.0, 1.5, 2.0)
    dirs = helpers.ray_directions(helpers.setup_camera(64, 48, k, w2c, near=1.0, far=100.0))
    assert dirs.shape == (48, 64, 3)
    v, u = np.meshgrid(np.arange(48) + 0.5, np.arange(64) + 0.5, indexing="ij")
    camera = np.stack([(u - 31.0) / 50.0, (v - 22.0) / 55.0, np.ones_like(u)], -1)
    want = camera @ w2c[:3, :3]  # R^T applied to each row
    np.testing.assert_allclose(dirs.numpy(), want / np.linalg.norm(want, axis=-1, keepdims=True), atol=1e-5)


def test_env_map_is_sampled_by_direction_and_wraps_around_in_azimuth():
    """Straight up reads row 0, straight down the last row, the horizon the middle rows; azimuth
    atan2(x, z) runs over the columns from -pi, and the seam at +-pi blends its two edge columns."""
    rows = 8
    env_map = torch.zeros(3, rows, 2 * rows)
    env_map[0] = torch.arange(rows, dtype=torch.float32)[:, None]  # red: the row
    env_map[1] = torch.arange(2 * rows, dtype=torch.float32)[None]  # green: the column
    dirs = torch.tensor([[[0.0, -1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]])
    colours = helpers.sample_env_map(env_map, dirs)[:, 0].T
    assert colours[0, 0] == 0 and colours[1, 0] == rows - 1  # up, down (clamped at the poles)
    assert colours[2, 0] == (rows - 1) / 2 and colours[2, 1] == (2 * rows - 1) / 2  # +z: azimuth 0, the middle
    assert colours[3, 1] == (2 * rows - 1) / 2  # -z, the seam: half the first column, half the last


def test_render_over_a_background_shows_it_where_the_gaussians_let_light_through():
    """render_d3dgs(cam, gaussians, background): one opaque Gaussian in the middle of the view, the
    background's colour everywhere else, counted there as background in the segmentation by the
    background's open share (left half open, a sky; right half closed, to be covered by Gaussians)."""
    k = np.array([[40.0, 0.0, 16.0], [0.0, 40.0, 12.0], [0.0, 0.0, 1.0]])
    cam = helpers.setup_camera(32, 24, k, np.eye(4))
    gaussian = {
        "means3D": torch.tensor([[0.0, 0.0, 3.0]]),
        "rotations": torch.tensor([[1.0, 0, 0, 0]]),
        "opacities": torch.full((1, 1), 0.999),
        "scales": torch.full((1, 3), 0.3),
        "colors_precomp": torch.tensor([[1.0, 0.0, 0.0]]),
        "seg_colors": torch.tensor([[1.0, 0.0, 0.0]]),
    }
    background = torch.tensor([0.1, 0.5, 0.9, 1.0])[:, None, None].repeat(1, 24, 32)
    background[3, :, 16:] = 0.0
    with torch.no_grad():
        plain, plain_seg, _, _ = helpers.render_d3dgs(cam, gaussian)
        im, seg, _, _ = helpers.render_d3dgs(cam, gaussian, background)
    through = 1 - plain_seg.sum(0)
    assert through[12, 16] < 0.05 and through[0, 0] > 0.99  # (a Gaussian blends at most 0.99 of its colour)
    torch.testing.assert_close(im, plain + through * background[:3])
    torch.testing.assert_close(seg[2, :, :16], plain_seg[2, :, :16] + through[:, :16])
    torch.testing.assert_close(seg[2, :, 16:], plain_seg[2, :, 16:])
    torch.testing.assert_close(seg[:2], plain_seg[:2])


def test_an_env_map_of_the_wrong_shape_is_refused_in_one_line(tmp_path):
    arrays = {
        "means3D": np.zeros((1, 2, 3), np.float32),
        "rgb_colors": np.zeros((1, 2, 3), np.float32),
        "unnorm_rotations": np.ones((1, 2, 4), np.float32),
        "seg_colors": np.zeros((2, 3), np.float32),
        "logit_opacities": np.zeros((2, 1), np.float32),
        "log_scales": np.zeros((2, 3), np.float32),
        "cam_m": np.zeros((1, 3), np.float32),
        "cam_c": np.zeros((1, 3), np.float32),
    }
    path = str(tmp_path / "params.npz")
    np.savez(path, **arrays)
    assert helpers.load_env_map(path) is None  # the original's params.npz: rendered over black
    np.savez(path, **arrays, env_map=np.zeros((3, 4, 8), np.float32))  # colour alone, as 87162e8 wrote it
    with pytest.raises(helpers.UserError, match=r"'env_map' has shape \[3, 4, 8\], expected \[4, rows, 2 rows\]"):
        helpers.load_env_map(path)


# ---------------------------------------------------------------- command line


def test_sequence_by_name_under_data(tmp_path, monkeypatch, capsys):
    (tmp_path / "data" / "basketball").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert helpers.find_sequence("basketball") == os.path.join("data", "basketball")
    assert helpers.find_sequence("data/basketball/") == os.path.join("data", "basketball")
    assert capsys.readouterr().out.splitlines() == ["sequence folder: data/basketball"] * 2
    with pytest.raises(helpers.UserError, match="-s football: neither football nor data/football is a folder"):
        helpers.find_sequence("football")


def test_progress_off_a_terminal_is_plain_lines(capsys, monkeypatch):
    monkeypatch.setattr(helpers, "PLAIN_PROGRESS_SECONDS", 0)
    for _ in helpers.progress(range(3), desc="work"):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") >= 2 and err.splitlines()[-1].startswith("work: 100% 3/3")


SCRIPTS = {
    "train_d3dgs.py",
    "visualize_d3dgs.py",
    "extract_features.py",
    "train_autoencoder.py",
    "train_4legs.py",
    "visualize_4legs.py",
}


def test_one_stage_table_for_readme_docstrings_and_help():
    assert set(helpers.STAGES) == SCRIPTS
    assert [s.number for s in helpers.STAGES.values()] == list(range(1, 7))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        assert helpers.stages_table() in f.read()
    for script, stage in helpers.STAGES.items():
        with open(os.path.join(root, script)) as f:
            source = f.read()
        assert source.startswith(f'"""Stage {stage.number} of 4-LEGS: '), script
        assert (
            f'helpers.stage_description("{script}")' in source or f'helpers.stage_help("{script}", __doc__)' in source
        ), script
    assert helpers.run_first("train_4legs.py", "python train_4legs.py") == (
        "run stage 5 (train_4legs.py) first: python train_4legs.py"
    )


@pytest.mark.realdata
def test_the_real_capture_passes_the_checks(basketball):
    """The PanopticSports basketball capture as the Dynamic 3D Gaussians release packages it."""
    meta, test_meta = helpers.load_meta(basketball, "train"), helpers.load_meta(basketball, "test")
    assert (meta["w"], meta["h"]) == (640, 360) and len(meta["cam_id"]) == 27
    assert test_meta["cam_id"] == [0, 10, 15, 30] and len(test_meta["fn"]) == len(meta["fn"]) == 150
    helpers.check_sequence(basketball, meta, 0, 0, masks=True)
    helpers.check_sequence(basketball, test_meta, 0, 0)


def test_quantize_rows_round_trip_within_half_a_step_of_each_row():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 128, generator=g) * torch.logspace(-4, 1, 50)[:, None]  # rows of very different size
    x[7] = 0.0
    values, scales = helpers.quantize_rows(x)
    assert values.dtype == torch.int8 and values.shape == x.shape and scales.shape == (50,)
    back = helpers.dequantize_rows(values, scales)
    assert torch.equal(back[7], torch.zeros(128))
    step = x.abs().amax(1) / 127
    assert ((back - x).abs().amax(1) <= 0.5 * step * (1 + 1e-5)).all()
    assert torch.nn.functional.cosine_similarity(back[x.norm(dim=1) > 0], x[x.norm(dim=1) > 0]).min() > 0.9999
