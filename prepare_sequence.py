"""Turn your own multi-view capture into a sequence the pipeline reads (the PanopticSports layout).

    # 1a. one video or frame folder per camera + a cameras file (JSON, or YAML when pyyaml is installed)
    python prepare_sequence.py --videos capture/videos --cameras capture/cameras.json -o data/myseq
    # 1b. the same videos + a COLMAP text model with one image per camera
    python prepare_sequence.py --videos capture/videos --colmap capture/sparse/0 -o data/myseq
    # 2.  a DyNeRF / Neural 3D Video scene (cam00.mp4 ... camNN.mp4, poses_bounds.npy)
    python prepare_sequence.py --dynerf data/n3v/coffee_martini -o data/coffee_martini --downscale 2
    # then
    python train_d3dgs.py -s data/myseq

Writes, under -o:
    ims/<id>/<t:06d>.jpg            the frames; camera ids 0, 1, ... follow the input's order
    seg/<id>/<t:06d>.png            1-bit foreground masks: yours (--masks) or from background subtraction
    train_meta.json, test_meta.json  image size and per timestep the cameras: k, w2c, fn, cam_id
    prepare_sequence.json           what was read: camera name of each id, source frame of each
                                    timestep, the settings (a rerun with other settings is refused)

--videos DIR holds one entry per camera, named like the camera: DIR/<name>.mp4 (or .mov .avi .mkv
.webm .m4v), or a folder DIR/<name>/ of numbered .jpg/.png frames. A frame's number is the last run
of digits in its file name; the smallest number over all folders is frame 0; a gap is a missing frame.

Cameras file (--cameras): cameras in order, each with its frame size, intrinsics K and world-to-camera
extrinsics w2c in the OpenCV convention (camera x right, y down, z forward; x_cam = R x_world + t):

    {"cameras": [
      {"name": "left", "width": 1920, "height": 1080,
       "K": [[1400.0, 0.0, 960.0], [0.0, 1400.0, 540.0], [0.0, 0.0, 1.0]],
       "w2c": [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 4.0], [0.0, 0.0, 0.0, 1.0]],
       "dist": [-0.12, 0.03, 0.0, 0.0], "offset": 0},
      {"name": "right", "width": 1920, "height": 1080, "K": ..., "w2c": ...}]}

  K      cx, cy count from the image's top-left corner: the top-left pixel's centre is (0.5, 0.5), as
         in COLMAP and train_meta.json. A K from OpenCV's calibrateCamera puts that centre at (0, 0):
         add 0.5 to its cx and cy.
  w2c    [4][4] or [3][4] rigid [R | t]. A camera-to-world pose (camera position in the last column)
         must be inverted first.
  dist   optional OpenCV distortion k1 k2 p1 p2 [k3 [k4 k5 k6]]: the frames are undistorted to K.
  width, height  the frames' size, per camera or once beside "cameras". offset: see --offsets.

COLMAP (--colmap): cameras.txt and images.txt (a binary model converts with `colmap model_converter
--input_path D --output_path D --output_type TXT`), one image per camera, listed in images.txt in
the order the ids should follow; a camera's name is its image's file name without the extension.
Camera models SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV, FULL_OPENCV; distorted ones
are undistorted to their pinhole part.

DyNeRF (--dynerf): poses_bounds.npy has one row per camXX.mp4 in name order: LLFF's camera-to-world
pose [down, right, backwards | position], the image height, width and focal length, near and far
bounds (unused). The principal point is the image centre. cam00 is the usual test camera.

Time: timestep t is frame first + t * every (with --fps: the frame nearest to t / fps seconds after
`first`) of a camera with offset 0; a camera with offset K shows the same instant K frames later.

Masks without --masks: per camera, the background is the clean plate (--background) or estimated
from up to 25 of the prepared frames: per pixel the value it holds most often, and where something
rested for a while (another value lasts too) the one whose colour the surroundings show, and where
it moved over its own spot (part of the spot never showed the empty scene) the surroundings' colour.
A pixel is foreground where some channel differs from it by more than --threshold; an opening
removes specks, a closing fills cracks, small blobs go. What moves is found; what stays put (or
spins in place) is background, as stage 1 wants it. Where something rests for most of the frames
and the empty scene shows only briefly, shoot a clean plate (or give your own masks).

A rerun with the same command skips the frames and masks already written; interrupted runs leave no
half-written file.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from scipy.spatial.transform import Rotation
from tqdm import tqdm

import helpers

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
FRAME_EXTS = (".jpg", ".jpeg", ".png")
DIST_NAMES = ("k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6")  # OpenCV's order of distortion coefficients
COLMAP_MODELS = {  # parameters in the order of cameras.txt (COLMAP's sensor/models.h)
    "SIMPLE_PINHOLE": ("f", "cx", "cy"),
    "PINHOLE": ("fx", "fy", "cx", "cy"),
    "SIMPLE_RADIAL": ("f", "cx", "cy", "k1"),
    "RADIAL": ("f", "cx", "cy", "k1", "k2"),
    "OPENCV": ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2"),
    "FULL_OPENCV": ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6"),
}
BACKGROUND_FRAMES = 25  # frames the background is estimated from: enough to outvote a passing object, bounded memory
BACKGROUND_VALUES = 3  # values per pixel the background is chosen from (it, what rested there, what passed by)
BACKGROUND_SHARE = 0.2  # a value held by this share of the frames lasted: something rested there, or the background
SURROUNDING_RAYS, SURROUNDING_REACH = 16, (1.0, 1.5, 2.0, 3.0)  # rays out of a spot, radii in its half width
MIN_BLOB_FRACTION = 1e-4  # foreground blobs smaller than this part of the image are noise
EMPTY_FRACTION, FULL_FRACTION = 0.001, 0.9  # a camera's mean foreground outside these gets a warning
JPEG_QUALITY = 95


# ---------------------------------------------------------------- cameras


def as_matrix(value, shapes, what):
    """Nested lists -> float64 array of one of `shapes` (tuples), all finite; else UserError naming `what`."""
    try:
        matrix = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        matrix = None
    if matrix is None or matrix.shape not in shapes or not np.isfinite(matrix).all():
        wanted = " or ".join("x".join(map(str, s)) for s in shapes)
        raise helpers.UserError(f"{what} must be a {wanted} matrix of finite numbers, is {str(value)[:80]}")
    return matrix


def make_camera(name, k, w2c, size, dist, offset, where):
    """A camera as the rest of this script reads it, checked: {'name', 'k' [3, 3], 'w2c' [4, 4] OpenCV
    world-to-camera, 'size' (w, h) of its frames, 'dist' [8] OpenCV coefficients or None, 'offset'
    frames or None (not given)}. `where` names the source in errors."""
    if k[0, 0] <= 0 or k[1, 1] <= 0 or np.abs(k[[0, 1, 2, 2], [1, 0, 0, 1]]).max() > 1e-9 or abs(k[2, 2] - 1) > 1e-9:
        raise helpers.UserError(
            f"{where}: camera {name}: K is not [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with "
            f"fx, fy > 0 (no skew): {k.tolist()}"
        )
    rot = w2c[:3, :3]
    if (
        np.abs(w2c[3] - [0, 0, 0, 1]).max() > 1e-9
        or np.abs(rot @ rot.T - np.eye(3)).max() > 1e-3
        or np.linalg.det(rot) <= 0
    ):
        raise helpers.UserError(
            f"{where}: camera {name}: w2c is not a rigid world-to-camera transform [[R, t], "
            f"[0, 0, 0, 1]] with R a rotation"
        )
    if not all(isinstance(s, int) and s > 0 for s in size):
        raise helpers.UserError(f"{where}: camera {name}: width and height must be positive whole numbers, are {size}")
    dist = None if dist is None or not np.any(dist) else np.asarray(dist, dtype=np.float64)
    return {"name": name, "k": k, "w2c": w2c, "size": tuple(size), "dist": dist, "offset": offset}


def check_names(cameras, where):
    names = [c["name"] for c in cameras]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise helpers.UserError(f"{where} names camera(s) {', '.join(repeated)} more than once")


def load_structured(path):
    """The content of a JSON file, or of a YAML file (.yaml/.yml) when pyyaml is importable."""
    if not os.path.isfile(path):
        raise helpers.UserError(f"cameras file {path} not found")
    with open(path) as f:
        text = f.read()
    if os.path.splitext(path)[1].lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise helpers.UserError(
                f"{path}: reading YAML needs pyyaml (pip install pyyaml); or write the cameras as JSON"
            )
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise helpers.UserError(f"{path} is not valid YAML ({' '.join(str(e).split())})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise helpers.UserError(f"{path} is not valid JSON ({e})")


def read_cameras_file(path):
    """Cameras of a cameras file (format in the module docstring), in the file's order."""
    data = load_structured(path)
    if not isinstance(data, dict) or not isinstance(data.get("cameras"), list) or not data["cameras"]:
        raise helpers.UserError(
            f"{path}: expected an object with a non-empty list 'cameras' (example: python prepare_sequence.py --help)"
        )
    cameras = []
    for i, entry in enumerate(data["cameras"]):
        if not isinstance(entry, dict) or "name" not in entry:
            raise helpers.UserError(f"{path}: cameras[{i}] is not an object with a 'name'")
        name, where = str(entry["name"]), f"{path}: camera {entry['name']}"
        missing = [key for key in ("K", "w2c", "width", "height") if key not in entry and key not in data]
        if missing:
            raise helpers.UserError(f"{where} lacks {', '.join(missing)}")
        k = as_matrix(entry["K"], [(3, 3)], f"{where}: K")
        w2c = as_matrix(entry["w2c"], [(3, 4), (4, 4)], f"{where}: w2c")
        if w2c.shape == (3, 4):
            w2c = np.vstack([w2c, [0.0, 0.0, 0.0, 1.0]])
        dist = entry.get("dist")
        if dist is not None:
            dist = as_matrix(dist, [(4,), (5,), (8,)], f"{where}: dist (OpenCV's k1 k2 p1 p2 [k3 [k4 k5 k6]])")
            dist = np.concatenate([dist, np.zeros(8 - len(dist))])
        offset = entry.get("offset")
        if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int)):
            raise helpers.UserError(f"{where}: offset must be a whole number of frames, is {offset!r}")
        size = (entry.get("width", data.get("width")), entry.get("height", data.get("height")))
        cameras.append(make_camera(name, k, w2c, size, dist, offset, path))
    check_names(cameras, path)
    return cameras


def data_lines(path):
    """(line number, line) of a COLMAP text file, comments left out."""
    with open(path) as f:
        return [(n, line.strip()) for n, line in enumerate(f, 1) if not line.startswith("#")]


def is_number(token):
    try:
        float(token)
        return True
    except ValueError:
        return False


def read_colmap(sparse_dir):
    """Cameras of a COLMAP text model, one per image in images.txt's order, named by the image's file
    name without the extension. The distortion of OPENCV-like models is kept for undistortion."""
    cams_path, ims_path = os.path.join(sparse_dir, "cameras.txt"), os.path.join(sparse_dir, "images.txt")
    for path in (cams_path, ims_path):
        if not os.path.isfile(path):
            binary = os.path.isfile(os.path.splitext(path)[0] + ".bin")
            raise helpers.UserError(
                f"{path} not found"
                + (
                    f": the model is binary; convert it with `colmap model_converter --input_path "
                    f"{sparse_dir} --output_path {sparse_dir} --output_type TXT`"
                    if binary
                    else " (--colmap takes the folder of a text model: cameras.txt, images.txt)"
                )
            )
    intrinsics = {}
    for n, line in data_lines(cams_path):
        if not line:
            continue
        tokens = line.split()
        try:
            cam_id, model, size, params = int(tokens[0]), tokens[1], (int(tokens[2]), int(tokens[3])), tokens[4:]
            params = [float(p) for p in params]
        except (IndexError, ValueError):
            raise helpers.UserError(
                f"{cams_path}:{n}: expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS..., got {line[:80]!r}"
            )
        intrinsics[cam_id] = (model, size, params, f"{cams_path}:{n}")
    cameras = []
    for n, line in data_lines(ims_path):
        tokens = line.split()
        # an image line has 10 fields and ends with a name; the line after it lists 2D points (numbers) or is empty
        if len(tokens) != 10 or is_number(tokens[9]):
            continue
        where = f"{ims_path}:{n}"
        try:
            qvec, tvec, cam_id = [float(x) for x in tokens[1:5]], [float(x) for x in tokens[5:8]], int(tokens[8])
        except ValueError:
            raise helpers.UserError(
                f"{where}: expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME, got {line[:80]!r}"
            )
        if cam_id not in intrinsics:
            raise helpers.UserError(f"{where}: image {tokens[9]} uses camera {cam_id}, which {cams_path} does not list")
        model, size, params, cam_where = intrinsics[cam_id]
        if model not in COLMAP_MODELS:
            raise helpers.UserError(
                f"{cam_where}: camera {cam_id} has the {model} model; supported: "
                f"{', '.join(COLMAP_MODELS)} (reconstruct with e.g. --ImageReader.camera_model "
                f"OPENCV, or undistort the videos and give a PINHOLE model)"
            )
        if len(params) != len(COLMAP_MODELS[model]):
            raise helpers.UserError(
                f"{cam_where}: the {model} model has {len(COLMAP_MODELS[model])} parameters "
                f"({' '.join(COLMAP_MODELS[model])}), the line {len(params)}"
            )
        p = dict(zip(COLMAP_MODELS[model], params))
        k = np.array([[p.get("fx", p.get("f")), 0.0, p["cx"]], [0.0, p.get("fy", p.get("f")), p["cy"]], [0, 0, 1.0]])
        w2c = np.eye(4)
        qw, qx, qy, qz = qvec  # COLMAP: scalar first, world-to-camera; scipy: scalar last
        w2c[:3, :3] = Rotation.from_quat([qx, qy, qz, qw]).as_matrix()
        w2c[:3, 3] = tvec
        name = os.path.splitext(os.path.basename(tokens[9]))[0]
        cameras.append(make_camera(name, k, w2c, size, [p.get(d, 0.0) for d in DIST_NAMES], None, where))
    if not cameras:
        raise helpers.UserError(f"{ims_path} lists no images")
    check_names(cameras, ims_path)
    return cameras


def llff_to_w2c(pose):
    """One camera of an LLFF poses_bounds.npy: the [3, 5] matrix of its first 15 numbers -> (OpenCV
    w2c [4, 4], (height, width, focal) in pixels).

    LLFF's convention (github.com/Fyusion/LLFF, "Using your own poses without running COLMAP"): the
    first 3x4 block is camera-to-world, its rotation columns are the camera's down, right and
    backwards axes in world coordinates, then the camera position; the fifth column is [image
    height, image width, focal length]. OpenCV's camera axes are right, down, forwards: LLFF's
    columns 1, 0 and minus 2."""
    c2w_rot = np.stack([pose[:, 1], pose[:, 0], -pose[:, 2]], 1)
    w2c = np.eye(4)
    w2c[:3, :3] = c2w_rot.T
    w2c[:3, 3] = -c2w_rot.T @ pose[:, 3]
    return w2c, tuple(pose[:, 4])


def read_dynerf(scene_dir):
    """Cameras and videos of a DyNeRF scene (camXX.mp4 in number order, poses_bounds.npy) ->
    (cameras, {name: video path}). The focal length is scaled when the videos are smaller than the
    size in poses_bounds.npy (as LLFF's loader does for downscaled images)."""
    if not os.path.isdir(scene_dir):
        raise helpers.UserError(f"--dynerf {scene_dir}: not a folder")
    found = [f for f in os.listdir(scene_dir) if re.fullmatch(r"cam\d+\.mp4", f)]
    videos = {os.path.splitext(f)[0]: os.path.join(scene_dir, f) for f in sorted(found, key=lambda f: int(f[3:-4]))}
    poses_path = os.path.join(scene_dir, "poses_bounds.npy")
    if not videos or not os.path.isfile(poses_path):
        state = "present" if os.path.isfile(poses_path) else "missing"
        raise helpers.UserError(
            f"{scene_dir}: a DyNeRF scene holds cam00.mp4 ... camNN.mp4 and poses_bounds.npy "
            f"({len(videos)} videos, poses_bounds.npy {state})"
        )
    try:
        poses_bounds = np.load(poses_path)
    except (OSError, ValueError) as e:
        raise helpers.UserError(f"{poses_path} cannot be read ({e})")
    if poses_bounds.ndim != 2 or poses_bounds.shape[1] != 17 or not np.isfinite(poses_bounds).all():
        raise helpers.UserError(
            f"{poses_path}: expected [cameras, 17] finite numbers (LLFF), got {list(poses_bounds.shape)}"
        )
    if len(poses_bounds) != len(videos):
        raise helpers.UserError(
            f"{poses_path} holds {len(poses_bounds)} cameras, {scene_dir} {len(videos)} camXX.mp4 "
            f"videos ({', '.join(videos)}): one row per video, in name order"
        )
    cameras = []
    for row, (name, path) in zip(poses_bounds.astype(np.float64), videos.items()):
        w2c, (height, width, focal) = llff_to_w2c(row[:15].reshape(3, 5))
        video_w, video_h = probe_video(path, count=False)["size"]
        if abs(video_w / width - video_h / height) > 0.01 * video_w / width:
            raise helpers.UserError(
                f"{path} is {video_w}x{video_h}, {poses_path} says {width:g}x{height:g} for {name}: not the same shape"
            )
        k = np.array([[focal * video_w / width, 0, video_w / 2], [0, focal * video_h / height, video_h / 2], [0, 0, 1]])
        cameras.append(make_camera(name, k, w2c, (video_w, video_h), None, None, poses_path))
    return cameras, videos


def scale_world(cameras, scale):
    """Cameras of a world `scale` times larger (world-to-camera translations scale, rotations stay)."""
    for camera in cameras:
        camera["w2c"] = camera["w2c"].copy()
        camera["w2c"][:3, 3] *= scale
    return cameras


def world_frame_warnings(cameras):
    """What in the cameras' world frame stage 1 will not expect, as warning lines. Stage 1 assumes
    the PanopticSports frame (+y down, the floor y = 0 below the cameras; its floor loss keeps the
    foreground at y <= 0) and clips what is nearer than 1 unit to a training camera."""
    rotations = np.stack([c["w2c"][:3, :3] for c in cameras])
    centres = -np.einsum("cji,cj->ci", rotations, np.stack([c["w2c"][:3, 3] for c in cameras]))
    warnings = []
    down = rotations[:, 1].mean(0)  # a camera's +y (image down) in world coordinates
    if down[1] < 0.85 * np.linalg.norm(down) or (centres[:, 1] >= 0).any():
        down = np.round(down / np.linalg.norm(down), 2).tolist()
        warnings.append(
            f"the cameras' mean image-down direction is {down} "
            f"in world coordinates and {(centres[:, 1] >= 0).sum()} of them are at y >= 0: stage 1 "
            f"expects PanopticSports' world frame (+y down, the floor y = 0 below every camera; its floor "
            f"loss keeps the foreground at y <= 0); transform the extrinsics to that frame"
        )
    # the point nearest to all optical axes (least squares): where the cameras look
    axes = rotations[:, 2]
    projectors = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]
    normal = projectors.sum(0)
    if np.linalg.matrix_rank(normal, tol=1e-6) == 3:
        target = np.linalg.solve(normal, np.einsum("cij,cj->i", projectors, centres))
        distance = float(np.median(np.linalg.norm(centres - target, axis=1)))
        if distance < 2.0:
            warnings.append(
                f"the cameras are about {distance:.2g} world units from what they look at; stage 1 "
                f"clips everything nearer than 1 unit to a camera: --world-scale {4 / distance:.2g} "
                f"brings them about 4 units away"
            )
    return warnings


# ---------------------------------------------------------------- videos and frame folders


def find_inputs(folder, names, what, option="--videos"):
    """{name: video file or frame folder} in `folder` (given as `option`) for each camera name;
    UserError when the two disagree. `what` names where the names come from."""
    if not os.path.isdir(folder):
        raise helpers.UserError(f"{option} {folder}: not a folder")
    entries = {}
    for entry in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(entry)
        path = os.path.join(folder, entry)
        if os.path.isdir(path):
            entries.setdefault(entry, []).append(path)
        elif ext.lower() in VIDEO_EXTS:
            entries.setdefault(stem, []).append(path)
    doubled = [
        f"{name} ({', '.join(os.path.basename(p) for p in paths)})" for name, paths in entries.items() if len(paths) > 1
    ]
    if doubled:
        raise helpers.UserError(f"{folder}: more than one video or frame folder for camera {'; '.join(doubled)}")
    missing, extra = [n for n in names if n not in entries], [n for n in entries if n not in names]
    if missing or extra:
        problems = ([f"no video or frame folder for {', '.join(missing)}"] if missing else []) + (
            [f"{', '.join(extra)} {'is' if len(extra) == 1 else 'are'} not in {what}"] if extra else []
        )
        raise helpers.UserError(
            f"{what} lists {len(names)} cameras, {folder} holds {len(entries)} videos or frame "
            f"folders: {'; '.join(problems)} (a camera's video is <name>.mp4 or a folder <name>/)"
        )
    return {name: entries[name][0] for name in names}


def list_frames(folder):
    """{number in the file name: path} of the .jpg/.png files in a folder."""
    files = {}
    for entry in os.listdir(folder):
        stem, ext = os.path.splitext(entry)
        if ext.lower() not in FRAME_EXTS:
            continue
        digits = re.findall(r"\d+", stem)
        if not digits:
            raise helpers.UserError(
                f"{os.path.join(folder, entry)}: a frame's file name must hold its number (e.g. 000012.jpg)"
            )
        number = int(digits[-1])
        if number in files:
            raise helpers.UserError(
                f"{folder}: {os.path.basename(files[number])} and {entry} have the same number {number}"
            )
        files[number] = os.path.join(folder, entry)
    if not files:
        raise helpers.UserError(f"{folder} holds no .jpg or .png frames")
    return files


def numbered_folders(paths):
    """{name: {frame index: file}} of frame folders {name: path}; index 0 is the smallest number in
    any of them, so that a camera that lacks its first frames is not shifted in time."""
    files = {name: list_frames(path) for name, path in paths.items()}
    base = min(min(f) for f in files.values()) if files else 0
    return {name: {n - base: p for n, p in f.items()} for name, f in files.items()}


def ffmpeg_reason(error):
    """The last line of ffmpeg's output in an imageio-ffmpeg error: what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and "===" not in line]
    return lines[-1] if lines else type(error).__name__


def probe_video(path, count):
    """{'size': (w, h), 'fps', 'count': number of frames (None unless count)} of a video."""
    try:
        reader = imageio_ffmpeg.read_frames(path)
        meta = next(reader)
        reader.close()
        frames = imageio_ffmpeg.count_frames_and_secs(path)[0] if count else None
    except (OSError, RuntimeError, StopIteration) as e:
        raise helpers.UserError(f"video {path} cannot be read ({ffmpeg_reason(e)})")
    if count and not frames:
        raise helpers.UserError(f"video {path} holds no frames")
    return {"size": tuple(meta["size"]), "fps": meta.get("fps"), "count": frames}


def probe(source, count):
    """probe_video's dict for a source: {'path', 'files': {index: file} for a frame folder, else None}."""
    if source["files"] is None:
        return probe_video(source["path"], count)
    first = source["files"][min(source["files"])]
    return {"size": image_size(first), "fps": None, "count": max(source["files"]) + 1}


def image_size(path):
    try:
        with Image.open(path) as f:
            return f.size
    except OSError as e:
        raise helpers.UserError(f"image {path} cannot be read ({e})")


def read_image(path, mode="RGB"):
    """uint8 [H, W, 3] (mode RGB) or [H, W] (mode L) of an image file."""
    try:
        with Image.open(path) as f:
            return np.asarray(f.convert(mode))
    except OSError as e:
        raise helpers.UserError(f"image {path} cannot be read ({e})")


def video_frames(path, wanted, stop):
    """Yield (frame index, uint8 [H, W, 3]) for the increasing frame indices `wanted` of a video,
    decoding from the start (seeking is not frame-exact in every container); stops early when the
    event `stop` is set."""
    reader = imageio_ffmpeg.read_frames(path)
    pending = list(wanted)
    index = -1
    try:
        width, height = next(reader)["size"]
        for index, raw in enumerate(reader):
            if not pending or stop.is_set():
                return
            if index == pending[0]:
                pending.pop(0)
                yield index, np.frombuffer(raw, np.uint8).reshape(height, width, 3)
    except (OSError, RuntimeError, StopIteration) as e:
        raise helpers.UserError(f"video {path} cannot be decoded after frame {index} ({ffmpeg_reason(e)})")
    finally:
        reader.close()
    if pending and not stop.is_set():
        raise helpers.UserError(
            f"frames missing: video {path} ends after frame {index}, frame {pending[0]} was "
            f"asked for; lower --last or the camera's offset"
        )


# ---------------------------------------------------------------- lens and size


def distort(x, y, dist):
    """Where the lens puts normalised pinhole coordinates x, y (arrays of one shape): OpenCV's model
    with radial (rational), and tangential terms; COLMAP's OPENCV / FULL_OPENCV are the same.
    dist: k1, k2, p1, p2, k3, k4, k5, k6."""
    k1, k2, p1, p2, k3, k4, k5, k6 = dist
    r2 = x * x + y * y
    radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x), y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)


def undistortion_grid(k, dist, size):
    """grid_sample grid [1, H, W, 2] that fetches each pixel of the pinhole image (intrinsics k, size
    (w, h)) from the frame taken through the lens."""
    w, h = size
    # k counts from the image corner (pixel centres at +0.5), as grid_sample with align_corners=False
    x = ((np.arange(w) + 0.5 - k[0, 2]) / k[0, 0])[None, :]
    y = ((np.arange(h) + 0.5 - k[1, 2]) / k[1, 1])[:, None]
    xd, yd = distort(np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)), dist)
    u, v = xd * k[0, 0] + k[0, 2], yd * k[1, 1] + k[1, 2]
    return torch.from_numpy(np.stack([2 * u / w - 1, 2 * v / h - 1], -1)[None]).float()


def output_geometry(camera, downscale):
    """(size (w, h) of the written images, their intrinsics k [3, 3]) for a camera and --downscale."""
    w, h = camera["size"]
    size = (max(1, round(w / downscale)), max(1, round(h / downscale)))
    return size, helpers.scale_intrinsics(camera["k"], (w, h), size)


def transform(image, grid, size, nearest=False):
    """uint8 [H, W] or [H, W, 3] frame -> undistorted through `grid` (None: none) and resized to
    size (w, h) by area averaging; nearest: a mask (no blending across its edge when undistorting)."""
    if grid is not None:
        # torch.tensor copies: decoded frames are read-only buffers
        x = torch.tensor(image, dtype=torch.float32).reshape(*image.shape[:2], -1).permute(2, 0, 1)
        x = F.grid_sample(
            x[None], grid, mode="nearest" if nearest else "bilinear", padding_mode="border", align_corners=False
        )
        image = x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy().reshape(image.shape)
    if (image.shape[1], image.shape[0]) != size:
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    return image


# ---------------------------------------------------------------- masks


def background_frames(paths):
    """uint8 [N, H, W, 3]: up to BACKGROUND_FRAMES of the image files `paths`, spread evenly. Read
    from the written frames, so that a rerun that only adds masks gets the same background."""
    picks = np.unique(np.linspace(0, len(paths) - 1, min(len(paths), BACKGROUND_FRAMES)).round().astype(int))
    return np.stack([read_image(paths[i]) for i in picks])


def stable_values(stack, tolerance, count=BACKGROUND_VALUES):
    """The `count` values each pixel holds most often over the frames stack [N, H, W, 3] uint8:
    frames within `tolerance` (in every channel) of one frame hold its value; the frame with the
    most such frames gives the most frequent value, whose frames are set aside, then the next one's
    among the others, and so on. -> (values [count, H, W, 3] float32, each the mean of its frames;
    frames [count, H, W] int, how many hold it; first, last [count, H, W] int, the first and the last
    of them, in stack order)."""
    values = np.zeros((count, *stack.shape[1:]), np.float32)
    frames, first, last = (np.zeros((count, *stack.shape[1:3]), int) for _ in range(3))
    for row in range(0, stack.shape[1], 32):  # in bands: the frame-to-frame comparisons are [N, N, band, W]
        x = stack[:, row : row + 32].astype(np.int16)
        near = np.stack([np.abs(x - x[i]).max(-1) <= tolerance for i in range(len(x))])  # [N, N, band, W]
        taken = np.zeros(x.shape[:3], bool)
        for k in range(count):
            support = np.where(taken, -1, (near & ~taken[None]).sum(1))  # [N, band, W]
            mine = np.take_along_axis(near, support.argmax(0)[None, None], 0)[0] & ~taken
            values[k, row : row + 32] = (x * mine[..., None]).sum(0) / np.maximum(mine.sum(0), 1)[..., None]
            frames[k, row : row + 32] = mine.sum(0)
            first[k, row : row + 32] = mine.argmax(0)
            last[k, row : row + 32] = len(x) - 1 - mine[::-1].argmax(0)
            taken |= mine
    return values, frames, first, last


def surroundings(values, lasting, reference, ys, xs):
    """How the spots (ys, xs) [M] compare with what is around them: pixels of `reference` [H, W]
    sampled on SURROUNDING_RAYS rays out of each spot, at SURROUNDING_REACH times its distance to
    the nearest such pixel. -> (gaps [K, M]: for each value of values [K, H, W, 3], its largest
    channel difference to the nearest sample, inf where it is not `lasting` [K, H, W] or no sample
    lies in the image; colours [M, 3] float32: the samples' median, the spot's value without one)."""
    reach = ndimage.distance_transform_edt(~reference)[ys, xs]
    angles = np.linspace(0, 2 * np.pi, SURROUNDING_RAYS, endpoint=False)
    radii = reach[:, None] * np.array(SURROUNDING_REACH)  # [M, radii]
    height, width = reference.shape
    gaps, colours = np.full((len(values), len(ys)), np.inf), values[0, ys, xs].copy()
    for start in range(0, len(ys), 16384):  # in chunks: the differences are [K, chunk, samples, 3]
        chunk = slice(start, start + 16384)
        y, x, r = ys[chunk], xs[chunk], radii[chunk]
        sy = np.round(y[:, None, None] + r[..., None] * np.sin(angles)).astype(int).reshape(len(y), -1)
        sx = np.round(x[:, None, None] + r[..., None] * np.cos(angles)).astype(int).reshape(len(y), -1)
        inside = (sy >= 0) & (sy < height) & (sx >= 0) & (sx < width)
        sy, sx = np.where(inside, sy, 0), np.where(inside, sx, 0)
        usable = inside & reference[sy, sx]  # [chunk, samples]
        samples = values[0][sy, sx]  # [chunk, samples, 3]
        differences = np.abs(values[:, y, x, None] - samples[None]).max(-1)  # [K, chunk, samples]
        gaps[:, chunk] = np.where(lasting[:, y, x], np.where(usable[None], differences, np.inf).min(-1), np.inf)
        seen = usable.any(1)
        colours[start + np.nonzero(seen)[0]] = np.nanmedian(np.where(usable[seen, :, None], samples[seen], np.nan), 1)
    return gaps, colours


def estimate_background(stack, threshold):
    """Background uint8 [H, W, 3] of a camera from its frames stack [N, H, W, 3] uint8, without a
    clean plate. A pixel's background is the value it holds most often (stable_values), unless
    another value lasts too (at least BACKGROUND_SHARE of the frames): something rested there for a
    while and then left, or came and stayed. Which one is the background, time alone cannot tell;
    the surroundings can: it is the one whose colour the pixels around show (those that hold one
    value only, sampled on rays out of the spot; the most frequent one where none is nearer).
    Where a resting object left or came, part of its spot may never have been empty (it moved
    over itself): no value there is within `threshold` of the surroundings, and the background is
    the surroundings' colour. Where no value is like the surroundings and nothing beside it left or
    came for good (an object that never moves, or spins in place: its corners come and go), a pixel
    keeps its most frequent value."""
    # within half the threshold of one frame: no value spans more than the threshold, so none mixes
    # what the masks tell apart (an object's shades, the floor beside it, the blurred edge between)
    values, frames, first, last = stable_values(stack, threshold / 2)
    lasting = frames >= max(2, BACKGROUND_SHARE * len(stack))
    lasting[0] = True
    several = lasting[1:].any(0)
    # a spot's edge holds part of what rested there, and what it encloses was never seen empty
    spots = ndimage.binary_fill_holes(ndimage.binary_dilation(several, iterations=2))
    background = values[0].copy()
    if not several.any() or spots.all():
        return background.round().astype(np.uint8)
    ys, xs = np.nonzero(spots)
    gaps, colours = surroundings(values, lasting, ~spots, ys, xs)
    chosen = gaps.argmin(0)  # [M]; ties (and no sample): the most frequent
    background[ys, xs] = values[chosen, ys, xs]
    like = gaps.min(0) <= threshold
    # a value lasted here that the surroundings do not show, all before or all after the one they do:
    # something rested here and left, or came and stayed (one that spins in place comes and goes)
    shown_first, shown_last = first[chosen, ys, xs], last[chosen, ys, xs]
    apart = (last[:, ys, xs] < shown_first) | (first[:, ys, xs] > shown_last)  # [K, M]
    left, unseen = np.zeros_like(spots), np.zeros_like(spots)
    left[ys, xs] = like & several[ys, xs] & ((gaps > threshold) & np.isfinite(gaps) & apart).any(0)
    unseen[ys, xs] = ~like
    labels, _ = ndimage.label(left | unseen, np.ones((3, 3)))
    covered = ~like & np.isin(labels[ys, xs], labels[left])  # [M]: never empty, beside what left
    background[ys[covered], xs[covered]] = colours[covered]
    return background.round().astype(np.uint8)


def foreground_mask(frame, background, threshold, radius):
    """bool [H, W]: where some channel of frame [H, W, 3] differs from background [H, W, 3] by more
    than threshold (0-255), cleaned by an opening and a closing with a square of 2 radius + 1
    pixels and without blobs smaller than MIN_BLOB_FRACTION of the image."""
    mask = (np.abs(frame.astype(np.int16) - background.astype(np.int16)).max(-1) > threshold).astype(np.uint8)
    # square min/max filters run as two 1-D passes (a disk would take 10x longer at 2 megapixels); the
    # image's edge is extended, so the closing does not eat foreground that touches it
    size = 2 * radius + 1
    opened = ndimage.maximum_filter(ndimage.minimum_filter(mask, size, mode="nearest"), size, mode="nearest")
    mask = ndimage.minimum_filter(ndimage.maximum_filter(opened, size, mode="nearest"), size, mode="nearest") > 0
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= MIN_BLOB_FRACTION * mask.size
    keep[0] = False
    return keep[labels]


def save_mask(path, mask):
    helpers.atomic_write(path, lambda tmp: Image.fromarray(mask).save(tmp, format="PNG"))


# ---------------------------------------------------------------- one camera


def write_frames(source, frames, todo, paths, camera, grid, size, stop, advance):
    """Write the images of timesteps `todo` (frame indices `frames` [T] of the source) to `paths` [T]."""
    if source["files"] is None:
        by_frame = {frames[t]: t for t in todo}
        for index, frame in video_frames(source["path"], sorted(by_frame), stop):
            save_jpeg(paths[by_frame[index]], transform(frame, grid, size))
            advance()
        return
    for t in todo:
        if stop.is_set():
            return
        file = source["files"][frames[t]]
        if image_size(file) != camera["size"]:
            raise helpers.UserError(
                f"{file} is {'x'.join(map(str, image_size(file)))}, camera {camera['name']}'s "
                f"frames are {camera['size'][0]}x{camera['size'][1]}"
            )
        if grid is None and size == camera["size"] and os.path.splitext(file)[1].lower() in (".jpg", ".jpeg"):
            helpers.atomic_write(paths[t], lambda tmp: shutil.copyfile(file, tmp))  # no second JPEG loss
        else:
            save_jpeg(paths[t], transform(read_image(file), grid, size))
        advance()


def save_jpeg(path, rgb):
    helpers.atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="JPEG", quality=JPEG_QUALITY))


def write_masks(camera, todo, im_paths, seg_paths, mask_files, frames, plate, grid, size, args, stop, advance):
    """Write the masks of timesteps `todo`: the user's (mask_files {frame index: file}) or by
    background subtraction. -> how they were made (for the log)."""
    if mask_files is not None:
        for t in todo:
            if stop.is_set():
                return ""
            if frames[t] not in mask_files:
                raise helpers.UserError(
                    f"--masks: no mask for frame {frames[t]} of camera {camera['name']} (timestep {t})"
                )
            mask = read_image(mask_files[frames[t]], "L")
            if (mask.shape[1], mask.shape[0]) != camera["size"]:
                raise helpers.UserError(
                    f"mask {mask_files[frames[t]]} is {mask.shape[1]}x{mask.shape[0]}, camera "
                    f"{camera['name']}'s frames are {camera['size'][0]}x{camera['size'][1]}"
                )
            fg = mask > (127 if mask.max() > 1 else 0)  # 8-bit masks and 0/1 masks alike
            save_mask(seg_paths[t], transform(fg.astype(np.uint8) * 255, grid, size, nearest=True) > 127)
            advance()
        return "your masks"
    if plate is not None:
        plate_image = read_image(plate)
        if (plate_image.shape[1], plate_image.shape[0]) != camera["size"]:
            raise helpers.UserError(
                f"clean plate {plate} is {plate_image.shape[1]}x{plate_image.shape[0]}, camera "
                f"{camera['name']}'s frames are {camera['size'][0]}x{camera['size'][1]}"
            )
        background, how = transform(plate_image, grid, size), f"subtraction of the clean plate {plate}"
    else:
        background = estimate_background(background_frames(im_paths), args.threshold)
        how = f"subtraction of the background of {min(len(im_paths), BACKGROUND_FRAMES)} frames"
    radius = args.mask_radius if args.mask_radius is not None else max(1, round(min(size) / 256))
    for t in todo:
        if stop.is_set():
            return ""
        save_mask(seg_paths[t], foreground_mask(read_image(im_paths[t]), background, args.threshold, radius))
        advance()
    return how


def prepare_camera(cam_id, camera, source, frames, mask_files, plate, out, args, stop, advance):
    """Write ims/<cam_id>/ and seg/<cam_id>/ of one camera, skipping files already there (unless
    --overwrite). -> (log line, warnings list); (None, []) when stopped."""
    if stop.is_set():
        return None, []
    grid = undistortion_grid(camera["k"], camera["dist"], camera["size"]) if camera["dist"] is not None else None
    size, _ = output_geometry(camera, args.downscale)
    im_paths = [os.path.join(out, "ims", str(cam_id), f"{t:06d}.jpg") for t in range(len(frames))]
    seg_paths = [helpers.seg_path(out, f"{cam_id}/{t:06d}.jpg") for t in range(len(frames))]
    todo = [t for t, p in enumerate(im_paths) if args.overwrite or not os.path.isfile(p)]
    advance(len(frames) - len(todo))
    write_frames(source, frames, todo, im_paths, camera, grid, size, stop, advance)
    seg_todo = [t for t, p in enumerate(seg_paths) if args.overwrite or t in todo or not os.path.isfile(p)]
    advance(len(frames) - len(seg_todo))
    how = (
        write_masks(camera, seg_todo, im_paths, seg_paths, mask_files, frames, plate, grid, size, args, stop, advance)
        if seg_todo
        else "masks already there"
    )
    if stop.is_set():
        return None, []
    fractions = np.array([float(helpers.load_mask(p).mean()) for p in seg_paths])
    name = camera["name"]
    line = (
        f"{name} -> id {cam_id}: {len(todo)} frames written, {len(frames) - len(todo)} already there; "
        f"foreground {fractions.mean():.1%} of the image (per frame {fractions.min():.1%}..{fractions.max():.1%}), "
        f"{how}"
    )
    warnings = []
    if fractions.mean() < EMPTY_FRACTION:
        warnings.append(
            f"camera {name}: the masks are (almost) empty: does it see what moves? (lower --threshold, or give --masks)"
        )
    elif fractions.mean() > FULL_FRACTION:
        warnings.append(
            f"camera {name}: the masks cover almost everything: did the camera or the light move? "
            f"(give a clean plate with --background, raise --threshold, or give --masks)"
        )
    return line, warnings


# ---------------------------------------------------------------- the whole capture


def read_input(args):
    """(cameras in the input's order, {name: {'path', 'files'}} their frame sources, where the
    cameras come from (for messages))."""
    if args.dynerf:
        cameras, paths = read_dynerf(args.dynerf)
        what = os.path.join(args.dynerf, "poses_bounds.npy")
    else:
        cameras = read_cameras_file(args.cameras) if args.cameras else read_colmap(args.colmap)
        what = args.cameras or os.path.join(args.colmap, "images.txt")
        paths = find_inputs(args.videos, [c["name"] for c in cameras], what)
    folders = numbered_folders({name: path for name, path in paths.items() if os.path.isdir(path)})
    return cameras, {name: {"path": path, "files": folders.get(name)} for name, path in paths.items()}, what


def camera_offsets(cameras, spec):
    """Frame offset per camera [C]: --offsets NAME=K,... over the cameras file's, else 0."""
    offsets = {c["name"]: c["offset"] or 0 for c in cameras}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, _, value = item.rpartition("=")
        if name not in offsets or not re.fullmatch(r"[+-]?\d+", value.strip()):
            raise helpers.UserError(f"--offsets: {item!r} is not NAME=FRAMES with NAME one of {', '.join(offsets)}")
        offsets[name] = int(value)
    return [offsets[c["name"]] for c in cameras]


def timeline(args, cameras, sources, probes, offsets):
    """Source frame index of each camera at each timestep [C][T]: --first/--last/--every/--fps on
    the frames of a camera with offset 0, each camera shifted by its offset; UserError naming the
    camera and frame when one is missing."""
    if args.fps:
        rates = {c["name"]: p["fps"] for c, p in zip(cameras, probes)}
        if not all(rates.values()):
            folders = ", ".join(n for n, r in rates.items() if not r)
            raise helpers.UserError(f"--fps needs videos (frame folders carry no frame rate: {folders}); use --every")
        if max(rates.values()) > 1.01 * min(rates.values()):
            listed = ", ".join(f"{n} {r:g}" for n, r in rates.items())
            raise helpers.UserError(
                f"the videos differ in frame rate ({listed}): --fps and --offsets count frames "
                f"of one rate; re-encode them first"
            )
        step = min(rates.values()) / args.fps
        if step < 1:
            raise helpers.UserError(
                f"--fps {args.fps:g} is above the videos' {min(rates.values()):g} frames per second"
            )
    else:
        step = args.every
    last = args.last
    if last is None:  # the last frame every camera has
        last = min(p["count"] - 1 - off for p, off in zip(probes, offsets))
    reference = []
    while (frame := args.first + math.floor(len(reference) * step + 0.5)) <= last:
        reference.append(frame)
    if not reference:
        raise helpers.UserError(
            f"frames {args.first}..{last} hold no timestep (the shortest camera, offsets "
            f"included, ends at frame {last}); lower --first"
        )
    frames = [[f + off for f in reference] for off in offsets]
    for camera, source, probe_, own in zip(cameras, sources, probes, frames):
        if own[0] < 0:
            raise helpers.UserError(
                f"frames missing: camera {camera['name']} (offset {own[0] - reference[0]}) has no "
                f"frame {own[0]}; raise --first"
            )
        if source["files"] is not None:
            missing = [f for f in own if f not in source["files"]]
            if missing:
                raise helpers.UserError(
                    f"frames missing in camera {camera['name']}: {source['path']} has no frame "
                    f"{', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''} "
                    f"(frames are numbered from the smallest number in any folder)"
                )
        elif probe_["count"] is not None and own[-1] >= probe_["count"]:
            raise helpers.UserError(
                f"frames missing: video {source['path']} has {probe_['count']} frames, timestep "
                f"{len(own) - 1} needs frame {own[-1]}; lower --last"
            )
    return frames


def test_camera_ids(cameras, spec):
    """Ids of the test cameras: --test-cams NAME,NAME, else the first camera."""
    names = [c["name"] for c in cameras]
    wanted = [s.strip() for s in (spec or names[0]).split(",") if s.strip()]
    unknown = [w for w in wanted if w not in names]
    if unknown or not wanted:
        raise helpers.UserError(
            f"--test-cams: {', '.join(unknown) or 'no camera'} not among the cameras {', '.join(names)}"
        )
    ids = sorted({names.index(w) for w in wanted})
    if len(ids) == len(names):
        raise helpers.UserError(f"--test-cams takes all {len(names)} cameras: leave at least one to train on")
    return ids


def write_metas(out, cameras, test_ids, num_t, args):
    """train_meta.json and test_meta.json (the format helpers.load_meta reads) of the written images."""
    size, _ = output_geometry(cameras[0], args.downscale)
    ks = [output_geometry(c, args.downscale)[1].tolist() for c in cameras]
    for split, ids in (("train", [c for c in range(len(cameras)) if c not in test_ids]), ("test", test_ids)):
        helpers.save_json(
            os.path.join(out, f"{split}_meta.json"),
            {
                "w": size[0],
                "h": size[1],
                "k": [[ks[c] for c in ids]] * num_t,
                "w2c": [[cameras[c]["w2c"].tolist() for c in ids]] * num_t,
                "fn": [[f"{c}/{t:06d}.jpg" for c in ids] for t in range(num_t)],
                "cam_id": [ids] * num_t,
            },
        )


def check_record(path, record, overwrite):
    """Refuse to mix outputs of other settings into `path`'s folder; then write the record."""
    if os.path.isfile(path) and not overwrite:
        with open(path) as f:
            old = json.load(f)
        changed = [key for key in record if old.get(key) != record[key]]
        if changed:
            raise helpers.UserError(
                f"{os.path.dirname(path)} was prepared with other {', '.join(changed)} (see "
                f"{path}); write to another -o folder, or pass --overwrite to write everything "
                f"again"
            )
    helpers.save_json(path, record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    given = parser.add_argument_group("input (--videos with --cameras or --colmap, or --dynerf) and output")
    given.add_argument("--videos", metavar="DIR", help="one video <name>.mp4 or frame folder <name>/ per camera")
    given.add_argument("--cameras", metavar="FILE", help="cameras file, JSON or YAML (format above)")
    given.add_argument("--colmap", metavar="SPARSE_DIR", help="COLMAP text model: cameras.txt, images.txt")
    given.add_argument("--dynerf", metavar="SCENE_DIR", help="DyNeRF scene: cam00.mp4 ... camNN.mp4, poses_bounds.npy")
    given.add_argument(
        "-o",
        "--out",
        required=True,
        metavar="DIR",
        help="sequence folder to write, under data/, output/ or results/, e.g. data/<seq>",
    )
    given.add_argument(
        "--test-cams",
        metavar="NAME,NAME",
        help="cameras held out for evaluation (default: the first camera, cam00 in DyNeRF)",
    )
    timing = parser.add_argument_group("time")
    timing.add_argument("--first", type=int, default=0, help="first frame (default: %(default)s)")
    timing.add_argument(
        "--last",
        type=int,
        default=None,
        help="last frame, included (default: the last that every camera has; giving it saves "
        "counting the frames of each video)",
    )
    step = timing.add_mutually_exclusive_group()
    step.add_argument("--every", type=int, default=1, metavar="N", help="take every N-th frame (default: %(default)s)")
    step.add_argument(
        "--fps",
        type=float,
        default=None,
        help="timesteps per second instead of --every (videos only: the nearest frame)",
    )
    timing.add_argument(
        "--offsets",
        metavar="NAME=K,...",
        help="time alignment: camera NAME's frame K+j shows the instant of frame j of a camera "
        "with offset 0 (overrides the cameras file's 'offset'; default 0)",
    )
    parser.add_argument(
        "--world-scale",
        type=float,
        default=1.0,
        metavar="S",
        help="multiply world units by S (a COLMAP model's scale is arbitrary; stage 1 clips what is "
        "nearer than 1 unit to a camera; default: %(default)s)",
    )
    parser.add_argument(
        "--downscale",
        type=float,
        default=1.0,
        metavar="F",
        help="write images this many times smaller, by area averaging (default: %(default)s)",
    )
    masks = parser.add_argument_group("masks")
    masks.add_argument(
        "--masks",
        metavar="DIR",
        help="your masks, used as they are: DIR/<name>/ per camera, numbered like its frames (white or 1 = foreground)",
    )
    masks.add_argument(
        "--background",
        metavar="DIR",
        help="clean plates: DIR/<name>.jpg or .png, one frame of the empty scene per camera (a "
        "camera without one gets a background estimated from its frames)",
    )
    masks.add_argument(
        "--threshold",
        type=float,
        default=40.0,
        metavar="T",
        help="foreground where a channel differs from the background by more than this, 0-255 (default: %(default)s)",
    )
    masks.add_argument(
        "--mask-radius",
        type=int,
        default=None,
        metavar="R",
        help="radius in pixels of the opening and closing (default: image height or width / 256)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="cameras prepared at once, in threads (ffmpeg, JPEG coding and numpy release Python's "
        f"lock); each holds up to {BACKGROUND_FRAMES} frames for its background "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write every file again, even where the folder was prepared with other settings",
    )
    args = parser.parse_args(argv)
    if (
        bool(args.dynerf) == bool(args.videos)
        or (args.videos and bool(args.cameras) == bool(args.colmap))
        or (args.dynerf and (args.cameras or args.colmap))
    ):
        raise helpers.UserError(
            "give --videos DIR with one of --cameras FILE or --colmap SPARSE_DIR, or --dynerf "
            "SCENE_DIR alone (python prepare_sequence.py --help)"
        )
    if args.every < 1 or args.downscale < 1 or args.workers < 1 or (args.fps or 1) <= 0 or args.world_scale <= 0:
        raise helpers.UserError(
            "--every, --downscale and --workers must be at least 1, --fps and --world-scale above 0"
        )
    if args.first < 0 or (args.last is not None and args.last < args.first):
        raise helpers.UserError(f"--first {args.first} / --last {args.last}: frames count from 0 and last >= first")
    if args.mask_radius is not None and args.mask_radius < 1:
        raise helpers.UserError("--mask-radius must be at least 1 pixel")
    helpers.check_output(
        "-o", args.out, f"-o {helpers.DATA_DIR}/{os.path.basename(os.path.abspath(args.out))}", folder=True
    )
    return args


def find_plates(folder, names):
    """{name: clean plate file or None} for --background: <folder>/<name>.jpg, .jpeg or .png."""
    plates = {}
    for name in names:
        found = [path for path in (os.path.join(folder, name + ext) for ext in FRAME_EXTS) if os.path.isfile(path)]
        plates[name] = found[0] if found else None
    return plates


def check_sizes(cameras, sources, probes, what, downscale):
    """UserError unless each camera's frames have the size its calibration says and all cameras give
    images of one size after --downscale. -> that size (w, h)."""
    for camera, probe_ in zip(cameras, probes):
        if probe_["size"] != camera["size"]:
            raise helpers.UserError(
                f"camera {camera['name']}: the frames of {sources[camera['name']]['path']} are "
                f"{probe_['size'][0]}x{probe_['size'][1]}, {what} says "
                f"{camera['size'][0]}x{camera['size'][1]}"
            )
    sizes = {c["name"]: output_geometry(c, downscale)[0] for c in cameras}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{n} {w}x{h}" for n, (w, h) in sizes.items())
        raise helpers.UserError(
            f"the cameras' images differ in size ({listed}): a sequence has one image size; "
            f"resize the videos (and their intrinsics) to one"
        )
    return next(iter(sizes.values()))


def prepare_all(cameras, sources, frames, mask_files, plates, out, args):
    """prepare_camera for every camera, one thread each (at most --workers at once), with one
    progress bar; the first failure stops the others and is raised."""
    stop = threading.Event()
    lock = threading.Lock()
    bar = helpers.progress(total=2 * len(cameras) * len(frames[0]), unit="image", desc="preparing")  # ims + seg

    def advance(n=1):
        with lock:  # the cameras' threads share the bar
            bar.update(n)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one camera per thread; grid_sample's own threads would only compete
    try:
        with ThreadPoolExecutor(min(args.workers, len(cameras))) as pool:
            jobs = [
                pool.submit(
                    prepare_camera,
                    c,
                    camera,
                    sources[camera["name"]],
                    frames[c],
                    None if mask_files is None else mask_files[camera["name"]],
                    plates.get(camera["name"]),
                    out,
                    args,
                    stop,
                    advance,
                )
                for c, camera in enumerate(cameras)
            ]
            try:
                for done, job in enumerate(as_completed(jobs), 1):
                    line, warnings = job.result()
                    tqdm.write(f"[{done}/{len(cameras)}] {line}")
                    for warning in warnings:
                        tqdm.write(f"warning: {warning}", file=sys.stderr)
            except BaseException:
                stop.set()  # the running cameras stop at their next frame, the others do not start
                pool.shutdown(cancel_futures=True)
                raise
    finally:
        torch.set_num_threads(threads)
        bar.close()


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    out = os.path.normpath(args.out)
    cameras, sources, what = read_input(args)
    cameras = scale_world(cameras, args.world_scale)
    names = [c["name"] for c in cameras]
    if len(cameras) < 2:
        raise helpers.UserError(f"{what}: {len(cameras)} camera; at least two are needed (one to train, one to test)")
    test_ids = test_camera_ids(cameras, args.test_cams)
    offsets = camera_offsets(cameras, args.offsets)
    mask_files = numbered_folders(find_inputs(args.masks, names, what, "--masks")) if args.masks else None
    plates = find_plates(args.background, names) if args.background else {}
    with ThreadPoolExecutor(args.workers) as pool:  # counting a video's frames decodes it: in parallel
        probes = list(pool.map(lambda name: probe(sources[name], args.last is None), names))
    size = check_sizes(cameras, sources, probes, what, args.downscale)
    frames = timeline(args, cameras, [sources[n] for n in names], probes, offsets)
    num_t = len(frames[0])
    check_record(
        os.path.join(out, "prepare_sequence.json"),
        {
            "input": {
                key: os.path.abspath(value)
                for key, value in vars(args).items()
                if key in ("videos", "cameras", "colmap", "dynerf", "masks", "background") and value
            },
            "cameras": names,
            "test_cameras": [names[c] for c in test_ids],
            "frames": dict(zip(names, frames)),
            "downscale": args.downscale,
            "world_scale": args.world_scale,
            "masks": "yours" if args.masks else {"threshold": args.threshold, "mask_radius": args.mask_radius},
        },
        args.overwrite,
    )
    tqdm.write(
        f"{len(cameras)} cameras ({', '.join(names[c] for c in test_ids)} for testing) x {num_t} timesteps "
        f"(frames {frames[0][0]}..{frames[0][-1]}, step {args.every if not args.fps else f'{args.fps:g} fps'}) "
        f"from {what} -> {out}"
    )
    for warning in world_frame_warnings(cameras):
        tqdm.write(f"warning: {warning}", file=sys.stderr)
    prepare_all(cameras, sources, frames, mask_files, plates, out, args)
    write_metas(out, cameras, test_ids, num_t, args)
    print(
        f"wrote {out}: {len(cameras) - len(test_ids)} train + {len(test_ids)} test cameras, {num_t} timesteps, "
        f"{size[0]}x{size[1]}, in {time.time() - started:.0f} s; next: python train_d3dgs.py -s {out}"
    )


if __name__ == "__main__":
    helpers.run_main(main)
