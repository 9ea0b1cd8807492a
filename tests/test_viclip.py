"""ViCLIP: the module against an independent float64 re-computation (written here from the original
ViCLIP's description, not calling the module's blocks), nn.MultiheadAttention, the released
checkpoint's key list, checkpoint errors, and the CLIP tokeniser."""

import math

import pytest
import torch

from feature_extraction.tokenizer import EOT_ID, SOT_ID, ClipTokenizer
from feature_extraction.viclip import DEFAULT_CKPT, ViCLIP, expected_shapes, load_viclip
from helpers import UserError

TINY = dict(
    image_size=28,
    patch=14,
    vision_width=32,
    vision_layers=2,
    vision_heads=4,
    frames=8,
    embed_dim=16,
    context_length=32,
    vocab_size=49408,
    text_width=24,
    text_layers=2,
    text_heads=3,
)


@pytest.fixture(scope="module")
def tiny():
    return ViCLIP(**TINY).reset_parameters(torch.Generator().manual_seed(0)).double().eval()


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


# ---------------------------------------------------------------- float64 reference (independent)


def ref_layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def ref_block(x, sd, prefix, heads, causal):
    """One pre-norm block on one sequence x [N, D], weights read from state dict `sd`, heads looped."""

    def p(name):
        return sd[prefix + name]

    n, d = x.shape
    hd = d // heads
    h = ref_layer_norm(x, p("ln_1.weight"), p("ln_1.bias"))
    qkv = h @ p("attn.in_proj_weight").T + p("attn.in_proj_bias")
    q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
    outs = []
    for i in range(heads):
        cols = slice(i * hd, (i + 1) * hd)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(hd)
        if causal:
            scores = scores + torch.full((n, n), float("-inf"), dtype=x.dtype).triu(1)
        outs.append(torch.softmax(scores, -1) @ v[:, cols])
    x = x + torch.cat(outs, 1) @ p("attn.out_proj.weight").T + p("attn.out_proj.bias")
    h = ref_layer_norm(x, p("ln_2.weight"), p("ln_2.bias"))
    m = h @ p("mlp.c_fc.weight").T + p("mlp.c_fc.bias")
    m = m * torch.sigmoid(1.702 * m)
    return x + m @ p("mlp.c_proj.weight").T + p("mlp.c_proj.bias")


def ref_video(video, sd, layers, heads, patch):
    """One video [T, 3, S, S] -> unit [E], tokens in the original's patch-major / frame-minor order."""

    def v(name):
        return sd["vision_encoder." + name]

    t, _, s, _ = video.shape
    g = s // patch
    # patch (i, j) of frame f: flattened (c, y, x) times the Conv3d kernel
    patches = video.reshape(t, 3, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(t, g * g, -1)
    emb = patches @ v("conv1.weight").reshape(v("conv1.weight").shape[0], -1).T  # [T, P, D]
    emb = emb + v("positional_embedding")[1:] + v("temporal_positional_embedding")[0, :t, None]
    tokens = emb.transpose(0, 1).reshape(t * g * g, -1)  # patch-major, frame-minor
    cls = v("class_embedding") + v("positional_embedding")[0]
    x = ref_layer_norm(torch.cat([cls[None], tokens]), v("ln_pre.weight"), v("ln_pre.bias"))
    for i in range(layers):
        x = ref_block(x, sd, f"vision_encoder.transformer.resblocks.{i}.", heads, causal=False)
    out = ref_layer_norm(x[0], v("ln_post.weight"), v("ln_post.bias")) @ v("proj")
    return out / out.norm()


def ref_text(tokens, sd, layers, heads):
    """Token ids [L] -> unit [E]."""

    def p(name):
        return sd["text_encoder." + name]

    x = p("token_embedding.weight")[tokens] + p("positional_embedding")[: len(tokens)]
    for i in range(layers):
        x = ref_block(x, sd, f"text_encoder.transformer.resblocks.{i}.", heads, causal=True)
    out = ref_layer_norm(x[int(tokens.argmax())], p("ln_final.weight"), p("ln_final.bias")) @ p("text_projection")
    return out / out.norm()


# ---------------------------------------------------------------- the model


def test_block_matches_reference(tiny):
    sd = tiny.state_dict()
    x = torch.randn(2, 17, TINY["vision_width"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = tiny.vision_encoder.transformer.resblocks[1](x)
    for b in range(2):
        ref = ref_block(x[b], sd, "vision_encoder.transformer.resblocks.1.", TINY["vision_heads"], causal=False)
        torch.testing.assert_close(ours[b], ref, rtol=1e-10, atol=1e-10)
    tb = tiny.text_encoder.transformer.resblocks[0]
    xt = torch.randn(1, 9, TINY["text_width"], dtype=torch.float64)
    want = ref_block(xt[0], sd, "text_encoder.transformer.resblocks.0.", TINY["text_heads"], causal=True)
    torch.testing.assert_close(tb(xt, causal=True)[0], want, rtol=1e-10, atol=1e-10)


def test_first_only_is_token_zero_of_the_whole_block(tiny):
    """The video encoder's last block computes its class token alone (first_only): the same
    values as the whole block's token 0, with every token still attended to."""
    x = torch.randn(3, 17, TINY["vision_width"], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    block = tiny.vision_encoder.transformer.resblocks[1]
    first = block(x, first_only=True)
    assert first.shape == (3, 1, TINY["vision_width"])
    torch.testing.assert_close(first, block(x)[:, :1], rtol=1e-12, atol=1e-12)
    x2 = x.clone()
    x2[:, 9] = torch.randn(3, TINY["vision_width"], dtype=torch.float64)  # another token, a key and value, counts
    assert (block(x2, first_only=True) - first).abs().max() > 1e-3


def test_video_matches_reference(tiny):
    video = torch.randn(3, 8, 3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = tiny.encode_video(video)
    assert ours.dtype == torch.float32 and ours.shape == (3, TINY["embed_dim"])
    sd = tiny.state_dict()
    for b in range(3):
        ref = ref_video(video[b], sd, TINY["vision_layers"], TINY["vision_heads"], TINY["patch"])
        torch.testing.assert_close(ours[b].double(), ref, rtol=0, atol=1e-6)  # float32 output
    # the pooling really reads the class token after all blocks: a different frame changes it
    video2 = video.clone()
    video2[0, 5] += 1
    assert (tiny.encode_video(video2)[0] - ours[0]).abs().max() > 1e-4


def test_text_matches_reference(tiny, tokenizer):
    texts = ["a red ball flying in the air", "stuff"]
    ours = tiny.encode_text(texts)
    sd = tiny.state_dict()
    for row, text in enumerate(texts):
        ref = ref_text(tokenizer([text], 32)[0], sd, TINY["text_layers"], TINY["text_heads"])
        torch.testing.assert_close(ours[row].double(), ref, rtol=0, atol=1e-6)


def test_attention_matches_nn_multihead_attention(tiny):
    """The original's blocks use nn.MultiheadAttention with these very parameter names."""
    attn = tiny.vision_encoder.transformer.resblocks[0].attn
    mha = torch.nn.MultiheadAttention(TINY["vision_width"], TINY["vision_heads"]).double()
    mha.load_state_dict(attn.state_dict(), strict=True)
    x = torch.randn(2, 11, TINY["vision_width"], dtype=torch.float64)
    ref = mha(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
    torch.testing.assert_close(attn(x), ref, rtol=1e-10, atol=1e-10)


def release_key_shapes():
    """The official checkpoint's 'model' keys and shapes (ViClip-InternVid-10M-FLT.pth)."""
    shapes = {"temp": ()}
    v, t = "vision_encoder.", "text_encoder."
    shapes.update(
        {
            v + "conv1.weight": (1024, 3, 1, 14, 14),
            v + "class_embedding": (1024,),
            v + "positional_embedding": (257, 1024),
            v + "temporal_positional_embedding": (1, 8, 1024),
            v + "ln_pre.weight": (1024,),
            v + "ln_pre.bias": (1024,),
            v + "ln_post.weight": (1024,),
            v + "ln_post.bias": (1024,),
            v + "proj": (1024, 768),
            t + "token_embedding.weight": (49408, 768),
            t + "positional_embedding": (32, 768),
            t + "ln_final.weight": (768,),
            t + "ln_final.bias": (768,),
            t + "text_projection": (768, 768),
        }
    )
    for prefix, width, layers in ((v, 1024, 24), (t, 768, 12)):
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            shapes.update(
                {
                    b + "attn.in_proj_weight": (3 * width, width),
                    b + "attn.in_proj_bias": (3 * width,),
                    b + "attn.out_proj.weight": (width, width),
                    b + "attn.out_proj.bias": (width,),
                    b + "mlp.c_fc.weight": (4 * width, width),
                    b + "mlp.c_fc.bias": (4 * width,),
                    b + "mlp.c_proj.weight": (width, 4 * width),
                    b + "mlp.c_proj.bias": (width,),
                }
            )
            for ln in ("ln_1", "ln_2"):
                shapes.update({f"{b}{ln}.weight": (width,), f"{b}{ln}.bias": (width,)})
    return shapes


def test_real_size_matches_release_keys():
    want = release_key_shapes()
    assert len(want) == 447 and sum(math.prod(s) for s in want.values()) == 427_590_145
    assert expected_shapes() == want
    with torch.device("meta"):
        model = ViCLIP()
    model.load_state_dict({k: torch.empty(s, device="meta") for k, s in want.items()}, strict=True, assign=True)


def test_load_viclip_roundtrip(tmp_path, tiny):
    path = tmp_path / "tiny.pth"
    torch.save({"model": tiny.float().state_dict(), "epoch": 3}, path)
    tiny.double()
    model = load_viclip(path, "cpu", arch=TINY)
    assert model.name == "viclip" and model.dim == TINY["embed_dim"] and "tiny.pth" in model.identity
    video = torch.randn(2, 8, 3, 28, 28)
    torch.testing.assert_close(model.encode_video(video), tiny.encode_video(video.double()), rtol=0, atol=1e-5)


def test_missing_checkpoint_says_where_and_how(tmp_path):
    with pytest.raises(UserError) as e:
        load_viclip(tmp_path / "nope.pth")
    msg = str(e.value)
    assert "nope.pth" in msg and DEFAULT_CKPT in msg and "huggingface.co/OpenGVLab/ViCLIP" in msg and "accept" in msg


def test_wrong_checkpoints_say_which_keys_differ(tmp_path, tiny):
    sd = {k: v.float() for k, v in tiny.state_dict().items()}
    del sd["vision_encoder.proj"]
    sd["visual.extra"] = torch.zeros(2)
    sd["text_encoder.ln_final.weight"] = torch.zeros(5)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(UserError) as e:
        load_viclip(tmp_path / "bad.pth", arch=TINY)
    msg = str(e.value)
    assert "1 missing (vision_encoder.proj)" in msg and "visual.extra" in msg
    assert "text_encoder.ln_final.weight [5]" in msg
    torch.save({"state_dict": sd}, tmp_path / "nomodel.pth")
    with pytest.raises(UserError, match="'model'"):
        load_viclip(tmp_path / "nomodel.pth", arch=TINY)
    sd = {k: v.float() for k, v in tiny.state_dict().items()}
    sd["vision_encoder.proj"][0, 0] = float("nan")
    torch.save({"model": sd}, tmp_path / "nan.pth")
    with pytest.raises(UserError, match="nan.pth: 1 tensors hold NaN/Inf .vision_encoder.proj"):
        load_viclip(tmp_path / "nan.pth", arch=TINY)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="cannot be read"):
        load_viclip(tmp_path / "junk.pth", arch=TINY)


# ---------------------------------------------------------------- tokeniser


def test_tokenizer_known_ids(tokenizer):
    row = tokenizer("a photo of a cat", 32)[0]
    assert row[:7].tolist() == [SOT_ID, 320, 1125, 539, 320, 2368, EOT_ID] and (row[7:] == 0).all()
    assert (SOT_ID, EOT_ID) == (49406, 49407) and len(tokenizer.ids) == 49408
    assert tokenizer("", 32)[0, :3].tolist() == [SOT_ID, EOT_ID, 0]


def test_tokenizer_cleaning_and_truncation(tokenizer):
    same = tokenizer(["A  Photo\tof &amp; CAT", "a photo of & cat"], 32)
    assert (same[0] == same[1]).all()
    long = tokenizer(" ".join(["ball"] * 50), 32)[0]
    assert long.shape == (32,) and long[0] == SOT_ID and long[-1] == EOT_ID and (long[1:-1] != 0).all()
    assert tokenizer(" ".join(["ball"] * 30), 32)[0, -1] == EOT_ID  # exactly 32: SOT + 30 + EOT
    assert int(tokenizer("a red ball", 32).argmax()) == 4  # the text encoder reads the EOT position


def test_tokenizer_matches_open_clip(tokenizer):
    from open_clip.tokenizer import SimpleTokenizer

    theirs = SimpleTokenizer(context_length=32)
    texts = [
        "A man throwing the basketball",
        "naïve café — über 123",
        "it's 2 o'clock!!",
        "x" * 100,
        "The football flying in the air",
        "ﬁsh &lt;b&gt;",
    ]
    assert torch.equal(tokenizer(texts, 32), theirs(texts))


@pytest.mark.gpu
def test_gpu_bf16_and_compiled_paths_match_float32(tmp_path, tiny):
    """The CUDA path (bfloat16 weights, fused attention, torch.compile) computes the float32 function."""
    path = tmp_path / "tiny.pth"
    torch.save({"model": {k: v.float() for k, v in tiny.state_dict().items()}}, path)
    fp32 = load_viclip(path, "cuda", dtype=torch.float32, arch=TINY)
    bf16 = load_viclip(path, "cuda", arch=TINY)
    assert bf16.vision_encoder.proj.dtype == torch.bfloat16
    video = torch.randn(4, 8, 3, 28, 28, device="cuda")
    ref = fp32.encode_video(video)
    torch.testing.assert_close(ref.cpu(), tiny.encode_video(video.cpu().double()), rtol=0, atol=1e-4)
    eager = bf16.encode_video(video)
    compiled = bf16.compile_video().encode_video(video)
    for out in (eager, compiled):
        assert out.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.995
    text_bf16, text_fp32 = (model.encode_text(["a red ball"]) for model in (bf16, fp32))
    assert torch.nn.functional.cosine_similarity(text_bf16, text_fp32).min() > 0.995
