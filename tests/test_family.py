"""The scene family of synthetic_sequence.py --seed and what a new rig needs from stage 1 (issue 13).

The description of a member is drawn from its seed alone; tiny members are written and the initial
point cloud of stage 1 is built on them: no background point may lie between a camera and the
scene, whatever the rig."""

import contextlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

import evaluate_grounding
import extract_features
import helpers
import point_cloud
import synthetic_sequence
import train_d3dgs
from feature_extraction import cache_dir, dense_feature_map, load_encoder
from feature_extraction.relevancy import encode_prompts, relevancy

SEEDS = (1, 2, 3, 4, 5)


def test_members_vary_what_rigs_vary_and_repeat_for_a_seed():
    scenes = [synthetic_sequence.draw_scene(seed) for seed in range(1, 41)]
    assert synthetic_sequence.draw_scene(7) == scenes[6]
    rigs = [s["rig"] for s in scenes]
    assert all(6 <= r["num_train"] <= 30 for r in rigs) and len({r["num_train"] for r in rigs}) > 10
    assert {r["shape"] for r in rigs} == {"ring", "dome"}
    assert {s["background"]["kind"] for s in scenes} == {"sky", "room"}
    assert {k for r in rigs for k in r["test"]} == {"on", "above", "below", "closer"}
    assert all(r["test"][0] == "on" and len(r["test"]) >= 2 for r in rigs)  # always one on the rig, one off it
    assert {s["floor"]["pattern"] for s in scenes} == {"chequer", "stripes", "blotches"}
    for s in scenes:
        objects = s["objects"]
        assert 3 <= len(objects) <= 5
        assert any(o["motion"] == "static" for o in objects)
        assert any(o["motion"] in ("thrown", "sliding") for o in objects)
        assert len({o["colour"] for o in objects}) == len(objects)
    assert {o["motion"] for s in scenes for o in s["objects"]} == {"thrown", "sliding", "spinning", "static"}
    assert {o["shape"] for s in scenes for o in s["objects"]} == set(synthetic_sequence.SHAPES)
    sizes = [synthetic_sequence.draw_image_size(seed) for seed in range(1, 41)]
    assert all(w % 16 and h % 16 and 300 <= w <= 400 for w, h in sizes)


def test_every_action_starts_after_the_first_clips_and_static_objects_stand_still():
    for seed in SEEDS:
        scene = synthetic_sequence.draw_scene(seed)
        params, _, objects = synthetic_sequence.build_scene(12, 0, coarse=4.0, scene=scene)
        for o in objects:
            centre = params["means3D"][:, slice(*o["gaussians"])].mean(1)
            if o["motion"] == "static":
                assert o["prompt_timesteps"] == list(range(12)) and not o["moving_timesteps"]
                assert np.abs(centre - centre[0]).max() < 1e-6
            elif o["motion"] in ("thrown", "sliding"):
                assert min(o["moving_timesteps"]) >= synthetic_sequence.FIRST_ACTION and len(o["moving_timesteps"]) >= 2
                step = np.linalg.norm(np.diff(centre, axis=0), axis=1)
                assert (step[[t - 1 for t in o["moving_timesteps"]]] > 1e-3).all()


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Seeds 1-3 written tiny (96 pixels wide, 3 timesteps, 8 train cameras), benchmark included."""
    root = tmp_path_factory.mktemp("family")
    out = {}
    for seed in SEEDS[:3]:
        scene = synthetic_sequence.draw_scene(seed, num_train=8)
        width, height = synthetic_sequence.draw_image_size(seed)
        seq = str(root / f"fam{seed}")
        objects = synthetic_sequence.generate(
            seq, str(root / "grounding"), 96, round(96 * height / width), 3, 8, len(scene["rig"]["test"]), scene=scene
        )
        out[seed] = {
            "seq": seq,
            "objects": objects,
            "scene": scene,
            "benchmark": str(root / "grounding" / f"fam{seed}"),
        }
    return out


def test_members_are_written_with_a_benchmark_of_every_prompt(members):
    for seed, m in members.items():
        seq = m["seq"]
        assert not os.path.exists(os.path.join(seq, "init_pt_cld.npz"))  # as a user's own capture
        test = helpers.load_meta(seq, "test")
        assert len(test["cam_id"]) == len(m["scene"]["rig"]["test"])
        with open(os.path.join(seq, "gt", "scene.json")) as f:
            assert json.load(f)["seed"] == seed
        for o in m["objects"]:
            for cam in test["cam_id"]:
                truth = torch.load(os.path.join(m["benchmark"], o["prompt_dir"], f"cam{cam}.pt"))
                assert set(truth["masks"]) <= set(o["prompt_timesteps"])
        static = [o for o in m["objects"] if o["motion"] == "static"]
        assert any(
            torch.load(os.path.join(m["benchmark"], o["prompt_dir"], f"cam{c}.pt"))["masks"]
            for o in static
            for c in test["cam_id"]
        )  # a static object is a prompt like the others


def camera_positions(meta):
    return np.linalg.inv(np.asarray(meta["w2c"][0]))[:, :3, 3]


def test_no_background_point_starts_between_a_camera_and_the_scene(members):
    """Each background point of the built cloud lies on the floor or farther from where its rays
    start (inside the rig) than every camera: a point nearer than a camera, off the floor, can sit
    in front of the scene in a view off the rig. The cloud before issue 13 put a sky on 0.8x the
    cameras' sphere. (The true masks hold every object: the sweep inside the rig of issue 14 must
    find nothing there.)"""
    for seed, m in members.items():
        meta = helpers.load_meta(m["seq"], "train")
        cloud = point_cloud.build_init_point_cloud(m["seq"], meta, 0, num_fg=500, num_bg=2000, log=lambda *_: None)
        bg = cloud[cloud[:, 6] == 0, :3]
        centre, reach, _ = point_cloud.ray_origin(point_cloud.load_views(m["seq"], meta, 0)["centers"])
        on_floor = np.abs(bg[:, 1]) < 1e-3
        beyond = np.linalg.norm(bg - centre.numpy(), axis=1) > reach
        assert len(bg) > 500 and (on_floor | beyond).all(), (seed, int((~(on_floor | beyond)).sum()))
        all_cams = np.concatenate([camera_positions(meta), camera_positions(helpers.load_meta(m["seq"], "test"))])
        assert (all_cams[:, 1] < -0.3).all()  # every camera, test ones too, above the floor


def test_what_the_cameras_see_on_the_far_field_is_the_env_maps_not_a_point_s(members):
    """The far field gets no points; a direction a train camera sees there (above the chosen
    sphere's part the cameras see, say) starts in stage 1's environment map with the colour the
    cameras see (the mean over the cameras; a sharp edge within a texel differs): a camera below a
    ring looks there (family seed 1 at 380x223 on the GPU: its camera below the ring 21.0 dB while
    such directions had neither a point nor an environment map)."""
    num_rays, errors = 3000, []
    for seed, m in members.items():
        meta, test_meta = helpers.load_meta(m["seq"], "train"), helpers.load_meta(m["seq"], "test")
        views = point_cloud.load_views(m["seq"], meta, 0)
        points, _, _ = point_cloud.background_points(views, num_rays)
        centre, reach, has_floor = point_cloud.ray_origin(views["centers"])
        far_radius = point_cloud.beyond_radii(reach)[-1]
        assert ((points - centre).norm(dim=1) < 0.999 * far_radius).all(), seed
        dirs = point_cloud.sphere_directions(num_rays)
        floor = point_cloud.floor_distance(centre.expand(num_rays, 3), dirs, has_floor)
        far = floor > far_radius
        seen, rgb = point_cloud.photo_consistency(
            centre + far_radius * dirs[far], views, views["ims"], point_cloud.background_pixels(views), 1
        )
        seen = torch.isfinite(seen)
        size = (meta["w"], meta["h"]), (test_meta["w"], test_meta["h"])
        train_views, _ = train_d3dgs.get_dataset(
            train_d3dgs.load_timestep(m["seq"], meta, test_meta, 0, *size), meta, test_meta, 0, "cpu"
        )
        env_map = train_d3dgs.initial_env_map(train_views, train_d3dgs.env_map_rows(meta))
        env_rgb = helpers.sample_env_map(env_map[:3], dirs[far][seen][None])[:, 0].T
        errors.append((env_rgb - rgb[seen]).abs().mean(1))
    errors = torch.cat(errors)  # tiny seeds 1-3: 0, 35 and 147 such directions, median 0.007 and 0.008
    assert len(errors) > 100 and errors.median() < 0.02, (len(errors), errors.median())


def test_a_background_ray_takes_the_floor_beyond_the_sphere_where_the_cameras_agree_better(members):
    """A ray of the background that meets the floor beyond its point on the chosen sphere ends on
    whichever of the two the cameras agree on better: a sphere inside a floor that reaches farther
    left that floor's far part floating at camera height, where a camera below the ring saw it
    above its horizon (family seed 1 drawn at 190x112 on the CPU: its camera below the ring 26.3 ->
    32.8 dB; seed 4 and basketball within 0.5 dB)."""
    num_rays = 3000
    for seed, m in members.items():
        views = point_cloud.load_views(m["seq"], helpers.load_meta(m["seq"], "train"), 0)
        points, _, _ = point_cloud.background_points(views, num_rays)
        centre, reach, has_floor = point_cloud.ray_origin(views["centers"])
        dirs = torch.nn.functional.normalize(points - centre, dim=1)
        depth = (points - centre).norm(dim=1)
        floor = point_cloud.floor_distance(centre.expand(len(points), 3), dirs, has_floor)
        off_floor = (depth < 0.999 * floor) & (depth < 0.999 * point_cloud.beyond_radii(reach)[-1])
        small_ims, bg_ok = point_cloud.consistency_images(views)
        min_views = max(2, len(views["ims"]) // 6)
        cost = [
            point_cloud.photo_consistency(
                centre + d[off_floor, None] * dirs[off_floor], views, small_ims, bg_ok, min_views
            )[0]
            for d in (depth, floor)
        ]
        assert not (torch.isfinite(cost[1]) & (cost[1] < cost[0])).any(), seed  # the floor would do better


FAMILY_PSNR_BOUND = 23.5  # dB, every test camera; measured 23.98-31.26 (without the environment map, far-field
# points instead: 22.96-31.86, seed 1's camera below its ring the lowest; the background inside the cameras: 8.5-28.85)


def test_stage1_renders_every_test_camera_of_three_members(members, tmp_path, monkeypatch):
    """Stage 1 from the command line as a new user runs it on their own capture (no point cloud),
    the demo's fast settings at timestep 0: every test camera, on the rig and off it (below, closer,
    above), reaches the bound. With the background on a sphere inside the cameras' own (the cloud
    before issue 13) the cameras on the rig score 8.5-13.5 dB, the one below it 13.7, the one above
    13.6 (the closer ones 19.8 and 28.9)."""
    monkeypatch.chdir(tmp_path)
    for seed, m in members.items():
        train_d3dgs.main(["-s", m["seq"], "-e", "fam", "--demo", "--downscale", "1", "-l", "0", "--device", "cpu"])
        with open(os.path.join("output", "fam", f"fam{seed}", "metrics.json")) as f:
            cameras = json.load(f)["per_timestep"][0]["cameras"]
        assert len(cameras) == len(m["scene"]["rig"]["test"])
        assert all(c["psnr"] >= FAMILY_PSNR_BOUND for c in cameras.values()), (seed, cameras)


def without_resting_objects(seq, dest):
    """<dest>: the sequence with masks of only the objects that are thrown or slide, as a subtraction
    of the background estimated over time (prepare_sequence.py) sees them: the static and the
    spinning objects (an outline that never changes) are background. -> dest"""
    from PIL import Image

    shutil.copytree(seq, dest, ignore=shutil.ignore_patterns("gt"))
    with open(os.path.join(seq, "gt", "objects.json")) as f:
        moving = [o["id"] for o in json.load(f)["objects"] if o["motion"] in ("thrown", "sliding")]
    for cam in os.listdir(os.path.join(dest, "seg")):
        for name in os.listdir(os.path.join(dest, "seg", cam)):
            ids = np.asarray(Image.open(os.path.join(seq, "gt", "ids", cam, name)))
            Image.fromarray((np.isin(ids, moving) * 255).astype(np.uint8)).save(os.path.join(dest, "seg", cam, name))
    return dest


def test_an_object_at_rest_that_the_masks_call_background_starts_with_points_where_it_stands(members, tmp_path):
    """Issue 14: the masks of prepare_sequence.py leave an object at rest as background; the cloud
    must still put points where it stands (the sweep along the train cameras' rays), and nowhere
    else inside the rig. Before, background points lay only on the floor or beyond the cameras,
    and a resting object started without any."""
    from scipy.spatial import cKDTree

    for seed, m in members.items():
        seq = without_resting_objects(m["seq"], str(tmp_path / f"fam{seed}"))
        meta = helpers.load_meta(seq, "train")
        cloud = point_cloud.build_init_point_cloud(seq, meta, 0, num_fg=500, num_bg=2000, log=lambda *_: None)
        with np.load(os.path.join(m["seq"], "gt", "params.npz")) as params:
            truth = params["means3D"][0]
        with open(os.path.join(m["seq"], "gt", "objects.json")) as f:
            objects = json.load(f)
        on_objects = cKDTree(truth[: objects["background_gaussians"][0]])
        bg = cloud[cloud[:, 6] == 0, :3]
        centre, reach, _ = point_cloud.ray_origin(point_cloud.load_views(seq, meta, 0)["centers"])
        inside = (np.abs(bg[:, 1]) >= 1e-3) & (np.linalg.norm(bg - centre.numpy(), axis=1) <= reach)
        assert inside.sum() >= 200, (seed, int(inside.sum()))
        off = on_objects.query(bg[inside])[0]  # metres from the nearest Gaussian of an object
        assert np.quantile(off, 0.95) < 0.2 and off.max() < 0.5, (seed, np.quantile(off, 0.95), off.max())
        points = cKDTree(cloud[:, :3])
        for o in objects["objects"]:
            if o["motion"] in ("static", "spinning"):
                gaussians = truth[slice(*o["gaussians"])]
                assert np.mean(points.query(gaussians)[0] < 0.1) >= 0.5, (seed, o["name"])


@pytest.fixture(scope="module")
def featured(tmp_path_factory):
    """Seeds 1-3 written small (128 pixels wide, 8 timesteps, so that the actions happen, 8 train
    cameras) with their stage-3 features (colour encoder) in a data/ folder."""
    root = tmp_path_factory.mktemp("featured")
    seqs = {}
    with contextlib.chdir(root):
        for seed in SEEDS[:3]:
            scene = synthetic_sequence.draw_scene(seed, num_train=8)
            width, height = synthetic_sequence.draw_image_size(seed)
            seq = f"data/fam{seed}"
            objects = synthetic_sequence.generate(
                seq, "data/grounding", 128, round(128 * height / width), 8, 8, len(scene["rig"]["test"]), scene=scene
            )
            extract_features.main(["-s", seq, "--encoder", "color", "--device", "cpu"])
            seqs[seed] = (str(root / seq), objects)
    return seqs


def stage3_grounding(seq, objects, guided):
    """Grounding of every object's prompt on the stage-3 maps of the train cameras (before the
    autoencoder and the lifting), as evaluate_grounding.py scores a render: per prompt the list over
    cameras of grounding_metrics' dicts; guided: purest tiles, else the mean of levels."""
    from PIL import Image

    meta = helpers.load_meta(seq, "train")
    cache = cache_dir(seq, "color")
    positives, negatives = encode_prompts(load_encoder("color"), [o["prompt"] for o in objects], "cpu")
    metrics = [[] for _ in objects]
    for c, cam in enumerate(meta["cam_id"]):
        rel = []
        for t, names in enumerate(meta["fn"]):
            guide = helpers.load_image(os.path.join(seq, "ims", names[c])) if guided else None
            dense = dense_feature_map(cache, t, c, meta["h"], meta["w"], "cpu", guide)
            embeds = torch.nn.functional.normalize(dense.flatten(1).T, dim=-1)
            rel.append((relevancy(embeds, positives, negatives) - 0.5).clamp(min=0).reshape(-1, meta["h"], meta["w"]))
        rel = torch.stack(rel, 1)  # [Q, T, H, W]
        ids = [
            np.asarray(Image.open(os.path.join(seq, "gt", "ids", str(cam), f"{t:06d}.png")))
            for t in range(len(meta["fn"]))
        ]
        for q, o in enumerate(objects):
            truth = {t: torch.from_numpy(ids[t] == o["id"]) for t in o["prompt_timesteps"] if (ids[t] == o["id"]).any()}
            metrics[q].append(evaluate_grounding.grounding_metrics(rel[q], truth))
    return metrics


def mean_scores(metrics):
    """stage3_grounding's metrics -> per prompt the mean over cameras of (temporal IoU, mask IoU) [Q, 2]."""
    return np.array([[np.mean([m[k] for m in cams]) for k in ("temporal_iou", "mask_iou")] for cams in metrics])


@pytest.fixture(scope="module")
def purest_metrics(featured):
    """stage3_grounding with the purest tiles, per seed of `featured`."""
    return {seed: stage3_grounding(seq, objects, True) for seed, (seq, objects) in featured.items()}


def test_purest_tiles_ground_every_prompt_where_the_mean_of_levels_loses_small_objects(featured, purest_metrics):
    """Issue 13's grounding targets (mean mask IoU >= 0.5, mean temporal IoU >= 0.7, no prompt
    below 0.3 mask IoU), on the maps the lifting is trained to reproduce: the purest tiles meet
    them on seeds 1-3; the original's mean over the levels does not."""
    purest = np.concatenate([mean_scores(metrics) for metrics in purest_metrics.values()])
    mean = np.concatenate([mean_scores(stage3_grounding(seq, objects, False)) for seq, objects in featured.values()])
    print("purest tIoU/mIoU per prompt", purest.round(3).tolist(), "mean of levels", mean.round(3).tolist())
    assert purest[:, 1].mean() >= 0.5 and purest[:, 0].mean() >= 0.7 and purest[:, 1].min() >= 0.3
    assert mean[:, 1].mean() < 0.5 or mean[:, 0].mean() < 0.7 or mean[:, 1].min() < 0.3


def test_a_moving_objects_span_starts_with_its_action(featured, purest_metrics):
    """On the stage-3 maps a thrown or sliding object's detected span starts no earlier than its
    action, in nearly every train camera: frame t is the middle of timestep t's clip at every t
    (tiles.clip_frames clamps). The original's padding put frame 4 there at t = 0-3, and 31 of the
    32 (prompt, camera) pairs of these members started at timestep 2 for actions from timestep 4;
    with the clamped clips 1 of 32 starts early (seed 2's purple box in one camera, from t = 1)."""
    early = checked = 0
    for seed, (_, objects) in featured.items():
        for o, cams in zip(objects, purest_metrics[seed]):
            for m in cams if o["motion"] in ("thrown", "sliding") else []:
                starts = [first for first, _ in m["pred_spans"]]
                early += bool(starts) and starts[0] < o["prompt_timesteps"][0]
                checked += 1
    assert checked >= 16 and early <= checked // 8, (early, checked)


def test_bench_familys_table_shows_where_each_span_starts_and_ends():
    """bench_family.py's prompt table gives each test camera's detected timesteps beside the truth's,
    so a span that starts early or ends late shows, not only its temporal IoU."""
    from benchmarks import bench_family

    scores = {"temporal_iou": 5 / 7, "mask_iou": 0.9, "viou": 0.64}
    report = {
        "seed": 4,
        "rig": "ring, 10 cams",
        "background": "sky",
        "resolution": [383, 285],
        "timesteps": 12,
        "psnr": {"10": 35.4},
        "grounding": {"a purple cylinder flying in the air": scores},
        "spans": {
            "a purple cylinder flying in the air": {
                "cam10": {"detected": [[2, 8]], "truth": [4, 5, 6, 7, 8]},
                "cam11": {"detected": [], "truth": [4, 5, 7]},
            }
        },
    }
    met = bench_family.summary([report])
    row = next(line for line in bench_family.markdown([report], met, "cmd").splitlines() if "purple" in line)
    assert row.endswith("| 0.714 | 0.900 | 0.640 | cam10 2-8 (4-8); cam11 none (4-5, 7) |"), row
