"""model.py: the DINOv2 contract (keys, shapes, parameter counts, token order, pos-embed resizing, attention),
checkpoint loading (prefixes, heads, registers excluded, hub cache, errors) and the NeCo head."""

import math
import urllib.error

import pytest
import torch
import torch.nn as nn

import model
from model import ProjectionHead, build_backbone, clean_state_dict, infer_arch


def tiny(name="vit_tiny14_reg", seed=0, **kw):
    torch.manual_seed(seed)
    return build_backbone(name, **kw).eval()


def perturbed_state(vit, seed=1):
    """The model's state with every tensor moved off its init value, so that a wrong load would show."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in vit.state_dict().items()}


# -----------------------------------------------------------------------------
# architecture contract


def expected_s14_reg_shapes():
    """Key -> shape of the official ViT-S/14-reg checkpoint, written out from the released file's layout."""
    D, F = 384, 1536
    shapes = {"cls_token": (1, 1, D), "register_tokens": (1, 4, D), "pos_embed": (1, 1370, D), "mask_token": (1, D),
              "patch_embed.proj.weight": (D, 3, 14, 14), "patch_embed.proj.bias": (D,)}
    for i in range(12):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                       b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "ls1.gamma": (D,), b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                       b + "mlp.fc1.weight": (F, D), b + "mlp.fc1.bias": (F,), b + "mlp.fc2.weight": (D, F),
                       b + "mlp.fc2.bias": (D,), b + "ls2.gamma": (D,)})
    shapes.update({"norm.weight": (D,), "norm.bias": (D,)})
    return shapes


def test_s14_reg_keys_and_shapes():
    with torch.device("meta"):
        reg, plain = build_backbone("dinov2_vits14_reg"), build_backbone("dinov2_vits14")
    expected = expected_s14_reg_shapes()
    got = {k: tuple(v.shape) for k, v in reg.state_dict().items()}
    assert len(got) == 176 and got == expected
    assert set(plain.state_dict()) == set(expected) - {"register_tokens"}
    assert reg.embed_dim == 384 and reg.patch_size == 14 and reg.num_register_tokens == 4 and reg.n_blocks == 12
    assert plain.num_register_tokens == 0 and len(reg.blocks) == 12


@pytest.mark.parametrize("name,count,device", [
    ("dinov2_vits14_reg", 22_058_112, "cpu"), ("dinov2_vitb14_reg", 86_583_552, "cpu"),
    ("dinov2_vitl14_reg", 304_372_736, "meta"), ("dinov2_vitg14_reg", 1_136_486_912, "meta")])
def test_parameter_counts(name, count, device):
    with torch.device(device):
        vit = build_backbone(name)
    assert sum(p.numel() for p in vit.parameters()) == count
    # without registers: exactly the 4 register vectors fewer
    with torch.device("meta"):
        plain = build_backbone(name.removesuffix("_reg"))
    assert sum(p.numel() for p in plain.parameters()) == count - 4 * vit.embed_dim


def test_vitg_uses_swiglu_shapes():
    with torch.device("meta"):
        sd = build_backbone("dinov2_vitg14").state_dict()
    assert tuple(sd["blocks.39.mlp.w12.weight"].shape) == (8192, 1536)
    assert tuple(sd["blocks.39.mlp.w3.weight"].shape) == (1536, 4096)
    assert "blocks.0.mlp.fc1.weight" not in sd


def test_random_init_follows_dinov2():
    vit = build_backbone("dinov2_vits14_reg")
    qkv = vit.blocks[3].attn.qkv.weight
    assert abs(qkv.std().item() - 0.02) < 0.001 and qkv.abs().max() <= 2.0  # trunc_normal std .02, cut at +-2
    assert torch.all(vit.blocks[3].attn.qkv.bias == 0) and torch.all(vit.blocks[3].ls2.gamma == 1)
    assert abs(vit.pos_embed.std().item() - 0.02) < 0.001
    assert 0 < vit.cls_token.abs().max() < 1e-5 and 0 < vit.register_tokens.abs().max() < 1e-5  # normal std 1e-6
    assert torch.all(vit.mask_token == 0) and torch.all(vit.norm.weight == 1)


def test_projection_head():
    torch.manual_seed(0)
    head = ProjectionHead(192, hidden=64, out=32)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [m.weight.shape for m in head.mlp if isinstance(m, nn.Linear)] == [(64, 192), (64, 64), (32, 64)]
    assert all(torch.all(m.bias == 0) for m in head.mlp if isinstance(m, nn.Linear))
    x = torch.randn(2, 7, 192)
    y = head(x)
    assert y.shape == (2, 7, 32)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(2, 7))
    raw = head.mlp(x)
    torch.testing.assert_close(y, raw / raw.norm(dim=-1, keepdim=True))
    assert len(ProjectionHead(8, 16, 4, layers=1).mlp) == 1


# -----------------------------------------------------------------------------
# forward pass


def explicit_attention(attn, x):
    """softmax(q k^T / sqrt(d)) v per head, from the qkv rows [q | k | v], in float64."""
    B, N, D = x.shape
    h = attn.num_heads
    d = D // h
    W, b = attn.qkv.weight.double(), attn.qkv.bias.double()
    qkv = x.double() @ W.T + b  # (B, N, 3D)
    out = torch.zeros(B, N, D, dtype=torch.float64)
    for head in range(h):
        q = qkv[..., head * d:(head + 1) * d]
        k = qkv[..., D + head * d:D + (head + 1) * d]
        v = qkv[..., 2 * D + head * d:2 * D + (head + 1) * d]
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
        out[..., head * d:(head + 1) * d] = a @ v
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()


@pytest.mark.parametrize("fused", [True, False])
def test_attention_equals_softmax_formula(fused):
    """Both attention paths (SDPA, the fast path; the explicit formula, train.fused_attention false) against a
    per-head float64 softmax written here."""
    vit = tiny()
    vit.set_fused_attention(fused)
    attn = vit.blocks[0].attn
    assert all(block.attn.fused == fused for block in vit.blocks)
    with torch.no_grad():
        attn.qkv.weight.mul_(10)  # sharper attention than at init, so that the softmax matters
        x = torch.randn(2, 21, 192)
        torch.testing.assert_close(attn(x).double(), explicit_attention(attn, x), atol=1e-5, rtol=1e-5)


def cubic(t, a):
    """Keys' cubic convolution kernel with parameter a."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def bicubic_matrix_scale_factor(n_in, scale_factor):
    """1-D resampling matrix of torch's bicubic (a=-0.75, half-pixel centres, edge replicate) when a scale factor is
    given: output size floor(n_in * f), output i samples input position (i + 0.5) / f - 0.5."""
    n_out = math.floor(n_in * scale_factor)
    M = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) / scale_factor - 0.5
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            M[i, min(max(tap, 0), n_in - 1)] += cubic(src - tap, -0.75)
    return M


def bicubic_matrix_antialias(n_in, n_out):
    """1-D matrix of antialiased bicubic downsampling (Pillow's rule): a=-0.5 kernel stretched by n_in/n_out,
    centred at (i + 0.5) * n_in/n_out, weights renormalised to sum 1."""
    s = n_in / n_out
    support, stretch = (2 * s, 1 / s) if s >= 1 else (2.0, 1.0)
    M = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        centre = s * (i + 0.5)
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        w = torch.tensor([cubic((j + 0.5 - centre) * stretch, -0.5) for j in range(lo, hi)], dtype=torch.float64)
        M[i, lo:hi] = w / w.sum()
    return M


@pytest.mark.parametrize("rule", ["dinov2", "neco"])
@pytest.mark.parametrize("name", ["vit_tiny14_reg", "vit_tiny14"])
@pytest.mark.parametrize("H,W", [(224, 224), (448, 336), (518, 518), (98, 98)])
def test_pos_embed_interpolation(name, H, W, rule):
    vit = tiny(name).set_pos_embed_rule(rule)
    gh, gw = H // 14, W // 14
    with torch.no_grad():
        got = vit.interpolate_pos_embed(gh, gw, torch.float32)
    assert got.shape == (1, 1 + gh * gw, 192)
    pos = vit.pos_embed.detach().double()
    if (gh, gw) == (37, 37):
        expected = pos  # the trained grid is used unchanged
    else:
        grid = pos[0, 1:].reshape(37, 37, 192)
        if name.endswith("_reg") and rule == "dinov2":  # NeCo's rule is the +0.1 scale factor for every model
            Mh, Mw = bicubic_matrix_antialias(37, gh), bicubic_matrix_antialias(37, gw)
        else:
            Mh, Mw = bicubic_matrix_scale_factor(37, (gh + 0.1) / 37), bicubic_matrix_scale_factor(37, (gw + 0.1) / 37)
        assert Mh.shape == (gh, 37) and Mw.shape == (gw, 37)
        patches = torch.einsum("ia,abd,jb->ijd", Mh, grid, Mw).reshape(1, gh * gw, 192)
        expected = torch.cat((pos[:, :1], patches), dim=1)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_pos_embed_rules_differ_most_at_the_local_crop_grid():
    vit = tiny("vit_tiny14_reg")
    with torch.no_grad():
        own = vit.interpolate_pos_embed(7, 7, torch.float32)
        neco = vit.set_pos_embed_rule("neco").interpolate_pos_embed(7, 7, torch.float32)
        back = vit.set_pos_embed_rule("dinov2").interpolate_pos_embed(7, 7, torch.float32)
    assert (own - neco).abs().max() > 1e-2  # antialias averages, the scale factor samples
    assert torch.equal(own, back)
    with pytest.raises(ValueError, match="pos_embed rule"):
        vit.set_pos_embed_rule("bicubic")


def test_forward_at_98_px_with_necos_rule_is_the_offset_bicubic(monkeypatch):
    """NeCo's rule, as the public NeCo ViT computes it: the 37x37 grid in float32, resized by the scale factors
    ((7 + 0.1) / 37) for H then W, bicubic without antialias. A 98 px forward with the rule equals the forward with
    that embedding computed by hand in float64."""
    vit = tiny("vit_tiny14_reg").set_pos_embed_rule("neco")
    x = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = vit.forward_features(x)["x_norm_patchtokens"]
        pos = vit.pos_embed.detach().double()
        M = bicubic_matrix_scale_factor(37, 7.1 / 37)  # (7, 37)
        patches = torch.einsum("ia,abd,jb->ijd", M, pos[0, 1:].reshape(37, 37, 192), M).reshape(1, 49, 192)
        by_hand = torch.cat((pos[:, :1], patches), dim=1)
        monkeypatch.setattr(vit, "interpolate_pos_embed", lambda gh, gw, dtype: by_hand.to(dtype))
        expected = vit.forward_features(x)["x_norm_patchtokens"]
        vit.set_pos_embed_rule("dinov2")
        monkeypatch.undo()
        release = vit.forward_features(x)["x_norm_patchtokens"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (release - got).abs().max() > 1e-2  # the register release's own rule (antialias) gives other features


def test_token_order_registers_get_no_position():
    vit = tiny()
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        tokens = vit.prepare_tokens(x)  # (B, 1 + 4 + 12, D)
        pos = vit.interpolate_pos_embed(4, 3, torch.float32)
        patches = torch.nn.functional.conv2d(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=14)
    assert tokens.shape == (2, 1 + 4 + 12, 192)
    torch.testing.assert_close(tokens[:, 0], (vit.cls_token[0] + pos[:, 0]).expand(2, -1))
    torch.testing.assert_close(tokens[:, 1:5], vit.register_tokens.expand(2, -1, -1))
    row_major = patches.flatten(2).transpose(1, 2)  # (B, 12, D): row 0 = patches (0,0), (0,1), (0,2)
    torch.testing.assert_close(tokens[:, 5:], row_major + pos[:, 1:])


def test_outputs_and_intermediate_layers_agree():
    vit = tiny()
    x = torch.randn(2, 3, 70, 56)  # 5 x 4 patches
    with torch.no_grad():
        out = vit.forward_features(x)
        assert out["x_norm_clstoken"].shape == (2, 192) and out["x_norm_regtokens"].shape == (2, 4, 192)
        assert out["x_norm_patchtokens"].shape == (2, 20, 192) and out["x_prenorm"].shape == (2, 25, 192)
        torch.testing.assert_close(vit.norm(out["x_prenorm"])[:, 5:], out["x_norm_patchtokens"])
        torch.testing.assert_close(vit(x), out["x_norm_clstoken"])
        (last,) = vit.get_intermediate_layers(x)
        torch.testing.assert_close(last, out["x_norm_patchtokens"])
        maps = vit.get_intermediate_layers(x, n=2, reshape=True)
        assert len(maps) == 2 and maps[1].shape == (2, 192, 5, 4)
        torch.testing.assert_close(maps[1][:, :, 1, 2], out["x_norm_patchtokens"][:, 1 * 4 + 2])  # row-major
        (raw, cls), = vit.get_intermediate_layers(x, n=1, norm=False, return_class_token=True)
        torch.testing.assert_close(raw, out["x_prenorm"][:, 5:])
        torch.testing.assert_close(cls, out["x_prenorm"][:, 0])
        # block 1 by hand, and the listed-indices form
        h = vit.prepare_tokens(x)
        h = vit.blocks[1](vit.blocks[0](h))
        first, = vit.get_intermediate_layers(x, n=[1])
        torch.testing.assert_close(first, vit.norm(h)[:, 5:])
    with pytest.raises(ValueError, match="blocks"):
        vit.get_intermediate_layers(x, n=7)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit.forward_features(torch.randn(1, 3, 50, 56))


def test_drop_path_ramp_and_per_sample_drop():
    vit = tiny(drop_path_rate=0.25)
    assert [b.drop_path for b in vit.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.25])
    x = torch.ones(4000, 2, 3)
    torch.manual_seed(0)
    y = model.drop_path(x, 0.25, training=True)
    per_sample = y[:, 0, 0]
    assert torch.all((y == per_sample[:, None, None]))  # one decision per sample
    values = per_sample.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / 0.75)
    assert abs((per_sample > 0).float().mean().item() - 0.75) < 0.03
    assert model.drop_path(x, 0.25, training=False) is x
    # in eval the stochastic-depth model is the plain model
    plain = tiny()
    xs = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(vit(xs), plain(xs))


def test_grad_checkpointing_same_gradients(monkeypatch):
    x = torch.randn(2, 3, 42, 42)
    grads = []
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    for checkpointing in (False, True):
        vit = tiny().train()
        vit.grad_checkpointing = checkpointing
        vit.forward_features(x)["x_norm_patchtokens"].pow(2).sum().backward()
        grads.append({k: p.grad for k, p in vit.named_parameters() if p.grad is not None})
    assert len(calls) == 6 and all(k.get("use_reentrant") is False for k in calls)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k])


# -----------------------------------------------------------------------------
# loading


def assert_same_state(vit, state):
    sd = vit.state_dict()
    assert sd.keys() == state.keys()
    for k in sd:
        assert torch.equal(sd[k], state[k]), k


def test_strict_round_trip_through_file(tmp_path):
    src = tiny()
    state = perturbed_state(src)
    src.load_state_dict(state)
    path = tmp_path / "tiny.pth"
    torch.save(src.state_dict(), path)
    for weights in (path, str(path)):
        dst = tiny(seed=5, weights=weights)
        assert_same_state(dst, state)
    x = torch.randn(1, 3, 84, 70)
    with torch.no_grad():
        torch.testing.assert_close(dst.forward_features(x)["x_prenorm"], src.forward_features(x)["x_prenorm"],
                                   atol=0, rtol=0)


def test_registers_excluded_loading(capsys):
    state = perturbed_state(tiny())  # a checkpoint with 4 registers
    vit = build_backbone("vit_tiny14_reg", weights=state, num_register_tokens=0)
    assert vit.num_register_tokens == 0 and vit.register_tokens is None
    assert_same_state(vit, {k: v for k, v in state.items() if k != "register_tokens"})
    assert vit.interpolate_antialias and vit.interpolate_offset == 0.0  # the _reg release's resizing rule
    assert "register_tokens" in capsys.readouterr().err
    x = torch.randn(1, 3, 42, 56)
    with torch.no_grad():
        out = vit.forward_features(x)
    assert out["x_prenorm"].shape == (1, 1 + 12, 192) and out["x_norm_regtokens"].shape == (1, 0, 192)


def test_clean_state_dict_prefixes_and_heads():
    t = torch.zeros(1)
    ckpt = {"state_dict": {"module.backbone.norm.weight": t, "model.module.cls_token": t,
                           "_orig_mod.backbone.blocks.0.ls1.gamma": t, "module.dino_head.mlp.0.weight": t,
                           "head.last_layer.weight": t, "projection_head.0.bias": t}}
    sd, ignored = clean_state_dict(ckpt)
    assert set(sd) == {"norm.weight", "cls_token", "blocks.0.ls1.gamma"}
    assert set(ignored) == {"module.dino_head.mlp.0.weight", "head.last_layer.weight", "projection_head.0.bias"}
    # the teacher is taken from a training checkpoint that also holds the student and plain values
    teacher, student = {"norm.weight": torch.ones(1)}, {"norm.weight": torch.zeros(1)}
    sd, _ = clean_state_dict({"student": student, "teacher": teacher, "epoch": 3, "config": {"a": 1}})
    assert torch.equal(sd["norm.weight"], torch.ones(1))
    with pytest.raises(ValueError, match="no state_dict"):
        clean_state_dict({"epoch": 3, "optimizer": {"lr": 1.0}})
    with pytest.raises(ValueError, match="two tensors"):
        clean_state_dict({"module.norm.weight": t, "norm.weight": t})


def test_loads_our_train_checkpoint_format(capsys):
    """train.py saves nn.ModuleDict({"backbone": vit, "head": ProjectionHead}) state_dicts as student/teacher."""
    vit = tiny()
    vit.load_state_dict(perturbed_state(vit))
    pair = nn.ModuleDict({"backbone": vit, "head": ProjectionHead(192, 64, 32)})
    ckpt = {"student": pair.state_dict(), "teacher": pair.state_dict(), "step": 10}
    assert "backbone.blocks.0.norm1.weight" in ckpt["teacher"] and "head.mlp.0.weight" in ckpt["teacher"]
    loaded = build_backbone("vit_tiny14_reg", weights=ckpt)
    assert_same_state(loaded, vit.state_dict())
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "ignored 6" in line and "head.mlp.0.weight" in line
    assert infer_arch(ckpt) == ("vit_tiny14_reg", 4)


def test_infer_arch():
    with torch.device("meta"):
        s_reg = build_backbone("dinov2_vits14_reg").state_dict()
        b = build_backbone("dinov2_vitb14").state_dict()
        g = build_backbone("dinov2_vitg14_reg").state_dict()
    assert infer_arch(s_reg) == ("dinov2_vits14_reg", 4)
    assert infer_arch({"module." + k: v for k, v in b.items()}) == ("dinov2_vitb14", 0)
    assert infer_arch(g) == ("dinov2_vitg14_reg", 4)
    assert infer_arch(tiny("vit_tiny14").state_dict()) == ("vit_tiny14", 0)
    odd = {k: v for k, v in tiny().state_dict().items() if not k.startswith("blocks.5.")}
    with pytest.raises(ValueError, match="5 blocks"):
        infer_arch(odd)


def test_missing_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "nowhere" / "ckpt.pth"
    with pytest.raises(FileNotFoundError) as e:
        build_backbone("vit_tiny14_reg", weights=path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot read checkpoint"):
        build_backbone("vit_tiny14_reg", weights=junk)


def test_mismatched_keys_are_named():
    state = tiny().state_dict()
    del state["blocks.2.ls1.gamma"]
    state["blocks.2.attn.extra"] = torch.zeros(3)
    with pytest.raises(RuntimeError) as e:
        build_backbone("vit_tiny14_reg", weights=state)
    msg = str(e.value)
    assert "missing keys [blocks.2.ls1.gamma]" in msg and "unexpected keys [blocks.2.attn.extra]" in msg
    assert "\n" not in msg
    # a register checkpoint into the non-register name: register_tokens is unexpected
    with pytest.raises(RuntimeError, match=r"unexpected keys \[register_tokens\]"):
        build_backbone("vit_tiny14", weights=tiny().state_dict())
    # long lists are shortened to a few names and a count
    with pytest.raises(RuntimeError, match=r"\(91 in all\)"):
        build_backbone("vit_tiny14_reg", weights={"norm.weight": torch.ones(192)})
    # shapes: a ViT-S checkpoint into the tiny model
    wrong = tiny().state_dict()
    wrong["norm.weight"] = torch.ones(384)
    with pytest.raises(RuntimeError, match=r"norm.weight \(384,\) vs \(192,\)"):
        build_backbone("vit_tiny14_reg", weights=wrong)


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("dinov2_vits16")
    with pytest.raises(ValueError, match="_reg name"):
        build_backbone("vit_tiny14", num_register_tokens=4)
    with pytest.raises(ValueError, match="no released weights"):
        build_backbone("vit_tiny14_reg", weights="hub")
    with pytest.raises(ValueError, match="weights must be"):
        build_backbone("vit_tiny14_reg", weights=3)


def test_hub_weights_from_cache_without_network(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(3)
    with torch.no_grad():
        official = build_backbone("dinov2_vits14_reg")
        official.pos_embed.add_(1.0)  # differs from any fresh init
    torch.save(official.state_dict(), cache / "dinov2_vits14_reg4_pretrain.pth")
    vit = build_backbone("dinov2_vits14_reg", weights="hub")
    assert torch.equal(vit.pos_embed, official.pos_embed) and torch.equal(vit.register_tokens,
                                                                          official.register_tokens)
    excluded = build_backbone("dinov2_vits14_reg", weights="hub", num_register_tokens=0)
    assert excluded.register_tokens is None and torch.equal(excluded.pos_embed, official.pos_embed)
    assert model.hub_checkpoint("dinov2_vitb14") == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth", "dinov2_vitb14_pretrain.pth")


def test_hub_weights_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as e:
        build_backbone("dinov2_vitl14_reg", weights="hub")
    msg = str(e.value)
    assert "dinov2_vitl14_reg4_pretrain.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "\n" not in msg


# -----------------------------------------------------------------------------
# DINO (v1) and DINOv3


def expected_shapes(family, D=384, F=1536, depth=12, p=16, swiglu=False):
    """Key -> shape of the official ViT-S/16 files of DINO and DINOv3, written out from their specs."""
    shapes = {"cls_token": (1, 1, D), "patch_embed.proj.weight": (D, 3, p, p), "patch_embed.proj.bias": (D,),
              "norm.weight": (D,), "norm.bias": (D,)}
    if family == "dino":
        shapes["pos_embed"] = (1, 1 + (224 // p) ** 2, D)
    else:
        shapes.update({"storage_tokens": (1, 4, D), "mask_token": (1, D), "rope_embed.periods": (D // 6 // 4,)})
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                       b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "norm2.weight": (D,), b + "norm2.bias": (D,)})
        if swiglu:
            shapes.update({b + "mlp.w1.weight": (F, D), b + "mlp.w1.bias": (F,), b + "mlp.w2.weight": (F, D),
                           b + "mlp.w2.bias": (F,), b + "mlp.w3.weight": (D, F), b + "mlp.w3.bias": (D,)})
        else:
            shapes.update({b + "mlp.fc1.weight": (F, D), b + "mlp.fc1.bias": (F,), b + "mlp.fc2.weight": (D, F),
                           b + "mlp.fc2.bias": (D,)})
        if family == "dinov3":
            shapes.update({b + "attn.qkv.bias_mask": (3 * D,), b + "ls1.gamma": (D,), b + "ls2.gamma": (D,)})
    return shapes


@pytest.mark.parametrize("name,family,keys,p,swiglu", [
    ("dino_vits16", "dino", 150, 16, False), ("dino_vits8", "dino", 150, 8, False),
    ("dinov3_vits16", "dinov3", 188, 16, False), ("dinov3_vits16plus", "dinov3", 212, 16, True)])
def test_dino_and_dinov3_keys_and_shapes_load_strictly(name, family, keys, p, swiglu):
    expected = expected_shapes(family, p=p, swiglu=swiglu)
    with torch.device("meta"):
        vit = build_backbone(name)
    got = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    assert len(got) == keys and got == expected
    assert (vit.patch_size, vit.embed_dim, vit.num_register_tokens) == (p, 384, 4 if family == "dinov3" else 0)
    # a file of exactly these keys and shapes loads with strict=True
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in expected.items()}
    loaded = build_backbone(name, weights=state)
    assert_same_state(loaded, state)


@pytest.mark.parametrize("name,count", [
    ("dino_vits16", 21_665_664), ("dino_vits8", 21_670_272), ("dino_vitb16", 85_798_656), ("dino_vitb8", 85_807_872),
    ("dinov3_vits16", 21_601_152), ("dinov3_vits16plus", 28_697_472), ("dinov3_vitb16", 85_669_632),
    ("dinov3_vitl16", 303_154_176)])
def test_dino_and_dinov3_parameter_counts(name, count):
    with torch.device("meta"):
        vit = build_backbone(name)
    assert sum(p.numel() for p in vit.parameters()) == count


def test_dinov3_layer_details():
    vit = tiny("dinov3_vit_tiny16")
    block = vit.blocks[0]
    assert block.norm1.eps == 1e-5 and vit.norm.eps == 1e-5 and torch.all(block.ls1.gamma == 1e-5)
    assert [b.drop_path for b in tiny("dinov3_vit_tiny16", drop_path_rate=0.2).blocks] == [0.2] * 6  # no ramp
    mask = block.attn.qkv.bias_mask
    assert torch.equal(mask, torch.cat([torch.ones(192), torch.zeros(192), torch.ones(192)]))
    torch.testing.assert_close(vit.rope_embed.periods, 100 ** (torch.arange(16) / 16))  # 100^(2i / (hd/2))
    v1 = tiny("dino_vit_tiny16")
    assert isinstance(v1.blocks[0].ls1, nn.Identity) and not hasattr(v1, "mask_token") and v1.pos_grid == 14
    assert vit.pos_grid is None and not vit.mask_token.requires_grad


def hand_rope(x, h, w, periods):
    """float64 rotate-half RoPE of the last h*w tokens of x (..., N, hd), written per pair of dimensions: dims j and
    j + hd/2 rotate by 2 pi c / period, c the row coordinate for j < hd/4, the column one after; coordinates are
    patch centres mapped to (-1, 1) on each axis."""
    x = x.double()
    out = x.clone()
    hd, prefix, q = x.shape[-1], x.shape[-2] - h * w, x.shape[-1] // 4
    for r in range(h):
        for c in range(w):
            t = prefix + r * w + c
            ch, cw = 2 * (r + 0.5) / h - 1, 2 * (c + 0.5) / w - 1
            for j in range(hd // 2):
                coord, period = (ch, periods[j]) if j < q else (cw, periods[j - q])
                a = 2 * math.pi * coord / period
                x1, x2 = x[..., t, j], x[..., t, j + hd // 2]
                out[..., t, j] = x1 * math.cos(a) - x2 * math.sin(a)
                out[..., t, j + hd // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    return out


def test_rope_against_a_hand_computed_rotation():
    vit = tiny("dinov3_vit_tiny16")
    periods = [100 ** (2 * i / 32) for i in range(16)]
    x = torch.randn(2, 3, 5 + 2 * 3, 64)  # (B, heads, cls + 4 storage + 2x3 patches, hd)
    sin, cos = vit.rope_embed(2, 3)
    assert sin.shape == (6, 64)
    got = model.apply_rope(x, sin, cos)
    torch.testing.assert_close(got.double(), hand_rope(x, 2, 3, periods), atol=1e-5, rtol=0)
    assert torch.equal(got[:, :, :5], x[:, :, :5])  # cls and storage tokens are not rotated
    # a whole attention layer: masked k bias, rotated q and k, softmax, in float64 by hand
    attn = vit.blocks[0].attn
    with torch.no_grad():
        attn.qkv.weight.mul_(10)
        attn.qkv.bias.normal_()
        tokens = torch.randn(2, 5 + 4 * 3, 192)
        sincos = vit.rope_embed(4, 3)
        got = attn(tokens, sincos).double()
        W, b = attn.qkv.weight.double(), attn.qkv.bias.double()
        b = torch.cat([b[:192], torch.zeros(192, dtype=torch.float64), b[384:]])  # the key bias is masked out
        qkv = (tokens.double() @ W.T + b).reshape(2, -1, 3, 3, 64).permute(2, 0, 3, 1, 4)
        q, k, v = hand_rope(qkv[0], 4, 3, periods), hand_rope(qkv[1], 4, 3, periods), qkv[2]
        out = torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1) @ v
        expected = out.transpose(1, 2).reshape(2, -1, 192) @ attn.proj.weight.double().T + attn.proj.bias.double()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_dinov3_train_mode_equals_eval_mode():
    """DINOv3's pretraining rescales RoPE's coordinates at random in train mode; post-training must not."""
    vit = tiny("dinov3_vit_tiny16")
    vit.load_state_dict(perturbed_state(vit))
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        evaluated = vit.eval().forward_features(x)
        trained = vit.train().forward_features(x)
        again = vit.forward_features(x)
    for key in evaluated:
        assert torch.equal(evaluated[key], trained[key]) and torch.equal(trained[key], again[key]), key
    assert torch.equal(evaluated["x_storage_tokens"], evaluated["x_norm_regtokens"])
    assert evaluated["x_norm_regtokens"].shape == (2, 4, 192) and evaluated["x_norm_patchtokens"].shape == (2, 12, 192)
    # the rule switch has nothing to resize and changes nothing
    with torch.no_grad():
        assert torch.equal(vit.eval().set_pos_embed_rule("neco").forward_features(x)["x_prenorm"],
                           evaluated["x_prenorm"])


@pytest.mark.parametrize("rule", ["dinov2", "neco"])
@pytest.mark.parametrize("H,W", [(224, 224), (320, 208), (112, 96)])
def test_dino_pos_embed_resizing_is_the_offset_bicubic(H, W, rule):
    """DINO's rule (either name): the 14x14 grid of 224 px resized by the scale factors ((H/16 + 0.1) / 14, ...)."""
    vit = tiny("dino_vit_tiny16").set_pos_embed_rule(rule)
    gh, gw = H // 16, W // 16
    with torch.no_grad():
        got = vit.interpolate_pos_embed(gh, gw, torch.float32)
    pos = vit.pos_embed.detach().double()
    if (gh, gw) == (14, 14):
        expected = pos
    else:
        Mh, Mw = bicubic_matrix_scale_factor(14, (gh + 0.1) / 14), bicubic_matrix_scale_factor(14, (gw + 0.1) / 14)
        patches = torch.einsum("ia,abd,jb->ijd", Mh, pos[0, 1:].reshape(14, 14, 192), Mw).reshape(1, gh * gw, 192)
        expected = torch.cat((pos[:, :1], patches), dim=1)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_infer_arch_tells_the_families_apart():
    with torch.device("meta"):
        states = {n: build_backbone(n).state_dict() for n in
                  ("dino_vits16", "dino_vits8", "dino_vitb8", "dinov3_vits16", "dinov3_vits16plus", "dinov3_vitl16")}
    for name, sd in states.items():
        assert infer_arch(sd) == (name, 4 if name.startswith("dinov3") else 0)
    assert infer_arch(tiny("dino_vit_tiny16").state_dict()) == ("dino_vit_tiny16", 0)
    assert infer_arch(tiny("dinov3_vit_tiny16").state_dict()) == ("dinov3_vit_tiny16", 4)


def test_dino_full_checkpoint_loads_the_teacher(tmp_path, capsys):
    """DINO's full checkpoints: student under module.backbone./module.head., teacher under backbone./head., and the
    command line as an argparse.Namespace."""
    import argparse
    teacher, student = tiny("dino_vit_tiny16", seed=1), tiny("dino_vit_tiny16", seed=2)
    head = {"head.mlp.0.weight": torch.zeros(4, 192), "head.last_layer.weight_g": torch.ones(8, 1)}
    ckpt = {"student": {**{"module.backbone." + k: v for k, v in student.state_dict().items()},
                        **{"module." + k: v for k, v in head.items()}},
            "teacher": {**{"backbone." + k: v for k, v in teacher.state_dict().items()}, **head},
            "optimizer": {"state": {}}, "epoch": 100, "args": argparse.Namespace(arch="vit_small", out_dim=65536),
            "dino_loss": {"center": torch.zeros(1, 8)}}
    torch.save(ckpt, tmp_path / "dino_full.pth")
    loaded = build_backbone("dino_vit_tiny16", weights=tmp_path / "dino_full.pth")
    assert_same_state(loaded, teacher.state_dict())
    assert "ignored 2" in capsys.readouterr().err
    assert infer_arch(model.load_checkpoint_file(tmp_path / "dino_full.pth")) == ("dino_vit_tiny16", 0)


def test_released_files_of_dino_and_dinov3(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert model.hub_checkpoint("dino_vitb8") == (
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
        "dino_vitbase8_pretrain.pth")
    with pytest.raises(FileNotFoundError) as e:  # gated: never a download, a one-line way to get the file
        build_backbone("dinov3_vits16", weights="hub")
    msg = str(e.value)
    assert "\n" not in msg and "dinov3_vits16_pretrain_lvd1689m-08c60483.pth" in msg and "request" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_backbone("dinov3_vits16").state_dict().items()}
    state = {k: torch.randn(s) for k, s in shapes.items()}
    torch.save(state, cache / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    assert_same_state(build_backbone("dinov3_vits16", weights="hub"), state)
    with pytest.raises(ValueError, match="storage tokens"):
        build_backbone("dinov3_vits16", num_register_tokens=0)
    assert model.round_to_patch(504, 16) == 512 and model.round_to_patch(504, 14) == 504
    assert model.round_to_patch(98, 16) == 96 and model.round_to_patch(5, 16) == 16
