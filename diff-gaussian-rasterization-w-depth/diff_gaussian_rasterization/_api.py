"""The original's public API on top of one rasterize function (CUDA where built, else PyTorch).

This file is shared, through a symbolic link, by diff_gaussian_rasterization (colour + depth) and
diff_gaussian_rasterization_feat (colour + depth + N-channel features).
"""

from typing import NamedTuple

import torch

from . import _torch_impl

try:  # the CUDA extension is optional: without it every call takes the PyTorch path
    from . import _cuda
except ImportError:
    _cuda = None

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


class GaussianRasterizationSettings(NamedTuple):
    image_height: int
    image_width: int
    tanfovx: float
    tanfovy: float
    bg: torch.Tensor
    scale_modifier: float
    viewmatrix: torch.Tensor
    projmatrix: torch.Tensor
    sh_degree: int
    campos: torch.Tensor
    prefiltered: bool
    debug: bool = False


def cuda_available():
    """True when the compiled CUDA kernels can be used."""
    return _cuda is not None and _cuda.available()


def eval_sh(degree, shs, means3D, campos):
    """shs [N, K, 3] spherical-harmonic coefficients -> colours [N, 3], as 3DGS: + 0.5, clamped at 0."""
    d = means3D - campos.reshape(1, 3)
    d = d / d.norm(dim=1, keepdim=True)
    x, y, z = d[:, 0:1], d[:, 1:2], d[:, 2:3]
    result = SH_C0 * shs[:, 0]
    if degree > 0:
        result = result - SH_C1 * y * shs[:, 1] + SH_C1 * z * shs[:, 2] - SH_C1 * x * shs[:, 3]
    if degree > 1:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        result = (
            result
            + SH_C2[0] * xy * shs[:, 4]
            + SH_C2[1] * yz * shs[:, 5]
            + SH_C2[2] * (2 * zz - xx - yy) * shs[:, 6]
            + SH_C2[3] * xz * shs[:, 7]
            + SH_C2[4] * (xx - yy) * shs[:, 8]
        )
    if degree > 2:
        result = (
            result
            + SH_C3[0] * y * (3 * xx - yy) * shs[:, 9]
            + SH_C3[1] * xy * z * shs[:, 10]
            + SH_C3[2] * y * (4 * zz - xx - yy) * shs[:, 11]
            + SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * shs[:, 12]
            + SH_C3[4] * x * (4 * zz - xx - yy) * shs[:, 13]
            + SH_C3[5] * z * (xx - yy) * shs[:, 14]
            + SH_C3[6] * x * (xx - 3 * yy) * shs[:, 15]
        )
    return torch.clamp(result + 0.5, min=0.0)


def _check(name, tensor, n, width):
    if tensor is None:
        return
    if tensor.dim() != 2 or tensor.shape[0] != n or (width is not None and tensor.shape[1] != width):
        want = f"[{n}, {width if width is not None else 'C'}]"
        raise ValueError(f"{name} has shape {list(tensor.shape)}, expected {want}")


def rasterize_gaussians(
    settings, means3D, means2D, opacities, shs, colors_precomp, features, scales, rotations, cov3D_precomp
):
    """Validate the inputs, turn SH into colours, and call the CUDA or PyTorch rasterizer."""
    n = means3D.shape[0] if means3D.dim() == 2 else -1
    _check("means3D", means3D, n, 3)
    _check("means2D", means2D, n, 3)
    _check("opacities", opacities, n, 1)
    if (shs is None) == (colors_precomp is None):
        raise ValueError("give exactly one of shs and colors_precomp")
    if ((scales is None) or (rotations is None)) == (cov3D_precomp is None):
        raise ValueError("give either scales and rotations, or cov3D_precomp")
    _check("colors_precomp", colors_precomp, n, 3)
    _check("scales", scales, n, 3)
    _check("rotations", rotations, n, 4)
    _check("cov3D_precomp", cov3D_precomp, n, 6)
    _check("legs_features", features, n, None)
    for name in ("viewmatrix", "projmatrix"):  # 4x4, with any leading dimensions of size 1
        matrix = getattr(settings, name)
        if matrix.dim() < 2 or matrix.shape[-2:] != (4, 4) or matrix.numel() != 16:
            raise ValueError(f"settings.{name} has shape {list(matrix.shape)}, expected [4, 4] (or [1, 4, 4])")
    if features is not None and not 1 <= features.shape[1] <= 512:
        raise ValueError(f"legs_features has {features.shape[1]} channels; 1 to 512 are supported")
    colors = colors_precomp
    if colors is None:
        if shs.dim() != 3 or shs.shape[0] != n or shs.shape[2] != 3:
            raise ValueError(f"shs has shape {list(shs.shape)}, expected [{n}, K, 3]")
        colors = eval_sh(settings.sh_degree, shs, means3D, settings.campos)
    args = (
        means3D,
        means2D,
        opacities,
        colors,
        features,
        scales,
        rotations,
        cov3D_precomp,
        settings.bg,
        float(settings.scale_modifier),
        settings.viewmatrix,
        settings.projmatrix,
        float(settings.tanfovx),
        float(settings.tanfovy),
        int(settings.image_height),
        int(settings.image_width),
    )
    if means3D.is_cuda and cuda_available() and _cuda.supports(args):
        return _cuda.rasterize(*args)
    return _torch_impl.rasterize(*args)
