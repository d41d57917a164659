"""
Dense evaluation of a frozen backbone's final-norm patch tokens: in-context (Hummingbird) retrieval, linear and
K-means segmentation, on our checkpoints, the official DINOv2 weights and the released NeCo weights alike.

    python evaluate.py --ckpt runs/neco/last.pt --task voc_incontext                 # train.py checkpoint (student)
    python evaluate.py --ckpt runs/neco/last.pt --task voc_incontext --teacher       # ... its EMA teacher
    python evaluate.py --ckpt neco_vits14_reg.pth --task ade_linear                  # a bare state_dict file
    python evaluate.py --ckpt hub:dinov2_vits14_reg --task voc_cluster               # official DINOv2 weights
    python evaluate.py --ckpt runs/demo/last.pt --task voc_incontext --demo          # offline demo, CPU
    python evaluate.py ... --set eval.incontext.memory_size=102400 eval.incontext.fraction=0.125

stdout holds one line, a JSON object (task, miou in percent, per_class_iou, settings, elapsed_s, ...), printed
first and then appended to --out; notes, warnings and progress go to stderr. Settings live in config.yaml, section
eval.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.io import encode_png
from torchvision.transforms import v2
from torchvision.utils import draw_segmentation_masks, make_grid
from tqdm import tqdm

import data
import model
from train import ConfigError, flatten_sets, load_config, parse_set, pick_device, validate

# task -> (protocol family, dataset name of data.make_segmentation_dataset)
TASKS = {"voc_incontext": ("incontext", "voc"), "ade_incontext": ("incontext", "ade20k"),
         "voc_linear": ("linear", "voc"), "ade_linear": ("linear", "ade20k"),
         "coco_things_linear": ("linear", "coco_things"), "coco_stuff_linear": ("linear", "coco_stuff"),
         "voc_cluster": ("cluster", "voc"), "coco_things_cluster": ("cluster", "coco_things")}
ROOT_KEYS = {"voc": "voc", "ade20k": "ade20k", "coco_things": "coco", "coco_stuff": "coco"}  # eval.roots.<key>


class UserError(Exception):
    """A mistake the user can fix (path, checkpoint, setting): one line on stderr, exit status 2."""


# -----------------------------------------------------------------------------
# mIoU: one confusion matrix over the whole val set


def confusion_matrix(pred, gt, num_classes, ignore_index):
    """(C, C) int64 pixel counts, rows = ground truth, columns = prediction; pixels whose GT is ignore_index drop."""
    pred, gt = pred.reshape(-1).long(), gt.reshape(-1).long()
    keep = gt != ignore_index
    pred, gt = pred[keep], gt[keep]
    if gt.numel() and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"ground-truth label {int(gt.max())} outside 0..{num_classes - 1} (and not the ignore index)")
    return torch.bincount(gt * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def class_iou(conf):
    """(C, C) confusion (rows GT) -> per-class IoU = TP / (TP + FP + FN), float64, nan where the union is empty."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))


def drop_ignore_class(conf, ignore_index):
    """Zero the GT row of the ignore index when it is a class id (ADE20k's 0 'unlabeled'): those pixels drop out;
    the column stays, so predicting class 0 is still a wrong prediction for the pixel's true class."""
    if 0 <= ignore_index < len(conf):
        conf = conf.clone()
        conf[ignore_index] = 0
    return conf


def mean_over_all(iou):
    """The reference evaluators' mean: over all C classes, a class with an empty union counting as 0 (so ADE20k's
    never-scored class 0 makes it the sum of 150 IoUs / 151)."""
    return iou.nan_to_num(0.0).mean().item()


def mean_over_present(iou, ignore_index=None):
    """The usual mean: over the classes with a non-empty union, the ignore class left out."""
    if ignore_index is not None and 0 <= ignore_index < len(iou):
        iou = iou.clone()
        iou[ignore_index] = math.nan
    return iou.nanmean().item()


def incontext_scores(conf, ignore_index):
    """Every scoring of one in-context confusion matrix, accumulated with only 255 dropped (rows GT), at no extra
    pass over the data -> {variant: (per-class IoU, mIoU in [0, 1])}.
    hbird: the reference Hummingbird evaluator's (the published numbers): ignore-class pixels dropped, Hungarian
        matching, mean over all C classes (ADE20k: the 150 IoUs / 151);
    hungarian_nanmean: the same matching, mean over the classes present;
    plain: no matching, mean over the classes present (ADE20k: over the 150 real classes);
    dip: DIP's: no matching, only 255 dropped (ADE20k's class 0 scored as a class), mean over the classes present."""
    kept = drop_ignore_class(conf, ignore_index)
    matched = class_iou(remap_confusion(kept.T, hungarian_mapping(kept.T)))  # predicted classes renamed
    plain, full = class_iou(kept), class_iou(conf)
    return {"hbird": (matched, mean_over_all(matched)),
            "hungarian_nanmean": (matched, mean_over_present(matched, ignore_index)),
            "plain": (plain, mean_over_present(plain, ignore_index)),
            "dip": (full, mean_over_present(full))}


def hungarian(cost):
    """Exact minimum-cost assignment of every row of an (n, m) cost matrix, n <= m, to a distinct column.
    Shortest augmenting paths with row/column potentials, O(n^2 m): plenty for n <= a few hundred, and scipy is not
    a dependency. Returns the column of each row, (n,) int64."""
    c = cost.double().tolist()
    n, m = len(c), len(c[0]) if len(c) else 0
    if n > m:
        raise ValueError(f"hungarian needs rows <= columns, got a {n}x{m} cost matrix")
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)  # potentials; index 0 is a virtual row / column
    owner = [0] * (m + 1)  # owner[j]: the row (1-based) holding column j, 0 when free
    for row in range(1, n + 1):
        owner[0], j0 = row, 0
        slack, came_from, done = [inf] * (m + 1), [0] * (m + 1), [False] * (m + 1)
        while owner[j0]:  # grow a tree of tight edges until it reaches a free column
            done[j0] = True
            i0, delta, j1 = owner[j0], inf, 0
            for j in range(1, m + 1):
                if not done[j]:
                    reduced = c[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < slack[j]:
                        slack[j], came_from[j] = reduced, j0
                    if slack[j] < delta:
                        delta, j1 = slack[j], j
            for j in range(m + 1):  # shift potentials so that the cheapest new edge becomes tight
                if done[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    slack[j] -= delta
            j0 = j1
        while j0:  # flip the augmenting path back to the root
            j1 = came_from[j0]
            owner[j0] = owner[j1]
            j0 = j1
    cols = [0] * n
    for j in range(1, m + 1):
        if owner[j]:
            cols[owner[j] - 1] = j - 1
    return torch.tensor(cols, dtype=torch.long)


def hungarian_mapping(conf):
    """conf (K, C) cluster-by-class pixel counts, K <= C -> the class of each cluster that maximises total IoU."""
    conf = conf.double()
    union = conf.sum(1, keepdim=True) + conf.sum(0, keepdim=True) - conf
    return hungarian(-conf / union.clamp_min(1))


def many_to_one_mapping(conf):
    """conf (K, C) -> each cluster to the class with the highest precision |cluster & class| / |cluster|."""
    return conf.argmax(1)  # the denominator is the same for all classes of one cluster


def remap_confusion(conf, mapping):
    """conf (K, C) cluster-by-class counts and mapping (K,) cluster -> class: (C, C) class confusion (rows GT)."""
    C = conf.shape[1]
    return torch.zeros(C, C, dtype=conf.dtype).index_add_(1, mapping, conf.T)


# -----------------------------------------------------------------------------
# images and features


class Transformed(torch.utils.data.Dataset):
    """(image uint8 (3, H, W), mask int64 (H, W)) items through a joint torchvision v2 transform. An item whose files
    cannot be read comes back as its exception, also from a loader worker, for ReadableBatches to judge."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            image, mask = self.dataset[i]
        except (OSError, RuntimeError, ValueError) as e:
            return e
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def collate_readable(batch):
    """-> ((images, masks) of the readable items, or None), the exceptions of the others."""
    items = [b for b in batch if not isinstance(b, Exception)]
    return (torch.utils.data.default_collate(items) if items else None), [b for b in batch if isinstance(b, Exception)]


UNREADABLE = set()  # messages of the files skipped in this run (reset by run, counted in the result)


def skip_unreadable(e):
    if str(e) not in UNREADABLE:  # a file met again (memory passes, the picture) is named and counted once
        print(f"warning: skipping unreadable file ({e})", file=sys.stderr, flush=True)
        UNREADABLE.add(str(e))


class ReadableBatches:
    """(images, masks) batches of a loader of Transformed items. A file that cannot be decoded is skipped, named once
    on stderr and counted in UNREADABLE; wrong data (a missing file, a label outside the classes, an image and mask
    of different sizes) stops the run with one line."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch, failed in self.loader:
            for e in failed:
                if isinstance(e, (ValueError, FileNotFoundError)):
                    raise UserError(str(e))
                skip_unreadable(e)
            if batch is not None:
                yield batch


def resize_transform(size):
    # aspect not kept; v2 resizes the image bilinearly with antialias and the Mask with nearest
    return v2.Resize((size, size), antialias=True)


def memory_augmentation(size):
    """Hummingbird's memory augmentation: light colour jitter on the image, then a shared RandomResizedCrop whose
    scale range goes beyond 1 (draws that do not fit fall back to torchvision's centre crop, as in the reference)."""
    jitters = [v2.RandomApply([v2.ColorJitter(**{name: 0.1})], p=0.5)
               for name in ("brightness", "contrast", "saturation", "hue")]
    return v2.Compose([*jitters, v2.RandomResizedCrop((size, size), scale=(0.5, 2.0), antialias=True)])


def linear_train_augmentation(size):
    return v2.Compose([v2.RandomResizedCrop((size, size), scale=(0.8, 1.0), antialias=True),
                       v2.RandomHorizontalFlip()])


def make_loader(dataset, transform, batch_size, num_workers, shuffle=False):
    return ReadableBatches(torch.utils.data.DataLoader(Transformed(dataset, transform), batch_size=batch_size,
                                                       shuffle=shuffle, num_workers=num_workers,
                                                       collate_fn=collate_readable, persistent_workers=False))


@torch.no_grad()
def patch_features(backbone, images, precision="fp32"):
    """uint8 images (B, 3, H, W) -> final-norm patch tokens (B, h, w, D), float32, not yet L2-normalised."""
    x = images.float() / 255
    mean = torch.tensor(data.IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    bf16 = precision == "bf16" and x.is_cuda
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        tokens = backbone.forward_features(x)["x_norm_patchtokens"]  # (B, N, D)
    p = backbone.patch_size
    return tokens.float().reshape(len(x), x.shape[2] // p, x.shape[3] // p, -1)  # (B, h, w, D)


# -----------------------------------------------------------------------------
# in-context segmentation: a memory of labelled patches, exact k-NN search, soft label transfer


def topk_inner_product(queries, keys, k, key_bias=None, query_chunk=4096, key_chunk=131072):
    """Exact k best keys by inner product q.k, plus key_bias (M,) float32 when given (-|k|^2 / 2 ranks by Euclidean
    distance: |q - k|^2 = |q|^2 - 2 (q.k - |k|^2 / 2)). queries (Q, D), keys (M, D) -> scores (Q, k) float32,
    indices (Q, k) int64, best first; k is clamped to M. Blocks of queries x blocks of keys bound the score matrix
    to query_chunk x key_chunk; a running top-k merges the blocks. Products run in the keys' dtype (fp16/bf16 on
    GPU: fp32 accumulation in the tensor cores); the final scores are recomputed in fp32 from the selected keys so
    that the softmax that follows sees no half-precision rounding of the products."""
    k = min(k, len(keys))
    all_scores, all_indices = [], []
    for q in queries.split(query_chunk):
        qk = q.to(keys.dtype)
        best_s = qk.new_empty(len(q), 0)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=q.device)
        for start in range(0, len(keys), key_chunk):
            s = qk @ keys[start:start + key_chunk].T  # (q, m)
            if key_bias is not None:
                s += key_bias[start:start + key_chunk].to(s.dtype)
            s, i = s.topk(min(k, s.shape[1]), dim=1)
            best_s, best_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1)
            best_s, j = best_s.topk(min(k, best_s.shape[1]), dim=1)  # merge; also keeps the result sorted
            best_i = best_i.gather(1, j)
        if keys.dtype != torch.float32:
            best_s = torch.einsum("qd,qkd->qk", q.float(), keys[best_i].float())  # (q, k)
            best_s = best_s if key_bias is None else best_s + key_bias[best_i]
            best_s, j = best_s.sort(dim=1, descending=True)
            best_i = best_i.gather(1, j)
        all_scores.append(best_s.float())
        all_indices.append(best_i)
    return torch.cat(all_scores), torch.cat(all_indices)


def transfer_labels(scores, neighbour_labels, temperature):
    """Soft k-NN vote: weights = softmax over the k neighbours of score / temperature, prediction = sum of the
    weighted neighbour label distributions. scores (Q, k), neighbour_labels (Q, k, C) -> (Q, C)."""
    weights = torch.softmax(scores.float() / temperature, dim=1)
    return torch.einsum("qk,qkc->qc", weights, neighbour_labels.float())


def knn_transfer(queries, keys, labels, k, temperature, key_half_sq_norms=None):
    """Label distributions of queries (Q, D) from the memory: (Q, C) float32 in pixel counts of labels' unit.
    key_half_sq_norms None (the reference evaluator): keys are L2-normalised, queries are normalised here, the k
    nearest by inner product = cosine. Given (M,) |k|^2 / 2 (DIP's variant): raw features, the k nearest by
    Euclidean distance; both weigh the neighbours by the softmax of their cosine similarity / temperature."""
    if key_half_sq_norms is None:
        cosine, idx = topk_inner_product(F.normalize(queries, dim=-1), keys, k)  # (Q, k) each
    else:
        scores, idx = topk_inner_product(queries, keys, k, key_bias=-key_half_sq_norms)  # q.k - |k|^2 / 2
        half_sq = key_half_sq_norms[idx]  # (Q, k)
        cosine = (scores + half_sq) / (queries.norm(dim=1, keepdim=True) * (2 * half_sq).sqrt()).clamp_min(1e-12)
    return transfer_labels(cosine, labels[idx], temperature)


def patch_label_histograms(masks, num_classes, patch_size, ignore_index):
    """masks (B, H, W) -> (B, N, C) int64: how many of each patch's patch_size^2 pixels hold each class (patches
    row-major, N = H/p * W/p). Ignore pixels count as class 0, a quirk of the reference Hummingbird code that we
    keep so that numbers compare (on VOC that makes void borders 'background' in the memory)."""
    B, H, W = masks.shape
    h, w = H // patch_size, W // patch_size
    masks = masks.long().masked_fill(masks == ignore_index, 0)
    ys = torch.arange(H, device=masks.device) // patch_size
    xs = torch.arange(W, device=masks.device) // patch_size
    patch = (ys[:, None] * w + xs[None, :]).expand(B, H, W)  # (B, H, W) patch index of every pixel
    image = torch.arange(B, device=masks.device).view(B, 1, 1)
    flat = ((image * (h * w) + patch) * num_classes + masks).reshape(-1)
    return torch.bincount(flat, minlength=B * h * w * num_classes).reshape(B, h * w, num_classes)


def rare_class_sample(counts, n_keep, generator=None):
    """counts (B, N, C) patch label histograms -> (B, n_keep) indices of the patches to keep per image, preferring
    patches that hold rare classes: score = sum over the patch's classes of how many patches of the image hold that
    class, times U(0, 1) noise; the lowest scores win. n_keep is clamped to N."""
    present = (counts > 0).to(torch.float32)  # (B, N, C)
    patches_per_class = present.sum(1, keepdim=True)  # (B, 1, C)
    noise = torch.rand(present.shape[:2], generator=generator).to(counts.device)  # (B, N), CPU draw: same everywhere
    score = (present * patches_per_class).sum(2) * noise  # (B, N)
    return score.topk(min(n_keep, counts.shape[1]), dim=1, largest=False).indices


@torch.no_grad()
def build_memory(backbone, dataset, num_classes, ignore_index, image_size, memory_size=None, aug_epochs=0,
                 batch_size=8, seed=0, device="cpu", num_workers=0, precision="fp32", key_dtype=None, normalize=True):
    """The labelled patch memory of the train images: keys (M, D) features, L2-normalised unless normalize is False
    (key_dtype, default fp16 on GPU, fp32 on CPU) and labels (M, C) pixel counts out of patch_size^2 (uint8).
    aug_epochs passes over the images with augmentation (0: one plain pass). memory_size None keeps every patch; a
    budget is spread evenly over images x passes and filled by the rare-class sampler. The per-image count is
    capped at the patches an image has (the reference evaluator does not cap it, and fails on small subsets)."""
    device = torch.device(device)
    key_dtype = key_dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    p = backbone.patch_size
    passes = max(aug_epochs, 1)
    n_patches = (image_size // p) ** 2
    per_image = n_patches if memory_size is None else max(1, min(n_patches, memory_size // (len(dataset) * passes)))
    total = per_image * len(dataset) * passes
    keys = torch.empty(total, backbone.embed_dim, dtype=key_dtype, device=device)  # filled in place: no cat peak
    label_dtype = torch.uint8 if p * p < 256 else torch.int32  # pixel counts: 14 * 14 = 196 fits in a byte
    labels = torch.empty(total, num_classes, dtype=label_dtype, device=device)
    generator = torch.Generator().manual_seed(seed)
    transform = memory_augmentation(image_size) if aug_epochs > 0 else resize_transform(image_size)
    filled = 0
    for epoch in range(passes):
        loader = make_loader(dataset, transform, batch_size, num_workers)
        for images, masks in tqdm(loader, desc=f"memory pass {epoch + 1}/{passes}", leave=False):
            feats = patch_features(backbone, images.to(device), precision).flatten(1, 2)  # (B, N, D)
            feats = F.normalize(feats, dim=-1) if normalize else feats
            counts = patch_label_histograms(masks.to(device), num_classes, p, ignore_index)  # (B, N, C)
            if per_image < n_patches:
                keep = rare_class_sample(counts, per_image, generator)  # (B, n)
                feats = feats.gather(1, keep[..., None].expand(-1, -1, feats.shape[-1]))
                counts = counts.gather(1, keep[..., None].expand(-1, -1, num_classes))
            n = feats.shape[0] * feats.shape[1]
            keys[filled:filled + n] = feats.reshape(n, -1).to(key_dtype)
            labels[filled:filled + n] = counts.reshape(n, -1).to(label_dtype)
            filled += n
    return keys[:filled], labels[:filled]  # short of total when unreadable images were skipped


@torch.no_grad()
def incontext_segment(backbone, images, keys, labels, k, temperature, precision="fp32", key_half_sq_norms=None):
    """uint8 images (B, 3, S, S) -> class map (B, S, S): k-NN label transfer from the memory, bilinear upsampling."""
    feats = patch_features(backbone, images, precision)  # (B, h, w, D)
    B, h, w, D = feats.shape
    p = backbone.patch_size
    probs = knn_transfer(feats.reshape(-1, D), keys, labels, k, temperature, key_half_sq_norms) / (p * p)  # (B*h*w, C)
    probs = probs.reshape(B, h, w, -1).permute(0, 3, 1, 2)  # (B, C, h, w) class fractions
    return F.interpolate(probs, size=images.shape[2:], mode="bilinear", align_corners=False).argmax(1)


# the in-context protocols: the reference Hummingbird evaluator (the published numbers) and DIP's variant of it
PROTOCOLS = {"hbird": {"temperature": 0.02, "normalize": True, "score": "hbird"},
             "dip": {"temperature": 0.07, "normalize": False, "score": "dip"}}


def evaluate_incontext(backbone, train_set, val_set, s, device, num_workers, precision, n_vis=0):
    """Hummingbird protocol: confusion matrix over the val set, plus up to n_vis (image, gt, pred) samples. The
    headline is the protocol's scoring; every other scoring of the same confusion matrix goes beside it."""
    torch.manual_seed(s["seed"])  # the memory augmentation draws from the global generator
    C, ignore = val_set.num_classes, val_set.ignore_index
    protocol = PROTOCOLS[s["protocol"]]
    temperature = s["temperature"] or protocol["temperature"]
    keys, labels = build_memory(backbone, train_set, C, ignore, s["image_size"], s["memory_size"], s["aug_epochs"],
                                s["batch_size"], s["seed"], device, num_workers, precision,
                                normalize=protocol["normalize"])
    half_sq = None if protocol["normalize"] else torch.cat([kc.float().pow(2).sum(1) / 2 for kc in keys.split(1 << 20)])
    print(f"memory: {len(keys):,} patches x {keys.shape[1]} ({keys.dtype}) from {len(train_set)} images",
          file=sys.stderr)
    conf, vis = torch.zeros(C, C, dtype=torch.long), []
    loader = make_loader(val_set, resize_transform(s["image_size"]), s["batch_size"], num_workers)
    for images, masks in tqdm(loader, desc="query", leave=False):
        pred = incontext_segment(backbone, images.to(device), keys, labels, s["k"], temperature, precision, half_sq)
        conf += confusion_matrix(pred.cpu(), masks, C, 255)  # only void dropped: every scoring starts from this
        vis += list(zip(images, masks, pred.cpu()))[:n_vis - len(vis)]
    scores = incontext_scores(conf, ignore)
    iou, miou = scores[protocol["score"]]
    print(f"in-context mIoU {100 * miou:.2f} ({s['protocol']}); "
          + ", ".join(f"{name} {100 * m:.2f}" for name, (_, m) in scores.items()), file=sys.stderr)
    return iou, miou, vis, {"protocol": s["protocol"], "temperature": temperature, "memory_patches": len(keys),
                            "miou_variants": {name: 100 * m for name, (_, m) in scores.items()}}


# -----------------------------------------------------------------------------
# linear segmentation (the Leopart protocol)


class LinearHead(nn.Module):
    """Patch tokens (B, D, h, w) -> logits (B, C, out_size, out_size): bilinear upsampling and a 1x1 conv."""

    def __init__(self, dim, num_classes, out_size=100):
        super().__init__()
        self.out_size = out_size
        self.conv = nn.Conv2d(dim, num_classes, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats):
        # the conv runs before the upsampling: both are linear and the bilinear weights sum to one, so the result is
        # the same as upsample-then-conv, at C instead of D channels on the 100 x 100 grid
        return F.interpolate(self.conv(feats), size=(self.out_size, self.out_size), mode="bilinear",
                             align_corners=False)


def resize_nearest(masks, size):
    return F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()  # (B, size, size)


@torch.no_grad()
def segment_linear(head, feats, size):
    """feats (B, D, h, w) -> class map (B, size, size): logits upsampled bilinearly to the val mask size."""
    logits = F.interpolate(head(feats), size=(size, size), mode="bilinear", align_corners=False)
    return logits.argmax(1)


def linear_confusion(head, batches, num_classes, ignore_index, device):
    """batches of (feats (B, D, h, w), masks (B, S, S)) -> the (C, C) confusion of the head's maps at S x S: the
    reference scores S = 100 (masks nearest-downsampled, logits at 100 x 100), the full resolution is S = image_size."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for feats, masks in batches:
        pred = segment_linear(head, feats.to(device).float(), masks.shape[-1])
        conf += confusion_matrix(pred.cpu(), masks, num_classes, ignore_index)
    return conf


def train_linear_head(train_epoch, val_batches, dim, num_classes, ignore_index, s, device):
    """train_epoch(epoch) yields (feats (B, D, h, w), targets (B, out, out)); val_batches() yields (feats, masks
    (B, S, S)). SGD with a step decay; the val confusion after every epoch. Returns the head and the per-epoch
    confusion matrices."""
    torch.manual_seed(s["seed"])
    head = LinearHead(dim, num_classes, s["out_size"]).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    history = []
    for epoch in tqdm(range(s["epochs"]), desc="linear epochs"):
        for group in opt.param_groups:
            group["lr"] = s["lr"] * (s["lr_gamma"] if epoch >= s["lr_step_epoch"] else 1.0)
        head.train()
        for feats, targets in train_epoch(epoch):
            targets = targets.to(device).long()
            if not (targets != ignore_index).any():
                continue  # nothing labelled: the mean cross-entropy would be 0/0
            loss = F.cross_entropy(head(feats.to(device).float()), targets, ignore_index=ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        head.eval()
        history.append(linear_confusion(head, val_batches(), num_classes, ignore_index, device))
    return head, history


@torch.no_grad()
def cache_features(backbone, loader, device, precision, desc, mask_size=None):
    """Features (n, D, h, w) fp16 on the CPU and masks (n, S, S) uint8 (nearest to mask_size if given)."""
    feats, masks = [], []
    for images, m in tqdm(loader, desc=desc, leave=False):
        feats.append(patch_features(backbone, images.to(device), precision).permute(0, 3, 1, 2).half().cpu())
        masks.append((resize_nearest(m, mask_size) if mask_size else m).to(torch.uint8))  # labels <= 255
    return torch.cat(feats), torch.cat(masks)


def evaluate_linear(backbone, train_set, val_set, s, device, num_workers, precision, n_vis=0):
    C, ignore, size = val_set.num_classes, val_set.ignore_index, s["image_size"]
    torch.manual_seed(s["seed"])
    val_loader = make_loader(val_set, resize_transform(size), s["batch_size"], num_workers)
    val_feats, val_masks = cache_features(backbone, val_loader, device, precision, "val features")
    # the reference scores masks nearest-downsampled to 100 x 100 (in chunks: the float copy of 448 px masks is big)
    val_small = torch.cat([resize_nearest(m, s["out_size"]).to(torch.uint8) for m in val_masks.split(256)])

    def val_batches(masks=val_small):
        return zip(val_feats.split(s["batch_size"]), masks.split(s["batch_size"]))

    if s["train_aug"]:  # the protocol: a fresh augmented crop of every image each epoch, features recomputed
        loader = make_loader(train_set, linear_train_augmentation(size), s["batch_size"], num_workers, shuffle=True)

        def train_epoch(epoch):
            for images, masks in loader:
                feats = patch_features(backbone, images.to(device), precision).permute(0, 3, 1, 2)
                yield feats, resize_nearest(masks, s["out_size"])
    else:  # no augmentation: every epoch sees the same inputs, so compute the features once
        loader = make_loader(train_set, resize_transform(size), s["batch_size"], num_workers)
        train_feats, train_masks = cache_features(backbone, loader, device, precision, "train features", s["out_size"])

        def train_epoch(epoch):
            order = torch.randperm(len(train_feats))
            for batch in order.split(s["batch_size"]):
                yield train_feats[batch], train_masks[batch]

    head, history = train_linear_head(train_epoch, val_batches, backbone.embed_dim, C, ignore, s, device)
    # the reference's mean (over all classes, ADE20k's unscored class 0 as 0), best epoch at 100 x 100 the headline
    mious = [mean_over_all(class_iou(conf)) for conf in history]
    best = max(range(len(mious)), key=mious.__getitem__)
    full = mean_over_all(class_iou(linear_confusion(head, val_batches(val_masks), C, ignore, device)))
    vis = []
    if n_vis:
        images, masks = next(iter(make_loader(val_set, resize_transform(size), n_vis, 0)))
        vis = list(zip(images, masks, segment_linear(head, val_feats[:n_vis].to(device).float(), size).cpu()))
    extra = {"mode": "augmented (features per epoch)" if s["train_aug"] else "cached features (no augmentation)",
             "miou_last": 100 * mious[-1], "miou_last_full_res": 100 * full, "best_epoch": best + 1,
             "scored_at": f"{s['out_size']}x{s['out_size']}"}
    return class_iou(history[best]), mious[best], vis, extra


# -----------------------------------------------------------------------------
# clustering: standardise, PCA, K-means, match clusters to classes


def standardize_pca(x, dim=50):
    """(n, D) -> (n, min(dim, D)): zero mean and unit variance per feature (population std, as the reference's
    StandardScaler), then the top principal axes."""
    x = (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-8)
    cov = sum(xc.T.double() @ xc.double() for xc in x.split(262144)) / max(len(x) - 1, 1)  # (D, D), float64
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    return x @ vectors[:, -dim:].flip(1).to(x.dtype)


def nearest_centroid(x, centroids, chunk=65536):
    """x (n, d), centroids (k, d) -> (index of the nearest centroid (n,), squared distance to it (n,)), by
    argmin |x - c|^2 = argmax x.c - |c|^2 / 2, in chunks of rows."""
    half_norms = (centroids * centroids).sum(1) / 2
    best, dist = [], []
    for xc in x.split(chunk):
        s, i = (xc @ centroids.T - half_norms).max(1)
        best.append(i)
        dist.append(((xc * xc).sum(1) - 2 * s).clamp_min(0))
    return torch.cat(best), torch.cat(dist)


def lloyd(x, k, seed, iters):
    """One K-means run the way faiss runs it: k distinct random points of x (n, d) as the initial centroids, then up
    to iters rounds of assign + update, stopping once the assignment no longer changes. A cluster left empty takes
    over half of a populous one (drawn by size): a copy of its centroid, both moved apart by 1/1024 per coordinate.
    -> (centroids (k, d), objective: the sum of squared distances at the last assignment)."""
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=gen)[:k].to(x.device)].clone()
    sign = torch.ones(x.shape[1], device=x.device)
    sign[1::2] = -1  # faiss's "small symmetric perturbation"
    previous = None
    for _ in range(iters):
        assign, dist = nearest_centroid(x, centroids)
        objective = dist.double().sum().item()
        if previous is not None and torch.equal(assign, previous):
            break  # a fixed point: the update would give the same centroids
        counts = torch.bincount(assign, minlength=k).double().cpu()
        centroids = torch.zeros_like(centroids).index_add_(0, assign, x) / counts.clamp_min(1).to(x)[:, None]
        for empty in (counts == 0).nonzero().flatten().tolist():
            weights = (counts - 1).clamp_min(0)
            donor = torch.multinomial(weights, 1, generator=gen).item() if weights.sum() > 0 else counts.argmax().item()
            centroids[empty] = centroids[donor] * (1 + sign / 1024)
            centroids[donor] *= 1 - sign / 1024
            counts[empty] = counts[donor] / 2
            counts[donor] -= counts[empty]
        previous = assign
    return centroids, objective


def kmeans(x, k, seed=0, iters=100, redo=5, max_points_per_centroid=256):
    """faiss.Kmeans(d, k, niter=iters, nredo=redo, seed=seed) as the public NeCo code runs it, in torch, on x's
    device: train on a random sample of at most k * max_points_per_centroid points, redo times from different
    random initial centroids, keep the run with the lowest objective, then assign every point to its nearest
    centroid. x (n, d) -> (assignment (n,), centroids (k, d), the kept run's objective)."""
    if len(x) < k:
        raise ValueError(f"K-means with K={k} needs at least {k} points, got {len(x)}")
    train = x
    if len(x) > k * max_points_per_centroid:
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k * max_points_per_centroid]
        train = x[pick.to(x.device)]
    best = None
    for r in range(redo):
        centroids, objective = lloyd(train, k, seed + 1 + r * 15486557, iters)  # faiss's seed of restart r
        if best is None or objective < best[1]:
            best = (centroids, objective)
    return nearest_centroid(x, best[0])[0], *best


def evaluate_cluster(backbone, val_set, s, device, num_workers, precision, n_vis=0):
    """K-means on the val patch tokens; mIoU per K, averaged over seeds. The first K of the list is the headline."""
    C, ignore, size = val_set.num_classes, val_set.ignore_index, s["image_size"]
    loader = make_loader(val_set, resize_transform(size), s["batch_size"], num_workers)
    feats, gts = [], []
    for images, masks in tqdm(loader, desc="val features", leave=False):
        feats.append(patch_features(backbone, images.to(device), precision))  # (B, h, w, D)
        gts.append(resize_nearest(masks, s["gt_size"]))
    feats, gts = torch.cat(feats), torch.cat(gts)  # (n, h, w, D), (n, 100, 100)
    n, h, w, D = feats.shape
    x = standardize_pca(feats.reshape(-1, D), s["pca_dim"])  # (n*h*w, 50)
    keep = gts != ignore
    by_k, headline = {}, None
    for K in [C if K == 0 else K for K in s["ks"]]:
        if K > len(x):
            raise UserError(f"config key 'eval.cluster.ks': K={K} is more than the {len(x)} val patches")
        ious, mious = [], []
        for seed in tqdm(range(s["seeds"]), desc=f"K-means K={K}", leave=False):
            assign, _, _ = kmeans(x, K, seed, s["iters"], s["redo"], s["max_points_per_centroid"])
            clusters = resize_nearest(assign.reshape(n, h, w).cpu(), s["gt_size"])  # (n, 100, 100)
            cluster_conf = torch.bincount(clusters[keep] * C + gts[keep], minlength=K * C).reshape(K, C)
            mapping = hungarian_mapping(cluster_conf) if K == C else many_to_one_mapping(cluster_conf)
            iou = class_iou(remap_confusion(cluster_conf, mapping))
            miou = mean_over_all(iou)  # the reference's mean, over all classes
            ious.append(iou)
            mious.append(miou)
            if headline is None and seed == 0:
                vis_maps = (clusters, mapping)  # pictured with --save-vis
        m = torch.tensor(mious, dtype=torch.float64)
        headline = headline or (torch.stack(ious).nanmean(0), m.mean().item())  # the first K, averaged over seeds
        by_k[str(K)] = {"miou": 100 * m.mean().item(), "miou_std": 100 * m.std(unbiased=False).item(),
                        "matching": "hungarian" if K == C else "many-to-one", "seeds": len(mious)}
    vis = []
    if n_vis:
        images, masks = next(iter(make_loader(val_set, resize_transform(size), n_vis, 0)))
        clusters, mapping = vis_maps
        vis = list(zip(images, masks, mapping[resize_nearest(clusters[:n_vis], size)]))
    return *headline, vis, {"by_k": by_k}


# -----------------------------------------------------------------------------
# checkpoints: train.py runs, bare DINOv2 / NeCo state_dicts, official weights


def load_backbone(ckpt, teacher=False):
    """-> (backbone in eval mode, description). ckpt: 'hub:<name>', a train.py checkpoint (student, or teacher) or
    a bare backbone state_dict file (architecture read from the shapes)."""
    try:
        sd = None if ckpt.startswith("hub:") else model.load_checkpoint_file(ckpt)
        if sd is None:
            name = ckpt[4:]
            backbone, about = model.build_backbone(name, weights="hub"), {"arch": name, "weights": "official"}
        elif isinstance(sd, dict) and isinstance(sd.get("student"), dict) and isinstance(sd.get("config"), dict):
            cfg_model = sd["config"].get("model", {})
            which = "teacher" if teacher else "student"
            weights = sd[which]
            name, registers = model.infer_arch(weights)
            name = cfg_model.get("arch", name)  # the config knows a registers-excluded _reg model; shapes cannot
            registers = cfg_model.get("num_register_tokens", registers)
            backbone = model.build_backbone(name, weights=weights, num_register_tokens=registers)
            about = {"arch": name, "num_register_tokens": registers, "weights": which, "step": sd.get("step")}
        elif teacher:
            raise UserError(f"--teacher needs a train.py checkpoint (with student and teacher); {ckpt} is not one")
        else:
            name, registers = model.infer_arch(sd)
            backbone = model.build_backbone(name, weights=sd, num_register_tokens=registers)
            about = {"arch": name, "num_register_tokens": registers, "weights": "state_dict"}
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"checkpoint {ckpt}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    # a NaN or inf weight still gives a confident-looking mIoU: refuse it, naming the first such tensor
    bad = next((k for k, v in backbone.state_dict().items() if not v.isfinite().all()), None)
    if bad is not None:
        raise UserError(f"checkpoint {ckpt}: tensor {bad} holds NaN or inf values (a diverged run or a damaged file)")
    return backbone.eval(), about


# -----------------------------------------------------------------------------
# pictures: image | ground truth | prediction


def overlay(image, labels, palette, ignore_index, num_classes):
    classes = [c for c in labels.unique().tolist() if c != ignore_index and 0 <= c < num_classes]
    if not classes:
        return image
    masks = labels[None] == torch.tensor(classes)[:, None, None]  # (n, H, W) bool
    return draw_segmentation_masks(image, masks, alpha=0.6, colors=[palette[c] for c in classes])


def save_vis(samples, path, num_classes, ignore_index):
    """samples: (image uint8 (3, S, S), gt (S, S), pred (S, S)) -> one PNG, a row per image."""
    pal = data.voc_palette()
    palette = [tuple(pal[3 * c:3 * c + 3]) for c in range(256)]
    tiles = []
    for image, gt, pred in samples:
        tiles += [image, overlay(image, gt.long(), palette, ignore_index, num_classes),
                  overlay(image, pred.long(), palette, ignore_index, num_classes)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(encode_png(make_grid(tiles, nrow=3, padding=4, pad_value=255)).numpy()))  # any file name
    return path


# -----------------------------------------------------------------------------
# settings and the command line


def eval_config(config_path, sets, demo):
    """The eval section of config.yaml, with eval.demo applied (demo) and then the --set pairs (eval.* only),
    checked by train.py's rules table."""
    for pair in sets:
        if not parse_set(pair)[0].startswith("eval."):
            raise ConfigError(f"--set '{pair}': evaluate.py only takes eval.* keys (e.g. eval.incontext.k=10)")
    cfg = load_config(config_path, sets, "eval.demo" if demo else None)
    validate(cfg, "eval.")
    return cfg["eval"]


def resolve_data_root(dataset, ev, data_root, demo):
    if demo:  # the synthetic scenes (VOC layout) stand in for every dataset
        return data.make_synthetic_voc(data_root or "data/synthetic")
    root = Path(data_root or ev["roots"][ROOT_KEYS[dataset]]).expanduser()
    if not root.exists():
        raise UserError(f"data root {root} not found: pass --data-root or set eval.roots.{ROOT_KEYS[dataset]} "
                        f"(see README for the expected layout)")
    return root


def make_datasets(family, dataset, root, s, ev, demo):
    """(train set or None, val set) for the task."""
    name = "voc" if demo else dataset
    train_split = ev["voc_train_split"] if name == "voc" and not demo else "train"
    try:
        val_set = data.make_segmentation_dataset(name, root, "val")
        if family == "cluster":
            return None, val_set
        ids_file = None
        if family == "incontext":
            fraction, seed = s["fraction"], s["seed"]
            ids_file = s["subset_file"] and Path(str(s["subset_file"])).expanduser()
        else:
            fraction, seed = (s["coco_fraction"] if name.startswith("coco") else 1.0), s["seed"]
        return data.make_segmentation_dataset(name, root, train_split, fraction=fraction, seed=seed,
                                              ids_file=ids_file), val_set
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None


def per_class(iou, names):
    return {name: (None if math.isnan(v) else round(100 * v, 4)) for name, v in zip(names, iou.tolist())}


def default_out(ckpt):
    return Path("results.jsonl") if ckpt.startswith("hub:") else Path(ckpt).expanduser().parent / "results.jsonl"


def check_writable(path, what, flag):
    """Refuse, before hours of computing, a file that could not be written at the end: a folder in its place, a
    file where a folder of its path should be, no write permission (os.access)."""
    if path.exists():
        if path.is_dir():
            raise UserError(f"{what} {path} ({flag}) is a folder: pass a file path")
        target = path
    else:
        target = next(p for p in path.parents if p.exists())  # the folder it will be created in
        if not target.is_dir():
            raise UserError(f"{what} {path} ({flag}) lies under {target}, which is a file, not a folder")
    if not os.access(target, os.W_OK):
        raise UserError(f"{what} {path} ({flag}): {target} is not writable; pass another path")


def check_val_set(val_set):
    """Before anything heavy runs (not after hours of building a memory): every val mask decoded and its labels
    checked, every val image opened with PIL, which reads only its header, and its size compared with the mask's.
    Wrong data stops here with one line; an image or mask that cannot be decoded is dropped and counted."""
    keep = []
    for i in tqdm(range(len(val_set)), desc="checking val files", leave=False, disable=None):  # bar on a terminal only
        try:
            mask = val_set.load_mask(i)  # (H, W)
            with Image.open(val_set.image_path(i)) as im:
                height, width = im.height, im.width
        except (ValueError, FileNotFoundError) as e:
            raise UserError(f"val set: {e}") from None
        except (OSError, RuntimeError) as e:  # PIL's UnidentifiedImageError is an OSError
            skip_unreadable(e)
            continue
        if tuple(mask.shape) != (height, width):
            raise UserError(f"val set: mask {val_set.mask_path(i)} is {tuple(mask.shape)} but its image is "
                            f"{(height, width)}")
        keep.append(val_set.ids[i])
    if not keep:
        raise UserError(f"no readable val image in {val_set.image_dir}")
    val_set.ids = keep


def run(args):
    t0 = time.time()
    if args.task not in TASKS:
        raise UserError(f"unknown task '{args.task}'; choose one of {', '.join(TASKS)}")
    family, dataset = TASKS[args.task]
    config = Path(args.config).expanduser() if args.config else Path(__file__).with_name("config.yaml")
    ev = eval_config(config, flatten_sets(args.set), args.demo)
    s = ev[family]
    if args.ckpt.startswith("hub:"):
        if args.ckpt[4:] not in model.BACKBONE_NAMES or not args.ckpt.startswith("hub:dinov2_"):
            raise UserError(f"unknown hub model '{args.ckpt[4:]}'; choose one of "
                            f"{', '.join(n for n in model.BACKBONE_NAMES if n.startswith('dinov2_'))}")
    elif not Path(args.ckpt).expanduser().is_file():
        raise UserError(f"checkpoint {args.ckpt} not found (a train.py last.pt, a state_dict file or hub:<name>)")
    out = Path(args.out).expanduser() if args.out else default_out(args.ckpt)
    vis_path = Path(args.save_vis).expanduser() / f"{args.task}.png" if args.save_vis else None
    check_writable(out, "results file", "--out")
    if vis_path:
        if not (isinstance(ev["vis_images"], int) and ev["vis_images"] > 0):
            raise ConfigError(f"config key 'eval.vis_images' must be an integer > 0 with --save-vis, "
                              f"got {ev['vis_images']!r}")
        check_writable(vis_path, "picture", "--save-vis")
    UNREADABLE.clear()
    root = resolve_data_root(dataset, ev, args.data_root, args.demo)
    train_set, val_set = make_datasets(family, dataset, root, s, ev, args.demo)
    check_val_set(val_set)
    if family == "cluster":  # K-means needs at least K points
        points = len(val_set) * (s["image_size"] // model.PATCH_SIZE) ** 2
        if max(K or val_set.num_classes for K in s["ks"]) > points:
            raise ConfigError(f"config key 'eval.cluster.ks' asks for more clusters than the {points} val patch "
                              f"tokens ({len(val_set)} images), got {s['ks']}")
    backbone, about = load_backbone(args.ckpt, args.teacher)
    backbone.set_pos_embed_rule(s["pos_embed_rule"])  # per family: the resizing its reference evaluator ran with
    device = pick_device(ev["device"], "eval.device")
    backbone.to(device)
    n_vis = ev["vis_images"] if vis_path else 0
    print(f"{args.task}: {about['arch']} on {device}, {len(val_set)} val images"
          + (f", {len(train_set)} train images" if train_set is not None else ""), file=sys.stderr)
    common = dict(s=s, device=device, num_workers=ev["num_workers"], precision=ev["precision"], n_vis=n_vis)
    if family == "incontext":
        iou, miou, vis, extra = evaluate_incontext(backbone, train_set, val_set, **common)
    elif family == "linear":
        iou, miou, vis, extra = evaluate_linear(backbone, train_set, val_set, **common)
    else:
        iou, miou, vis, extra = evaluate_cluster(backbone, val_set, **common)
    result = {"task": args.task, "miou": 100 * miou, "per_class_iou": per_class(iou, val_set.class_names),
              **extra, "pos_embed_rule": s["pos_embed_rule"], "settings": s, "precision": ev["precision"],
              "ckpt": args.ckpt, **about,
              "data_root": str(root), "demo": args.demo, "n_val": len(val_set),
              "n_train": None if train_set is None else len(train_set), "n_unreadable": len(UNREADABLE),
              "device": str(device), "elapsed_s": round(time.time() - t0, 2)}
    if vis_path:
        result["vis"] = str(vis_path)
    line = json.dumps(result)
    print(line, flush=True)  # first: a save that fails after all checks must not lose the result
    failed = []
    if vis_path:
        try:
            save_vis(vis, vis_path, val_set.num_classes, val_set.ignore_index)
        except (OSError, RuntimeError) as e:
            failed.append(f"picture {vis_path} ({e})")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        failed.append(f"results file {out} ({e})")
    if failed:
        raise UserError(f"could not save the {' nor the '.join(failed)}; the result line is on stdout")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description="Dense evaluation (in-context, linear, K-means) of a backbone checkpoint")
    p.add_argument("--ckpt", required=True, help="train.py checkpoint, state_dict file, or hub:<dinov2 name>")
    p.add_argument("--task", required=True, help=", ".join(TASKS))
    p.add_argument("--teacher", action="store_true", help="evaluate the EMA teacher of a train.py checkpoint")
    p.add_argument("--data-root", help="dataset folder (default: eval.roots in the config)")
    p.add_argument("--config", help="the YAML config (default: config.yaml next to evaluate.py)")
    p.add_argument("--set", nargs="+", action="append", metavar="KEY=VALUE",
                   help="override eval.* keys, e.g. --set eval.incontext.memory_size=102400")
    p.add_argument("--out", help="results file, one JSON line appended (default: results.jsonl beside the ckpt)")
    p.add_argument("--save-vis", metavar="DIR", help="write DIR/<task>.png: image | ground truth | prediction")
    p.add_argument("--demo", action="store_true", help="synthetic data in data/synthetic and small CPU settings")
    args = p.parse_args(argv)
    try:
        run(args)
    except (UserError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
