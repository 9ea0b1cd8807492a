"""In which order does PyTorch on the GPU sum the small products of the reference projection?

The CUDA projection (csrc/projection.cu) reproduces the reference's radii bit for bit only if it
rounds every step as torch does: cuBLAS for `p_hom @ viewmatrix`, `J @ R` and the covariance
products, torch's reduction kernel for `q.norm()`. For each of those this prints the fraction of
outputs bit-equal to each candidate summation order (computed with explicit round-to-nearest
intrinsics through CuPy). projection.cu uses the orders that match 100%:

    python benchmarks/rasterizer_rounding_check.py      (needs a GPU, torch and cupy)

Measured 2026-11-24 on the device H100, torch 2.11 + CUDA 13: sequential fused multiply-adds for
every matrix product, (w^2 + y^2) + (x^2 + z^2) for the norm; all at 1k, 100k and 1M rows.
"""

import argparse
import functools

import torch

import diff_gaussian_rasterization._torch_impl as ti

DOTS_SOURCE = r"""
extern "C" __global__ void dots(const float* a, const float* b, int K, long long M, int mode, float* out) {
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= M) return;
  const float* x = a + i * K; const float* y = b + i * K;
  float acc = 0.f;
  if (mode == 0) {         // sequential fma: x0 y0, then fma per term
    acc = __fmul_rn(x[0], y[0]);
    for (int k = 1; k < K; ++k) acc = __fmaf_rn(x[k], y[k], acc);
  } else if (mode == 1) {  // the same from the last term
    acc = __fmul_rn(x[K - 1], y[K - 1]);
    for (int k = K - 2; k >= 0; --k) acc = __fmaf_rn(x[k], y[k], acc);
  } else if (mode == 2) {  // products rounded, summed in order
    acc = __fmul_rn(x[0], y[0]);
    for (int k = 1; k < K; ++k) acc = __fadd_rn(acc, __fmul_rn(x[k], y[k]));
  } else if (mode == 3) {  // (p0 + p1) + (p2 + p3)
    float p1 = __fmul_rn(x[2], y[2]);
    if (K == 4) p1 = __fadd_rn(p1, __fmul_rn(x[3], y[3]));
    acc = __fadd_rn(__fadd_rn(__fmul_rn(x[0], y[0]), __fmul_rn(x[1], y[1])), p1);
  } else {                 // (p0 + p2) + (p1 + p3): a warp shuffle with decreasing offsets
    const float p3 = K == 4 ? __fmul_rn(x[3], y[3]) : 0.f;
    acc = __fadd_rn(__fadd_rn(__fmul_rn(x[0], y[0]), __fmul_rn(x[2], y[2])), __fadd_rn(__fmul_rn(x[1], y[1]), p3));
  }
  out[i] = acc;
}
"""
ORDERS = ["sequential-fma", "reverse-fma", "sequential", "pairs (01)(23)", "pairs (02)(13)"]


@functools.cache
def dots_kernel():
    """DOTS_SOURCE compiled by CuPy (imported here, so that --help works without it)."""
    import cupy as cp

    return cp.RawKernel(DOTS_SOURCE, "dots")


def candidates(a, b, sqrt=False):
    """a, b [M, K] operand rows -> one [M] result per order."""
    import cupy as cp

    a, b = a.contiguous().float(), b.contiguous().float()
    m, k = a.shape
    results = []
    for mode in range(len(ORDERS)):
        out = torch.empty(m, device="cuda")
        dots_kernel()(
            ((m + 255) // 256,),
            (256,),
            (cp.asarray(a), cp.asarray(b), cp.int32(k), cp.int64(m), cp.int32(mode), cp.asarray(out)),
        )
        results.append(out.sqrt() if sqrt else out)
    torch.cuda.synchronize()
    return results


def operand_rows(A, B):
    """C = A @ B, A [N, r, K], B [N, K, c] -> the operand rows of every output element [N r c, K]."""
    n, r, k = A.shape
    c = B.shape[2]
    return (
        A[:, :, None, :].expand(n, r, c, k).reshape(-1, k),
        B.transpose(1, 2)[:, None, :, :].expand(n, r, c, k).reshape(-1, k),
    )


def report(name, torch_result, results):
    bits = torch_result.reshape(-1).view(torch.int32)
    equal = {o: (r.view(torch.int32) == bits).float().mean().item() for o, r in zip(ORDERS, results)}
    print(f"  {name:26s} " + "  ".join(f"{o} {v:.4f}" for o, v in equal.items()), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[1_000, 100_000, 1_000_000],
        help="numbers of Gaussians to check (cuBLAS may pick other kernels for other sizes)",
    )
    args = parser.parse_args()
    for n in args.rows:
        print(f"{n} rows: fraction bit-equal to torch per order")
        g = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(n, 4, device="cuda", generator=g) * 0.7
        report("q.norm(dim=-1)", q.norm(dim=-1), candidates(q, q, sqrt=True))
        scales = torch.exp(torch.randn(n, 3, device="cuda", generator=g) - 3)
        Mp = ti.quat_to_rotmat(q) * scales[:, None, :]
        cov = Mp @ Mp.transpose(1, 2)
        report("cov3D = M M^T (bmm)", cov, candidates(*operand_rows(Mp, Mp.transpose(1, 2))))
        view = torch.randn(4, 4, device="cuda", generator=g)
        p_hom = torch.cat([torch.randn(n, 3, device="cuda", generator=g) * 3, torch.ones(n, 1, device="cuda")], 1)
        report("p_hom @ view (mm)", p_hom @ view, candidates(*operand_rows(p_hom[:, None], view[None].expand(n, 4, 4))))
        J = torch.randn(n, 2, 3, device="cuda", generator=g)
        J[:, 0, 1] = 0
        J[:, 1, 0] = 0
        R = view[:3, :3].T
        M = J @ R
        report("J @ R (mm)", M, candidates(*operand_rows(J, R[None].expand(n, 3, 3))))
        T = M @ cov
        report("M @ cov3D (bmm)", T, candidates(*operand_rows(M, cov)))
        report("(M cov3D) @ M^T (bmm)", T @ M.transpose(1, 2), candidates(*operand_rows(T, M.transpose(1, 2))))


if __name__ == "__main__":
    main()
