"""benchmarks/bench_rasterizer.py (docs/performance.md's rasterizer table) on the CPU: the four
figures of ours on a tiny synthetic sequence, one line where gsplat is missing, one-line errors."""

import math
import re
import sys

import pytest
import torch

import helpers
import synthetic_sequence
from benchmarks import bench_rasterizer

TINY = ["--gaussians", "200", "--device", "cpu", "--iters", "2", "--warmup", "1"]


@pytest.fixture
def no_gsplat(monkeypatch):
    """`import gsplat` fails, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "gsplat", None)


def test_ours_on_cpu_without_gsplat(tmp_path, monkeypatch, capsys, no_gsplat):
    monkeypatch.chdir(tmp_path)
    synthetic_sequence.generate("data/tiny", width=32, height=18, num_timesteps=2, num_train=3, num_test=0)
    capsys.readouterr()
    results = bench_rasterizer.main(["-s", "tiny", *TINY])
    out = capsys.readouterr().out
    assert list(results) == [("ours", 200)]
    figures = results["ours", 200]
    assert list(figures) == ["rgb_fwd", "rgb_fwd_bwd", "feat128_fwd", "feat128_fwd_bwd"]
    for ms, peak, added in figures.values():
        assert math.isfinite(ms) and ms > 0 and peak is None and added is None  # no memory figures on the CPU
    gsplat_lines = [line for line in out.splitlines() if "gsplat" in line]
    assert gsplat_lines == ["gsplat: not installed (pip install gsplat==1.5.3 to compare); timing ours only"]
    assert "time.perf_counter on the CPU" in out and "3 of data/tiny/train_meta.json, 32x18" in out
    in_view = float(re.search(r"([\d.]+)% of the centres in view of camera 0", out).group(1))
    assert in_view > 50  # the Gaussians fill the region the cameras look at
    for label in bench_rasterizer.FIGURES.values():
        assert re.search(rf"^\| 200 \| {re.escape(label)} \| \d+\.\d{{3}} \|$", out, re.M), label


def test_scene_is_fixed_and_faces_the_ring():
    meta = bench_rasterizer.ring_meta()
    first, again = bench_rasterizer.random_scene(500, meta, "cpu"), bench_rasterizer.random_scene(500, meta, "cpu")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["features"].shape == (500, bench_rasterizer.FEATURE_CHANNELS)
    centre, radius = bench_rasterizer.scene_ball(meta)
    assert abs(centre).max() < 1e-9 and radius == pytest.approx(0.5 * math.hypot(3.5, 1.5))
    assert bench_rasterizer.in_view(first, meta) > 0.8


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--backends", "ours", "tiles"], "--backends tiles"),
        (["--gaussians", "300", "0"], "--gaussians 0"),
        (["--backends", "gsplat", "--device", "cpu"], "--backends gsplat"),
        (["--device", "cuda"], "--device cuda"),
    ],
)
def test_bad_input_is_one_line(argv, names, capsys, no_gsplat):
    if argv[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit) as exit:
        helpers.run_main(lambda: bench_rasterizer.main(argv))
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {names}")


def test_gsplat_calls():
    """The gsplat path without gsplat: a stand-in for gsplat.rasterization records each call."""
    calls = []

    def rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **options):
        calls.append(
            {
                "shapes": [list(t.shape) for t in (means, quats, scales, opacities, colors, viewmats, Ks)],
                "size": (width, height),
                "geometry_grad": [t.requires_grad for t in (means, quats, scales, opacities)],
                "colors_grad": colors.requires_grad,
                "viewmat": viewmats[0],
                "options": options,
            }
        )
        channels = colors.shape[-1] + (options["render_mode"] == "RGB+ED")
        return (means.sum() + colors.sum()) * torch.ones(1, height, width, channels), None, {}

    meta = bench_rasterizer.ring_meta()
    scene = bench_rasterizer.random_scene(50, meta, "cpu")
    figures = bench_rasterizer.gsplat_figures(rasterization, scene, meta, torch.device("cpu"))
    for i, call in enumerate(figures.values()):
        call(bench_rasterizer.RING_CAMERAS + i)  # camera i
    assert [c["options"]["render_mode"] for c in calls] == ["RGB+ED", "RGB+ED", "RGB", "RGB"]
    assert all(c["options"]["packed"] is False and c["size"] == (640, 360) for c in calls)
    assert [c["shapes"][3:] for c in calls] == [[[50], [50, 3], [1, 4, 4], [1, 3, 3]]] * 2 + [
        [[50], [50, 128], [1, 4, 4], [1, 3, 3]]
    ] * 2
    for i, c in enumerate(calls):
        assert torch.allclose(c["viewmat"], torch.tensor(meta["w2c"][0][i], dtype=torch.float32))
    # forward: no gradients; fwd+bwd: all of them; features only: the features alone
    assert [(c["geometry_grad"], c["colors_grad"]) for c in calls] == [
        ([False] * 4, False),
        ([True] * 4, True),
        ([False] * 4, False),
        ([False] * 4, True),
    ]
