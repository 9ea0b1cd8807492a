"""An initial point cloud for Dynamic 3D Gaussians when a sequence ships none (init_pt_cld.npz).

Foreground: the visual hull carved from the train cameras' foreground masks at one timestep, on
a voxel grid refined level by level (coarse voxels are tested against the masks' distance
transforms, so no thin part is carved away early); its surface voxels become points, coloured by
the cameras that see them (a z-buffer of the hull decides who sees what).
Background: points on a sphere around the cameras, cut by the floor plane y = 0; of a few
concentric candidates, all beyond every camera (1.05 .. 3 times the farthest camera's distance,
and a far field for a sky at infinity), the most photo-consistent one on the textured background
pixels is taken (multi-view photo-consistency of the cameras' images), with the far field behind
it. No background point starts between a camera and the scene.

Result: float32 [N, 7] = xyz (world), rgb in [0, 1], seg (1 foreground, 0 background): the layout
of the original's init_pt_cld.npz (key 'data').

    python point_cloud.py -s data/synthetic     # writes data/synthetic/init_pt_cld.npz
"""

import argparse
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import helpers

# Background candidates: spheres of these multiples of the farthest camera's distance from the
# cameras' centre (all beyond every camera), and the far field at FAR_FIELD times that distance,
# at most FAR_FIELD_MAX (inside the cameras' far plane).
BEYOND_CAMERAS = (1.05, 1.25, 1.5, 2.0, 3.0)
FAR_FIELD, FAR_FIELD_MAX = 10.0, 50.0
FAR_FIELD_SHARE = 4  # behind a nearer sphere, one ray in this many gets a far-field point too


def load_views(seq_dir, meta, t):
    """Train views of timestep t: dict with ims [C, 3, H, W], fg [C, H, W] bool, K [C, 3, 3],
    w2c [C, 4, 4] (float32 tensors), centers [C, 3] (camera positions, world)."""
    size = (meta["w"], meta["h"])
    ims, fg = [], []
    for fn in meta["fn"][t]:
        ims.append(helpers.load_image(os.path.join(seq_dir, "ims", fn), size))
        fg.append(helpers.load_mask(helpers.seg_path(seq_dir, fn), size) > 0.5)
    w2c = torch.tensor(np.asarray(meta["w2c"][t]), dtype=torch.float32)
    return {
        "ims": torch.stack(ims),
        "fg": torch.stack(fg),
        "w2c": w2c,
        "K": torch.tensor(np.asarray(meta["k"][t]), dtype=torch.float32),
        "centers": torch.inverse(w2c)[:, :3, 3],
    }


def project(points, views):
    """points [P, 3] world -> pixel coordinates uv [C, P, 2] and view depth z [C, P]."""
    cam = points[None] @ views["w2c"][:, :3, :3].transpose(1, 2) + views["w2c"][:, None, :3, 3]
    z = cam[..., 2]
    pix = cam @ views["K"].transpose(1, 2)
    return pix[..., :2] / z.clamp(min=1e-6)[..., None], z


def pixel_index(uv, z, h, w):
    """Integer pixel of uv [C, P, 2] and whether it lies in the image in front of the camera."""
    col, row = uv[..., 0].round().long(), uv[..., 1].round().long()
    inside = (z > 1e-3) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    return row.clamp(0, h - 1) * w + col.clamp(0, w - 1), inside


def scene_center(views):
    """The point closest (least squares) to all optical axes: where the cameras look."""
    axes = F.normalize(torch.inverse(views["w2c"])[:, :3, 2], dim=1).double()
    proj = torch.eye(3, dtype=torch.float64) - axes[:, :, None] * axes[:, None, :]
    return torch.linalg.solve(proj.sum(0), (proj @ views["centers"].double()[:, :, None]).sum(0))[:, 0].float()


def carve_visual_hull(views, center, half_size, voxel_size, base_res=32, chunk=200_000):
    """Voxels inside every foreground mask that sees them, refined level by level.

    A voxel survives a level when, in all cameras that see its centre but at most C // 20 (mask
    errors), the nearest foreground pixel is within the voxel's projected radius + 1 px, and it is
    seen by at least max(3, C // 4) cameras. Returns integer coordinates [V, 3] at the finest level
    and that level's voxel size; voxel (i, j, k) has its centre at origin + (ijk + 0.5) * size.
    """
    from scipy.ndimage import distance_transform_edt

    num_cams, h, w = views["fg"].shape
    dist_to_fg = torch.stack(
        [torch.from_numpy(distance_transform_edt(~m.numpy()).astype(np.float32)) for m in views["fg"]]
    ).reshape(num_cams, -1)
    focal = views["K"][:, 0, 0][:, None]
    tolerance, min_views = num_cams // 20, max(3, num_cams // 4)
    origin = center - half_size
    levels = max(0, math.ceil(math.log2(2 * half_size / (base_res * voxel_size))))
    grid = torch.arange(base_res)
    ijk = torch.stack(torch.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    for level in range(levels + 1):
        size = 2 * half_size / (base_res * 2**level)
        keep = []
        for part in ijk.split(chunk):
            uv, z = project(origin + (part.float() + 0.5) * size, views)
            pix, seen = pixel_index(uv, z, h, w)
            radius_px = focal * (0.5 * math.sqrt(3) * size) / z.clamp(min=1e-3) + 1.0
            misses = (seen & (torch.gather(dist_to_fg, 1, pix) > radius_px)).sum(0)
            keep.append(part[(misses <= tolerance) & (seen.sum(0) >= min_views)])
        ijk = torch.cat(keep)
        if level < levels:  # each kept voxel -> its 8 children
            corners = torch.stack(torch.meshgrid(*[torch.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3)
            ijk = (2 * ijk[:, None] + corners[None]).reshape(-1, 3)
    return ijk, origin, size


def surface_voxels(ijk):
    """The voxels of ijk [V, 3] (int) with at least one empty face neighbour."""
    span = int(ijk.max()) + 3

    def key(v):  # one integer per voxel, with a free layer around the grid for the neighbours
        return ((v[:, 0] + 1) * span + v[:, 1] + 1) * span + v[:, 2] + 1

    occupied = torch.sort(key(ijk)).values
    on_surface = torch.zeros(len(ijk), dtype=torch.bool)
    for step in torch.cat([torch.eye(3, dtype=torch.long), -torch.eye(3, dtype=torch.long)]):
        k = key(ijk + step)
        pos = torch.searchsorted(occupied, k).clamp(max=len(occupied) - 1)
        on_surface |= occupied[pos] != k
    return ijk[on_surface]


def visible_colors(points, surface, views, depth_tolerance):
    """Colour of points [P, 3] on a surface from the cameras that see them: a camera sees a point
    when it lies within depth_tolerance of the nearest surface point [S, 3] on its pixel (a
    z-buffer of the dense surface); points that no camera sees take the median over the cameras
    they project into. Returns rgb [P, 3]."""
    num_cams, _, h, w = views["ims"].shape
    zbuf = torch.full((num_cams, h * w), float("inf"))
    for part in surface.split(100_000):
        uv, z = project(part, views)
        pix, inside = pixel_index(uv, z, h, w)
        zbuf.scatter_reduce_(1, pix, torch.where(inside, z, torch.inf), "amin")
    uv, z = project(points, views)
    pix, inside = pixel_index(uv, z, h, w)
    visible = inside & (z <= torch.gather(zbuf, 1, pix) + depth_tolerance)
    colors = torch.gather(views["ims"].reshape(num_cams, 3, -1), 2, pix[:, None].expand(-1, 3, -1))  # [C, 3, P]
    weight = visible.float()[:, None]
    mean = (colors * weight).sum(0) / weight.sum(0).clamp(min=1)
    fallback = torch.where(inside[:, None], colors, torch.nan).nanmedian(0).values.nan_to_num(0.5)
    return torch.where(visible.any(0)[None], mean, fallback).T.contiguous()


def photo_consistency(points, views, small_ims, bg_ok, min_views):
    """Colour agreement of the cameras' background pixels at points [P, 3]: returns cost [P]
    (mean squared deviation from the mean colour; inf where fewer than min_views cameras see the
    point on background) and that mean colour [P, 3]."""
    num_cams, _, h, w = small_ims.shape
    scale = torch.tensor([w / views["ims"].shape[3], h / views["ims"].shape[2]])
    uv, z = project(points, views)
    pix, inside = pixel_index(uv * scale + 0.5 * (scale - 1), z, h, w)
    valid = inside & torch.gather(bg_ok.reshape(num_cams, -1), 1, pix)
    colors = torch.gather(small_ims.reshape(num_cams, 3, -1), 2, pix[:, None].expand(-1, 3, -1))  # [C, 3, P]
    weight = valid.float()[:, None]
    count = weight.sum(0)
    mean = (colors * weight).sum(0) / count.clamp(min=1)
    cost = (((colors - mean[None]) ** 2).sum(1, keepdim=True) * weight).sum(0)[0] / count[0].clamp(min=1)
    return torch.where(count[0] >= min_views, cost, torch.inf), mean.T


def camera_shell(centers):
    """Centre [3] and radius of the sphere the cameras sit on: least squares through the camera
    centres when they span 3D and fit it within 5% (a capture dome, its walls holding the
    cameras), else the cameras' mean and largest distance from it."""
    centers = centers.double()
    mean = centers.mean(0)
    spread = torch.linalg.svdvals(centers - mean)
    if len(centers) >= 4 and spread[-1] > 0.1 * spread[0]:
        design = torch.cat([2 * centers, torch.ones(len(centers), 1, dtype=torch.float64)], 1)
        x = torch.linalg.lstsq(design, (centers**2).sum(1, keepdim=True)).solution[:, 0]
        center, radius = x[:3], float(torch.sqrt(x[3] + x[:3] @ x[:3]))
        if float(((centers - center).norm(dim=1) - radius).abs().max()) < 0.05 * radius:
            return center.float(), radius
    return mean.float(), float((centers - mean).norm(dim=1).max())


def ray_origin(centers):
    """Where the background rays start, for cameras at centers [C, 3]: the centre of camera_shell,
    at least half the cameras' mean height above the floor y = 0 when they are all above it (a
    dome's fitted centre lies on the floor, where every floor point would collapse onto it).
    Returns (origin [3], the largest distance of a camera from it, whether there is a floor)."""
    center, _ = camera_shell(centers)
    has_floor = bool((centers[:, 1] < 0).all())  # the PanopticSports floor: y = 0, below the cameras (+y down)
    if has_floor:
        center[1] = min(float(center[1]), 0.5 * float(centers[:, 1].mean()))
    return center, float((centers - center).norm(dim=1).max()), has_floor


def background_points(
    views, num_rays, multipliers=BEYOND_CAMERAS, far_field=FAR_FIELD, far_max=FAR_FIELD_MAX, chunk=8192
):
    """Points on the background: a sphere around the cameras, beyond every one of them, cut by the
    floor plane y = 0, and a far field for what lies at infinity (a sky).

    Rays from ray_origin. The candidates are spheres of `multipliers` times the
    distance of the farthest camera from that centre and the far field's sphere (`far_field` times
    it, at most `far_max`), each cut by the floor: none lies between a camera and the scene, where
    a background point would cover the scene from every view off the cameras' own surface. The
    sphere chosen is the one that most textured rays (the 20% whose photo-consistency varies most
    over the candidates) find (nearly) most photo-consistent, after equalising the cameras'
    exposures; with no texture at all, the far field. Textureless walls cannot tell depths apart;
    a single sphere chosen by the textured ones keeps them on a plausible surface instead of
    scattering them through the room. Returns xyz [M, 3], rgb [M, 3] (mean over the cameras that
    see the point on background; points no camera sees are dropped, except on the far field) and
    the chosen sphere's radius.
    """
    num_cams, _, h, w = views["ims"].shape
    center, reach, has_floor = ray_origin(views["centers"])
    far_radius = min(far_field * reach, far_max)
    radii = [m * reach for m in multipliers if m * reach < far_radius] + [far_radius]
    factor = max(1, round(max(h, w) / 320))  # compare low-pass colours at ~320 px: robust to small errors
    small_ims = F.avg_pool2d(views["ims"], factor, ceil_mode=True)
    bg_ok = F.max_pool2d(F.max_pool2d(views["fg"].float()[:, None], factor, ceil_mode=True), 5, 1, 2)[:, 0] < 0.5
    exposure = torch.stack([im[:, ok].mean(1) if ok.any() else im.mean((1, 2)) for im, ok in zip(small_ims, bg_ok)])
    small_ims = small_ims / exposure[:, :, None, None].clamp(min=1e-3) * exposure.mean(0)[:, None, None]
    min_views = max(2, num_cams // 6)
    golden = math.pi * (3.0 - math.sqrt(5.0))  # Fibonacci sphere: evenly spread directions
    i = torch.arange(num_rays, dtype=torch.float32)
    y = 1 - 2 * (i + 0.5) / num_rays
    dirs = torch.stack([torch.cos(golden * i) * (1 - y * y).sqrt(), y, torch.sin(golden * i) * (1 - y * y).sqrt()], 1)
    floor = torch.full((num_rays,), torch.inf)
    if has_floor:  # +y is down
        floor = torch.where(dirs[:, 1] > 1e-6, -center[1] / dirs[:, 1].clamp(min=1e-6), torch.inf)
    depths = torch.minimum(torch.tensor(radii)[None], floor[:, None])  # [rays, candidates]
    parts = torch.arange(num_rays).split(chunk)
    cost = torch.stack(
        [
            torch.cat(
                [
                    photo_consistency(center + depths[part, k, None] * dirs[part], views, small_ims, bg_ok, min_views)[
                        0
                    ]
                    for part in parts
                ]
            )
            for k in range(len(radii))
        ],
        1,
    )
    seen = torch.isfinite(cost).all(1)
    choice = len(radii) - 1  # the far field, when nothing tells the candidates apart: parallax needs texture
    if seen.sum() >= 10:
        cost = cost[seen]
        spread = cost.max(1).values - cost.min(1).values
        textured = spread >= spread.quantile(0.8)
        if bool((spread[textured] > 0).any()):
            # each textured ray backs every candidate within 5% of its spread of its best one: a ray
            # that meets the floor before several spheres backs them all alike, not the first
            best = cost[textured] <= cost[textured].min(1, keepdim=True).values + 0.05 * spread[textured, None]
            backing = best.sum(0)
            choice = int(torch.nonzero(backing == backing.max())[-1, 0])  # ties: the farthest
    far_chosen = choice == len(radii) - 1
    # Per ray: the nearer of the chosen sphere and the floor, and behind a nearer sphere (a wall),
    # for one ray in FAR_FIELD_SHARE, a far-field point for what lies beyond it (a sky above the
    # wall: training makes the wrong one transparent; far Gaussians are large, so few do).
    behind = (floor > far_radius) & (torch.arange(num_rays) % FAR_FIELD_SHARE == 0) & (not far_chosen)
    points = torch.cat([center + depths[:, choice, None] * dirs, center + far_radius * dirs[behind]])
    far = torch.cat([(floor > far_radius) & far_chosen, torch.ones(int(behind.sum()), dtype=torch.bool)])
    bg_full = F.max_pool2d(views["fg"].float()[:, None], 5, 1, 2)[:, 0] < 0.5
    visible, rgb = zip(*[photo_consistency(part, views, views["ims"], bg_full, 1) for part in points.split(chunk)])
    visible, rgb = torch.isfinite(torch.cat(visible)), torch.cat(rgb)
    # The far field covers every direction: where no camera saw it (above the cameras' views, say)
    # it takes the colour of the nearest direction one did, so that a view off the rig sees a
    # plausible sky instead of the empty background.
    unseen, seen_far = torch.nonzero(far & ~visible)[:, 0], torch.nonzero(far & visible)[:, 0]
    if len(unseen) and len(seen_far):
        sample = seen_far[torch.randperm(len(seen_far), generator=torch.Generator().manual_seed(0))[:4096]]
        ray_dirs = F.normalize(points - center, dim=1)
        nearest = torch.cat([(ray_dirs[part] @ ray_dirs[sample].T).argmax(1) for part in unseen.split(chunk)])
        rgb[unseen] = rgb[sample[nearest]]
        visible[unseen] = True
    return points[visible], rgb[visible], radii[choice]


def build_init_point_cloud(seq_dir, meta, t=0, num_fg=100_000, num_bg=60_000, seed=0, log=print):
    """init_pt_cld [N, 7] float32 (xyz, rgb, seg) from the masks and images of timestep t."""
    generator = torch.Generator().manual_seed(seed)
    views = load_views(seq_dir, meta, t)
    if not views["fg"].any():
        raise helpers.UserError(
            f"{seq_dir}/seg: the masks of timestep {t} show no foreground; the visual "
            f"hull needs foreground masks (white = foreground), or give init_pt_cld.npz"
        )
    center = scene_center(views)
    radius = 1.1 * float((views["centers"] - views["centers"].mean(0)).norm(dim=1).max())
    # finest voxel: about as many surface voxels as points wanted, on a hull of a few m^2
    ijk, origin, size = carve_visual_hull(views, center, radius, voxel_size=radius / 250)
    if len(ijk) == 0:
        raise helpers.UserError(
            f"{seq_dir}: no voxel lies inside the foreground masks of all cameras at "
            f"timestep {t}; check seg/ and the cameras, or give init_pt_cld.npz"
        )
    surface = surface_voxels(ijk)
    jitter = torch.rand(len(surface), 3, generator=generator) - 0.5
    fg = origin + (surface.float() + 0.5 + jitter) * size
    if len(fg) > num_fg:
        fg = fg[torch.randperm(len(fg), generator=generator)[:num_fg]]
    fg_rgb = visible_colors(fg, origin + (surface.float() + 0.5) * size, views, depth_tolerance=3 * size)
    bg, bg_rgb, shell = background_points(views, num_bg)
    log(
        f"point cloud: visual hull of {len(ijk)} voxels ({size:.3g} world units each) -> {len(fg)} "
        f"foreground points; {len(bg)} background points on a sphere of radius {shell:.3g} around the "
        f"cameras (beyond every camera), the far field beyond it and the floor y = 0"
    )
    seg = torch.cat([torch.ones(len(fg)), torch.zeros(len(bg))])[:, None]
    return torch.cat([torch.cat([fg, bg]), torch.cat([fg_rgb, bg_rgb]).clamp(0, 1), seg], 1).numpy().astype(np.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Build init_pt_cld.npz for a PanopticSports-format sequence that has none: visual "
        "hull of the foreground masks + photo-consistent background points.",
        formatter_class=helpers.HelpFormatter,
    )
    helpers.add_sequence_option(parser)
    parser.add_argument("-t", "--timestep", type=int, default=0, help="timestep whose masks are carved")
    parser.add_argument("--fg-points", type=int, default=100_000, help="at most this many foreground points")
    parser.add_argument("--bg-points", type=int, default=60_000, help="background rays (at most one point each)")
    parser.add_argument(
        "-o", "--out", help="output .npz under data/, output/ or results/ (default: <seq>/init_pt_cld.npz)"
    )
    args = parser.parse_args(argv)
    args.seq = helpers.find_sequence(args.seq)
    out = args.out or os.path.join(args.seq, "init_pt_cld.npz")
    helpers.check_output(
        "-o" if args.out else "-o (default <seq>/init_pt_cld.npz)",
        out,
        f"-o {helpers.DATA_DIR}/{os.path.basename(os.path.abspath(args.seq))}/init_pt_cld.npz",
    )
    meta = helpers.load_meta(args.seq, "train")
    if not 0 <= args.timestep < len(meta["fn"]):
        raise helpers.UserError(f"--timestep {args.timestep}: {meta['path']} has timesteps 0..{len(meta['fn']) - 1}")
    data = build_init_point_cloud(args.seq, meta, args.timestep, args.fg_points, args.bg_points)
    helpers.save_npz(out, {"data": data})
    print(f"wrote {len(data)} points ({int(data[:, 6].sum())} foreground) to {out}")


if __name__ == "__main__":
    helpers.run_main(main)
