"""
Evaluation of a frozen backbone (ours, official or released weights): in-context (Hummingbird) retrieval, linear probe,
K-means, SPair-71k correspondence (Probe3D), feature pictures. Settings: config.yaml, section eval. stdout: the result,
a JSON line (one per memory size of a sweep), then appended to --out (pca: the picture folder); notes go to stderr.

    python evaluate.py --ckpt runs/neco/last.pt --task voc_incontext [--teacher]   # a train.py run (its EMA teacher)
    python evaluate.py --ckpt neco_vits14_reg.pth --task ade_linear                # a bare state_dict file
    python evaluate.py --ckpt hub:dinov2_vits14_reg --task spair_correspondence    # the official DINOv2 weights
    python evaluate.py --ckpt runs/demo/last.pt --task voc_incontext --demo        # the offline demo, CPU
    python evaluate.py --ckpt runs/neco/last.pt --task pca --images photos/ --out vis/   # PNGs: vis/*.png
    python evaluate.py ... --set eval.incontext.memory_size=[102400,1024000] eval.incontext.fraction=0.125
"""
import argparse, functools, json, math, os, sys, time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.io import encode_png
from torchvision.ops import Permute
from torchvision.transforms import v2
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid
from tqdm import tqdm

import data
import model
from train import (BELOW_ONE, COUNT, DEVICE, FLAG, NON_NEGATIVE, PATCHES, POS_EMBED, POSITIVE, POSITIVE_INT, SHARE,
                   TEXT, ConfigError, check_rules, each, load_config, one_of, parse_set, pick_device, rule)

# task -> (protocol family, dataset name of data.make_segmentation_dataset; its eval.roots key is the first word)
TASKS = {"voc_incontext": ("incontext", "voc"), "ade_incontext": ("incontext", "ade20k"),
         "voc_linear": ("linear", "voc"), "ade_linear": ("linear", "ade20k"),
         "coco_things_linear": ("linear", "coco_things"), "coco_stuff_linear": ("linear", "coco_stuff"),
         "voc_cluster": ("cluster", "voc"), "coco_things_cluster": ("cluster", "coco_things"),
         "cityscapes_incontext": ("incontext", "cityscapes"), "coco_things_incontext": ("incontext", "coco_things"),
         "coco_stuff_incontext": ("incontext", "coco_stuff"), "spair_correspondence": ("spair", "spair"),
         "pca": ("pca", "voc")}  # pictures of the images under --images (default: eval.roots.voc)
# the in-context presets: the reference Hummingbird evaluator (the published numbers) and DIP's variant of it
PROTOCOLS = {"hbird": {"temperature": 0.02, "normalize": True, "score": "hbird"},
             "dip": {"temperature": 0.07, "normalize": False, "score": "dip"}}

class UserError(Exception):
    """A mistake the user can fix (path, checkpoint, setting): one line on stderr, exit status 2."""

# ---- in-context segmentation: a memory of labelled train patches, exact k-NN search, soft label transfer, scoring
def evaluate_incontext(backbone, train_set, val_set, s, device, num_workers, precision, n_vis=0):
    """Val patches take their k nearest memory patches' labels -> [(IoUs, mIoU, pictures, keys)] per memory size."""
    torch.manual_seed(s["seed"])  # the memory augmentation draws from the global generator
    C, size, p, protocol = val_set.num_classes, s["image_size"], backbone.patch_size, PROTOCOLS[s["protocol"]]
    sizes = s["memory_size"] if isinstance(s["memory_size"], list) else [s["memory_size"]]
    largest = None if sizes == [None] else max(sizes)
    keys, labels = build_memory(backbone, train_set, C, val_set.ignore_index, size, largest, s["aug_epochs"],
                                s["batch_size"], s["seed"], device, num_workers, precision, protocol["normalize"])
    n = [memory_per_image(m, len(train_set), s["aug_epochs"], (size // p) ** 2) for m in sizes]
    memories = [[x.unflatten(0, (-1, max(n)))[:, :n_m].flatten(0, 1) for x in (keys, labels)] for n_m in n]  # prefixes
    for mem in memories:  # + DIP's |k|^2 / 2, in chunks (a float32 copy of 10M fp16 keys is 15 GB)
        mem.append(None if protocol["normalize"] else
                   torch.cat([c.float().pow(2).sum(1) / 2 for c in mem[0].split(1 << 20)]))
        print(f"memory: {len(mem[0]):,} patches x {keys.shape[1]} ({keys.dtype})", file=sys.stderr)
    temperature, vis, confs = s["temperature"] or protocol["temperature"], [], torch.zeros(len(sizes), C, C).long()
    for images, masks in batches(val_set, v2.Resize((size, size)), s["batch_size"], num_workers, "query"):
        feats = model.patch_features(backbone, images.to(device), precision)  # (B, h, w, D)
        B, h, w, D = feats.shape
        for i, (keys_m, labels_m, half_sq) in enumerate(memories):
            probs = knn_transfer(feats.reshape(-1, D), keys_m, labels_m, s["k"], temperature, half_sq)  # (B*h*w, C)
            pred = bilinear(probs.reshape(B, h, w, C).permute(0, 3, 1, 2), size).argmax(1).cpu()  # (B, S, S)
            confs[i] += confusion_matrix(pred, masks, C, 255)  # only void dropped: every scoring starts from this
            vis += list(zip(images, masks, pred))[:n_vis - len(vis)] if i == 0 else []  # the first size's
    return [(*sc[protocol["score"]], vis, {"protocol": s["protocol"], "temperature": temperature, "memory_size": m,
                                          "memory_patches": len(mem[0]),
                                          "miou_variants": {name: 100 * v for name, (_, v) in sc.items()}})
            for m, mem, sc in zip(sizes, memories, (incontext_scores(c, val_set.ignore_index) for c in confs))]

def memory_per_image(memory_size, n_images, aug_epochs, n_patches):
    """Patches per image and pass: the budget (None: all) spread evenly, capped at n_patches (unlike the reference)."""
    return n_patches if memory_size is None else max(1, min(n_patches, memory_size // (n_images * max(aug_epochs, 1))))

@torch.no_grad()
def build_memory(backbone, dataset, num_classes, ignore_index, image_size, memory_size=None, aug_epochs=0,
                 batch_size=8, seed=0, device="cpu", num_workers=0, precision="fp32", normalize=True):
    """Keys (M, D), L2-normalised unless normalize is False, fp16 on GPU, and labels (M, C), pixel counts per patch.
    A memory_size budget (None: every patch) is filled by the rare-class sampler, each image's patches rarest first."""
    p, passes = backbone.patch_size, max(aug_epochs, 1)  # aug_epochs 0: one plain pass
    per_image = memory_per_image(memory_size, len(dataset), aug_epochs, (image_size // p) ** 2)
    total, generator, filled = per_image * len(dataset) * passes, torch.Generator().manual_seed(seed), 0
    key_dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    keys = torch.empty(total, backbone.embed_dim, dtype=key_dtype, device=device)  # filled in place: no cat peak
    labels = torch.empty(total, num_classes, dtype=torch.uint8 if p * p < 256 else torch.int32, device=device)
    # Hummingbird's: colour jitter, then a shared crop of scale up to 2 (misfits: torchvision's centre crop, as theirs)
    jitter = [v2.RandomApply([v2.ColorJitter(**{k: 0.1})], p=0.5)
              for k in ("brightness", "contrast", "saturation", "hue")]
    transform = (v2.Compose([*jitter, v2.RandomResizedCrop(image_size, scale=(0.5, 2.0))]) if aug_epochs > 0
                 else v2.Resize((image_size, image_size)))
    for epoch in range(passes):
        for images, masks in batches(dataset, transform, batch_size, num_workers, f"memory pass {epoch + 1}/{passes}"):
            feats = model.patch_features(backbone, images.to(device), precision).flatten(1, 2)  # (B, N, D)
            feats = F.normalize(feats, dim=-1) if normalize else feats
            counts = patch_label_histograms(masks.to(device), num_classes, p, ignore_index)  # (B, N, C)
            if memory_size is not None:
                keep = rare_class_sample(counts, per_image, generator)[..., None]  # (B, n, 1)
                feats, counts = (x.gather(1, keep.expand(-1, -1, x.shape[-1])) for x in (feats, counts))
            n = feats.shape[0] * feats.shape[1]
            keys[filled:filled + n], labels[filled:filled + n] = feats.reshape(n, -1), counts.reshape(n, -1)
            filled += n
    return keys[:filled], labels[:filled]  # short of total when unreadable images were skipped

def patch_label_histograms(masks, num_classes, patch_size, ignore_index):
    """masks (B, H, W) -> (B, N, C) int64: how many of each patch's pixels hold each class (patches row-major). Ignore
    pixels count as class 0, a quirk of the reference kept so that numbers compare (VOC's void borders: background)."""
    (B, H, W), p, dev = masks.shape, patch_size, masks.device
    N = (H // p) * (W // p)
    patch = (torch.arange(H, device=dev)[:, None] // p) * (W // p) + torch.arange(W, device=dev) // p  # (H, W)
    labels = masks.long().masked_fill(masks == ignore_index, 0)
    flat = (torch.arange(B, device=dev)[:, None, None] * N + patch) * num_classes + labels  # (B, H, W)
    return torch.bincount(flat.reshape(-1), minlength=B * N * num_classes).reshape(B, N, num_classes)

def rare_class_sample(counts, n_keep, generator=None):
    """counts (B, N, C) -> (B, n_keep) patches kept per image, n_keep clamped to N: score = sum over the patch's
    classes of how many patches of the image hold that class, times U(0, 1) noise; the lowest scores win."""
    present = (counts > 0).to(torch.float32)  # (B, N, C)
    noise = torch.rand(present.shape[:2], generator=generator).to(counts.device)  # (B, N), CPU draw: same everywhere
    score = (present * present.sum(1, keepdim=True)).sum(2) * noise  # (B, N)
    return score.topk(min(n_keep, counts.shape[1]), dim=1, largest=False).indices  # sorted: the rarest first

def knn_transfer(queries, keys, labels, k, temperature, key_half_sq_norms=None):
    """(Q, C): the k nearest keys' labels weighted by softmax(cosine / T); nearest by cosine, or by distance (DIP)."""
    if key_half_sq_norms is None:
        cosine, idx = topk_inner_product(F.normalize(queries, dim=-1), keys, k)  # (Q, k) each
    else:
        scores, idx = topk_inner_product(queries, keys, k, key_bias=-key_half_sq_norms)  # q.k - |k|^2 / 2
        half_sq = key_half_sq_norms[idx]  # (Q, k)
        cosine = (scores + half_sq) / (queries.norm(dim=1, keepdim=True) * (2 * half_sq).sqrt()).clamp_min(1e-12)
    weights = torch.softmax(cosine.float() / temperature, dim=1)  # (Q, k)
    return torch.einsum("qk,qkc->qc", weights, labels[idx].float())

def topk_inner_product(queries, keys, k, key_bias=None, query_chunk=4096, key_chunk=131072):
    """Exact k best keys (M, D) of queries (Q, D) by q.k + key_bias (M,) (-|k|^2 / 2: by Euclidean distance), in blocks
    -> scores (Q, k) float32, indices (Q, k), best first. Products in the keys' dtype, the kept ones redone in fp32."""
    k, out = min(k, len(keys)), []
    for q in queries.split(query_chunk):
        qk = q.to(keys.dtype)
        best_s, best_i = qk.new_empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.long, device=q.device)
        for start in range(0, len(keys), key_chunk):
            s = qk @ keys[start:start + key_chunk].T  # (q, m)
            if key_bias is not None:
                s += key_bias[start:start + key_chunk].to(s.dtype)
            s, i = s.topk(min(k, s.shape[1]), dim=1)
            best_s, j = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)  # merged, sorted
            best_i = torch.cat([best_i, i + start], 1).gather(1, j)
        if keys.dtype != torch.float32:  # the softmax that follows must not see half-precision rounding
            best_s = torch.einsum("qd,qkd->qk", q.float(), keys[best_i].float())  # (q, k)
            best_s, j = (best_s if key_bias is None else best_s + key_bias[best_i]).sort(dim=1, descending=True)
            best_i = best_i.gather(1, j)
        out.append((best_s.float(), best_i))
    return torch.cat([s for s, _ in out]), torch.cat([i for _, i in out])

def incontext_scores(conf, ignore_index):
    """{variant: (per-class IoU, mIoU)} of the in-context confusion (only 255 dropped). hbird: the reference's (the
    published numbers); hungarian_nanmean: over the classes present; plain: neither; dip: plain, ADE20k's 0 scored."""
    return {"hbird": score(conf, ignore_index, match=True),
            "hungarian_nanmean": score(conf, ignore_index, match=True, over_all=False),
            "plain": score(conf, ignore_index, over_all=False), "dip": score(conf, over_all=False)}

# ---- linear segmentation (the Leopart protocol): a 1x1 conv on the frozen tokens
def evaluate_linear(backbone, train_set, val_set, s, device, num_workers, precision, n_vis=0):
    """Headline: the best epoch's val mIoU at out_size (the reference's); the last epoch and full resolution beside."""
    C, ignore, size = val_set.num_classes, val_set.ignore_index, s["image_size"]
    bs, out = s["batch_size"], s["out_size"]
    loader = batches(val_set, v2.Resize((size, size)), bs, num_workers, "val features")
    val_feats, val_masks, shown = all_features(backbone, loader, device, precision, n_vis=n_vis)
    # the reference scores masks nearest-downsampled to 100 x 100 (in chunks: the float copy of 448 px masks is big)
    val_small = torch.cat([resize_nearest(m, out).to(torch.uint8) for m in val_masks.split(256)])
    if s["train_aug"]:  # the protocol: a fresh augmented crop of every image each epoch, features recomputed
        augment = v2.Compose([v2.RandomResizedCrop(size, scale=(0.8, 1.0)), v2.RandomHorizontalFlip()])
        def train_epoch(epoch):
            for images, masks in batches(train_set, augment, bs, num_workers, f"epoch {epoch + 1}", shuffle=True):
                yield model.patch_features(backbone, images.to(device), precision), resize_nearest(masks, out)
    else:  # no augmentation: every epoch sees the same inputs, so compute the features once
        loader = batches(train_set, v2.Resize((size, size)), bs, num_workers, "train features")
        train_feats, train_masks, _ = all_features(backbone, loader, device, precision, out)
        def train_epoch(epoch):
            for batch in torch.randperm(len(train_feats)).split(bs):
                yield train_feats[batch], train_masks[batch]
    head, history = train_linear_head(train_epoch, lambda: zip(val_feats.split(bs), val_small.split(bs)),
                                      backbone.embed_dim, C, ignore, s, device)
    mious = [score(conf, ignore)[1] for conf in history]  # the reference's mean: all classes, ADE20k's 0 as 0
    best = max(range(len(mious)), key=mious.__getitem__)
    full = score(linear_confusion(head, zip(val_feats.split(bs), val_masks.split(bs)), C, ignore, device), ignore)[1]
    vis = [(*pair, p) for pair, p in zip(shown, linear_maps(head, val_feats[:n_vis].to(device).float(), size))]
    return [(score(history[best], ignore)[0], mious[best], vis, {
        "mode": "augmented (features per epoch)" if s["train_aug"] else "cached features (no augmentation)",
        "miou_last": 100 * mious[-1], "miou_last_full_res": 100 * full, "best_epoch": best + 1,
        "scored_at": f"{out}x{out}"})]

def linear_head(dim, num_classes, out_size=100):
    """Tokens (B, h, w, D) -> logits (B, C, out, out): a 1x1 conv, then bilinear upsampling (as upsample-then-conv:
    both are linear and the bilinear weights sum to one; but at C instead of D channels on the 100 x 100 grid)."""
    conv = nn.Conv2d(dim, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(Permute([0, 3, 1, 2]), conv, nn.Upsample(size=(out_size, out_size), mode="bilinear"))

def train_linear_head(train_epoch, val_batches, dim, num_classes, ignore_index, s, device):
    """SGD with a step decay on train_epoch(epoch)'s (tokens, targets) -> (head, val confusion after every epoch)."""
    torch.manual_seed(s["seed"])
    head = linear_head(dim, num_classes, s["out_size"]).to(device)
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

def linear_confusion(head, batches, num_classes, ignore_index, device):
    """(C, C) confusion of (tokens, masks) batches at the masks' size: 100 (the reference's) or the full resolution."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for feats, masks in batches:
        conf += confusion_matrix(linear_maps(head, feats.to(device).float(), masks.shape[-1]), masks, num_classes,
                                 ignore_index)
    return conf

@torch.no_grad()
def linear_maps(head, feats, size):
    return bilinear(head(feats), size).argmax(1).cpu()  # (B, size, size): the logits upsampled to the mask size

# ---- clustering: standardise, PCA, K-means (as faiss runs it), clusters matched to classes
def evaluate_cluster(backbone, val_set, s, device, num_workers, precision, n_vis=0):
    """K-means of all val patch tokens per K and seed, clusters matched to classes; mIoU per K averaged over seeds."""
    C, ignore, size = val_set.num_classes, val_set.ignore_index, s["image_size"]
    loader = batches(val_set, v2.Resize((size, size)), s["batch_size"], num_workers, "val features")
    feats, gts, shown = all_features(backbone, loader, device, precision, s["gt_size"], cache_on_cpu=False, n_vis=n_vis)
    (n, h, w, D), keep = feats.shape, gts != ignore  # keep: (n, 100, 100); StandardScaler (population std), PCA to 50
    x = principal_components(feats.flatten(0, 2) / feats.std((0, 1, 2), unbiased=False).clamp_min(1e-8), s["pca_dim"])
    by_k, headline = {}, None
    for K in [C if K == 0 else K for K in s["ks"]]:
        if K > len(x):  # the pre-check counted val images that turned out unreadable
            raise UserError(f"config key 'eval.cluster.ks': K={K} is more than the {len(x)} val patches")
        runs = []  # (per-class IoU, mIoU) per seed
        for seed in tqdm(range(s["seeds"]), desc=f"K-means K={K}", leave=False):
            assign, _, _ = kmeans(x, K, seed, s["iters"], s["redo"], s["max_points_per_centroid"])
            clusters = resize_nearest(assign.reshape(n, h, w).cpu(), s["gt_size"])  # (n, 100, 100)
            cluster_conf = torch.bincount(clusters[keep] * C + gts[keep], minlength=K * C).reshape(K, C)
            mapping, conf = match_clusters(cluster_conf)
            runs.append(score(conf, ignore))  # the reference's mean, over all classes
            if headline is None and seed == 0:  # the picture shows the first K, seed 0
                vis = [(*pair, mapping[p]) for pair, p in zip(shown, resize_nearest(clusters[:n_vis], size))]
        m = torch.tensor([miou for _, miou in runs], dtype=torch.float64)
        headline = headline or (torch.stack([iou for iou, _ in runs]).nanmean(0), m.mean().item())  # the first K
        by_k[str(K)] = {"miou": 100 * m.mean().item(), "miou_std": 100 * m.std(unbiased=False).item(),
                        "matching": "hungarian" if K == C else "many-to-one", "seeds": len(runs)}
    return [(*headline, vis, {"by_k": by_k})]

def kmeans(x, k, seed=0, iters=100, redo=5, max_points_per_centroid=256):
    """faiss.Kmeans(d, k, niter=iters, nredo=redo, seed=seed) as the public NeCo code runs it, on a sample of at most
    k * max_points_per_centroid of x (n >= k, d) -> (every point's assignment (n,), centroids (k, d), objective)."""
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k * max_points_per_centroid]
    train = x[pick.to(x.device)] if len(x) > k * max_points_per_centroid else x
    runs = [lloyd(train, k, seed + 1 + r * 15486557, iters) for r in range(redo)]  # faiss's seed of restart r
    centroids, objective = min(runs, key=lambda run: run[1])  # the first of equal objectives
    return nearest_centroid(x, centroids)[0], centroids, objective

def lloyd(x, k, seed, iters):
    """One faiss K-means run from k random points of x (n, d) -> (centroids (k, d), the last assignment's objective)."""
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=gen)[:k].to(x.device)].clone()
    sign = 1 - 2 * (torch.arange(x.shape[1], device=x.device) % 2)  # 1, -1, 1, ...: faiss's "symmetric perturbation"
    previous, objective = None, math.inf
    for _ in range(iters):
        assign, dist = nearest_centroid(x, centroids)
        objective = dist.double().sum().item()
        if previous is not None and torch.equal(assign, previous):
            break  # a fixed point: the update would give the same centroids
        counts = torch.bincount(assign, minlength=k).double().cpu()
        centroids = torch.zeros_like(centroids).index_add_(0, assign, x) / counts.clamp_min(1).to(x)[:, None]
        for empty in (counts == 0).nonzero().flatten().tolist():  # takes over half of a cluster drawn by size
            donor = torch.multinomial((counts - 1).clamp_min(0), 1, generator=gen).item()  # some count > 1: n >= k
            centroids[empty] = centroids[donor] * (1 + sign / 1024)
            centroids[donor] *= 1 - sign / 1024
            counts[empty] = counts[donor] = counts[donor] / 2
        previous = assign
    return centroids, objective

def nearest_centroid(x, centroids, chunk=65536):
    """x (n, d), centroids (k, d) -> (nearest centroid (n,), squared distance to it (n,)): argmax x.c - |c|^2 / 2."""
    half_norms, out = (centroids * centroids).sum(1) / 2, []
    for xc in x.split(chunk):
        s, i = (xc @ centroids.T - half_norms).max(1)
        out.append((i, ((xc * xc).sum(1) - 2 * s).clamp_min(0)))
    return torch.cat([i for i, _ in out]), torch.cat([d for _, d in out])

# ---- SPair-71k correspondence, the Probe3D protocol: a source keypoint's descriptor finds its best target patch
def evaluate_spair(backbone, root, s, device, precision):
    """Keypoint recall per threshold and viewpoint bin (pooled per category, then averaged), with the counts."""
    chosen, size, errors = data.spair_pairs(root, s["split"], s["pairs_per_bin"]), s["image_size"], {}  # pair -> (n,)
    for category in sorted({c for c, _ in chosen}):
        views = {}  # image name -> (L2-normalised patch tokens (h, w, D), keypoints (K, 3)): each image once
        pairs = {p["filename"]: p for (c, _), ps in chosen.items() if c == category for p in ps}
        for name, pair in tqdm(sorted(pairs.items()), desc=category, leave=False):
            src, trg = name.split(":")[0].split("-")[1:]  # <id>-<source>-<target>:<category>
            try:
                for v in (src, trg):
                    if v not in views:
                        image, kps = data.spair_view(root, category, v, size)
                        feats = model.patch_features(backbone, image[None].to(device), precision,
                                               s["tokens"] == "last_block", pad=True)[0]
                        views[v] = F.normalize(feats, dim=-1), kps
            except (OSError, RuntimeError, ValueError) as e:
                skip_unreadable(e)
                continue
            (x1, y1, x2, y2), side = pair["trg_bndbox"], max(pair["trg_imsize"][:2])
            errors[name] = keypoint_errors(*views[src], *views[trg], size, max(x2 - x1, y2 - y1) / side,
                                           s["cell"] == "centre")
    return spair_recalls({key: [errors[p["filename"]] for p in ps if p["filename"] in errors]
                          for key, ps in chosen.items()}, s["thresholds"])

def keypoint_errors(feats_s, kps_s, feats_t, kps_t, size, box_scale, centre=False):
    """Source and target tokens (h, w, D), keypoints (K, 3) (x, y, visible; in size x size px) -> (n,) errors of those
    visible in both: the bilinear source descriptor's best target cell (corner or centre) to the truth, / box_scale."""
    both = (kps_s[:, 2] == 1) & (kps_t[:, 2] == 1)
    xy_s, xy_t = kps_s[both, :2].float() / size, kps_t[both, :2].float() / size  # (n, 2) in [0, 1]
    h, w, D = feats_t.shape
    grid = (2 * xy_s - 1).to(feats_s.device)[None, None]  # (1, 1, n, 2)
    desc = F.grid_sample(feats_s.permute(2, 0, 1)[None], grid, mode="bilinear", align_corners=True)[0, :, 0].T
    best = (desc @ feats_t.reshape(-1, D).T).argmax(1).cpu()  # (n,) row-major cells
    pred = (torch.stack([best % w, best // w], 1).float() + (0.5 if centre else 0.0)) / w  # (n, 2)
    return (pred - xy_t).norm(dim=1) / box_scale

def spair_recalls(errors, thresholds):
    """{(category, bin): [(n,) errors per pair]} -> recall (%) (error < t) per threshold, bin and category; counts."""
    pooled = {key: torch.cat(e) if e else torch.empty(0) for key, e in errors.items()}
    result = {"recall": {}, "per_category": {}, **{n: {b: {} for b in data.SPAIR_BINS} for n in ("pairs", "keypoints")}}
    for (c, b), e in pooled.items():
        result["pairs"][b][c], result["keypoints"][b][c] = len(errors[c, b]), len(e)
    for t in thresholds:
        per = {b: {c: 100 * (e < t).double().mean().item() for (c, bb), e in pooled.items() if bb == b and len(e)}
               for b in data.SPAIR_BINS}
        result["per_category"][str(t)] = per
        result["recall"][str(t)] = {b: sum(v.values()) / len(v) if v else None for b, v in per.items()}
    return result

# ---- feature pictures: the first principal components of the patch tokens as colours, and one patch's similarity map
def feature_pictures(backbone, shown, s, device, precision, out_dir):
    """(name, image) pairs -> a PNG each, image | 3 principal components (fitted jointly) | query similarity; a grid."""
    size, p = s["image_size"], backbone.patch_size
    col, row = [min(int(float(v) * (size // p)), size // p - 1) for v in s["query"].split(",")]  # the patch under it
    images = torch.stack([v2.functional.resize(image, [size, size], antialias=True) for _, image in shown])
    feats = model.patch_features(backbone, images.to(device), precision).cpu()  # (n, h, w, D)
    x = F.normalize(feats, dim=-1)
    sim = minmax((x @ x[0, row, col]).flatten()).reshape(*x.shape[:3], 1).expand(-1, -1, -1, 3)  # (n, h, w, 3)
    maps = torch.cat([pca_rgb(feats, s["foreground_threshold"]), sim], -1).permute(0, 3, 1, 2)  # (n, 6, h, w)
    maps = (255 * F.interpolate(maps, size=(size, size), mode="nearest")).round().to(torch.uint8)  # (n, 6, S, S)
    images[0] = draw_bounding_boxes(images[0], torch.tensor([[col, row, col + 1, row + 1]]) * p, colors="red", width=2)
    rows = [[image, m[:3], m[3:]] for image, m in zip(images, maps)]
    written = [out_dir / name for name, _ in shown] + [out_dir / "grid.png"]
    for path, tiles in zip(written, rows + [sum(rows, [])]):
        write_grid(tiles, path)
        print(f"wrote {path}", file=sys.stderr)
    return {"files": [str(f) for f in written], "query_patch": [col, row], "n_images": len(rows)}

def pca_rgb(feats, threshold=None):
    """Tokens (n, h, w, D) -> RGB (n, h, w, 3): 3 principal components, min-max scaled; threshold: of the foreground."""
    x, fg = feats.flatten(0, 2).double(), torch.ones(feats.shape[:3].numel(), dtype=torch.bool)  # (M, D), (M,)
    if threshold is not None:  # DINOv2's demos: the background black
        first = principal_components(x, 1).reshape(feats.shape[:3])  # (n, h, w), signed: the borders low
        first = first if first[:, [0, -1]].mean() + first[:, :, [0, -1]].mean() < 2 * first.mean() else -first
        fg = minmax(first.flatten()) > threshold
    out = torch.zeros(len(x), 3, dtype=torch.float64)
    out[fg] = minmax(principal_components(x[fg], 3))
    return out.float().reshape(*feats.shape[:3], 3)

def principal_components(x, k):
    """(M, D) -> (M, min(k, D)): x centred, on its top k principal axes (each signed: its largest loading positive)."""
    x = x - x.mean(0)
    cov = sum(xc.T.double() @ xc.double() for xc in x.split(262144))  # (D, D), float64, in chunks
    axes = torch.linalg.eigh(cov)[1][:, -k:].flip(1)  # eigh: ascending eigenvalues
    return x @ (axes * axes.gather(0, axes.abs().argmax(0, keepdim=True)).sign()).to(x.dtype)

def minmax(x):
    return (x - x.amin(0)) / (x.amax(0) - x.amin(0)).clamp_min(1e-12)  # each column to [0, 1]

# ---- shared machinery: loaders, features, resizing, mIoU from one confusion matrix, matching
def batches(dataset, transform, batch_size, num_workers, desc=None, shuffle=False):
    """(images uint8 (B, 3, S, S), masks (B, S, S)); undecodable files skipped, named, counted; wrong data stops."""
    loader = torch.utils.data.DataLoader(range(len(dataset)), batch_size, shuffle=shuffle, num_workers=num_workers,
                                         collate_fn=functools.partial(load_batch, dataset, transform))
    for batch, failed in tqdm(loader, desc=desc, leave=False):
        skip_unreadable(*failed)
        if batch is not None:
            yield batch

def load_batch(dataset, transform, indices):
    """In a loader worker: the readable items through the joint v2 transform, collated (or None); the others' errors."""
    items, failed = [], []
    for i in indices:
        try:
            image, mask = dataset[i]
        except (OSError, RuntimeError, ValueError) as e:
            failed.append(e)
            continue
        image, mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        items.append((image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)))
    return (torch.utils.data.default_collate(items) if items else None), failed

UNREADABLE = set()  # messages of the files skipped in this run (reset by run, counted in the result)

def skip_unreadable(*errors):
    """Name and count each undecodable file once (memory passes meet it again); a data error stops the run."""
    for e in errors:
        if isinstance(e, (ValueError, FileNotFoundError)):
            raise UserError(str(e))
        if str(e) not in UNREADABLE:
            print(f"warning: skipping unreadable file ({e})", file=sys.stderr, flush=True)
            UNREADABLE.add(str(e))

def all_features(backbone, batches, device, precision, mask_size=None, cache_on_cpu=True, n_vis=0):
    """Tokens (n, h, w, D) (CPU fp16 or device fp32), masks (n, S, S) uint8 (nearest), the first n_vis (image, mask)."""
    feats, masks, shown = [], [], []
    for images, m in batches:
        f = model.patch_features(backbone, images.to(device), precision)
        feats.append(f.half().cpu() if cache_on_cpu else f)
        masks.append((resize_nearest(m, mask_size) if mask_size else m).to(torch.uint8))  # labels <= 255
        shown += list(zip(images, m))[:n_vis - len(shown)]
    return torch.cat(feats), torch.cat(masks), shown

def bilinear(x, size):
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # (B, C, size, size)

def resize_nearest(maps, size):
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()  # (B, size, size)

def confusion_matrix(pred, gt, num_classes, ignore_index):
    """(C, C) int64 pixel counts, rows ground truth, columns prediction; pixels whose GT is ignore_index drop."""
    keep = gt.reshape(-1) != ignore_index
    pred, gt = pred.reshape(-1)[keep].long(), gt.reshape(-1)[keep].long()
    return torch.bincount(gt * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)

def score(conf, ignore_index=None, match=False, over_all=True):
    """(per-class IoU, nan if no union; mIoU) of a (C, C) confusion, rows GT; ignore_index (ADE20k's 0) loses its row
    and its place in the mean; match: Hungarian first; over_all: the reference's mean, no union as 0 (ADE20k: / 151)."""
    ignored = torch.tensor([ignore_index]) if ignore_index is not None and 0 <= ignore_index < len(conf) else None
    conf = conf if ignored is None else conf.index_fill(0, ignored, 0)
    conf = (match_clusters(conf.T)[1] if match else conf).double()
    union = conf.sum(0) + conf.sum(1) - conf.diag()
    iou = torch.where(union > 0, conf.diag() / union.clamp_min(1), math.nan)
    kept = iou if ignored is None else iou.index_fill(0, ignored, math.nan)  # its IoU was 0 or nan
    return iou, (kept.nan_to_num(0.0).mean() if over_all else kept.nanmean()).item()

def match_clusters(conf):
    """(K, C) cluster x class counts -> (class per cluster, (C, C) confusion): Hungarian on IoU (K = C) or precision."""
    (K, C), d = conf.shape, conf.double()
    iou = d / (d.sum(1, keepdim=True) + d.sum(0, keepdim=True) - d).clamp_min(1)  # (K, C)
    mapping = hungarian(-iou) if K == C else conf.argmax(1)
    return mapping, torch.zeros(C, C, dtype=conf.dtype).index_add_(1, mapping, conf.T)

def hungarian(cost):
    """Exact min-cost assignment of the rows of an (n, m) cost, n <= m, to distinct columns -> (n,), O(n^2 m)."""
    c = cost.double().cpu().numpy()
    n, m = c.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)  # potentials; index 0 is a virtual row / column
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: the row (1-based) holding column j, 0 when free
    for row in range(1, n + 1):
        owner[0], j0 = row, 0
        slack, came_from, done = np.full(m + 1, np.inf), np.zeros(m + 1, np.int64), np.zeros(m + 1, bool)
        while owner[j0]:  # grow a tree of tight edges until it reaches a free column
            done[j0] = True
            reduced = c[owner[j0] - 1] - u[owner[j0]] - v[1:]  # (m,)
            better = ~done[1:] & (reduced < slack[1:])
            slack[1:][better], came_from[1:][better] = reduced[better], j0
            j0 = 1 + np.where(done[1:], np.inf, slack[1:]).argmin()  # the cheapest edge out of the tree
            delta = slack[j0]
            u[owner[done]] += delta  # shift the potentials so that it becomes tight (the rows are distinct)
            v[done] -= delta
            slack[~done] -= delta
        while j0:  # flip the augmenting path back to the root
            owner[j0], j0 = owner[came_from[j0]], came_from[j0]
    held = owner[1:]  # every row holds one column: the held columns, ordered by their row
    return torch.from_numpy(np.nonzero(held)[0][np.argsort(held[held > 0])])

# ---- pictures
def save_vis(samples, path, num_classes, ignore_index):
    """(image uint8 (3, S, S), gt (S, S), pred (S, S)) samples -> one PNG, a row per image: image | gt | prediction."""
    palette, classes, tiles = data.voc_palette(), torch.arange(num_classes)[:, None, None], []
    colors = [tuple(palette[3 * c:3 * c + 3]) for c in range(num_classes)]
    for image, *maps in samples:  # maps: the ground truth and the prediction
        masks = [(m.long() == classes) & (m != ignore_index) for m in maps]  # (C, S, S) bool each
        tiles += [image] + [draw_segmentation_masks(image, mask, alpha=0.6, colors=colors) for mask in masks]
    write_grid(tiles, path)

def write_grid(tiles, path):
    """uint8 tiles (3, S, S), three to a row -> one PNG (written with open(): any file name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(encode_png(make_grid(tiles, nrow=3, padding=4, pad_value=255)).numpy()))

# ---- the command line: settings, data, checks before anything heavy runs, the result line
# key -> (what its value must be, the check): every key of the eval section, task by task (train.py's: CONFIG_RULES)
EVAL_RULES = {
    "eval.device": DEVICE, "eval.precision": one_of("fp32", "bf16"), **each("eval", "num_workers vis_images", COUNT),
    "eval.voc_train_split": one_of("trainaug", "train"), **each("eval.roots", "voc ade20k coco cityscapes spair", TEXT),
    "eval.incontext.protocol": one_of("hbird", "dip"), "eval.incontext.image_size": PATCHES,
    "eval.incontext.memory_size": rule("an integer >= 1 or a list of them (a sweep)", lambda v: POSITIVE_INT[1](v) or (
        isinstance(v, list) and len(v) > 0 and all(map(POSITIVE_INT[1], v))), optional=True),
    **each("eval.incontext", "aug_epochs seed", COUNT), **each("eval.incontext", "k batch_size", POSITIVE_INT),
    "eval.incontext.temperature": rule(*POSITIVE, optional=True), "eval.incontext.fraction": SHARE,
    "eval.incontext.subset_file": rule(*TEXT, optional=True), "eval.incontext.pos_embed_rule": POS_EMBED,
    "eval.linear.image_size": PATCHES, **each("eval.linear", "out_size epochs batch_size", POSITIVE_INT),
    **each("eval.linear", "lr lr_gamma", POSITIVE), **each("eval.linear", "lr_step_epoch seed", COUNT),
    "eval.linear.momentum": BELOW_ONE, "eval.linear.weight_decay": NON_NEGATIVE, "eval.linear.train_aug": FLAG,
    "eval.linear.coco_fraction": SHARE, "eval.linear.pos_embed_rule": POS_EMBED,
    "eval.cluster.image_size": PATCHES, "eval.cluster.iters": COUNT, "eval.cluster.pos_embed_rule": POS_EMBED,
    **each("eval.cluster", "gt_size pca_dim seeds redo max_points_per_centroid batch_size", POSITIVE_INT),
    "eval.cluster.ks": rule("a list of cluster counts (0: the number of classes)",
                            lambda v: isinstance(v, list) and len(v) > 0 and all(map(COUNT[1], v))),
    "eval.spair.split": one_of("test", "val", "trn"), "eval.spair.image_size": POSITIVE_INT,
    "eval.spair.tokens": one_of("last_block", "final_norm"), "eval.spair.cell": one_of("corner", "centre"),
    "eval.spair.pairs_per_bin": rule(*POSITIVE_INT, optional=True), "eval.spair.pos_embed_rule": POS_EMBED,
    "eval.spair.thresholds": rule("a list of numbers > 0", lambda v: isinstance(v, list) and len(v) > 0
                                  and all(map(POSITIVE[1], v))),
    "eval.pca.image_size": PATCHES, "eval.pca.n_images": POSITIVE_INT, "eval.pca.pos_embed_rule": POS_EMBED,
    "eval.pca.foreground_threshold": rule(*BELOW_ONE, optional=True),
    "eval.pca.query": rule("'x,y': fractions in [0, 1] of the image's width and height ('0.5,0.5': the centre)",
                           lambda v: isinstance(v, str) and v.count(",") == 1 and all(
                               x.strip().replace(".", "", 1).isdecimal() and float(x) <= 1 for x in v.split(","))),
}

def eval_config(config_path, sets, demo):
    """The eval section, eval.demo applied (demo), then the --set pairs (eval.* only), checked by EVAL_RULES."""
    for pair in sets:
        if not parse_set(pair)[0].startswith("eval."):
            raise ConfigError(f"--set '{pair}': evaluate.py only takes eval.* keys (e.g. eval.incontext.k=10)")
    cfg = load_config(config_path, sets, "eval.demo" if demo else None)
    check_rules(cfg, EVAL_RULES, owned=lambda key: key.startswith("eval."))
    subset, ev = cfg["eval"]["incontext"]["subset_file"], cfg["eval"]
    if subset is not None and not Path(subset).expanduser().is_file():
        raise ConfigError(f"config key 'eval.incontext.subset_file' names {subset}, which is not a file: give a "
                          f"text file with one train image id per line")
    if subset is not None and ev["incontext"]["fraction"] != 1:
        raise ConfigError("config key 'eval.incontext.fraction' must be 1 when eval.incontext.subset_file is set")
    pick_device(ev["device"], "eval.device")
    return ev

def make_datasets(family, dataset, ev, s, data_root, demo):
    """-> (data root, train set or None, val set); SPair-71k: (its root, None, None); pca: (its folder, [(picture name,
    image)], None). The demo's synthetic scenes (VOC layout) stand in for every image set, warped pairs for SPair."""
    key = dataset.split("_")[0]  # eval.roots.<key>
    if demo:
        root = (data.make_synthetic_spair(data_root or "data/synthetic_spair") if family == "spair" else
                data.make_synthetic_voc(data_root or "data/synthetic"))
    else:
        root = Path(data_root or ev["roots"][key]).expanduser()
        if not root.exists():
            raise UserError(f"data root {root} not found: pass {'--images' if family == 'pca' else '--data-root'} or "
                            f"set eval.roots.{key} (see README for the expected layout)")
    if family == "pca":  # the first images of a folder (or of a VOC root's JPEGImages), in sorted order
        folder, shown = next((d for d in (root / "JPEGImages", root / "VOC2012/JPEGImages") if d.is_dir()), root), []
        for f in data.list_images(folder)[:s["n_images"]]:
            try:
                shown.append((f"{len(shown):03d}_{f.stem}.png", data.read_image(f)))
            except (OSError, RuntimeError) as e:
                skip_unreadable(e)
        if not shown:
            raise UserError(f"no readable image under {folder} (--images)")
        return folder, shown, None
    if family == "spair":  # the SPair-71k folder or its parent
        return (root / "SPair-71k" if (root / "SPair-71k").is_dir() else root), None, None
    name = "voc" if demo else dataset
    try:
        val_set = data.make_segmentation_dataset(name, root, "val")
        skip_unreadable(*val_set.drop_unreadable())  # before anything heavy: wrong val data stops here
        if not val_set.ids:
            raise UserError(f"no readable val image in {val_set.image_dir}")
        if family == "cluster":
            return root, None, val_set
        split = ev["voc_train_split"] if name == "voc" and not demo else "train"
        fraction = s["fraction"] if family == "incontext" else s["coco_fraction"] if name.startswith("coco") else 1.0
        ids_file = s.get("subset_file") and Path(str(s["subset_file"])).expanduser()  # the official low-shot lists
        return root, data.make_segmentation_dataset(name, root, split, fraction=fraction, seed=s["seed"],
                                                    ids_file=ids_file), val_set
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None

def check_writable(path, what, flag, folder=False):
    """Refuse now, not after hours of computing, a destination (a file, or a folder) that could not be written."""
    target = path if path.exists() else next(p for p in path.parents if p.exists())  # or the folder it goes in
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{what} {path} ({flag}) is a {'file' if folder else 'folder'}: pass another path")
    if not target.is_dir() and target != path:
        raise UserError(f"{what} {path} ({flag}) lies under {target}, which is a file, not a folder")
    if not os.access(target, os.W_OK):
        raise UserError(f"{what} {path} ({flag}): {target} is not writable; pass another path")

def run(args):
    t0 = time.time()
    if args.task not in TASKS:
        raise UserError(f"unknown task '{args.task}'; choose one of {', '.join(TASKS)}")
    family, dataset = TASKS[args.task]
    ev = eval_config(Path(args.config).expanduser(), args.set, args.demo)
    s, hub, pictures = ev[family], args.ckpt.startswith("hub:"), family == "pca"
    if hub and args.ckpt[4:] not in model.RELEASED:  # the names with released weights
        raise UserError(f"unknown hub model '{args.ckpt[4:]}'; choose one of {', '.join(model.RELEASED)}")
    if not hub and not Path(args.ckpt).expanduser().is_file():
        raise UserError(f"checkpoint {args.ckpt} not found (a train.py last.pt, a state_dict file or hub:<name>)")
    name = "vis" if pictures else "results.jsonl"  # pca: --out is the picture folder; its result line: stdout only
    out = Path(args.out or (name if hub else Path(args.ckpt).parent / name)).expanduser()
    check_writable(out, "picture folder" if pictures else "results file", "--out", folder=pictures)
    vis_path = Path(args.save_vis).expanduser() / f"{args.task}.png" if args.save_vis else None
    if vis_path and family in ("spair", "pca"):
        raise UserError(f"--save-vis draws segmentation pictures; {args.task} has none: leave it out")
    if vis_path and ev["vis_images"] < 1:
        raise ConfigError("config key 'eval.vis_images' must be an integer > 0 with --save-vis, got 0")
    if vis_path:
        check_writable(vis_path, "picture", "--save-vis")
    UNREADABLE.clear()
    root, train_set, val_set = make_datasets(family, dataset, ev, s, args.data_root, args.demo)
    try:  # (model.load_backbone: a hub name, a train.py checkpoint, or a bare state_dict)
        backbone, about = model.load_backbone(args.ckpt, args.teacher)
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:  # not a backbone, or malformed
        raise UserError(f"checkpoint {args.ckpt}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if family != "spair":  # (SPair pads its images to whole patches instead)
        s["image_size"] = model.round_to_patch(s["image_size"], backbone.patch_size)  # 504 (36x36 at /14) -> 512 at /16
    points = len(val_set or ()) * (s["image_size"] // backbone.patch_size) ** 2
    if family == "cluster" and max(K or val_set.num_classes for K in s["ks"]) > points:  # K-means needs K points
        raise ConfigError(f"config key 'eval.cluster.ks' asks for more clusters than the {points} val patch tokens "
                          f"({len(val_set)} images), got {s['ks']}")
    backbone.set_pos_embed_rule(s["pos_embed_rule"])  # per family: the resizing its reference evaluator ran with
    device = pick_device(ev["device"], "eval.device")
    print(f"{args.task}: {about['arch']} on {device}", file=sys.stderr)
    backbone, vis = backbone.to(device), None
    if family == "spair":
        results = [evaluate_spair(backbone, root, s, device, ev["precision"])]
    elif pictures:  # the (name, image) pairs in train_set's place
        results = [feature_pictures(backbone, train_set, s, device, ev["precision"], out)]
    else:
        sets = (val_set,) if train_set is None else (train_set, val_set)
        evaluator = {"incontext": evaluate_incontext, "linear": evaluate_linear, "cluster": evaluate_cluster}[family]
        results = evaluator(backbone, *sets, s, device, ev["num_workers"], ev["precision"],
                            ev["vis_images"] if vis_path else 0)
        vis = results[0][2]
        results = [{"miou": 100 * miou, "per_class_iou": {c: None if math.isnan(v) else round(100 * v, 4) for c, v in
                    zip(val_set.class_names, iou.tolist())}, **extra, "n_val": len(val_set),
                    "n_train": None if train_set is None else len(train_set)} for iou, miou, _, extra in results]
    lines = [json.dumps({"task": args.task, **r, "pos_embed_rule": s["pos_embed_rule"], "settings": s,
                         "precision": ev["precision"], "ckpt": args.ckpt, **about, "data_root": str(root),
                         "demo": args.demo, "n_unreadable": len(UNREADABLE), "device": str(device),
                         "elapsed_s": round(time.time() - t0, 2), **({"vis": str(vis_path)} if vis_path else {})})
             for r in results]
    print("\n".join(lines), flush=True)  # first: a save that fails after all checks must not lose the result
    failed = []
    try:
        if vis_path:
            save_vis(vis, vis_path, val_set.num_classes, val_set.ignore_index)
    except (OSError, RuntimeError) as e:
        failed.append(f"picture {vis_path} ({e})")
    try:
        if not pictures:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:
                f.write("".join(line + "\n" for line in lines))
    except OSError as e:
        failed.append(f"results file {out} ({e})")
    if failed:
        raise UserError(f"could not save the {' nor the '.join(failed)}; the result line is on stdout")

def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluation (in-context, linear, K-means, SPair-71k, pictures) of a model")
    p.add_argument("--ckpt", required=True, help="train.py checkpoint, state_dict file, or hub:<name> (model.RELEASED)")
    p.add_argument("--task", required=True, help=", ".join(TASKS))
    p.add_argument("--teacher", action="store_true", help="evaluate the EMA teacher of a train.py checkpoint")
    p.add_argument("--data-root", "--images", help="dataset folder (default: eval.roots); pca: images, or a VOC root")
    p.add_argument("--config", default=Path(__file__).with_name("config.yaml"), help="default: beside evaluate.py")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="eval.incontext.k=10 ...")
    p.add_argument("--out", help="results file, a JSON line appended (default: results.jsonl by the ckpt); pca: folder")
    p.add_argument("--save-vis", metavar="DIR", help="write DIR/<task>.png: image | ground truth | prediction")
    p.add_argument("--demo", action="store_true", help="synthetic data in data/synthetic and small CPU settings")
    try:
        run(p.parse_args(argv))
    except (UserError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
