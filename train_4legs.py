"""Stage 5 of 4-LEGS: lift the video-language features onto the frozen Gaussians of stage 1.

Per timestep t, every Gaussian gets a 128-d latent; a single-head attention over the Gaussian and
its 20 nearest neighbours (at t) turns latents into the features that are rendered by the feature
rasterizer; the loss is L1 to the autoencoder-encoded per-pixel feature maps of ALL train cameras
(one camera per iteration, cycling; the original used camera 0 only). Geometry stays frozen.

Differences to the original, each for speed: a timestep starts from the latents and attention of
the previous one (WARM START: the Gaussians persist, so do their features; docs/performance.md
measures that it reaches the same loss in fewer iterations), and on the CPU / without the CUDA
kernels the frozen render is precomputed per camera as one sparse matrix (same values as the
rasterizer, see `blend_matrix`). Outputs: `output/<exp>/<seq>/legs/<t:06d>.pt`, one atomic file per
timestep; a rerun resumes. A warm-started timestep holds the background's features at those of its
chain's first timestep (static Gaussians, static features), so it computes the attention (and
the neighbour lists) of the foreground's Gaussians alone, and its file stores the foreground's
alone, as int8 rows with a per-row scale (feature_extraction/relevancy.py: save_legs); the latents
and attention that the next timestep starts from are handed on in memory and kept beside them for
the last timestep trained (`state_<t:06d>.pt`, written when the run ends or stops): `--restart -f F`
starts cold at F unless F - 1 was the last one trained.
Under torchrun each rank trains a contiguous block of timesteps, and the warm start then chains
within a block (each block's first timestep starts cold unless the previous timestep's files
already exist).

One difference is for small objects, not speed: a pixel's target is the embedding of its purest
tile (the surrounding tile, on any level, whose pixels most look like it), not the mean over the
tile levels, which drowns an object of about one tile of the finest level (--tile-mix;
feature_extraction/tiles.py; docs/benchmark.md measures both on the scene family).

    python train_4legs.py -s data/synthetic -e exp1 --encoder viclip
    torchrun --nproc_per_node 4 train_4legs.py -s data/basketball -e exp1 --encoder viclip
"""

import argparse
import bisect
import concurrent.futures
import functools
import math
import os
import statistics
import time
import uuid

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import helpers
from feature_extraction.autoencoder import ae_ckpt_path, load_autoencoder
from feature_extraction.cache import add_cache_dir_option, cache_identity
from feature_extraction.relevancy import (
    check_base,
    d3dgs_params_path,
    encoder_name,
    feature_cache,
    legs_dir,
    legs_made_from,
    legs_mismatch,
    legs_path,
    load_legs,
    read_legs,
    render_features,
    save_legs,
)
from feature_extraction.tiles import TILE_MIXES

NUM_NEIGHBOURS = 20
LEGS_DIM = 128
READ_THREADS = 4  # threads reading the next cameras' tile grids and guide images (PerCamera)
KNN_BLOCK_ELEMENTS = 2**28  # the GPU's brute-force k-NN: this many distances at once (1 GiB; two such tensors live)
# The GPU's k-NN on grids (knn_grid): the first grid's cell is this quantile of the k-th neighbour
# distances of a sample of the queries; each next grid doubles the cell; brute force takes whoever
# is left after the last grid or has more candidates than a grid may gather for one query.
KNN_GRID_SAMPLE = 1024
KNN_GRID_FIRST_QUANTILE = 0.1
KNN_GRID_LEVELS = 8
KNN_GRID_MAX_CANDIDATES = 4096
KNN_GRID_BLOCK_ELEMENTS = 2**25  # candidates (query, point) gathered at once
TAIL_FRACTION = 0.1  # a timestep's reported loss: the mean over its last 10% iterations (tail_loss)
PROGRESS_EVERY = 20  # iterations between loss readings on a timestep's progress bar (each one a host sync)
DEMO = {"iters": 60, "warm_iters": 15, "downscale": 4}  # make demo on 2 CPU cores
# How a timestep is trained, recorded with it: a resume with others would leave the timesteps of one
# legs/ folder trained in two ways (what it was made from, made_from, is recorded and checked too).
TRAINING_SETTINGS = (
    "iters",
    "warm_iters",
    "warm_min_iters",
    "converge_window",
    "converge_tol",
    "fixed_iters",
    "lr_features",
    "lr_attention",
    "seed",
)


class NeighbourAttention(nn.Module):
    """Single-head attention of each Gaussian (query) over itself and its K nearest neighbours
    (keys, values), then a linear layer to the output size: the 4-LEGS feature attention, with
    the same parameters (query, key, value, out)."""

    def __init__(self, dim=LEGS_DIM, out_dim=LEGS_DIM):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, latents, neighbours):
        """latents [N, D]; neighbours [M, K+1] int64, a row per query Gaussian (itself first, then its
        K nearest; M = N: every Gaussian) -> features [M, out_dim] of the query Gaussians."""
        weights = (
            self.query.weight,
            self.query.bias,
            self.key.weight,
            self.value.weight,
            self.value.bias,
            self.out.weight,
            self.out.bias,
        )
        attend = gpu_attend() if latents.is_cuda else attend_by_slot
        return attention_function(latents, neighbours, *weights, attend=attend)


@functools.cache
def gpu_attend():
    """legs_attention.attend_fused, imported once: Triton is needed (and installed) only with a GPU."""
    try:
        from legs_attention import attend_fused
    except ImportError as e:
        raise helpers.UserError(
            f"{helpers.stage_name('train_4legs.py')} on a GPU needs Triton ({e}); it comes "
            f"with torch's Linux wheels (pip install triton), or run on the CPU with --device cpu"
        ) from None
    return attend_fused


def attention_function(latents, neighbours, w_q, b_q, w_k, w_v, b_v, w_out, b_out, attend=None):
    """NeighbourAttention's function of its weights; `attend` computes the attention's mixing:
    attend_batched (the default, the reference), attend_by_slot (CPU), legs_attention.attend_fused
    (GPU: fused Triton kernels).

    score_ij = q_i . (W_k f_j + b_k): the b_k term is equal for all j and cancels in the softmax, so
    score_ij = (W_k^T q_i) . f_j; and sum_j a_ij (W_v f_j + b_v) = W_v (sum_j a_ij f_j) + b_v. Same
    function as projecting every neighbour's key and value, without the [N, K+1, D] projections.
    A row of neighbours [M, K+1] is a query: its first entry (the Gaussian itself) gives the query."""
    queries = latents if len(neighbours) == len(latents) else latents.index_select(0, neighbours[:, 0])
    q_k = (F.linear(queries, w_q, b_q) @ w_k) / math.sqrt(latents.shape[1])
    mixed = (attend or attend_batched)(latents, neighbours, q_k)
    return F.linear(F.linear(mixed, w_v, b_v), w_out, b_out)


def attend_batched(latents, neighbours, q_k):
    """sum_j softmax_j(q_k_i . f_nj) f_nj with one [N, K+1, D] gather (GPU: few large kernels)."""
    n, k = neighbours.shape
    near = latents.index_select(0, neighbours.reshape(-1)).view(n, k, -1)
    weights = torch.softmax((near * q_k[:, None]).sum(-1), dim=-1)
    return (weights[:, :, None] * near).sum(1)


def attend_by_slot(latents, neighbours, q_k):
    """The same, one neighbour slot at a time: K+1 gathers of [N, D], which stay in the CPU's
    caches (twice as fast as the batched form there)."""
    near = [latents.index_select(0, idx) for idx in neighbours.T.contiguous()]
    weights = torch.softmax(torch.stack([(f * q_k).sum(-1) for f in near], 1), dim=-1)
    mixed = near[0] * weights[:, :1]
    for j in range(1, len(near)):
        mixed = mixed + near[j] * weights[:, j : j + 1]
    return mixed


def neighbour_indices(means3D, k=NUM_NEIGHBOURS, rows=None):
    """means3D [N, 3] -> [M, k+1] int64 on its device for the Gaussians `rows` [M] (None: all N):
    each Gaussian itself, then its k nearest of all N at this timestep (KD-tree on the CPU; on a
    GPU grids, knn_grid, where the KD-tree takes seconds of one CPU core)."""
    if not means3D.is_cuda:
        rows = np.arange(len(means3D)) if rows is None else rows.numpy()
        _, idx = helpers.knn(means3D.detach().numpy(), k, rows)
        return torch.from_numpy(np.concatenate([rows[:, None], idx], 1))
    return knn_grid(means3D.detach(), k, rows)


def knn_brute_force(points, k, rows=None):
    """points [N, 3] -> [M, k+1] int64 for the points `rows` [M] (None: all N): itself first, then
    its k nearest of all N (blocks of all distances)."""
    n = points.shape[0]
    rows = torch.arange(n, device=points.device) if rows is None else rows.to(points.device)
    block = max(1, KNN_BLOCK_ELEMENTS // n)
    out = []
    for start in range(0, len(rows), block):
        query = rows[start : start + block]
        # differences, not |a|^2 + |b|^2 - 2ab, whose float32 cancellation swaps near neighbours far from the
        # origin; one coordinate at a time (cdist's difference kernel is ~100x slower on a GPU), squared in
        # place and added to the sum: two [block, N] tensors at once
        dist2 = (points[query, 0, None] - points[None, :, 0]).square_()
        for d in (1, 2):
            dist2 += (points[query, d, None] - points[None, :, d]).square_()
        dist2[torch.arange(len(query), device=points.device), query] = -1.0  # itself first, even where two coincide
        out.append(dist2.topk(min(k + 1, n), dim=1, largest=False).indices)
    idx = torch.cat(out)
    if idx.shape[1] < k + 1:  # fewer Gaussians than neighbours asked for: repeat the last one
        idx = torch.cat([idx, idx[:, -1:].expand(-1, k + 1 - idx.shape[1])], 1)
    return idx


def knn_grid(points, k, rows=None):
    """knn_brute_force's result (the same neighbours, ties apart) without all N x M distances: each
    query looks among the points of the 27 grid cells around its own, on a grid whose cell starts at
    KNN_GRID_FIRST_QUANTILE of a sample's k-th neighbour distances and doubles until the query's
    k-th candidate lies within one cell (then no nearer point can lie outside those cells); brute
    force takes the queries left after KNN_GRID_LEVELS grids. points [N, 3] -> [M, k+1] int64."""
    n = points.shape[0]
    rows = torch.arange(n, device=points.device) if rows is None else rows.to(points.device)
    extent = float((points.max(0).values - points.min(0).values).max()) if n else 0.0
    if n <= k + 1 or len(rows) <= KNN_GRID_SAMPLE or not extent > 0:
        return knn_brute_force(points, k, rows)
    sample = rows[:: len(rows) // KNN_GRID_SAMPLE]
    kth = (points[knn_brute_force(points, k, sample)[:, -1]] - points[sample]).norm(dim=1)
    cell = max(float(torch.quantile(kth, KNN_GRID_FIRST_QUANTILE)), extent * 1e-6)
    out = torch.empty(len(rows), k + 1, dtype=torch.long, device=points.device)
    todo = torch.arange(len(rows), device=points.device)
    for _ in range(KNN_GRID_LEVELS):
        if not len(todo):
            break
        idx, certain = grid_pass(points, rows[todo], k, cell)
        out[todo[certain]] = idx[certain]
        todo, cell = todo[~certain], 2 * cell
    if len(todo):
        out[todo] = knn_brute_force(points, k, rows[todo])
    return out


def grid_pass(points, queries, k, cell):
    """One grid of knn_grid: points [N, 3], queries [Q] (indices into points), cell (world units) ->
    (idx [Q, k+1] int64: each query itself, then its k nearest candidates; certain [Q] bool: the k-th
    of them lies within one cell, so they are its k nearest of all points)."""
    device = points.device
    # float64: a point's cell exact to far below the certainty margin even 10^6 cells from the corner
    corner = points.min(0).values.double()
    coords = ((points.double() - corner) / cell).floor().long() + 1  # >= 1: the cells around are >= 0
    dims = coords.max(0).values + 2

    def key(c):
        return (c[..., 0] * dims[1] + c[..., 1]) * dims[2] + c[..., 2]

    point_keys = key(coords)
    order = point_keys.argsort()
    cell_keys, counts = torch.unique_consecutive(point_keys[order], return_counts=True)
    starts = counts.cumsum(0) - counts
    around = torch.cartesian_prod(*[torch.arange(-1, 2, device=device)] * 3)  # [27, 3]
    near = key(coords[queries][:, None] + around)  # [Q, 27]
    pos = torch.searchsorted(cell_keys, near).clamp(max=len(cell_keys) - 1)
    count = torch.where(cell_keys[pos] == near, counts[pos], 0)  # [Q, 27] points in each cell around
    first, total = starts[pos], count.sum(1)
    idx = torch.zeros(len(queries), k + 1, dtype=torch.long, device=device)
    certain = torch.zeros(len(queries), dtype=torch.bool, device=device)
    by_total = total.argsort()
    totals = total[by_total].tolist()  # one host read per grid: the blocks' sizes
    start = bisect.bisect_left(totals, k + 1)  # fewer candidates than neighbours: not certain here
    while start < len(totals) and totals[start] <= KNN_GRID_MAX_CANDIDATES:
        end = min(len(totals), start + max(1, KNN_GRID_BLOCK_ELEMENTS // totals[start]))
        while end - start > 1 and (end - start) * totals[end - 1] > KNN_GRID_BLOCK_ELEMENTS:
            end = start + max(1, KNN_GRID_BLOCK_ELEMENTS // totals[end - 1])
        block, width = by_total[start:end], totals[end - 1]
        if width > KNN_GRID_MAX_CANDIDATES:  # the block's widest query waits for the next grid
            end = bisect.bisect_right(totals, KNN_GRID_MAX_CANDIDATES, start, end)
            block, width = by_total[start:end], totals[end - 1]
        ends = count[block].cumsum(1)  # [B, 27]
        slot = torch.arange(width, device=device).expand(len(block), width).contiguous()
        which = torch.searchsorted(ends, slot, right=True).clamp(max=26)  # the cell of each slot
        within = slot - ends.gather(1, which) + count[block].gather(1, which)
        candidates = order[(first[block].gather(1, which) + within).clamp(max=len(order) - 1)]  # [B, width]
        query = queries[block]
        dist2 = ((points[candidates] - points[query][:, None]) ** 2).sum(-1)
        dist2[candidates == query[:, None]] = -1.0  # itself first
        dist2[slot >= total[block][:, None]] = float("inf")  # the padding (its candidates are any point)
        best = dist2.topk(k + 1, dim=1, largest=False)
        idx[block] = candidates.gather(1, best.indices)
        certain[block] = best.values[:, -1] <= (cell * (1 - 1e-4)) ** 2  # margin: float32's distances
        start = end
    return idx, certain


def encode_targets(cache, t, ae, cams, device, guides=None):
    """Per train camera the AE-encoded per-pixel feature map [128, h, w] float32 (stage-3 dense map
    -> encoder), computed once per camera and timestep, on first use, on `device`; the files of every
    camera (tile grids, guide image) are read ahead in threads. guides: None for the mean over the
    tile levels (--tile-mix mean), else a function camera index -> its image at timestep t (float
    [3, H, W] at the cached size), whose purest tiles give each pixel's feature."""
    from feature_extraction.cache import camera_levels, dense_feature_map

    def read(c):
        return camera_levels(cache, t, c), None if guides is None else guides(c)

    def make(c, files):
        grids, guide = files
        with torch.no_grad():
            return dense_feature_map(
                cache, t, c, cams[c].image_height, cams[c].image_width, device, guide, ae.encode, grids
            ).contiguous()

    return PerCamera(len(cams), make, device, read)


class _SparseRender(torch.autograd.Function):
    """values [n, C] -> matrix @ values [P, C]; backward matrix_t @ grad (both CSR)."""

    @staticmethod
    def forward(ctx, matrix, matrix_t, values):
        ctx.matrix_t = matrix_t
        return matrix @ values

    @staticmethod
    def backward(ctx, grad):
        return None, None, ctx.matrix_t @ grad.contiguous()


def blend_matrix(cam, rendervar):
    """The render of frozen Gaussians as a sparse matrix: features image = S @ features[ids].

    Rendered features are linear in the features once the geometry is fixed, and on the CPU the
    reference rasterizer spends almost all its time on that geometry (projection, fragment
    selection, sorting), so we run it once per camera and timestep. The steps are the reference
    rasterizer's own (`_torch_impl`: project_gaussians, select_fragments, then the blending weights
    alpha * T as its Blend computes them); tests hold the result equal to the rasterizer's.
    Returns ids [n] (the Gaussians on screen, front to back), S [H*W, n] and S^T, both CSR."""
    from diff_gaussian_rasterization_feat import _torch_impl as ref

    h, w = cam.image_height, cam.image_width
    means3D, opacities = rendervar["means3D"], rendervar["opacities"]
    with torch.no_grad():
        cov3D = ref.covariance_3d(rendervar["scales"], rendervar["rotations"], cam.scale_modifier)
        xy, z, conic, radii, rect = ref.project_gaussians(
            means3D, torch.zeros_like(means3D), cov3D, cam.viewmatrix, cam.projmatrix, cam.tanfovx, cam.tanfovy, h, w
        )
        ids, pixel, rank, alpha = ref.select_fragments(xy, conic, opacities, z, radii, rect, h, w)
        log_t_before, _, _ = ref.log_transmittance(torch.log1p(-alpha).double(), pixel, h * w)
        weight = alpha * torch.exp(log_t_before).to(alpha.dtype)
        # fragments come sorted by pixel, front to back (increasing rank) within a pixel: CSR as is
        by_rank = ref.stable_argsort(rank, len(ids))
        return (
            ids,
            ref.csr(pixel, rank, weight, (h * w, len(ids))),
            ref.csr(rank[by_rank], pixel[by_rank], weight[by_rank], (len(ids), h * w)),
        )


class PerCamera:
    """Values per camera made on first use (a warm-started timestep with few iterations never pays
    for the cameras it does not visit): per_camera[c] = make(c); `seconds`: the time spent making
    them, the work queued on `device` included. With `read`, every camera's read(c) (files: CPU work
    that releases the GIL) starts at once in READ_THREADS threads, and per_camera[c] = make(c, read(c))."""

    def __init__(self, num_cams, make, device="cpu", read=None):
        self.num_cams, self.make, self.made, self.device, self.seconds = num_cams, make, {}, torch.device(device), 0.0
        self.reading = None if read is None else [readers().submit(read, c) for c in range(num_cams)]

    def __len__(self):
        return self.num_cams

    def __getitem__(self, c):
        if c not in self.made:
            since = time.time()
            if self.reading is None:
                self.made[c] = self.make(c)
            else:  # the files are let go once made into the value
                self.made[c], self.reading[c] = self.make(c, self.reading[c].result()), None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds += time.time() - since
        return self.made[c]


@functools.cache
def readers():
    """The threads that read PerCamera's files ahead (one pool for the run)."""
    return concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="stage5-read")


def make_renderers(cams, rendervar, use_rasterizer):
    """Per camera a function features [N, C] -> rendered [C, H, W], differentiable in the features
    only (the geometry is detached)."""
    if use_rasterizer:
        return PerCamera(len(cams), lambda c: lambda f: render_features(cams[c], rendervar, f)[1])

    def make(c):
        ids, s, s_t = blend_matrix(cams[c], rendervar)
        h, w = cams[c].image_height, cams[c].image_width
        return lambda f: _SparseRender.apply(s, s_t, f.index_select(0, ids)).T.reshape(-1, h, w)

    return PerCamera(len(cams), make)


def initialize(num_gaussians, previous, lrs, device, seed):
    """params {'latents' [N, 128]}, a new attention module and Adam over both. With `previous` (the
    stage-5 record of t-1) latents and attention start from there (warm start); else latents start
    at zero as in the original."""
    torch.manual_seed(seed)
    attention = NeighbourAttention().to(device)
    if previous is None:
        latents = torch.zeros(num_gaussians, LEGS_DIM, device=device)
    else:
        latents = previous["latents"].to(device=device, dtype=torch.float32)
        attention.load_state_dict(previous["attention"])
    params = {"latents": nn.Parameter(latents.contiguous())}
    optimizer = torch.optim.Adam(
        [
            {"params": [params["latents"]], "lr": lrs["latents"]},
            {"params": list(attention.parameters()), "lr": lrs["attention"]},
        ],
        lr=0.0,
        eps=1e-15,
        fused=torch.device(device).type == "cuda",
    )
    return params, attention, optimizer


def camera_order(num_cams, generator):
    """Endless camera indices: random permutations, each camera once per round."""
    while True:
        yield from torch.randperm(num_cams, generator=generator).tolist()


def lifted_features(params, attention, variables):
    """features [N, 128] of the Gaussians: the attention's output for the Gaussians of variables'
    neighbours [M, K+1] (their first column); where they are not all N (a warm start trains the
    foreground alone), the others hold variables' held_features [N, 128]. Only the trained rows are
    computed: the background's attention would be thrown away."""
    features = attention(params["latents"], variables["neighbours"])
    if "held_features" in variables:
        features = variables["held_features"].index_copy(0, variables["neighbours"][:, 0], features)
    return features


def get_loss(params, attention, variables, renderer, target):
    return helpers.l1_loss(renderer(lifted_features(params, attention, variables)), target)


def train_timestep(t, setup, previous, num_iters, stop=None, show_progress=True, on_iter=None):
    """Train one timestep for num_iters iterations, or fewer where `stop` (a dict of converged's
    min_iters, window, tol) says the loss has converged; returns (params, attention, losses [iterations
    run] float32, one per iteration). setup: dict with rendervar, neighbours, renderers, targets,
    lrs, device, seed. on_iter(i, params, attention) is called after each step (used by the
    warm-start benchmark)."""
    params, attention, optimizer = initialize(
        setup["rendervar"]["means3D"].shape[0], previous, setup["lrs"], setup["device"], setup["seed"] + t
    )
    variables = {k: setup[k] for k in ("neighbours", "held_features") if k in setup}
    order = camera_order(len(setup["renderers"]), torch.Generator().manual_seed(setup["seed"] + t))
    losses = torch.zeros(num_iters, device=setup["device"])  # on the device: no host sync per iteration
    bar = helpers.progress(range(num_iters), desc=f"t={t}", leave=False, disable=not show_progress)
    for i in bar:
        c = next(order)
        loss = get_loss(params, attention, variables, setup["renderers"][c], setup["targets"][c])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses[i] = loss.detach()
        if i % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if on_iter is not None:
            on_iter(i, params, attention)
        if stop is not None and converged(losses[: i + 1], **stop):
            break
    return params, attention, losses[: i + 1]


def tail_loss(losses):
    """A timestep's reported loss: the mean of losses [n] over its last 10% iterations."""
    return float(losses[-max(1, int(TAIL_FRACTION * losses.shape[0])) :].mean())


def converged(losses, min_iters, window, tol):
    """Whether the loss has converged after len(losses) iterations: at the end of each window of
    `window` iterations (whole rounds of the cameras, so that every window sees each camera as
    often), from min_iters on, when the window's mean loss is less than `tol` (relative) below the
    previous window's. losses [n] float32, one per iteration."""
    n = losses.shape[0]
    if n < max(min_iters, 2 * window) or n % window:
        return False
    before, now = losses[n - 2 * window : n - window].mean(), losses[n - window :].mean()
    return bool(before - now < tol * before)


def stop_rule(args, previous, num_cams):
    """The `stop` of train_timestep for a timestep: None (its fixed count) for a cold start or under
    --fixed-iters, else converged's arguments, the window rounded up to whole rounds of the cameras."""
    if previous is None or args.fixed_iters:
        return None
    return {
        "min_iters": min(args.warm_min_iters, args.warm_iters),
        "tol": args.converge_tol,
        "window": math.ceil(args.converge_window / num_cams) * num_cams,
    }


def prepare_timestep(t, args, meta, params_path, ae, cache, device, use_rasterizer, previous=None):
    """Everything a timestep's training needs that does not change while it trains. Warm-started
    (`previous`, load_previous's), the background's features are held at those of the previous
    timestep, which holds them at its chain's first timestep: the background Gaussians are static
    (stage 1 holds them still), so are their features, and each record stores them once (save_legs)."""
    rendervar = helpers.load_d3dgs_params(params_path, t, device)
    held, trained_rows = {}, None
    foreground = torch.nonzero(helpers.is_foreground(rendervar["seg_colors"]))[:, 0]
    if previous is not None and len(foreground):  # (without a foreground Gaussian: every row trains)
        trained_rows, held["held_features"] = foreground, previous["features"].to(device)
    cams = helpers.cameras_at(helpers.scale_meta(meta, args.downscale), t, device=device)
    guides = None
    if args.tile_mix == "purest":

        def guides(c):
            return helpers.load_image(os.path.join(args.seq, "ims", meta["fn"][t][c]), (meta["w"], meta["h"]))

    return {
        "rendervar": rendervar,
        "neighbours": neighbour_indices(rendervar["means3D"], rows=trained_rows),
        "renderers": make_renderers(cams, rendervar, use_rasterizer),
        "targets": encode_targets(cache, t, ae, cams, device, guides),
        "lrs": {"latents": args.lr_features, "attention": args.lr_attention},
        "device": device,
        "seed": args.seed,
        **held,
    }


def state_path(out_dir, t):
    """Where the latents and attention of timestep t are kept for the warm start of t + 1: only for
    the last timestep a run trained (each rank's), the others' are deleted (they take as many bytes
    as the features and are needed by nothing else)."""
    return os.path.join(out_dir, f"state_{t:06d}.pt")


def handed_on(t, run_id, stored, rows, setup, params, attention, previous):
    """What timestep t + 1 warm-starts from, kept in memory by the run that trained t: equal, bit
    for bit, to what load_previous reads back from t's files ({'t', 'run_id', 'features' [N, 128]
    as the record reads back, 'latents' [N, 128] float16, 'attention', 'base'}). stored: the rows
    `rows` (None: all) of the features as save_legs returned them [n, 128]."""
    features = (
        stored if "held_features" not in setup else setup["held_features"].index_copy(0, rows, stored.to(rows.device))
    )
    return {
        "t": t,
        "run_id": run_id,
        "features": features,
        "latents": params["latents"].detach().to(torch.float16),
        "attention": {k: v.detach() for k, v in attention.state_dict().items()},
        "base": {"t": t, "run_id": run_id} if previous is None else previous["base"],
    }


def save_state(out_dir, start):
    """Write handed_on's `start` as the warm-start state of its timestep (state_path)."""
    helpers.save_torch(
        state_path(out_dir, start["t"]),
        {
            "t": start["t"],
            "run_id": start["run_id"],
            "latents": start["latents"].cpu(),
            "attention": {k: v.cpu() for k, v in start["attention"].items()},
        },
    )


def read_state(out_dir, t):
    """The warm-start state of timestep t ({'t', 'run_id', 'latents', 'attention'}), or None."""
    try:
        return torch.load(state_path(out_dir, t), map_location="cpu", weights_only=True)
    except Exception:  # missing, truncated or foreign: any unpickling error, and the warm start is off
        return None


def load_previous(out_dir, t, made_from, settings, train_cmd):
    """What timestep t warm-starts from, or None (a cold start) when timestep t - 1 has no usable
    record (made from `made_from`, that of t - 1) or state: {'features' [N, 128] of t - 1, 'latents'
    [N, 128], 'attention' (state dict), 'base' ({'t', 'run_id'} of the record holding the background
    rows)}; None also when t - 1 was trained with other settings."""
    path = legs_path(out_dir, t - 1)
    if t == 0 or not os.path.isfile(path):
        return None
    try:
        record = load_legs(path, t - 1, "cpu", made_from, train_cmd)
    except helpers.UserError:  # stale or unreadable: start cold rather than from it
        return None
    if helpers.differing_setting(record, settings):
        return None
    state = record if "latents" in record else read_state(out_dir, t - 1)  # format 1: the record holds them
    if state is None or state.get("run_id") != record["run_id"]:  # none, or of another training of t - 1
        return None
    return {
        "features": record["features"],
        "latents": state["latents"],
        "attention": state["attention"],
        "base": record.get("base") or {"t": t - 1, "run_id": record["run_id"]},
    }


def check_finished(out_dir, num_t, timesteps, restart, made_from, settings, train_cmd):
    """Before any training: raise UserError when a finished timestep t that stays in out_dir after this
    run (any outside `timesteps`, those inside unless restart) was made from other inputs than
    `made_from(t)` or trained with other settings than `settings`, or holds the background features of
    a timestep (its base, save_legs) that is gone, was trained again since or is trained again by
    this run, naming the first, what differs and what to do. So the timesteps of a legs/ folder are
    all made one way, and each can be read."""
    run_ids = {}  # of the finished timesteps that stay
    for t in range(num_t):
        path = legs_path(out_dir, t)
        if not os.path.isfile(path) or (restart and t in timesteps):
            continue
        record = read_legs(path, train_cmd)
        again = f"train timestep {t} and the later ones again: {train_cmd} --restart -f {t}"
        why = legs_mismatch(record, made_from(t))
        if why:
            raise helpers.UserError(f"{path} {why}; {again}")
        helpers.check_settings(path, record, settings, f"{again} (with these settings)")
        base = record.get("base")
        if base and restart and base["t"] in timesteps:
            raise helpers.UserError(
                f"{path} holds the background features of timestep {base['t']}, which this run trains again; "
                f"train them together: {train_cmd} --restart -f {base['t']}"
            )
        if base:
            check_base(record, path, run_ids.get(base["t"]), train_cmd)
        run_ids[t] = record.get("run_id")


def shard(timesteps):
    """This process's contiguous block of timesteps under torchrun (RANK / WORLD_SIZE), split as
    extract_features.py splits them (block lengths differ by at most one)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    bounds = np.linspace(0, len(timesteps), world + 1).round().astype(int)
    return timesteps[bounds[rank] : bounds[rank + 1]], rank, world


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=helpers.stage_help("train_4legs.py", __doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    helpers.add_sequence_option(p)
    p.add_argument(
        "-e",
        "--exp",
        default="exp1",
        help="experiment name: reads output/<exp>/<seq>/params.npz "
        "(stage 1), writes output/<exp>/<seq>/legs/ (default: %(default)s)",
    )
    p.add_argument(
        "--encoder",
        required=True,
        help="the --encoder of stages 3 and 4 (extract_features.py, "
        "train_autoencoder.py; viclip, color, openclip:<arch>:<ckpt>): whose features and autoencoder",
    )
    p.add_argument("-f", "--first", type=int, default=0, help="first timestep (default: %(default)s)")
    p.add_argument("-l", "--last", type=int, default=None, help="last timestep, inclusive (default: the last one)")
    p.add_argument(
        "--iters",
        type=int,
        default=2000,
        help="iterations of a cold-started timestep "
        "(no previous timestep to start from), as the original (default: %(default)s)",
    )
    p.add_argument(
        "--warm-iters",
        type=int,
        default=500,
        help="at most this many iterations of a timestep "
        "warm-started from the previous one; it stops earlier when the loss has converged (see "
        "--converge-tol) (default: %(default)s; docs/performance.md)",
    )
    p.add_argument(
        "--warm-min-iters",
        type=int,
        default=100,
        help="at least this many iterations of a warm-started timestep, at most --warm-iters (default: %(default)s)",
    )
    p.add_argument(
        "--converge-window",
        type=int,
        default=50,
        help="a warm-started timestep compares the mean "
        "loss of consecutive windows of this many iterations, rounded up to whole rounds of the train "
        "cameras (default: %(default)s)",
    )
    p.add_argument(
        "--converge-tol",
        type=float,
        default=0.01,
        help="... and stops when a window's mean is less "
        "than this fraction below the previous window's (default: %(default)s)",
    )
    p.add_argument(
        "--fixed-iters",
        action="store_true",
        help="train every warm-started timestep for --warm-iters iterations, without the convergence test",
    )
    p.add_argument("--lr-features", type=float, default=0.0025, help="Adam lr of the latents (default: %(default)s)")
    p.add_argument(
        "--lr-attention", type=float, default=0.00016, help="Adam lr of the attention (default: %(default)s)"
    )
    p.add_argument(
        "--tile-mix",
        choices=TILE_MIXES,
        default="purest",
        help="how a pixel's target feature comes "
        "from the stage-3 tiles: 'purest', the embedding of the surrounding tile (any level) whose pixels "
        "most look like it, which finds objects of one small tile's size; 'mean', the original's mean "
        "over the levels of the bilinear blend of tile centres (default: %(default)s; "
        "feature_extraction/tiles.py)",
    )
    p.add_argument(
        "--downscale",
        type=int,
        default=1,
        help="train on images downscaled by this integer factor (default: %(default)s = full resolution)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="train the timesteps of the range again even "
        "where outputs exist (needed after retraining stage 1, 3 or 4, and for other training settings: "
        "every finished timestep of legs/ is trained with the same ones)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available; under torchrun cuda:LOCAL_RANK)"
    )
    add_cache_dir_option(p)
    args = helpers.parse_with_demo(p, argv, DEMO)
    args.seq = helpers.find_sequence(args.seq)
    for option in ("iters", "warm_iters", "warm_min_iters", "converge_window", "downscale"):
        helpers.check_option(args, option, at_least=1)
    helpers.check_option(args, "converge_tol", at_least=0)
    helpers.check_option(args, "lr_features", above=0)
    helpers.check_option(args, "lr_attention", above=0)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = helpers.pick_device(args.device)
    if "LOCAL_RANK" in os.environ and device.type == "cuda" and args.device is None:
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    meta = helpers.load_meta(args.seq, "train")
    helpers.check_downscale(meta, args.downscale)
    params_path = d3dgs_params_path(args.exp, args.seq)
    num_t = helpers.read_d3dgs_params(params_path)["means3D"].shape[0]
    root = args.cache_dir or args.seq
    ae_path = ae_ckpt_path(root)
    ae, ae_info = load_autoencoder(ae_path, args.encoder, device)
    cache = feature_cache(root, args.encoder, args.seq)
    # the features of the timesteps stage 4 used (older checkpoints: of all timesteps) must be those now cached
    trained_on = ae_info.get("made_from", {})
    used = trained_on.get("timesteps", range(len(meta["fn"])))
    if trained_on.get("cache", {}).get("fingerprint") != cache_identity(cache, used)["fingerprint"]:
        raise helpers.UserError(
            f"{ae_path} was not trained on the features now in {cache} "
            f"({helpers.stage_name('extract_features.py')} computed some again since, or the "
            f"autoencoder is older): run "
            f"{helpers.stage_name('train_autoencoder.py')} again"
        )
    last = num_t - 1 if args.last is None else args.last
    if not 0 <= args.first <= last < num_t:
        raise helpers.UserError(
            f"-f {args.first} -l {last}: {params_path} of "
            f"{helpers.stage_name('train_d3dgs.py')} holds timesteps 0..{num_t - 1}"
        )
    if len(meta["fn"]) < num_t:
        raise helpers.UserError(
            f"{meta['path']} has {len(meta['fn'])} timesteps, {helpers.stage_name('train_d3dgs.py')} has {num_t}"
        )
    timesteps, rank, world = shard(list(range(args.first, last + 1)))
    out_dir = legs_dir(args.exp, args.seq)
    # what every record must have been made from: a finished timestep made from anything else is refused
    inputs = {
        "encoder": encoder_name(args.encoder),
        "ae_run_id": ae_info["run_id"],
        "downscale": args.downscale,
        "tile_mix": args.tile_mix,
    }

    def made_from(t):
        return legs_made_from(params_path, t, inputs)

    import diff_gaussian_rasterization_feat as dgrf

    use_rasterizer = device.type == "cuda" and dgrf.cuda_available()
    train_cmd = f"python train_4legs.py -s {args.seq} -e {args.exp} --encoder {args.encoder}"

    settings = {k: getattr(args, k) for k in TRAINING_SETTINGS}

    done, trained, start = 0, 0, time.time()
    warm_phases = {}  # seconds of each phase of the warm-started timesteps
    # What the next timestep starts from stays in memory; its state file (83 MB on basketball) is
    # written once, for the last timestep trained, when the run ends or stops (a run killed outright
    # leaves none, and its next timestep starts cold). States read from disk are replaced by it.
    handed, replaced = None, []
    with helpers.stage_lock(out_dir, "train_4legs"):
        check_finished(out_dir, num_t, range(args.first, last + 1), args.restart, made_from, settings, train_cmd)
        bar = helpers.progress(timesteps, desc=f"4-LEGS features{f' (rank {rank}/{world})' if world > 1 else ''}")
        try:
            for t in bar:
                path = legs_path(out_dir, t)
                if os.path.isfile(path) and not args.restart:  # resume: keep finished timesteps (check_finished)
                    done += 1
                    continue
                t0 = tick = time.time()
                phases = {}
                if handed is not None and handed["t"] == t - 1:
                    previous = handed
                else:
                    previous = None if t == 0 else load_previous(out_dir, t, made_from(t - 1), settings, train_cmd)
                    replaced += [] if previous is None else [t - 1]
                setup = prepare_timestep(t, args, meta, params_path, ae, cache, device, use_rasterizer, previous)
                tick = helpers.lap(phases, "prepare", tick, device)
                num_iters = args.iters if previous is None else args.warm_iters
                params, attention, losses = train_timestep(
                    t, setup, previous, num_iters, stop_rule(args, previous, len(setup["renderers"]))
                )
                tick = helpers.lap(phases, "iterations", tick, device)
                phases["target maps"] = setup["targets"].seconds  # made on first use, inside the iterations
                phases["iterations"] -= phases["target maps"]
                loss = tail_loss(losses)
                with torch.no_grad():
                    features = lifted_features(params, attention, setup)
                if not torch.isfinite(features).all():
                    raise helpers.UserError(
                        f"timestep {t}: the features went NaN/Inf in training (--lr-features "
                        f"{args.lr_features}, --lr-attention {args.lr_attention}); not saved, the "
                        f"finished timesteps are kept"
                    )
                run_id = uuid.uuid4().hex
                info = {
                    "t": t,
                    "loss": loss,
                    "iterations": losses.shape[0],
                    "warm_start": previous is not None,
                    "settings": settings,
                    "run_id": run_id,
                    "seconds": time.time() - t0,
                    "phase_seconds": dict(phases),
                    **made_from(t),
                }
                # a chain's first timestep stores every row (the base of what follows), a warm one its trained rows
                rows = None if previous is None else setup["neighbours"][:, 0]
                stored = save_legs(path, features, rows, None if previous is None else previous["base"], info)
                if os.path.isfile(state_path(out_dir, t)):  # of an earlier training of t (--restart): stale now
                    os.remove(state_path(out_dir, t))
                handed = handed_on(t, run_id, stored, rows, setup, params, attention, previous)
                helpers.lap(phases, "save", tick, device)
                if previous is not None:
                    for name, seconds in phases.items():
                        warm_phases.setdefault(name, []).append(seconds)
                trained += 1
                bar.set_postfix(loss=f"{loss:.4f}", warm=previous is not None, iters=losses.shape[0])
        finally:
            if handed is not None:
                save_state(out_dir, handed)
                for old in replaced:
                    if old != handed["t"] and os.path.isfile(state_path(out_dir, old)):
                        os.remove(state_path(out_dir, old))
    print(
        f"4-LEGS features: {trained} timesteps trained, {done} already done, in {time.time() - start:.0f} s "
        f"-> {out_dir}/ ({'rasterizer' if use_rasterizer else 'precomputed blend matrices'}, {device})"
    )
    if warm_phases:
        print(
            "a warm-started timestep, median seconds: "
            + ", ".join(f"{name} {statistics.median(seconds):.2f}" for name, seconds in warm_phases.items())
            + " (prepare: records, neighbour lists)"
        )


if __name__ == "__main__":
    helpers.run_main(main)
