"""Differentiable Gaussian rasterizer: colour + depth (MIT).

API of the original diff_gaussian_rasterization (w-depth variant): ``GaussianRasterizer(settings)(
means3D, means2D, opacities, shs=None, colors_precomp=None, scales=None, rotations=None,
cov3D_precomp=None)`` returns ``(color [3, H, W], radii [N] int32, depth [1, H, W])`` where depth
is the alpha-composited view-space z (differentiable).
"""

import torch.nn as nn

from ._api import GaussianRasterizationSettings, cuda_available, eval_sh, rasterize_gaussians

__all__ = ["GaussianRasterizationSettings", "GaussianRasterizer", "cuda_available", "eval_sh"]


class GaussianRasterizer(nn.Module):
    def __init__(self, raster_settings):
        super().__init__()
        self.raster_settings = raster_settings

    def forward(
        self,
        means3D,
        means2D,
        opacities,
        shs=None,
        colors_precomp=None,
        scales=None,
        rotations=None,
        cov3D_precomp=None,
    ):
        color, radii, depth, _ = rasterize_gaussians(
            self.raster_settings,
            means3D,
            means2D,
            opacities,
            shs,
            colors_precomp,
            None,
            scales,
            rotations,
            cov3D_precomp,
        )
        return color, radii, depth
