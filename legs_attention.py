"""Fused Triton kernels of the 4-LEGS neighbour attention (train_4legs.attend_batched, the same function).

Each Gaussian i (query) attends over the K+1 latents of its neighbour list n_i0..n_iK (itself first):

    s_ij = q_k_i . f_{n_ij}                      scores           [N, K+1]
    a_ij = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij)   (softmax over the K+1 slots)
    mixed_i = sum_j a_ij f_{n_ij}                 output           [N, D]

with f = latents [N, D] and q_k [N, D] the queries already mapped through the key weights
(train_4legs.attention_function). The queries may be M of the N Gaussians (a warm-started timestep
trains the foreground's alone): neighbours [M, K+1], q_k and mixed [M, D]. The forward kernel
streams the K+1 gathered rows of a block of Gaussians through registers once, with an online
softmax (running maximum m, running sum denom, accumulator rescaled by exp(m_old - m_new)), so that
the [N, K+1, D] gather is never stored; it keeps lse = m + log(denom) [N] for the backward pass.

Backward, given dmixed [N, D] (flash-attention style: the scores are recomputed, not stored):

    delta_i = dmixed_i . mixed_i              (= sum_j a_ij g_ij)
    g_ij    = dmixed_i . f_{n_ij}
    ds_ij   = a_ij (g_ij - delta_i)           gradient of the score s_ij
    dq_k_i  = sum_j ds_ij f_{n_ij}
    df_m    = sum_{(i, j): n_ij = m} (a_ij dmixed_i + ds_ij q_k_i)

the last a scatter (float32 atomic adds) since a latent is the neighbour of several Gaussians; its
order of additions, and so its last bits, vary from run to run.

On a machine without a GPU the kernels run on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1 set before triton is imported), which is how the tests check them there.
"""

import torch
import triton
import triton.language as tl

# Launch: BLOCK_N Gaussians per program, one per warp. The kernels are bound by the gathers and the
# scatter, so they want many rows in flight per SM, i.e. few registers per thread: ptxas (sm_90, D = 128,
# K+1 = 21) gives 40 (forward) and 64 (backward) registers, no spills, against 240 and 255 (backward spills)
# at 32 Gaussians on 4 warps. Timed on the H100 at 300k x 21 x 128 (forward + backward, docs/performance.md):
# 4x4 5.35 ms, 8x8 5.39, 16x8 5.50, 32x8 5.60, 16x4 5.66: within noise of each other; 8x8 kept.
BLOCK_N = 8
NUM_WARPS = 8


@triton.jit
def _attend_fwd_kernel(
    latents_ptr,
    neighbours_ptr,
    q_k_ptr,
    mixed_ptr,
    lse_ptr,
    n,
    NUM_SLOTS: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One block of BLOCK Gaussians: mixed [BLOCK, D] and lse [BLOCK] (online softmax over the slots)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n
    cols = tl.arange(0, D)
    tile_ok = row_ok[:, None]
    q = tl.load(q_k_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=tile_ok, other=0.0)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK,), tl.float32)  # the softmax's running sum of exp(s - m)
    acc = tl.zeros((BLOCK, D), tl.float32)
    for j in range(NUM_SLOTS):
        idx = tl.load(neighbours_ptr + rows.to(tl.int64) * NUM_SLOTS + j, mask=row_ok, other=0)
        near = tl.load(latents_ptr + idx[:, None] * D + cols[None, :], mask=tile_ok, other=0.0)
        s = tl.sum(q * near, axis=1)
        m_new = tl.maximum(m, s)
        rescale = tl.exp(m - m_new)  # 0 on the first slot (m = -inf)
        p = tl.exp(s - m_new)
        denom = denom * rescale + p
        acc = acc * rescale[:, None] + p[:, None] * near
        m = m_new
    tl.store(mixed_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], acc / denom[:, None], mask=tile_ok)
    tl.store(lse_ptr + rows, m + tl.log(denom), mask=row_ok)


@triton.jit
def _attend_bwd_kernel(
    latents_ptr,
    neighbours_ptr,
    q_k_ptr,
    mixed_ptr,
    lse_ptr,
    dmixed_ptr,
    dlatents_ptr,
    dq_k_ptr,
    n,
    NUM_SLOTS: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    NEED_DLATENTS: tl.constexpr,
    NEED_DQ_K: tl.constexpr,
):
    """One block of BLOCK Gaussians: dq_k [BLOCK, D] stored, their share of dlatents scattered."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n
    cols = tl.arange(0, D)
    tile_ok = row_ok[:, None]
    tile = rows.to(tl.int64)[:, None] * D + cols[None, :]
    q = tl.load(q_k_ptr + tile, mask=tile_ok, other=0.0)
    dmixed = tl.load(dmixed_ptr + tile, mask=tile_ok, other=0.0)
    delta = tl.sum(dmixed * tl.load(mixed_ptr + tile, mask=tile_ok, other=0.0), axis=1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK, D), tl.float32)
    for j in range(NUM_SLOTS):
        idx = tl.load(neighbours_ptr + rows.to(tl.int64) * NUM_SLOTS + j, mask=row_ok, other=0)
        near_tile = idx[:, None] * D + cols[None, :]
        near = tl.load(latents_ptr + near_tile, mask=tile_ok, other=0.0)
        a = tl.exp(tl.sum(q * near, axis=1) - lse)
        ds = a * (tl.sum(dmixed * near, axis=1) - delta)
        if NEED_DQ_K:
            dq += ds[:, None] * near
        if NEED_DLATENTS:
            tl.atomic_add(dlatents_ptr + near_tile, a[:, None] * dmixed + ds[:, None] * q, mask=tile_ok, sem="relaxed")
    if NEED_DQ_K:
        tl.store(dq_k_ptr + tile, dq, mask=tile_ok)


def _check_inputs(latents, neighbours, q_k):
    n, d = latents.shape
    if d & (d - 1) or not 16 <= d <= 256:
        raise ValueError(
            f"attend_fused: latent size D = {d} must be a power of two in [16, 256] "
            f"(the kernels hold [BLOCK_N, D] tiles); use train_4legs.attend_batched otherwise"
        )
    if latents.dtype != torch.float32 or q_k.dtype != torch.float32:
        raise ValueError(f"attend_fused: latents and q_k must be float32, got {latents.dtype} and {q_k.dtype}")
    if neighbours.dtype != torch.int64 or neighbours.dim() != 2:
        raise ValueError(
            f"attend_fused: neighbours must be int64 [M, K+1], got {neighbours.dtype} {list(neighbours.shape)}"
        )
    if q_k.shape != (neighbours.shape[0], d):
        raise ValueError(f"attend_fused: q_k {list(q_k.shape)} must be [M, D] = {[neighbours.shape[0], d]}")
    if not (latents.device == neighbours.device == q_k.device):
        raise ValueError("attend_fused: latents, neighbours and q_k must be on one device")


class AttendFused(torch.autograd.Function):
    """Autograd of the fused kernels; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, latents, neighbours, q_k, block_n, num_warps):
        _check_inputs(latents, neighbours, q_k)
        latents, neighbours, q_k = latents.contiguous(), neighbours.contiguous(), q_k.contiguous()
        n, d = q_k.shape  # the query rows; latents may hold more
        mixed = torch.empty_like(q_k)
        lse = torch.empty(n, dtype=torch.float32, device=latents.device)
        grid = (triton.cdiv(n, block_n),)
        _attend_fwd_kernel[grid](
            latents,
            neighbours,
            q_k,
            mixed,
            lse,
            n,
            NUM_SLOTS=neighbours.shape[1],
            D=d,
            BLOCK=block_n,
            num_warps=num_warps,
        )
        ctx.save_for_backward(latents, neighbours, q_k, mixed, lse)
        ctx.launch = (block_n, num_warps)
        return mixed

    @staticmethod
    def backward(ctx, dmixed):
        latents, neighbours, q_k, mixed, lse = ctx.saved_tensors
        need_dlatents, _, need_dq_k = ctx.needs_input_grad[:3]
        if not (need_dlatents or need_dq_k):
            return None, None, None, None, None
        block_n, num_warps = ctx.launch
        n, d = q_k.shape
        dlatents = torch.zeros_like(latents) if need_dlatents else None
        dq_k = torch.empty_like(q_k) if need_dq_k else None
        grid = (triton.cdiv(n, block_n),)
        _attend_bwd_kernel[grid](
            latents,
            neighbours,
            q_k,
            mixed,
            lse,
            dmixed.contiguous(),
            dlatents if need_dlatents else latents,  # an unused pointer when not needed
            dq_k if need_dq_k else q_k,
            n,
            NUM_SLOTS=neighbours.shape[1],
            D=d,
            BLOCK=block_n,
            NEED_DLATENTS=need_dlatents,
            NEED_DQ_K=need_dq_k,
            num_warps=num_warps,
        )
        return dlatents, None, dq_k, None, None


def attend_fused(latents, neighbours, q_k, block_n=BLOCK_N, num_warps=NUM_WARPS):
    """sum_j softmax_j(q_k_i . f_nij) f_nij, fused (the function of train_4legs.attend_batched).

    latents [N, D] float32 (f), neighbours [M, K+1] int64 (a row per query: the Gaussian itself,
    then its K nearest), q_k [M, D] float32 -> mixed [M, D] float32; differentiable in latents and
    q_k. D a power of two (128 in 4-LEGS). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    block_n (a power of two) and num_warps set the launch (Gaussians per program, warps per program)."""
    return AttendFused.apply(latents, neighbours, q_k, block_n, num_warps)
