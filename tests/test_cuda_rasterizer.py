"""The CUDA rasterizer against the PyTorch reference (_torch_impl, the specification), on the GPU.

Random scenes of fixed seeds (one per test, named in every failure message): forward outputs within
1e-4 relative L2, every gradient within 1e-3, radii identical, every output element written (buffers
are filled with NaN before the kernels run). Run on a machine with a GPU and the built extension:
    python -m pytest -q -m gpu tests/test_cuda_rasterizer.py
"""

import math

import pytest
import torch

import diff_gaussian_rasterization as dgr
import diff_gaussian_rasterization_feat as dgrf
from diff_gaussian_rasterization import _cuda, _torch_impl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda.available(), reason="CUDA extension not built")]

FORWARD_TOL = 1e-4
GRAD_TOL = 1e-3


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def random_camera(width, height, gen, device="cuda"):
    """Settings of a camera at a random pose: focal about the width, principal point off centre."""
    fx, fy = width * (0.8 + 0.4 * torch.rand(1, generator=gen).item()), width * 0.9
    cx, cy = width * 0.52, height * 0.47
    axis = torch.nn.functional.normalize(torch.randn(3, generator=gen), dim=0)
    angle = torch.rand(1, generator=gen).item() * math.pi
    K = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    R = torch.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K
    w2c = torch.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R, torch.randn(3, generator=gen)
    near, far = 0.01, 100.0
    proj = torch.tensor(
        [
            [2 * fx / width, 0.0, -(width - 2 * cx) / width, 0.0],
            [0.0, 2 * fy / height, -(height - 2 * cy) / height, 0.0],
            [0.0, 0.0, far / (far - near), -(far * near) / (far - near)],
            [0.0, 0.0, 1.0, 0.0],
        ]
    )
    view = w2c.T.contiguous()
    settings = dgr.GaussianRasterizationSettings(
        image_height=height,
        image_width=width,
        tanfovx=width / (2 * fx),
        tanfovy=height / (2 * fy),
        bg=torch.rand(3, generator=gen).to(device),
        scale_modifier=1.0,
        viewmatrix=view.to(device),
        projmatrix=(view @ proj.T).to(device),
        sh_degree=0,
        campos=torch.inverse(w2c)[:3, 3].to(device),
        prefiltered=False,
    )
    return settings, w2c, fx


def random_scene(n, settings, w2c, fx, channels, gen, precomp=False, radius_px=4.0, device="cuda"):
    """n Gaussians in and around the view frustum (5% behind the camera or nearer than 0.2, some
    off-screen, some past the Jacobian's 1.3 tan(fov/2) clamp), scales giving about radius_px
    pixels with 3% ten times larger, random unnormalised rotations, opacities spanning the 0.99
    clamp. Returns the rasterize() inputs as leaf tensors needing gradients."""
    depth = 0.5 + 9.5 * torch.rand(n, generator=gen)
    depth[: n // 20] = torch.rand(n // 20, generator=gen) * 0.4 - 0.2
    u = (torch.rand(n, 2, generator=gen) * 3.2 - 1.6) * torch.tensor([settings.tanfovx, settings.tanfovy])
    p_cam = torch.cat([u * depth[:, None], depth[:, None]], 1)
    R, t = w2c[:3, :3], w2c[:3, 3]
    means = (p_cam - t) @ R  # R^T (p_cam - t) for row vectors
    scale0 = radius_px * depth.abs().clamp(min=0.5)[:, None] / (3 * fx)
    scale0[n // 20 : n // 20 + max(1, 3 * n // 100)] *= 10.0
    scales = scale0 * torch.exp(0.4 * torch.randn(n, 3, generator=gen))
    rotations = torch.randn(n, 4, generator=gen) * (0.5 + torch.rand(n, 1, generator=gen))
    inputs = {
        "means3D": means,
        "means2D": torch.zeros(n, 3),
        "opacities": torch.sigmoid(2.0 * torch.randn(n, 1, generator=gen)),
        "colors": torch.rand(n, 3, generator=gen),
        "features": torch.randn(n, channels, generator=gen) if channels else None,
        "scales": scales,
        "rotations": rotations,
        "cov3D_precomp": None,
    }
    if precomp:
        cov = _torch_impl.covariance_3d(scales, rotations)
        inputs["cov3D_precomp"] = cov[:, [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]]  # xx, xy, xz, yy, yz, zz
        inputs["scales"] = inputs["rotations"] = None
    return {k: None if v is None else v.to(device).requires_grad_(True) for k, v in inputs.items()}


def call(impl, scene, settings):
    return impl.rasterize(
        scene["means3D"],
        scene["means2D"],
        scene["opacities"],
        scene["colors"],
        scene["features"],
        scene["scales"],
        scene["rotations"],
        scene["cov3D_precomp"],
        settings.bg,
        settings.scale_modifier,
        settings.viewmatrix,
        settings.projmatrix,
        settings.tanfovx,
        settings.tanfovy,
        settings.image_height,
        settings.image_width,
    )


def weighted_loss(outputs, weights):
    return sum((o * w).sum() for o, w in zip(outputs, weights) if o is not None)


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(_cuda, "poison_outputs", True)


@pytest.mark.parametrize(
    "n, width, height, channels, precomp",
    [
        (1_000, 173, 131, 3, False),
        (10_000, 250, 190, 1, True),
        (30_000, 97, 61, 512, False),
        (100_000, 320, 200, 128, False),
        (50_000, 300, 170, None, False),
    ],
)
def test_matches_reference(poisoned, n, width, height, channels, precomp):
    seed = 1
    gen = torch.Generator().manual_seed(seed)
    settings, w2c, fx = random_camera(width, height, gen)
    scene = random_scene(n, settings, w2c, fx, channels, gen, precomp, radius_px=12.0 if n <= 1_000 else 4.0)
    where = f"(seed {seed}, n {n}, {width}x{height}, C {channels})"

    out = call(_cuda, scene, settings)
    ref = call(_torch_impl, scene, settings)
    for name, o in zip(("color", "depth", "features"), (out[0], out[2], out[3])):
        if o is not None:
            assert torch.isfinite(o).all(), f"{name} has unwritten (NaN) elements {where}"
    assert out[1].dtype == torch.int32 and torch.equal(out[1], ref[1]), (
        f"radii differ at {(out[1] != ref[1]).sum().item()} Gaussians {where}"
    )
    assert (ref[1] > 0).sum() > n // 4, f"scene too sparse to test {where}"
    for name, o, r in zip(("color", "depth", "features"), (out[0], out[2], out[3]), (ref[0], ref[2], ref[3])):
        if r is not None:
            assert rel_err(o, r) < FORWARD_TOL, f"{name}: relative error {rel_err(o, r):.2e} {where}"

    weights = [torch.randn_like(r) if r is not None else None for r in (ref[0], ref[2], ref[3])]
    leaves = [k for k, v in scene.items() if v is not None]
    grads = torch.autograd.grad(weighted_loss((out[0], out[2], out[3]), weights), [scene[k] for k in leaves])
    ref_grads = torch.autograd.grad(weighted_loss((ref[0], ref[2], ref[3]), weights), [scene[k] for k in leaves])
    for name, g, r in zip(leaves, grads, ref_grads):
        assert torch.isfinite(g).all(), f"grad {name} has unwritten (NaN) elements {where}"
        assert rel_err(g, r) < GRAD_TOL, f"grad {name}: relative error {rel_err(g, r):.2e} {where}"


def test_frozen_geometry_computes_feature_gradients_only(poisoned):
    """4-LEGS training: geometry detached, only features (and here colours) need gradients."""
    seed = 2
    gen = torch.Generator().manual_seed(seed)
    settings, w2c, fx = random_camera(211, 157, gen)
    scene = random_scene(20_000, settings, w2c, fx, 128, gen)
    frozen = {k: (v.detach() if k not in ("features", "colors") and v is not None else v) for k, v in scene.items()}
    out, ref = call(_cuda, frozen, settings), call(_torch_impl, frozen, settings)
    weights = torch.randn_like(ref[0])
    # feature loss a plain sum: its gradient reaches the kernel broadcast (stride 0), as in training
    g = torch.autograd.grad((out[0] * weights).sum() + out[3].sum(), [frozen["colors"], frozen["features"]])
    r = torch.autograd.grad((ref[0] * weights).sum() + ref[3].sum(), [frozen["colors"], frozen["features"]])
    for name, a, b in zip(("colors", "features"), g, r):
        assert rel_err(a, b) < GRAD_TOL, f"grad {name}: relative error {rel_err(a, b):.2e} (seed {seed})"


def test_public_api_dispatches_to_cuda():
    """GaussianRasterizer on CUDA tensors runs the kernels (SH colours, both packages) and fills
    means2D.grad, the screen-space gradient densification reads."""
    seed = 3
    gen = torch.Generator().manual_seed(seed)
    settings, w2c, fx = random_camera(160, 120, gen)
    scene = random_scene(5_000, settings, w2c, fx, 16, gen)
    shs = torch.randn(5_000, 4, 3, generator=gen).cuda().requires_grad_(True)
    settings = settings._replace(sh_degree=1)
    assert dgr.cuda_available() and dgrf.cuda_available()
    color, radii, depth = dgr.GaussianRasterizer(settings)(
        scene["means3D"],
        scene["means2D"],
        scene["opacities"],
        shs=shs,
        scales=scene["scales"],
        rotations=scene["rotations"],
    )
    colors = dgr.eval_sh(1, shs, scene["means3D"], settings.campos)
    ref = call(_torch_impl, dict(scene, colors=colors, features=None), settings)
    assert rel_err(color, ref[0]) < FORWARD_TOL and torch.equal(radii, ref[1]), f"seed {seed}"
    # callers of the original pass [1, 4, 4] transposed views: read in place, the same image
    strided = settings._replace(
        viewmatrix=settings.viewmatrix.T.contiguous().T[None], projmatrix=settings.projmatrix.T.contiguous().T[None]
    )
    assert not strided.viewmatrix.is_contiguous()
    with torch.no_grad():
        again = dgr.GaussianRasterizer(strided)(
            scene["means3D"],
            scene["means2D"],
            scene["opacities"],
            shs=shs,
            scales=scene["scales"],
            rotations=scene["rotations"],
        )
    assert torch.equal(again[0], color) and torch.equal(again[1], radii), f"seed {seed}"
    (color.sum() + depth.sum()).backward()  # broadcast (stride 0) image gradients
    assert scene["means2D"].grad is not None and scene["means2D"].grad[:, :2].abs().sum() > 0
    assert (scene["means2D"].grad[:, 2] == 0).all()
    ref_grad = torch.autograd.grad(ref[0].sum() + ref[2].sum(), scene["means3D"])[0]
    assert rel_err(scene["means3D"].grad, ref_grad) < GRAD_TOL, f"seed {seed}"
    feat_out = dgrf.GaussianRasterizer(settings)(
        scene["means3D"].detach(),
        torch.zeros_like(scene["means2D"]),
        scene["opacities"].detach(),
        colors_precomp=scene["colors"].detach(),
        legs_features=scene["features"],
        scales=scene["scales"].detach(),
        rotations=scene["rotations"].detach(),
    )
    ref = call(_torch_impl, {k: v if v is None else v.detach() for k, v in scene.items()}, settings)
    assert rel_err(feat_out[3], ref[3]) < FORWARD_TOL, f"seed {seed}"


def test_no_grad_path_and_an_image_of_many_tiles(poisoned):
    """Under no_grad the kernels run without an autograd node and give the images of the
    differentiable call; an image of more than 65,535 tiles (4160x4128: 67,080) sorts 32-bit tile
    keys instead of 16-bit ones, and matches the reference."""
    seed = 4
    gen = torch.Generator().manual_seed(seed)
    settings, w2c, fx = random_camera(4160, 4128, gen)
    scene = random_scene(3_000, settings, w2c, fx, 4, gen, radius_px=60.0)
    out = call(_cuda, scene, settings)
    with torch.no_grad():
        plain = call(_cuda, scene, settings)
        ref = call(_torch_impl, scene, settings)
    assert out[0].grad_fn is not None and plain[0].grad_fn is None
    for a, b in zip(out, plain):
        assert torch.equal(a, b), f"seed {seed}"
    assert torch.equal(plain[1], ref[1]), f"seed {seed}"
    for name, o, r in zip(("color", "depth", "features"), (plain[0], plain[2], plain[3]), (ref[0], ref[2], ref[3])):
        assert rel_err(o, r) < FORWARD_TOL, f"{name}: relative error {rel_err(o, r):.2e} (seed {seed})"


def test_equal_depths_blend_in_index_order(poisoned):
    """Copies of Gaussians (as densification makes them) share a depth; both sorts are stable, so
    the copies blend in index order, as the reference's, in forward and backward."""
    seed = 5
    gen = torch.Generator().manual_seed(seed)
    settings, w2c, fx = random_camera(240, 180, gen)
    scene = random_scene(40_000, settings, w2c, fx, None, gen, radius_px=8.0)
    with torch.no_grad():
        scene["means3D"][20_000:] = scene["means3D"][:20_000]  # 20k pairs of equal depth
    out, ref = call(_cuda, scene, settings), call(_torch_impl, scene, settings)
    assert torch.equal(out[1], ref[1]), f"seed {seed}"
    assert rel_err(out[0], ref[0]) < FORWARD_TOL, f"color: relative error {rel_err(out[0], ref[0]):.2e} (seed {seed})"
    weights = torch.randn_like(ref[0])
    g = torch.autograd.grad((out[0] * weights).sum(), [scene["colors"], scene["opacities"]])
    r = torch.autograd.grad((ref[0] * weights).sum(), [scene["colors"], scene["opacities"]])
    for name, a, b in zip(("colors", "opacities"), g, r):
        assert rel_err(a, b) < GRAD_TOL, f"grad {name}: relative error {rel_err(a, b):.2e} (seed {seed})"


def test_nothing_visible_gives_background(poisoned):
    """Every Gaussian behind the camera: background image, zero depth and features, zero radii
    and finite zero gradients."""
    gen = torch.Generator().manual_seed(0)
    settings, w2c, fx = random_camera(70, 45, gen)
    scene = random_scene(300, settings, w2c, fx, 5, gen)
    with torch.no_grad():  # move everything behind the camera: view z = -1
        p_cam = torch.cat([scene["means3D"], torch.ones_like(scene["means3D"][:, :1])], 1) @ settings.viewmatrix
        scene["means3D"] -= (p_cam[:, 2:3] + 1.0) * w2c[2, :3].cuda()
    color, radii, depth, feat = call(_cuda, scene, settings)
    assert (radii == 0).all()
    assert torch.allclose(color, settings.bg[:, None, None].expand_as(color))
    assert (depth == 0).all() and (feat == 0).all()
    grads = torch.autograd.grad(color.sum() + depth.sum() + feat.sum(), [scene["means3D"], scene["scales"]])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
