"""Stages 3-5 of 4-LEGS: autoencoder, feature lifting, relevancy, grounding evaluation.

Unit tests on hand-made inputs, then the whole chain on a small synthetic sequence with the colour
encoder (on the ground-truth Gaussians, so no stage-1 training is needed)."""

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import helpers
from feature_extraction.autoencoder import Autoencoder, ae_loss, load_autoencoder, save_autoencoder
from feature_extraction.relevancy import (
    DETECT_THRESHOLD,
    detect_spans,
    frame_scores,
    heat,
    legs_features,
    legs_path,
    load_legs,
    read_legs,
    relevance_map,
    relevancy,
    save_legs,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- autoencoder


def test_autoencoder_shapes_and_unit_norms():
    torch.manual_seed(0)
    model = Autoencoder()
    x = torch.nn.functional.normalize(torch.randn(16, 768), dim=-1)
    z, recon = model(x)
    assert z.shape == (16, 128) and recon.shape == (16, 768)
    assert torch.allclose(z.norm(dim=-1), torch.ones(16), atol=1e-5)
    assert torch.allclose(recon.norm(dim=-1), torch.ones(16), atol=1e-5)
    linear = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(768, 512), (512, 256), (256, 128)]
    # L2 + 0.01 (1 - cos): for x = -recon, |x - r|^2 = 4 and cos = -1
    assert float(ae_loss(-x, x)) == pytest.approx(4.0 + 0.01 * 2.0, rel=1e-5)


def test_autoencoder_checkpoint_roundtrip_and_mismatch(tmp_path):
    model = Autoencoder().eval()
    path = tmp_path / "synthetic" / "ae" / "best_ckpt.pth"
    save_autoencoder(path, model, "color", epoch=3)
    loaded, info = load_autoencoder(path, "color")
    x = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    assert torch.allclose(loaded.encode(x), model.encode(x)) and info["epoch"] == 3
    with pytest.raises(helpers.UserError, match="trained on 'color' features, not 'viclip'"):
        load_autoencoder(path, "viclip")
    with pytest.raises(helpers.UserError, match="train_autoencoder.py"):
        load_autoencoder(tmp_path / "other" / "ae" / "best_ckpt.pth", "color")


def test_stage4_timesteps_cached_sampled_and_held_out(tmp_path):
    from train_autoencoder import cached_timesteps, spans, split_timesteps

    for t in (0, 1, 2, 4, 5, 6, 7, 8, 9):
        os.makedirs(tmp_path / f"timestep_{t}")
        (tmp_path / f"timestep_{t}" / "config.json").write_text("{}")
    assert cached_timesteps(str(tmp_path), 12) == ([0, 1, 2, 4, 5, 6, 7, 8, 9], [3, 10, 11])
    assert cached_timesteps(str(tmp_path), 12, max_timesteps=3) == ([0, 5, 9], [3, 10, 11])  # evenly spaced
    assert split_timesteps(list(range(12)), 5) == ([0, 1, 2, 3, 5, 6, 7, 8, 10, 11], [4, 9])  # as before
    assert split_timesteps([0, 1, 2, 4, 5, 6, 7, 8, 9], 5) == ([0, 1, 2, 4, 6, 7, 8, 9], [5])  # among the cached
    assert split_timesteps([0, 1, 2], 5) == ([0, 2], [1])  # fewer than --val-every: the middle one
    assert split_timesteps([3, 4], 5) == ([3, 4], [3, 4])  # two: none to spare
    assert spans([0, 1, 2, 4, 6, 7]) == "0-2, 4, 6-7" and spans([]) == "none"


def test_stage4_trains_on_the_extracted_timesteps_only(tmp_path, monkeypatch, capsys):
    """A user extracted timesteps 0-2 of 8: stage 4 trains on those, says which are missing, and
    stage 5 takes the autoencoder for those timesteps; --resume keeps it until the features change."""
    import extract_features
    import synthetic_sequence
    import train_4legs
    import train_autoencoder

    monkeypatch.chdir(tmp_path)
    seq = "data/tiny"
    synthetic_sequence.generate(seq, width=32, height=18, num_timesteps=8, num_train=2, num_test=1)
    stage4 = [
        "-s",
        seq,
        "--encoder",
        "color",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--tiles-per-epoch",
        "256",
        "--batch-size",
        "128",
    ]
    os.makedirs(f"{seq}/interpolators/color")  # stage 3 stopped before its first timestep
    with pytest.raises(
        helpers.UserError, match=f"{seq}/interpolators/color: no cached tile embeddings .* extract_features.py"
    ):
        train_autoencoder.main(stage4)
    extract_features.main(["-s", seq, "--encoder", "color", "--device", "cpu", "-l", "2"])
    capsys.readouterr()
    train_autoencoder.main(stage4)
    out = capsys.readouterr().out
    assert "timesteps 0-2; not cached by stage 3 (extract_features.py): 3-7" in out, out
    assert "held-out timesteps 1" in out, out
    ckpt = torch.load(f"{seq}/ae/best_ckpt.pth", weights_only=True)
    assert ckpt["train_timesteps"] == [0, 2] and ckpt["val_timesteps"] == [1]
    assert ckpt["made_from"]["timesteps"] == [0, 1, 2]
    os.makedirs("output/x/tiny")
    shutil.copy(f"{seq}/gt/params.npz", "output/x/tiny/params.npz")
    stage5 = ["-s", seq, "-e", "x", "--encoder", "color", "--device", "cpu", "--iters", "2", "--warm-iters", "1"]
    train_4legs.main(stage5 + ["-l", "1"])
    train_autoencoder.main(stage4 + ["--resume"])  # same features, same settings: kept
    assert "kept (--resume)" in capsys.readouterr().out
    assert torch.load(f"{seq}/ae/best_ckpt.pth", weights_only=True)["run_id"] == ckpt["run_id"]
    extract_features.main(["-s", seq, "--encoder", "color", "--device", "cpu", "-f", "3", "-l", "4"])
    train_4legs.main(stage5 + ["-l", "2"])  # more features cached: the autoencoder still fits its timesteps
    train_autoencoder.main(stage4 + ["--resume", "--max-timesteps", "3"])  # another sample: trained again
    out = capsys.readouterr().out
    assert "timesteps 0, 2, 4 (3 of the 5 cached: --max-timesteps)" in out and "kept (--resume)" not in out, out
    assert "was trained on other timesteps, cache, settings: trained again" in out, out
    with pytest.raises(helpers.UserError, match="another autoencoder"):
        train_4legs.main(stage5 + ["-l", "2"])


# ---------------------------------------------------------------- relevancy


def test_relevancy_formula_on_hand_made_vectors():
    e = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]])
    pos = torch.tensor([[1.0, 0.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    got = relevancy(e, pos, neg)
    expected = []
    for row in e:
        probs = [torch.softmax(10 * torch.stack([row @ pos[0], row @ n]), 0)[0] for n in neg]
        expected.append(min(probs))  # the hardest negative decides
    assert got.shape == (1, 3)
    assert torch.allclose(got[0], torch.stack(expected), atol=1e-6)
    assert got[0, 0] > 0.99 and got[0, 1] < 0.01  # pixel 0 is the prompt, pixel 1 a negative
    # pixel 2: e.p = 0.6, hardest negative e.n = 0.8 -> sigmoid(-2)
    assert float(got[0, 2]) == pytest.approx(1 / (1 + math.exp(2.0)), abs=1e-6)


def test_irrelevant_prompt_gives_empty_timeline_not_a_blob():
    torch.manual_seed(0)
    relevance = 0.004 * torch.rand(10, 20, 30)  # weak noise above 0.5 probability, nowhere relevant
    assert detect_spans(frame_scores(relevance)) == []
    assert float(heat(relevance).max()) < 0.1  # not stretched to 1 by the normalisation
    relevance[3:6, 5:8, 5:8] = 0.3  # a relevant object in frames 3-5
    assert detect_spans(frame_scores(relevance)) == [[3, 5]]
    assert float(heat(relevance).max()) == pytest.approx(1.0)


def test_relevance_map_of_decoded_features():
    """Features that decode to the prompt are relevant, features that decode to a negative are not."""

    class Decoder:  # decodes latent axis i to unit vector i of a 3-d embedding space
        def decode(self, z):
            return torch.nn.functional.normalize(z[:, :3], dim=-1)

    feats = torch.zeros(5, 1, 2)
    feats[0, 0, 0] = 2.0  # pixel 0 -> embedding axis 0 (the prompt)
    feats[1, 0, 1] = 0.5  # pixel 1 -> embedding axis 1 (the negative)
    rel = relevance_map(feats, Decoder(), torch.eye(3)[:1], torch.eye(3)[1:2], stride=1)
    assert rel.shape == (1, 1, 2)
    assert float(rel[0, 0, 0]) == pytest.approx(0.5, abs=1e-3) and float(rel[0, 0, 1]) == 0.0


# ---------------------------------------------------------------- stage 4 building blocks


def test_neighbour_attention_equals_projecting_every_neighbour():
    from train_4legs import NeighbourAttention, attend_batched, attend_by_slot

    torch.manual_seed(0)
    attn = NeighbourAttention(16, 8)
    x = torch.randn(50, 16)
    nbr = torch.cat([torch.arange(50)[:, None], torch.randint(0, 50, (50, 5))], 1)
    # the original's formulation: keys and values of every neighbour, scaled dot product
    near = x[nbr]
    q = attn.query(x)[:, None]
    k, v = attn.key(near), attn.value(near)
    w = torch.softmax((q @ k.transpose(1, 2)) / math.sqrt(16), dim=-1)
    expected = attn.out((w @ v)[:, 0])
    assert torch.allclose(attn(x, nbr), expected, atol=1e-5)
    # the GPU's batched form is the same function
    q_k = (attn.query(x) @ attn.key.weight) / math.sqrt(16)
    assert torch.allclose(attend_batched(x, nbr, q_k), attend_by_slot(x, nbr, q_k), atol=1e-5)


def random_scene(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "means3D": (torch.rand(n, 3, generator=g) - 0.5) * 2.0,
        "scales": torch.exp(math.log(0.08) + 0.3 * torch.randn(n, 3, generator=g)),
        "rotations": torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=1),
        "opacities": torch.rand(n, 1, generator=g) * 0.9 + 0.05,
        "colors_precomp": torch.rand(n, 3, generator=g),
        "seg_colors": torch.tensor([[1.0, 0.0, 0.0]]).repeat(n, 1),
    }


def test_blend_matrix_renders_like_the_rasterizer():
    from feature_extraction.relevancy import render_features
    from train_4legs import make_renderers

    scene = random_scene()
    w, h = 48, 32
    k = np.array([[40.0, 0, w / 2], [0, 40.0, h / 2], [0, 0, 1]])
    cam = helpers.setup_camera(w, h, k, helpers.orbit_w2c((0, 0, 0), 4.0, 1.0, 0.4))
    feats = torch.randn(300, 7, requires_grad=True)
    fast = make_renderers([cam], scene, use_rasterizer=False)[0](feats)
    _, ref, _ = render_features(cam, scene, feats)
    assert fast.shape == (7, h, w) and float(ref.detach().abs().max()) > 0.1
    assert torch.allclose(fast, ref, atol=1e-5)
    g = torch.randn(7, h, w)
    (grad_fast,) = torch.autograd.grad((fast * g).sum(), feats)
    (grad_ref,) = torch.autograd.grad((ref * g).sum(), feats)
    assert torch.allclose(grad_fast, grad_ref, atol=1e-5)


def test_relevance_videos_show_the_env_map_behind_the_gaussians():
    """render_relevance_video's RGB frames (visualize_4legs.py's heatmap videos) are render_d3dgs's
    image over stage 1's environment map, as visualize_d3dgs.py's videos are."""
    from types import SimpleNamespace

    from feature_extraction.autoencoder import Autoencoder
    from feature_extraction.relevancy import render_relevance_video

    scene = random_scene()
    scene["legs_features"] = torch.nn.functional.normalize(torch.randn(300, 128), dim=-1)
    w, h = 48, 32
    k = np.array([[40.0, 0, w / 2], [0, 40.0, h / 2], [0, 0, 1]])
    cams = [helpers.setup_camera(w, h, k, helpers.orbit_w2c((0, 0, 0), 4.0, 1.0, a)) for a in (0.4, 1.4)]
    env_map = torch.rand(4, 6, 12, generator=torch.Generator().manual_seed(1))
    stages = SimpleNamespace(gaussians=lambda t: dict(scene), ae=Autoencoder().eval(), env_map=env_map)
    prompts = torch.nn.functional.normalize(torch.randn(5, 768), dim=-1)
    rgb, relevance = render_relevance_video(stages, cams, prompts[:1], prompts[1:])
    assert rgb.shape == (2, h, w, 3) and relevance.shape == (1, 2, h, w)
    gaussians = {k: v for k, v in scene.items() if k != "legs_features"}
    for t, cam in enumerate(cams):
        over_map = helpers.render_d3dgs(cam, gaussians, helpers.view_background(cam, env_map))[0]
        assert np.abs(rgb[t].astype(int) - helpers.to_uint8(over_map)).max() <= 1
        assert np.abs(rgb[t].astype(int) - helpers.to_uint8(helpers.render_d3dgs(cam, gaussians)[0])).max() > 50


# ---------------------------------------------------------------- grounding metrics


def test_grounding_metrics_on_hand_made_masks():
    from evaluate_grounding import grounding_metrics, mask_iou

    relevance = torch.zeros(8, 10, 10)
    relevance[2:6, 2:6, 2:6] = 0.4  # predicted: frames 2-5, a 4x4 square
    gt = {t: torch.zeros(10, 10, dtype=torch.bool) for t in range(3, 7)}  # truth: frames 3-6
    for m in gt.values():
        m[2:6, 2:8] = True  # a 4x6 rectangle containing the square
    r = grounding_metrics(relevance, gt)
    assert r["pred_spans"] == [[2, 5]]
    assert r["temporal_iou"] == pytest.approx(3 / 5)
    assert r["mask_iou"] == pytest.approx((3 * 16 / 24 + 0) / 4)  # frame 6 has no prediction
    assert r["viou"] == pytest.approx(3 * (16 / 24) / 5)
    assert mask_iou(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)) == 1.0


def test_benchmark_reader_messages(tmp_path):
    from evaluate_grounding import read_benchmark

    with pytest.raises(helpers.UserError, match="benchmark folder not found"):
        read_benchmark(tmp_path / "missing")
    (tmp_path / "a_red_ball").mkdir()
    with pytest.raises(helpers.UserError, match="no <prompt_dir>/cam<N>.pt"):
        read_benchmark(tmp_path)
    torch.save({"boxes": {}}, tmp_path / "a_red_ball" / "cam3.pt")
    with pytest.raises(helpers.UserError, match="'masks'"):
        read_benchmark(tmp_path)
    torch.save(
        {"masks": {4: np.ones((1, 5, 6), bool)}, "boxes": {4: [0, 0, 5, 4]}}, tmp_path / "a_red_ball" / "cam3.pt"
    )
    bench = read_benchmark(tmp_path)
    assert list(bench) == ["a red ball"] and bench["a red ball"][3][4].shape == (5, 6)


def test_brute_force_neighbours_match_the_kd_tree():
    from train_4legs import knn_brute_force, neighbour_indices

    points = torch.rand(500, 3)
    kd = neighbour_indices(points, 20)
    bf = knn_brute_force(points, 20)
    assert kd.shape == bf.shape == (500, 21)
    assert torch.equal(kd[:, 0], torch.arange(500)) and torch.equal(bf[:, 0], torch.arange(500))
    assert torch.equal(kd[:, 1:].sort(1).values, bf[:, 1:].sort(1).values)


def clustered_points(n, seed=0):
    """Gaussians as scenes hold them: dense clumps of any size away from the origin, and a sparse far shell."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(12, 3, generator=gen) * 10 + 5
    near = centres[torch.randint(0, 12, (n,), generator=gen)]
    near = near + torch.randn(n, 3, generator=gen) * torch.rand(n, 1, generator=gen) ** 3
    far = torch.randn(n // 20, 3, generator=gen)
    return torch.cat([near, 30 * far / far.norm(dim=1, keepdim=True)])


@pytest.mark.parametrize("levels, max_candidates", [(8, 4096), (1, 4096), (8, 40)])
def test_grid_neighbours_are_the_nearest(monkeypatch, levels, max_candidates):
    """The GPU's k-NN on grids finds each query's nearest points, as the KD-tree does, also where
    few grids certify (the rest by brute force) or a grid may gather few candidates per query."""
    import train_4legs

    monkeypatch.setattr(train_4legs, "KNN_GRID_LEVELS", levels)
    monkeypatch.setattr(train_4legs, "KNN_GRID_MAX_CANDIDATES", max_candidates)
    points = clustered_points(3000)
    rows = torch.randperm(len(points), generator=torch.Generator().manual_seed(1))[:2000]
    grid = train_4legs.knn_grid(points, 20, rows)
    assert grid.shape == (2000, 21) and torch.equal(grid[:, 0], rows)
    _, tree = helpers.knn(points.double().numpy(), 20, rows.numpy())

    def sorted_distances(idx):
        return (points[idx].double() - points[rows].double()[:, None]).norm(dim=-1).sort(1).values

    # the same distances (neighbours may swap only where two lie equally far, to float32's precision)
    assert torch.allclose(sorted_distances(grid[:, 1:]), sorted_distances(torch.from_numpy(tree)), atol=1e-5)


def test_per_camera_files_are_read_ahead():
    """Stage 5 reads every camera's files as soon as a timestep's targets are set up, in threads, and
    makes a camera's target from them on first use; a file that fails to read fails its camera's use."""
    import threading

    import train_4legs

    read_by, all_read = [], threading.Event()

    def read(c):
        read_by.append((c, threading.current_thread().name))
        if len(read_by) == 3:
            all_read.set()
        if c == 2:
            raise helpers.UserError("camera 2's grids are damaged")
        return 10 * c

    cams = train_4legs.PerCamera(3, lambda c, files: (c, files), "cpu", read)
    assert all_read.wait(10)  # before any camera is asked for
    assert all(name.startswith("stage5-read") for _, name in read_by)
    assert cams[1] == (1, 10) and cams[0] == (0, 0)
    with pytest.raises(helpers.UserError, match="camera 2"):
        cams[2]


def test_neighbours_of_some_gaussians_are_their_rows_of_all():
    """A warm start asks the neighbour lists of the foreground's Gaussians alone: both k-NN paths
    give those rows of the lists of all Gaussians."""
    from train_4legs import knn_brute_force, neighbour_indices

    points, rows = torch.rand(500, 3), torch.tensor([3, 17, 250, 499])
    assert torch.equal(knn_brute_force(points, 20, rows), knn_brute_force(points, 20)[rows])
    assert torch.equal(neighbour_indices(points, 20, rows), neighbour_indices(points, 20)[rows])


# ---------------------------------------------------------------- stage-5 records


def test_records_store_the_background_once_and_format_1_is_still_read(tmp_path):
    """A chain's first record holds every row, a warm-started one its foreground rows and the run_id
    of the base it shares the others with: read back within half an int8 step of each row, and
    refused once the base was trained again or deleted. A record as stage 5 wrote it before (format
    1: float16 features and latents) is read as it is, and a warm start starts from it."""
    from train_4legs import load_previous

    n, made_from = 400, {"encoder": "color", "ae_run_id": "ae", "params": "p", "downscale": 1, "tile_mix": "purest"}
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(n, 128, generator=g) for _ in range(3)]
    foreground = torch.arange(0, n, 4)  # every fourth row
    legs = tmp_path / "legs"
    save_legs(legs_path(legs, 0), features[0], None, None, {"t": 0, "run_id": "r0", **made_from})
    save_legs(legs_path(legs, 1), features[1], foreground, {"t": 0, "run_id": "r0"}, {"t": 1, "run_id": "r1"})
    expected = features[0].clone()
    expected[foreground] = features[1][foreground]
    back = stored_features(1, legs)
    step = expected.abs().amax(1, keepdim=True) / 127
    assert back.shape == (n, 128) and ((back - expected).abs() <= 0.5 * step * (1 + 1e-5)).all()
    full, partial = (os.path.getsize(legs_path(legs, t)) for t in (0, 1))
    assert partial < 0.35 * full  # a quarter of the rows
    save_legs(legs_path(legs, 0), features[2], None, None, {"t": 0, "run_id": "r2"})  # the base trained again
    with pytest.raises(helpers.UserError, match="background features of timestep 0, which was trained again since"):
        stored_features(1, legs)
    os.remove(legs_path(legs, 0))
    with pytest.raises(helpers.UserError, match="which was deleted: .* -f 0 --restart"):
        stored_features(1, legs)

    # format 1 as the base of a record of format 2, and as what a warm start starts from
    old = {
        "t": 0,
        "features": features[0].half(),
        "latents": features[2].half(),
        "attention": {"query.weight": torch.eye(128)},
        "run_id": "old",
        **made_from,
    }
    torch.save(old, legs_path(legs, 0))
    save_legs(legs_path(legs, 1), features[1], foreground, {"t": 0, "run_id": "old"}, {"t": 1, "run_id": "r1"})
    expected = features[0].half().float()
    expected[foreground] = features[1][foreground]
    assert (stored_features(1, legs) - expected).abs().max() < 0.02
    assert torch.equal(load_legs(legs_path(legs, 0), 0, "cpu", made_from, "")["features"], features[0].half().float())
    previous = load_previous(str(legs), 1, made_from, {"seed": 0}, "")
    assert torch.equal(previous["latents"], features[2].half()) and previous["base"] == {"t": 0, "run_id": "old"}


def test_the_warm_start_kept_in_memory_is_the_one_its_files_give(tmp_path):
    """A run hands each timestep's features, latents and attention on to the next in memory and
    writes the state file once, at its end: what it hands on equals, bit for bit and dtype for dtype,
    what a resumed run reads back from the record and the state (load_previous), along a chain of
    a cold timestep and two warm ones."""
    import train_4legs

    n, settings = 300, {"seed": 0}
    made_from = {"encoder": "color", "ae_run_id": "ae", "params": "p", "downscale": 1, "tile_mix": "purest"}
    legs, foreground = str(tmp_path / "legs"), torch.arange(1, n, 3)
    g = torch.Generator().manual_seed(1)
    attention, previous = train_4legs.NeighbourAttention(), None
    for t in range(3):
        features, params = torch.randn(n, 128, generator=g), {"latents": torch.randn(n, 128, generator=g)}
        rows = None if previous is None else foreground
        setup = {} if previous is None else {"held_features": previous["features"]}
        info = {"t": t, "run_id": f"r{t}", "settings": settings, **made_from}
        stored = save_legs(legs_path(legs, t), features, rows, None if previous is None else previous["base"], info)
        handed = train_4legs.handed_on(t, f"r{t}", stored, rows, setup, params, attention, previous)
        train_4legs.save_state(legs, handed)
        read = train_4legs.load_previous(legs, t + 1, made_from, settings, "")
        for key in ("features", "latents"):
            assert read[key].dtype == handed[key].dtype and torch.equal(read[key], handed[key]), (t, key)
        assert read["attention"].keys() == handed["attention"].keys()
        assert all(torch.equal(read["attention"][k], v) for k, v in handed["attention"].items())
        assert read["base"] == handed["base"] == {"t": 0, "run_id": "r0"}
        previous = handed


# ---------------------------------------------------------------- the whole chain on a small synthetic sequence

SEQ, EXP, BALL = "data/synthetic", "legs", "a red ball flying in the air"
LEGS = f"output/{EXP}/synthetic/legs"


def stored_features(t, legs=LEGS):
    """The features [N, 128] float32 of timestep t as stage 5 stored them in the folder `legs`."""
    return legs_features(read_legs(legs_path(legs, t), ""), legs_path(legs, t), "")


def prepare_on_chain(t, run, ae, previous):
    """train_4legs.prepare_timestep of timestep t on the chain (run from its folder), on the CPU."""
    import train_4legs

    return train_4legs.prepare_timestep(
        t,
        run,
        helpers.load_meta(SEQ, "train"),
        f"output/{EXP}/synthetic/params.npz",
        ae,
        f"{SEQ}/interpolators/color",
        torch.device("cpu"),
        False,
        previous,
    )


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Stages 2-4 on a small synthetic sequence (96x54, 12 timesteps, 6 train + 1 test cameras),
    colour encoder, ground-truth Gaussians as stage 1. Runs in its own folder (the scripts write
    output/ and results/ relative to the working directory); yields that folder."""
    import extract_features
    import synthetic_sequence
    import train_4legs
    import train_autoencoder

    root = tmp_path_factory.mktemp("chain")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        synthetic_sequence.generate(
            SEQ, benchmark="data/grounding", width=96, height=54, num_timesteps=12, num_train=6, num_test=1
        )
        # stage 4 says which stage is missing, in order
        with pytest.raises(helpers.UserError, match="train_d3dgs.py"):
            train_4legs.main(["-s", SEQ, "-e", EXP, "--encoder", "color"])
        os.makedirs(f"output/{EXP}/synthetic")
        shutil.copy(f"{SEQ}/gt/params.npz", f"output/{EXP}/synthetic/params.npz")
        with pytest.raises(helpers.UserError, match="train_autoencoder.py"):
            train_4legs.main(["-s", SEQ, "-e", EXP, "--encoder", "color"])
        extract_features.main(["-s", SEQ, "--encoder", "color"])
        train_autoencoder.main(["-s", SEQ, "--encoder", "color"])
        # in three runs: a run keeps the warm-start state of its last timestep only, and the tests
        # start from those of timesteps 3 and 4 (kept under states/)
        os.makedirs("states")
        for last in ("3", "4", "11"):
            train_4legs.main(
                ["-s", SEQ, "-e", EXP, "--encoder", "color", "--iters", "200", "--warm-iters", "50", "-l", last]
            )
            shutil.copy(train_4legs.state_path(LEGS, int(last)), "states")
        yield root
    finally:
        os.chdir(cwd)


def test_whole_chain_on_the_synthetic_sequence(chain, capsys):
    """Each object found in space in the held-out test camera, the thrown ball also in time.

    The bounds leave room for how much the scores move with the inputs: stage-3 embeddings that
    differ by a cosine of 0.998 at worst (--exact against the default reuse) gave mask IoU
    0.708/0.673/0.750 (box/top/ball) and 0.683/0.495/0.821, means 0.710 and 0.667 (the autoencoder
    and the lifting amplify the difference); docs/benchmark.md."""
    import json
    import evaluate_grounding

    os.chdir(chain)
    evaluate_grounding.main(
        [
            "-s",
            SEQ,
            "-e",
            EXP,
            "--encoder",
            "color",
            "--benchmark",
            "data/grounding/synthetic",
            "--out",
            "results/grounding.json",
        ]
    )
    with open("results/grounding.json") as f:
        report = json.load(f)
    print(capsys.readouterr().out)
    assert set(report["per_prompt"]) == {BALL, "a blue box sliding on the floor", "a green top spinning"}
    mask_iou = {prompt: metrics["mask_iou"] for prompt, metrics in report["per_prompt"].items()}
    assert np.mean(list(mask_iou.values())) >= 0.6 and min(mask_iou.values()) >= 0.4, mask_iou
    assert report["per_prompt"][BALL]["temporal_iou"] >= 0.5, report["per_prompt"][BALL]


def test_visualize_writes_videos_and_an_empty_timeline(chain):
    import json
    import visualize_4legs

    os.chdir(chain)
    visualize_4legs.main(["-s", SEQ, "-e", EXP, "--encoder", "color", "-p", BALL, "-p", "a purple umbrella"])
    out = f"results/{EXP}/synthetic"
    for prompt_dir in ("a_red_ball_flying_in_the_air", "a_purple_umbrella"):
        assert os.path.getsize(f"{out}/{prompt_dir}/cam0.mp4") > 0
        assert os.path.getsize(f"{out}/{prompt_dir}/timeline.png") > 0
        with open(f"{out}/{prompt_dir}/timeline.json") as f:
            timeline = json.load(f)
        assert len(timeline["scores"]) == 12 and list(timeline["per_view"]) == ["cam0"]
        if prompt_dir == "a_red_ball_flying_in_the_air":  # in the air at t = 5..9: found then, not before
            found = {t for a, b in timeline["spans"] for t in range(a, b + 1)}
            assert found >= set(range(5, 10)) and min(found) >= 4, timeline["spans"]
    # nothing purple in the scene: an empty timeline, scores honestly below the threshold
    assert timeline["spans"] == [] and max(timeline["scores"]) < timeline["threshold"]


def test_lifting_fits_and_the_warm_start_starts_closer(chain):
    """The trained features reproduce the targets far better than the start, and a timestep started
    from the previous one's latents and attention starts far closer than a cold start."""
    import argparse
    import train_4legs
    from feature_extraction.autoencoder import ae_ckpt_path

    os.chdir(chain)
    ae, _ = load_autoencoder(ae_ckpt_path(SEQ), "color")
    run = argparse.Namespace(seq=SEQ, downscale=1, lr_features=0.0025, lr_attention=0.00016, seed=0, tile_mix="purest")
    previous = {**torch.load("states/state_000003.pt", weights_only=True), "features": stored_features(3)}
    setup = prepare_on_chain(4, run, ae, previous)

    def start(record, variables):
        params, attention, _ = train_4legs.initialize(
            setup["rendervar"]["means3D"].shape[0], record, setup["lrs"], "cpu", 0
        )
        with torch.no_grad():
            return train_4legs.lifted_features(params, attention, variables)

    def loss_over_cameras(feats):
        return np.mean(
            [
                float(helpers.l1_loss(setup["renderers"][c](feats), setup["targets"][c]))
                for c in range(len(setup["targets"]))
            ]
        )

    cold = loss_over_cameras(start(None, {"neighbours": train_4legs.neighbour_indices(setup["rendervar"]["means3D"])}))
    warm, fitted = loss_over_cameras(start(previous, setup)), loss_over_cameras(stored_features(4))
    assert fitted < 0.5 * cold and warm < 0.5 * cold, (cold, warm, fitted)


def test_a_warm_start_computes_the_attention_of_the_foreground_alone(chain):
    """A warm-started timestep trains the foreground's features and holds the background's: its
    neighbour lists are the foreground's rows of all Gaussians' lists, and its features, loss and
    gradients equal those of computing every Gaussian's attention and then holding the background's
    rows (the code before, which threw that work away)."""
    import argparse
    import train_4legs
    from feature_extraction.autoencoder import ae_ckpt_path

    os.chdir(chain)
    ae, _ = load_autoencoder(ae_ckpt_path(SEQ), "color")
    run = argparse.Namespace(seq=SEQ, downscale=1, lr_features=0.0025, lr_attention=0.00016, seed=0, tile_mix="purest")
    previous = {**torch.load("states/state_000003.pt", weights_only=True), "features": stored_features(3)}
    setup = prepare_on_chain(4, run, ae, previous)
    means, seg = setup["rendervar"]["means3D"], setup["rendervar"]["seg_colors"]
    foreground = torch.nonzero(helpers.is_foreground(seg))[:, 0]
    every = train_4legs.neighbour_indices(means)
    assert 0 < len(foreground) < len(means) and torch.equal(setup["neighbours"], every[foreground])
    grads = []
    for formulation in ("foreground alone", "every row, then held"):
        params, attention, _ = train_4legs.initialize(len(means), previous, setup["lrs"], "cpu", 0)
        if formulation == "foreground alone":
            features = train_4legs.lifted_features(params, attention, setup)
        else:
            held = ~helpers.is_foreground(seg)[:, None]
            features = torch.where(held, setup["held_features"], attention(params["latents"], every))
        loss = helpers.l1_loss(setup["renderers"][0](features), setup["targets"][0])
        loss.backward()
        grads.append(
            [features.detach(), loss.detach(), params["latents"].grad] + [p.grad for p in attention.parameters()]
        )
    for got, want in zip(*grads):  # (the key's bias cancels in the softmax: no gradient either way)
        assert (got is None and want is None) or torch.allclose(got, want, rtol=1e-5, atol=1e-7)


STORED_RELEVANCE_TOLERANCE = 0.01  # relevance (in [0, 0.5]) the stored features may move a pixel by


def test_stored_features_render_the_trained_relevance(chain):
    """What timestep 4 stored (its foreground rows as int8, the background those of timestep 0)
    renders the relevance of the features it trained (its state: latents and attention; the
    background held at timestep 3's) within STORED_RELEVANCE_TOLERANCE at every pixel, and a
    warm-started record holds the foreground's rows only."""
    import argparse
    import train_4legs
    from feature_extraction import load_encoder
    from feature_extraction.autoencoder import ae_ckpt_path
    from feature_extraction.relevancy import encode_prompts, render_features

    os.chdir(chain)
    run = argparse.Namespace(seq=SEQ, downscale=1, lr_features=0.0025, lr_attention=0.00016, seed=0, tile_mix="purest")
    ae, _ = load_autoencoder(ae_ckpt_path(SEQ), "color")
    setup = prepare_on_chain(4, run, ae, {"features": stored_features(3)})
    state = torch.load("states/state_000004.pt", weights_only=True)
    params, attention, _ = train_4legs.initialize(setup["rendervar"]["means3D"].shape[0], state, setup["lrs"], "cpu", 0)
    prompts = ["a blue box sliding on the floor", "a green top spinning"]  # both in view at timestep 4
    positives, negatives = encode_prompts(load_encoder("color"), prompts, "cpu")
    cam = helpers.cameras_at(helpers.load_meta(SEQ, "test"), 4)[0]
    with torch.no_grad():
        rendered = [
            render_features(cam, setup["rendervar"], f)[1]
            for f in (train_4legs.lifted_features(params, attention, setup), stored_features(4))
        ]
        trained, stored = (relevance_map(r, ae, positives, negatives, stride=1) for r in rendered)
    diff = float((trained - stored).abs().max())
    print(
        f"stored against trained features: rendered features differ by at most "
        f"{float((rendered[0] - rendered[1]).abs().max()):.5f}, relevance by {diff:.5f}"
    )
    assert float(trained.amax((1, 2)).min()) > 0.1 and diff < STORED_RELEVANCE_TOLERANCE
    record = read_legs(legs_path(LEGS, 4), "")
    foreground = helpers.is_foreground(setup["rendervar"]["seg_colors"])
    assert record["base"]["t"] == 0 and torch.equal(record["rows"].long(), foreground.nonzero()[:, 0])
    assert torch.equal(stored_features(4)[~foreground], stored_features(0)[~foreground])


def test_resume_and_stale_outputs(chain, capsys):
    import train_4legs

    os.chdir(chain)
    before = {f: os.path.getmtime(os.path.join(LEGS, f)) for f in os.listdir(LEGS)}
    assert sorted(before) == [f"{t:06d}.pt" for t in range(12)] + ["state_000011.pt"]  # one state: the last's
    train_4legs.main(["-s", SEQ, "-e", EXP, "--encoder", "color", "--iters", "200", "--warm-iters", "50"])  # as trained
    assert "0 timesteps trained, 12 already done" in capsys.readouterr().out
    assert before == {f: os.path.getmtime(os.path.join(LEGS, f)) for f in os.listdir(LEGS)}
    record = read_legs(os.path.join(LEGS, "000003.pt"), "")
    assert record["warm_start"] and record["iterations"] == 50 and record["values"].shape[1] == 128
    phases = record["phase_seconds"]
    assert list(phases) == ["prepare", "iterations", "target maps"] and min(phases.values()) > 0, phases
    assert sum(phases.values()) <= record["seconds"] + 1e-6
    # another encoder's outputs are refused, with the way out
    with pytest.raises(helpers.UserError, match="trained on 'color' features"):
        train_4legs.main(["-s", SEQ, "-e", EXP, "--encoder", "viclip"])


SCORE_TOLERANCE = 0.03  # frame-score difference (relevance) that counts as the same relevance


def test_converged_warm_start_stops_early_with_the_same_relevance(chain, capsys):
    """Timestep 5 warm-started from the chain's timestep 4 (its objects move; the colour encoder sees
    no motion at timesteps 0-1, whose clips are padded after their centre frame): stopped by the
    convergence test (train_4legs.converged) it gives the relevance maps and masks of --fixed-iters 150 in fewer
    iterations (tolerances: relevance correlation > 0.98; each prompt's frame score within
    SCORE_TOLERANCE of the fixed run's, so that a prompt detected clearly (score at least
    SCORE_TOLERANCE from the threshold) is detected in both or neither; each clearly detected
    prompt's mask IoU >= 0.8). A score that sits on the threshold may fall either side in two runs
    of the same length too, so only clear detections are compared bit for bit. Timestep 5 is trained
    as train_4legs.main trains it, but outside a legs/ folder: main refuses to add a timestep trained
    with other settings to the chain's."""
    import train_4legs
    from feature_extraction import load_encoder
    from feature_extraction.autoencoder import ae_ckpt_path
    from feature_extraction.relevancy import encode_prompts, render_features

    os.chdir(chain)
    runs = {"fixed": ["--fixed-iters"], "converged": ["--warm-min-iters", "48", "--converge-window", "24"]}
    ae, _ = load_autoencoder(ae_ckpt_path(SEQ), "color")
    base = read_legs(legs_path(LEGS, 4), "")["base"]
    previous = {**torch.load("states/state_000004.pt", weights_only=True), "features": stored_features(4), "base": base}
    records = []
    for exp, options in runs.items():
        args = train_4legs.parse_args(["-s", SEQ, "-e", EXP, "--encoder", "color", "--warm-iters", "150", *options])
        setup = prepare_on_chain(5, args, ae, previous)
        stop = train_4legs.stop_rule(args, previous, len(setup["renderers"]))
        params, attention, losses = train_4legs.train_timestep(5, setup, previous, args.warm_iters, stop)
        os.makedirs(f"{exp}/legs")  # as saved: beside the record holding its background
        shutil.copy(legs_path(LEGS, base["t"]), f"{exp}/legs")
        with torch.no_grad():
            features = train_4legs.lifted_features(params, attention, setup)
        save_legs(legs_path(f"{exp}/legs", 5), features, setup["neighbours"][:, 0], base, {"t": 5, "run_id": exp})
        records.append({"iterations": losses.shape[0]})
    prompts = [BALL, "a blue box sliding on the floor", "a green top spinning"]
    positives, negatives = encode_prompts(load_encoder("color"), prompts, "cpu")
    rendervar = helpers.load_d3dgs_params(f"output/{EXP}/synthetic/params.npz", 5)
    cam = helpers.cameras_at(helpers.load_meta(SEQ, "test"), 5)[0]
    with torch.no_grad():
        fixed, converged = (
            relevance_map(
                render_features(cam, rendervar, stored_features(5, f"{exp}/legs"))[1],
                ae,
                positives,
                negatives,
                stride=1,
            )
            for exp in runs
        )
    corr = float(np.corrcoef(fixed.flatten().numpy(), converged.flatten().numpy())[0, 1])
    scores = [frame_scores(maps) for maps in (fixed, converged)]  # [3] per prompt
    clear = [p for p, score in zip(prompts, scores[0]) if abs(float(score) - DETECT_THRESHOLD) >= SCORE_TOLERANCE]
    detected = [
        sorted(p for p, score in zip(prompts, run) if score > DETECT_THRESHOLD and p in clear) for run in scores
    ]
    masks = [[heat(r) > 0.5 for r in maps] for maps in (fixed, converged)]
    mask_iou = {p: float((a & b).sum() / (a | b).sum()) for p, a, b in zip(prompts, *masks) if p in detected[0]}
    print(
        f"{records[1]['iterations']} iterations (fixed: {records[0]['iterations']}), relevance correlation "
        f"{corr:.4f}, frame scores {[[round(float(v), 3) for v in run] for run in scores]}, mask IoU {mask_iou}"
    )
    assert records[0]["iterations"] == 150
    assert 48 <= records[1]["iterations"] < 150 and records[1]["iterations"] % 24 == 0, records[1]["iterations"]
    assert float((scores[0] - scores[1]).abs().max()) < SCORE_TOLERANCE, scores
    assert corr > 0.98 and detected[0] == detected[1] and detected[0], (corr, detected)
    assert min(mask_iou.values()) >= 0.8, mask_iou


def test_bench_legs_speed_runs_on_the_cpu(tmp_path):
    """benchmarks/bench_legs.py speed, tiny: it ran a cold and a warm timestep (the warm one training
    the --foreground share alone), printed both per-iteration times and profiled warm iterations and
    the target maps."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = "--gaussians 600 --cams 2 --width 32 --height 18 --iters 50 --warm-iters 50 --block 25 --device cpu"
    args += " --profile 3"
    run = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "bench_legs.py"), "speed", *args.split()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    line = next(x for x in run.stdout.splitlines() if "median per iteration" in x)
    cold, warm = (float(line.split(name)[1].split()[0]) for name in ("cold ", "warm "))
    assert cold > 0 and warm > 0 and "warm (50 it, 30% of the Gaussians trained)" in run.stdout, run.stdout
    assert "profile of 3 x warm iteration" in run.stdout and "profile of 2 x camera" in run.stdout, run.stdout
    assert os.listdir(tmp_path / "results") == []  # its stage-3 cache removed


@pytest.mark.parametrize(
    "option, value, said",
    [("--foreground", v, f"--foreground {float(v)}") for v in ("0", "1.5", "nan")]
    + [("--profile", "-2", "--profile -2")],
)
def test_bench_legs_refuses_a_foreground_share_outside_0_1_or_a_negative_profile(tmp_path, option, value, said):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "bench_legs.py"), "speed", option, value],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=root),
        timeout=120,
    )
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and said in run.stderr
