"""train.py: the loss against brute force, gradients, EMA, schedules, checkpoints, exact resume, DDP, CLI errors."""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils._python_dispatch
from torchvision.io import write_jpeg

import train
from sort import diff_sort

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path, images, **over):
    """The real config with a tiny model and crops: a few steps take a second on the CPU."""
    sets = [f"out_dir={tmp_path / 'run'}", f"data.root={images}", "model.arch=vit_tiny14_reg", "model.weights=null",
            "model.head_hidden=64", "model.head_out=32", "model.drop_path_rate=0.0", "data.global_size=56",
            "data.local_size=28", "data.num_workers=0", "neco.roi_size=4", "neco.num_references=16",
            "neco.queue_size=256", "optim.batch_size=4", "optim.epochs=2", "optim.lr_backbone=1e-3",
            "optim.lr_head=1e-2", "train.device=cpu", "train.ckpt_every=2"]
    sets += [f"{k}={v}" for k, v in over.items()]
    return train.load_config(ROOT / "config.yaml", sets)


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


def test_sigkill_and_rerun_gives_the_uninterrupted_weights(tmp_path, images):
    """A run killed with SIGKILL mid-training and re-run ends where an uninterrupted run ends."""
    args = ["--set", f"out_dir={tmp_path / 'killed'}", f"data.root={images}", "model.arch=vit_tiny14_reg",
            "model.weights=null", "model.head_hidden=64", "model.head_out=32", "model.drop_path_rate=0.1",
            "data.global_size=56", "data.local_size=28", "data.num_workers=0", "neco.roi_size=4",
            "neco.num_references=16", "neco.queue_size=256", "optim.batch_size=4", "optim.epochs=3",
            "train.device=cpu", "train.ckpt_every=2"]
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "config.yaml")] + args
    log = tmp_path / "killed" / "log.jsonl"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:  # killed after step 3: checkpoint at step 2
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert subprocess.run(cmd, cwd=tmp_path, capture_output=True).returncode == 0

    ref = train.load_config(ROOT / "config.yaml", args[1:])
    ref["out_dir"] = str(tmp_path / "uninterrupted")
    train.train(ref)
    _, killed = final_student(tmp_path / "killed")
    _, clean = final_student(tmp_path / "uninterrupted")
    for k in clean:
        torch.testing.assert_close(killed[k], clean[k], rtol=0, atol=1e-6)
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


# -----------------------------------------------------------------------------
# unreadable images: replaced, counted, the same in one process and in two


@pytest.fixture(scope="module")
def seven_good_one_corrupt(tmp_path_factory, images):
    folder = tmp_path_factory.mktemp("seven_good_one_corrupt")
    for i in range(7):
        (folder / f"img_{i:02d}.jpg").write_bytes((images / f"img_{i:02d}.jpg").read_bytes())
    (folder / "img_03b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    return folder


def _ddp_train_worker(rank, world, cfg, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    train.train(cfg)


@pytest.mark.parametrize("references", ["queue", "batch"])
def test_an_unreadable_image_is_replaced_in_one_and_in_two_processes(tmp_path, seven_good_one_corrupt, references,
                                                                     capfd):
    """7 good + 1 corrupt image, batch 8: every step trains on 8 images (before, queue mode crashed on a batch of 7
    and torchrun's all_gather on unequal batches), the count reaches the log and the checkpoint, and two gloo
    processes count and train as one process does."""
    over = {"neco.references": references, "optim.batch_size": 8, "optim.epochs": 2}
    one = tiny_cfg(tmp_path / "one", seven_good_one_corrupt, **over)
    assert train.train(one) == 2
    warnings = capfd.readouterr().out.count("warning: skipping unreadable image")
    ckpt_one, student_one = final_student(one["out_dir"])
    log = [json.loads(ln) for ln in (Path(one["out_dir"]) / "log.jsonl").read_text().splitlines()]
    assert all(r["loss"] is not None for r in log) and ckpt_one["bad_steps"] == 0
    assert ckpt_one["skipped_images"] == log[-1]["skipped_images"] == warnings >= 2  # read at least once an epoch

    two = tiny_cfg(tmp_path / "two", seven_good_one_corrupt, **over)
    torch.multiprocessing.spawn(_ddp_train_worker, args=(2, two, 29500 + (os.getpid() + 500) % 1000), nprocs=2,
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
    with pytest.raises(train.TrainingStopped, match="2 steps in a row"):
        train.train(cfg)
    assert torch.load(Path(cfg["out_dir"]) / "last.pt", weights_only=True)["bad_steps"] == 2
