"""An initial point cloud for Dynamic 3D Gaussians when a sequence ships none (init_pt_cld.npz).

Foreground: the visual hull carved from the train cameras' foreground masks at one timestep, on
a voxel grid refined level by level (coarse voxels are tested against the masks' distance
transforms, so no thin part is carved away early); its surface voxels become points, coloured by
the cameras that see them (a z-buffer of the hull decides who sees what).
Background: points on a sphere around the cameras, cut by the floor plane y = 0; of a few
concentric candidates, all beyond every camera (1.05 .. 3 times the farthest camera's distance,
and a far field for a sky at infinity), the most photo-consistent one on the textured background
pixels is taken (multi-view photo-consistency of the cameras' images); a ray that meets the floor
beyond that sphere takes its floor point where the cameras agree better there. The far field
itself gets no points: stage 1's environment map holds what lies at infinity. Inside the rig,
background points only where the train cameras' rays find a surface that the masks call background
(an object at rest, which a background subtraction cannot see): a sweep of depths along each ray,
where the other cameras agree at one depth and disagree with the background's candidates
(interior_points). No background point starts between a camera and the scene.

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
# Inside the rig (interior_points): camera rays tried, over all train cameras, depths tried along
# each, and the squared colour distance (sum over RGB in [0, 1]) within which the other cameras
# agree and by which the background's candidates and most depths must do worse.
INTERIOR_RAYS = 65_536
INTERIOR_DEPTHS = 96
INTERIOR_MARGIN = 0.01


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


def background_colours(points, views, ims, bg_ok):
    """What each camera sees at points [P, 3] in images ims [C, D, h, w] (any size: the cameras'
    intrinsics are scaled to it; D channels) -> valid [C, P] (in front of the camera, in the
    image, on background: bg_ok [C, h, w]) and values [C, D, P]."""
    num_cams, channels, h, w = ims.shape
    scale = torch.tensor([w / views["ims"].shape[3], h / views["ims"].shape[2]])
    uv, z = project(points, views)
    pix, inside = pixel_index(uv * scale + 0.5 * (scale - 1), z, h, w)
    valid = inside & torch.gather(bg_ok.reshape(num_cams, -1), 1, pix)
    return valid, torch.gather(ims.reshape(num_cams, channels, -1), 2, pix[:, None].expand(-1, channels, -1))


def photo_consistency(points, views, small_ims, bg_ok, min_views):
    """Colour agreement of the cameras' background pixels at points [P, 3]: returns cost [P]
    (mean squared deviation from the mean colour; inf where fewer than min_views cameras see the
    point on background) and that mean colour [P, 3]."""
    valid, colors = background_colours(points, views, small_ims, bg_ok)
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


def beyond_radii(reach, multipliers=BEYOND_CAMERAS, far_field=FAR_FIELD, far_max=FAR_FIELD_MAX):
    """The background's candidate spheres for cameras at most `reach` from where the rays start:
    radii (ascending, all beyond every camera), the last one the far field's."""
    far_radius = min(far_field * reach, far_max)
    return [m * reach for m in multipliers if m * reach < far_radius] + [far_radius]


def consistency_images(views):
    """The images photo-consistency compares: low-pass (~320 px: robust to small errors), each
    camera's exposure equalised to the mean on the background -> small_ims [C, 3, h, w] and bg_ok
    [C, h, w] bool (background, at least 2 small pixels from the foreground)."""
    h, w = views["ims"].shape[2:]
    factor = max(1, round(max(h, w) / 320))
    small_ims = F.avg_pool2d(views["ims"], factor, ceil_mode=True)
    bg_ok = F.max_pool2d(F.max_pool2d(views["fg"].float()[:, None], factor, ceil_mode=True), 5, 1, 2)[:, 0] < 0.5
    exposure = torch.stack([im[:, ok].mean(1) if ok.any() else im.mean((1, 2)) for im, ok in zip(small_ims, bg_ok)])
    return small_ims / exposure[:, :, None, None].clamp(min=1e-3) * exposure.mean(0)[:, None, None], bg_ok


def floor_distance(origins, dirs, has_floor):
    """Distance [R] along unit dirs [R, 3] from origins [R, 3] (above the floor) to the floor y = 0
    (+y is down); inf for rays that never meet it or without a floor."""
    if not has_floor:
        return torch.full((len(dirs),), torch.inf)
    return torch.where(dirs[:, 1] > 1e-6, -origins[:, 1] / dirs[:, 1].clamp(min=1e-6), torch.inf)


def sphere_crossings(origins, dirs, center, radius):
    """Distances (in, out) [R] along unit dirs [R, 3] from origins [R, 3] to where the rays enter
    and leave the sphere of `radius` around center [3] (in < 0 from inside it); nan where they
    miss it."""
    offset = origins - center
    b = (offset * dirs).sum(1)
    root = (b * b - (offset * offset).sum(1) + radius**2).sqrt()
    return -b - root, -b + root


def sphere_directions(num_rays):
    """num_rays unit directions [num_rays, 3], evenly spread over the sphere (a Fibonacci sphere)."""
    golden = math.pi * (3.0 - math.sqrt(5.0))
    i = torch.arange(num_rays, dtype=torch.float32)
    y = 1 - 2 * (i + 0.5) / num_rays
    return torch.stack([torch.cos(golden * i) * (1 - y * y).sqrt(), y, torch.sin(golden * i) * (1 - y * y).sqrt()], 1)


def background_pixels(views):
    """[C, H, W] bool: the pixels of the views' images at least 2 pixels from the foreground."""
    return F.max_pool2d(views["fg"].float()[:, None], 5, 1, 2)[:, 0] < 0.5


def background_points(
    views, num_rays, multipliers=BEYOND_CAMERAS, far_field=FAR_FIELD, far_max=FAR_FIELD_MAX, chunk=8192
):
    """Points on the background: a sphere around the cameras, beyond every one of them, cut by the
    floor plane y = 0; none on the far field, what lies at infinity (a sky), which stage 1's
    environment map holds (train_d3dgs.initial_env_map).

    Rays from ray_origin. The candidates are spheres of `multipliers` times the
    distance of the farthest camera from that centre and the far field's sphere (`far_field` times
    it, at most `far_max`), each cut by the floor: none lies between a camera and the scene, where
    a background point would cover the scene from every view off the cameras' own surface. The
    sphere chosen is the one that most textured rays (the 20% whose photo-consistency varies most
    over the candidates) find (nearly) most photo-consistent, after equalising the cameras'
    exposures; with no texture at all, the far field. Textureless walls cannot tell depths apart;
    a single sphere chosen by the textured ones keeps them on a plausible surface instead of
    scattering them through the room. A ray that meets the floor beyond the chosen sphere takes
    its floor point where the cameras agree better there. Returns xyz [M, 3], rgb [M, 3] (mean
    over the cameras that see the point on background; points no camera sees are dropped) and the
    chosen sphere's radius (None for the far field: the points are the floor's).
    """
    num_cams = len(views["ims"])
    center, reach, has_floor = ray_origin(views["centers"])
    radii = beyond_radii(reach, multipliers, far_field, far_max)
    far_radius = radii[-1]
    small_ims, bg_ok = consistency_images(views)
    min_views = max(2, num_cams // 6)
    dirs = sphere_directions(num_rays)
    floor = floor_distance(center.expand(num_rays, 3), dirs, has_floor)
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
        seen_cost = cost[seen]
        spread = seen_cost.max(1).values - seen_cost.min(1).values
        textured = spread >= spread.quantile(0.8)
        if bool((spread[textured] > 0).any()):
            # each textured ray backs every candidate within 5% of its spread of its best one: a ray
            # that meets the floor before several spheres backs them all alike, not the first
            rows = seen_cost[textured]
            best = rows <= rows.min(1, keepdim=True).values + 0.05 * spread[textured, None]
            backing = best.sum(0)
            choice = int(torch.nonzero(backing == backing.max())[-1, 0])  # ties: the farthest
    # A ray that meets the floor beyond its point on the chosen sphere takes its floor point where
    # the cameras agree better there: a sphere inside a floor that reaches farther would leave
    # that floor's far part floating at camera height, above the horizon of a lower camera.
    ray_depth = depths[:, choice].clone()
    beyond = torch.nonzero(torch.isfinite(floor) & (floor > ray_depth) & (floor <= far_radius))[:, 0]
    if len(beyond):  # (the sphere point's cost is its candidate's, computed above)
        on_floor = torch.cat(
            [
                photo_consistency(center + floor[part, None] * dirs[part], views, small_ims, bg_ok, min_views)[0]
                for part in beyond.split(chunk)
            ]
        )
        better = beyond[torch.isfinite(on_floor) & ~(cost[beyond, choice] <= on_floor)]
        ray_depth[better] = floor[better]
    # The far field gets no points: what lies at infinity is stage 1's environment map, the same
    # from every position (train_d3dgs.initial_env_map), as is whatever lies beyond a nearer
    # sphere (a sky above a wall) or no camera sees on it.
    points = (center + ray_depth[:, None] * dirs)[ray_depth < far_radius]
    bg_full = background_pixels(views)
    visible, rgb = zip(*[photo_consistency(part, views, views["ims"], bg_full, 1) for part in points.split(chunk)])
    visible, rgb = torch.isfinite(torch.cat(visible)), torch.cat(rgb)
    return points[visible], rgb[visible], None if choice == len(radii) - 1 else radii[choice]


def camera_rays(views, num_rays):
    """Rays of the train cameras through the pixels of a grid, about num_rays in all: origins
    [R, 3] and unit directions [R, 3] (world), camera index [R], cell [R] (row-major index in the
    grid) and the grid (rows, columns, stride in pixels; cell (i, j) is pixel (i, j) * stride +
    stride // 2)."""
    num_cams, _, h, w = views["ims"].shape
    stride = max(1, math.ceil(math.sqrt(num_cams * h * w / num_rays)))
    rows = torch.arange(stride // 2, h, stride, dtype=torch.float32)
    cols = torch.arange(stride // 2, w, stride, dtype=torch.float32)
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    pix = torch.stack([grid_cols.flatten(), grid_rows.flatten(), torch.ones(grid_rows.numel())], 1)
    cam = pix[None] @ torch.inverse(views["K"]).transpose(1, 2)  # [C, P, 3] camera frame, z = 1
    dirs = F.normalize(cam @ views["w2c"][:, :3, :3], dim=-1)  # R^T d per row
    origins = views["centers"][:, None].expand(-1, len(pix), -1)
    return (
        origins.reshape(-1, 3),
        dirs.reshape(-1, 3),
        torch.arange(num_cams).repeat_interleave(len(pix)),
        torch.arange(len(pix)).repeat(num_cams),
        (len(rows), len(cols), stride),
    )


def supported(found, cam, cell, grid, num_cams):
    """found [R] (rays of camera cam [R], grid cell [R]: camera_rays) where at least 5 of the 9
    cells of its 3 x 3 neighbourhood (itself included) are found too: a surface covers a patch of
    pixels, chance agreements of colour scatter. -> [R] bool"""
    rows, cols, _ = grid
    image = torch.zeros(num_cams, 1, rows, cols)
    image.view(num_cams, -1)[cam[found], cell[found]] = 1.0
    count = F.avg_pool2d(image, 3, 1, 1, count_include_pad=True).reshape(num_cams, -1) * 9
    return found & (count[cam, cell] > 4.5)


def confirmed(points, found, cam, cell, views, grid, tolerance):
    """Whether another camera chose each point too: points [R, 3] chosen on the rays (cam [R],
    cell [R]: camera_rays) where found [R]; a point is confirmed when the ray of another camera
    through it (its grid cell) chose a point within `tolerance` of its view depth there. -> [R] bool"""
    num_cams = len(views["ims"])
    rows, cols, stride = grid
    uv, z = project(points, views)  # [C, R, 2], [C, R]
    depth_map = torch.full((num_cams, rows * cols), torch.inf)
    depth_map[cam[found], cell[found]] = z[cam[found], torch.nonzero(found)[:, 0]]
    col = ((uv[..., 0] - stride // 2) / stride).round().long()
    row = ((uv[..., 1] - stride // 2) / stride).round().long()
    on_grid = (z > 1e-3) & (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
    other = torch.gather(depth_map, 1, row.clamp(0, rows - 1) * cols + col.clamp(0, cols - 1))
    agree = on_grid & ((other - z).abs() <= tolerance)
    agree[cam, torch.arange(len(cam))] = False
    return found & agree.any(0)


def agreement(points, colour, own, views, small_ranges, bg_ok, k):
    """How well the other cameras agree with a camera's colour [P, 3] for points [P, 3] on its rays
    (camera index own [P]): the mean of the k smallest squared colour distances to the other
    cameras' background pixels at the points -> cost [P] (inf where fewer than k see them on
    background). The distance to a pixel is to the range of colours of its 3 x 3 neighbourhood
    (small_ranges [C, 6, h, w]: lowest, highest; Birchfield and Tomasi's measure), so that a
    projection off by a pixel on a fine texture (a floor at a grazing angle) still agrees. The
    k best, not all: a camera that sees something else in front of the point (an object nearer
    to it) must not count against it."""
    valid, ranges = background_colours(points, views, small_ranges, bg_ok)  # [C, 6, P]: low, high
    valid[own, torch.arange(len(points))] = False
    gap = (ranges[:, :3] - colour.T[None]).clamp(min=0) + (colour.T[None] - ranges[:, 3:]).clamp(min=0)
    error = torch.where(valid, (gap**2).sum(1), torch.inf)  # [C, P]
    return error.topk(min(k, len(error)), 0, largest=False).values.mean(0)


def interior_points(views, max_points, num_rays=INTERIOR_RAYS, depths=INTERIOR_DEPTHS, chunk=256):
    """Background points inside the rig: what the masks leave as background but stands between
    the cameras (an object at rest: a subtraction of the background estimated over time does not
    see it), found by a sweep of depths along the train cameras' rays. At most max_points of
    them, evenly over the rays that found one. Returns xyz [M, 3] and rgb [M, 3].

    Each background ray of a train camera (camera_rays) is tried at `depths` depths inside the
    sphere at 0.9 times the nearest camera's distance from ray_origin (above the floor), the cost
    of a depth being how badly the other cameras agree with the ray's colour there (agreement).
    A depth inside is taken, the best one, only where
    - the other cameras agree with it within INTERIOR_MARGIN;
    - the background's own explanation, the best of background_points' candidates along the ray
      (the spheres beyond every camera cut by the floor, and the far field uncut), is seen by
      enough cameras to be judged and is worse by INTERIOR_MARGIN: a sky at infinity or a
      textureless wall agrees as well at every depth and stays where background_points puts it
      (the bug of issue 13 was the reverse: the nearest of equals won);
    - three quarters of the ray's depths are worse by INTERIOR_MARGIN too: a surface agrees at one
      depth, while what lies at infinity and is seen by this camera alone (a horizon) agrees
      along a whole stretch of the ray;
    - at least 5 of the 9 rays around it (supported) found a depth too, and another camera's ray
      found the same point (confirmed): chance agreements of colour scatter and are found by one
      camera only.
    """
    num_cams = len(views["ims"])
    center, reach, has_floor = ray_origin(views["centers"])
    small_ims, bg_ok = consistency_images(views)
    small_ranges = torch.cat([-F.max_pool2d(-small_ims, 3, 1, 1), F.max_pool2d(small_ims, 3, 1, 1)], 1)
    k = max(2, num_cams // 4)  # cameras that must agree: a quarter, not only the nearest (short baselines)
    origins, dirs, cam, cell, grid = camera_rays(views, num_rays)
    own_ok, own_colours = background_colours(origins + dirs, views, small_ims, bg_ok)
    keep = torch.nonzero(own_ok[cam, torch.arange(len(cam))])[:, 0]
    origins, dirs, cam, cell, colour = origins[keep], dirs[keep], cam[keep], cell[keep], own_colours[cam[keep], :, keep]
    floor = floor_distance(origins, dirs, has_floor)

    def cost_at(rays, distance, ims):  # rays [R'] (index), distance [R', K] along them -> cost [R', K]
        cost = [torch.zeros(0, distance.shape[1])]
        for start in range(0, len(rays), chunk):
            part, along = rays[start : start + chunk], distance[start : start + chunk]
            points = origins[part, None] + along[..., None] * dirs[part, None]
            n = along.shape[1]
            own, own_colour = cam[part].repeat_interleave(n), colour[part].repeat_interleave(n, 0)
            cost.append(agreement(points.reshape(-1, 3), own_colour, own, views, ims, bg_ok, k).reshape(-1, n))
        return torch.cat(cost)

    beyond = [sphere_crossings(origins, dirs, center, r)[1] for r in beyond_radii(reach)]
    beyond = torch.stack([torch.minimum(b, floor) for b in beyond] + beyond[-1:], 1)  # a floor ends, a sky not
    background_cost = cost_at(torch.arange(len(cam)), beyond, small_ranges).min(1).values
    inner = 0.9 * float((views["centers"] - center).norm(dim=1).min())
    enter, leave = sphere_crossings(origins, dirs, center, inner)
    near, far = enter.clamp(min=0), torch.minimum(leave, floor)
    step = ((far - near) / depths).nan_to_num(0)
    distance = near[:, None] + (torch.arange(depths) + 0.5)[None] * step[:, None]
    # only rays that cross the inside and whose background's explanation fails need the sweep
    swept = torch.nonzero((far > near) & torch.isfinite(background_cost) & (background_cost >= INTERIOR_MARGIN))[:, 0]
    cost = torch.full((len(cam), depths), torch.inf)
    cost[swept] = cost_at(swept, distance[swept], torch.cat([small_ims, small_ims], 1))  # exact colours
    best, index = cost.min(1)
    common = cost.nan_to_num(posinf=float("nan")).nanquantile(0.25, 1).nan_to_num(0)
    found = (best <= INTERIOR_MARGIN) & (torch.minimum(background_cost, common) >= best + INTERIOR_MARGIN)
    found = supported(found, cam, cell, grid, num_cams)
    chosen = distance.gather(1, index[:, None])[:, 0]
    points = origins + chosen[:, None] * dirs
    found = confirmed(points, found, cam, cell, views, grid, tolerance=3 * float(step.max()))
    found = torch.nonzero(supported(found, cam, cell, grid, num_cams))[:, 0]
    found = found[torch.linspace(0, len(found) - 1, min(len(found), max_points)).round().long()]
    bg_full = background_pixels(views)
    rgb = [photo_consistency(part, views, views["ims"], bg_full, 1)[1] for part in points[found].split(8192)]
    return points[found], torch.cat(rgb) if rgb else torch.zeros(0, 3)


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
    inner, inner_rgb = interior_points(views, num_bg)
    bg, bg_rgb = torch.cat([bg, inner]), torch.cat([bg_rgb, inner_rgb])
    where = (
        "the floor y = 0 (a sky: the rest lies at infinity, in stage 1's environment map)"
        if shell is None
        else f"a sphere of radius {shell:.3g} around the cameras (beyond every camera) and the floor y = 0"
    )
    log(
        f"point cloud: visual hull of {len(ijk)} voxels ({size:.3g} world units each) -> {len(fg)} "
        f"foreground points; {len(bg)} background points on {where}, {len(inner)} of them inside the rig"
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
    parser.add_argument(
        "--bg-points",
        type=int,
        default=60_000,
        help="background rays (at most one point each), and at most this many points inside the rig",
    )
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
