"""ViCLIP's FP8 path (ViCLIP.use_fp8, extract_features.py --fp8): the e4m3 quantisation against the
format's rounding bound, fp8_linear (torch._scaled_mm, which also runs on the CPU) against its
plain-PyTorch reference, and the tiny model: state dict, identity, embeddings, torch.compile."""

import pytest
import torch
import torch.nn.functional as F
from test_features import make_sequence
from test_viclip import TINY

import extract_features
import feature_extraction
from feature_extraction.cache import read_config
from feature_extraction.viclip import (
    FP8_DTYPE,
    FP8_MAX,
    ViCLIP,
    check_fp8_device,
    fp8_linear,
    fp8_linear_reference,
    load_viclip,
    quantize_rows,
    quantize_weight,
)
from helpers import UserError


def tiny_model(seed=0):
    """The tiny float32 ViCLIP with CLIP's initialisation and random (not zero) biases, so that the
    FP8 path's bias additions count."""
    model = ViCLIP(**TINY).reset_parameters(torch.Generator().manual_seed(seed)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and ".ln_" not in name:
                p.normal_(0.0, 0.02, generator=g)
    return model


def centred_cosine(a, b, mean):
    """Row-wise cosine of a and b [B, E] after subtracting `mean` [E] from both."""
    return F.cosine_similarity(a - mean, b - mean, dim=-1)


# ---------------------------------------------------------------- quantisation and the matmul


def test_quantize_rows_within_e4m3_rounding():
    """Each row scaled so its largest magnitude is exactly 448; then e4m3 rounding: 3 mantissa bits,
    so a relative error <= 2^-4 for normal values, and an absolute error <= 2^-10 (half the subnormal
    spacing 2^-9) below 2^-6, in units of the row's scale (its max / 448). Rows of very different
    magnitudes, so a scale shared across rows (or taken along the other axis) fails the bound."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 96, generator=g) * torch.logspace(-3, 3, 8)[:, None]
    a[:, :8] *= torch.logspace(-6, 0, 8)  # small entries in every row, down to the subnormals
    a[5] = 0.0  # a degenerate row
    q, scale = quantize_rows(a)
    assert q.dtype == FP8_DTYPE and q.shape == a.shape
    assert scale.dtype == torch.float32 and scale.shape == (8, 1) and (scale > 0).all()
    amax = a.abs().amax(dim=1, keepdim=True)
    nonzero = amax[:, 0] > 0
    assert (q.float().abs().amax(dim=1)[nonzero] == FP8_MAX).all()
    deq = q.float() * scale
    assert torch.isfinite(deq).all() and (deq[5] == 0).all()
    bound = 2**-4 * a.abs() + 2**-10 * amax / FP8_MAX
    assert ((deq - a).abs() <= bound * (1 + 1e-6)).all()
    # the bound is tight: e4m3 does err by more than half of it somewhere
    assert ((deq - a).abs() > 0.5 * bound).any()
    q_weight, weight_scale = quantize_weight(a)
    assert torch.equal(q_weight.float(), q.float()) and torch.equal(weight_scale, scale.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_matches_reference(dtype):
    """fp8_linear (torch._scaled_mm) is its reference: the same quantised operands, dequantised and
    multiplied in float32; both then round to x.dtype, which may differ by one bfloat16 step."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 64, generator=g).to(dtype)
    weight = torch.randn(48, 64, generator=g) * torch.logspace(-2, 1, 48)[:, None]
    bias = torch.randn(48, generator=g).to(dtype)
    q_weight, weight_scale = quantize_weight(weight)
    ours = fp8_linear(x, q_weight, weight_scale, bias)
    ref = fp8_linear_reference(x, q_weight, weight_scale, bias)
    assert ours.dtype == dtype and ours.shape == (2, 5, 48)
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol * float(ref.abs().max()))
    # and both are F.linear up to e4m3's rounding of the two operands
    exact = F.linear(x.float(), weight, bias.float())
    assert (ours.float() - exact).norm() / exact.norm() < 0.05


def test_fp8_linear_zero_rows():
    """An all-zero token and an all-zero weight row: no NaN (the scale is clamped), zero products."""
    x = torch.randn(4, 32)
    x[2] = 0.0
    weight = torch.randn(16, 32)
    weight[7] = 0.0
    bias = torch.randn(16)
    out = fp8_linear(x, *quantize_weight(weight), bias)
    assert torch.isfinite(out).all()
    assert torch.equal(out[2], bias) and torch.equal(out[:, 7], bias[7].expand(4))


# ---------------------------------------------------------------- the model


def test_use_fp8_keeps_the_state_dict_and_changes_the_identity():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    identity = model.identity
    assert model.use_fp8() is model
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    model.load_state_dict(before, strict=True)  # the official checkpoint still loads
    assert model.identity == identity + ":fp8"
    for block in model.vision_encoder.transformer.resblocks:
        fp8 = [block.attn.in_proj_fp8, block.attn.out_proj.fp8, block.mlp.c_fc.fp8, block.mlp.c_proj.fp8]
        weights = [
            block.attn.in_proj_weight,
            block.attn.out_proj.weight,
            block.mlp.c_fc.weight,
            block.mlp.c_proj.weight,
        ]
        for (q, scale), w in zip(fp8, weights):
            assert q.dtype == FP8_DTYPE and q.shape == w.shape and scale.shape == (1, w.shape[0])
    for block in model.text_encoder.transformer.resblocks:
        assert block.attn.in_proj_fp8 is None and block.mlp.c_fc.fp8 is None


def test_fp8_embeddings_near_float32():
    """A random tiny ViCLIP maps all videos near one direction (two different random videos have
    cosine ~0.99), so the plain cosine says little; the cosine after removing the batch's mean
    embedding is the one that tells. Measured: mean 0.98, min 0.96 (plain cosine min 0.9989);
    scales of the wrong rows or a halved scale (saturation) give means of 0.06-0.25."""
    video = torch.randn(16, 8, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    model = tiny_model()
    ref = model.encode_video(video)
    out = model.use_fp8().encode_video(video)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max() > 1e-4  # the FP8 path is taken
    cos = centred_cosine(out, ref, ref.mean(0))
    assert cos.mean() > 0.95 and cos.min() > 0.9, cos
    assert F.cosine_similarity(out, ref).min() > 0.998


def test_fp8_first_only_is_token_zero_of_the_whole_block():
    """With FP8 weights the class-token-only block slices the quantised in-projection by rows:
    q from the first third, k and v from the rest, each row with its own scale."""
    block = tiny_model().use_fp8().vision_encoder.transformer.resblocks[-1]
    x = torch.randn(2, 13, block.ln_1.weight.shape[0], generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(block(x, first_only=True), block(x)[:, :1], rtol=1e-5, atol=1e-5)


def test_fp8_compiles_to_one_graph():
    """Dynamo traces the FP8 forward whole (the quantised weights are plain attributes), without
    recompiling for new inputs, and computes the eager result (aot_eager: no code generation)."""
    import torch._dynamo.testing

    video = torch.randn(2, 8, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    model = tiny_model().use_fp8()
    eager = model.encode_video(video)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    model.compile_video(backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(model.encode_video(video), eager)
        model.encode_video(video + 1)
    assert counter.frame_count == 1


def test_load_viclip_fp8(tmp_path):
    path = tmp_path / "tiny.pth"
    model = tiny_model()
    torch.save({"model": model.state_dict()}, path)
    plain, fp8 = (load_viclip(path, "cpu", arch=TINY, fp8=on) for on in (False, True))
    assert fp8.identity == plain.identity + ":fp8" and "tiny.pth" in fp8.identity
    video = torch.randn(4, 8, 3, 28, 28)
    assert F.cosine_similarity(fp8.encode_video(video), plain.encode_video(video)).min() > 0.998


def test_an_fp8_cache_is_not_a_bfloat16_one(tmp_path):
    """Stage 3's cache records the identity: what an FP8 model cached is computed again without FP8."""
    seq = make_sequence(tmp_path / "seq", num_t=4)

    def extract(model):
        return extract_features.extract(seq, model, [1], 64, torch.device("cpu"), progress=False)["done"]

    assert extract(tiny_model().use_fp8()) == 1
    assert read_config(feature_extraction.cache_dir(seq, "viclip"), 1)["encoder_identity"].endswith(":fp8")
    assert extract(tiny_model()) == 1  # not taken for the float model's
    assert extract(tiny_model()) == 0  # which is then found


def test_fp8_refusals(monkeypatch):
    for spec in ("color", "openclip:ViT-B-16:random"):
        with pytest.raises(UserError, match=f"--fp8 --encoder {spec}: only the viclip encoder"):
            feature_extraction.load_encoder(spec, fp8=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(UserError) as e:
        check_fp8_device("cuda", torch.bfloat16)
    msg = str(e.value)
    assert "A100" in msg and "8.0" in msg and ">= 8.9" in msg and "drop --fp8" in msg and "\n" not in msg

    def fails(*args, **kwargs):
        raise RuntimeError("Only bf16 high precision output types are supported for row-wise scaling.\nat Blas.cpp")

    monkeypatch.setattr(torch, "_scaled_mm", fails)
    with pytest.raises(UserError) as e:
        check_fp8_device("cpu", torch.float32)
    msg = str(e.value)
    assert "RuntimeError: Only bf16" in msg and "drop --fp8" in msg and "\n" not in msg


@pytest.mark.gpu
def test_gpu_fp8(tmp_path):
    """On a GPU of compute capability >= 8.9: fp8_linear against its reference, and the compiled
    bfloat16 FP8 model against float32; on an older one, load_viclip(fp8=True) is refused."""
    path = tmp_path / "tiny.pth"
    torch.save({"model": tiny_model().state_dict()}, path)
    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(UserError, match="drop --fp8"):
            load_viclip(path, "cuda", arch=TINY, fp8=True)
        return
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(300, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    weight, bias = torch.randn(96, 64, device="cuda", generator=g), torch.randn(96, device="cuda").bfloat16()
    q_weight, weight_scale = quantize_weight(weight)
    ref = fp8_linear_reference(x, q_weight, weight_scale, bias)
    torch.testing.assert_close(
        fp8_linear(x, q_weight, weight_scale, bias), ref, rtol=2**-7, atol=2**-7 * float(ref.abs().max())
    )
    fp32 = load_viclip(path, "cuda", dtype=torch.float32, arch=TINY)
    fp8 = load_viclip(path, "cuda", arch=TINY, fp8=True, compile=True)
    video = torch.randn(16, 8, 3, 28, 28, device="cuda", generator=g)
    ref = fp32.encode_video(video)
    cos = centred_cosine(fp8.encode_video(video), ref, ref.mean(0))
    assert cos.mean() > 0.95 and cos.min() > 0.9, cos
