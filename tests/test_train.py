"""train.py: the loss against brute force, gradients, EMA, schedules, checkpoints, exact resume, DDP, CLI errors."""
import builtins
import copy
import errno
import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
import torch.nn.functional as F
import torch.utils._python_dispatch
from torchvision.io import write_jpeg

import train
from sort import diff_sort

ROOT = Path(__file__).resolve().parents[1]


def tiny_sets(out_dir, images, **over):
    """--set pairs of the real config with a tiny model and crops: a few steps take a second on the CPU."""
    sets = [f"out_dir={out_dir}", f"data.root={images}", "model.arch=vit_tiny14_reg", "model.weights=null",
            "model.head_hidden=64", "model.head_out=32", "model.drop_path_rate=0.0", "data.global_size=56",
            "data.local_size=28", "data.num_workers=0", "neco.roi_size=4", "neco.num_references=16",
            "neco.queue_size=256", "optim.batch_size=4", "optim.epochs=2", "optim.lr_backbone=1e-3",
            "optim.lr_head=1e-2", "train.device=cpu", "train.ckpt_every=2"]
    return sets + [f"{k}={v}" for k, v in over.items()]


def tiny_cfg(tmp_path, images, **over):
    return train.load_config(ROOT / "config.yaml", tiny_sets(tmp_path / "run", images, **over))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """12 smooth random JPEGs of varied sizes."""
    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        h, w = 60 + 7 * i, 90 - 3 * i
        low = torch.rand(3, 4, 4, generator=g)
        img = F.interpolate(low[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        write_jpeg((img * 255).to(torch.uint8), str(folder / f"img_{i:02d}.jpg"), quality=95)
    return folder


def synthetic_batch(B, cfg, seed=0):
    """Crops and boxes of the real shapes, without a dataset."""
    g = torch.Generator().manual_seed(seed)
    d = cfg["data"]
    sizes = [d["global_size"]] * 2 + [d["local_size"]] * d["n_local"]
    crops = [torch.randn(B, 3, s, s, generator=g) for s in sizes]
    xy = torch.rand(B, len(sizes), 2, generator=g) * 20
    wh = 40 + torch.rand(B, len(sizes), 2, generator=g) * 40
    boxes = torch.cat([xy, xy + wh], -1)  # every box overlaps every other (all contain [20, 40]^2)
    return crops, boxes


# -----------------------------------------------------------------------------
# the loss


def test_sort_cross_entropy_matches_per_row_brute_force():
    torch.manual_seed(0)
    ncfg = {"sort_network": "bitonic", "student_steepness": 20.0, "teacher_steepness": 20.0,
            "sort_distribution": "cauchy", "sort_art_lambda": 0.25}
    sim_s, sim_t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    got = train.sort_cross_entropy(sim_s, sim_t, ncfg)
    total = 0.0
    for r in range(6):  # one row at a time: -sum_k Pt[j, k] log Ps[j, k], averaged over rows and j
        _, Ps = diff_sort(sim_s[r:r + 1], "bitonic", 20.0, "cauchy")
        _, Pt = diff_sort(sim_t[r:r + 1], "bitonic", 20.0, "cauchy")
        for j in range(5):
            total += -sum(Pt[0, j, k].item() * math.log(Ps[0, j, k].item()) for k in range(5))
    assert got.item() == pytest.approx(total / 30, rel=1e-10)


def test_sort_cross_entropy_is_finite_when_p_underflows():
    # logistic at steepness 1000 gives exact zeros in float32 P: the log must stay finite
    ncfg = {"sort_network": "bitonic", "student_steepness": 1000.0, "teacher_steepness": 1000.0,
            "sort_distribution": "logistic", "sort_art_lambda": 0.25}
    sims = torch.linspace(-1, 1, 16).repeat(3, 1)
    _, P = diff_sort(sims, "bitonic", 1000.0, "logistic")
    assert (P == 0).any()
    assert torch.isfinite(train.sort_cross_entropy(sims, sims.flip(-1), ncfg))


@pytest.mark.parametrize("student,teacher", [(10.0, 100.0), (100.0, 1000.0)])
def test_student_and_teacher_sorts_use_their_own_steepness(student, teacher):
    ncfg = {"sort_network": "bitonic", "student_steepness": student, "teacher_steepness": teacher,
            "sort_distribution": "cauchy", "sort_art_lambda": 0.25}
    g = torch.Generator().manual_seed(0)
    sim_s, sim_t = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    _, Ps = diff_sort(sim_s, "bitonic", student, "cauchy")  # called directly, each with its own steepness
    _, Pt = diff_sort(sim_t, "bitonic", teacher, "cauchy")
    expected = -(Pt * torch.log(Ps)).sum(-1).mean()
    torch.testing.assert_close(train.sort_cross_entropy(sim_s, sim_t, ncfg), expected, rtol=1e-6, atol=0)
    swapped = dict(ncfg, student_steepness=teacher, teacher_steepness=student)
    assert abs(train.sort_cross_entropy(sim_s, sim_t, swapped) - expected) > 1e-3


def test_neco_loss_matches_per_query_brute_force(tmp_path, images):
    cfg = tiny_cfg(tmp_path, images)
    ncfg = cfg["neco"]
    torch.manual_seed(1)
    B, out = 2, 8
    maps_t = [torch.randn(B, 4, 4, out) for _ in range(2)]
    maps_s = [torch.randn(B, 4, 4, out) for _ in range(2)] + [torch.randn(B, 2, 2, out) for _ in range(4)]
    _, boxes = synthetic_batch(B, cfg)
    refs = {g: torch.randn(B, 16, out) for g in range(2)}
    got = train.neco_loss(maps_t, maps_s, boxes, lambda g, q_t: refs[g], ncfg)

    kw = dict(network="bitonic", steepness=100.0, distribution="cauchy")
    pair_losses = []
    for g in range(2):
        for v in range(6):
            if v == g:
                continue
            q_t, q_s = train.pair_queries(maps_t, maps_s, boxes, g, v, 4)  # (B, 16, out)
            terms = []
            for b in range(B):
                for q in range(16):
                    st = torch.stack([F.cosine_similarity(q_t[b, q], refs[g][b, j], dim=0) for j in range(16)])
                    ss = torch.stack([F.cosine_similarity(q_s[b, q], refs[g][b, j], dim=0) for j in range(16)])
                    Pt, Ps = diff_sort(st[None], **kw)[1][0], diff_sort(ss[None], **kw)[1][0]
                    terms.append(-(Pt * torch.log(Ps)).sum(1).mean())
            pair_losses.append(torch.stack(terms).mean())
    assert len(pair_losses) == 10
    torch.testing.assert_close(got, torch.stack(pair_losses).mean(), rtol=1e-5, atol=1e-6)


def test_pair_queries_sample_the_same_region(monkeypatch):
    # a feature map that is a linear function of image coordinates, seen through two different crops: RoI-aligning
    # both over their intersection must give the same values (the correspondence NeCo relies on). Training samples
    # adaptively (ceil(bin side) points, as the public run), which puts the outer points of a bin that touches a
    # crop's border within half a cell of the map's edge, where roi_align clamps: there the two maps differ a little
    # (as in the public run); the centre bin is exact, and with 2 points per bin side every bin is
    def crop_map(box, side):
        x1, y1, x2, y2 = box.tolist()
        centres = (torch.arange(side) + 0.5) / side
        xs, ys = x1 + centres * (x2 - x1), y1 + centres * (y2 - y1)
        return torch.stack([xs[None, :].expand(side, side), ys[:, None].expand(side, side)], -1)[None]  # (1,s,s,2)

    boxes = torch.tensor([[[0., 0., 100., 100.], [0., 0., 60., 60.]] + [[20., 20., 120., 120.]] * 4])
    maps_t = [crop_map(boxes[0, 0], 16), crop_map(boxes[0, 1], 16)]
    maps_s = maps_t + [crop_map(boxes[0, 2], 16)] * 4
    q_t, q_s = train.pair_queries(maps_t, maps_s, boxes, 0, 2, 3)  # (1, 9, 2), adaptive sampling
    torch.testing.assert_close(q_t[0, 4], torch.tensor([60.0, 60.0]), atol=1e-4, rtol=0)  # the centre bin
    torch.testing.assert_close(q_s[0, 4], q_t[0, 4], atol=1e-4, rtol=0)
    assert 0 < (q_t - q_s).abs().max() < 2.0  # the clamped border bins
    monkeypatch.setattr(train, "ROI_SAMPLING", 2)  # every sample of these boxes lies inside both maps
    q_t, q_s = train.pair_queries(maps_t, maps_s, boxes, 0, 2, 3)
    torch.testing.assert_close(q_t, q_s, atol=1e-4, rtol=0)
    centres = 20 + (torch.arange(3) + 0.5) / 3 * 80  # bin centres of a 3x3 grid over the intersection [20, 100]^2
    torch.testing.assert_close(q_t[0, :3, 0], centres, atol=1e-4, rtol=0)  # x along the first row
    torch.testing.assert_close(q_t[0, ::3, 1], centres, atol=1e-4, rtol=0)  # y down the first column


# -----------------------------------------------------------------------------
# the step


def make_run(cfg, sgd=False):
    student, teacher = train.build_models(cfg)
    if sgd:  # the update is proportional to the gradient: Adam would turn float noise in tiny gradients into +-lr
        opt = torch.optim.SGD(train.param_groups(student, cfg), lr=0.5)
    else:
        opt = torch.optim.AdamW(train.param_groups(student, cfg), lr=cfg["optim"]["lr_backbone"])
    gen = torch.Generator().manual_seed(0)
    queue = train.PatchQueue(cfg["neco"]["queue_size"], cfg["model"]["head_out"], torch.device("cpu"))
    return student, teacher, opt, gen, queue


def test_step_updates_student_only_and_teacher_by_ema(tmp_path, images):
    cfg = tiny_cfg(tmp_path, images)
    torch.manual_seed(0)
    student, teacher, opt, gen, queue = make_run(cfg)
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    crops, boxes = synthetic_batch(4, cfg)
    refs = train.make_reference_sampler(cfg["neco"], queue, gen, 4)
    m = 0.9
    loss, finite = train.train_step(student, student, teacher, opt, queue, gen, crops, boxes, refs, cfg,
                                    torch.autocast("cpu", enabled=False), m)
    assert finite.item() and math.isfinite(loss.item())
    assert all(p.grad is None for p in teacher.parameters())  # the teacher never gets gradients
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())
    changed = [k for k in s0 if not torch.equal(s0[k], student.state_dict()[k])]
    assert any(k.startswith("backbone.blocks") for k in changed) and any(k.startswith("head.") for k in changed)
    for k in t0:  # EMA towards the student before its update, as the public code: t = m t0 + (1 - m) s0
        torch.testing.assert_close(teacher.state_dict()[k], m * t0[k] + (1 - m) * s0[k], rtol=1e-6, atol=1e-7)
    assert queue.filled == [40, 40]  # 10 x batch pushed per global crop


@pytest.mark.parametrize("arch,registers,patch", [("vit_tiny14_reg", 4, 14), ("dino_vit_tiny16", 0, 16),
                                                    ("dinov3_vit_tiny16", 4, 16)])
def test_one_step_for_each_backbone_family(arch, registers, patch, tmp_path, images):
    """The same loss for DINOv2, DINO and DINOv3: the crops snap to the model's patch (56 / 28 px -> 64 / 32 at
    /16), the maps have the patch grid of each crop, the head the backbone's width, and the step trains."""
    cfg = tiny_cfg(tmp_path, images, **{"model.arch": arch, "model.num_register_tokens": registers})
    train.validate(cfg)
    d = cfg["data"]
    assert (d["global_size"], d["local_size"]) == ((56, 28) if patch == 14 else (64, 32))
    torch.manual_seed(0)
    student, teacher, opt, gen, queue = make_run(cfg)
    assert student.backbone.patch_size == patch and student.head.mlp[0].in_features == student.backbone.embed_dim
    crops, boxes = synthetic_batch(4, cfg)
    assert [m.shape[1] for m in student(crops)] == [4] * 2 + [2] * 4
    before = {k: v.clone() for k, v in student.backbone.state_dict().items()}
    refs = train.make_reference_sampler(cfg["neco"], queue, gen, 4)
    loss, finite = train.train_step(student, student, teacher, opt, queue, gen, crops, boxes, refs, cfg,
                                    torch.autocast("cpu", enabled=False), 0.9)
    assert finite.item() and math.isfinite(loss.item())
    changed = [k for k, v in student.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("blocks.") for k in changed) and "cls_token" in changed


def test_teacher_head_is_its_own_seeded_draw_or_a_copy(tmp_path, images):
    cfg = tiny_cfg(tmp_path, images)
    assert train.load_config(ROOT / "config.yaml")["model"]["teacher_head"] == "random"  # the public run's
    torch.manual_seed(0)
    student, teacher = train.build_models(cfg)
    s, t = student.state_dict(), teacher.state_dict()
    assert all(torch.equal(s[k], t[k]) for k in s if k.startswith("backbone."))  # the backbones start equal
    heads = [k for k in s if k.startswith("head.")]
    for k in heads:
        assert not torch.equal(s[k], t[k]) or k.endswith(".bias")  # biases start at 0 in both
        if k.endswith(".weight"):  # the head's own init, as the student's: normal with std 0.02
            assert abs(t[k].std().item() - 0.02) < 0.002 and abs(t[k].mean().item()) < 0.002
    torch.manual_seed(0)  # the draw comes from the seeded RNG: every run and every rank draws the same teacher
    again_s, again_t = train.build_models(cfg)
    assert all(torch.equal(t[k], v) for k, v in again_t.state_dict().items())
    torch.manual_seed(0)
    copy_s, copy_t = train.build_models(tiny_cfg(tmp_path, images, **{"model.teacher_head": "copy"}))
    assert all(torch.equal(v, copy_t.state_dict()[k]) for k, v in copy_s.state_dict().items())
    assert all(torch.equal(s[k], v) for k, v in copy_s.state_dict().items())  # the student is the same in both


@pytest.mark.parametrize("rule", ["neco", "dinov2"])
def test_training_models_take_the_pos_embed_rule_from_the_config(tmp_path, images, rule):
    assert train.load_config(ROOT / "config.yaml")["model"]["pos_embed_rule"] == "neco"  # the public run's
    other = {"neco": "dinov2", "dinov2": "neco"}[rule]
    student, teacher = train.build_models(tiny_cfg(tmp_path, images, **{"model.pos_embed_rule": rule}))
    for net in (student, teacher):
        with torch.no_grad():
            got = net.backbone.interpolate_pos_embed(7, 7, torch.float32)  # the grid of a 98 px local crop
            want = copy.deepcopy(net.backbone).set_pos_embed_rule(rule).interpolate_pos_embed(7, 7, torch.float32)
            not_want = copy.deepcopy(net.backbone).set_pos_embed_rule(other).interpolate_pos_embed(7, 7, torch.float32)
        assert torch.equal(got, want) and (got - not_want).abs().max() > 1e-3


def test_queue_references_are_distinct_filled_rows():
    """49 distinct rows per image in the paper's run: here n distinct rows per image, over the whole draw while the
    queue holds enough (as the public code once its queue is full), never an empty row, every filled row equally
    likely."""
    gen = torch.Generator().manual_seed(0)
    queue = train.PatchQueue(64, 1, torch.device("cpu"))
    queue.push(0, torch.arange(1.0, 41.0)[:, None], 40, gen)  # 40 of 64 rows filled with the ids 1..40
    for rows, n in [(3, 8), (6, 16), (2, 40)]:
        counts = torch.zeros(41)
        for _ in range(300):
            ids = queue.sample(0, rows, n, gen)[..., 0].long()  # (rows, n)
            assert ids.shape == (rows, n) and (ids > 0).all()  # filled rows only
            assert all(len(set(row.tolist())) == n for row in ids)  # no repeat within an image
            if rows * n <= 40:
                assert len(set(ids.flatten().tolist())) == rows * n  # none across images either
            counts += torch.bincount(ids.flatten(), minlength=41)
        share = counts[1:] / counts.sum()
        assert (share - 1 / 40).abs().max() < 0.3 / 40, (rows, n)  # uniform within sampling noise
    queue.push(1, torch.arange(1.0, 11.0)[:, None], 10, gen)  # fewer filled rows than n: each used once or twice
    ids = queue.sample(1, 4, 16, gen)[..., 0].long()
    for row in ids:
        assert sorted(torch.bincount(row, minlength=11)[1:].tolist()) == [1] * 4 + [2] * 6


@pytest.mark.parametrize("fused", [True, False])
def test_batch_mode_and_nonfinite_skip(tmp_path, images, fused):
    cfg = tiny_cfg(tmp_path, images, **{"neco.references": "batch"})
    torch.manual_seed(0)
    student, teacher, _, gen, queue = make_run(cfg)
    opt = torch.optim.AdamW(train.param_groups(student, cfg), lr=1e-3, fused=fused)
    crops, boxes = synthetic_batch(4, cfg)
    refs = train.make_reference_sampler(cfg["neco"], queue, gen, 4)
    autocast = torch.autocast("cpu", enabled=False)
    loss, finite = train.train_step(student, student, teacher, opt, queue, gen, crops, boxes, refs, cfg, autocast,
                                    0.99)
    assert finite.item() and math.isfinite(loss.item())
    with torch.no_grad():
        student.head.mlp[0].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    steps_before = [s["step"].clone() for s in opt.state.values()]
    loss, finite = train.train_step(student, student, teacher, opt, queue, gen, crops, boxes, refs, cfg, autocast,
                                    0.99)
    assert not finite.item() and loss.isnan()
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) or before[k].isnan().any() for k in before)  # nothing stepped
    assert [s["step"] for s in opt.state.values()] == steps_before  # Adam's step counters did not move
    for k, v in teacher.state_dict().items():  # the teacher only moves where the student holds the NaN
        assert torch.equal(v, teacher_before[k]) or k == "head.mlp.0.weight"
        if k == "head.mlp.0.weight":
            assert torch.equal(v.flatten()[1:], teacher_before[k].flatten()[1:])


def one_step(cfg, fast, autocast=None):
    """One train_step from the same start on the same batch: the fast path (SDPA, fused AdamW) or the faithful
    one (explicit attention, for-loop AdamW). Returns loss, the student's gradients, its start and end weights."""
    torch.manual_seed(0)
    student, teacher, _, gen, queue = make_run(cfg)
    for net in (student, teacher):
        net.backbone.set_fused_attention(fast)
    opt = torch.optim.AdamW(train.param_groups(student, cfg), lr=cfg["optim"]["lr_backbone"], fused=fast,
                            foreach=False if not fast else None)
    crops, boxes = synthetic_batch(4, cfg)
    refs = train.make_reference_sampler(cfg["neco"], queue, gen, 4)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    loss, finite = train.train_step(student, student, teacher, opt, queue, gen, crops, boxes, refs, cfg,
                                    autocast or torch.autocast("cpu", enabled=False), 0.99)
    assert finite.item()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return loss, grads, start, student.state_dict()


def test_fast_path_step_gives_the_faithful_parameters_in_fp32(tmp_path, images):
    lr = 1e-3
    cfg = tiny_cfg(tmp_path, images, **{"optim.lr_backbone": lr, "optim.lr_head": lr})
    loss_f, grads_f, start, end_f = one_step(cfg, fast=False)
    loss, grads, _, end = one_step(cfg, fast=True)
    assert loss.item() == pytest.approx(loss_f.item(), rel=1e-6)
    g_max = max(g.abs().max() for g in grads_f.values())
    for name, g in grads_f.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-4 * g_max)
    # Adam's first step is lr * g / (|g| + eps): where |g| is at float-noise level its sign is noise, so compare
    # the weights where the gradient is clearly above it (most of them), and bound the rest by the step size
    checked = 0
    for name, g in grads_f.items():
        key = name
        moved = (end_f[key] - start[key]).abs().max()
        assert moved > 0.5 * lr                                 # every trained tensor took a real step
        clear = g.abs() > 1e-5
        torch.testing.assert_close(end[key][clear], end_f[key][clear], rtol=0, atol=1e-6)
        assert (end[key] - end_f[key]).abs().max() <= 2.01 * lr
        checked += clear.sum().item()
    assert checked > 0.85 * sum(g.numel() for g in grads_f.values())  # most: 89.5% with the default config


def test_bf16_autocast_step_stays_close_to_fp32(tmp_path, images):
    """The CUDA fast path runs the networks under bf16 autocast and the RoI-align, similarities, sort and loss in
    float32; the same on the CPU: the loss within 0.1%, the gradient in the same direction."""
    cfg = tiny_cfg(tmp_path, images)
    loss_f, grads_f, _, _ = one_step(cfg, fast=True)
    loss, grads, _, _ = one_step(cfg, fast=True, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loss_f.item(), rel=1e-3) and loss.item() != loss_f.item()
    flat_f = torch.cat([g.flatten() for g in grads_f.values()])
    flat = torch.cat([grads[n].flatten() for n in grads_f])
    assert F.cosine_similarity(flat, flat_f, dim=0) > 0.98


def test_compile_switch_compiles_the_blocks(tmp_path, images):
    """train.compile goes through torch.compile (counted here with dynamo's counting backend instead of inductor):
    same outputs, same state_dict keys (checkpoints stay loadable)."""
    from torch._dynamo.testing import CompileCounter
    cfg = tiny_cfg(tmp_path, images, **{"train.compile": True})
    torch.manual_seed(0)
    student, teacher = train.build_models(cfg)
    views = [torch.randn(2, 3, 56, 56)]
    keys = list(student.state_dict())
    with torch.no_grad():
        expected = student(views)[0]
    counter = CompileCounter()
    try:
        train.speed_settings(student, teacher, cfg, compile_backend=counter)
        with torch.no_grad():
            got = student(views)[0]
            teacher(views)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count >= 1 and counter.op_count > 0
    torch.testing.assert_close(got, expected)
    assert list(student.state_dict()) == keys


class ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that read a tensor's value on the host: .item(), float(t), bool(t) and `if t`, nonzero and
    boolean-mask indexing, torch.equal; on CUDA each one makes the host wait for the GPU. It does not see
    .tolist(), .cpu() or blocking host-to-device copies: test_step_does_not_sync_on_cuda covers those on a GPU."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.equal.default}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", [True, False])
def test_step_reads_nothing_back_from_the_device(tmp_path, images, fused):
    """With fused AdamW the whole step (forward, sort, loss, backward, skip decision, optimizer, EMA) reads no value
    back to the host; the for-loop AdamW reads the skip decision (and, on the CPU, its step counters), which shows
    that the check can fail."""
    cfg = tiny_cfg(tmp_path, images)
    torch.manual_seed(0)
    student, teacher, _, gen, queue = make_run(cfg)
    opt = torch.optim.AdamW(train.param_groups(student, cfg), lr=1e-3, fused=fused)
    crops, boxes = synthetic_batch(4, cfg)
    refs = train.make_reference_sampler(cfg["neco"], queue, gen, 4)
    autocast = torch.autocast("cpu", enabled=False)
    train.train_step(student, student, teacher, opt, queue, gen, crops, boxes, refs, cfg, autocast, 0.99)  # warm-up
    with ScalarReads() as mode:
        loss, finite = train.train_step(student, student, teacher, opt, queue, gen, crops, boxes, refs, cfg,
                                        autocast, 0.99)
    if fused:
        assert mode.reads == []
    else:
        assert "aten._local_scalar_dense.default" in mode.reads
    assert finite.item() and torch.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_does_not_sync_on_cuda(tmp_path, images):
    """The fast path's step on a GPU under torch.cuda.set_sync_debug_mode("error"): any synchronising call
    (a value read, a blocking copy) raises."""
    cfg = tiny_cfg(tmp_path, images, **{"train.device": "cuda"})
    device = torch.device("cuda")
    torch.manual_seed(0)
    student, teacher = train.build_models(cfg)
    student.to(device).train()
    teacher.to(device).eval()
    train.speed_settings(student, teacher, cfg)
    opt = train.make_optimizer(student, cfg)
    gen = torch.Generator(device=device).manual_seed(0)
    queue = train.PatchQueue(cfg["neco"]["queue_size"], cfg["model"]["head_out"], device)
    refs = train.make_reference_sampler(cfg["neco"], queue, gen, 4)
    crops, boxes = synthetic_batch(4, cfg)
    crops, boxes = [c.to(device) for c in crops], boxes.to(device)
    autocast = train.make_autocast(cfg, device)
    train.train_step(student, student, teacher, opt, queue, gen, crops, boxes, refs, cfg, autocast, 0.99)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, finite = train.train_step(student, student, teacher, opt, queue, gen, crops, boxes, refs, cfg,
                                        autocast, 0.99)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert finite.item() and torch.isfinite(loss)


def test_param_groups_and_schedules(tmp_path, images):
    cfg = tiny_cfg(tmp_path, images)
    student, _ = train.build_models(cfg)
    groups = train.param_groups(student, cfg)
    assert sum(len(g["params"]) for g in groups) == len(list(student.parameters()))
    no_decay = {id(p) for g in groups if not g["apply_wd"] for p in g["params"]}
    for name, p in student.named_parameters():
        assert (id(p) in no_decay) == (name.endswith(".bias") or p.ndim == 1), name
    assert [g["base_lr"] for g in groups] == [1e-3, 1e-3, 1e-2, 1e-2]
    o = cfg["optim"]
    s0, sT, sh = train.schedules(cfg, 0, 100), train.schedules(cfg, 100, 100), train.schedules(cfg, 50, 100)
    assert s0["lr_scale"] == 1.0 and s0["wd"] == pytest.approx(o["weight_decay"])
    assert s0["momentum"] == pytest.approx(o["momentum_teacher"])
    assert sT["lr_scale"] == pytest.approx(0.0, abs=1e-12) and sT["wd"] == pytest.approx(0.5)
    assert sT["momentum"] == pytest.approx(1.0)
    assert sh["wd"] == pytest.approx((0.04 + 0.5) / 2) and sh["lr_scale"] == pytest.approx(0.5)


# -----------------------------------------------------------------------------
# whole runs: checkpoints, resume


def final_student(out_dir):
    ckpt = torch.load(Path(out_dir) / "last.pt", map_location="cpu", weights_only=True)
    return ckpt, ckpt["student"]


@pytest.mark.parametrize("on_device", [True, False])
def test_checkpoint_round_trip_and_resume_equals_uninterrupted(tmp_path, images, on_device):
    """Both places of the photometric augmentation: batched on the device (its draws come from the checkpointed
    generator) and per crop in the loader."""
    full = tiny_cfg(tmp_path / "a", images, **{"data.augment_on_device": on_device})
    assert train.train(full) == 6  # 12 images // batch 4 = 3 steps per epoch, 2 epochs
    ckpt, student_a = final_student(full["out_dir"])
    assert ckpt["step"] == 6 and ckpt["config"]["model"]["arch"] == "vit_tiny14_reg"
    assert {"student", "teacher", "optimizer", "queue", "rng", "step", "config"} <= set(ckpt)
    log = [json.loads(ln) for ln in (Path(full["out_dir"]) / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert {"loss", "lr", "wd", "momentum", "img_per_s"} <= set(log[0])

    part = tiny_cfg(tmp_path / "b", images, **{"train.max_steps": 4, "train.ckpt_every": 3,
                                               "data.augment_on_device": on_device})
    assert train.train(part) == 4  # stops at 4 (checkpoints at 3 and 4) ...
    part["train"]["max_steps"] = None
    assert train.train(part) == 6  # ... and a re-run resumes from step 4
    _, student_b = final_student(part["out_dir"])
    for k in student_a:
        torch.testing.assert_close(student_b[k], student_a[k], rtol=0, atol=1e-6)


KILL_ARGS = ["model.arch=vit_tiny14_reg", "model.weights=null", "model.head_hidden=64", "model.head_out=32",
             "model.drop_path_rate=0.1", "data.global_size=56", "data.local_size=28", "data.num_workers=0",
             "neco.roi_size=4", "neco.num_references=16", "neco.queue_size=256", "optim.batch_size=4",
             "optim.epochs=3", "train.device=cpu", "train.ckpt_every=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, images):
    """The student after the 9 steps of KILL_ARGS, run in one go."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train.train(train.load_config(ROOT / "config.yaml", KILL_ARGS + [f"data.root={images}", f"out_dir={out}"]))
    return final_student(out)[1]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_killed_or_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path, images, uninterrupted, sig):
    """SIGKILL: the re-run resumes from the last periodic checkpoint. SIGTERM (a scheduler) and SIGINT (Ctrl-C), sent
    to the whole process group as a terminal or a scheduler does (a loader worker included): the step ends, a
    checkpoint is saved (there is no periodic one: ckpt_every 100), one line says so, the exit code is 128 + signal.
    Either way the re-run ends with the weights of an uninterrupted run, and the log has each step once."""
    out = tmp_path / "killed"
    extra = ["train.ckpt_every=2"] if sig == signal.SIGKILL else \
        ["train.ckpt_every=100", "train.log_every=1", "data.num_workers=1"]
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "config.yaml"), "--set", *KILL_ARGS,
           f"data.root={images}", f"out_dir={out}", *extra]
    log = out / "log.jsonl"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:  # killed after step 3: checkpoint at step 2
            os.killpg(proc.pid, sig)
            break
        time.sleep(0.05)
    stderr = proc.communicate()[1]
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    else:
        assert proc.returncode == 128 + sig, stderr
        last = stderr.strip().splitlines()[-1]
        saved = torch.load(out / "last.pt", weights_only=True)["step"]
        assert last == f"interrupted at step {saved}; checkpoint saved to {out / 'last.pt'}; re-run the same " \
                       f"command to resume", stderr
        assert "Traceback" not in stderr and 3 <= saved < 9
        assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == list(range(1, saved + 1))
        assert not (out / "last.pt.tmp").exists()
    assert subprocess.run(cmd, cwd=tmp_path, capture_output=True).returncode == 0
    _, student = final_student(out)
    for k in uninterrupted:
        torch.testing.assert_close(student[k], uninterrupted[k], rtol=0, atol=1e-6)
    steps = [json.loads(ln)["step"] for ln in log.read_text().splitlines()]
    assert steps == list(range(1, 10))  # the log has each step once


# -----------------------------------------------------------------------------
# several processes: torchrun's DDP on the CPU (gloo)


def _ddp_worker(rank, world, cfg, crops, boxes, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    student, teacher, opt, gen, queue = make_run(cfg, sgd=True)
    model = torch.nn.parallel.DistributedDataParallel(student)
    b = crops[0].shape[0] // world
    mine = train.augment_views([c[rank * b:(rank + 1) * b] for c in crops], gen, b)
    refs = train.make_reference_sampler(cfg["neco"], queue, gen, b)
    train.train_step(model, student, teacher, opt, queue, gen, mine, boxes[rank * b:(rank + 1) * b], refs, cfg,
                     torch.autocast("cpu", enabled=False), 0.99)
    if rank == 0:
        torch.save({"student": student.state_dict(), "teacher": teacher.state_dict()}, out)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("references", ["queue", "batch"])
def test_ddp_two_processes_equal_one_process_on_the_combined_batch(tmp_path, images, references):
    """Also the on-device augmentation: each rank augments its slice of the batch as one process would."""
    cfg = tiny_cfg(tmp_path, images, **{"neco.references": references})
    crops, boxes = synthetic_batch(4, cfg)
    crops = [(c.sigmoid() * 255).round().to(torch.uint8) for c in crops]  # as the loader gives them
    torch.manual_seed(0)
    student, teacher, opt, gen, queue = make_run(cfg, sgd=True)
    refs = train.make_reference_sampler(cfg["neco"], queue, gen, 4)
    train.train_step(student, student, teacher, opt, queue, gen, train.augment_views(crops, gen, 4), boxes, refs,
                     cfg, torch.autocast("cpu", enabled=False), 0.99)
    out = tmp_path / "ddp.pt"
    port = 29500 + os.getpid() % 1000
    torch.multiprocessing.spawn(_ddp_worker, args=(2, cfg, crops, boxes, out, port), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(ddp["student"][k], v, rtol=1e-5, atol=1e-6)
    before = {k: v for k, v in make_run(cfg)[0].state_dict().items()}
    assert any(not torch.equal(before[k], v) for k, v in ddp["student"].items())  # it did train


def _ddp_train_worker(rank, world, cfg, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        train.train(cfg)
        result = "finished"
    except train.Interrupted as e:
        result = f"{e.signum} {e}"
    if torch.distributed.is_initialized():  # a finished run destroys its own group
        torch.distributed.destroy_process_group()
    (out / f"rank{rank}.txt").write_text(result)


def test_ddp_ranks_stop_together_when_one_rank_gets_sigterm(tmp_path, images):
    """torchrun: only rank 1 receives SIGTERM; both ranks stop at the same step (they agree at the next log point,
    train.log_every 2), rank 0 saves that step, nobody waits forever in a collective."""
    cfg = tiny_cfg(tmp_path, images, **{"optim.epochs": 30, "train.log_every": 2, "train.ckpt_every": 1000})
    log = Path(cfg["out_dir"]) / "log.jsonl"
    port = 29500 + (os.getpid() + 1) % 1000
    ctx = torch.multiprocessing.spawn(_ddp_train_worker, args=(2, cfg, port, tmp_path), nprocs=2, join=False)
    deadline = time.time() + 600
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    os.kill(ctx.processes[1].pid, signal.SIGTERM)
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the ranks did not stop: a deadlock")
    results = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    saved = torch.load(Path(cfg["out_dir"]) / "last.pt", weights_only=True)["step"]
    assert results[0] == results[1] == f"{int(signal.SIGTERM)} at step {saved}; checkpoint saved to " \
                                       f"{Path(cfg['out_dir']) / 'last.pt'}; re-run the same command to resume"
    assert saved % 2 == 0 and saved < 90
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == list(range(1, saved + 1))


# -----------------------------------------------------------------------------
# unreadable images: replaced, counted, the same in one process and in two


@pytest.fixture(scope="module")
def seven_good_one_corrupt(tmp_path_factory, images):
    folder = tmp_path_factory.mktemp("seven_good_one_corrupt")
    for i in range(7):
        (folder / f"img_{i:02d}.jpg").write_bytes((images / f"img_{i:02d}.jpg").read_bytes())
    (folder / "img_03b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    return folder


@pytest.mark.parametrize("references", ["queue", "batch"])
def test_an_unreadable_image_is_replaced_in_one_and_in_two_processes(tmp_path, seven_good_one_corrupt, references,
                                                                     capfd):
    """7 good + 1 corrupt image, batch 8: every step trains on 8 images (before, queue mode crashed on a batch of 7
    and torchrun's all_gather on unequal batches), the count reaches the log and the checkpoint, and two gloo
    processes count and train as one process does."""
    over = {"neco.references": references, "optim.batch_size": 8, "optim.epochs": 2}
    one = tiny_cfg(tmp_path / "one", seven_good_one_corrupt, **over)
    assert train.train(one) == 2
    warnings = capfd.readouterr().err.count("warning: skipping unreadable image")
    ckpt_one, student_one = final_student(one["out_dir"])
    log = [json.loads(ln) for ln in (Path(one["out_dir"]) / "log.jsonl").read_text().splitlines()]
    assert all(r["loss"] is not None for r in log) and ckpt_one["bad_steps"] == 0
    assert ckpt_one["skipped_images"] == log[-1]["skipped_images"] == warnings >= 2  # read at least once an epoch

    two = tiny_cfg(tmp_path / "two", seven_good_one_corrupt, **over)
    torch.multiprocessing.spawn(_ddp_train_worker, args=(2, two, 29500 + (os.getpid() + 500) % 1000, tmp_path),
                                nprocs=2,
                                join=True)
    ckpt_two, student_two = final_student(two["out_dir"])
    assert ckpt_two["skipped_images"] == ckpt_one["skipped_images"]  # summed over the ranks
    # the queue holds teacher patches of both steps; with the EMA taken before the student's update the teacher
    # does not depend on Adam's steps, so the queues agree to float rounding: same crops, replacements, draws
    torch.testing.assert_close(ckpt_two["queue"]["feats"], ckpt_one["queue"]["feats"], rtol=0, atol=1e-5)
    # the students agree up to Adam's first steps on float-noise gradients (lr * g / (|g| + eps) turns a noise
    # sign into +-lr): most weights to 1e-6, all within two steps of the largest lr
    lr, close, total = max(one["optim"]["lr_backbone"], one["optim"]["lr_head"]), 0, 0
    for k, v in student_one.items():
        diff = (student_two[k] - v).abs()
        assert diff.max() <= 2 * 2.01 * lr, k
        close, total = close + (diff <= 1e-6).sum().item(), total + diff.numel()
    assert close > 0.9 * total, close / total


def test_a_folder_without_readable_images_stops_with_one_line(tmp_path):
    for i in range(3):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"not an image")
    res = run_cli("--config", str(ROOT / "config.yaml"), "--set", f"data.root={tmp_path}",
                  f"out_dir={tmp_path / 'run'}", "model.arch=vit_tiny14_reg", "model.weights=null", "data.num_workers=0", "data.global_size=56",
                  "data.local_size=28", "optim.batch_size=2", "train.device=cpu", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == res.stderr.strip().splitlines()[-1]
    assert errors[0].startswith("error: data.root") and str(tmp_path) in errors[0] and "could not be read" in errors[0]


# -----------------------------------------------------------------------------
# the command line: one line naming the culprit, exit code 2, no traceback


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("args, culprit", [
    (["--config", "missing.yaml"], "missing.yaml"),
    (["--set", "optim.epoch=3"], "optim.epoch"),
    (["--set", "optim.epochs=many"], "optim.epochs"),
    (["--set", "data.root=/no/such/folder"], "/no/such/folder"),
    (["--set", "data.root=tests", "model.weights=/no/such/file.pth"], "/no/such/file.pth"),
    (["--set", "neco.sort_network=quick"], "quick"),
])
def test_cli_errors_are_one_line(args, culprit):
    res = run_cli(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_too_many_bad_steps_stop_with_a_message(tmp_path, images, capsys):
    cfg = tiny_cfg(tmp_path, images, **{"train.max_bad_steps": 2})
    student, _ = train.build_models(cfg)
    sd = {k: torch.full_like(v, float("nan")) for k, v in student.backbone.state_dict().items()}
    torch.save(sd, tmp_path / "nan.pth")
    cfg["model"]["weights"] = str(tmp_path / "nan.pth")
    with pytest.raises(train.TrainingStopped, match="2 steps in a row.*no checkpoint was kept.*lower optim.lr_back"):
        train.train(cfg)
    out = Path(cfg["out_dir"])
    assert not (out / "last.pt").exists() and not (out / "last.pt.tmp").exists()  # NaN weights are never kept


# -----------------------------------------------------------------------------
# no lost work: the log, the out_dir lock, a full or read-only disk, non-finite stops, changed settings, bad values


def log_steps(out_dir):
    return [json.loads(ln)["step"] for ln in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def test_resume_skips_a_cut_off_log_line_and_a_run_without_checkpoint_starts_a_fresh_log(tmp_path, images):
    cfg = tiny_cfg(tmp_path, images, **{"train.max_steps": 4})
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True)
    (out / "log.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))  # died before saving
    assert train.train(cfg) == 4
    assert log_steps(out) == [1, 2, 3, 4]
    assert all("loss" in json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines())  # this run's lines
    with open(out / "log.jsonl", "ab") as f:  # a full disk cut a line off; a power loss left NUL bytes
        f.write(b'{"step": 5, "epoch": 1, "lo' + b"\x00" * 64 + b"\n" + b"\x00" * 32)
    cfg["train"]["max_steps"] = None
    assert train.train(cfg) == 6
    assert log_steps(out) == [1, 2, 3, 4, 5, 6]


def _trim_log_killed_mid_write(log, step, after_bytes):
    """trim_log in a forked child that SIGKILLs itself once after_bytes bytes went to any file opened for writing."""
    real_open, written = builtins.open, [0]

    class Dying:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def write(self, data):
            if written[0] + len(data) >= after_bytes:
                self.f.write(data[:after_bytes - written[0]])
                self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            written[0] += len(data)
            return self.f.write(data)

    def dying_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Dying(f) if set(mode) & set("wax+") else f

    builtins.open = io.open = dying_open  # Path.write_text goes through io.open
    train.trim_log(log, step)


def test_sigkill_during_the_log_rewrite_leaves_the_old_or_the_new_log(tmp_path):
    """A SIGKILL in the middle of the rewrite on resume (before any byte, after some, after most) leaves the log
    either as it was or trimmed; the in-place rewrite left it empty or cut."""
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 10_001)]
    old, new = "".join(lines), "".join(lines[:5000])
    for after_bytes in (0, 1000, len(new) - 10):
        log.write_text(old)
        child = multiprocessing.get_context("fork").Process(target=_trim_log_killed_mid_write,
                                                           args=(log, 5000, after_bytes))
        child.start()
        child.join()
        assert child.exitcode == -signal.SIGKILL  # it did die in the middle of a write
        assert log.read_text() in (old, new)
    train.trim_log(log, 5000)  # the next resume: the temporary file left by the kill does not get in the way
    assert log.read_text() == new


def test_second_run_on_the_same_out_dir_stops_naming_the_first(tmp_path, images, capsys):
    sets = tiny_sets(tmp_path / "run", images, **{"optim.epochs": 1000})
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "config.yaml"),
                              "--set", *sets], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / "run" / "train.lock"
    deadline = time.time() + 300
    while time.time() < deadline and not (lock.is_file() and f"pid {first.pid} " in lock.read_text()):
        time.sleep(0.05)
    try:
        assert train.main(["--config", str(ROOT / "config.yaml"), "--set", *sets]) == 2
    finally:
        first.kill()  # SIGKILL: its lock goes with it
        first.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {first.pid} on {socket.gethostname()}" in err[0] and "out_dir" in err[0], err
    # the lock of a killed run does not block: the same command runs (max_steps 0: no training needed to show it)
    assert train.main(["--config", str(ROOT / "config.yaml"), "--set", *sets, "train.max_steps=0"]) == 0


@pytest.mark.parametrize("fault", ["dev_full", "midway"])
def test_full_disk_keeps_last_pt_removes_the_temporary_file_and_says_so(tmp_path, images, monkeypatch, fault):
    """dev_full: last.pt.tmp is a link to /dev/full, where every write fails with ENOSPC from the kernel. midway:
    torch.save writes half of the checkpoint, then the write fails with ENOSPC."""
    cfg = tiny_cfg(tmp_path, images, **{"train.max_steps": 2})
    train.train(cfg)
    out = Path(cfg["out_dir"])
    kept, tmp = (out / "last.pt").read_bytes(), out / "last.pt.tmp"
    if fault == "dev_full":
        tmp.symlink_to("/dev/full")
    else:
        real_save = torch.save

        def save_half(obj, f):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[:buffer.tell() // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(torch, "save", save_half)
    cfg["train"]["max_steps"] = None
    with pytest.raises(train.TrainingStopped) as stopped:
        train.train(cfg)
    assert str(stopped.value).startswith(f"no space left on {out} (writing last.pt)")
    assert "\n" not in str(stopped.value)
    assert (out / "last.pt").read_bytes() == kept and not tmp.exists() and not tmp.is_symlink()


def test_checkpoint_file_and_folder_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    calls, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(
        "fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("rename") or real_replace(a, b))
    train.write_atomic(tmp_path / "last.pt", lambda f: torch.save({"x": torch.arange(3)}, f))
    assert calls == ["fsync file", "rename", "fsync folder"]
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["x"], torch.arange(3))


def test_unwritable_out_dir_is_one_line_before_any_model_or_data(tmp_path, images, monkeypatch, capsys):
    """A folder below a regular file (no one can create it), and a read-only folder: tests run as root, which
    writes into a chmod 555 folder anyway, so as root the folder's create call fails as on a read-only mount."""
    loaded = []
    monkeypatch.setattr(train, "build_models", lambda cfg: loaded.append("model"))
    monkeypatch.setattr(train, "TrainImages", lambda *a, **k: loaded.append("data"))
    (tmp_path / "a_file").write_text("")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:
        def no_write(*args, dir=None, **kw):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        monkeypatch.setattr(train.tempfile, "TemporaryFile", no_write)
    for out_dir in (tmp_path / "a_file" / "run", read_only):
        assert train.main(["--config", str(ROOT / "config.yaml"), "--set", *tiny_sets(out_dir, images)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: out_dir '{out_dir}' is not writable"), err
    assert loaded == []


def test_non_finite_stop_keeps_the_last_good_checkpoint_and_the_advice_finishes_the_run(tmp_path, images):
    """lr 1e6: step 3's loss is finite and its update wrecks the weights (finite, ~1e6), steps 4 and 5 are
    non-finite. last.pt keeps step 2, also with a checkpoint at every step; re-running with a lower
    optim.lr_backbone, as the message says, resumes from it with that lr and finishes."""
    over = {"train.ckpt_every": 1, "train.max_bad_steps": 2}
    assert train.train(tiny_cfg(tmp_path, images, **over, **{"train.max_steps": 2})) == 2
    out = tmp_path / "run"
    good = (out / "last.pt").read_bytes()
    with pytest.raises(train.TrainingStopped, match="keeps step 2: re-run with a lower optim.lr_backbone"):
        train.train(tiny_cfg(tmp_path, images, **over, **{"optim.lr_backbone": 1e6}))
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] is None for r in log] == [False, False, False, True, True]
    assert (out / "last.pt").read_bytes() == good and not (out / "last.pt.tmp").exists()
    assert train.train(tiny_cfg(tmp_path, images, **over, **{"optim.lr_backbone": 5e-4})) == 6
    ckpt = torch.load(out / "last.pt", weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert groups[0]["base_lr"] == 5e-4 and groups[2]["base_lr"] == 1e-2
    assert groups[0]["lr"] == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))  # set for step 6
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values())
    assert log_steps(out) == [1, 2, 3, 4, 5, 6]


def test_resume_with_changed_run_settings_is_refused_naming_them(tmp_path, images):
    assert train.train(tiny_cfg(tmp_path, images, **{"train.max_steps": 2})) == 2
    kept = (tmp_path / "run" / "last.pt").read_bytes()
    shutil.copytree(images, tmp_path / "copy")  # the same images in another folder: still another data.root
    changed = tiny_cfg(tmp_path, images, **{"optim.batch_size": 2, "seed": 1, "neco.queue_size": 128,
                                            "data.root": tmp_path / "copy"})
    with pytest.raises(train.ConfigError) as refused:
        train.train(changed)
    message = str(refused.value)
    for change in ("optim.batch_size 4 -> 2", "seed 0 -> 1", "neco.queue_size 256 -> 128",
                   f"data.root '{images}' -> '{tmp_path / 'copy'}'", "another out_dir"):
        assert change in message, message
    assert (tmp_path / "run" / "last.pt").read_bytes() == kept
    safe = {"optim.lr_backbone": 5e-4, "optim.lr_head": 5e-3, "train.log_every": 1, "train.ckpt_every": 5,
            "data.num_workers": 1, "train.max_steps": 3}
    assert train.train(tiny_cfg(tmp_path, images, **safe)) == 3


def test_demo_regenerates_a_synthetic_set_cut_off_by_a_kill(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jpegs = tmp_path / "data" / "synthetic" / "VOC2012" / "JPEGImages"
    jpegs.mkdir(parents=True)
    (jpegs.parent / ".synthetic").write_text("incomplete")  # what a kill during the generation leaves: the marker
    for i in range(3):  # written first, not yet complete, some images, the last one cut
        (jpegs / f"syn_{i:05d}.jpg").write_bytes(b"\xff\xd8\xff" * (1 if i == 2 else 100))
    cfg = train.load_config(ROOT / "config.yaml", ["train.max_steps=0"], "demo")
    train.validate(cfg, demo=True)
    assert train.train(cfg, demo=True) == 0
    assert len(list(jpegs.glob("*.jpg"))) == 200
    assert json.loads((jpegs.parent / ".synthetic").read_text())["n_images"] == 200


@pytest.mark.parametrize("pair, key", [
    ("optim.lr_backbone=", "optim.lr_backbone"), ("optim.lr_backbone=-1e-5", "optim.lr_backbone"),
    ("optim.lr_head=0", "optim.lr_head"), ("optim.lr_backbone=nan", "optim.lr_backbone"),
    ("optim.batch_size=0", "optim.batch_size"), ("optim.epochs=-1", "optim.epochs"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"), ("optim.betas=[0.9, 1.0]", "optim.betas"),
    ("optim.betas=[0.9]", "optim.betas"), ("optim.momentum_teacher=3", "optim.momentum_teacher"),
    ("optim.clip_grad=-1", "optim.clip_grad"), ("neco.roi_size=0", "neco.roi_size"),
    ("neco.queue_size=0", "neco.queue_size"), ("train.max_steps=-1", "train.max_steps"),
    ("train.ckpt_every=0", "train.ckpt_every"), ("train.log_every=0", "train.log_every"),
    ("train.max_bad_steps=0", "train.max_bad_steps"), ("data.num_workers=-1", "data.num_workers"),
    ("data.min_overlap=0.5", "data.min_overlap"), ("data.global_scale=[0.5, 0.2]", "data.global_scale"),
    ("data.local_size=0", "data.local_size"), ("data.n_local=-1", "data.n_local"),
    ("model.drop_path_rate=1.5", "model.drop_path_rate"), ("model.head_out=0", "model.head_out"),
    ("model.arch=vit_huge14", "model.arch"), ("seed=-1", "seed"), ("out_dir=", "out_dir"),
])
def test_bad_values_are_one_line_naming_the_key_before_anything_loads(pair, key, monkeypatch, capsys):
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("validation let it through"))
    assert train.main(["--config", str(ROOT / "config.yaml"), "--set", "data.root=tests", pair]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: config key '{key}' must be"), err


def test_bad_config_files_are_one_line_naming_file_and_line(tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    del cfg["train"]
    (tmp_path / "no_train.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "bad.yaml").write_text("seed: 0\nmodel:\n  arch: a: b\n")
    (tmp_path / "latin1.yaml").write_bytes("seed: 0\nout_dir: runs\n# r\u00e9sum\u00e9\n".encode("latin-1"))
    (tmp_path / "a_folder.yaml").mkdir()
    for name, expected in (("no_train.yaml", "config key 'train.device' is missing (no 'train' in the config file"),
                           ("bad.yaml", "is not valid YAML at line 3, column 10"),
                           ("latin1.yaml", "is not UTF-8 text (line 3)"),
                           ("a_folder.yaml", "cannot be read (Is a directory)")):
        assert train.main(["--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and (name in err[0] or name == "no_train.yaml"), err


def test_a_misspelt_key_in_the_config_file_is_one_line_naming_it(tmp_path, images, capsys):
    """A misspelt key is refused, not ignored (the model section's keys are build_student_teacher's arguments)."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["model"]["drop_path_rat"] = 0.1
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(cfg))
    sets = tiny_sets(tmp_path / "run", images)
    assert train.main(["--config", str(tmp_path / "typo.yaml"), "--set", *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: config key 'model.drop_path_rat' is unknown: compare the config file with the repository's "
                   "config.yaml"], err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_a_finished_run_rerun_says_there_is_nothing_to_run(tmp_path, images, capsys):
    sets = tiny_sets(tmp_path / "run", images, **{"train.max_steps": 2})
    assert train.main(["--config", str(ROOT / "config.yaml"), "--set", *sets]) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert first.startswith("done: step 2/") and "loss " in first and "(first/last 5 steps of this process)" in first
    assert train.main(["--config", str(ROOT / "config.yaml"), "--set", *sets]) == 0
    again = capsys.readouterr().out.strip().splitlines()[-1]
    assert again.startswith("done: step 2/") and "no step to run" in again and "nan" not in again, again
