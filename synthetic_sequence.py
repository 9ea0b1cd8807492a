"""Write the synthetic dynamic sequence of the demo and the tests, with its ground truth.

    python synthetic_sequence.py --out data/synthetic --benchmark data/grounding

A room made of Gaussians (a grey chequered floor at y = 0, 'up' = -y as in PanopticSports, and a
panelled wall around it) with three objects: a red ball that rests, is thrown in an arc and lands;
a blue box that slides, brakes and stops; a green top that spins the whole time. Rendered
by the reference rasterizer from cameras on a ring looking at the centre, in the PanopticSports
layout of Dynamic 3D Gaussians:

    <out>/ims/<cam>/<t:06d>.jpg, <out>/seg/<cam>/<t:06d>.png (1-bit foreground = the objects),
    <out>/train_meta.json, <out>/test_meta.json, <out>/init_pt_cld.npz ([N, 7] xyz, rgb, seg)

and the ground truth:

    <out>/gt/params.npz        the Gaussians in the output format of train_d3dgs.py
    <out>/gt/ids/<cam>/<t:06d>.png   object id per pixel (0 = none), every camera
    <out>/gt/objects.json      per object: id, name, colour, prompt, moving and static timesteps
    <benchmark>/<seq>/<prompt_dir>/cam<N>.pt   grounding benchmark of the test cameras
    <video_dir>/<seq>/cam<N>.mp4               video of each test camera

Deterministic for a seed (the seed moves the texture noise and the initial point cloud; the
motions and hence the prompts' timesteps depend only on the number of timesteps).
"""
import argparse
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import diff_gaussian_rasterization_feat as dgrf
import helpers

# Room and objects, in metres. World frame: floor at y = 0, up = -y.
# Spacings of the Gaussians at 320 pixels wide; smaller images get coarser ones (see build_scene).
FLOOR_RADIUS, FLOOR_SPACING, FLOOR_TILE = 6.5, 0.16, 0.5
WALL_RADIUS, WALL_HEIGHT, WALL_SPACING = 6.3, 3.0, 0.2
OBJECT_SPACING = 0.035
BALL_RADIUS = 0.38
BOX_SIZE = (0.85, 0.5, 0.55)  # x, height, z
TOP_RADIUS, TOP_HEIGHT = 0.4, 0.55

# Camera ring: radius, heights above the floor (alternating), point looked at, focal length / width.
RING_RADIUS, RING_HEIGHTS, LOOK_AT, FOCAL = 4.4, (1.7, 2.3), (0.0, -0.3, 0.0), 0.8

OBJECTS = (
    {"id": 1, "name": "ball", "colour": "red", "prompt": "a red ball flying in the air"},
    {"id": 2, "name": "box", "colour": "blue", "prompt": "a blue box sliding on the floor"},
    {"id": 3, "name": "top", "colour": "green", "prompt": "a green top spinning"},
)


# ---------------------------------------------------------------- Gaussians of the room and objects

def quat_z_to(normals):
    """Unit quaternions [N, 4] (w, x, y, z) turning the local z axis onto `normals` [N, 3]: the thin
    axis of a flat Gaussian. A flat Gaussian is the same for n and -n, so n is flipped where that
    keeps away from the singular -z."""
    n = normals / np.linalg.norm(normals, axis=1, keepdims=True)
    n = np.where(n[:, 2:3] < 0, -n, n)
    q = np.stack([1 + n[:, 2], -n[:, 1], n[:, 0], np.zeros(len(n))], 1)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def hex_grid(size_u, size_v, spacing):
    """Points [M, 2] of a hexagonal grid covering [-size_u/2, size_u/2] x [-size_v/2, size_v/2]."""
    rows = []
    for i, v in enumerate(np.arange(-size_v / 2, size_v / 2 + 1e-9, spacing * math.sqrt(3) / 2)):
        u = np.arange(-size_u / 2 + (i % 2) * spacing / 2, size_u / 2 + 1e-9, spacing)
        rows.append(np.stack([u, np.full_like(u, v)], 1))
    return np.concatenate(rows)


def flat_gaussians(points, normals, colours, spacing, opacity=0.98):
    """Surface elements on a hexagonal (or similar) layout: flat discs of in-plane sigma
    0.55 * spacing and a thin sigma along the normal. That sigma keeps surfaces nearly opaque (at
    most ~5% of what is behind shows where three discs meet) with about 12 discs over any one
    pixel, which is what rendering costs. Returns the per-Gaussian arrays of params.npz."""
    n = len(points)
    sigma = np.array([0.55 * spacing, 0.55 * spacing, 0.002])
    return {"means3D": points, "rgb_colors": np.clip(colours, 0, 1), "unnorm_rotations": quat_z_to(normals),
            "log_scales": np.tile(np.log(sigma), (n, 1)),
            "logit_opacities": np.full((n, 1), math.log(opacity / (1 - opacity)))}


def shade(normals, colours):
    """Light from above, baked into the colours (it depends only on the vertical part of the
    normal, so it stays right while an object turns about the vertical)."""
    return colours * (0.55 + 0.45 * np.clip(-normals[:, 1:2], 0, 1))


def floor(rng, spacing):
    """Grey chequered disc at y = 0."""
    x, z = hex_grid(2 * FLOOR_RADIUS, 2 * FLOOR_RADIUS, spacing).T
    keep = x ** 2 + z ** 2 <= FLOOR_RADIUS ** 2
    x, z = x[keep], z[keep]
    chequer = (np.floor(x / FLOOR_TILE) + np.floor(z / FLOOR_TILE)) % 2
    grey = np.where(chequer > 0, 0.56, 0.42) + rng.normal(0, 0.015, len(x))
    points = np.stack([x, np.zeros_like(x), z], 1)
    normals = np.tile([0.0, -1.0, 0.0], (len(x), 1))
    return flat_gaussians(points, normals, np.repeat(grey[:, None], 3, 1), spacing)


def wall(rng, spacing):
    """Cylindrical wall of muted panels (beige, light grey, brown: none of the objects' colours)
    with a dark skirting board."""
    arc, height = hex_grid(2 * math.pi * WALL_RADIUS, WALL_HEIGHT, spacing).T
    angle, height = arc / WALL_RADIUS + math.pi, height + WALL_HEIGHT / 2
    normals = np.stack([np.cos(angle), np.zeros_like(angle), np.sin(angle)], 1)
    points = WALL_RADIUS * normals - height[:, None] * np.array([0.0, 1.0, 0.0])
    palette = np.array([[0.82, 0.76, 0.62], [0.70, 0.71, 0.73], [0.58, 0.47, 0.36]])
    colours = palette[(angle / (2 * math.pi) * 18).astype(int) % 3]
    colours = np.where(height[:, None] < 0.3, 0.3, colours) + rng.normal(0, 0.015, (len(angle), 1))
    return flat_gaussians(points, normals, colours, spacing)


def fibonacci_sphere(n):
    """n nearly evenly spread unit vectors [n, 3]."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * i / n)
    azimuth = math.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.cos(polar), np.sin(azimuth) * np.sin(polar)], 1)


def ball(rng, spacing):
    """Red sphere around its centre (local frame)."""
    normals = fibonacci_sphere(int(4 * math.pi * BALL_RADIUS ** 2 / spacing ** 2))
    colours = np.array([0.86, 0.1, 0.08]) + rng.normal(0, 0.02, (len(normals), 1))
    return flat_gaussians(BALL_RADIUS * normals, normals, shade(normals, colours), spacing)


def box(rng, spacing):
    """Blue box, local origin at the centre of its bottom face."""
    size = np.array(BOX_SIZE)
    points, normals = [], []
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        gu, gv = hex_grid(size[u], size[v], spacing).T
        for sign in ((-1.0,) if axis == 1 else (-1.0, 1.0)):  # no bottom face: it is never seen
            p = np.zeros((len(gu), 3))
            p[:, u], p[:, v], p[:, axis] = gu, gv, sign * size[axis] / 2
            nrm = np.zeros_like(p)
            nrm[:, axis] = sign
            points.append(p)
            normals.append(nrm)
    points, normals = np.concatenate(points), np.concatenate(normals)
    points[:, 1] -= size[1] / 2
    # the faces differ a little in hue so that edges stay visible from the side
    colours = np.array([0.12, 0.3, 0.9]) * (0.85 + 0.15 * np.abs(normals[:, :1]))
    colours = colours + rng.normal(0, 0.02, (len(points), 1))
    return flat_gaussians(points, normals, shade(normals, colours), spacing)


def top(rng, spacing):
    """Green top: a cone standing on its tip with a lid and a short stem; stripes of two greens
    around it show the spin. Local origin at the tip."""
    slant = math.hypot(TOP_RADIUS, TOP_HEIGHT)
    pieces = []
    # cone: area pi r l, points spread over it with density ~ radius
    n_cone = int(math.pi * TOP_RADIUS * slant / spacing ** 2)
    s = np.sqrt((np.arange(n_cone) + 0.5) / n_cone)  # fraction of the way up, area-uniform
    azimuth = math.pi * (1 + 5 ** 0.5) * np.arange(n_cone)
    r = s * TOP_RADIUS
    cone = np.stack([r * np.cos(azimuth), -s * TOP_HEIGHT, r * np.sin(azimuth)], 1)
    cone_n = np.stack([np.cos(azimuth) * TOP_HEIGHT, np.full(n_cone, TOP_RADIUS), np.sin(azimuth) * TOP_HEIGHT], 1)
    pieces.append((cone, cone_n / slant, azimuth))
    # lid: a disc
    n_lid = int(math.pi * TOP_RADIUS ** 2 / spacing ** 2)
    s = np.sqrt((np.arange(n_lid) + 0.5) / n_lid)
    azimuth = math.pi * (1 + 5 ** 0.5) * np.arange(n_lid)
    lid = np.stack([s * TOP_RADIUS * np.cos(azimuth), np.full(n_lid, -TOP_HEIGHT),
                    s * TOP_RADIUS * np.sin(azimuth)], 1)
    pieces.append((lid, np.tile([0.0, -1.0, 0.0], (n_lid, 1)), azimuth))
    # stem: a thin cylinder on the lid
    azimuth, height = (a.ravel() for a in np.meshgrid(np.linspace(0, 2 * math.pi, 8, endpoint=False),
                                                       np.arange(0.0, 0.13, spacing)))
    stem_n = np.stack([np.cos(azimuth), np.zeros_like(azimuth), np.sin(azimuth)], 1)
    stem = 0.045 * stem_n - (TOP_HEIGHT + height)[:, None] * np.array([0.0, 1.0, 0.0])
    pieces.append((stem, stem_n, azimuth))
    points, normals, azimuth = (np.concatenate(p) for p in zip(*pieces))
    stripe = (np.mod(azimuth, 2 * math.pi) / (2 * math.pi) * 8).astype(int) % 2
    colours = np.where(stripe[:, None] > 0, [0.15, 0.78, 0.2], [0.04, 0.42, 0.1])
    colours = colours + rng.normal(0, 0.015, (len(points), 1))
    return flat_gaussians(points, normals, shade(normals, colours), spacing)


# ---------------------------------------------------------------- motion

def motions(num_timesteps):
    """Pose of each object at each timestep and the timesteps of its action.

    Times scale with the sequence (24 timesteps: the ball lies still until t = 9, is in the air at
    t = 10..19 and lies still from t = 20; the box stands until t = 8, slides at t = 9..18, braking
    at the end, and stands still from t = 19; the top spins all the time). Both actions begin after
    the first clips: a timestep's clip t-4 .. t+3 drops the frames before 0, so the clips of
    t = 0..3 show frames up to 3..6 and cannot place an action that starts there. Returns
    {name: (yaw [T] radians about the vertical, centre [T, 3] world, moving timesteps list)}.
    """
    t = np.arange(num_timesteps, dtype=np.float64)
    last = max(num_timesteps - 1, 1)
    out = {}
    # ball: thrown from A at launch, lands at B at landing; in the air strictly in between
    launch, landing = 9 / 23 * last, 20 / 23 * last
    a, b, apex = np.array([-1.3, -BALL_RADIUS, 0.8]), np.array([1.2, -BALL_RADIUS, 0.95]), 1.0
    u = np.clip((t - launch) / (landing - launch), 0, 1)
    centre = a + u[:, None] * (b - a)
    centre[:, 1] -= 4 * apex * u * (1 - u)
    out["ball"] = (np.zeros(num_timesteps), centre, [int(i) for i in t if launch < i < landing])
    # box: slides at constant speed, brakes evenly over the last 40% of the slide, stops; turns a little
    begin, stop = 8 / 23 * last, 19 / 23 * last
    u = np.clip((t - begin) / (stop - begin), 0, 1)
    travelled = np.where(u < 0.6, u, 0.6 + 0.2 * (1 - ((1 - u) / 0.4) ** 2)) / 0.8
    start, end = np.array([-1.2, 0.0, -0.8]), np.array([1.0, 0.0, -0.7])
    centre = start + travelled[:, None] * (end - start)
    out["box"] = (0.35 * travelled, centre, [int(i) for i in t if begin < i < stop])
    # top: spins about the vertical through its tip, 575 degrees over the sequence
    spin = np.radians(575.0) * t / last
    out["top"] = (spin, np.tile([0.1, 0.0, 0.05], (num_timesteps, 1)), [int(i) for i in t])
    return out


def build_scene(num_timesteps, seed, coarse=1.0):
    """Ground-truth Gaussians over time, `coarse` times the spacing of the constants above.
    Returns (params, object_id [N] int, objects): params in the format of train_d3dgs.py's
    params.npz without the camera terms (numpy float32), objects = OBJECTS' dicts plus moving and
    static timesteps and the range [start, stop) of their Gaussians."""
    rng = np.random.default_rng(seed)
    parts = [("ball", ball(rng, coarse * OBJECT_SPACING)), ("box", box(rng, coarse * OBJECT_SPACING)),
             ("top", top(rng, coarse * OBJECT_SPACING)), ("floor", floor(rng, coarse * FLOOR_SPACING)),
             ("wall", wall(rng, coarse * WALL_SPACING))]
    moves = motions(num_timesteps)
    ids = {o["name"]: o["id"] for o in OBJECTS}
    means, rotations, objects, object_id, start = [], [], [], [], 0
    for name, g in parts:
        n = len(g["means3D"])
        object_id.append(np.full(n, ids.get(name, 0)))
        if name not in moves:
            means.append(np.repeat(g["means3D"][None], num_timesteps, 0))
            rotations.append(np.repeat(g["unnorm_rotations"][None], num_timesteps, 0))
        else:
            yaw, centre, moving = moves[name]
            # rotation about the vertical (y) axis by yaw
            cos, sin = np.cos(yaw), np.sin(yaw)
            rot = np.zeros((num_timesteps, 3, 3))
            rot[:, 0, 0], rot[:, 0, 2], rot[:, 1, 1], rot[:, 2, 0], rot[:, 2, 2] = cos, sin, 1, -sin, cos
            means.append(np.einsum("tij,nj->tni", rot, g["means3D"]) + centre[:, None, :])
            q_yaw = np.stack([np.cos(yaw / 2), np.zeros_like(yaw), np.sin(yaw / 2), np.zeros_like(yaw)], 1)
            q_local = torch.from_numpy(g["unnorm_rotations"])[None].expand(num_timesteps, -1, -1)
            q = helpers.quat_mult(torch.from_numpy(q_yaw)[:, None].expand(-1, n, -1).reshape(-1, 4),
                                  q_local.reshape(-1, 4))
            rotations.append(q.reshape(num_timesteps, n, 4).numpy())
            obj = next(o for o in OBJECTS if o["name"] == name)
            objects.append(dict(obj, prompt_dir=obj["prompt"].replace(" ", "_"), moving_timesteps=moving,
                                static_timesteps=[t for t in range(num_timesteps) if t not in moving],
                                gaussians=[start, start + n]))
        start += n
    object_id = np.concatenate(object_id)
    fg = (object_id > 0).astype(np.float64)[:, None]
    params = {"means3D": np.concatenate(means, 1),
              "rgb_colors": np.repeat(np.concatenate([g["rgb_colors"] for _, g in parts])[None], num_timesteps, 0),
              "unnorm_rotations": np.concatenate(rotations, 1),
              "seg_colors": np.concatenate([fg, np.zeros_like(fg), 1 - fg], 1),
              "logit_opacities": np.concatenate([g["logit_opacities"] for _, g in parts]),
              "log_scales": np.concatenate([g["log_scales"] for _, g in parts])}
    return {k: v.astype(np.float32) for k, v in params.items()}, object_id, objects


# ---------------------------------------------------------------- cameras and rendering

def ring_cameras(width, height, num_cams):
    """(k [3, 3], w2c [4, 4] OpenCV) of num_cams cameras evenly on a ring around the room's centre,
    alternately lower and higher, all looking at LOOK_AT."""
    focal = FOCAL * width
    k = [[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]]
    cams = []
    for c in range(num_cams):
        lift = RING_HEIGHTS[c % 2] + LOOK_AT[1]  # orbit_w2c's height is measured from the centre
        w2c = helpers.orbit_w2c(LOOK_AT, RING_RADIUS, lift, 2 * math.pi * c / num_cams)
        cams.append((k, w2c.tolist()))
    return cams


def render(cam, scene_t, one_hot):
    """Image [3, H, W] in [0, 1] and object id per pixel [H, W] (the object with the largest
    rendered weight; 0 where the room dominates) of one camera at one timestep."""
    im, _, _, weights = dgrf.GaussianRasterizer(cam)(legs_features=one_hot, **scene_t)
    return im.clamp(0, 1), weights.argmax(0)


def save_png(path, array):
    """uint8 [H, W] -> 8-bit grey PNG; bool [H, W] -> 1-bit PNG."""
    helpers.atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def save_jpg(path, rgb):
    helpers.atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="JPEG", quality=95))


def test_cam_ids(num_cams, num_test):
    """Test cameras spread evenly over the ring, like the real data's separate test cameras."""
    return sorted({round(i * num_cams / num_test) for i in range(num_test)}) if num_test else []


def bounding_box(mask):
    """[x1, y1, x2, y2] pixel edges around a non-empty bool mask [H, W] (x2, y2 exclusive)."""
    rows, cols = np.nonzero(mask)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def generate(out, benchmark=None, width=320, height=180, num_timesteps=24, num_train=12, num_test=2, seed=0,
             video_dir=None):
    """Write the synthetic sequence to `out` (see the module docstring), its grounding benchmark to
    `<benchmark>/<basename(out)>/` and test-camera videos to `<video_dir>/<basename(out)>/` when
    those are given. Returns the objects list written to gt/objects.json."""
    if width < 16 or height < 16:
        raise helpers.UserError(f"image size {width}x{height}: at least 16x16 pixels, please")
    if num_timesteps < 2 or num_train < 1 or num_test < 0:
        raise helpers.UserError(f"{num_timesteps} timesteps, {num_train} train and {num_test} test cameras: "
                                f"need at least 2 timesteps and 1 train camera")
    seq = os.path.basename(os.path.normpath(out))
    # below 160 pixels wide, coarser Gaussians: as many per pixel, fewer to project (fast tests)
    params, object_id, objects = build_scene(num_timesteps, seed, coarse=max(1.0, 160.0 / width))
    num_cams = num_train + num_test
    test_ids = test_cam_ids(num_cams, num_test)
    cams = ring_cameras(width, height, num_cams)
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(object_id), len(OBJECTS) + 1).float()
    shared = {"opacities": torch.sigmoid(torch.from_numpy(params["logit_opacities"])),
              "scales": torch.exp(torch.from_numpy(params["log_scales"]))}

    def render_and_save(t, c, scene_t):
        """Render camera c at timestep t, write its image, mask and ids; -> (uint8 image, ids)."""
        k, w2c = cams[c]
        im, ids = render(helpers.setup_camera(width, height, k, w2c), scene_t, one_hot)
        rgb, ids = helpers.to_uint8(im), ids.numpy().astype(np.uint8)
        save_jpg(os.path.join(out, "ims", str(c), f"{t:06d}.jpg"), rgb)
        save_png(os.path.join(out, "seg", str(c), f"{t:06d}.png"), ids > 0)
        save_png(os.path.join(out, "gt", "ids", str(c), f"{t:06d}.png"), ids)
        return rgb, ids

    frames = {c: [] for c in test_ids}
    masks = {(o["id"], c): {} for o in objects for c in test_ids}
    # Whole renders in parallel, one core each: the rasterizer's many small operations use two
    # cores poorly (and very poorly when other processes share them), two renders at a time use
    # them well (torch and numpy release the GIL). At most 8: each render holds ~100 MB.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, 8)) as pool:
            for t in tqdm(range(num_timesteps), desc=f"rendering {seq} ({num_cams} cameras)", unit="timestep"):
                means = torch.from_numpy(params["means3D"][t])
                scene_t = dict(shared, means3D=means, means2D=torch.zeros_like(means),
                               colors_precomp=torch.from_numpy(params["rgb_colors"][t]),
                               rotations=torch.from_numpy(params["unnorm_rotations"][t]))
                results = list(pool.map(lambda c: render_and_save(t, c, scene_t), range(num_cams)))
                for c in test_ids:
                    rgb, ids = results[c]
                    frames[c].append(rgb)
                    for o in objects:
                        if t in o["moving_timesteps"] and (ids == o["id"]).any():
                            masks[(o["id"], c)][t] = ids == o["id"]
    finally:
        torch.set_num_threads(threads)

    for split, cam_ids in (("train", [c for c in range(num_cams) if c not in test_ids]), ("test", test_ids)):
        helpers.save_json(os.path.join(out, f"{split}_meta.json"), {
            "w": width, "h": height,
            "k": [[cams[c][0] for c in cam_ids]] * num_timesteps,
            "w2c": [[cams[c][1] for c in cam_ids]] * num_timesteps,
            "fn": [[f"{c}/{t:06d}.jpg" for c in cam_ids] for t in range(num_timesteps)],
            "cam_id": [cam_ids] * num_timesteps})
    # initial point cloud: the Gaussians' centres at t = 0 with 1 cm of noise, like a depth sensor's
    rng = np.random.default_rng(seed + 1)
    xyz = params["means3D"][0] + rng.normal(0, 0.01, params["means3D"][0].shape)
    helpers.save_npz(os.path.join(out, "init_pt_cld.npz"),
                     {"data": np.concatenate([xyz, params["rgb_colors"][0], (object_id > 0)[:, None]], 1)})
    helpers.save_npz(os.path.join(out, "gt", "params.npz"), dict(
        params, cam_m=np.zeros((num_train, 3), np.float32), cam_c=np.zeros((num_train, 3), np.float32)))
    helpers.save_json(os.path.join(out, "gt", "objects.json"), {
        "num_timesteps": num_timesteps, "none_id": 0, "objects": objects,
        "background_gaussians": [objects[-1]["gaussians"][1], len(object_id)]})
    if benchmark:
        for o in objects:
            for c in test_ids:
                found = masks[(o["id"], c)]
                helpers.save_torch(os.path.join(benchmark, seq, o["prompt_dir"], f"cam{c}.pt"), {
                    "masks": {t: torch.from_numpy(m) for t, m in found.items()},
                    "boxes": {t: bounding_box(m) for t, m in found.items()}})
    if video_dir:
        for c in test_ids:
            helpers.write_video(os.path.join(video_dir, seq, f"cam{c}.mp4"), frames[c], fps=8)
    return objects


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic", help="sequence folder to write (default: %(default)s)")
    parser.add_argument("--benchmark", default="data/grounding",
                        help="grounding benchmark root; the sequence's prompts go to <benchmark>/<sequence name>/ "
                             "('' to skip; default: %(default)s)")
    parser.add_argument("--video-dir", default="results/ground_truth",
                        help="ground-truth videos of the test cameras go to <video-dir>/<sequence name>/ "
                             "('' to skip; default: %(default)s)")
    parser.add_argument("--width", type=int, default=320, help="image width in pixels (default: %(default)s)")
    parser.add_argument("--height", type=int, default=180, help="image height in pixels (default: %(default)s)")
    parser.add_argument("--timesteps", type=int, default=24, help="number of timesteps (default: %(default)s)")
    parser.add_argument("--train-cams", type=int, default=12, help="training cameras (default: %(default)s)")
    parser.add_argument("--test-cams", type=int, default=2,
                        help="test cameras, spread evenly over the same ring (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the texture noise and the point-cloud noise (default: %(default)s)")
    args = parser.parse_args()
    start = time.perf_counter()
    objects = generate(args.out, args.benchmark or None, args.width, args.height, args.timesteps,
                       args.train_cams, args.test_cams, args.seed, args.video_dir or None)
    seq = os.path.basename(os.path.normpath(args.out))
    print(f"wrote {args.out} ({args.width}x{args.height}, {args.timesteps} timesteps, {args.train_cams} train + "
          f"{args.test_cams} test cameras; ground truth in {os.path.join(args.out, 'gt')})"
          + (f", benchmark {os.path.join(args.benchmark, seq)} ({len(objects)} prompts)" if args.benchmark else "")
          + (f", videos {os.path.join(args.video_dir, seq)}" if args.video_dir else "")
          + f" in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    helpers.run_main(main)
