"""Stage 1 of 4-LEGS: Dynamic 3D Gaussians (Luiten et al., 3DV 2024) on a PanopticSports-format sequence.

Timestep 0 fits 3D Gaussians to the train cameras from an initial point cloud (the sequence's
init_pt_cld.npz, or one built from its masks and images: point_cloud.py), with 3DGS densification.
Every later timestep starts from the previous one moved on by its velocity (and each foreground
object the new views lost, like a thrown ball at the start of its flight, moved to where their
masks and colours put it) and optimises only positions, rotations and colours, held together on
the foreground by rigidity, rotation-similarity and isometry losses towards the neighbours of
timestep 0; the background is held static.

Outputs, under output/<exp>/<seq>/:
  params.npz     the original's format: means3D, rgb_colors, unnorm_rotations [T, N, .] and the
                 shared seg_colors, logit_opacities, log_scales [N, .], cam_m, cam_c [C, 3]; colours
                 and rotations in float16 (STORED_FLOAT16), the rest in float32
  metrics.json   PSNR / SSIM (LPIPS where its weights are on disk) on the test cameras, per timestep
  timesteps/     one file per finished timestep: a rerun continues after the last one. Once
                 params.npz holds a timestep, its file keeps only its record and the fingerprint
                 of its arrays (they are on disk once, in params.npz)
  init_pt_cld.npz  the point cloud built when the sequence has none
"""

import argparse
import concurrent.futures
import json
import math
import os
import statistics
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

import external
import helpers
import point_cloud

NEAR, FAR = 1.0, 100.0  # training cameras, as the original
SCENE_SIZE_MULT = 1.1
NUM_KNN_RIGID = 20
NEIGHBOUR_FALLOFF = 2000.0  # neighbour weight exp(-falloff d^2), d in world units, as the original
SSIM_SHARE = 0.2  # image and segmentation losses: (1 - share) L1 + share (1 - SSIM), as the original
# Objects that jump between timesteps (a thrown ball starts its flight with zero velocity) lie
# outside the reach of the photometric gradients; each is first moved to where the new timestep's
# masks and colours say it is (relocate_objects):
GROUP_GAP = 3.0  # an object's Gaussians: neighbour links up to this times the median neighbour distance
RELOCATE_REACH = 0.5  # an object may land this share of the scene radius from where its velocity puts it
RELOCATE_MAX_STEPS = 12  # the coarse search: at most this many steps of one object radius each way
RELOCATE_MIN_GAUSSIANS = 32  # smaller groups (stray Gaussians) are too few to score a position
RELOCATE_MARGIN = 0.2  # move only when the share of samples on matching foreground rises by this much
COLOUR_TOLERANCE = 0.25  # mean absolute RGB difference at which a sample stops matching its pixel
RELOCATE_SAMPLES = (64, 256)  # Gaussians per object that score a candidate: coarse search, refinement
FINITE_CHECK_EVERY = 100  # iterations between the NaN/Inf checks (each waits for the GPU once)
PLATEAU = 0.005
"""Default --plateau: a timestep after 0 ends once a block of FINITE_CHECK_EVERY iterations lowers the
mean loss by less than this fraction. Basketball t = 1-5 (NVIDIA H100 80GB): 1,201-1,701 iterations
instead of 2,000, test PSNR 29.118 against 29.133 dB (per timestep -0.057 to +0.035); family seed 1 on
the CPU (t = 1-3): 48% of the iterations, -0.04 dB (docs/performance.md)."""
SEED_STRIDE = 1_000_003  # torch seed of timestep t: seed * stride + t, distinct for every (seed, t < stride)
LEARNING_RATES = {
    "means3D": 0.00016,  # times the scene radius
    "rgb_colors": 0.0025,
    "unnorm_rotations": 0.001,
    "logit_opacities": 0.05,
    "log_scales": 0.001,
    "cam_m": 1e-4,
    "cam_c": 1e-4,
}  # seg_colors and the environment map: fixed
MOVING = ("means3D", "rgb_colors", "unnorm_rotations")  # optimised after timestep 0
STORED_FLOAT16 = ("rgb_colors", "unnorm_rotations")
"""Per-timestep arrays kept in float16 in the timestep files and params.npz (the rest in float32): a
colour or quaternion component below 2 is then off by at most 2^-11, an eighth of an 8-bit level. A
float16 position would be off by up to 2e-3 units at 4-8 units from the origin, so means3D stays
float32. A timestep's 40 bytes per Gaussian become 26 (basketball's 320k Gaussians: 12.2 -> 8.0 MiB).
Each timestep's values are rounded when it finishes (round_stored), so its metrics, the next timestep
and a resumed run all start from what is on disk."""
LOSS_WEIGHTS = {
    "im": 1.0,
    "seg": 3.0,
    "rigid": 4.0,
    "rot": 4.0,
    "iso": 2.0,
    "floor": 2.0,
    "bg": 20.0,
    "soft_col_cons": 0.01,
}
# what each finished timestep records of how it was trained; continuing a run with other values is
# refused (check_settings), retraining from a timestep with -f takes the new ones from there on
TRAINING_SETTINGS = (
    "iters_first",
    "iters",
    "motion_lr_scale",
    "max_gaussians",
    "plateau",
    "seed",
    "fg_points",
    "bg_points",
)
FLOOR_THICKNESS = 0.1  # height / width of a background Gaussian on the floor beyond the cameras (initialize_params)
# The environment map (what lies beyond the Gaussians: a sky, helpers.D3DGS_ENV_MAP; initial_env_map):
# a texel spans this many pixels of the sharpest train camera at its centre, at most ENV_MAX_ROWS rows.
# It is not optimised: trained, it painted the floor's gaps in the train views and a view off the
# rig saw them (family seed 4 at 192x142 on the CPU, t = 0: cameras on / above the ring 33.3 / 29.0
# dB trained, 36.6 / 32.0 fixed).
ENV_TEXEL_PIXELS, ENV_MAX_ROWS = 2.0, 512
# demo: few iterations per timestep, so positions and rotations take bigger steps to keep up with the motion
DEMO = {
    "iters_first": 200,
    "iters": 40,
    "motion_lr_scale": 10.0,
    "downscale": 4,
    "max_gaussians": 16_000,
    "fg_points": 3000,
    "bg_points": 4000,
}


# ---------------------------------------------------------------- data


def load_timestep(seq_dir, meta, test_meta, t, size, test_size):
    """Images of timestep t on the CPU (runs in a worker thread while the previous timestep trains),
    checked against the files' size (w, h) and resized to the (scaled) metas: train ims
    [C, 3, H, W], train seg colours [C, 3, H, W] = (fg, 0, 1 - fg), test ims [C', 3, H, W]."""
    ims = torch.stack([helpers.load_image(os.path.join(seq_dir, "ims", fn), size) for fn in meta["fn"][t]])
    fg = torch.stack([helpers.load_mask(helpers.seg_path(seq_dir, fn), size) for fn in meta["fn"][t]])
    test_ims = torch.stack(
        [helpers.load_image(os.path.join(seq_dir, "ims", fn), test_size) for fn in test_meta["fn"][t]]
    )
    segs = torch.stack([fg, torch.zeros_like(fg), 1 - fg], 1)
    return (
        helpers.resize_images(ims, meta),
        helpers.resize_images(segs, meta),
        helpers.resize_images(test_ims, test_meta),
    )


def get_dataset(loaded, meta, test_meta, t, device):
    """Train views [{'cam', 'im', 'seg', 'id', 'background'}] and test views [{'cam', 'im', 'cam_id',
    'background'}] of timestep t; a train view's id is its index in the metas as a [1] long tensor
    (what get_loss indexes with); 'background' None until add_backgrounds."""
    ims, segs, test_ims = (x.to(device) for x in loaded)
    train = [
        {"cam": cam, "im": ims[c], "seg": segs[c], "id": torch.tensor([c], device=device), "background": None}
        for c, cam in enumerate(helpers.cameras_at(meta, t, NEAR, FAR, device))
    ]
    test = [
        {"cam": cam, "im": test_ims[c], "cam_id": test_meta["cam_id"][c], "background": None}
        for c, cam in enumerate(helpers.cameras_at(test_meta, t, device=device))
    ]
    return train, test


def add_backgrounds(views, env_map):
    """Set each view's (get_dataset's) 'background' [4, H, W]: what it sees behind the Gaussians, the
    environment map in its pixels' directions; None without one (a run begun by older code). The
    map is fixed, so this is done once per view and timestep, not at every iteration."""
    for view in views:
        view["background"] = helpers.view_background(view["cam"], env_map)


def get_batch(todo, dataset, rng):
    """One random train view per iteration, cycling through all of them without replacement."""
    if not todo:
        todo.extend(rng.permutation(len(dataset)).tolist())
    return dataset[todo.pop()]


# ---------------------------------------------------------------- state


def camera_centers(meta):
    """Positions [C, 3] (world) of the cameras at timestep 0."""
    return np.linalg.inv(np.asarray(meta["w2c"][0]))[:, :3, 3]


def scene_radius(meta):
    """SCENE_SIZE_MULT times the largest distance of a camera from the cameras' mean (the scale of
    the learning rates and of densification; that mean is the scene's centre)."""
    centers = camera_centers(meta)
    return SCENE_SIZE_MULT * float(np.linalg.norm(centers - centers.mean(0), axis=1).max())


def initialize_params(init_pt_cld, num_cams, device, cameras=None):
    """init_pt_cld [N, 7] (xyz, rgb, seg) -> params: leaf tensors named as in params.npz (the
    environment map apart: initial_env_map's, set beside them). Scales
    start isotropic at the RMS distance to the 3 nearest neighbours, opacities at 0.5. Given the
    train cameras' positions (cameras [C, 3]), a background point on the floor plane y = 0 beyond
    every camera (point_cloud.ray_origin's reach) starts flat on the floor, FLOOR_THICKNESS of its
    width high: the train cameras see the far floor at a grazing angle, where a round Gaussian
    fits them as well, and it then stands above the horizon of a camera lower than theirs."""
    seg = init_pt_cld[:, 6]
    sq_dist, _ = helpers.knn(init_pt_cld[:, :3], 3)
    log_scales = np.tile(np.log(np.sqrt(sq_dist.mean(-1).clip(min=1e-7)))[:, None], (1, 3))
    if cameras is not None:
        origin, reach, has_floor = point_cloud.ray_origin(torch.as_tensor(np.asarray(cameras), dtype=torch.float32))
        beyond = np.linalg.norm(init_pt_cld[:, :3] - origin.numpy(), axis=1) > reach
        far_floor = has_floor & (seg == 0) & (np.abs(init_pt_cld[:, 1]) < 1e-6) & beyond
        log_scales[far_floor, 1] += np.log(FLOOR_THICKNESS)
    params = {
        "means3D": init_pt_cld[:, :3],
        "rgb_colors": init_pt_cld[:, 3:6],
        "seg_colors": np.stack([seg, np.zeros_like(seg), 1 - seg], -1),
        "unnorm_rotations": np.tile([1.0, 0.0, 0.0, 0.0], (len(seg), 1)),
        "logit_opacities": np.zeros((len(seg), 1)),
        "log_scales": log_scales,
        "cam_m": np.zeros((num_cams, 3)),
        "cam_c": np.zeros((num_cams, 3)),
    }
    return {
        k: torch.tensor(v, dtype=torch.float32, device=device).requires_grad_(k in LEARNING_RATES)
        for k, v in params.items()
    }


def env_map_rows(meta):
    """Rows of the environment map for the train cameras of `meta` (load_meta's): ENV_TEXEL_PIXELS
    pixels of the sharpest camera (largest focal length) a texel, at most ENV_MAX_ROWS."""
    focal = max(max(k[0][0], k[1][1]) for k in meta["k"][0])
    return min(ENV_MAX_ROWS, math.ceil(math.pi * focal / ENV_TEXEL_PIXELS))


def initial_env_map(dataset, rows, gaussians=None):
    """The environment map [4, rows, 2 rows] (helpers.D3DGS_ENV_MAP) training starts from, fixed:
    each texel's colour the mean of the train views' background pixels (dataset: get_dataset's
    train views) that look its way (helpers.ray_directions), and its "open" the share of those
    pixels that the initial Gaussians (gaussians: params2rendervar's of the initial point cloud;
    None: none) cover less than half: where the point cloud placed nothing, a sky at infinity,
    seg counts the light through as background; where it placed the background, Gaussians must
    keep covering it (without that pull a room's background Gaussians were pruned away: family
    seed 5 at 173x110 on the CPU kept 24,165 of 44,430, test PSNR 26.1 dB, against 97,652 and 35.6).
    A texel no view sees takes the values of the nearest one seen at its elevation, or where none
    is, on the nearest elevation with one (a sky changes with elevation more than around it; above
    every view, the sky seen highest); grey and open where no view sees any background."""
    cols = 2 * rows
    device = dataset[0]["im"].device
    sums = torch.zeros(5, rows * cols, device=device)  # colour and open sums, the pixel count per texel
    for view in dataset:
        background = view["seg"][2] > 0.5
        if gaussians is None:
            open_ = torch.ones_like(background)
        else:
            with torch.no_grad():  # the initial Gaussians' opacity (seg's sum) below a half
                open_ = helpers.render_d3dgs(view["cam"], gaussians)[1].sum(0) < 0.5
        grid = helpers.env_map_coordinates(helpers.ray_directions(view["cam"])[background])
        col = ((grid[:, 0] + 1) / 2 * cols).long().clamp(0, cols - 1)
        row = ((grid[:, 1] + 1) / 2 * rows).long().clamp(0, rows - 1)
        values = torch.cat([view["im"][:, background], open_[background][None].float()])
        sums.index_add_(1, row * cols + col, torch.cat([values, torch.ones_like(values[:1])]))
    sums = sums.view(5, rows, cols)
    unseen = (sums[4] == 0).cpu().numpy()
    if unseen.all():
        return torch.tensor([0.5, 0.5, 0.5, 1.0], device=device)[:, None, None].expand(4, rows, cols).clone()
    # the nearest seen texel at the same elevation (around in azimuth: three copies side by side),
    # else on the nearest elevation with one: a step in elevation costs more than any in azimuth
    _, (row, col) = distance_transform_edt(np.tile(unseen, 3), sampling=(3 * cols, 1), return_indices=True)
    row, col = (torch.as_tensor(i[:, cols : 2 * cols], device=device) for i in (row, col % cols))
    return (sums[:4] / sums[4:].clamp(min=1))[:, row, col]


def initial_params(init_pt_cld, meta, dataset, device):
    """Timestep 0's params as training starts them: initialize_params of init_pt_cld [N, 7] with the
    train cameras' positions (meta: load_meta's), and the environment map, initial_env_map of those
    Gaussians over the train views (dataset: get_dataset's)."""
    params = initialize_params(init_pt_cld, len(meta["cam_id"]), device, camera_centers(meta))
    params[helpers.D3DGS_ENV_MAP] = initial_env_map(dataset, env_map_rows(meta), helpers.params2rendervar(params))
    return params


def initialize_optimizer(params, radius, names, no_bias_correction=(), lr_scale=1.0):
    """Adam (eps 1e-15) over params[names]. Groups in no_bias_correction start with zero moments and
    a huge step count, as in the original after timestep 0 (its step counter carries on while it
    resets the moments), which makes the first updates of each timestep several times lr; their
    learning rates are also multiplied by lr_scale."""
    groups = [
        {
            "params": [params[k]],
            "name": k,
            "lr": LEARNING_RATES[k]
            * (radius if k == "means3D" else 1.0)
            * (lr_scale if k in no_bias_correction else 1.0),
        }
        for k in names
    ]
    optimizer = torch.optim.Adam(groups, lr=0.0, eps=1e-15, fused=True)
    for k in no_bias_correction:
        p = params[k]
        optimizer.state[p] = {
            "step": torch.tensor(1e7, dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
    return optimizer


def initialize_post_first_timestep(params):
    """What the later timesteps hold on to, from timestep 0: foreground / background indices, the 20
    nearest foreground neighbours with weights exp(-NEIGHBOUR_FALLOFF d^2) and distances, the background's
    positions and rotations. The returned variables also seed the velocity (zero at t=1)."""
    device = params["means3D"].device
    is_fg = helpers.is_foreground(params["seg_colors"])
    pts = params["means3D"].detach()
    rot = F.normalize(params["unnorm_rotations"].detach())
    fg_idx, bg_idx = torch.nonzero(is_fg)[:, 0], torch.nonzero(~is_fg)[:, 0]
    sq_dist, nbr = (
        helpers.knn(pts[fg_idx].cpu().numpy(), NUM_KNN_RIGID)
        if len(fg_idx)
        else (np.zeros((0, NUM_KNN_RIGID)), np.zeros((0, NUM_KNN_RIGID), int))
    )

    def as_tensor(x, dtype=torch.float32):
        return torch.as_tensor(x, dtype=dtype, device=device).contiguous()

    return {
        "fg_idx": fg_idx,
        "bg_idx": bg_idx,
        "groups": [as_tensor(g, torch.long) for g in object_groups(nbr, np.sqrt(sq_dist))],
        "neighbor_indices": as_tensor(nbr, torch.long),
        "neighbor_weight": as_tensor(np.exp(-NEIGHBOUR_FALLOFF * sq_dist)),
        "neighbor_dist": as_tensor(np.sqrt(sq_dist)),
        "init_bg_pts": pts[bg_idx],
        "init_bg_rot": rot[bg_idx],
        "prev_pts": pts,
        "prev_rot": rot,
    }


def object_groups(nbr, dist):
    """The foreground's objects: connected components of its nearest-neighbour graph (nbr, dist [Nfg, K]:
    neighbour indices into the foreground and distances), links longer than GROUP_GAP times the median
    nearest-neighbour distance cut. Returns a list of index arrays into the foreground, one per object,
    each in a fixed random order (its first Gaussians are the object's samples in relocate_objects)."""
    if len(nbr) == 0:
        return []
    keep = dist <= GROUP_GAP * np.median(dist[:, 0])
    rows = np.repeat(np.arange(len(nbr)), nbr.shape[1])[keep.ravel()]
    graph = coo_matrix((np.ones(len(rows)), (rows, nbr.ravel()[keep.ravel()])), shape=(len(nbr), len(nbr)))
    count, label = connected_components(graph, directed=False)
    rng = np.random.default_rng(0)
    return [rng.permutation(np.flatnonzero(label == g)) for g in range(count)]


def pair_matches(points, colours, candidates, dataset):
    """How well each sample fits the train views at each candidate offset: per (candidate, sample) the
    sum over the views of its match, 1 where it lands in front of the view, inside its image, on a
    pixel that is foreground and of its colour (falling to 0 at COLOUR_TOLERANCE), 0 elsewhere: a
    sample outside a view counts as a miss, so an offset seen by few views cannot win on a few lucky
    pixels. points [P, 3] world, colours [P, 3], candidates [K, 3] offsets -> [K, P]."""
    moved = points[None] + candidates[:, None]  # [K, P, 3]
    hom = torch.cat([moved, torch.ones_like(moved[..., :1])], -1)
    hits = torch.zeros(moved.shape[:2], device=points.device)
    for view in dataset:
        cam = view["cam"]
        h, w = cam.image_height, cam.image_width
        clip = hom @ cam.projmatrix
        depth = clip[..., 3]
        col = ((clip[..., 0] / depth.clamp(min=1e-6) + 1) * w - 1) / 2
        row = ((clip[..., 1] / depth.clamp(min=1e-6) + 1) * h - 1) / 2
        col, row = col.round().long(), row.round().long()
        inside = (depth > 1e-3) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
        pixel = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).flatten()
        fg = view["seg"][0].flatten()[pixel].view_as(depth)
        diff = (view["im"].flatten(1)[:, pixel].T.view(*depth.shape, 3) - colours).abs().mean(-1)
        hits += inside * fg * (1 - diff / COLOUR_TOLERANCE).clamp(min=0)
    return hits


def match_scores(points, colours, candidates, dataset):
    """An object's fit to the train views at each candidate offset: the share of all its (sample,
    view) pairs that match (pair_matches). points [P, 3], colours [P, 3], candidates [K, 3] -> [K]."""
    return pair_matches(points, colours, candidates, dataset).sum(1) / (len(points) * len(dataset))


def group_scores(params, variables, dataset):
    """match_scores of every object (variables['groups']) where it is, all objects in one pass over
    the views: [G] (0 for groups too small to score)."""
    groups, device = variables["groups"], params["means3D"].device
    scored = [i for i, g in enumerate(groups) if len(g) >= RELOCATE_MIN_GAUSSIANS]
    scores = torch.zeros(len(groups), device=device)
    if not scored:
        return scores
    samples = [groups[i][: RELOCATE_SAMPLES[1]] for i in scored]  # each object's samples, as match_scores takes them
    counts = torch.tensor([len(s) for s in samples], device=device)
    rows = variables["fg_idx"][torch.cat(samples).to(device)]
    with torch.no_grad():
        hits = pair_matches(params["means3D"][rows], params["rgb_colors"][rows], scores.new_zeros(1, 3), dataset)[0]
    owner = torch.repeat_interleave(torch.tensor(scored, device=device), counts)
    scores.index_add_(0, owner, hits)
    scores[scored] /= counts * len(dataset)
    return scores


def relocate_objects(params, variables, dataset, reach):
    """Move the foreground objects that the new timestep's views lost: each object (variables['groups'])
    whose match score where its velocity put it fell by RELOCATE_MARGIN from the last timestep's
    (variables['object_scores']; every object when absent) is searched for: a grid of one object radius
    per step, out to `reach` (world units) each way, then two grids three and nine times finer around
    the best. It moves rigidly there when that beats where it was by RELOCATE_MARGIN. Returns how many
    moved."""
    moved = 0
    fg_idx, last = variables["fg_idx"], variables.get("object_scores")
    stays = group_scores(params, variables, dataset).tolist()  # an object's score depends on its own points only
    with torch.no_grad():
        fg_pts, fg_col = params["means3D"][fg_idx], params["rgb_colors"][fg_idx]
        for g, group in enumerate(variables["groups"]):
            if len(group) < RELOCATE_MIN_GAUSSIANS:
                continue
            pts, stay = fg_pts[group], stays[g]
            radius = float((pts - pts.mean(0)).norm(dim=1).max())
            if (last is not None and stay >= last[g] - RELOCATE_MARGIN) or radius <= 0:
                continue
            steps = min(math.ceil(reach / radius), RELOCATE_MAX_STEPS)
            best = torch.zeros(3, device=pts.device)
            for level, (step, count) in enumerate([(radius, steps), (radius / 3, 2), (radius / 9, 2)]):
                sample = group[: RELOCATE_SAMPLES[min(level, 1)]]
                offsets = torch.arange(-count, count + 1, device=pts.device, dtype=pts.dtype) * step
                grid = torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij"), -1).reshape(-1, 3)
                scores = match_scores(fg_pts[sample], fg_col[sample], best + grid, dataset)
                best = best + grid[scores.argmax()]
            if scores.max() >= stay + RELOCATE_MARGIN:
                params["means3D"][fg_idx[group]] += best
                moved += 1
    return moved


def initialize_per_timestep(params, variables):
    """Next timestep's params: every Gaussian moved on by its last velocity (position and rotation),
    the moving ones as fresh leaves; variables record where the previous timestep left things."""
    pts = params["means3D"].detach()
    rot = F.normalize(params["unnorm_rotations"].detach())
    new_pts = pts + (pts - variables["prev_pts"])
    new_rot = F.normalize(rot + (rot - variables["prev_rot"]))
    fg_idx, nbr = variables["fg_idx"], variables["neighbor_indices"]
    fg_pts = pts[fg_idx]
    variables.update(
        prev_inv_rot_fg=helpers.quat_conj(rot[fg_idx]),
        prev_offset=fg_pts[nbr] - fg_pts[:, None],
        prev_col=params["rgb_colors"].detach().clone(),
        prev_pts=pts,
        prev_rot=rot,
    )
    new = {k: v.detach() for k, v in params.items()}
    new.update(means3D=new_pts, unnorm_rotations=new_rot)
    for k in MOVING:
        new[k] = new[k].clone().requires_grad_(True)
    return new, variables


# ---------------------------------------------------------------- losses


def get_loss(params, rendervar, im, seg, data, variables, with_priors, monitor=None):
    """Loss of one train view: im [3, H, W] and seg [3, H, W] as render_d3dgs rendered them against
    data's image and segmentation (L1 and SSIM, im after the camera's colour correction); with_priors
    (timesteps > 0): plus prior_losses. Returns the weighted sum, the terms {name: scalar} (detached)
    and the colour-corrected image; with a monitor (new_monitor), also records the iteration in it
    (watch_loss). Tensors in, tensors out, the same shapes at every iteration (the camera as an index
    tensor, not a Python int), so that torch.compile traces it once as one graph: compiled_loss."""
    cam = data["id"]
    im = helpers.color_correct(im, params["cam_m"].index_select(0, cam)[0], params["cam_c"].index_select(0, cam)[0])
    ssim = external.calc_ssim(torch.stack([im, seg]), torch.stack([data["im"], data["seg"]]), per_image=True)
    losses = {
        "im": (1 - SSIM_SHARE) * helpers.l1_loss(im, data["im"]) + SSIM_SHARE * (1.0 - ssim[0]),
        "seg": (1 - SSIM_SHARE) * helpers.l1_loss(seg, data["seg"]) + SSIM_SHARE * (1.0 - ssim[1]),
    }
    if with_priors:
        losses.update(prior_losses(params, rendervar, variables))
    loss = sum(LOSS_WEIGHTS[k] * v for k, v in losses.items())
    terms = {k: v.detach() for k, v in losses.items()}
    if monitor is not None:
        watch_loss(monitor, loss.detach(), terms)
    return loss, terms, im


def new_monitor(device):
    """What the loop watches without waiting for the GPU, written by watch_loss at every iteration and
    read by read_monitor once in a while: 'first_bad' [terms of LOSS_WEIGHTS] long, the first iteration
    at which each term was NaN/Inf (-1: never); 'iteration' [] long, the iterations recorded;
    'loss_sum' [] float32, the sum of the weighted losses since the last read_monitor."""
    return {
        "first_bad": torch.full((len(LOSS_WEIGHTS),), -1, dtype=torch.long, device=device),
        "iteration": torch.zeros((), dtype=torch.long, device=device),
        "loss_sum": torch.zeros((), device=device),
    }


def reset_monitor(monitor):
    """Back to new_monitor's values, in place: one monitor serves every timestep of a run (the
    compiled loss keeps seeing the same tensors)."""
    monitor["first_bad"].fill_(-1)
    monitor["iteration"].zero_()
    monitor["loss_sum"].zero_()


def watch_loss(monitor, loss, terms):
    """Record one iteration in the monitor, in place (inside the compiled loss on CUDA, where it adds
    no kernel launch of its own): the NaN/Inf watch of every term and the running loss sum."""
    values = torch.stack([terms[k] if k in terms else torch.zeros_like(loss) for k in LOSS_WEIGHTS])
    first_bad, iteration = monitor["first_bad"], monitor["iteration"]
    first_bad.copy_(torch.where((first_bad < 0) & ~torch.isfinite(values), iteration, first_bad))
    iteration.add_(1)
    monitor["loss_sum"].add_(loss)


def read_monitor(monitor, loss, im, gt):
    """The one copy to the host of a progress report: (first_bad [terms] list of ints, the sum of the
    losses since the last read, this iteration's loss, its train PSNR of im against gt [3, H, W]);
    restarts the loss sum."""
    mse = ((im.detach() - gt) ** 2).mean()
    values = torch.cat([monitor["first_bad"].double(), torch.stack([monitor["loss_sum"], loss.detach(), mse]).double()])
    *first_bad, loss_sum, loss, mse = values.tolist()
    monitor["loss_sum"].zero_()
    return [int(i) for i in first_bad], loss_sum, loss, 10 * math.log10(1.0 / max(mse, 1e-12))


def prior_losses(params, rendervar, variables):
    """The physically based priors of timesteps > 0, vectorised over the foreground's [Nfg, 20]
    neighbour pairs: rigidity, rotation similarity, isometry, floor, static background, soft
    colour consistency. Rows are gathered with index_select (precomputed indices, no boolean
    masks): its backward adds with atomics, where plain indexing's backward sorts the indices."""
    losses = {}
    fg_idx, bg_idx = variables["fg_idx"], variables["bg_idx"]
    if len(fg_idx):
        fg_pts = rendervar["means3D"].index_select(0, fg_idx)
        fg_rot = rendervar["rotations"].index_select(0, fg_idx)
        nbr, weight = variables["neighbor_indices"], variables["neighbor_weight"]
        num_fg, k = nbr.shape
        rel_rot = helpers.quat_mult(fg_rot, variables["prev_inv_rot_fg"])  # rotation since t - 1
        offset = fg_pts.index_select(0, nbr.view(-1)).view(num_fg, k, 3) - fg_pts[:, None]
        rot = helpers.build_rotation(rel_rot)  # [Nfg, 3, 3]
        offset_in_prev = (rot[:, None] * offset[..., None]).sum(-2)  # R^T offset, without a batched matmul
        losses["rigid"] = helpers.weighted_l2_loss(offset_in_prev, variables["prev_offset"], weight)
        losses["rot"] = helpers.weighted_l2_loss(
            rel_rot.index_select(0, nbr.view(-1)).view(num_fg, k, 4), rel_rot[:, None], weight
        )
        distance = torch.sqrt((offset**2).sum(-1) + 1e-20)
        losses["iso"] = helpers.weighted_l2_loss(distance[..., None], variables["neighbor_dist"][..., None], weight)
        losses["floor"] = torch.clamp(fg_pts[:, 1], min=0).mean()  # the floor is y = 0, +y down
    if len(bg_idx):
        bg_pts, bg_rot = (rendervar[k].index_select(0, bg_idx) for k in ("means3D", "rotations"))
        losses["bg"] = helpers.l1_loss_rows(bg_pts, variables["init_bg_pts"]) + helpers.l1_loss_rows(
            bg_rot, variables["init_bg_rot"]
        )
    losses["soft_col_cons"] = helpers.l1_loss_rows(params["rgb_colors"], variables["prev_col"])
    return losses


def pick_loss(device, compile_loss=True, cuda_graphs=False):
    """get_loss as the loop runs it after timestep 0. On CUDA, eager PyTorch launches dozens of
    small kernels per iteration for the losses (SSIM of im and seg, the L1s, the priors over the
    [Nfg, 20] neighbour pairs, the weighted sum), each reading and writing full-size temporaries,
    and as many autograd nodes in backward; torch.compile fuses them into a few kernels and one
    autograd node, and with cuda_graphs replays them as CUDA graphs (forward and backward: one
    launch each, plus a copy of each input that is not at a fixed address). The CPU, --no-compile,
    and timestep 0 (whose image losses alone would save about what a second compile costs) run it
    eagerly."""
    if device.type != "cuda" or not compile_loss:
        return get_loss
    return compiled_loss(device, mode="reduce-overhead" if cuda_graphs else None)


def compiled_loss(device, backend="inductor", mode=None):
    """get_loss compiled as one graph (fullgraph) for fixed shapes: the Gaussian count is frozen
    after timestep 0, so it compiles once per run, at the first iteration after timestep 0. SSIM's
    window cache is filled first: traced empty, Dynamo would guard on it being empty and compile a
    second time once it is filled (a run resumed after timestep 0 calls this before any SSIM).
    mode: torch.compile's ('reduce-overhead': CUDA graphs)."""
    external.calc_ssim(torch.zeros(3, 11, 11, device=device), torch.zeros(3, 11, 11, device=device))
    return torch.compile(get_loss, backend=backend, mode=mode, dynamic=False, fullgraph=True)


def mark_static(monitor):
    """Tell torch.compile that the monitor's tensors keep their addresses (one monitor per run): a
    CUDA graph may then write them in place; it skips graphs that write to other inputs."""
    for v in monitor.values():
        torch._dynamo.mark_static_address(v)


class NonFiniteLoss(helpers.UserError):
    """A loss or a parameter went NaN/Inf: training stops, the finished timesteps stay."""


def check_finite(first_bad, t):
    """first_bad [terms of LOSS_WEIGHTS]: the first iteration each term was NaN/Inf (-1: never)."""
    bad = [(i, n) for i, n in zip(first_bad, LOSS_WEIGHTS) if i >= 0]
    if bad:
        i = min(b[0] for b in bad)
        raise NonFiniteLoss(
            f"timestep {t}, iteration {i}: loss {', '.join(n for j, n in bad if j == i)} is NaN/Inf; "
            f"stopped, the finished timesteps before {t} are kept. Check the data (images, "
            f"cameras, init_pt_cld.npz) or lower the learning rates"
        )


# ---------------------------------------------------------------- training


def train_timestep(
    params, variables, optimizer, dataset, t, num_iters, schedule, loss_fn, rng, bar, monitor, plateau=0.0
):
    """Optimise one timestep: up to num_iters iterations of one random train view each; with a
    densification schedule (timestep 0) the Gaussians are cloned, split and pruned on the way;
    loss_fn: get_loss, or its compiled form (pick_loss) after timestep 0; monitor: new_monitor's
    (reset here). Nothing in an iteration waits for the GPU but the rasterizer's binning (it sizes its
    buffers by the count of tile entries): the NaN watch and the loss sum stay on the device, read
    every FINITE_CHECK_EVERY iterations in one copy. plateau > 0 (timesteps > 0 only): stop early once
    the mean loss of one such block of iterations is less than `plateau` (relative) below the previous
    block's. Returns params, variables and the iterations run."""
    todo = []
    reset_monitor(monitor)
    # after timestep 0 only positions, rotations and colours change: the rest of the rasterizer's
    # inputs is computed once, and no screen-space gradient is asked for (densification is over)
    fixed = None if schedule is not None else fixed_rendervar(params)
    last_read, block_mean = 0, None
    for i in range(num_iters):
        data = get_batch(todo, dataset, rng)
        rendervar = helpers.params2rendervar(params) if fixed is None else moving_rendervar(params, fixed)
        im, seg, radii, _ = helpers.render_d3dgs(data["cam"], rendervar, data["background"])
        loss, _, im = loss_fn(params, rendervar, im, seg, data, variables, t > 0, monitor)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if schedule is not None:
            with torch.no_grad():
                params, variables = external.densify(
                    params, variables, optimizer, i, schedule, rendervar["means2D"].grad, radii
                )
        if i % FINITE_CHECK_EVERY == 0 or i == num_iters - 1:
            first_bad, loss_sum, last, train_psnr = read_monitor(monitor, loss, im, data["im"])
            check_finite(first_bad, t)
            bar.update(i + 1 - last_read)
            bar.set_postfix_str(
                f"it {i} loss {last:.4f} train PSNR {train_psnr:.2f} N {params['means3D'].shape[0]}", refresh=False
            )
            mean, last_read = loss_sum / (i + 1 - last_read), i + 1
            if plateau > 0 and schedule is None and block_mean is not None and mean > (1 - plateau) * block_mean:
                bar.update(num_iters - last_read)  # the bar's total counts the iterations not run
                return params, variables, last_read
            block_mean = mean if i > 0 else None  # iteration 0 alone is no block
    return params, variables, num_iters


def fixed_rendervar(params):
    """The rasterizer inputs that stay fixed after timestep 0 (params2rendervar's, without
    gradients): opacities, scales, segmentation colours, means2D."""
    with torch.no_grad():
        fixed = helpers.params2rendervar({k: v.detach() for k, v in params.items()})
    fixed["means2D"] = torch.zeros_like(fixed["means2D"])
    return fixed


def moving_rendervar(params, fixed):
    """params2rendervar(params) after timestep 0: what the optimiser moves, on top of fixed_rendervar."""
    return {
        **fixed,
        "means3D": params["means3D"],
        "rotations": F.normalize(params["unnorm_rotations"]),
        "colors_precomp": params["rgb_colors"],
    }


def evaluate(params, test_views, lpips_net):
    """Test-camera metrics of one timestep (no colour correction: test cameras have none):
    {'psnr', 'ssim', 'lpips' (None without weights), 'cameras': {cam_id: {...}}}."""
    with torch.no_grad():
        rendervar = helpers.params2rendervar({k: v.detach() for k, v in params.items()})
        cams = {}
        for view in test_views:
            im, _, _, _ = helpers.render_d3dgs(view["cam"], rendervar, view["background"])
            im = im.clamp(0, 1)
            cams[str(view["cam_id"])] = {
                "psnr": helpers.psnr(im, view["im"]),
                "ssim": float(external.calc_ssim(im, view["im"])),
                "lpips": None if lpips_net is None else float(lpips_net(im[None] * 2 - 1, view["im"][None] * 2 - 1)),
            }
    mean = {k: float(np.mean([c[k] for c in cams.values()])) for k in ("psnr", "ssim")}
    mean["lpips"] = None if lpips_net is None else float(np.mean([c["lpips"] for c in cams.values()]))
    return {**mean, "cameras": cams}


def load_lpips(device):
    """LPIPS (AlexNet) when the lpips package and torchvision's AlexNet weights are on disk (nothing
    is downloaded); else (None, why)."""
    try:
        import lpips
    except ImportError:
        return None, "the lpips package is not installed"
    weights = os.path.join(torch.hub.get_dir(), "checkpoints", "alexnet-owt-7be5be79.pth")
    if not os.path.isfile(weights):
        return None, f"AlexNet weights not found at {weights} (LPIPS needs them; nothing is downloaded)"
    return lpips.LPIPS(net="alex", verbose=False).to(device).eval(), None


# ---------------------------------------------------------------- output


def timestep_path(ts_dir, t):
    return os.path.join(ts_dir, f"{t:06d}.npz")


def finished_timesteps(ts_dir):
    """How many timesteps are finished in ts_dir: T of the unbroken run of files 0..T-1 (a file
    after a missing one is stale: it was trained from a timestep that is gone)."""
    names = set(os.listdir(ts_dir)) if os.path.isdir(ts_dir) else set()
    count = 0
    while os.path.basename(timestep_path(ts_dir, count)) in names:
        count += 1
    return count


def timestep_keys(t, present):
    """The arrays a timestep's file holds, of those in `present` (names): the per-timestep ones,
    plus at t = 0 the shared ones and the environment map (which runs of older code lack)."""
    shared = (*helpers.D3DGS_SHARED, helpers.D3DGS_ENV_MAP) if t == 0 else ()
    return tuple(k for k in helpers.D3DGS_PER_TIMESTEP + shared if k in present)


def round_stored(params):
    """Round params' STORED_FLOAT16 tensors (float32) in place to the float16 values save_timestep stores."""
    with torch.no_grad():
        for k in STORED_FLOAT16:
            params[k].copy_(params[k].half())


def save_timestep(ts_dir, t, params, record):
    """Atomically: the per-timestep arrays (plus the shared ones at t = 0; STORED_FLOAT16 in float16,
    the rest in float32) and the metrics."""
    arrays = {
        k: params[k].detach().cpu().numpy().astype(np.float16 if k in STORED_FLOAT16 else np.float32)
        for k in timestep_keys(t, params)
    }
    bad = [k for k, v in arrays.items() if not np.isfinite(v).all()]
    if bad:
        raise NonFiniteLoss(
            f"timestep {t}: {', '.join(bad)} hold NaN/Inf after training; not saved, the "
            f"finished timesteps before {t} are kept"
        )
    helpers.save_npz(timestep_path(ts_dir, t), {**arrays, "record": np.array(json.dumps(record))})


def check_run(run_path, run, kept, seq_dir, metas):
    """Raise UserError, saying which, when the finished timesteps 0..kept-1 that a run keeps were
    made from another sequence (or from seq_dir before it changed, up to timestep kept-1), other
    train cameras or another --downscale than `run` (what run.json will say) holds."""
    old = helpers.read_json(run_path)
    finished = f"{os.path.dirname(run_path)}: timesteps 0..{kept - 1}"
    again = "use another -e, or train them all again with -f 0"
    recorded = helpers.stage1_sequence(old)
    if recorded is None:
        raise helpers.UserError(
            f"{finished} have no readable {os.path.basename(run_path)} saying what they were made from; {again}"
        )
    why, changed = helpers.sequence_mismatch(recorded, seq_dir, metas, kept)
    if why:
        raise helpers.UserError(
            f"{finished} {why}; train them again from timestep {changed} with -f {changed}, or use another -e"
        )
    if old.get("train_cameras") != run["train_cameras"]:
        raise helpers.UserError(
            f"{finished} were trained with train cameras {old.get('train_cameras')}, the "
            f"sequence lists {run['train_cameras']}; {again}"
        )
    if old.get("downscale") != run["downscale"]:
        raise helpers.UserError(
            f"{finished} were trained with --downscale {old.get('downscale')}: resume with "
            f"--downscale {old.get('downscale')}, or {again}"
        )


def check_settings(ts_dir, t, settings):
    """Raise UserError when finished timestep t, which a resumed run continues from, was trained with
    another value of one of `settings` ({TRAINING_SETTINGS key: value}), naming it, both values and
    what to do."""
    record = json.loads(str(read_timestep_file(ts_dir, t)["record"]))
    helpers.check_settings(
        timestep_path(ts_dir, t),
        record,
        settings,
        f"go on with the new settings from timestep {t + 1} with -f {t + 1} (-f 0 trains every timestep again)",
    )


def replaced_path(ts_dir, t):
    """Where set_aside keeps the file of a stale timestep t until t is trained again."""
    return timestep_path(os.path.join(ts_dir, "replaced"), t)


def set_aside(ts_dir, first, num_t):
    """Move the timestep files from `first` on (stale: they follow a timestep trained again, or a
    missing one) to ts_dir/replaced/: out of the finished run, but kept until their replacement is
    written (drop_replaced), so that a run stopped early destroys nothing finished. A file whose
    arrays params.npz holds gets them back first: this run's params.npz will not hold them."""
    stale = [t for t in range(first, num_t) if os.path.isfile(timestep_path(ts_dir, t))]
    restored = read_timesteps(ts_dir, [t for t in stale if kept_in_params(timestep_path(ts_dir, t))])
    for t in stale:
        os.makedirs(os.path.dirname(replaced_path(ts_dir, t)), exist_ok=True)
        if t in restored:
            helpers.save_npz(replaced_path(ts_dir, t), restored[t])
            os.remove(timestep_path(ts_dir, t))
        else:
            os.replace(timestep_path(ts_dir, t), replaced_path(ts_dir, t))
    if stale:
        helpers.fsync(ts_dir)
        tqdm.write(
            f"{len(stale)} finished timestep(s) from {stale[0]} on follow the timesteps trained now: kept in "
            f"{os.path.dirname(replaced_path(ts_dir, 0))}/ until each is trained again"
        )


def drop_replaced(ts_dir, t):
    """Delete the set-aside file of timestep t, now that t is trained again (and the folder once empty)."""
    path = replaced_path(ts_dir, t)
    if os.path.isfile(path):
        os.remove(path)
        if not os.listdir(os.path.dirname(path)):
            os.rmdir(os.path.dirname(path))


def read_timestep_file(ts_dir, t):
    """A finished timestep's file as it is (numpy; 'record' its JSON, 'in_params' where params.npz holds
    its arrays), checked by helpers.read_npz."""
    return helpers.read_npz(timestep_path(ts_dir, t), f"train it again: -f {t}")


def kept_in_params(path):
    """Whether the timestep file at `path` leaves its arrays to params.npz (False when unreadable:
    read_timestep_file says why where it is read)."""
    try:
        with np.load(path) as f:
            return "in_params" in f.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def timestep_fingerprint(arrays):
    """helpers.fingerprint of a timestep's arrays ({name: array}, timestep_keys)."""
    return helpers.fingerprint(*(arrays[k] for k in sorted(arrays)))


def arrays_in_params(params, t):
    """Timestep t's arrays (timestep_keys) in params.npz's arrays `params`; {} where it holds no timestep t."""
    keys = timestep_keys(t, params)
    if not set(helpers.D3DGS_PER_TIMESTEP) <= set(keys) or any(len(params[k]) <= t for k in helpers.D3DGS_PER_TIMESTEP):
        return {}
    return {k: params[k][t] if k in helpers.D3DGS_PER_TIMESTEP else params[k] for k in keys}


def params_timesteps(path):
    """How many timesteps the params.npz at `path` holds (read_timesteps has checked it)."""
    with np.load(path) as f:
        return len(f["means3D"])


def read_timesteps(ts_dir, timesteps):
    """{t: arrays of finished timestep t, with 'record'} for each t of `timesteps`. Those whose files
    leave them to params.npz are read from there (the file read once), checked against the
    fingerprint the timestep's file holds. Raises UserError naming the file and the -f to use."""
    files = {t: read_timestep_file(ts_dir, t) for t in timesteps}
    kept = [t for t, f in files.items() if "in_params" in f]
    if kept:
        path = os.path.join(os.path.dirname(ts_dir), "params.npz")
        params = helpers.read_npz(path, f"it holds timestep {kept[0]}'s Gaussians alone; train it again: -f {kept[0]}")
        for t in kept:
            arrays = arrays_in_params(params, t)
            if timestep_fingerprint(arrays) != str(files[t]["in_params"]):
                raise helpers.UserError(
                    f"{path} no longer holds the Gaussians of timestep {t} that {timestep_path(ts_dir, t)} "
                    f"names (it changed since); train from timestep {t} again: -f {t}"
                )
            files[t] = {**arrays, "record": files[t]["record"]}
    return files


def torch_timestep(arrays, device):
    """(params {name: float32 tensor on device}, record dict) of read_timesteps' arrays of a timestep."""
    arrays = dict(arrays)
    record = json.loads(str(arrays.pop("record")))
    return {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in arrays.items()}, record


def restore(ts_dir, t_next, device):
    """params of timestep t_next - 1 and the variables that timestep t_next starts from; reads
    only timesteps 0, t_next - 2 and t_next - 1."""
    files = read_timesteps(ts_dir, sorted({0, max(t_next - 2, 0), t_next - 1}))
    first, first_record = torch_timestep(files[0], device)
    variables = initialize_post_first_timestep(first)
    if t_next >= 2:
        before, _ = torch_timestep(files[t_next - 2], device)
        variables.update(prev_pts=before["means3D"], prev_rot=F.normalize(before["unnorm_rotations"]))
    last, record = torch_timestep(files[t_next - 1], device) if t_next >= 2 else (first, first_record)
    if len(record.get("object_scores", ())) == len(variables["groups"]):  # older runs did not record them
        variables["object_scores"] = torch.tensor(record["object_scores"], device=device)
    params = {k: (last[k] if k in helpers.D3DGS_PER_TIMESTEP else first[k]) for k in timestep_keys(0, first)}
    return params, variables


def assemble(ts_dir, out_dir, lpips_missing, resolution):
    """From the finished timesteps 0..T-1 (atomically): params.npz (its index is the timestep) and
    metrics.json; then each timestep's file that held its arrays keeps only its record and their
    fingerprint (read_timesteps reads them from params.npz). Returns (params path, T, metrics)."""
    num_t = finished_timesteps(ts_dir)
    files = read_timesteps(ts_dir, range(num_t))
    records = [json.loads(str(files[t]["record"])) for t in range(num_t)]
    params_path = os.path.join(out_dir, "params.npz")
    written = [t for t in range(num_t) if not kept_in_params(timestep_path(ts_dir, t))]
    if written or params_timesteps(params_path) != num_t:  # else params.npz holds these timesteps as they are
        arrays = {k: np.stack([files[t][k] for t in range(num_t)]) for k in helpers.D3DGS_PER_TIMESTEP}
        shared = [k for k in timestep_keys(0, files[0]) if k not in helpers.D3DGS_PER_TIMESTEP]
        helpers.save_npz(params_path, {**arrays, **{k: files[0][k] for k in shared}})
    for t in written:
        arrays = {k: files[t][k] for k in timestep_keys(t, files[t])}
        in_params = np.array(timestep_fingerprint(arrays))
        helpers.save_npz(timestep_path(ts_dir, t), {"record": files[t]["record"], "in_params": in_params})
    per_t = [
        {
            "t": t,
            **{k: r["test"][k] for k in ("psnr", "ssim", "lpips")},
            "cameras": r["test"]["cameras"],
            "iterations": r["iterations"],
            "seconds": r["seconds"],
            "gaussians": r["gaussians"],
        }
        for t, r in enumerate(records)
    ]
    lpips_values = [r["lpips"] for r in per_t if r["lpips"] is not None]
    metrics = {
        "timesteps": num_t,
        "test_cameras": list(per_t[0]["cameras"]),
        "resolution": list(resolution),
        "psnr": float(np.mean([r["psnr"] for r in per_t])),
        "ssim": float(np.mean([r["ssim"] for r in per_t])),
        "lpips": float(np.mean(lpips_values)) if len(lpips_values) == len(per_t) else None,
        "lpips_missing": (
            None if len(lpips_values) == len(per_t) else lpips_missing or "not computed for every timestep"
        ),
        "per_timestep": per_t,
    }
    helpers.save_json(os.path.join(out_dir, "metrics.json"), metrics)
    return params_path, num_t, metrics


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=helpers.stage_description("train_d3dgs.py") + " Trains timestep after timestep; each "
        "finished timestep is saved, so running the same command again continues where it stopped.",
        formatter_class=helpers.HelpFormatter,
    )
    helpers.add_sequence_option(parser)
    parser.add_argument("-e", "--exp", default="exp1", help="experiment name: outputs go to output/<exp>/<seq>/")
    parser.add_argument(
        "-f",
        "--first",
        type=int,
        default=None,
        help="(re)train from this timestep on (timesteps 0..FIRST-1 must be finished; later "
        "finished ones are discarded); default: continue after the last finished timestep",
    )
    parser.add_argument("-l", "--last", type=int, default=None, help="stop after this timestep (default: the last)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument(
        "--iters-first",
        type=int,
        default=10_000,
        help="iterations at timestep 0 (densification "
        "runs over its first half, on the original's schedule scaled to this count)",
    )
    parser.add_argument("--iters", type=int, default=2_000, help="iterations at every later timestep")
    parser.add_argument(
        "--fg-points",
        type=int,
        default=100_000,
        help="without init_pt_cld.npz: at most this many visual-hull (foreground) points",
    )
    parser.add_argument(
        "--bg-points",
        type=int,
        default=60_000,
        help="without init_pt_cld.npz: rays for background points (at most one point each), and at "
        "most this many points inside the rig (objects at rest that the masks call background)",
    )
    parser.add_argument(
        "--downscale",
        type=int,
        default=1,
        help="train and evaluate on images this many times smaller (faster, coarser)",
    )
    parser.add_argument(
        "--motion-lr-scale",
        type=float,
        default=1.0,
        help="after timestep 0, multiply the position and rotation learning rates by this (for "
        "runs with few iterations per timestep, which must still keep up with the motion)",
    )
    parser.add_argument(
        "--max-gaussians",
        type=int,
        default=3_000_000,
        help="densification stops cloning and splitting at this many Gaussians (memory guard)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (camera order, splits)")
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="on CUDA, run the losses of timesteps > 0 eagerly instead of compiling them with "
        "torch.compile (compiling takes 21-27 s once on an H100, then saves about 5 ms per "
        "iteration)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="on CUDA, replay the compiled losses of timesteps > 0 as CUDA graphs (torch.compile's "
        "reduce-overhead mode; the rasterizer waits for its tile count at every render, so the rest "
        "of an iteration cannot be captured); without --no-compile only",
    )
    parser.add_argument(
        "--plateau",
        type=float,
        default=PLATEAU,
        help=f"after timestep 0, stop a timestep early once the mean loss of {FINITE_CHECK_EVERY} "
        "iterations falls less than this fraction below that of the previous "
        f"{FINITE_CHECK_EVERY} (default: %(default)s); 0: always run --iters, as the original",
    )
    args = helpers.parse_with_demo(parser, argv, DEMO)
    for option in ("iters_first", "iters", "downscale", "max_gaussians"):
        helpers.check_option(args, option, at_least=1)
    helpers.check_option(args, "motion_lr_scale", above=0)
    helpers.check_option(args, "plateau", at_least=0, below=1)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = helpers.pick_device(args.device)
    torch.backends.cudnn.benchmark = True  # SSIM's convolutions keep one shape for the whole run
    seq_dir = helpers.find_sequence(args.seq)
    out_dir = helpers.stage_dir("output", args.exp, seq_dir)
    with helpers.stage_lock(out_dir, "train_d3dgs"):
        train(args, device, seq_dir, out_dir)


def train(args, device, seq_dir, out_dir):
    """Stage 1 into out_dir (this run holds its lock). Every argument and input of the timesteps to
    train is checked, and what the first of them starts from is read, before the finished timesteps
    it makes stale are set aside."""
    full_meta, full_test_meta = helpers.load_meta(seq_dir, "train"), helpers.load_meta(seq_dir, "test")
    meta, test_meta = helpers.scale_meta(full_meta, args.downscale), helpers.scale_meta(full_test_meta, args.downscale)
    sizes = (full_meta["w"], full_meta["h"]), (full_test_meta["w"], full_test_meta["h"])
    num_t = len(meta["fn"])
    if len(test_meta["fn"]) < num_t:
        raise helpers.UserError(f"{test_meta['path']} has {len(test_meta['fn'])} timesteps, {meta['path']} {num_t}")
    ts_dir = os.path.join(out_dir, "timesteps")
    os.makedirs(ts_dir, exist_ok=True)
    run_path = os.path.join(ts_dir, "run.json")
    run = {
        "sequence": helpers.sequence_identity(seq_dir, [full_meta, full_test_meta]),
        "train_cameras": meta["cam_id"],
        "test_cameras": test_meta["cam_id"],
        "downscale": args.downscale,
    }
    done = finished_timesteps(ts_dir)

    start = done if args.first is None else args.first
    last = num_t - 1 if args.last is None else args.last
    if not 0 <= last < num_t:
        raise helpers.UserError(f"-l {args.last}: the sequence has timesteps 0..{num_t - 1}")
    if args.first is not None and not 0 <= args.first <= last:
        raise helpers.UserError(
            f"-f {args.first} -l {last}: the sequence has timesteps 0..{num_t - 1}; need 0 <= -f <= -l"
        )
    finished = f"timesteps 0..{done - 1} are finished" if done else "no timestep is finished"
    if start <= last and start > done:
        raise helpers.UserError(
            f"-f {start}: timestep {start} starts from timestep {start - 1}, but {finished} "
            f"in {ts_dir}; pick -f {done} or lower"
        )
    if min(start, done):
        check_run(run_path, run, min(start, done), seq_dir, [full_meta, full_test_meta])
    settings = {key: getattr(args, key) for key in TRAINING_SETTINGS}
    if args.first is None and 0 < done and start <= last:
        check_settings(ts_dir, done - 1, settings)
    if start <= last:
        helpers.check_sequence(seq_dir, full_meta, start, last, masks=True, headers=True)
        helpers.check_sequence(seq_dir, full_test_meta, start, last, headers=True)
        if start > 0:
            params, variables = restore(ts_dir, start, device)
        else:
            init_pt_cld = initial_point_cloud(seq_dir, full_meta, out_dir, args)
    set_aside(ts_dir, start, num_t)
    helpers.save_json(run_path, run)
    lpips_net, lpips_missing = load_lpips(device)

    loss_fn = pick_loss(device, not args.no_compile, args.cuda_graphs)
    if start > last:
        tqdm.write(f"{finished} in {ts_dir}: nothing to train")
    elif start > 0:
        tqdm.write(f"resuming at timestep {start} in {ts_dir}")
    total = sum(args.iters_first if t == 0 else args.iters for t in range(start, last + 1))
    bar = helpers.progress(total=total, unit="it")
    monitor = new_monitor(device)
    later_phases = {}  # seconds of each phase of the timesteps after 0 (helpers.lap)
    if args.cuda_graphs and loss_fn is not get_loss:
        mark_static(monitor)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the next timestep's images load while this one trains
        upcoming = pool.submit(load_timestep, seq_dir, meta, test_meta, start, *sizes) if start <= last else None
        for t in range(start, last + 1):
            started = tick = time.time()
            phases = {}  # seconds of the timestep's phases (load, prepare, train, evaluate; save printed at the end)
            dataset, test_views = get_dataset(upcoming.result(), meta, test_meta, t, device)
            upcoming = pool.submit(load_timestep, seq_dir, meta, test_meta, t + 1, *sizes) if t < last else None
            torch.manual_seed(args.seed * SEED_STRIDE + t)
            rng = np.random.default_rng([args.seed, t])
            bar.set_description(f"t {t}/{last}")
            tick = helpers.lap(phases, "load", tick, device)
            if t == 0:
                radius, centers = scene_radius(meta), camera_centers(meta)
                params = initial_params(init_pt_cld, meta, dataset, device)
                variables = {
                    "scene_radius": radius,
                    "scene_center": torch.tensor(centers.mean(0), dtype=torch.float32, device=device),
                    "means2D_gradient_accum": torch.zeros(len(init_pt_cld), device=device),
                    "denom": torch.zeros(len(init_pt_cld), device=device),
                    "seen": torch.zeros(len(init_pt_cld), dtype=torch.bool, device=device),
                }
                optimizer = initialize_optimizer(params, radius, LEARNING_RATES)
                schedule = external.densify_schedule(args.iters_first, max_gaussians=args.max_gaussians)
                num_iters, step_loss, plateau = args.iters_first, get_loss, 0.0
            else:
                params, variables = initialize_per_timestep(params, variables)
                moved = relocate_objects(params, variables, dataset, RELOCATE_REACH * scene_radius(meta))
                if moved:
                    tqdm.write(
                        f"timestep {t}: {moved} object(s) moved to where this timestep's masks and colours put them"
                    )
                optimizer = initialize_optimizer(
                    params, scene_radius(meta), MOVING, ("means3D", "unnorm_rotations"), args.motion_lr_scale
                )
                num_iters, step_loss, plateau, schedule = args.iters, loss_fn, args.plateau, None
            add_backgrounds(dataset + test_views, params.get(helpers.D3DGS_ENV_MAP))
            tick = helpers.lap(phases, "prepare", tick, device)
            params, variables, iters = train_timestep(
                params, variables, optimizer, dataset, t, num_iters, schedule, step_loss, rng, bar, monitor, plateau
            )
            tick = helpers.lap(phases, "train", tick, device)
            round_stored(params)
            metrics = evaluate(params, test_views, lpips_net)
            if t == 0:
                params = {k: v.detach() for k, v in params.items()}
                variables = initialize_post_first_timestep(params)
            variables["object_scores"] = group_scores(params, variables, dataset)
            tick = helpers.lap(phases, "evaluate", tick, device)
            record = {
                "iterations": iters,
                "seconds": time.time() - started,
                "phase_seconds": dict(phases),
                "settings": settings,
                "gaussians": int(params["means3D"].shape[0]),
                "test": metrics,
                "object_scores": variables["object_scores"].tolist(),
            }
            save_timestep(ts_dir, t, params, record)
            drop_replaced(ts_dir, t)
            helpers.lap(phases, "save", tick, device)
            if t > 0:
                for name, seconds in phases.items():
                    later_phases.setdefault(name, []).append(seconds)
            tqdm.write(
                f"timestep {t}: {record['seconds']:.1f} s, {record['gaussians']} Gaussians, "
                f"test PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}"
            )
            del optimizer
    bar.close()
    if later_phases:
        tqdm.write(
            "a timestep after timestep 0, median seconds: "
            + ", ".join(f"{name} {statistics.median(seconds):.2f}" for name, seconds in later_phases.items())
        )

    params_path, num_done, metrics = assemble(ts_dir, out_dir, lpips_missing, (test_meta["w"], test_meta["h"]))
    lpips_text = (
        f"LPIPS {metrics['lpips']:.4f}"
        if metrics["lpips"] is not None
        else f"LPIPS missing ({metrics['lpips_missing']})"
    )
    print(
        f"{helpers.stage_name('train_d3dgs.py')} done: {num_done} timesteps of {num_t} in {params_path}; test "
        f"cameras {', '.join(metrics['test_cameras'])}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
        f"{lpips_text} (per timestep: {os.path.join(out_dir, 'metrics.json')})"
    )


def initial_point_cloud(seq_dir, meta, out_dir, args):
    """The sequence's init_pt_cld.npz, or one built from its masks and images (saved beside the outputs)."""
    path = os.path.join(seq_dir, "init_pt_cld.npz")
    if os.path.isfile(path):
        data = helpers.read_npz(
            path, "it must hold 'data' [N, 7] (xyz, rgb, seg), finite; fix it, or delete it to build one from the masks"
        ).get("data")
        if data is None or data.ndim != 2 or data.shape[1] != 7 or len(data) < 4:
            raise helpers.UserError(
                f"{path}: 'data' is {'missing' if data is None else list(data.shape)}, expected "
                f"[N >= 4, 7] (xyz, rgb, seg)"
            )
        if not np.isin(data[:, 6], (0, 1)).all():
            raise helpers.UserError(
                f"{path}: seg (column 6 of 'data') holds {np.setdiff1d(data[:, 6], (0, 1))[:3]}, "
                f"not only 0 (background) and 1 (foreground)"
            )
        return data.astype(np.float32)
    tqdm.write(f"no {path}: building the initial point cloud from the masks and images of timestep 0")
    started = time.time()
    data = point_cloud.build_init_point_cloud(
        seq_dir, meta, 0, args.fg_points, args.bg_points, args.seed, log=tqdm.write
    )
    saved = os.path.join(out_dir, "init_pt_cld.npz")
    helpers.save_npz(saved, {"data": data})
    tqdm.write(
        f"initial point cloud: {len(data)} points ({int(data[:, 6].sum())} foreground) in "
        f"{time.time() - started:.1f} s -> {saved}"
    )
    return data


if __name__ == "__main__":
    helpers.run_main(main)
