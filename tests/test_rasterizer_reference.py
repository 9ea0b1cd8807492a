"""The PyTorch reference rasterizer (_torch_impl, the specification) against independent math.

Central finite differences in float64 for every gradient, closed-form images computed here in
numpy from the camera (EWA projection, 0.3 px dilation, alpha formula, tiles, background),
depth ordering, culling, odd image sizes, feature channels, spherical harmonics, the
transmittance stop and bad input. All on CPU, on scenes of a few Gaussians.
"""

import math

import numpy as np
import pytest
import torch

import diff_gaussian_rasterization as dgr
import diff_gaussian_rasterization_feat as dgrf
import helpers
from diff_gaussian_rasterization import _torch_impl

ALPHA_MIN = 1.0 / 255.0


@pytest.fixture(autouse=True)
def one_thread():
    """Scenes of a few Gaussians gain nothing from threads, and on a busy machine waiting for a
    second thread costs more than the work (hundreds of finite-difference renders here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def camera(width, height, w2c, focal=None, cx=None, cy=None, bg=(0.1, 0.2, 0.3), dtype=torch.float64):
    """Rasterizer settings (through helpers.setup_camera) and the K [3, 3] it was made from."""
    focal = focal or 0.9 * width
    k = np.array(
        [
            [focal, 0.0, width / 2 if cx is None else cx],
            [0.0, 1.05 * focal, height / 2 if cy is None else cy],
            [0.0, 0.0, 1.0],
        ]
    )
    return helpers.setup_camera(width, height, k, w2c, bg=bg, dtype=dtype), k


def ahead_w2c():
    """A camera at the origin looking along +z (world = camera frame)."""
    return np.eye(4)


def as_float64(a, requires_grad=False):
    """A float64 tensor of `a` (anything np.asarray takes)."""
    return torch.tensor(np.asarray(a), dtype=torch.float64).requires_grad_(requires_grad)


def one_gaussian(a):
    """A float64 tensor [1, ...]: the attribute `a` of a scene of one Gaussian."""
    return as_float64(a)[None]


def render(settings, features=None, **inputs):
    """Public API call; returns (color, radii, depth, features or None)."""
    inputs.setdefault("means2D", torch.zeros_like(inputs["means3D"]))
    if features is None:
        return (*dgr.GaussianRasterizer(settings)(**inputs), None)
    return dgrf.GaussianRasterizer(settings)(legs_features=features, **inputs)


def project_np(mean, cov3, k, w2c):
    """Independent EWA projection of one Gaussian: pixel-index centre (u, v), view z, dilated 2D
    covariance [2, 2] (OpenCV camera; a point projects to column fx x / z + cx - 0.5)."""
    R, t = np.asarray(w2c)[:3, :3], np.asarray(w2c)[:3, 3]
    x, y, z = R @ mean + t
    fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    J = np.array([[fx / z, 0.0, -fx * x / z**2], [0.0, fy / z, -fy * y / z**2]])
    cov2 = J @ R @ cov3 @ R.T @ J.T + 0.3 * np.eye(2)
    return np.array([fx * x / z + cx - 0.5, fy * y / z + cy - 0.5]), z, cov2


def rotmat_np(q):
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def alpha_np(centre, cov2, opacity, width, height, tiles=True):
    """alpha [H, W] of one Gaussian at every pixel: min(0.99, o exp(-d^T cov2^-1 d / 2)), zero below
    1/255 and (tiles=True) outside the 16x16 tiles of its 3-sigma rectangle."""
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    d = np.stack([centre[0] - cols, centre[1] - rows], -1)
    power = -0.5 * np.einsum("hwi,ij,hwj->hw", d, np.linalg.inv(cov2), d)
    alpha = np.minimum(0.99, opacity * np.exp(power))
    alpha[alpha < ALPHA_MIN] = 0
    if tiles:
        mid = 0.5 * (cov2[0, 0] + cov2[1, 1])
        radius = math.ceil(3 * math.sqrt(mid + math.sqrt(max(0.1, mid * mid - np.linalg.det(cov2)))))
        gx, gy = -(-width // 16), -(-height // 16)
        x0, x1 = (min(max(int((centre[0] + s) / 16), 0), gx) for s in (-radius, radius + 15))
        y0, y1 = (min(max(int((centre[1] + s) / 16), 0), gy) for s in (-radius, radius + 15))
        inside = (cols // 16 >= x0) & (cols // 16 < x1) & (rows // 16 >= y0) & (rows // 16 < y1)
        alpha[~inside] = 0
    return alpha


# ---------------------------------------------------------------- finite differences


def tiny_scene(n, seed, channels=None, cov3d=False, shs_degree=None):
    """n Gaussians of a few pixels in front of a 26x19 camera at a general pose, leaf float64
    tensors. Opacities stay below 0.35, so alpha is below 0.99 and reaches 1/255 only inside
    3 sigma (inside the Gaussian's tiles), and depths are distinct: the rendered function is
    smooth around these inputs, which finite differences need."""
    g = torch.Generator().manual_seed(seed)
    w2c = helpers.orbit_w2c((0.0, 0.0, 0.0), 4.0, 1.0, 0.3)
    settings, k = camera(26, 19, w2c)
    c2w = np.linalg.inv(w2c)
    # points in the camera frame, spread over the view, then to the world
    z = 3.0 + 2.0 * torch.rand(n, generator=g, dtype=torch.float64)
    half_view = torch.tensor([26 / k[0, 0], 19 / k[1, 1]])
    xy = (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 0.7 * half_view * z[:, None]
    cam_pts = torch.cat([xy, z[:, None]], 1)
    means = cam_pts @ torch.tensor(c2w[:3, :3]).T + torch.tensor(c2w[:3, 3])
    inputs = {
        "means3D": means,
        "means2D": torch.zeros(n, 3, dtype=torch.float64),
        "opacities": 0.15 + 0.2 * torch.rand(n, 1, generator=g, dtype=torch.float64),
    }
    scales = 0.02 + 0.04 * torch.rand(n, 3, generator=g, dtype=torch.float64)
    rotations = torch.randn(n, 4, generator=g, dtype=torch.float64)
    if cov3d:
        cov = _torch_impl.covariance_3d(scales, rotations)
        inputs["cov3D_precomp"] = cov[:, [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]]
    else:
        inputs["scales"], inputs["rotations"] = scales, rotations
    if shs_degree is None:
        inputs["colors_precomp"] = torch.rand(n, 3, generator=g, dtype=torch.float64)
    else:
        inputs["shs"] = 0.5 * torch.randn(n, (shs_degree + 1) ** 2, 3, generator=g, dtype=torch.float64)
        settings = settings._replace(sh_degree=shs_degree)
    if channels:
        inputs["features"] = torch.rand(n, channels, generator=g, dtype=torch.float64)
    return settings, {name: v.requires_grad_(True) for name, v in inputs.items()}


def smooth_margin(settings, inputs):
    """Smallest relative distance of any pixel's alpha from the 1/255 threshold (every Gaussian,
    every pixel of the image), from the reference's own projection."""
    if "cov3D_precomp" in inputs:
        cov3D = _torch_impl.unpack_cov3d(inputs["cov3D_precomp"])
    else:
        cov3D = _torch_impl.covariance_3d(inputs["scales"], inputs["rotations"])
    h, w = settings.image_height, settings.image_width
    with torch.no_grad():
        xy, _, conic, _, _ = _torch_impl.project_gaussians(
            inputs["means3D"],
            inputs["means2D"],
            cov3D,
            settings.viewmatrix,
            settings.projmatrix,
            settings.tanfovx,
            settings.tanfovy,
            h,
            w,
        )
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        dx = xy[:, 0, None, None] - cols
        dy = xy[:, 1, None, None] - rows
        power = (
            -0.5 * (conic[:, 0, None, None] * dx * dx + conic[:, 2, None, None] * dy * dy)
            - conic[:, 1, None, None] * dx * dy
        )
        alpha = inputs["opacities"][:, :, None] * torch.exp(power)
    return float(((alpha - ALPHA_MIN).abs() / ALPHA_MIN).min())


def scalar_loss(settings, inputs, seed=7):
    """Fixed random weighting of every output (colour, depth, features) -> a scalar."""
    color, _, depth, feat = render(settings, **inputs)
    g = torch.Generator().manual_seed(seed)
    loss = (torch.rand(color.shape, generator=g, dtype=color.dtype) * color).sum()
    loss = loss + (torch.rand(depth.shape, generator=g, dtype=depth.dtype) * depth).sum()
    if feat is not None:
        loss = loss + (torch.rand(feat.shape, generator=g, dtype=feat.dtype) * feat).sum()
    return loss


def check_gradients(settings, inputs, names, max_elements=None, h=1e-6):
    """Autograd gradient of scalar_loss against central differences for every element of the
    named inputs (or max_elements of them, chosen at random)."""
    assert smooth_margin(settings, inputs) > 1e-3, "test scene too close to the alpha threshold"
    scalar_loss(settings, inputs).backward()
    for name in names:
        x = inputs[name]
        flat = x.detach().view(-1)
        idx = (
            range(flat.numel())
            if max_elements is None
            else torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(3))[:max_elements].tolist()
        )
        numeric = []
        with torch.no_grad():
            for i in idx:
                old = flat[i].item()
                flat[i] = old + h
                plus = scalar_loss(settings, inputs).item()
                flat[i] = old - h
                minus = scalar_loss(settings, inputs).item()
                flat[i] = old
                numeric.append((plus - minus) / (2 * h))
        analytic = x.grad.view(-1)[list(idx)]
        assert analytic.abs().max() > 0, f"{name}: gradient is all zero"
        torch.testing.assert_close(
            analytic,
            torch.tensor(numeric, dtype=analytic.dtype),
            rtol=1e-5,
            atol=1e-7,
            msg=lambda m: f"gradient of {name}: {m}",
        )


def test_gradients_scales_rotations():
    settings, inputs = tiny_scene(5, seed=0)
    check_gradients(settings, inputs, ["means3D", "means2D", "opacities", "colors_precomp", "scales", "rotations"])


def test_gradients_cov3d_precomp():
    settings, inputs = tiny_scene(4, seed=1, cov3d=True)
    check_gradients(settings, inputs, ["means3D", "means2D", "opacities", "cov3D_precomp"])


@pytest.mark.parametrize("channels", [1, 128])
def test_gradients_features(channels):
    """1 channel and 128 (which take different backward paths), geometry gradients included."""
    settings, inputs = tiny_scene(4, seed=3, channels=channels)
    check_gradients(settings, inputs, ["features"], max_elements=48)
    for v in inputs.values():
        v.grad = None
    check_gradients(settings, inputs, ["means3D", "opacities", "scales", "rotations"])


def test_gradients_shs_degree_3():
    settings, inputs = tiny_scene(2, seed=3, shs_degree=3)
    check_gradients(settings, inputs, ["shs", "means3D"])


def test_gradient_of_background():
    """d(sum of the image)/d bg = the final transmittance summed over the pixels, per channel."""
    settings, inputs = tiny_scene(3, seed=4)
    bg = settings.bg.clone().requires_grad_(True)
    color, _, _, _ = render(settings._replace(bg=bg), **inputs)
    color.sum().backward()
    with torch.no_grad():
        black, _, _, _ = render(settings._replace(bg=torch.zeros(3, dtype=torch.float64)), **inputs)
        t_final = (color - black)[0] / bg[0]
    assert 0 < t_final.min() < 1
    torch.testing.assert_close(bg.grad, t_final.sum().expand(3))


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("opacity,scales", [(0.3, (0.25, 0.1, 0.05)), (0.9999, (0.6, 0.5, 0.55))])
@pytest.mark.parametrize("size", [(64, 48), (37, 29)])
def test_single_gaussian_closed_form(opacity, scales, size):
    """One Gaussian against numpy: colour = alpha c + (1 - alpha) bg, depth = alpha z, at every
    pixel (up to the 1e-7 the projection adds to w before dividing); elongated, and bright
    enough for alpha to be clamped at 0.99 near the centre."""
    width, height = size
    w2c = helpers.orbit_w2c((0.0, 0.0, 0.0), 5.0, 1.2, 1.1)
    settings, k = camera(width, height, w2c, cx=0.47 * width, cy=0.55 * height)
    mean = np.array([0.2, -0.1, 0.3])
    scales, quat = np.array(scales), np.array([0.9, 0.2, -0.3, 0.1])
    colour = np.array([0.9, 0.4, 0.1])
    R = rotmat_np(quat)
    cov3 = R @ np.diag(scales**2) @ R.T
    centre, z, cov2 = project_np(mean, cov3, k, w2c)
    alpha = alpha_np(centre, cov2, opacity, width, height)
    bg = settings.bg.numpy()
    want_color = alpha[None] * colour[:, None, None] + (1 - alpha[None]) * bg[:, None, None]

    t = one_gaussian
    color, radii, depth, _ = render(
        settings, means3D=t(mean), opacities=t([opacity]), colors_precomp=t(colour), scales=t(scales), rotations=t(quat)
    )
    assert (alpha.max() == 0.99) == (opacity > 0.99)
    np.testing.assert_allclose(color.numpy(), want_color, rtol=0, atol=1e-7)
    np.testing.assert_allclose(depth[0].numpy(), alpha * z, rtol=0, atol=1e-6)
    mid = 0.5 * (cov2[0, 0] + cov2[1, 1])
    assert radii.tolist() == [math.ceil(3 * math.sqrt(mid + math.sqrt(max(0.1, mid * mid - np.linalg.det(cov2)))))]


def test_tiles_cut_the_tail():
    """A bright Gaussian's alpha >= 1/255 region (3.3 sigma) reaches past the tiles of its 3-sigma
    rectangle: those pixels stay background (the original's behaviour), its tiles' pixels do not."""
    settings, k = camera(64, 48, ahead_w2c(), focal=50.0)
    t = one_gaussian
    # ~10 px sigma centred at column 0.5: the 3-sigma rectangle ends with tile 1 (column 31), the
    # alpha >= 1/255 tail reaches column 33
    mean, scales = np.array([-2.48, 0.0, 4.0]), np.array([0.8, 0.8, 0.01])  # flat: facing the camera
    color, _, _, _ = render(
        settings,
        means3D=t(mean),
        opacities=t([0.99]),
        colors_precomp=t([1.0, 1.0, 1.0]),
        scales=t(scales),
        rotations=t([1.0, 0.0, 0.0, 0.0]),
    )
    centre, _, cov2 = project_np(mean, np.diag(scales**2), k, ahead_w2c())
    untiled = alpha_np(centre, cov2, 0.99, 64, 48, tiles=False)
    tiled = alpha_np(centre, cov2, 0.99, 64, 48, tiles=True)
    cut = (untiled > 0) & (tiled == 0)
    assert cut.any(), "the scene should have alpha >= 1/255 outside the tiles"
    bg = settings.bg.numpy()
    np.testing.assert_allclose(color.numpy()[:, cut], np.repeat(bg[:, None], cut.sum(), 1), atol=1e-12)
    assert (color.numpy()[0][tiled > 0] > bg[0]).all()


@pytest.mark.parametrize("red_in_front", [True, False])
def test_two_gaussians_depth_order(red_in_front):
    """Two Gaussians on one line of sight: the front one dominates and the colours composite
    front to back: c = a1 c1 + (1 - a1) a2 c2 + (1 - a1)(1 - a2) bg, at every pixel."""
    settings, k = camera(48, 32, ahead_w2c())
    z_red, z_blue = (3.0, 6.0) if red_in_front else (6.0, 3.0)
    means = np.array([0.02, 0.01, 1.0])[None] * np.array([[z_red], [z_blue]])  # one line of sight
    scale = np.array([[0.08], [0.12]]) * means[:, 2:] / 3.0  # the same screen sizes in both orders
    opac = np.array([0.8, 0.9])
    colours = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    t = as_float64
    color, radii, depth, _ = render(
        settings,
        means3D=t(means),
        opacities=t(opac[:, None]),
        colors_precomp=t(colours),
        scales=t(np.repeat(scale, 3, 1)),
        rotations=t([[1.0, 0, 0, 0]] * 2),
    )
    alphas = [
        alpha_np(*project_np(m, np.eye(3) * s[0] ** 2, k, ahead_w2c())[::2], o, 48, 32)
        for m, s, o in zip(means, scale, opac)
    ]
    zs = [means[0, 2], means[1, 2]]
    front, back = (0, 1) if red_in_front else (1, 0)
    a1, a2 = alphas[front], alphas[back]
    bg = settings.bg.numpy()[:, None, None]
    want = a1 * colours[front][:, None, None] + (1 - a1) * a2 * colours[back][:, None, None] + (1 - a1) * (1 - a2) * bg
    np.testing.assert_allclose(color.numpy(), want, rtol=0, atol=1e-7)
    np.testing.assert_allclose(depth[0].numpy(), a1 * zs[front] + (1 - a1) * a2 * zs[back], rtol=0, atol=1e-6)
    cy, cx = np.unravel_index(np.argmax(a1), a1.shape)
    assert color[2 * front, cy, cx] > 0.75 and color[2 * back, cy, cx] < 0.25  # channel 0 red, 2 blue
    assert (radii > 0).all()


def test_culled_gaussians_contribute_nothing():
    """Behind the camera, at z <= 0.2 and entirely off-screen: radius 0, image = background, no
    gradient; a Gaussian just in front of the near limit and one half on screen do render."""
    settings, k = camera(40, 30, ahead_w2c())
    means = torch.tensor(
        [
            [0.0, 0.0, -2.0],  # behind
            [0.0, 0.0, 0.2],  # at the near limit
            [0.0, 0.0, 0.15],  # nearer
            [30.0, 0.0, 5.0],  # far off to the right
            [0.0, -25.0, 5.0],  # far above
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    n = len(means)
    inputs = dict(
        opacities=torch.full((n, 1), 0.9, dtype=torch.float64),
        scales=torch.full((n, 3), 0.05, dtype=torch.float64),
        rotations=torch.tensor([[1.0, 0, 0, 0]] * n, dtype=torch.float64),
        colors_precomp=torch.ones(n, 3, dtype=torch.float64, requires_grad=True),
    )
    color, radii, depth, _ = render(settings, means3D=means, **inputs)
    assert radii.tolist() == [0] * n
    bg = np.broadcast_to(settings.bg.numpy()[:, None, None], color.shape)
    np.testing.assert_array_equal(color.detach().numpy(), bg)
    assert (depth == 0).all()
    (color.sum() + depth.sum()).backward()
    assert (means.grad == 0).all() and (inputs["colors_precomp"].grad == 0).all()
    features = torch.rand(n, 128, dtype=torch.float64, requires_grad=True)  # nothing drawn, many channels
    _, _, _, feat = render(settings, features=features, means3D=means, **inputs)
    feat.sum().backward()
    assert (feat == 0).all() and (features.grad == 0).all()

    # just in front of the near limit, and centred past the right edge
    visible = torch.tensor([[0.0, 0.0, 0.21], [0.62, 0.0, 1.0]], dtype=torch.float64)
    color, radii, _, _ = render(settings, means3D=visible, **{k2: v[:2].detach() for k2, v in inputs.items()})
    assert (radii > 0).all()
    assert (color[0] > settings.bg[0] + 0.1).any()


def test_size_not_multiple_of_16_is_a_crop():
    """37x29 renders the top-left crop of 272x256 with the same intrinsics: pixels do not depend
    on how the image is cut into tiles, edge tiles included (nor on the sort by pixel needing
    more than 16 bits)."""
    w2c = helpers.orbit_w2c((0.0, 0.0, 0.0), 4.0, 1.0, 0.7)
    settings_big, k = camera(272, 256, w2c, focal=40.0, cx=20.0, cy=15.0)  # > 2^16 pixels
    settings_small, _ = camera(37, 29, w2c, focal=40.0, cx=20.0, cy=15.0)
    g = torch.Generator().manual_seed(5)
    n = 60
    # within 1.3 tan(fov/2) of the small image, where its Jacobian is not clamped (the large one's
    # clamp is wider)
    z = 2.0 + 4.0 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    cam_pts = torch.cat([(torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 0.8 * z, z], 1)
    c2w = torch.from_numpy(np.linalg.inv(w2c))
    inputs = dict(
        means3D=cam_pts @ c2w[:3, :3].T + c2w[:3, 3],
        opacities=torch.rand(n, 1, generator=g, dtype=torch.float64),
        colors_precomp=torch.rand(n, 3, generator=g, dtype=torch.float64),
        scales=0.03 + 0.1 * torch.rand(n, 3, generator=g, dtype=torch.float64),
        rotations=torch.randn(n, 4, generator=g, dtype=torch.float64),
    )
    big, _, big_depth, _ = render(settings_big, **inputs)
    small, _, small_depth, _ = render(settings_small, **inputs)
    assert small.shape == (3, 29, 37) and small_depth.shape == (1, 29, 37)
    # (not bit for bit: the NDC round trip goes through the image size)
    torch.testing.assert_close(small, big[:, :29, :37], rtol=0, atol=1e-5)
    torch.testing.assert_close(small_depth, big_depth[:, :29, :37], rtol=0, atol=1e-4)
    assert (big[:, :29, :37] != settings_big.bg[:, None, None]).any()  # something was drawn there


@pytest.mark.parametrize("channels", [1, 128])
def test_features_equal_per_channel_renders(channels):
    """Feature channel j = the colour render (over a black background) of colours = feature j;
    the colour and depth of the feature rasterizer equal those of the colour rasterizer."""
    settings, inputs = tiny_scene(12, seed=6, channels=channels)
    inputs = {k: v.detach() for k, v in inputs.items()}
    features = inputs.pop("features")
    color, radii, depth, feat = render(settings, features=features, **inputs)
    plain_color, plain_radii, plain_depth, _ = render(settings, **inputs)
    assert feat.shape == (channels, 19, 26)
    torch.testing.assert_close(color, plain_color, rtol=0, atol=1e-12)
    torch.testing.assert_close(depth, plain_depth, rtol=0, atol=1e-12)
    assert torch.equal(radii, plain_radii)
    black = settings._replace(bg=torch.zeros(3, dtype=torch.float64))
    for j in sorted({0, channels // 2, channels - 1}):
        as_colour = dict(inputs, colors_precomp=features[:, j : j + 1].expand(-1, 3))
        want, _, _, _ = render(black, **as_colour)
        torch.testing.assert_close(feat[j], want[0], rtol=0, atol=1e-12)
    assert feat.abs().sum() > 0


def sh_colours_np(degree, shs, means, campos):
    """Real spherical harmonics of 3D Gaussian Splatting, evaluated here independently."""
    d = means - campos
    x, y, z = (d / np.linalg.norm(d, axis=1, keepdims=True)).T
    basis = [0.28209479177387814 * np.ones_like(x)]
    if degree >= 1:
        basis += [-0.4886025119029199 * y, 0.4886025119029199 * z, -0.4886025119029199 * x]
    if degree >= 2:
        basis += [
            1.0925484305920792 * x * y,
            -1.0925484305920792 * y * z,
            0.31539156525252005 * (2 * z * z - x * x - y * y),
            -1.0925484305920792 * x * z,
            0.5462742152960396 * (x * x - y * y),
        ]
    if degree >= 3:
        basis += [
            -0.5900435899266435 * y * (3 * x * x - y * y),
            2.890611442640554 * x * y * z,
            -0.4570457994644658 * y * (4 * z * z - x * x - y * y),
            0.3731763325901154 * z * (2 * z * z - 3 * x * x - 3 * y * y),
            -0.4570457994644658 * x * (4 * z * z - x * x - y * y),
            1.445305721320277 * z * (x * x - y * y),
            -0.5900435899266435 * x * (x * x - 3 * y * y),
        ]
    basis = np.stack(basis, 1)  # [N, K]
    return np.maximum(np.einsum("nk,nkc->nc", basis, shs[:, : basis.shape[1]]) + 0.5, 0.0)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_shs_equal_precomputed_colours(degree):
    """shs (16 coefficients given, sh_degree of them used) render like colors_precomp set to the
    SH colours seen from the camera centre."""
    settings, inputs = tiny_scene(10, seed=8, shs_degree=3)
    settings = settings._replace(sh_degree=degree)
    inputs = {k: v.detach() for k, v in inputs.items()}
    colours = sh_colours_np(degree, inputs["shs"].numpy(), inputs["means3D"].numpy(), settings.campos.numpy())
    with_shs, _, _, _ = render(settings, **inputs)
    precomp = dict(inputs, colors_precomp=torch.from_numpy(colours))
    del precomp["shs"]
    with_colours, _, _, _ = render(settings, **precomp)
    torch.testing.assert_close(with_shs, with_colours, rtol=0, atol=1e-12)
    assert (with_shs != settings.bg[:, None, None]).any()


def stacked_scene():
    """Five nearly opaque Gaussians (opacity 0.97) on the line of sight through pixel (16, 16) of
    a 32x32 camera, 2 to 6 units away, the same size on screen. Returns (settings, K, inputs of
    float64 leaf tensors)."""
    settings, k = camera(32, 32, ahead_w2c(), focal=30.0)
    zs = np.array([2.0, 3.0, 4.0, 5.0, 6.0])

    def t(a):
        return as_float64(a, requires_grad=True)

    inputs = {
        "means3D": t(np.array([0.5 / 30, 0.5 / 31.5, 1.0])[None] * zs[:, None]),
        "opacities": t(np.full((5, 1), 0.97)),
        "colors_precomp": t(np.eye(3)[[0, 1, 2, 0, 1]] * np.array([1.0, 1.0, 1.0, 0.5, 0.5])[:, None]),
        "scales": t(np.repeat(0.05 * zs[:, None], 3, 1)),
        "rotations": t([[1.0, 0, 0, 0]] * 5),
        "means2D": t(np.zeros((5, 3))),
    }
    return settings, k, inputs


def test_transmittance_stop():
    """At the centre pixel the third Gaussian would take T below 1e-4, so it and everything behind
    it are dropped and the background gets the T left after the second; pixels where T stays
    above 1e-4 see all five."""
    settings, k, inputs = stacked_scene()
    color, _, _, _ = render(settings, **inputs)
    means, scales, colours = (inputs[name].detach().numpy() for name in ("means3D", "scales", "colors_precomp"))
    alphas = [alpha_np(*project_np(m, np.diag(s**2), k, ahead_w2c())[::2], 0.97, 32, 32) for m, s in zip(means, scales)]
    bg = settings.bg.numpy()
    want = np.zeros((3, 32, 32))
    trans = np.ones((32, 32))
    stopped = np.zeros((32, 32), bool)
    for a, c in zip(alphas, colours):
        stopped |= trans * (1 - a) < 1e-4
        use = ~stopped & (a > 0)
        want += np.where(use, a * trans, 0) * c[:, None, None]
        trans = np.where(use, trans * (1 - a), trans)
    want += trans * bg[:, None, None]
    cy = cx = 16  # the centre pixel: alphas 0.97 each
    assert stopped[cy, cx] and not stopped.all()
    assert abs(trans[cy, cx] - 0.03**2) < 1e-12
    np.testing.assert_allclose(color.detach().numpy(), want, rtol=0, atol=1e-7)
    # the dropped third Gaussian gets no gradient from the stopped pixel
    color[:, cy, cx].sum().backward()
    grad = inputs["colors_precomp"].grad
    assert (grad[2:] == 0).all() and (grad[:2] > 0).all()


def test_gradients_with_transmittance_stop():
    """The stacked scene with turned, elongated Gaussians: the centre pixel still stops."""
    settings, _, inputs = stacked_scene()
    with torch.no_grad():
        inputs["scales"] *= torch.tensor([1.0, 0.8, 1.2], dtype=torch.float64)
        inputs["rotations"] += torch.tensor([0.0, 0.1, 0.2, 0.3], dtype=torch.float64)
        color, _, _, _ = render(settings, **inputs)
        dropped = dict(inputs, opacities=inputs["opacities"] * torch.tensor([[1.0], [1.0], [0.0], [0.0], [0.0]]))
        torch.testing.assert_close(color[:, 16, 16], render(settings, **dropped)[0][:, 16, 16], rtol=0, atol=1e-12)
    check_gradients(settings, inputs, ["means3D", "means2D", "opacities", "colors_precomp", "scales", "rotations"])


def test_stable_argsort():
    """The radix sort by pixel (one 16-bit pass, or two) orders like a stable sort."""
    g = torch.Generator().manual_seed(9)
    for num_keys in (1, 100, 65536, 70000, 300000):
        keys = torch.randint(0, num_keys, (5000,), generator=g, dtype=torch.int32)
        assert torch.equal(_torch_impl.stable_argsort(keys, num_keys), torch.sort(keys, stable=True).indices)
    assert _torch_impl.stable_argsort(torch.zeros(0, dtype=torch.int32), 0).numel() == 0


# ---------------------------------------------------------------- bad input


def good_inputs(n=3):
    return dict(
        means3D=torch.rand(n, 3) + torch.tensor([0.0, 0.0, 3.0]),
        means2D=torch.zeros(n, 3),
        opacities=torch.rand(n, 1),
        colors_precomp=torch.rand(n, 3),
        scales=torch.rand(n, 3) * 0.1,
        rotations=torch.randn(n, 4),
    )


@pytest.mark.parametrize(
    "name,bad",
    [
        ("means3D", torch.zeros(3, 2)),
        ("means2D", torch.zeros(4, 3)),
        ("opacities", torch.zeros(3)),
        ("colors_precomp", torch.zeros(3, 4)),
        ("scales", torch.zeros(3, 2)),
        ("rotations", torch.zeros(3, 3)),
        ("cov3D_precomp", torch.zeros(3, 5)),
    ],
)
def test_wrong_shapes_name_the_argument(name, bad):
    settings, _ = camera(32, 24, ahead_w2c(), dtype=torch.float32)
    inputs = good_inputs()
    if name == "cov3D_precomp":
        del inputs["scales"], inputs["rotations"]
    inputs[name] = bad
    with pytest.raises(ValueError, match=name):
        dgr.GaussianRasterizer(settings)(**inputs)


@pytest.mark.parametrize("name", ["viewmatrix", "projmatrix"])
def test_wrong_matrix_shape_names_the_setting(name):
    settings, _ = camera(32, 24, ahead_w2c(), dtype=torch.float32)
    for bad in (torch.eye(3), torch.eye(4)[:3], torch.eye(4).repeat(2, 1, 1)):
        with pytest.raises(ValueError, match=f"settings.{name} has shape"):
            dgr.GaussianRasterizer(settings._replace(**{name: bad}))(**good_inputs())
    transposed_view = getattr(settings, name).T.contiguous().T[None]  # what callers of the original pass
    dgr.GaussianRasterizer(settings._replace(**{name: transposed_view}))(**good_inputs())


def test_missing_or_doubled_inputs_name_the_arguments():
    settings, _ = camera(32, 24, ahead_w2c(), dtype=torch.float32)
    inputs = good_inputs()
    no_colour = {k: v for k, v in inputs.items() if k != "colors_precomp"}
    with pytest.raises(ValueError, match="colors_precomp"):
        dgr.GaussianRasterizer(settings)(**no_colour)
    with pytest.raises(ValueError, match="shs"):
        dgr.GaussianRasterizer(settings)(shs=torch.zeros(3, 1, 3), **inputs)
    no_geometry = {k: v for k, v in inputs.items() if k not in ("scales", "rotations")}
    with pytest.raises(ValueError, match="cov3D_precomp"):
        dgr.GaussianRasterizer(settings)(**no_geometry)
    with pytest.raises(ValueError, match="shs"):
        dgr.GaussianRasterizer(settings)(shs=torch.zeros(3, 3), **no_colour)
    with pytest.raises(ValueError, match="legs_features"):
        dgrf.GaussianRasterizer(settings)(**inputs)
    with pytest.raises(ValueError, match="legs_features"):
        dgrf.GaussianRasterizer(settings)(legs_features=torch.zeros(4, 8), **inputs)
    with pytest.raises(ValueError, match="legs_features"):
        dgrf.GaussianRasterizer(settings)(legs_features=torch.zeros(3), **inputs)
