"""Write a synthetic dynamic multi-view sequence with its ground truth: the demo's, or one of a family.

    python synthetic_sequence.py --out data/synthetic --benchmark data/grounding   # the demo sequence
    python synthetic_sequence.py --seed 3 --out data/family3                        # family member 3

Scenes are made of Gaussians (floor at y = 0, 'up' = -y as in PanopticSports) and rendered by the
reference rasterizer, in the PanopticSports layout of Dynamic 3D Gaussians:

    <out>/ims/<cam>/<t:06d>.jpg, <out>/seg/<cam>/<t:06d>.png (1-bit foreground = the objects),
    <out>/train_meta.json, <out>/test_meta.json, <out>/init_pt_cld.npz ([N, 7] xyz, rgb, seg)

and the ground truth:

    <out>/gt/params.npz        the Gaussians in the output format of train_d3dgs.py
    <out>/gt/ids/<cam>/<t:06d>.png   object id per pixel (0 = none), every camera
    <out>/gt/objects.json      per object: id, name, colour, prompt, motion, moving / prompt timesteps
    <out>/gt/scene.json        the drawn scene description (rig, background, floor, objects)
    <benchmark>/<seq>/<prompt_dir>/cam<N>.pt   grounding benchmark of the test cameras
    <video_dir>/<seq>/cam<N>.mp4               video of each test camera

**The demo sequence** (no --seed): a room (grey chequered floor, panelled wall) with a red ball
that rests, is thrown in an arc and lands, a blue box that slides and stops and a green top that
spins; 12 + 2 cameras on one ring, the test cameras on it.

**The family** (--seed S >= 1) varies what real rigs vary, drawn from S alone:
- rig: 6-30 train cameras on a ring (two alternating heights) or a dome (elevations 12-55
  degrees), radius 3.5-6 m, focal 0.7-1.0 x width;
- 2-3 test cameras: one on the train cameras' surface between two of them, and one or two off it
  (above, below, or closer to the scene);
- background: a sky at infinity (a colour that depends on the viewing direction only, clouds
  included, beyond a floor that ends at 2-3x the rig's radius) or a room (a wall at 1.3-1.8x the
  rig's radius, sky above it);
- floor: chequered, striped or blotched, in greys and browns;
- 3-5 objects (ball, box, top, cylinder) of distinct colours and sizes, thrown, sliding, spinning or
  static; at least one never moves, at least one is thrown or slides;
- image size 300-400 pixels wide, never a multiple of 16 (unless --width/--height say otherwise).
Every prompt's action happens after the first 4 timesteps (their clips drop the frames before 0,
so no encoder can place an action that starts there).

The family has no init_pt_cld.npz (as a user's own capture): stage 1 builds its own from the masks
(--point-cloud writes one from the true Gaussians). Deterministic for a seed; the demo's --noise-seed
moves its texture noise and point cloud only.
"""

import argparse
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

import diff_gaussian_rasterization_feat as dgrf
import helpers

# The demo's room and objects, in metres. World frame: floor at y = 0, up = -y.
# Spacings of the Gaussians at 320 pixels wide; smaller images get coarser ones (see build_scene).
FLOOR_RADIUS, FLOOR_SPACING, FLOOR_TILE = 6.5, 0.16, 0.5
WALL_RADIUS, WALL_HEIGHT, WALL_SPACING = 6.3, 3.0, 0.2
OBJECT_SPACING = 0.035
BALL_RADIUS = 0.38
BOX_SIZE = (0.85, 0.5, 0.55)  # x, height, z
TOP_RADIUS, TOP_HEIGHT = 0.4, 0.55

# The demo's camera ring: radius, heights above the floor (alternating), point looked at, focal / width.
RING_RADIUS, RING_HEIGHTS, LOOK_AT, FOCAL = 4.4, (1.7, 2.3), (0.0, -0.3, 0.0), 0.8

# Colours objects are drawn in (none of them is a floor's, a wall's or the sky's).
OBJECT_RGB = {
    "red": (0.86, 0.1, 0.08),
    "green": (0.15, 0.72, 0.2),
    "blue": (0.12, 0.3, 0.9),
    "yellow": (0.93, 0.83, 0.12),
    "orange": (0.95, 0.5, 0.06),
    "purple": (0.52, 0.14, 0.62),
}
FLOOR_TONES = (
    (0.56, 0.56, 0.56),
    (0.42, 0.42, 0.42),
    (0.62, 0.58, 0.5),
    (0.46, 0.4, 0.33),
    (0.35, 0.35, 0.37),
    (0.7, 0.68, 0.64),
)
WALL_PALETTES = (
    ((0.82, 0.76, 0.62), (0.70, 0.71, 0.73), (0.58, 0.47, 0.36)),
    ((0.78, 0.78, 0.76), (0.6, 0.6, 0.62), (0.45, 0.45, 0.47)),
    ((0.74, 0.66, 0.55), (0.85, 0.82, 0.75), (0.5, 0.42, 0.35)),
)
SHAPES = ("ball", "box", "top", "cylinder")
PROMPTS = {
    "thrown": "a {colour} {shape} flying in the air",
    "sliding": "a {colour} {shape} sliding on the floor",
    "spinning": "a {colour} {shape} spinning",
    "static": "a {colour} {shape} standing still",
}
FIRST_ACTION = 4  # earliest timestep an action may start in (clips of t < 4 drop frames before 0)


# ---------------------------------------------------------------- scene descriptions


def demo_scene(num_train=12, num_test=2):
    """The demo sequence as a scene description (the dict draw_scene returns)."""
    return {
        "kind": "demo",
        "rig": {
            "shape": "ring",
            "radius": RING_RADIUS,
            "heights": list(RING_HEIGHTS),
            "look_at": list(LOOK_AT),
            "focal": FOCAL,
            "num_train": num_train,
            "num_test": num_test,
        },
        "background": {
            "kind": "room",
            "wall_radius": WALL_RADIUS,
            "wall_height": WALL_HEIGHT,
            "wall_palette": WALL_PALETTES[0],
            "sky": None,
        },
        "floor": {
            "radius": FLOOR_RADIUS,
            "pattern": "chequer",
            "tile": FLOOR_TILE,
            "tones": [FLOOR_TONES[1], FLOOR_TONES[0]],
        },
        "objects": [
            {
                "id": 1,
                "shape": "ball",
                "colour": "red",
                "size": [BALL_RADIUS],
                "motion": "thrown",
                "start": [-1.3, 0.8],
                "end": [1.2, 0.95],
                "apex": 1.0,
                "times": [9 / 23, 20 / 23],
                "turn": 0.0,
                "prompt": "a red ball flying in the air",
            },
            {
                "id": 2,
                "shape": "box",
                "colour": "blue",
                "size": list(BOX_SIZE),
                "motion": "sliding",
                "start": [-1.2, -0.8],
                "end": [1.0, -0.7],
                "times": [8 / 23, 19 / 23],
                "turn": 0.35,
                "prompt": "a blue box sliding on the floor",
            },
            {
                "id": 3,
                "shape": "top",
                "colour": "green",
                "size": [TOP_RADIUS, TOP_HEIGHT],
                "motion": "spinning",
                "start": [0.1, 0.05],
                "end": [0.1, 0.05],
                "times": [0.0, 1.0],
                "turn": math.radians(575.0),
                "prompt": "a green top spinning",
            },
        ],
    }


def draw_object_size(rng, shape):
    """Size parameters of a shape (metres): ball [radius], box [x, height, z], top and cylinder
    [radius, height]."""
    if shape == "ball":
        return [float(rng.uniform(0.28, 0.45))]
    if shape == "box":
        return [float(rng.uniform(0.5, 0.9)), float(rng.uniform(0.35, 0.6)), float(rng.uniform(0.45, 0.7))]
    if shape == "top":
        return [float(rng.uniform(0.32, 0.45)), float(rng.uniform(0.45, 0.6))]
    return [float(rng.uniform(0.22, 0.35)), float(rng.uniform(0.5, 0.85))]


def footprint(obj):
    """Radius (metres) of the circle an object covers on the floor."""
    size = obj["size"]
    return math.hypot(size[0], size[2]) / 2 if obj["shape"] == "box" else size[0]


def path_clearance(a, b, positions):
    """Smallest distance from the segment a-b (floor coordinates [2]) to each of positions [K, 2]."""
    a, b, p = np.asarray(a), np.asarray(b), np.asarray(positions).reshape(-1, 2)
    ab = b - a
    u = np.clip(((p - a) @ ab) / max(ab @ ab, 1e-12), 0, 1)
    return np.linalg.norm(p - (a + u[:, None] * ab), axis=1)


def place(rng, obj, placed, area):
    """(start, end) floor positions [2] of an object inside a disc of radius `area` (end = start
    unless it is thrown or slides) whose path runs through no resting place of the objects placed
    [(start, end, footprint)] and whose resting places no path of theirs runs through; None when
    100 draws find none."""
    for _ in range(100):
        start = rng.uniform(-area, area, 2)
        end = start
        if obj["motion"] in ("thrown", "sliding"):
            heading = rng.uniform(0, 2 * math.pi)
            end = start + rng.uniform(1.2, 2.0) * np.array([math.cos(heading), math.sin(heading)])
        if max(np.linalg.norm(start), np.linalg.norm(end)) > area:
            continue
        # two movers' paths may cross (at different times); no path runs through a resting place
        if all(
            min(path_clearance(start, end, [s, e]).min(), path_clearance(s, e, [start, end]).min())
            > footprint(obj) + r + 0.05
            for s, e, r in placed
        ):
            return start, end
    return None


def draw_objects(rng, area):
    """3-5 objects inside a floor disc of radius `area`: distinct colours, at least one static and
    one thrown or sliding, kept apart (the whole set is drawn again when one does not fit)."""
    while True:
        count = int(rng.integers(3, 6))
        motions = ["static", str(rng.choice(["thrown", "sliding"]))]
        motions += [str(m) for m in rng.choice(["thrown", "sliding", "spinning", "static"], count - 2)]
        colours = [str(c) for c in rng.choice(list(OBJECT_RGB), count, replace=False)]
        placed, objects = [], []
        for i, (motion, colour) in enumerate(zip(motions, colours)):
            shape = str(rng.choice(SHAPES if motion != "spinning" else ("top", "cylinder", "box")))
            obj = {
                "id": i + 1,
                "shape": shape,
                "colour": colour,
                "size": draw_object_size(rng, shape),
                "motion": motion,
                "apex": 0.0,
                "turn": 0.0,
                "times": [0.0, 1.0],
                "prompt": PROMPTS[motion].format(colour=colour, shape=shape),
            }
            where = place(rng, obj, placed, area)
            if where is None:
                break
            placed.append((*where, footprint(obj)))
            obj.update(start=[float(v) for v in where[0]], end=[float(v) for v in where[1]])
            if motion in ("thrown", "sliding"):
                obj["earliest"] = FIRST_ACTION - 1.0  # the first timestep strictly after it is FIRST_ACTION
                begin = float(rng.uniform(0.3, 0.45))
                obj["times"] = [begin, float(min(begin + rng.uniform(0.35, 0.5), 0.9))]
            if motion == "thrown":
                obj["apex"] = float(rng.uniform(0.6, 1.2))
            elif motion == "sliding":
                obj["turn"] = float(rng.uniform(-0.6, 0.6))
            elif motion == "spinning":
                obj["turn"] = float(rng.choice([-1, 1]) * math.radians(rng.uniform(360, 720)))
            objects.append(obj)
        if len(objects) == count:
            return objects


def draw_scene(seed, num_train=None, num_test=None):
    """Scene description of family member `seed` (see the module docstring): plain dict of the
    rig, the test cameras' placement, background, floor and objects."""
    rng = np.random.default_rng([4102, seed])
    radius = float(rng.uniform(3.5, 6.0))
    shape = str(rng.choice(["ring", "dome"]))
    rig = {
        "shape": shape,
        "radius": radius,
        "look_at": [0.0, -float(rng.uniform(0.2, 0.5)), 0.0],
        "focal": float(rng.uniform(0.7, 1.0)),
        "azimuth0": float(rng.uniform(0, 2 * math.pi)),
        "num_train": int(rng.integers(6, 31)),
    }
    rig["num_train"] = rig["num_train"] if num_train is None else num_train  # drawn all the same: the rest stays
    if shape == "ring":
        low = float(rng.uniform(1.2, 1.9))
        rig["heights"] = [low, low + float(rng.uniform(0.0, 0.7))]
    else:
        low = float(rng.uniform(12, 25))
        rig["elevations"] = [low, float(rng.uniform(max(low + 15, 35), 55))]
    offsets = [str(k) for k in rng.choice(["above", "below", "closer"], int(rng.integers(1, 3)), replace=False)]
    rig["test"] = ["on"] + offsets if num_test is None else (["on"] + offsets * num_test)[:num_test]
    rig["test_offsets"] = {
        "above": float(rng.uniform(0.7, 1.2)),
        "below": float(rng.uniform(0.5, 0.8)),
        "closer": float(rng.uniform(0.6, 0.75)),
    }
    rig["num_test"] = len(rig["test"])
    sky = {
        "horizon": [float(v) for v in rng.uniform([0.86, 0.86, 0.84], [0.95, 0.94, 0.92])],
        "zenith": [float(v) for v in rng.uniform([0.5, 0.62, 0.82], [0.62, 0.75, 0.95])],
        "ground": [float(v) for v in rng.uniform([0.36, 0.33, 0.28], [0.46, 0.43, 0.38])],
        "waves": [
            [float(v) for v in np.append(d / np.linalg.norm(d), [rng.uniform(4, 12), rng.uniform(0, 6.3)])]
            for d in rng.normal(size=(6, 3))
        ],
    }
    if rng.random() < 0.5:
        background = {"kind": "sky", "sky": sky}
        floor_radius = radius * float(rng.uniform(2.0, 3.0))
    else:
        wall_radius = radius * float(rng.uniform(1.3, 1.8))
        background = {
            "kind": "room",
            "wall_radius": wall_radius,
            "wall_height": float(rng.uniform(3.0, 4.5)),
            "wall_palette": WALL_PALETTES[int(rng.integers(len(WALL_PALETTES)))],
            "sky": sky,
        }
        floor_radius = wall_radius + 0.2
    tones = rng.choice(len(FLOOR_TONES), 2, replace=False)
    floor = {
        "radius": floor_radius,
        "pattern": str(rng.choice(["chequer", "stripes", "blotches"])),
        "tile": float(rng.uniform(0.3, 0.9)),
        "tones": [FLOOR_TONES[int(i)] for i in tones],
    }
    return {
        "kind": "family",
        "seed": seed,
        "rig": rig,
        "background": background,
        "floor": floor,
        "objects": draw_objects(rng, area=min(2.0, 0.4 * radius)),
    }


def draw_image_size(seed):
    """(width, height) of family member `seed`: 300-400 wide, neither side a multiple of 16."""
    rng = np.random.default_rng([4103, seed])
    while True:
        width = int(rng.integers(300, 401))
        height = int(round(width * rng.uniform(0.56, 0.75)))
        if width % 16 and height % 16:
            return width, height


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
    return {
        "means3D": points,
        "rgb_colors": np.clip(colours, 0, 1),
        "unnorm_rotations": quat_z_to(normals),
        "log_scales": np.tile(np.log(sigma), (n, 1)),
        "logit_opacities": np.full((n, 1), math.log(opacity / (1 - opacity))),
    }


def shade(normals, colours):
    """Light from above, baked into the colours (it depends only on the vertical part of the
    normal, so it stays right while an object turns about the vertical)."""
    return colours * (0.55 + 0.45 * np.clip(-normals[:, 1:2], 0, 1))


def floor_pattern(x, z, floor, rng):
    """Tone index in {0, 1} [M] of the floor pattern at points (x, z) [M]."""
    tile = floor["tile"]
    if floor["pattern"] == "chequer":
        return (np.floor(x / tile) + np.floor(z / tile)) % 2
    if floor["pattern"] == "stripes":
        return np.floor((x * 0.8 + z * 0.6) / tile) % 2
    # blotches: a smooth random field of a few waves, thresholded at its median
    field = np.zeros_like(x)
    for direction, freq, phase in zip(rng.normal(size=(5, 2)), rng.uniform(0.8, 2.0, 5) / tile, rng.uniform(0, 6.3, 5)):
        field += np.sin(freq * (x * direction[0] + z * direction[1]) / np.linalg.norm(direction) + phase)
    return (field > np.median(field)).astype(np.float64)


def floor_gaussians(rng, spacing, floor):
    """Textured disc of `floor["radius"]` at y = 0."""
    radius = floor["radius"]
    x, z = hex_grid(2 * radius, 2 * radius, spacing).T
    keep = x**2 + z**2 <= radius**2
    x, z = x[keep], z[keep]
    tone = floor_pattern(x, z, floor, rng)
    tones = np.array(floor["tones"])
    colours = tones[tone.astype(int)] + rng.normal(0, 0.015, (len(x), 1))
    points = np.stack([x, np.zeros_like(x), z], 1)
    normals = np.tile([0.0, -1.0, 0.0], (len(x), 1))
    return flat_gaussians(points, normals, colours, spacing)


def wall_gaussians(rng, spacing, radius, height, palette):
    """Cylindrical wall of muted panels (none of the objects' colours) with a dark skirting board."""
    arc, h = hex_grid(2 * math.pi * radius, height, spacing).T
    angle, h = arc / radius + math.pi, h + height / 2
    normals = np.stack([np.cos(angle), np.zeros_like(angle), np.sin(angle)], 1)
    points = radius * normals - h[:, None] * np.array([0.0, 1.0, 0.0])
    colours = np.array(palette)[(angle / (2 * math.pi) * 18).astype(int) % 3]
    colours = np.where(h[:, None] < 0.3, 0.3, colours) + rng.normal(0, 0.015, (len(angle), 1))
    return flat_gaussians(points, normals, colours, spacing)


def fibonacci_sphere(n):
    """n nearly evenly spread unit vectors [n, 3]."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * i / n)
    azimuth = math.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.cos(polar), np.sin(azimuth) * np.sin(polar)], 1)


def two_tone(points, rgb, striped):
    """Object colour [P, 3]: plain, or 8 azimuthal stripes of the colour and its shadow (which the
    eye, and the colour encoder, still call that colour) so that a spin shows."""
    rgb = np.broadcast_to(np.asarray(rgb, dtype=np.float64), (len(points), 3))
    if not striped:
        return rgb
    stripe = (np.mod(np.arctan2(points[:, 2], points[:, 0]), 2 * math.pi) / (2 * math.pi) * 8).astype(int) % 2
    return np.where(stripe[:, None] > 0, rgb, 0.55 * rgb)


def ball(rng, spacing, radius, rgb, striped=False):
    """Sphere around its centre (local frame)."""
    normals = fibonacci_sphere(int(4 * math.pi * radius**2 / spacing**2))
    colours = two_tone(normals, rgb, striped) + rng.normal(0, 0.02, (len(normals), 1))
    return flat_gaussians(radius * normals, normals, shade(normals, colours), spacing)


def box(rng, spacing, size, rgb):
    """Box of size (x, height, z), local origin at the centre of its bottom face."""
    size = np.array(size)
    points, normals = [], []
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        gu, gv = hex_grid(size[u], size[v], spacing).T
        for sign in (-1.0,) if axis == 1 else (-1.0, 1.0):  # no bottom face: it is never seen
            p = np.zeros((len(gu), 3))
            p[:, u], p[:, v], p[:, axis] = gu, gv, sign * size[axis] / 2
            nrm = np.zeros_like(p)
            nrm[:, axis] = sign
            points.append(p)
            normals.append(nrm)
    points, normals = np.concatenate(points), np.concatenate(normals)
    points[:, 1] -= size[1] / 2
    # the faces differ a little in hue so that edges stay visible from the side
    colours = np.array(rgb) * (0.85 + 0.15 * np.abs(normals[:, :1]))
    colours = colours + rng.normal(0, 0.02, (len(points), 1))
    return flat_gaussians(points, normals, shade(normals, colours), spacing)


def top(rng, spacing, radius, height, light, dark):
    """Top: a cone standing on its tip with a lid and a short stem; stripes of a light and a dark
    tone around it show the spin. Local origin at the tip."""
    slant = math.hypot(radius, height)
    pieces = []
    # cone: area pi r l, points spread over it with density ~ radius
    n_cone = int(math.pi * radius * slant / spacing**2)
    s = np.sqrt((np.arange(n_cone) + 0.5) / n_cone)  # fraction of the way up, area-uniform
    azimuth = math.pi * (1 + 5**0.5) * np.arange(n_cone)
    r = s * radius
    cone = np.stack([r * np.cos(azimuth), -s * height, r * np.sin(azimuth)], 1)
    cone_n = np.stack([np.cos(azimuth) * height, np.full(n_cone, radius), np.sin(azimuth) * height], 1)
    pieces.append((cone, cone_n / slant, azimuth))
    n_lid = int(math.pi * radius**2 / spacing**2)
    s = np.sqrt((np.arange(n_lid) + 0.5) / n_lid)
    azimuth = math.pi * (1 + 5**0.5) * np.arange(n_lid)
    lid = np.stack([s * radius * np.cos(azimuth), np.full(n_lid, -height), s * radius * np.sin(azimuth)], 1)
    pieces.append((lid, np.tile([0.0, -1.0, 0.0], (n_lid, 1)), azimuth))
    azimuth, up = (
        a.ravel() for a in np.meshgrid(np.linspace(0, 2 * math.pi, 8, endpoint=False), np.arange(0.0, 0.13, spacing))
    )
    stem_n = np.stack([np.cos(azimuth), np.zeros_like(azimuth), np.sin(azimuth)], 1)
    stem = 0.045 * stem_n - (height + up)[:, None] * np.array([0.0, 1.0, 0.0])
    pieces.append((stem, stem_n, azimuth))
    points, normals, azimuth = (np.concatenate(p) for p in zip(*pieces))
    stripe = (np.mod(azimuth, 2 * math.pi) / (2 * math.pi) * 8).astype(int) % 2
    colours = np.where(stripe[:, None] > 0, light, dark)
    colours = colours + rng.normal(0, 0.015, (len(points), 1))
    return flat_gaussians(points, normals, shade(normals, colours), spacing)


def cylinder(rng, spacing, radius, height, rgb):
    """Upright cylinder with a lid, striped; local origin at the centre of its bottom."""
    n_side = int(2 * math.pi * radius * height / spacing**2)
    azimuth = math.pi * (1 + 5**0.5) * np.arange(n_side)
    up = (np.arange(n_side) + 0.5) / n_side * height
    side_n = np.stack([np.cos(azimuth), np.zeros(n_side), np.sin(azimuth)], 1)
    side = radius * side_n - up[:, None] * np.array([0.0, 1.0, 0.0])
    n_lid = int(math.pi * radius**2 / spacing**2)
    s = np.sqrt((np.arange(n_lid) + 0.5) / n_lid)
    lid_az = math.pi * (1 + 5**0.5) * np.arange(n_lid)
    lid = np.stack([s * radius * np.cos(lid_az), np.full(n_lid, -height), s * radius * np.sin(lid_az)], 1)
    points = np.concatenate([side, lid])
    normals = np.concatenate([side_n, np.tile([0.0, -1.0, 0.0], (n_lid, 1))])
    colours = two_tone(points, rgb, striped=True) + rng.normal(0, 0.02, (len(points), 1))
    return flat_gaussians(points, normals, shade(normals, colours), spacing)


def object_gaussians(rng, spacing, obj, demo):
    """Gaussians of one object in its local frame (origin on the floor under it, except a ball's:
    its centre). The demo's colours are its own (plain ball, the top in two greens)."""
    rgb, size = np.array(OBJECT_RGB[obj["colour"]]), obj["size"]
    if obj["shape"] == "ball":
        return ball(rng, spacing, size[0], rgb, striped=not demo)
    if obj["shape"] == "box":
        return box(rng, spacing, size, rgb)
    if obj["shape"] == "top":
        light, dark = ((0.15, 0.78, 0.2), (0.04, 0.42, 0.1)) if demo else (rgb, 0.5 * rgb)
        return top(rng, spacing, size[0], size[1], np.array(light), np.array(dark))
    return cylinder(rng, spacing, size[0], size[1], rgb)


# ---------------------------------------------------------------- motion


def object_motion(obj, num_timesteps):
    """Pose of an object at each timestep and the timesteps of its action.

    Thrown: rests at `start`, flies in an arc of height `apex` between the two `times` (fractions
    of the sequence) and lands at `end`; sliding: slides at constant speed, brakes evenly over the
    last 40% of the slide and stops, turning by `turn` radians; spinning: turns by `turn` over the
    sequence, in place; static: never moves. The action's timesteps are those strictly between the
    two times (a thrown ball is in the air strictly in between; a family object's action never
    starts before its `earliest` timestep and lasts at least 2); a spin acts all the time, a
    static object 'stands still' all the time. Returns (yaw [T] radians about the vertical, centre
    [T, 3] world (a ball's centre, else the point on the floor under the object), moving timesteps
    (pose changes), prompt timesteps (the prompt's action happens))."""
    t = np.arange(num_timesteps, dtype=np.float64)
    last = max(num_timesteps - 1, 1)
    lift = obj["size"][0] if obj["shape"] == "ball" else 0.0  # a ball's centre is its radius above the floor
    a = np.array([obj["start"][0], -lift, obj["start"][1]])
    b = np.array([obj["end"][0], -lift, obj["end"][1]])
    begin, stop = max(obj["times"][0] * last, obj.get("earliest", 0.0)), obj["times"][1] * last
    stop = max(stop, begin + 2)
    u = np.clip((t - begin) / max(stop - begin, 1e-9), 0, 1)
    between = [int(i) for i in t if begin < i < stop]
    if obj["motion"] == "thrown":
        centre = a + u[:, None] * (b - a)
        centre[:, 1] -= 4 * obj["apex"] * u * (1 - u)
        return np.zeros(num_timesteps), centre, between, between
    if obj["motion"] == "sliding":
        travelled = np.where(u < 0.6, u, 0.6 + 0.2 * (1 - ((1 - u) / 0.4) ** 2)) / 0.8
        return obj["turn"] * travelled, a + travelled[:, None] * (b - a), between, between
    every = [int(i) for i in t]
    if obj["motion"] == "spinning":
        return obj["turn"] * t / last, np.tile(a, (num_timesteps, 1)), every, every
    return np.zeros(num_timesteps), np.tile(a, (num_timesteps, 1)), [], every


def build_scene(num_timesteps, seed, coarse=1.0, scene=None):
    """Ground-truth Gaussians over time of `scene` (a description; None: the demo's), `coarse`
    times the spacings of the constants above; `seed` moves the texture noise. Returns (params,
    object_id [N] int, objects): params in the format of train_d3dgs.py's params.npz without the
    camera terms (numpy float32), objects = per object its id, name, colour, prompt, prompt_dir,
    motion, moving / static / prompt timesteps and the range [start, stop) of its Gaussians."""
    scene = demo_scene() if scene is None else scene
    demo = scene["kind"] == "demo"
    rng = np.random.default_rng(seed)
    parts = [(obj, object_gaussians(rng, coarse * OBJECT_SPACING, obj, demo)) for obj in scene["objects"]]
    room = [floor_gaussians(rng, coarse * FLOOR_SPACING, scene["floor"])]
    back = scene["background"]
    if back["kind"] == "room":
        room.append(
            wall_gaussians(rng, coarse * WALL_SPACING, back["wall_radius"], back["wall_height"], back["wall_palette"])
        )
    parts += [(None, g) for g in room]
    means, rotations, objects, object_id, start = [], [], [], [], 0
    for obj, g in parts:
        n = len(g["means3D"])
        object_id.append(np.full(n, obj["id"] if obj else 0))
        if obj is None:
            means.append(np.repeat(g["means3D"][None], num_timesteps, 0))
            rotations.append(np.repeat(g["unnorm_rotations"][None], num_timesteps, 0))
        else:
            yaw, centre, moving, prompted = object_motion(obj, num_timesteps)
            # rotation about the vertical (y) axis by yaw
            cos, sin = np.cos(yaw), np.sin(yaw)
            rot = np.zeros((num_timesteps, 3, 3))
            rot[:, 0, 0], rot[:, 0, 2], rot[:, 1, 1], rot[:, 2, 0], rot[:, 2, 2] = cos, sin, 1, -sin, cos
            means.append(np.einsum("tij,nj->tni", rot, g["means3D"]) + centre[:, None, :])
            q_yaw = np.stack([np.cos(yaw / 2), np.zeros_like(yaw), np.sin(yaw / 2), np.zeros_like(yaw)], 1)
            q_local = torch.from_numpy(g["unnorm_rotations"])[None].expand(num_timesteps, -1, -1)
            q = helpers.quat_mult(
                torch.from_numpy(q_yaw)[:, None].expand(-1, n, -1).reshape(-1, 4), q_local.reshape(-1, 4)
            )
            rotations.append(q.reshape(num_timesteps, n, 4).numpy())
            name = obj["shape"] if demo else f"{obj['colour']}_{obj['shape']}"
            objects.append(
                {
                    "id": obj["id"],
                    "name": name,
                    "colour": obj["colour"],
                    "prompt": obj["prompt"],
                    "prompt_dir": obj["prompt"].replace(" ", "_"),
                    "motion": obj["motion"],
                    "moving_timesteps": moving,
                    "static_timesteps": [t for t in range(num_timesteps) if t not in moving],
                    "prompt_timesteps": prompted,
                    "gaussians": [start, start + n],
                }
            )
        start += n
    object_id = np.concatenate(object_id)
    fg = (object_id > 0).astype(np.float64)[:, None]
    params = {
        "means3D": np.concatenate(means, 1),
        "rgb_colors": np.repeat(np.concatenate([g["rgb_colors"] for _, g in parts])[None], num_timesteps, 0),
        "unnorm_rotations": np.concatenate(rotations, 1),
        "seg_colors": np.concatenate([fg, np.zeros_like(fg), 1 - fg], 1),
        "logit_opacities": np.concatenate([g["logit_opacities"] for _, g in parts]),
        "log_scales": np.concatenate([g["log_scales"] for _, g in parts]),
    }
    return {k: v.astype(np.float32) for k, v in params.items()}, object_id, objects


# ---------------------------------------------------------------- cameras, sky and rendering


def ring_cameras(width, height, num_cams):
    """(k [3, 3], w2c [4, 4] OpenCV) of the demo's num_cams cameras evenly on a ring around the
    room's centre, alternately lower and higher, all looking at LOOK_AT."""
    focal = FOCAL * width
    k = [[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]]
    cams = []
    for c in range(num_cams):
        lift = RING_HEIGHTS[c % 2] + LOOK_AT[1]  # orbit_w2c's height is measured from the centre
        w2c = helpers.orbit_w2c(LOOK_AT, RING_RADIUS, lift, 2 * math.pi * c / num_cams)
        cams.append((k, w2c.tolist()))
    return cams


def test_cam_ids(num_cams, num_test):
    """The demo's test cameras: spread evenly over the ring, like the real data's test cameras."""
    return sorted({round(i * num_cams / num_test) for i in range(num_test)}) if num_test else []


def rig_position(rig, index, count, kind="on"):
    """(horizontal distance from the look-at point, height above the floor, azimuth) of camera
    `index` of `count` on the rig's surface, moved off it for a test camera of `kind`."""
    azimuth = rig["azimuth0"] + 2 * math.pi * index / count
    if rig["shape"] == "ring":
        distance, height = rig["radius"], rig["heights"][int(index) % 2] if kind == "train" else np.mean(rig["heights"])
    else:
        golden = math.pi * (3 - math.sqrt(5))
        low, high = rig["elevations"]
        frac = (index + 0.5) / count if kind == "train" else 0.5
        elevation = math.radians(low + (high - low) * frac)
        azimuth = rig["azimuth0"] + (golden * index if kind == "train" else 2 * math.pi * index / count)
        distance, height = rig["radius"] * math.cos(elevation), rig["radius"] * math.sin(elevation)
    offset = rig["test_offsets"]
    if kind == "above":
        height += offset["above"]
    elif kind == "below":
        height = max(0.45, height - offset["below"])
    elif kind == "closer":
        distance *= offset["closer"]
    return distance, height, azimuth


def scene_cameras(scene, width, height):
    """Cameras of a scene: ([(k [3, 3], w2c [4, 4] OpenCV)] of every camera, test camera ids).
    The demo's test cameras are on its ring among the train cameras; a family member's come
    after its train cameras, each between two of them (so that none sees what a train camera sees
    from the same place)."""
    rig = scene["rig"]
    if scene["kind"] == "demo":
        num_cams = rig["num_train"] + rig["num_test"]
        return ring_cameras(width, height, num_cams), test_cam_ids(num_cams, rig["num_test"])
    focal = rig["focal"] * width
    k = [[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]]
    look_at = np.array(rig["look_at"])
    places = [rig_position(rig, c, rig["num_train"], "train") for c in range(rig["num_train"])]
    count = len(rig["test"])
    places += [
        rig_position(rig, (2 * i + 1) * rig["num_train"] / (2 * count) + 0.5, rig["num_train"], kind)
        for i, kind in enumerate(rig["test"])
    ]
    cams = [(k, helpers.orbit_w2c(look_at, d, h + look_at[1], a).tolist()) for d, h, a in places]
    return cams, list(range(rig["num_train"], rig["num_train"] + count))


def ray_directions(width, height, k, w2c):
    """Unit viewing directions [H, W, 3] (world) through the pixel centres of a camera (pixel-index
    convention of helpers.setup_camera)."""
    k, w2c = np.asarray(k), np.asarray(w2c)
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    cam = np.stack([(cols - k[0, 2]) / k[0, 0], (rows - k[1, 2]) / k[1, 1], np.ones_like(cols)], -1)
    world = cam @ w2c[:3, :3]  # R^T d for each row vector d
    return world / np.linalg.norm(world, axis=-1, keepdims=True)


def sky_colour(directions, sky):
    """Colour [..., 3] of the sky at infinity in unit directions [..., 3]: a gradient from the
    horizon to the zenith with soft clouds, and the far ground's colour below the horizon."""
    elevation = -directions[..., 1]  # up = -y
    blend = np.sqrt(np.clip(elevation, 0, 1))[..., None]
    colour = (1 - blend) * np.array(sky["horizon"]) + blend * np.array(sky["zenith"])
    clouds = sum(np.sin(freq * (directions @ np.array([x, y, z])) + phase) for x, y, z, freq, phase in sky["waves"])
    colour = colour + 0.025 * clouds[..., None] * (elevation[..., None] > 0)
    ground = np.array(sky["ground"]) * (1 + 0.04 * np.sin(40 * directions[..., :1]) * np.sin(40 * directions[..., 2:]))
    return np.clip(np.where(elevation[..., None] > 0, colour, ground), 0, 1)


def sky_image(width, height, k, w2c, sky):
    """The sky [3, H, W] float32 a camera sees behind the Gaussians (None when the scene has none)."""
    if sky is None:
        return None
    return torch.from_numpy(sky_colour(ray_directions(width, height, k, w2c), sky)).permute(2, 0, 1).float()


def rasterizer_inputs(params, t):
    """The rasterizer's inputs (tensors [N, ...]) for timestep t of build_scene's params."""
    means = torch.from_numpy(params["means3D"][t])
    return {
        "means3D": means,
        "means2D": torch.zeros_like(means),
        "colors_precomp": torch.from_numpy(params["rgb_colors"][t]),
        "rotations": torch.from_numpy(params["unnorm_rotations"][t]),
        "opacities": torch.sigmoid(torch.from_numpy(params["logit_opacities"])),
        "scales": torch.exp(torch.from_numpy(params["log_scales"])),
    }


def render(cam, scene_t, one_hot, sky_image=None):
    """Image [3, H, W] in [0, 1] and object id per pixel [H, W] (the object with the largest
    rendered weight; 0 where the room or the sky dominates) of one camera at one timestep; the
    sky [3, H, W] (or black) shows where the Gaussians leave the view transparent."""
    im, _, _, weights = dgrf.GaussianRasterizer(cam)(legs_features=one_hot, **scene_t)
    if sky_image is not None:
        im = im + (1 - weights.sum(0).clamp(0, 1)) * sky_image
    return im.clamp(0, 1), weights.argmax(0)


def save_png(path, array):
    """uint8 [H, W] -> 8-bit grey PNG; bool [H, W] -> 1-bit PNG."""
    helpers.atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def save_jpg(path, rgb):
    helpers.atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="JPEG", quality=95))


def bounding_box(mask):
    """[x1, y1, x2, y2] pixel edges around a non-empty bool mask [H, W] (x2, y2 exclusive)."""
    rows, cols = np.nonzero(mask)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def generate(
    out,
    benchmark=None,
    width=320,
    height=180,
    num_timesteps=24,
    num_train=12,
    num_test=2,
    seed=0,
    video_dir=None,
    scene=None,
    point_cloud=None,
):
    """Write a synthetic sequence to `out` (see the module docstring), its grounding benchmark to
    `<benchmark>/<basename(out)>/` and test-camera videos to `<video_dir>/<basename(out)>/` when
    those are given. `scene`: a description (draw_scene) or None for the demo's, whose rig then
    has num_train + num_test cameras; `seed` moves the texture noise. `point_cloud`: write
    init_pt_cld.npz (default: for the demo only). Returns the objects list of gt/objects.json."""
    if width < 16 or height < 16:
        raise helpers.UserError(f"image size {width}x{height}: at least 16x16 pixels, please")
    if num_timesteps < 2 or num_train < 1 or num_test < 0:
        raise helpers.UserError(
            f"{num_timesteps} timesteps, {num_train} train and {num_test} test cameras: "
            f"need at least 2 timesteps and 1 train camera"
        )
    scene = demo_scene(num_train, num_test) if scene is None else scene
    point_cloud = scene["kind"] == "demo" if point_cloud is None else point_cloud
    seq = os.path.basename(os.path.normpath(out))
    # below 160 pixels wide, coarser Gaussians: as many per pixel, fewer to project (fast tests)
    params, object_id, objects = build_scene(num_timesteps, seed, coarse=max(1.0, 160.0 / width), scene=scene)
    cams, test_ids = scene_cameras(scene, width, height)
    num_cams = len(cams)
    skies = [sky_image(width, height, k, w2c, scene["background"]["sky"]) for k, w2c in cams]
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(object_id), len(objects) + 1).float()

    def render_and_save(t, c, scene_t):
        """Render camera c at timestep t, write its image, mask and ids; -> (uint8 image, ids)."""
        k, w2c = cams[c]
        im, ids = render(helpers.setup_camera(width, height, k, w2c), scene_t, one_hot, skies[c])
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
            for t in helpers.progress(
                range(num_timesteps), desc=f"rendering {seq} ({num_cams} cameras)", unit="timestep"
            ):
                scene_t = rasterizer_inputs(params, t)
                results = list(pool.map(lambda c: render_and_save(t, c, scene_t), range(num_cams)))
                for c in test_ids:
                    rgb, ids = results[c]
                    frames[c].append(rgb)
                    for o in objects:
                        if t in o["prompt_timesteps"] and (ids == o["id"]).any():
                            masks[(o["id"], c)][t] = ids == o["id"]
    finally:
        torch.set_num_threads(threads)

    train_ids = [c for c in range(num_cams) if c not in test_ids]
    for split, cam_ids in (("train", train_ids), ("test", test_ids)):
        helpers.save_json(
            os.path.join(out, f"{split}_meta.json"),
            {
                "w": width,
                "h": height,
                "k": [[cams[c][0] for c in cam_ids]] * num_timesteps,
                "w2c": [[cams[c][1] for c in cam_ids]] * num_timesteps,
                "fn": [[f"{c}/{t:06d}.jpg" for c in cam_ids] for t in range(num_timesteps)],
                "cam_id": [cam_ids] * num_timesteps,
            },
        )
    if point_cloud:  # the Gaussians' centres at t = 0 with 1 cm of noise, like a depth sensor's
        rng = np.random.default_rng(seed + 1)
        xyz = params["means3D"][0] + rng.normal(0, 0.01, params["means3D"][0].shape)
        helpers.save_npz(
            os.path.join(out, "init_pt_cld.npz"),
            {"data": np.concatenate([xyz, params["rgb_colors"][0], (object_id > 0)[:, None]], 1)},
        )
    elif os.path.isfile(os.path.join(out, "init_pt_cld.npz")):
        os.remove(os.path.join(out, "init_pt_cld.npz"))  # a cloud of an earlier scene in this folder
    helpers.save_npz(
        os.path.join(out, "gt", "params.npz"),
        dict(params, cam_m=np.zeros((len(train_ids), 3), np.float32), cam_c=np.zeros((len(train_ids), 3), np.float32)),
    )
    helpers.save_json(
        os.path.join(out, "gt", "objects.json"),
        {
            "num_timesteps": num_timesteps,
            "none_id": 0,
            "objects": objects,
            "background_gaussians": [objects[-1]["gaussians"][1], len(object_id)],
        },
    )
    helpers.save_json(os.path.join(out, "gt", "scene.json"), scene)
    if benchmark:
        for o in objects:
            for c in test_ids:
                found = masks[(o["id"], c)]
                helpers.save_torch(
                    os.path.join(benchmark, seq, o["prompt_dir"], f"cam{c}.pt"),
                    {
                        "masks": {t: torch.from_numpy(m) for t, m in found.items()},
                        "boxes": {t: bounding_box(m) for t, m in found.items()},
                    },
                )
    if video_dir:
        for c in test_ids:
            helpers.write_video(os.path.join(video_dir, seq, f"cam{c}.mp4"), frames[c], fps=8)
    return objects


def scene_settings(seed=None, width=None, height=None, num_timesteps=None, num_train=None, num_test=None):
    """(scene description, width, height, timesteps) of the demo (seed None) or of family member
    `seed`, each setting given (not None) taking the place of the scene's own."""
    if seed is None:
        scene = demo_scene(12 if num_train is None else num_train, 2 if num_test is None else num_test)
        size, num_t = (320, 180), 24
    else:
        scene = draw_scene(seed, num_train, num_test)
        size, num_t = draw_image_size(seed), 12
    return scene, width or size[0], height or size[1], num_timesteps or num_t


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        default=None,
        help="sequence folder to write, under data/, output/ or results/ "
        "(default: data/synthetic for the demo, data/family<seed> for --seed)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="draw member SEED (>= 1) of the scene family instead of the demo sequence",
    )
    parser.add_argument(
        "--benchmark",
        default="data/grounding",
        help="grounding benchmark root; the sequence's prompts go to <benchmark>/<sequence name>/ "
        "('' to skip; default: %(default)s)",
    )
    parser.add_argument(
        "--video-dir",
        default="results/ground_truth",
        help="ground-truth videos of the test cameras go to <video-dir>/<sequence name>/ "
        "('' to skip; default: %(default)s)",
    )
    parser.add_argument(
        "--width", type=int, default=None, help="image width in pixels (default: 320 for the demo, drawn for --seed)"
    )
    parser.add_argument(
        "--height", type=int, default=None, help="image height in pixels (default: 180 for the demo, drawn for --seed)"
    )
    parser.add_argument(
        "--timesteps", type=int, default=None, help="number of timesteps (default: 24 for the demo, 12 for --seed)"
    )
    parser.add_argument(
        "--train-cams", type=int, default=None, help="train cameras (default: 12 for the demo, drawn for --seed)"
    )
    parser.add_argument(
        "--test-cams",
        type=int,
        default=None,
        help="test cameras (default: 2 for the demo, on its ring; drawn for --seed)",
    )
    parser.add_argument(
        "--noise-seed",
        type=int,
        default=0,
        help="seed of the texture noise and the point-cloud noise (default: %(default)s)",
    )
    parser.add_argument(
        "--point-cloud",
        action="store_true",
        help="also write init_pt_cld.npz from the true Gaussians (the demo always has one)",
    )
    args = parser.parse_args(argv)
    if args.seed is not None and args.seed < 1:
        raise helpers.UserError(f"--seed {args.seed}: family members are numbered from 1 (no --seed: the demo)")
    start = time.perf_counter()
    scene, width, height, num_t = scene_settings(
        args.seed, args.width, args.height, args.timesteps, args.train_cams, args.test_cams
    )
    out = args.out or ("data/synthetic" if args.seed is None else f"data/family{args.seed}")
    for option, folder, example in (
        ("--out", out, "data/synthetic"),
        ("--benchmark", args.benchmark, "data/grounding"),
        ("--video-dir", args.video_dir, "results/ground_truth"),
    ):
        if folder:
            helpers.check_output(option, folder, f"{option} {example}", folder=True)
    rig = scene["rig"]
    objects = generate(
        out,
        args.benchmark or None,
        width,
        height,
        num_t,
        rig["num_train"],
        rig["num_test"],
        args.noise_seed,
        args.video_dir or None,
        scene=scene,
        point_cloud=args.point_cloud or None,
    )
    seq = os.path.basename(os.path.normpath(out))
    print(
        f"wrote {out} ({width}x{height}, {num_t} timesteps, {rig['num_train']} train + "
        f"{rig['num_test']} test cameras on a {rig['shape']}, {scene['background']['kind']} background; "
        f"ground truth in {os.path.join(out, 'gt')})"
        + (f", benchmark {os.path.join(args.benchmark, seq)} ({len(objects)} prompts)" if args.benchmark else "")
        + (f", videos {os.path.join(args.video_dir, seq)}" if args.video_dir else "")
        + f" in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    helpers.run_main(main)
