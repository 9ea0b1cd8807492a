"""Differentiable Gaussian rasterizer: colour + depth + N-channel features (MIT).

API of the original 4-LEGS feature rasterizer: ``GaussianRasterizer(settings)(means3D, means2D,
opacities, shs=None, colors_precomp=None, legs_features=None, scales=None, rotations=None,
cov3D_precomp=None)`` returns ``(color [3, H, W], radii [N] int32, depth [1, H, W],
features [C, H, W])``; C (1 to 512) is whatever ``legs_features [N, C]`` has. When no geometry
input requires a gradient (4-LEGS training on frozen geometry) only feature gradients are computed.
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
        legs_features=None,
        scales=None,
        rotations=None,
        cov3D_precomp=None,
    ):
        if legs_features is None:
            raise ValueError("legs_features [N, C] is required by the feature rasterizer")
        return rasterize_gaussians(
            self.raster_settings,
            means3D,
            means2D,
            opacities,
            shs,
            colors_precomp,
            legs_features,
            scales,
            rotations,
            cov3D_precomp,
        )
