"""Image-quality functions shared by training and evaluation: SSIM (Wang et al. 2004) with the
11x11 Gaussian window (sigma 1.5) used by 3D Gaussian Splatting and Dynamic 3D Gaussians."""
import torch
import torch.nn.functional as F

_WINDOWS = {}


def _window(channels, device, dtype, size=11, sigma=1.5):
    key = (channels, device, dtype)
    if key not in _WINDOWS:
        x = torch.arange(size, dtype=torch.float64) - size // 2
        g = torch.exp(-x ** 2 / (2 * sigma ** 2))
        g = g / g.sum()
        _WINDOWS[key] = (g[:, None] @ g[None, :]).to(device, dtype).expand(channels, 1, size, size).contiguous()
    return _WINDOWS[key]


def calc_ssim(img1, img2):
    """Mean SSIM of two images [C, H, W] (or [B, C, H, W]) with values in [0, 1]."""
    if img1.dim() == 3:
        img1, img2 = img1[None], img2[None]
    channels = img1.shape[1]
    w = _window(channels, img1.device, img1.dtype)
    pad = w.shape[-1] // 2
    mu1 = F.conv2d(img1, w, padding=pad, groups=channels)
    mu2 = F.conv2d(img2, w, padding=pad, groups=channels)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = F.conv2d(img1 * img1, w, padding=pad, groups=channels) - mu1_sq
    sigma2_sq = F.conv2d(img2 * img2, w, padding=pad, groups=channels) - mu2_sq
    sigma12 = F.conv2d(img1 * img2, w, padding=pad, groups=channels) - mu12
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu12 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return ssim_map.mean()
