"""A small scene through every CUDA rasterizer kernel, forward and backward (full geometry with
features, and frozen geometry), for compute-sanitizer:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python benchmarks/rasterizer_memcheck.py

(without the caching allocator every tensor is its own allocation, so an access past one is seen).
"""

import argparse

import torch

from diff_gaussian_rasterization import _cuda


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gaussians", type=int, default=2000, help="number of Gaussians")
    parser.add_argument("--width", type=int, default=83, help="image width (not a multiple of 16)")
    parser.add_argument("--height", type=int, default=45, help="image height")
    parser.add_argument("--channels", type=int, default=37, help="feature channels")
    args = parser.parse_args()
    if not _cuda.available():
        raise SystemExit("the CUDA extension is not built or no GPU is visible")
    torch.manual_seed(0)
    n, w, h = args.gaussians, args.width, args.height
    tan = 0.6
    depth = 1.0 + 4.0 * torch.rand(n)
    depth[: n // 10] -= 1.2  # some behind the near plane
    xy = (torch.rand(n, 2) * 2.6 - 1.3) * tan
    means = torch.cat([xy * depth[:, None], depth[:, None]], 1)
    view = torch.eye(4)  # camera at the origin looking down +z
    near, far = 0.01, 100.0
    proj = torch.tensor(
        [
            [1 / tan, 0, 0, 0],
            [0, w / (h * tan), 0, 0],
            [0, 0, far / (far - near), -far * near / (far - near)],
            [0, 0, 1, 0],
        ]
    ).T
    dev = "cuda"
    leaves = {
        "means3D": means,
        "means2D": torch.zeros(n, 3),
        "opacities": torch.rand(n, 1),
        "colors": torch.rand(n, 3),
        "features": torch.randn(n, args.channels),
        "scales": 0.03 * torch.exp(torch.randn(n, 3) * 0.5),
        "rotations": torch.randn(n, 4),
    }
    leaves = {k: v.to(dev).requires_grad_(True) for k, v in leaves.items()}
    bg = torch.rand(3, device=dev)
    camera = (bg, 1.0, view.to(dev), (view @ proj).to(dev), tan, tan * h / w, h, w)
    for frozen in (False, True):
        p = {k: (v.detach() if frozen and k != "features" else v) for k, v in leaves.items()}
        color, radii, out_depth, feat = _cuda.rasterize(
            p["means3D"],
            p["means2D"],
            p["opacities"],
            p["colors"],
            p["features"],
            p["scales"],
            p["rotations"],
            None,
            *camera,
        )
        loss = (color * torch.randn_like(color)).sum() + (feat * torch.randn_like(feat)).sum()
        if not frozen:
            loss = loss + out_depth.sum()
        loss.backward()
        torch.cuda.synchronize()
        print(
            f"frozen={frozen}: {(radii > 0).sum().item()} of {n} Gaussians visible, "
            f"feature grad norm {leaves['features'].grad.norm().item():.3f}"
        )
    print("memcheck scene done")


if __name__ == "__main__":
    main()
