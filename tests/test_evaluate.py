"""evaluate.py: metrics and matching against brute force, exact chunked k-NN, label transfer, the memory, the linear
probe, K-means, every task end to end on tiny synthetic data, the CLI's errors, the in-context protocol against
an independent brute-force run of it, and the feature pictures against an SVD and cosines by hand."""
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.io import decode_image, encode_jpeg, encode_png
from torchvision.transforms import v2

import data
import evaluate
import model

ROOT = Path(__file__).resolve().parents[1]


def write_train_checkpoint(path, seed=0, teacher_seed=None):
    """A checkpoint shaped like train.py's: ModuleDict({backbone, head}) state_dicts for student and teacher."""
    def modules(s):
        torch.manual_seed(s)
        return nn.ModuleDict({"backbone": model.build_backbone("vit_tiny14_reg"),
                              "head": nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(192, 32))})})
    student = modules(seed)
    teacher = modules(seed if teacher_seed is None else teacher_seed)
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "step": 7,
                "config": {"model": {"arch": "vit_tiny14_reg", "num_register_tokens": 4}}}, path)
    return student["backbone"].eval(), teacher["backbone"].eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    student, _ = write_train_checkpoint(path)
    return path, student


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """8 synthetic scenes in the VOC devkit layout: 6 train, 2 val."""
    return data.make_synthetic_voc(tmp_path_factory.mktemp("syn"), n_images=8, image_size=64)


def run_cli(capsys, argv):
    """evaluate.main in-process: (exit status, parsed last stdout line or None, stderr)."""
    rc = evaluate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return rc, (json.loads(lines[-1]) if rc == 0 else None), err


TINY = ["eval.device=cpu", "eval.num_workers=0", "eval.incontext.image_size=56", "eval.incontext.batch_size=4",
        "eval.linear.image_size=56", "eval.linear.out_size=28", "eval.linear.epochs=2", "eval.linear.batch_size=4",
        "eval.linear.coco_fraction=1.0", "eval.cluster.image_size=56", "eval.cluster.gt_size=28",
        "eval.cluster.ks=[0,9]", "eval.cluster.seeds=2", "eval.cluster.batch_size=4"]


# -----------------------------------------------------------------------------
# mIoU and matching


def test_miou_matches_bruteforce():
    g = torch.Generator().manual_seed(0)
    C = 5
    gt = torch.randint(0, C, (3, 17, 13), generator=g)
    gt[torch.rand(gt.shape, generator=g) < 0.2] = 255
    gt[gt == 3] = 1  # class 3 absent from the GT ...
    pred = torch.randint(0, C, gt.shape, generator=g)
    pred[pred == 4] = 0  # ... class 4 absent from GT? no: absent from the predictions only
    conf = evaluate.confusion_matrix(pred, gt, C, 255)
    ious, _ = evaluate.score(conf)
    expected = []
    for c in range(C):
        tp = fp = fn = 0
        for p, t in zip(pred.flatten().tolist(), gt.flatten().tolist()):
            if t == 255:
                continue
            tp += p == c and t == c
            fp += p == c and t != c
            fn += p != c and t == c
        expected.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
    assert conf.sum() == (gt != 255).sum()
    for c in range(C):
        assert (math.isnan(expected[c]) and math.isnan(ious[c])) or abs(ious[c].item() - expected[c]) < 1e-12
    # class 3 is predicted but never true: union > 0, IoU 0, and it counts in the mean
    assert expected[3] == 0
    assert evaluate.score(conf, over_all=False)[1] == pytest.approx(sum(expected) / C)
    assert evaluate.score(conf)[1] == pytest.approx(sum(expected) / C)  # every class has a union here


def test_incontext_scores_ade_hand_made():
    # ADE20k: 151 classes, 0 = unlabeled; only classes 1 and 2 (and a stray prediction 5) occur
    C = 151
    gt = torch.tensor([[0, 1, 1, 2, 2, 2, 0]])
    pred = torch.tensor([[5, 1, 2, 2, 2, 2, 0]])
    conf = evaluate.confusion_matrix(pred, gt, C, 255)  # in-context: only void (255) dropped when accumulating
    scores = evaluate.incontext_scores(conf, ignore_index=0)
    # with GT 0 dropped: class 1 TP 1, FN 1 -> 1/2; class 2 TP 3, FP 1 -> 3/4; Hungarian keeps the identity
    assert scores["hbird"][1] == pytest.approx((1 / 2 + 3 / 4) / 151)  # the reference: over all 151 classes
    assert scores["hungarian_nanmean"][1] == pytest.approx((1 / 2 + 3 / 4) / 2)
    assert scores["plain"][1] == pytest.approx((1 / 2 + 3 / 4) / 2)  # over the classes present, 0 left out
    # DIP: class 0 scored (TP 1, FN 1 -> 1/2), class 5 predicted once, never true -> 0
    assert scores["dip"][1] == pytest.approx((1 / 2 + 1 / 2 + 3 / 4 + 0) / 4)


def test_hungarian_recovers_permuted_prediction():
    g = torch.Generator().manual_seed(0)
    C = 8
    gt = torch.randint(0, C, (20000,), generator=g)
    pred = torch.where(torch.rand(gt.shape, generator=g) < 0.7, gt, torch.randint(0, C, gt.shape, generator=g))
    identity = evaluate.score(evaluate.confusion_matrix(pred, gt, C, 255))[1]
    perm = torch.tensor([3, 0, 6, 1, 7, 2, 4, 5])  # no class keeps its name
    conf = evaluate.confusion_matrix(perm[pred], gt, C, 255)  # the same prediction under other class names
    tp = conf.diag().double()
    renamed = (tp / (conf.sum(0) + conf.sum(1) - tp)).mean().item()  # IoU by hand, every class has a union
    assert renamed < identity - 0.3
    scores = evaluate.incontext_scores(conf, ignore_index=255)
    assert scores["hbird"][1] == pytest.approx(identity, abs=1e-12)
    assert scores["plain"][1] == pytest.approx(renamed)


@pytest.mark.parametrize("n,m,seed", [(1, 1, 0), (3, 3, 1), (5, 5, 2), (6, 6, 3), (4, 6, 4), (5, 7, 5)])
def test_hungarian_matches_bruteforce(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    cost = torch.randint(0, 20, (n, m), generator=g).double()  # integer costs: many ties, a harder case
    cols = evaluate.hungarian(cost)
    assert len(set(cols.tolist())) == n and all(0 <= c < m for c in cols.tolist())
    best = min(sum(cost[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(m), n))
    assert cost[torch.arange(n), cols].sum().item() == best


def test_hungarian_mapping_maximises_iou():
    # 3 clusters x 3 classes; the greedy choice for cluster 0 (class 0, 50 px) would block the better total
    conf = torch.tensor([[50, 45, 0], [60, 0, 0], [0, 0, 30]])
    mapping = evaluate.match_clusters(conf)[0].tolist()
    cls_px, clu_px = conf.sum(0).double(), conf.sum(1).double()

    def total_iou(p):
        return sum(conf[k, p[k]] / (clu_px[k] + cls_px[p[k]] - conf[k, p[k]]) for k in range(3))
    assert mapping == list(max(itertools.permutations(range(3)), key=total_iou))


def test_many_to_one_by_precision():
    # rows: clusters, columns: classes (pixel counts)
    conf = torch.tensor([[8, 2], [1, 9], [3, 4], [0, 5]])
    mapping, class_conf = evaluate.match_clusters(conf)  # 4 clusters, 2 classes: many-to-one
    assert mapping.tolist() == [0, 1, 1, 1]
    # GT class 0: 8 px in cluster 0 (-> 0), 1 + 3 in clusters mapped to 1; class 1: 2 px in cluster 0, 18 in the rest
    assert class_conf.tolist() == [[8, 4], [2, 18]]


# -----------------------------------------------------------------------------
# in-context pieces


@pytest.mark.parametrize("qc,kc,k,bias", [(7, 13, 5, False), (64, 1000, 5, False), (3, 50, 30, False),
                                         (20, 7, 40, False), (7, 13, 5, True), (3, 50, 30, True)])
def test_topk_chunked_equals_full(qc, kc, k, bias):
    g = torch.Generator().manual_seed(k)
    q, keys = torch.randn(40, 16, generator=g), torch.randn(300 if k < 40 else 35, 16, generator=g)
    key_bias = -keys.pow(2).sum(1) / 2 if bias else None  # ranks by Euclidean distance
    scores, idx = evaluate.topk_inner_product(q, keys, k, key_bias=key_bias, query_chunk=qc, key_chunk=kc)
    full_s, full_i = (q @ keys.T + (0 if key_bias is None else key_bias)).topk(min(k, len(keys)), dim=1)
    if bias:
        assert torch.equal(idx, torch.cdist(q, keys).topk(min(k, len(keys)), dim=1, largest=False).indices)
    assert torch.equal(idx, full_i)
    torch.testing.assert_close(scores, full_s)


def test_topk_half_keys_rescores_in_fp32():
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(10, 32, generator=g), torch.randn(200, 32, generator=g).to(torch.bfloat16)
    scores, idx = evaluate.topk_inner_product(q, keys, 8, key_chunk=64)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, (q[:, None] * keys[idx].float()).sum(-1))
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    # against the exact fp32 ranking of the same rounded keys: the same neighbours (up to rare near-ties)
    exact = (q @ keys.float().T).topk(8, dim=1).indices
    overlap = sum(len(set(a) & set(b)) for a, b in zip(idx.tolist(), exact.tolist()))
    assert overlap >= 0.95 * exact.numel()
    # with a key bias (the Euclidean ranking): the fp32 rescoring adds it too
    bias = -keys.float().pow(2).sum(1) / 2
    scores, idx = evaluate.topk_inner_product(q, keys, 8, key_bias=bias, key_chunk=64)
    torch.testing.assert_close(scores, (q[:, None] * keys[idx].float()).sum(-1) + bias[idx])
    exact = (q @ keys.float().T + bias).topk(8, dim=1).indices
    assert sum(len(set(a) & set(b)) for a, b in zip(idx.tolist(), exact.tolist())) >= 0.95 * exact.numel()


def test_transfer_labels_hand_made():
    t = 0.02
    # query 1 (x axis): keys 1 and 2 at cosines 0.5 and 0.5 - t ln 3, so weights e^0 : e^-ln3 = 3 : 1 -> 3/4, 1/4;
    # query 2 (z axis): keys 3 and 4 at cosine 0.1 each -> 1/2, 1/2. Each query's other keys are at cosine 0.
    c = 0.5 - t * math.log(3)
    keys = torch.tensor([[0.5, 0.75 ** 0.5, 0.0], [c, -(1 - c * c) ** 0.5, 0.0],
                         [0.0, 0.99 ** 0.5, 0.1], [0.0, -0.99 ** 0.5, 0.1]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    queries = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])  # not normalised: knn_transfer does it
    out = evaluate.knn_transfer(queries, keys, labels, 2, t)
    torch.testing.assert_close(out, torch.tensor([[0.75, 0.125, 0.125], [0.0, 0.5, 0.5]]))


def brute_force_knn_transfer(queries, keys, labels, k, temperature, euclidean):
    """float64, one query at a time: the k nearest keys (largest cosine, or smallest Euclidean distance on the raw
    features), softmax of cosine / temperature over them, weighted sum of their labels."""
    q, m = queries.double(), keys.double()
    out = []
    for qi in q:
        if euclidean:
            idx = ((m - qi) ** 2).sum(1).argsort()[:k]
        else:
            idx = ((m / m.norm(dim=1, keepdim=True)) @ (qi / qi.norm())).argsort(descending=True)[:k]
        cosine = (m[idx] @ qi) / (m[idx].norm(dim=1) * qi.norm())
        w = torch.softmax(cosine / temperature, 0)
        out.append((w[:, None] * labels[idx].double()).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("protocol", ["hbird", "dip"])
def test_knn_transfer_matches_brute_force(protocol):
    g = torch.Generator().manual_seed(1)
    # raw features of different norms: the Euclidean and the cosine neighbours differ
    keys = torch.randn(500, 24, generator=g) * torch.rand(500, 1, generator=g).mul(3).add(0.2)
    queries = torch.randn(37, 24, generator=g) * 2
    labels = torch.randint(0, 50, (500, 5), generator=g).to(torch.uint8)
    euclidean = protocol == "dip"
    t = evaluate.PROTOCOLS[protocol]["temperature"]
    expected = brute_force_knn_transfer(queries, keys, labels, 30, t, euclidean)
    if euclidean:
        half_sq = keys.pow(2).sum(1) / 2
        got = evaluate.knn_transfer(queries, keys, labels, 30, t, key_half_sq_norms=half_sq)
    else:
        got = evaluate.knn_transfer(queries, F.normalize(keys, dim=-1), labels, 30, t)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
    # the two searches pick different neighbours here, so the test tells them apart
    other = brute_force_knn_transfer(queries, keys, labels, 30, t, not euclidean)
    assert (other - expected).abs().max() > 1


def test_patch_label_histograms_hand_made():
    mask = torch.tensor([[0, 0, 1, 1, 2, 255],
                         [0, 1, 1, 1, 2, 2],
                         [3, 3, 255, 255, 0, 0],
                         [3, 3, 255, 1, 0, 0]])
    counts = evaluate.patch_label_histograms(mask[None], num_classes=4, patch_size=2, ignore_index=255)
    expected = torch.tensor([[3, 1, 0, 0], [0, 4, 0, 0], [1, 0, 3, 0],  # 255 counts as class 0 (the quirk)
                             [0, 0, 0, 4], [3, 1, 0, 0], [4, 0, 0, 0]])
    assert counts.shape == (1, 6, 4)
    assert torch.equal(counts[0], expected)


def test_rare_class_sampler_budget_and_preference():
    # 100 patches: 99 pure background, one pure class 1 (patch 37)
    counts = torch.zeros(1, 100, 2, dtype=torch.long)
    counts[0, :, 0] = 196
    counts[0, 37] = torch.tensor([0, 196])
    g = torch.Generator().manual_seed(0)
    assert evaluate.rare_class_sample(counts, 500, g).shape == (1, 100)  # clamped to the patches available
    kept = [evaluate.rare_class_sample(counts, 10, g)[0] for _ in range(100)]
    assert all(len(set(k.tolist())) == 10 for k in kept)
    # the rare patch scores 1*U against 99*U for the others: kept nearly always (a uniform draw: 10% of the time)
    assert sum(37 in k.tolist() for k in kept) >= 95


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items, num_classes, ignore_index=255):
        self.items, self.num_classes, self.ignore_index = items, num_classes, ignore_index

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("memory_size,aug_epochs,expected", [(None, 0, 3 * 16), (None, 2, 2 * 3 * 16),
                                                              (30, 2, 2 * 3 * 5), (10_000, 1, 3 * 16), (2, 1, 3)])
def test_memory_size_and_labels(ckpt, memory_size, aug_epochs, expected):
    g = torch.Generator().manual_seed(0)
    items = [(torch.randint(0, 256, (3, 70, 60), dtype=torch.uint8, generator=g),
              torch.randint(0, 3, (70, 60), generator=g)) for _ in range(3)]
    keys, labels = evaluate.build_memory(ckpt[1], ListDataset(items, 3), 3, 255, image_size=56,
                                         memory_size=memory_size, aug_epochs=aug_epochs, batch_size=2)
    assert keys.shape == (expected, 192) and labels.shape == (expected, 3)  # 56 px: 4 x 4 = 16 patches per image
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(expected))
    assert (labels.long().sum(1) == 14 * 14).all()


def test_a_smaller_budget_keeps_the_first_patches_of_each_image(ckpt):
    g = torch.Generator().manual_seed(1)
    items = [(torch.randint(0, 256, (3, 56, 56), dtype=torch.uint8, generator=g),
              torch.randint(0, 3, (56, 56), generator=g)) for _ in range(3)]
    memories = {}
    for size in (12, 30, 96):  # 2 passes x 3 images: 2, 5 and (capped) 16 patches per image and pass
        torch.manual_seed(0)
        memories[size] = evaluate.build_memory(ckpt[1], ListDataset(items, 3), 3, 255, image_size=56,
                                               memory_size=size, aug_epochs=2, batch_size=2)
    big_keys, big_labels = (x.unflatten(0, (6, 16)) for x in memories[96])
    for size, n in ((12, 2), (30, 5)):
        torch.testing.assert_close(memories[size][0], big_keys[:, :n].flatten(0, 1), rtol=0, atol=0)
        assert torch.equal(memories[size][1], big_labels[:, :n].flatten(0, 1))


# -----------------------------------------------------------------------------
# linear probe, PCA, K-means


def test_linear_head_learns_separable_problem():
    g = torch.Generator().manual_seed(0)
    C, D, n = 3, 8, 48
    prototypes = torch.randn(C, D, generator=g)
    classes = torch.arange(n) % C
    # token features: the class prototype plus small noise, so a linear map separates them
    feats = prototypes[classes][:, None, None, :] + 0.2 * torch.randn(n, 4, 4, D, generator=g)  # (n, h, w, D)
    targets = classes[:, None, None].expand(n, 12, 12)  # every pixel of image i has class i % 3
    s = dict(epochs=12, lr=0.1, momentum=0.9, weight_decay=0.0, lr_step_epoch=10, lr_gamma=0.1, out_size=12, seed=0)

    def train_epoch(epoch):
        return zip(feats[:32].split(8), targets[:32].split(8))

    def val_batches():
        return zip(feats[32:].split(8), targets[32:].split(8))
    head, history = evaluate.train_linear_head(train_epoch, val_batches, D, C, 255, s, "cpu")
    assert len(history) == 12
    first, last = (evaluate.score(h, over_all=False)[1] for h in (history[0], history[-1]))
    assert last > 0.98 and last > first
    assert history[-1].sum() == 16 * 12 * 12


def test_linear_scoring_at_mask_size_hand_made():
    # a 2x2 token grid: left tokens say class 0, right tokens class 1 (the head passes feature c to logit c)
    head = evaluate.linear_head(2, 2, out_size=4)
    with torch.no_grad():
        head[1].weight.copy_(torch.eye(2)[:, :, None, None])  # the 1x1 conv
        head[1].bias.zero_()
    left = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    feats = torch.stack([left, 1 - left], -1)[None]  # (1, h=2, w=2, D=2)
    # full-resolution GT 8x8: columns 0, 2, 3 class 0, column 1 class 1; columns 4, 6, 7 class 1, column 5 void
    row = torch.tensor([0, 1, 0, 0, 1, 255, 1, 1])
    gt = row.expand(8, 8)[None]
    small = evaluate.resize_nearest(gt, 4)  # nearest keeps columns 0, 2, 4, 6: 0 0 1 1
    assert small[0, 0].tolist() == [0, 0, 1, 1]
    conf_small = evaluate.linear_confusion(head, [(feats, small)], 2, 255, "cpu")
    conf_full = evaluate.linear_confusion(head, [(feats, gt)], 2, 255, "cpu")
    assert evaluate.score(conf_small)[1] == pytest.approx(1.0)
    # full resolution: the left half is predicted 0, so column 1 (class 1) is wrong: IoU 3/4 for both classes
    assert conf_full.tolist() == [[24, 0], [8, 24]]
    assert evaluate.score(conf_full)[1] == pytest.approx(0.75)


def test_principal_components_are_uncorrelated_and_sorted():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3
    y = evaluate.principal_components(x / x.std(0), 4)  # standardised first, as the K-means evaluation does
    cov = torch.cov(y.T.double())
    assert y.shape == (2000, 4)
    torch.testing.assert_close(cov - torch.diag(cov.diag()), torch.zeros(4, 4, dtype=torch.float64), atol=1e-4,
                               rtol=0)
    assert (cov.diag()[:-1] >= cov.diag()[1:]).all()


def test_kmeans_recovers_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    truth = torch.arange(4).repeat_interleave(50)
    x = centres[truth] + 0.5 * torch.randn(200, 2, generator=g)
    for seed in range(3):
        assign, centroids, objective = evaluate.kmeans(x, 4, seed=seed)
        # the same partition up to renaming: every true blob is one cluster and clusters are distinct
        per_blob = [set(assign[truth == b].tolist()) for b in range(4)]
        assert all(len(s) == 1 for s in per_blob) and len(set.union(*per_blob)) == 4
        # the objective is the sum of squared distances to the nearest centroid (float64 brute force)
        brute = torch.cdist(x.double(), centroids.double()).min(1).values.pow(2).sum().item()
        assert objective == pytest.approx(brute, rel=1e-4)


def blob_mixture(n_blobs=12, per_blob=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 20 * torch.rand(n_blobs, 3, generator=g)
    return centres.repeat_interleave(per_blob, 0) + torch.randn(n_blobs * per_blob, 3, generator=g)


def test_kmeans_keeps_the_restart_with_the_lowest_objective():
    x = blob_mixture()
    k, seed = 6, 3  # fewer clusters than blobs: restarts end in different local minima
    runs = [evaluate.lloyd(x, k, seed + 1 + r * 15486557, 100) for r in range(5)]  # each restart on its own
    objectives = [o for _, o in runs]
    assert len({round(o, 3) for o in objectives}) > 1
    assign, centroids, objective = evaluate.kmeans(x, k, seed=seed, iters=100, redo=5)
    best = min(range(5), key=objectives.__getitem__)
    assert objective == min(objectives)
    torch.testing.assert_close(centroids, runs[best][0])
    assert torch.equal(assign, torch.cdist(x, centroids).argmin(1))  # every point to its nearest centroid
    # one restart is restart 0 alone
    single = evaluate.kmeans(x, k, seed=seed, iters=100, redo=1)
    assert single[2] == objectives[0]


def test_kmeans_with_no_iterations_keeps_random_points_of_the_sample():
    x = blob_mixture()
    assign, centroids, objective = evaluate.kmeans(x, 5, seed=1, iters=0, redo=3)
    rows = {tuple(r) for r in x.tolist()}
    assert all(tuple(c) in rows for c in centroids.tolist()) and len({tuple(c) for c in centroids.tolist()}) == 5
    assert objective == math.inf  # no assignment was made during training
    assert torch.equal(assign, torch.cdist(x, centroids).argmin(1))


def test_kmeans_trains_on_a_capped_sample(monkeypatch):
    x = blob_mixture(n_blobs=4, per_blob=250)  # 1000 points
    seen = []
    lloyd = evaluate.lloyd

    def spy(train, k, seed, iters):
        seen.append(train)
        return lloyd(train, k, seed, iters)
    monkeypatch.setattr(evaluate, "lloyd", spy)
    assign, centroids, _ = evaluate.kmeans(x, 4, seed=0, redo=2, max_points_per_centroid=10)
    assert len(seen) == 2 and all(t.shape == (40, 3) for t in seen)  # 4 centroids x 10 points, not 1000
    rows = {tuple(r) for r in x.tolist()}
    assert all(tuple(r) in rows for r in seen[0].tolist()) and len({tuple(r) for r in seen[0].tolist()}) == 40
    assert torch.equal(seen[0], seen[1])  # one sample, shared by the restarts
    assert assign.shape == (1000,) and torch.equal(assign, torch.cdist(x, centroids).argmin(1))  # all assigned
    seen.clear()
    evaluate.kmeans(x, 4, seed=0, redo=1, max_points_per_centroid=250)  # 1000 <= 4 x 250: no sampling
    assert torch.equal(seen[0], x)


# -----------------------------------------------------------------------------
# checkpoints


def test_loads_student_teacher_and_bare_state_dict(tmp_path):
    student, teacher = write_train_checkpoint(tmp_path / "last.pt", seed=1, teacher_seed=2)
    x = torch.randn(1, 3, 28, 28)
    for teacher_flag, ref in ((False, student), (True, teacher)):
        net, about = model.load_backbone(str(tmp_path / "last.pt"), teacher=teacher_flag)
        assert about["arch"] == "vit_tiny14_reg" and about["weights"] == ("teacher" if teacher_flag else "student")
        torch.testing.assert_close(net(x), ref(x))
    torch.save(student.state_dict(), tmp_path / "bare.pth")
    net, about = model.load_backbone(str(tmp_path / "bare.pth"))
    assert (about["arch"], about["num_register_tokens"]) == ("vit_tiny14_reg", 4)
    torch.testing.assert_close(net(x), student(x))


# -----------------------------------------------------------------------------
# every task end to end on tiny synthetic data


def write_png_file(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(encode_png(labels[None].to(torch.uint8)).numpy()))


def write_jpg_file(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(encode_jpeg(image, quality=95).numpy()))


def blocky_scene(g, values, size=48):
    """An image whose colour follows a 4x4 grid of labels drawn from values (so features can find them)."""
    labels = torch.tensor(values)[torch.randint(0, len(values), (4, 4), generator=g)]
    big = labels.repeat_interleave(size // 4, 0).repeat_interleave(size // 4, 1)
    colour = (big[None].float() * torch.tensor([37.0, 91.0, 53.0])[:, None, None]) % 256
    return colour.to(torch.uint8), big


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    g = torch.Generator().manual_seed(1)
    for split, n in (("training", 4), ("validation", 2)):
        for i in range(n):
            image, labels = blocky_scene(g, [0, 1, 4, 13, 150])
            write_jpg_file(root / "images" / split / f"ADE_{split}_{i:04d}.jpg", image)
            write_png_file(root / "annotations" / split / f"ADE_{split}_{i:04d}.png", labels)
    return root


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    g = torch.Generator().manual_seed(3)
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):  # labelIds: unlabeled 0, road 7, sidewalk 8, sky 23, car 26
            image, labels = blocky_scene(g, [0, 7, 8, 23, 26])
            name = f"{split}/ulm/ulm_{i:06d}_000019"
            write_png_file(root / "gtFine" / f"{name}_gtFine_labelIds.png", labels)
            write_jpg_file(root / "leftImg8bit" / f"{name}_leftImg8bit.png", image)  # decoded by content
    return root


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    g = torch.Generator().manual_seed(2)
    # label-map values are COCO ids - 1: 0 person, 2 car, 17 dog (things); 105 sky, 184 ... 255 unlabeled
    for split, n in (("train2017", 4), ("val2017", 2)):
        for i in range(n):
            image, labels = blocky_scene(g, [0, 2, 17, 105, 123, 255])
            write_jpg_file(root / "images" / split / f"{i:012d}.jpg", image)
            write_png_file(root / "stuffthingmaps_trainval2017" / split / f"{i:012d}.png", labels)
    return root


@pytest.mark.parametrize("task", [t for t, (family, _) in evaluate.TASKS.items() if family not in ("spair", "pca")])
def test_task_end_to_end(task, ckpt, voc, ade_root, coco_root, cityscapes_root, tmp_path, capsys):
    root = {"voc": voc, "ade20k": ade_root, "coco_things": coco_root, "coco_stuff": coco_root,
            "cityscapes": cityscapes_root}[evaluate.TASKS[task][1]]
    extra = {"voc_incontext": ["eval.incontext.aug_epochs=1", "eval.incontext.memory_size=40",
                               "eval.voc_train_split=train"],
             "voc_linear": ["eval.linear.train_aug=true"]}.get(task, [])
    out = tmp_path / "res.jsonl"
    argv = ["--ckpt", ckpt[0], "--task", task, "--data-root", root, "--out", out, "--set", *TINY, *extra]
    if task == "voc_cluster":
        argv += ["--save-vis", tmp_path / "vis"]
    rc, result, err = run_cli(capsys, argv)
    assert rc == 0, err
    val = data.make_segmentation_dataset(evaluate.TASKS[task][1], root, "val")
    assert result["task"] == task and 0 <= result["miou"] <= 100
    assert list(result["per_class_iou"]) == val.class_names
    assert result["elapsed_s"] > 0 and result["settings"]["image_size"] == 56
    assert json.loads(out.read_text().splitlines()[-1]) == result
    if task == "voc_incontext":
        assert result["memory_patches"] == 6 * 6  # 40 // (6 images x 1 pass) = 6 patches kept per image
    if task == "cityscapes_incontext":  # the labels the val masks hold, as trainIds: road 0, sidewalk 1, sky 10, car 13
        assert {c for c, v in result["per_class_iou"].items() if v is not None} <= {"road", "sidewalk", "sky", "car"}
    if task.endswith("_incontext"):
        assert set(result["miou_variants"]) == {"hbird", "hungarian_nanmean", "plain", "dip"}
        assert result["miou"] == result["miou_variants"]["hbird"] and result["protocol"] == "hbird"
        assert result["temperature"] == 0.02
    if task.endswith("_linear"):
        assert result["miou"] >= result["miou_last"] and result["best_epoch"] in (1, 2)
        assert 0 <= result["miou_last_full_res"] <= 100 and result["scored_at"] == "28x28"
    if task.endswith("_cluster"):
        assert set(result["by_k"]) == {str(val.num_classes), "9"}
        assert result["miou"] == pytest.approx(result["by_k"][str(val.num_classes)]["miou"])
    if task == "voc_cluster":
        picture = decode_image(str(tmp_path / "vis" / "voc_cluster.png"))
        assert picture.shape[0] == 3 and picture.shape[1] > 56 and picture.shape[2] > 3 * 56


def test_memory_size_sweep_equals_separate_runs(ckpt, voc, tmp_path, capsys):
    sets = [*TINY, "eval.voc_train_split=train", "eval.incontext.aug_epochs=1"]
    argv = ["--ckpt", ckpt[0], "--task", "voc_incontext", "--data-root", voc, "--set", *sets]
    rc = evaluate.main([str(a) for a in argv + ["eval.incontext.memory_size=[12,40,10000]", "--out", tmp_path / "s"]])
    out, err = capsys.readouterr()
    sweep = [json.loads(line) for line in out.strip().splitlines()]
    assert rc == 0 and [r["memory_size"] for r in sweep] == [12, 40, 10000], err
    assert (tmp_path / "s").read_text().splitlines() == out.strip().splitlines()
    for r in sweep:
        rc, alone, err = run_cli(capsys, argv + [f"eval.incontext.memory_size={r['memory_size']}", "--out", tmp_path / "a"])
        assert rc == 0, err
        for key in ("miou", "per_class_iou", "miou_variants", "memory_patches"):
            assert r[key] == alone[key], key
    assert [r["memory_patches"] for r in sweep] == [2 * 6, 6 * 6, 16 * 6]  # 12 // 6, 40 // 6, capped at 16, x 6
    rc, _, err = run_cli(capsys, argv + ["eval.incontext.memory_size=[12,0]"])
    assert "eval.incontext.memory_size" in one_error_line(rc, err)


def test_subset_file_selects_the_memory_images(ckpt, voc, tmp_path, capsys):
    train_ids = data.make_segmentation_dataset("voc", voc, "train").ids
    subset = [train_ids[4], train_ids[1]]  # unsorted, as the official files are
    (tmp_path / "trainaug_8_42.txt").write_text("\n".join(subset) + "\n")
    argv = ["--ckpt", ckpt[0], "--task", "voc_incontext", "--data-root", voc, "--out", tmp_path / "r.jsonl", "--set",
            *TINY, "eval.voc_train_split=train", "eval.incontext.aug_epochs=0", "eval.incontext.memory_size=null",
            f"eval.incontext.subset_file={tmp_path / 'trainaug_8_42.txt'}"]
    rc, result, err = run_cli(capsys, argv)
    assert rc == 0, err
    assert result["n_train"] == 2 and result["memory_patches"] == 2 * 16  # 56 px: 16 patches per image
    assert result["settings"]["subset_file"] == str(tmp_path / "trainaug_8_42.txt")
    # the same two images through a dataset built on their own give the same number
    ds = data.make_segmentation_dataset("voc", voc, "train", ids_file=tmp_path / "trainaug_8_42.txt")
    assert ds.ids == subset


@pytest.mark.parametrize("task,rule", [("voc_incontext", "dinov2"), ("voc_linear", "neco"), ("voc_cluster", "neco")])
def test_each_family_applies_its_pos_embed_rule(task, rule, ckpt, voc, tmp_path, capsys, monkeypatch):
    x = torch.randn(1, 3, 56, 56)  # a 4x4 grid: the pos_embed is resized from 37x37
    seen = {}

    def fake_evaluator(backbone, *args, **kwargs):
        seen["tokens"] = backbone.forward_features(x)["x_norm_patchtokens"]
        return [(torch.zeros(7), 0.5, [], {})]
    monkeypatch.setattr(evaluate, f"evaluate_{evaluate.TASKS[task][0]}", fake_evaluator)
    rc, result, err = run_cli(capsys, ["--ckpt", ckpt[0], "--task", task, "--data-root", voc, "--out",
                                       tmp_path / "r.jsonl", "--set", *TINY, "eval.voc_train_split=train"])
    assert rc == 0, err
    assert result["pos_embed_rule"] == rule
    sd = ckpt[1].state_dict()
    other_rule = "neco" if rule == "dinov2" else "dinov2"
    expected, other = (model.build_backbone("vit_tiny14_reg", weights=sd, pos_embed_rule=r).eval()
                       .forward_features(x)["x_norm_patchtokens"] for r in (rule, other_rule))
    torch.testing.assert_close(seen["tokens"], expected)
    assert (expected - other).abs().max() > 1e-3  # the two rules differ at this grid


# -----------------------------------------------------------------------------
# errors: one line on stderr, exit status 2


@pytest.mark.parametrize("case", ["task", "ckpt", "corrupt", "int_keys", "config_text", "root", "set_unknown",
                                  "set_not_eval", "set_value", "hub_name", "teacher_bare", "teacher_hub", "protocol",
                                  "subset_missing", "subset_unknown"])
def test_user_errors(case, ckpt, voc, tmp_path, capsys):
    args = {"--ckpt": ckpt[0], "--task": "voc_incontext", "--data-root": voc}
    sets = []
    if case == "task":
        args["--task"] = "voc_segment"
    elif case == "ckpt":
        args["--ckpt"] = tmp_path / "nope.pt"
    elif case == "corrupt":
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
        args["--ckpt"] = tmp_path / "bad.pt"
    elif case == "int_keys":  # a dict of tensors, but not a state_dict
        torch.save({0: torch.zeros(1)}, tmp_path / "int_keys.pt")
        args["--ckpt"] = tmp_path / "int_keys.pt"
    elif case == "config_text":  # a train.py checkpoint whose config is not a mapping
        raw = torch.load(ckpt[0], weights_only=True)
        raw["config"] = {"model": "vit_tiny14_reg"}
        torch.save(raw, tmp_path / "config_text.pt")
        args["--ckpt"] = tmp_path / "config_text.pt"
    elif case == "root":
        args["--data-root"] = tmp_path / "no_voc_here"
    elif case == "set_unknown":
        sets = ["eval.incontext.kk=3"]
    elif case == "set_not_eval":
        sets = ["optim.epochs=1"]
    elif case == "set_value":
        sets = ["eval.incontext.image_size=4"]
    elif case == "hub_name":
        args["--ckpt"] = "hub:dinov2_vitx14"
    elif case == "teacher_bare":
        torch.save(ckpt[1].state_dict(), tmp_path / "bare.pth")
        args["--ckpt"] = tmp_path / "bare.pth"
        sets = None
    elif case == "teacher_hub":  # refused before any download
        args["--ckpt"] = "hub:dinov2_vits14_reg"
    elif case == "protocol":
        sets = ["eval.incontext.protocol=hummingbird"]
    elif case == "subset_missing":
        sets = [f"eval.incontext.subset_file={tmp_path / 'none.txt'}"]
    elif case == "subset_unknown":
        (tmp_path / "ids.txt").write_text("no_such_image\n")
        sets = [f"eval.incontext.subset_file={tmp_path / 'ids.txt'}", "eval.voc_train_split=train"]
    argv = [x for kv in args.items() for x in kv] + (["--set", *sets] if sets else [])
    argv += ["--teacher"] if case.startswith("teacher") else []
    rc, _, err = run_cli(capsys, argv)
    assert rc == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    named = {"task": "voc_segment", "ckpt": "nope.pt", "corrupt": "bad.pt", "int_keys": "int_keys.pt",
             "config_text": "config_text.pt", "root": "no_voc_here",
             "set_unknown": "eval.incontext.kk", "set_not_eval": "optim.epochs", "set_value": "image_size",
             "hub_name": "dinov2_vitx14", "teacher_bare": "no EMA teacher", "teacher_hub": "no EMA teacher",
             "protocol": "eval.incontext.protocol",
             "subset_missing": "eval.incontext.subset_file", "subset_unknown": "no_such_image"}[case]
    assert named in err


def test_demo_section_applies_and_set_wins():
    import yaml
    section = yaml.safe_load((ROOT / "config.yaml").read_text())["eval"]
    ev = evaluate.eval_config(ROOT / "config.yaml", [], demo=False)
    assert "demo" not in ev and ev["incontext"]["memory_size"] == 10_240_000  # the protocol value
    ev = evaluate.eval_config(ROOT / "config.yaml", ["eval.incontext.k=5", "eval.incontext.aug_epochs=1"], demo=True)
    for key, value in section["demo"]["incontext"].items():
        if key != "aug_epochs":
            assert ev["incontext"][key] == value
    assert ev["incontext"]["aug_epochs"] == 1 and ev["incontext"]["k"] == 5  # an explicit --set beats the demo
    assert ev["device"] == section["demo"]["device"]


def test_cli_process_exit_code_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(tmp_path / "missing.pt"),
                           "--task", "voc_incontext"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr and "missing.pt" in proc.stderr


# -----------------------------------------------------------------------------
# hostile inputs: no lost work, no silent wrong number


def snapshot(root):
    """Every folder and file under root, with the files' bytes: equal snapshots = a byte-identical tree."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "dir") for p in Path(root).rglob("*")}


def incontext_argv(ckpt_path, root, out, *sets):
    return ["--ckpt", ckpt_path, "--task", "voc_incontext", "--data-root", root, "--out", out, "--set", *TINY,
            "eval.voc_train_split=train", *sets]


def one_error_line(rc, err):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def boom(*args, **kwargs):
    raise AssertionError("the evaluation ran")


def set_label(mask_path, value):
    labels = data.read_mask(mask_path).to(torch.uint8)
    labels[0, 0] = value
    mask_path.write_bytes(data.encode_palette_png(labels))


def test_demo_never_writes_into_a_real_dataset(ckpt, tmp_path, capsys, monkeypatch):
    real = tmp_path / "VOCdevkit" / "VOC2012"
    for name, split in (("2007_000032", "train"), ("2007_000033", "val")):
        write_jpg_file(real / "JPEGImages" / f"{name}.jpg", torch.zeros(3, 8, 8, dtype=torch.uint8))
        write_png_file(real / "SegmentationClass" / f"{name}.png", torch.zeros(8, 8))
        (real / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (real / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(name + "\n")
    before = snapshot(tmp_path)
    monkeypatch.setattr(evaluate, "evaluate_incontext", boom)
    for root in (real, real.parent):
        rc, _, err = run_cli(capsys, ["--ckpt", ckpt[0], "--task", "voc_incontext", "--demo", "--data-root", root,
                                      "--out", tmp_path / "r.jsonl"])
        assert f"{root} is not empty and holds no synthetic set" in one_error_line(rc, err)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["out_folder", "out_under_file", "out_read_only", "vis_file", "vis_read_only",
                                  "vis_images_0"])
def test_unwritable_destinations_fail_before_computing(case, ckpt, voc, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate_incontext", boom)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "locked").mkdir()
    out, vis, sets = tmp_path / "r.jsonl", None, []
    if case == "out_folder":
        out = tmp_path / "locked"
    elif case == "out_under_file":
        out = tmp_path / "a_file" / "r.jsonl"
    elif case == "vis_file":
        vis = tmp_path / "a_file"
    elif case == "vis_images_0":
        vis, sets = tmp_path / "vis", ["eval.vis_images=0"]
    else:  # root (the tests' user) passes every permission check, so 'locked' is made read-only to os.access
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != tmp_path / "locked"
                            and real_access(path, mode, **kw))
        if case == "out_read_only":
            out = tmp_path / "locked" / "r.jsonl"
        else:
            vis = tmp_path / "locked"
    rc, _, err = run_cli(capsys, incontext_argv(ckpt[0], voc, out, *sets) + (["--save-vis", vis] if vis else []))
    line = one_error_line(rc, err)
    locked = f"{tmp_path / 'locked'} is not writable"
    assert {"out_folder": f"{out} (--out) is a folder", "out_under_file": "which is a file", "out_read_only": locked,
            "vis_file": "(--save-vis) lies under", "vis_read_only": locked,
            "vis_images_0": "'eval.vis_images'"}[case] in line
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "vis").exists()


def test_result_line_comes_first_when_saving_fails_at_the_end(ckpt, voc, tmp_path, capsys, monkeypatch):
    out, vis, real = tmp_path / "res" / "r.jsonl", tmp_path / "vis", evaluate.evaluate_incontext

    def evaluate_then_break_the_destinations(*args, **kwargs):
        result = real(*args, **kwargs)
        out.mkdir(parents=True)  # say the folders changed during a long run: both writes now fail
        (vis / "voc_incontext.png").mkdir(parents=True)
        return result

    monkeypatch.setattr(evaluate, "evaluate_incontext", evaluate_then_break_the_destinations)
    rc = evaluate.main([str(a) for a in incontext_argv(ckpt[0], voc, out) + ["--save-vis", vis]])
    stdout, err = capsys.readouterr()
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["task"] == "voc_incontext" and 0 <= result["miou"] <= 100 and len(result["per_class_iou"]) == 7
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: could not save the picture") and f"results file {out}" in last
    assert "the result line is on stdout" in last and "Traceback" not in err


@pytest.mark.parametrize("case", ["label", "size", "missing_mask", "rgb_mask"])
def test_wrong_val_data_stops_before_the_memory_is_built(case, ckpt, tmp_path, capsys, monkeypatch):
    voc = data.make_synthetic_voc(tmp_path / "syn", n_images=8, image_size=64)
    name = data.VOCSegmentation(voc, "val").ids[0]
    mask = voc / "SegmentationClass" / f"{name}.png"
    if case == "label":
        set_label(mask, 9)  # 7 classes: 0..6, and 255
    elif case == "size":
        write_jpg_file(voc / "JPEGImages" / f"{name}.jpg", torch.zeros(3, 48, 64, dtype=torch.uint8))
    elif case == "missing_mask":
        mask.unlink()
    else:
        mask.write_bytes(bytes(encode_png(torch.zeros(3, 64, 64, dtype=torch.uint8)).numpy()))
    monkeypatch.setattr(evaluate, "build_memory", boom)
    rc, _, err = run_cli(capsys, incontext_argv(ckpt[0], voc, tmp_path / "r.jsonl"))
    line = one_error_line(rc, err)
    assert name in line and {"label": "holds label 9", "size": "is (64, 64) but its image is (48, 64)",
                             "missing_mask": "not found", "rgb_mask": "has 3 channels"}[case] in line


def test_a_memory_mask_label_outside_the_classes_is_an_error(ckpt, tmp_path, capsys):
    voc = data.make_synthetic_voc(tmp_path / "syn", n_images=8, image_size=64)
    name = data.VOCSegmentation(voc, "train").ids[-1]
    set_label(voc / "SegmentationClass" / f"{name}.png", 7)
    # a loader worker process reads it: the error still comes back as one line
    rc, _, err = run_cli(capsys, incontext_argv(ckpt[0], voc, tmp_path / "r.jsonl", "eval.num_workers=1"))
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: ") and f"{name}.png holds label 7" in last and "Traceback" not in err
    assert not (tmp_path / "r.jsonl").exists()


def test_unreadable_images_are_skipped_counted_and_change_nothing_else(ckpt, tmp_path, capsys):
    bad, clean = (data.make_synthetic_voc(tmp_path / d, n_images=12, image_size=64) for d in ("bad", "clean"))
    train_ids, val_ids = data.VOCSegmentation(bad, "train").ids, data.VOCSegmentation(bad, "val").ids  # 9, 3
    jpg = bad / "JPEGImages" / "{}.jpg"
    Path(str(jpg).format(train_ids[0])).write_bytes(b"not an image")  # met in both memory passes
    Path(str(jpg).format(val_ids[0])).write_bytes(b"not an image")  # PIL cannot open it: the val check drops it
    good = Path(str(jpg).format(val_ids[1])).read_bytes()
    Path(str(jpg).format(val_ids[1])).write_bytes(good[: len(good) // 2])  # a sound header: met while querying
    sets = clean / "ImageSets" / "Segmentation"  # the same set without those three images
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in train_ids[1:]))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in val_ids[2:]))
    runs = {}
    for name, root in (("bad", bad), ("clean", clean)):
        argv = incontext_argv(ckpt[0], root, tmp_path / f"{name}.jsonl", "eval.incontext.batch_size=1")
        rc = evaluate.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert len(out.strip().splitlines()) == 1  # stdout holds the result line only
        runs[name] = json.loads(out), err
    (result, err), (expected, _) = runs["bad"], runs["clean"]
    assert result["n_unreadable"] == 3 and expected["n_unreadable"] == 0
    assert all(err.count(f"{i}.jpg") == 1 for i in (train_ids[0], val_ids[0], val_ids[1]))  # each named once
    assert result["n_val"] == 2 and result["memory_patches"] == expected["memory_patches"] == 8 * 2 * 16
    assert result["miou"] == expected["miou"] and result["per_class_iou"] == expected["per_class_iou"]


def test_non_finite_weights_are_refused_naming_the_first_tensor(ckpt, voc, tmp_path, capsys):
    sd = {k: v.clone() for k, v in ckpt[1].state_dict().items()}
    sd["blocks.1.attn.qkv.weight"][3, 5] = math.nan
    sd["blocks.4.mlp.fc2.bias"][0] = math.inf
    torch.save(sd, tmp_path / "diverged.pth")
    rc, _, err = run_cli(capsys, incontext_argv(tmp_path / "diverged.pth", voc, tmp_path / "r.jsonl"))
    line = one_error_line(rc, err)
    assert "diverged.pth" in line and "tensor blocks.1.attn.qkv.weight holds NaN or inf" in line


def test_more_clusters_than_val_patches_is_refused(ckpt, voc, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate_cluster", boom)
    torch.save(ckpt[1].state_dict(), tmp_path / "bare.pth")  # no head keys: stderr holds the error line alone
    rc, _, err = run_cli(capsys, ["--ckpt", tmp_path / "bare.pth", "--task", "voc_cluster", "--data-root", voc, "--out",
                                  tmp_path / "r.jsonl", "--set", *TINY, "eval.cluster.ks=[0,33]"])
    err = "".join(l for l in err.splitlines(True) if not l.startswith("model: ignored"))  # the head keys' note
    line = one_error_line(rc, err)  # 2 val images x 4 x 4 patches = 32 points
    assert "'eval.cluster.ks'" in line and "32 val patch tokens" in line


def test_home_paths_and_nothing_but_the_result_on_stdout(voc, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_train_checkpoint(tmp_path / "last.pt")  # it holds head keys: model.py notes that it ignores them
    shutil.copytree(voc, tmp_path / "voc")
    shutil.copy(ROOT / "config.yaml", tmp_path / "cfg.yaml")
    vis = os.fsdecode(b"~/vis_\xff")  # and a folder name that is not UTF-8
    rc = evaluate.main(["--ckpt", "~/last.pt", "--task", "voc_incontext", "--data-root", "~/voc", "--config",
                        "~/cfg.yaml", "--out", "~/res/r.jsonl", "--save-vis", vis, "--set", *TINY,
                        "eval.voc_train_split=train"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == json.loads((tmp_path / "res" / "r.jsonl").read_text())
    assert "model: ignored" in err and json.loads(lines[0])["data_root"] == str(tmp_path / "voc")
    picture = Path(os.path.expanduser(vis)) / "voc_incontext.png"
    assert picture.parent.parent == tmp_path and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -----------------------------------------------------------------------------
# the in-context protocol against an independent brute-force run of it


def brute_force_incontext(backbone, voc_root, size=224, k=30, temperature=0.02, euclidean=False):
    """VOC in-context mIoU (%), written independently: full similarity (or distance) matrix, per-patch loops,
    bincount confusion. euclidean: DIP's variant, the nearest by distance on the raw features."""
    mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]

    def load(split):
        ds = data.make_segmentation_dataset("voc", voc_root, split)
        images, masks = [], []
        for image, mask in ds:
            images.append(F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                        align_corners=False)[0].round().clamp(0, 255) / 255)
            masks.append(F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long())
        with torch.no_grad():
            feats = backbone.forward_features((torch.stack(images) - mean) / std)["x_norm_patchtokens"]
        return feats, torch.stack(masks), ds.num_classes

    train_f, train_m, C = load("train")
    val_f, val_m, _ = load("val")
    g = size // 14
    labels = []  # one class-fraction vector per memory patch, row-major within each image
    for m in train_m:
        m = torch.where(m == 255, 0, m)
        for py in range(g):
            for px in range(g):
                block = m[py * 14:(py + 1) * 14, px * 14:(px + 1) * 14].flatten()
                labels.append(torch.bincount(block, minlength=C).float() / block.numel())
    labels = torch.stack(labels)  # (M, C)
    keys = train_f.reshape(-1, train_f.shape[-1])
    conf = torch.zeros(C * C, dtype=torch.long)
    for feats, mask in zip(val_f, val_m):
        cosine = F.normalize(feats, dim=-1) @ F.normalize(keys, dim=-1).T  # (N, M): every pair
        if euclidean:
            idx = torch.cdist(feats.double(), keys.double()).topk(k, dim=1, largest=False).indices
        else:
            idx = cosine.topk(k, dim=1).indices
        w = torch.softmax(cosine.gather(1, idx) / temperature, dim=1)
        pred = torch.stack([(w[n, :, None] * labels[idx[n]]).sum(0) for n in range(len(feats))])  # (N, C)
        pred = pred.T.reshape(1, C, g, g)
        pred = F.interpolate(pred, size=(size, size), mode="bilinear", align_corners=False)[0].argmax(0)
        keep = mask != 255
        conf += torch.bincount(mask[keep] * C + pred[keep], minlength=C * C)
    conf = conf.reshape(C, C).double()
    ious = [conf[c, c] / (conf[c].sum() + conf[:, c].sum() - conf[c, c]) for c in range(C)
            if conf[c].sum() + conf[:, c].sum() > 0]
    return 100 * sum(ious).item() / len(ious)


@pytest.mark.parametrize("protocol", ["hbird", "dip"])
def test_voc_incontext_agrees_with_brute_force(protocol, ckpt, tmp_path, capsys):
    voc_root = data.make_synthetic_voc(tmp_path / "syn", n_images=8, image_size=96)
    rc, result, err = run_cli(capsys, ["--ckpt", ckpt[0], "--task", "voc_incontext", "--data-root", voc_root,
                                       "--out", tmp_path / "r.jsonl", "--set", "eval.device=cpu",
                                       "eval.num_workers=0", "eval.voc_train_split=train",
                                       "eval.incontext.image_size=224", "eval.incontext.aug_epochs=0",
                                       "eval.incontext.memory_size=null", "eval.incontext.batch_size=4",
                                       f"eval.incontext.protocol={protocol}"])
    assert rc == 0, err
    dip = protocol == "dip"
    expected = brute_force_incontext(ckpt[1], voc_root, temperature=0.07 if dip else 0.02, euclidean=dip)
    assert result["memory_patches"] == 6 * 256
    got = result["miou_variants"]["plain"]  # the brute force scores without matching, over the classes present
    assert abs(got - expected) <= 1.0, (got, expected)
    assert result["miou"] == result["miou_variants"]["dip" if dip else "hbird"]


@pytest.mark.parametrize("arch,registers", [("dino_vit_tiny16", 0), ("dinov3_vit_tiny16", 4)])
def test_incontext_for_dino_and_dinov3(arch, registers, voc, tmp_path, capsys, monkeypatch):
    """A train.py checkpoint and a bare released-style state_dict of each /16 family: image sizes snap to the patch
    (56 -> 64 px, 4x4 patches), and the memory holds patches of that grid."""
    torch.manual_seed(0)
    backbone = model.build_backbone(arch)
    pair = nn.ModuleDict({"backbone": backbone, "head": nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(192, 32))})})
    torch.save({"student": pair.state_dict(), "teacher": pair.state_dict(), "step": 1,
                "config": {"model": {"arch": arch, "num_register_tokens": registers}}}, tmp_path / "last.pt")
    torch.save(backbone.state_dict(), tmp_path / "released.pth")
    results = []
    for ckpt in ("last.pt", "released.pth"):
        rc, result, err = run_cli(capsys, ["--ckpt", tmp_path / ckpt, "--task", "voc_incontext", "--data-root", voc,
                                           "--out", tmp_path / "res.jsonl", "--set", *TINY,
                                           "eval.incontext.memory_size=200", "eval.incontext.aug_epochs=0"])
        assert rc == 0, err
        assert result["arch"] == arch and result["settings"]["image_size"] == 64 and 0 <= result["miou"] <= 100
        assert result["memory_patches"] == 6 * 16  # every patch of the 4x4 grid of the 6 memory images
        results.append(result["miou"])
    assert results[0] == results[1]  # the same weights through either file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: DINOv3's gated files are not there
    rc, _, err = run_cli(capsys, ["--ckpt", "hub:dinov3_vits16", "--task", "voc_incontext", "--data-root", voc,
                                  "--set", *TINY])
    assert rc == 2 and err.count("\n") == 1 and "gated" in err and "08c60483" in err


# -----------------------------------------------------------------------------
# SPair-71k correspondence: the Probe3D protocol on synthetic pairs made by known warps


@pytest.fixture(scope="module")
def spair(tmp_path_factory):
    return data.make_synthetic_spair(tmp_path_factory.mktemp("spair"), n_categories=2, n_pairs=6, image_size=96)


def position_code(xy, size):
    """Unit vectors that encode a point (n, 2) of a size x size source image: Gaussian bumps on a grid of anchors, so
    that the dot product of two codes falls with the distance of their points."""
    a = torch.linspace(-0.5 * size, 1.5 * size, 41)
    anchors = torch.stack(torch.meshgrid(a, a, indexing="xy"), -1).reshape(-1, 2)  # (A, 2)
    return F.normalize(torch.exp(-torch.cdist(xy, anchors) ** 2 / (2 * (size / 25) ** 2)), dim=-1)


def oracle_view(root, category, name, size, grid, warp=None):
    """The protocol's view of an image, with the patch tokens replaced by the code of the source point each cell shows:
    its centre in the original pixels, mapped back through the pair's warp for the target image."""
    image, kps = data.spair_view(root, category, name, size)
    side = max(decode_image(str(root / "JPEGImages" / category / f"{name}.jpg")).shape[1:])
    centres = (torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="xy"), -1) + 0.5)
    xy = centres.reshape(-1, 2).double() / grid * side  # (grid * grid, 2) original pixels, row-major cells
    if warp is not None:
        A, b = torch.tensor(warp, dtype=torch.float64)[:, :2], torch.tensor(warp, dtype=torch.float64)[:, 2]
        xy = (xy - b) @ torch.linalg.inv(A).T
    return position_code(xy.float(), 96).reshape(grid, grid, -1), kps  # 96: the source images' side


@pytest.mark.parametrize("shuffle", [False, True])
def test_oracle_features_find_every_keypoint_and_shuffled_ones_do_not(spair, shuffle):
    errors = {}
    for pair in data.spair_pairs(spair)["aeroplane", "all"] + data.spair_pairs(spair)["bicycle", "all"]:
        src, trg = pair["filename"].split(":")[0].split("-")[1:]
        fs, ks = oracle_view(spair, pair["category"], src, 448, 32)
        ft, kt = oracle_view(spair, pair["category"], trg, 448, 32, pair["warp"])
        if shuffle:
            ft = ft.reshape(32 * 32, -1)[torch.randperm(32 * 32, generator=torch.Generator().manual_seed(0))]
            ft = ft.reshape(32, 32, -1)
        (x1, y1, x2, y2), side = pair["trg_bndbox"], max(pair["trg_imsize"][:2])
        assert ((ks[:, 2] == 1) & (kt[:, 2] == 1)).sum() == len(pair["kps_ids"]) > 0
        errors[pair["filename"]] = evaluate.keypoint_errors(fs, ks, ft, kt, 448, max(x2 - x1, y2 - y1) / side,
                                                            centre=True)
        corner = evaluate.keypoint_errors(fs, ks, ft, kt, 448, max(x2 - x1, y2 - y1) / side)
        assert shuffle or corner.mean() > errors[pair["filename"]].mean()  # Probe3D's corner: half a cell off
    chosen = data.spair_pairs(spair, per_bin=200)
    result = evaluate.spair_recalls({k: [errors[p["filename"]] for p in ps] for k, ps in chosen.items()}, [0.1])
    assert set(result["recall"]["0.1"]) == {"0", "1", "2", "all"}
    if shuffle:  # chance: a disc of 0.1 box sides (about half the image side) covers about 1% of the image
        assert result["recall"]["0.1"]["all"] < 5
    else:
        assert result["recall"]["0.1"] == {"0": 100.0, "1": 100.0, "2": 100.0, "all": 100.0}


def test_spair_recall_pooling_bins_and_counts_hand_made(tmp_path):
    for name, category, bin in (("b1", "dog", 0), ("a2", "cat", 1), ("a1", "cat", 0)):
        path = tmp_path / "PairAnnotation" / "test" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"filename": name, "category": category, "viewpoint_variation": bin}))
    errors = {"a1": torch.tensor([0.04, 0.1, 0.12]), "a2": torch.tensor([0.2, 0.09]), "b1": torch.tensor([0.01, 0.3])}
    chosen = data.spair_pairs(tmp_path)
    assert {k: [p["filename"] for p in ps] for k, ps in chosen.items()} == {
        ("cat", "0"): ["a1"], ("cat", "1"): ["a2"], ("cat", "all"): ["a1", "a2"], ("dog", "0"): ["b1"],
        ("dog", "all"): ["b1"]}
    r = evaluate.spair_recalls({k: [errors[p["filename"]] for p in ps] for k, ps in chosen.items()}, [0.1, 0.15])
    # 0.1: cat bin 0 1/3 (0.1 itself is not < 0.1), bin 1 1/2, all 2/5 pooled per keypoint (not (1/3 + 1/2) / 2);
    # dog bin 0 and all 1/2; a bin's recall is the plain mean over the categories that have it
    assert r["recall"]["0.1"] == pytest.approx({"0": (100 / 3 + 50) / 2, "1": 50.0, "2": None, "all": (40 + 50) / 2})
    assert r["recall"]["0.15"] == pytest.approx({"0": 75.0, "1": 50.0, "2": None, "all": 65.0})
    assert r["per_category"]["0.1"]["all"] == pytest.approx({"cat": 40.0, "dog": 50.0})
    assert r["pairs"]["all"] == {"cat": 2, "dog": 1} and r["keypoints"]["all"] == {"cat": 5, "dog": 2}
    assert r["pairs"]["2"] == {}


def test_spair_subset_is_probe3ds_seeded_shuffle_of_the_sorted_pairs(spair):
    everything = data.spair_pairs(spair)
    names = [p["filename"] for p in everything["aeroplane", "all"]]
    assert names == sorted(names) and len(names) == 6  # sorted, not the folder listing's order
    chosen = data.spair_pairs(spair, per_bin=3)
    assert set(chosen) == set(everything) and len(chosen) == 2 * 4
    for (category, b), members in chosen.items():
        expected = list(everything[category, b])
        assert all(b in ("all", str(p["viewpoint_variation"])) and p["category"] == category for p in expected)
        random.seed(20)  # Probe3D: random.seed(20); random.shuffle(instances); instances[:num_instances]
        random.shuffle(expected)
        assert members == expected[:3]


def test_spair_correspondence_end_to_end(ckpt, spair, tmp_path, capsys):
    argv = ["--ckpt", ckpt[0], "--task", "spair_correspondence", "--data-root", spair.parent, "--out", tmp_path / "r",
            "--set", "eval.device=cpu", "eval.spair.image_size=60", "eval.spair.pairs_per_bin=1"]
    rc, result, err = run_cli(capsys, argv)
    assert rc == 0, err
    assert set(result["recall"]) == {"0.05", "0.1", "0.15"} and result["settings"]["tokens"] == "last_block"
    assert all(0 <= v <= 100 for r in result["recall"].values() for v in r.values())
    assert result["pairs"] == {b: {"aeroplane": 1, "bicycle": 1} for b in ("0", "1", "2", "all")}
    assert result["n_unreadable"] == 0 and json.loads((tmp_path / "r").read_text()) == result
    rc, final, err = run_cli(capsys, argv + ["eval.spair.tokens=final_norm", "eval.spair.pairs_per_bin=null"])
    assert rc == 0 and final["pairs"]["all"] == {"aeroplane": 6, "bicycle": 6}, err
    rc, _, err = run_cli(capsys, argv[:4] + ["--data-root", tmp_path / "absent"])
    assert "eval.roots.spair" in one_error_line(rc, err)
    rc, _, err = run_cli(capsys, argv + ["--save-vis", tmp_path / "vis"])
    assert "--save-vis" in one_error_line(rc, err)


def test_patch_features_pads_the_normalised_image_with_zeros_centred(ckpt):
    images = torch.randint(0, 256, (1, 3, 60, 47), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = model.patch_features(ckpt[1], images, pad=True, last_block=True)  # 60 x 47 -> 70 x 56: 5 x 4 patches
    mean, std = (torch.tensor(v)[:, None, None] for v in (data.IMAGENET_MEAN, data.IMAGENET_STD))
    x = F.pad((images.float() / 255 - mean) / std, (4, 5, 5, 5))  # 9 columns: 4 left, 5 right; 10 rows: 5 and 5
    expected = ckpt[1].get_intermediate_layers(x, n=1, norm=False)[0].reshape(1, 5, 4, -1)
    torch.testing.assert_close(feats, expected)


# -----------------------------------------------------------------------------
# feature pictures: principal components as RGB, the query patch's similarity map


def test_first_component_separates_a_synthetic_foreground():
    g = torch.Generator().manual_seed(0)
    fg = torch.zeros(3, 8, 8, dtype=torch.bool)
    fg[0, 2:6, 3:7], fg[1, 1:4, 1:5], fg[2, 1:7, 1:7] = True, True, True  # the third: a foreground larger than the rest
    a, b = torch.randn(2, 16, generator=g)
    feats = torch.where(fg[..., None], a, b) + 0.1 * torch.randn(3, 8, 8, 16, generator=g)  # (3, 8, 8, 16)
    for sign in (1, -1):  # whichever way the first component points, the image borders are the background
        rgb = evaluate.pca_rgb(sign * feats, threshold=0.5)
        assert rgb.shape == (3, 8, 8, 3) and torch.equal(rgb.amax(-1) > 0, fg)  # the background black
    plain = evaluate.pca_rgb(feats)
    assert plain.shape == (3, 8, 8, 3) and plain.amin() == 0 and plain.amax() == 1
    first = plain[..., 0]  # without a threshold the first component alone already splits them
    assert first[fg].min() > first[~fg].max() or first[fg].max() < first[~fg].min()


def test_principal_components_match_an_svd():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * torch.arange(1.0, 7.0)
    centred = x - x.mean(0)
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)
    axes = vt[:3].T  # (6, 3), by decreasing singular value
    axes = axes * torch.sign(axes[axes.abs().argmax(0), torch.arange(3)])  # the sign: the largest loading positive
    torch.testing.assert_close(evaluate.principal_components(x, 3), centred @ axes)
    y = evaluate.principal_components(x.float(), 3)  # float32 input: the covariance still in float64
    assert y.dtype == torch.float32 and torch.allclose(y.double(), centred @ axes, atol=1e-4)


def tiles_of(png, n_tiles, size):
    """The tiles of a make_grid row picture (4 px padding): [(3, size, size)]."""
    row = decode_image(str(png))
    return [row[:, 4:4 + size, 4 + i * (size + 4):4 + i * (size + 4) + size] for i in range(n_tiles)]


def test_pca_pictures_are_written_deterministic_and_listed(ckpt, voc, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(voc / "JPEGImages", images / "nested")  # searched recursively
    (images / "nested" / "syn_00001.jpg").write_bytes(b"not an image")  # skipped and counted
    results = []
    for out in (tmp_path / "a", tmp_path / "b"):
        argv = ["--ckpt", ckpt[0], "--task", "pca", "--images", images, "--out", out, "--set", "eval.device=cpu",
                "eval.pca.image_size=56", "eval.pca.n_images=4", "eval.pca.query=0.6,0.3"]
        rc, result, err = run_cli(capsys, argv)
        assert rc == 0, err
        assert err.count("wrote ") == 4 and err.count("syn_00001.jpg") == 1 and not (out / "results.jsonl").exists()
        results.append(result)
    names = ["000_syn_00000.png", "001_syn_00002.png", "002_syn_00003.png", "grid.png"]
    assert [Path(f).name for f in results[0]["files"]] == names and results[0]["n_unreadable"] == 1
    assert results[0]["query_patch"] == [2, 1] and results[0]["n_images"] == 3  # 56 px: 4 x 4 patches
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert decode_image(str(tmp_path / "a" / names[0])).shape == (3, 56 + 8, 3 * 56 + 16)  # image | pca | similarity
    assert decode_image(str(tmp_path / "a" / "grid.png")).shape == (3, 3 * 56 + 16, 3 * 56 + 16)
    # the similarity tiles against cosines by hand: float64, every patch of every image against the query patch
    mean, std = (torch.tensor(v)[:, None, None] for v in (data.IMAGENET_MEAN, data.IMAGENET_STD))
    shown = [images / "nested" / f"syn_0000{i}.jpg" for i in (0, 2, 3)]
    x = torch.stack([v2.functional.resize(data.read_image(f), [56, 56], antialias=True) for f in shown])
    with torch.no_grad():
        tokens = ckpt[1].forward_features((x / 255 - mean) / std)["x_norm_patchtokens"].double()  # (3, 16, D)
    query = tokens[0, 1 * 4 + 2]  # row 1, column 2
    cosine = torch.tensor([[(t @ query / (t.norm() * query.norm())).item() for t in image] for image in tokens])
    expected = 255 * (cosine - cosine.min()) / (cosine.max() - cosine.min())  # scaled over all the images
    for i, name in enumerate(names[:3]):
        image, _, similarity = tiles_of(tmp_path / "a" / name, 3, 56)
        got = similarity[0, 7::14, 7::14].double().flatten()  # patch centres, row-major
        assert (got - expected[i]).abs().max() <= 1 and torch.equal(similarity[0], similarity[2])  # grey
        if i == 0:  # the query patch framed in red
            assert image[:, 14, 2 * 14 + 7].tolist() == [255, 0, 0]


def test_pca_for_a_16_family_and_its_teacher(voc, tmp_path, capsys):
    torch.manual_seed(0)
    pair = [nn.ModuleDict({"backbone": model.build_backbone("dinov3_vit_tiny16")}) for _ in range(2)]
    torch.save({"student": pair[0].state_dict(), "teacher": pair[1].state_dict(), "step": 1,
                "config": {"model": {"arch": "dinov3_vit_tiny16", "num_register_tokens": 4}}}, tmp_path / "last.pt")
    grids = []
    for teacher in ([], ["--teacher"]):
        rc, result, err = run_cli(capsys, ["--ckpt", tmp_path / "last.pt", "--task", "pca", "--images", voc.parent,
                                           "--out", tmp_path / "vis", "--set", "eval.device=cpu",
                                           "eval.pca.image_size=56", "eval.pca.n_images=2",
                                           "eval.pca.foreground_threshold=0.5", *teacher])
        assert rc == 0, err
        assert result["arch"] == "dinov3_vit_tiny16" and result["weights"] == ("teacher" if teacher else "student")
        assert result["settings"]["image_size"] == 64 and result["query_patch"] == [2, 2]  # 56 -> 64 px: 4 x 4
        assert decode_image(result["files"][0]).shape == (3, 64 + 8, 3 * 64 + 16)
        grids.append((tmp_path / "vis" / "grid.png").read_bytes())
    assert grids[0] != grids[1]  # the teacher's own weights


@pytest.mark.parametrize("case", ["out_file", "out_under_file", "out_read_only", "save_vis", "no_images"])
def test_pca_bad_destination_or_images_refused_before_the_backbone_loads(case, ckpt, voc, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setattr(evaluate.model, "load_backbone", boom)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "locked").mkdir()
    (tmp_path / "empty").mkdir()
    out, images, extra = tmp_path / "vis", voc, []
    if case == "out_file":
        out = tmp_path / "a_file"
    elif case == "out_under_file":
        out = tmp_path / "a_file" / "vis"
    elif case == "out_read_only":
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != tmp_path / "locked"
                            and real_access(path, mode, **kw))
        out = tmp_path / "locked" / "vis"
    elif case == "save_vis":
        extra = ["--save-vis", tmp_path / "pictures"]
    else:
        images = tmp_path / "empty"
    rc, _, err = run_cli(capsys, ["--ckpt", ckpt[0], "--task", "pca", "--images", images, "--out", out, *extra])
    line = one_error_line(rc, err)
    assert {"out_file": f"{out} (--out) is a file", "out_under_file": "which is a file",
            "out_read_only": f"{tmp_path / 'locked'} is not writable", "save_vis": "--save-vis",
            "no_images": "no readable image under"}[case] in line
    assert not (tmp_path / "vis").exists() and not (tmp_path / "pictures").exists()
    rc, _, err = run_cli(capsys, ["--ckpt", ckpt[0], "--task", "pca", "--images", voc, "--set", "eval.pca.query=3,5"])
    assert "'eval.pca.query'" in one_error_line(rc, err)  # fractions of the side, not patch numbers


def test_a_misspelt_eval_key_in_the_config_file_is_refused(tmp_path):
    import yaml
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["eval"]["incontext"]["temprature"] = 0.05
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(evaluate.ConfigError, match="config key 'eval.incontext.temprature' is unknown"):
        evaluate.eval_config(tmp_path / "typo.yaml", [], demo=False)
    cfg["eval"]["incontext"].pop("temprature")
    cfg["optim"]["lr_backbon"] = 1e-5  # a training key: train.py's to refuse, evaluate.py reads only eval.*
    (tmp_path / "train_typo.yaml").write_text(yaml.safe_dump(cfg))
    assert evaluate.eval_config(tmp_path / "train_typo.yaml", [], demo=False)["incontext"]["k"] == 30
