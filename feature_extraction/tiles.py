"""The spatio-temporal tile pyramid of 4-LEGS (stage 3, extract_features.py), as index arithmetic.

Per timestep t and camera: the 8-frame clip t-4 .. t+3, clamped to the sequence (clip_frames), so
frame t is always the clip's fifth. Per level: square tiles of side k = int(H * ratio)
for 5 ratios linspace(0.15, 0.6) (float32, as torch.linspace gives them), stride int(k * 0.5),
zero padding k // 2 on every side (torch.nn.Unfold's sliding window), so tile (i, j) covers rows
s*i - k//2 .. s*i - k//2 + k - 1 and its centre is at (k-1)/2 - k//2 + s*i (likewise columns).
A pixel's feature at one level is the bilinear interpolation of the four surrounding tile-centre
embeddings, the grid extended by repeating its last row and column; the dense map is the mean of
the levels. Pixel (row y, column x) sits at integer coordinates, as in the original.

The purest tile (train_4legs.py's default --tile-mix, ours): the mean over levels drowns an object
that fills about one tile of the finest level, since the larger levels see it as a few percent of
their pixels (docs/benchmark.md measures it), and the bilinear blend spreads it over its
neighbours. Instead each pixel takes the embedding of one tile: among the tiles whose centres
surround it (the four of the bilinear interpolation, on every level) the one whose pixels most
look like it, i.e. the largest share of the tile's pixels in the pixel's colour bin (COLOUR_BINS
per channel, trilinear soft binning, the clip's frame t as the guide); between equally pure tiles
the larger one, so that a uniform region keeps the most context. The embeddings are then the
encoder's own, never blends.

Reuse (extract_features.py): a tile's clip is compared with another clip of the same tile through
their shrunken images, REUSE_GRID x REUSE_GRID cells per frame (crop_tiles at that size, so each
cell is the antialiased mean of its patch of the tile); clip_change is the largest change of one
cell in one frame, the mean over RGB of |difference| (values in [0, 1]).
"""

import numpy as np
import torch
import torch.nn.functional as F

from helpers import UserError

TILE_RATIO_RANGE = (0.15, 0.6)
NUM_LEVELS = 5
STRIDE_SCALER = 0.5
CLIP_OFFSETS = tuple(range(-4, 4))  # frames t-4 .. t+3
REUSE_GRID = 8  # cells per side of the shrunken tile images that clip_change compares
COLOUR_BINS = 6  # bins per RGB channel of the purest tile's colour histograms
HISTOGRAM_ELEMENTS = 2**25  # float32 elements of the soft one-hot that tile_histograms holds at a time (128 MiB)
TILE_MIXES = ("purest", "mean")  # train_4legs.py's --tile-mix: ours, the original's


def tile_ratios():
    """The 5 tile ratios, float32 values as the original's torch.linspace holds them."""
    return torch.linspace(*TILE_RATIO_RANGE, NUM_LEVELS).tolist()


def tile_levels(height, width):
    """Geometry of every level of an image of height x width pixels: list of dicts with kernel k,
    stride, padding, rows, cols (tile-grid size) and ratio. At 640x360: k = 54, 94, 135, 175, 216
    and 14x24 + 8x14 + 6x10 + 5x8 + 4x6 = 572 tiles."""
    levels = []
    for ratio in tile_ratios():
        k = int(height * ratio)
        stride = int(k * float(np.interp(ratio, [0.05, 0.15], [1.0, STRIDE_SCALER])))
        if k < 1 or stride < 1:
            raise UserError(f"image height {height}: too small for tiles of {ratio:.3f} x the height")
        pad = k // 2
        levels.append(
            {
                "ratio": ratio,
                "kernel": k,
                "stride": stride,
                "padding": pad,
                "rows": (height + 2 * pad - k) // stride + 1,
                "cols": (width + 2 * pad - k) // stride + 1,
            }
        )
    return levels


def tile_centers(level, n):
    """Centres (pixels) of the first n tiles of a level along one axis: (k-1)/2 - k//2 + stride*i."""
    return (level["kernel"] - 1) / 2 - level["padding"] + level["stride"] * np.arange(n)


def clip_frames(t, num_timesteps, offsets=CLIP_OFFSETS):
    """Frame indices of timestep t's clip: t-4 .. t+3, each clamped to the sequence (t=0:
    0,0,0,0,0,1,2,3), so that frame t is always the fifth, where the clip's middle is. The
    original drops the frames before the first and pads the clip with its last (t=0:
    0,1,2,3,3,3,3,3): the same frames, but at t < 4 its middle shows a frame 1-3 timesteps
    ahead, and an action starting at timestep 4 was found from timestep 2 on (scene family seed 4).
    At the end both repeat the last frame."""
    return [min(max(t + o, 0), num_timesteps - 1) for o in offsets]


def tile_index(levels, num_cams):
    """Every tile of a timestep in cache order (level, camera, row, col): int64 tensors
    level [M], cam [M], row [M], col [M]."""
    parts = []
    for li, lv in enumerate(levels):
        cam, row, col = torch.meshgrid(
            torch.arange(num_cams), torch.arange(lv["rows"]), torch.arange(lv["cols"]), indexing="ij"
        )
        parts.append(torch.stack([torch.full_like(cam, li), cam, row, col]).flatten(1))
    return torch.cat(parts, 1).unbind(0)


def pad_frames(frames, levels):
    """frames uint8 [C, T, H, W, 3] (any device) -> (zero-padded uint8 [C, H + 2P, W + 2P, T*3],
    P = the largest padding of the levels): what crop_tiles cuts from. Channels last, so that a
    tile's pixels are contiguous runs of T*3 bytes."""
    c, t, h, w, _ = frames.shape
    pad = max(lv["padding"] for lv in levels)
    x = frames.permute(0, 2, 3, 1, 4).reshape(c, h, w, t * 3)
    return F.pad(x, (0, 0, pad, pad, pad, pad)), pad


def crop_tiles(padded, pad, level, cam, row, col, size):
    """The tiles (cam[i], row[i], col[i]) of one level, cut from pad_frames' output and resized to
    size x size (bilinear, half-pixel centres; antialiased when shrinking, as torchvision's Resize
    does): float32 [n, T, 3, size, size] in [0, 1]. One gather, no loop over tiles. On the CPU the
    resize runs on uint8 (PyTorch's vectorised path, ~20x faster; values round to whole levels)."""
    k, s, off = level["kernel"], level["stride"], pad - level["padding"]
    windows = padded[:, off:, off:].unfold(1, k, s).unfold(2, k, s)  # view [C, r, c, T*3, k, k]
    crops = windows.permute(0, 1, 2, 4, 5, 3)[cam, row, col]  # [n, k, k, T*3]
    n, frames = len(crops), crops.shape[-1] // 3
    x = crops.view(n, k, k, frames, 3).permute(0, 3, 1, 2, 4).reshape(n * frames, k, k, 3).permute(0, 3, 1, 2)
    if x.device.type != "cpu":
        x = x.float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=k > size)
    return x.float().reshape(n, frames, 3, size, size).div_(255.0)


def crop_batches(padded, pad, levels, index, batch_size, size):
    """The tiles of `index` (tile_index tensors, or a subset of them kept in that order, so sorted by
    level), cut from pad_frames' output by crop_tiles at size x size, in batches of at most batch_size:
    yields (start, stop, float32 [stop - start, T, 3, size, size] in [0, 1]) for index[start:stop]. A
    batch may span two levels (tile sizes): each level's share is cut at its own size."""
    level, cam, row, col = index
    ends = torch.bincount(level, minlength=len(levels)).cumsum(0).tolist()
    for start in range(0, len(level), batch_size):
        stop = min(start + batch_size, len(level))
        parts = []
        for lv, first, end in zip(levels, [0] + ends[:-1], ends):
            a, b = max(first, start), min(end, stop)
            if a < b:
                parts.append(crop_tiles(padded, pad, lv, cam[a:b], row[a:b], col[a:b], size))
        yield start, stop, torch.cat(parts)


def clip_change(shrunk, reference):
    """shrunk, reference: float [M, T, 3, G, G], two clips of each of M tiles at size G = REUSE_GRID
    (crop_batches) -> float32 [M]: per tile the largest, over frames and cells, of the mean over RGB of
    |shrunk - reference|. One cell of one frame decides, so a small object that moves in a large
    tile is not averaged away."""
    return (shrunk.float() - reference.float()).abs_().mean(2).amax((1, 2, 3))


def interp_matrix(level, n, out_size, src_size, device):
    """[out_size, n] float32 weights of bilinear interpolation along one axis between a level's n
    tile centres, for out_size pixels spanning an image axis of src_size pixels (the tiles' image;
    other sizes are mapped by pixel centres). Beyond the last centre the grid's last row repeats,
    as the original pads it; the weight of each pixel's lower centre is 1 - frac, upper frac."""
    y = torch.arange(out_size, dtype=torch.float64)
    if out_size != src_size:
        y = (y + 0.5) * (src_size / out_size) - 0.5
    u = ((y - float(tile_centers(level, 1)[0])) / level["stride"]).clamp(0, n - 1)
    lo = u.floor().long()
    frac = (u - lo).float()
    hi = (lo + 1).clamp(max=n - 1)
    m = torch.zeros(out_size, n)
    m[torch.arange(out_size), lo] += 1 - frac
    m[torch.arange(out_size), hi] += frac
    return m.to(device)


def dense_from_grids(grids, levels, src_hw, out_hw, device):
    """Mean over levels of the bilinear interpolation of tile-centre grids.

    grids: per level a [rows, cols, D] array/tensor (one camera); src_hw: (H, W) of the tiles'
    image; out_hw: (height, width) wanted. Returns float32 [D, height, width] on `device`: per level
    R_rows @ grid @ R_cols^T, two matrix products, no loop over pixels or tiles.
    """
    (h, w), dim = out_hw, grids[0].shape[-1]
    out = torch.zeros(dim, h, w, device=device)
    for grid, lv in zip(grids, levels):
        g = torch.from_numpy(np.array(grid, dtype=np.float32)).to(device).permute(2, 0, 1)  # [D, rows, cols]
        r_rows = interp_matrix(lv, g.shape[1], h, src_hw[0], device)
        r_cols = interp_matrix(lv, g.shape[2], w, src_hw[1], device)
        out.baddbmm_(r_rows.expand(dim, -1, -1), g @ r_cols.T)
    return out.div_(len(levels))


def soft_colour_bins(image):
    """image float [3, ...] in [0, 1] -> (bins int64 [8, ...], weights [8, ...]): trilinear soft
    assignment of every pixel to the COLOUR_BINS^3 bins of the RGB cube (weights sum to 1)."""
    x = image.clamp(0, 1) * (COLOUR_BINS - 1)
    lo = x.floor().clamp(max=COLOUR_BINS - 2)
    frac = x - lo
    lo = lo.long()
    bins, weights = [], []
    for corner in range(8):
        up = [(corner >> axis) & 1 for axis in range(3)]
        bins.append(((lo[0] + up[0]) * COLOUR_BINS + lo[1] + up[1]) * COLOUR_BINS + lo[2] + up[2])
        weights.append(torch.stack([frac[a] if up[a] else 1 - frac[a] for a in range(3)]).prod(0))
    return torch.stack(bins), torch.stack(weights)


def box_matrix(level, n, size, device):
    """[n, size] float32: row i holds 1 / kernel over the pixels (of an axis of `size`) that tile i
    of a level covers along that axis, 0 elsewhere, zero padding left out. A tile's mean over its
    kernel x kernel window, padding counted as zeros, is rows_box @ image @ cols_box^T."""
    first = torch.arange(n)[:, None] * level["stride"] - level["padding"]
    pixel = torch.arange(size)[None]
    covered = (pixel >= first) & (pixel < first + level["kernel"])
    return (covered.float() / level["kernel"]).to(device)


def tile_histograms(guide, levels, chunk=None):
    """guide float [3, H, W] in [0, 1] -> per level float32 [COLOUR_BINS^3, rows * cols]: the share of
    each tile's pixels in each colour bin (soft), zero padding counted as no colour, as the tiles
    hold it. Each tile's window sum is separable: a product with every level's column boxes at once,
    then with each level's row boxes (box_matrix), instead of pooling windows of up to 0.6 H pixels
    a side. Bins are taken `chunk` at a time (default: as many as HISTOGRAM_ELEMENTS allows: 144 of
    the 216 at 640x360), so memory stays at chunk x H x W."""
    (h, w), device = guide.shape[1:], guide.device
    chunk = chunk or max(1, min(COLOUR_BINS**3, HISTOGRAM_ELEMENTS // (h * w) - 1))  # + 1 row: other bins
    bins, weights = soft_colour_bins(guide)
    col_boxes = torch.cat([box_matrix(lv, lv["cols"], w, device) for lv in levels])  # [sum of cols, W]
    row_boxes = [box_matrix(lv, lv["rows"], h, device) for lv in levels]
    splits = [lv["cols"] for lv in levels]
    out = [[] for _ in levels]
    for first in range(0, COLOUR_BINS**3, chunk):
        n = min(chunk, COLOUR_BINS**3 - first)
        onehot = torch.zeros(n + 1, h, w, device=device)  # last row: other bins
        onehot.scatter_add_(0, torch.where((bins >= first) & (bins < first + n), bins - first, n), weights)
        by_cols = (onehot[:n] @ col_boxes.T).split(splits, dim=2)  # per level [n, H, cols]
        for hist, rows, part in zip(out, row_boxes, by_cols):
            hist.append((rows @ part).flatten(1))  # [chunk, rows * cols]
    return [torch.cat(hist) for hist in out]


def purest_tiles(levels, guide, out_hw):
    """For every pixel of an out_hw image, the index of its purest tile (module docstring) into the
    levels' tiles concatenated in cache order (level, row, col) of one camera: int64 [height * width].

    guide float [3, H, W] in [0, 1] at the tiles' image size (the clip's frame t); other out_hw map
    pixel centres onto it (the pixels' colours from the guide resized, antialiased)."""
    (h, w), (src_h, src_w) = out_hw, guide.shape[1:]
    device = guide.device
    pixels = (
        guide
        if (h, w) == (src_h, src_w)
        else F.interpolate(guide[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    )
    bins, weights = soft_colour_bins(pixels.reshape(3, -1))  # [8, P]
    self_share = (weights**2).sum(0)  # the share a tile all of this colour scores
    best = torch.full((h * w,), -1.0, device=device)
    choice = torch.zeros(h * w, dtype=torch.long, device=device)
    offsets = np.cumsum([0] + [lv["rows"] * lv["cols"] for lv in levels])
    hists = tile_histograms(guide, levels)
    for li in reversed(range(len(levels))):  # coarse to fine: a finer tile wins only when purer
        lv, hist = levels[li], hists[li]
        rows = interp_matrix(lv, lv["rows"], h, src_h, device)
        cols = interp_matrix(lv, lv["cols"], w, src_w, device)
        row_w, row_i = rows.topk(min(2, lv["rows"]), dim=1)  # the (at most) two centres around each pixel
        col_w, col_i = cols.topk(min(2, lv["cols"]), dim=1)
        for a in range(row_w.shape[1]):
            for b in range(col_w.shape[1]):
                surrounds = (row_w[:, a, None] > 0) & (col_w[None, :, b] > 0)  # [h, w]
                tile = (row_i[:, a, None] * lv["cols"] + col_i[None, :, b]).reshape(-1)
                share = (hist[bins, tile] * weights).sum(0) / self_share
                better = surrounds.reshape(-1) & (share > best)
                best = torch.where(better, share, best)
                choice = torch.where(better, tile + int(offsets[li]), choice)
    return choice


def dense_purest(grids, levels, guide, out_hw, device, encode=None):
    """grids: per level [rows, cols, D] (one camera); guide float [3, H, W] in [0, 1] (the clip's
    frame t at the tiles' image size) -> float32 [D, height, width] on `device`: each pixel's purest
    tile's embedding (purest_tiles). encode: a function of rows [M, D] -> [M, D'] that treats each row
    alone (the autoencoder's encoder in eval mode): applied to the tiles before the selection, which
    equals applying it to every pixel after, for hundreds of rows instead of the image's pixels;
    the result is then [D', height, width]."""
    flat = torch.cat([torch.from_numpy(np.array(g, dtype=np.float32)).flatten(0, 1) for g in grids]).to(device)
    if encode is not None:
        flat = encode(flat)
    choice = purest_tiles(levels, guide.to(device, torch.float32), out_hw)
    return flat.T.contiguous().index_select(1, choice).reshape(-1, *out_hw)  # written in place, not transposed after
