"""legs_attention.attend_fused (Triton) against its specification, train_4legs.attend_batched in float64.

On the CPU the kernels run under Triton's interpreter, which must be switched on (TRITON_INTERPRET=1)
before triton is imported and would then stay on for every later kernel of the pytest process: so
that test runs this file as a script in a subprocess.
"""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CASES = [
    (37, 5, 128, ("latents", "q_k")),
    (37, 21, 128, ("latents", "q_k")),
    (5, 21, 32, ("latents",)),
    (70, 5, 64, ("q_k",)),
    (37, 21, 128, ("latents", "q_k"), 13),  # 13 of the 37 query: a warm start's foreground
]  # (N, K+1, D, inputs that need gradients[, M queries]): N not a multiple of the block


def check_against_reference(n, num_slots, d, needs_grad, device, num_queries=None, seed=0):
    """Forward and the asked gradients of attend_fused (float32) against attend_batched (float64).

    Neighbours as train_4legs makes them (itself first), the others random with repeats, so that the
    backward scatter adds into one latent from several Gaussians of one block; num_queries: that many
    of the n Gaussians query (rows drawn at random), as where a warm start trains the foreground."""
    from legs_attention import attend_fused
    from train_4legs import attend_batched

    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, d, generator=gen)
    m = num_queries or n
    queries = torch.arange(n) if num_queries is None else torch.randperm(n, generator=gen)[:m].sort().values
    q_k = 0.3 * torch.randn(m, d, generator=gen)  # scores of a few units: softmax neither flat nor one-hot
    neighbours = torch.cat([queries[:, None], torch.randint(0, n, (m, num_slots - 1), generator=gen)], 1)
    dmixed = torch.randn(m, d, generator=gen)
    results = []
    for dtype, attend in ((torch.float32, attend_fused), (torch.float64, attend_batched)):
        inputs = {"latents": latents.to(device, dtype, copy=True), "q_k": q_k.to(device, dtype, copy=True)}
        for name in needs_grad:
            inputs[name].requires_grad_()
        mixed = attend(inputs["latents"], neighbours.to(device), inputs["q_k"])
        mixed.backward(dmixed.to(device, dtype))
        results.append([mixed.detach()] + [inputs[name].grad for name in needs_grad])
    for what, got, want in zip(("mixed",) + tuple(needs_grad), *results):
        error = float((got.double() - want).abs().max() / want.abs().max())
        assert error < 2e-5, f"N={n} K+1={num_slots} D={d}: {what} relative error {error:.1e}"
    for name in ("latents", "q_k"):
        if name not in needs_grad:  # autograd must not ask the kernel for it
            assert inputs[name].grad is None


def test_attend_fused_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok") == len(CPU_CASES) + 1


def test_attend_fused_rejects_bad_inputs():
    from legs_attention import attend_fused

    neighbours = torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="power of two"):
        attend_fused(torch.zeros(4, 100), neighbours, torch.zeros(4, 100))
    with pytest.raises(ValueError, match="int64"):
        attend_fused(torch.zeros(4, 128), neighbours.int(), torch.zeros(4, 128))


@pytest.mark.gpu
def test_attend_fused_cuda():
    check_against_reference(100_000, 21, 128, ("latents", "q_k"), torch.device("cuda"))
    check_against_reference(1000, 5, 128, ("latents",), torch.device("cuda"), seed=1)
    check_against_reference(300_000, 21, 128, ("latents", "q_k"), torch.device("cuda"), num_queries=100_000)


if __name__ == "__main__":  # the interpreter run of test_attend_fused_interpreter (TRITON_INTERPRET=1)
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest, or with TRITON_INTERPRET=1"
    for case in CPU_CASES:
        check_against_reference(*case[:4], torch.device("cpu"), *case[4:])
        print("ok", case)
    from legs_attention import attend_fused

    with torch.no_grad():  # no graph: the forward alone
        attend_fused(torch.randn(9, 128), torch.zeros(9, 4, dtype=torch.int64), torch.randn(9, 128))
    print("ok no_grad")


def test_missing_triton_is_one_line(monkeypatch):
    import helpers
    import train_4legs

    train_4legs.gpu_attend.cache_clear()
    monkeypatch.setitem(sys.modules, "legs_attention", None)  # import legs_attention -> ImportError
    try:
        with pytest.raises(helpers.UserError, match=r"stage 5 \(train_4legs.py\) on a GPU needs Triton .*--device cpu"):
            train_4legs.gpu_attend()
    finally:
        train_4legs.gpu_attend.cache_clear()
