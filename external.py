"""Image-quality functions shared by training and evaluation: SSIM (Wang et al. 2004) with the
11x11 Gaussian window (sigma 1.5) used by 3D Gaussian Splatting and Dynamic 3D Gaussians."""

import math

import torch
import torch.nn.functional as F

_WINDOWS = {}


def _window(channels, device, dtype, size=11, sigma=1.5):
    """The 11x11 Gaussian window as its two 1D factors, [C, 1, size, 1] and [C, 1, 1, size]: the
    window is separable, so two 11-tap passes replace one 121-tap pass (same result)."""
    key = (channels, device, dtype)
    if key not in _WINDOWS:
        x = torch.arange(size, dtype=torch.float64) - size // 2
        g = torch.exp(-(x**2) / (2 * sigma**2))
        g = (g / g.sum()).to(device, dtype)
        _WINDOWS[key] = (
            g.view(1, 1, size, 1).expand(channels, 1, size, 1).contiguous(),
            g.view(1, 1, 1, size).expand(channels, 1, 1, size).contiguous(),
        )
    return _WINDOWS[key]


def calc_ssim(img1, img2, per_image=False):
    """Mean SSIM of two images [C, H, W] (or [B, C, H, W]; per_image: the B means) with values in
    [0, 1]. The five local means (of x, y, x^2, y^2, xy) are blurred together, zero-padded, in
    one separable pass."""
    if img1.dim() == 3:
        img1, img2 = img1[None], img2[None]
    channels = img1.shape[1]
    col, row = _window(5 * channels, img1.device, img1.dtype)
    pad = col.shape[2] // 2
    stack = torch.cat([img1, img2, img1 * img1, img2 * img2, img1 * img2], 1)
    blurred = F.conv2d(
        F.conv2d(stack, col, padding=(pad, 0), groups=5 * channels), row, padding=(0, pad), groups=5 * channels
    )
    mu1, mu2, mean11, mean22, mean12 = blurred.split(channels, 1)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq, sigma2_sq, sigma12 = mean11 - mu1_sq, mean22 - mu2_sq, mean12 - mu12
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu12 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return ssim_map.flatten(1).mean(1) if per_image else ssim_map.mean()


# ================================================================ densification (Dynamic 3D Gaussians, stage 1)
# Adaptive density control of 3D Gaussian Splatting (Kerbl et al. 2023) as Dynamic 3D Gaussians
# runs it at timestep 0. `params` holds the optimised tensors; the torch Adam's param groups carry
# the same names, and its moments follow every change of the rows (new rows start at zero).

NOT_PER_GAUSSIAN = ("cam_m", "cam_c", "env_map")  # per camera; the environment map (helpers.D3DGS_ENV_MAP)


def densify_schedule(num_iters, grad_thresh=0.0002, max_gaussians=None):
    """The original's schedule for 10,000 iterations, scaled to num_iters: densify every 1% from
    5% to 50% of the iterations (at least every 10), reset opacities at 30%, prune big Gaussians from 30%, prune with
    the higher opacity bar (0.25) at 50%. At 10,000: every 100 from 500 to 5,000, reset at 3,000.
    Below 2,000 iterations there is no reset (and no higher bar): at lr 0.05 an opacity needs
    ~70 steps to climb back from 0.01 to 0.25, and a short run would prune everything.
    max_gaussians: no cloning or splitting that would pass this count (pruning goes on)."""
    every = max(10, round(0.01 * num_iters))  # average the gradient over some views, even in short runs
    return {
        "start": every * max(1, round(0.05 * num_iters / every)),
        "stop": every * round(0.5 * num_iters / every),
        "every": every,
        "reset": round(0.3 * num_iters) if num_iters >= 2000 else None,
        "big_from": round(0.3 * num_iters),
        "grad_thresh": grad_thresh,
        "max_gaussians": max_gaussians,
    }


def _replace_param(params, optimizer, name, value, moments):
    """Put `value` in place of params[name] and in its param group; moments(old) -> new Adam moments.
    A tensor that the optimiser does not hold (fixed, like seg_colors) is just replaced."""
    group = next((g for g in optimizer.param_groups if g["name"] == name), None)
    if group is None:
        params[name] = value.detach().contiguous()
        return
    state = optimizer.state.pop(group["params"][0], None)
    param = torch.nn.Parameter(value.detach().contiguous())
    group["params"][0] = param
    if state:
        state["exp_avg"], state["exp_avg_sq"] = moments(state["exp_avg"]), moments(state["exp_avg_sq"])
        optimizer.state[param] = state
    params[name] = param


def update_params_and_optimizer(new_values, params, optimizer):
    """Replace whole tensors (same shapes), restarting their Adam moments from zero."""
    for name, value in new_values.items():
        _replace_param(params, optimizer, name, value, torch.zeros_like)
    return params


def cat_params_to_optimizer(new_rows, params, optimizer):
    """Append rows to per-Gaussian tensors; their Adam moments start at zero."""
    for name, rows in new_rows.items():
        _replace_param(
            params,
            optimizer,
            name,
            torch.cat([params[name].detach(), rows]),
            lambda m, rows=rows: torch.cat([m, torch.zeros_like(rows)]),
        )
    return params


def remove_points(to_remove, params, variables, optimizer):
    """Drop the Gaussians where to_remove [N] bool is set, from params, Adam and the accumulators."""
    keep = ~to_remove
    for name in [k for k in params if k not in NOT_PER_GAUSSIAN]:
        _replace_param(params, optimizer, name, params[name][keep], lambda m: m[keep])
    for name in ("means2D_gradient_accum", "denom", "seen"):
        if name in variables:
            variables[name] = variables[name][keep]
    return params, variables


def accumulate_mean2d_gradient(variables, means2D_grad, radii):
    """Add the screen-space gradient norm of every Gaussian on screen (radii > 0) to its running
    sum; torch.where rather than boolean indexing, so the GPU never waits for the CPU."""
    seen = radii > 0
    variables["means2D_gradient_accum"] += torch.where(seen, means2D_grad[:, :2].norm(dim=-1), 0.0)
    variables["denom"] += seen
    if "seen" in variables:
        variables["seen"] |= seen
    return variables


def apparent_size(params, variables):
    """Largest scale of each Gaussian [N], divided by its distance from variables['scene_center']
    in scene radii where that is more than one: beyond the cameras (a far wall, the sky) a
    Gaussian is judged by the angle it covers from the rig, as near ones are by their size."""
    scale = torch.exp(params["log_scales"].detach()).max(dim=1).values
    center = variables.get("scene_center")
    if center is None:
        return scale
    reach = (params["means3D"].detach() - center).norm(dim=1) / variables["scene_radius"]
    return scale / reach.clamp(min=1.0)


def densify(params, variables, optimizer, i, schedule, means2D_grad, radii):
    """One iteration of adaptive density control (call after the optimiser step of iteration i).

    Until schedule['stop']: accumulate the screen-space gradient; every schedule['every'] from
    schedule['start']: clone small (<= 1% of the scene radius) and split large Gaussians in two
    (scale / 1.6, positions sampled from the parent) where the mean gradient >= grad_thresh, then
    prune opacity < 0.005 (0.25 at 'stop') and, from 'big_from', Gaussians larger than 10% of the
    scene radius (sizes as apparent_size); reset all opacities to 0.01 at 'reset' (if any).
    Gaussians that no train view has shown yet (variables['seen'], where given: a wall above every
    camera's view, say) keep their opacity through resets and opacity pruning, since
    nothing could fit them: a test view off the rig still finds them there. variables:
    scene_radius (float), scene_center [3] and seen [N] bool (optional), means2D_gradient_accum
    [N], denom [N]. Returns params, variables.
    """
    if i > schedule["stop"]:
        return params, variables
    variables = accumulate_mean2d_gradient(variables, means2D_grad, radii)
    radius = variables["scene_radius"]
    if i >= schedule["start"] and i % schedule["every"] == 0:
        accum, denom = variables["means2D_gradient_accum"], variables["denom"]
        grads = torch.where(denom > 0, accum / denom.clamp(min=1), 0.0)
        size = apparent_size(params, variables)
        big = size > 0.01 * radius
        to_clone = (grads >= schedule["grad_thresh"]) & ~big
        to_split = (grads >= schedule["grad_thresh"]) & big
        cap = schedule.get("max_gaussians")
        if cap and len(grads) + int(to_clone.sum()) + int(to_split.sum()) > cap:
            to_clone, to_split = torch.zeros_like(to_clone), torch.zeros_like(to_split)
        per_gaussian = [k for k in params if k not in NOT_PER_GAUSSIAN]
        clones = {k: params[k].detach()[to_clone] for k in per_gaussian}
        children = {k: params[k].detach()[to_split].repeat(2, 1) for k in per_gaussian}
        stds = torch.exp(children["log_scales"])
        rot = _build_rotation(children["unnorm_rotations"])
        children["means3D"] = children["means3D"] + (rot @ torch.normal(0.0, stds)[:, :, None])[:, :, 0]
        children["log_scales"] = children["log_scales"] - math.log(0.8 * 2)
        num_new = int(to_clone.sum()) + 2 * int(to_split.sum())
        params = cat_params_to_optimizer(
            {k: torch.cat([clones[k], children[k]]) for k in per_gaussian}, params, optimizer
        )
        n = params["means3D"].shape[0]
        variables["means2D_gradient_accum"] = torch.zeros(n, device=accum.device)
        variables["denom"] = torch.zeros(n, device=accum.device)
        if "seen" in variables:  # clones and children were seen: they had gradients
            new_seen = torch.ones(num_new, dtype=torch.bool, device=accum.device)
            variables["seen"] = torch.cat([variables["seen"], new_seen])
        # the split parents go, and with them (one reallocation instead of two) the pruned ones
        remove_threshold = 0.25 if i == schedule["stop"] and schedule["reset"] else 0.005
        to_remove = torch.cat([to_split, torch.zeros(num_new, dtype=torch.bool, device=accum.device)])
        faint = torch.sigmoid(params["logit_opacities"][:, 0]) < remove_threshold
        to_remove |= faint & variables["seen"] if "seen" in variables else faint
        if i >= schedule["big_from"]:
            to_remove |= apparent_size(params, variables) > 0.1 * radius
        params, variables = remove_points(to_remove, params, variables, optimizer)
    if schedule["reset"] and i > 0 and i % schedule["reset"] == 0:
        reset = torch.full_like(params["logit_opacities"], math.log(0.01 / 0.99))
        if "seen" in variables:
            reset = torch.where(variables["seen"][:, None], reset, params["logit_opacities"].detach())
        update_params_and_optimizer({"logit_opacities": reset}, params, optimizer)
    return params, variables


def _build_rotation(q):
    from diff_gaussian_rasterization._torch_impl import quat_to_rotmat

    return quat_to_rotmat(q)
