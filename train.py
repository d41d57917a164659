"""
NeCo post-training: a student ViT learns to order patches by similarity to reference patches the same way as its
EMA teacher does, through a differentiable sorting network.

    python train.py --config config.yaml                     # the paper's run (COCO train2017, ViT-S/14-reg)
    python train.py --config config.yaml --demo              # offline demo on synthetic scenes, CPU, ~3 minutes
    torchrun --nproc_per_node=4 train.py --config config.yaml   # several GPUs (DistributedDataParallel)

Re-running the same command resumes from <out_dir>/last.pt.
"""
import argparse
import errno
import fcntl
import json
import math
import os
import random
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torchvision.ops import roi_align
from tqdm import tqdm

from data import (READ_ATTEMPTS, MultiCrop, TrainImages, augment_batch, collate_multicrop, crop_intersection_rois,
                  make_synthetic_voc, photometric_params)
from model import BACKBONE_NAMES, ProjectionHead, build_backbone
from sort import diff_sort

# -----------------------------------------------------------------------------
# config: one YAML file, every key overridable with --set section.key=value


class ConfigError(ValueError):
    """A mistake in the config or on the command line: reported as one line, no traceback."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many bad steps in a row, a file that cannot be written): reported as one line."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM; a BaseException (as KeyboardInterrupt), so that no `except Exception` swallows it."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


def _check_type(key, old, new):
    if old is None or new is None:
        return new
    if isinstance(old, bool) or isinstance(new, bool):
        if isinstance(old, bool) and isinstance(new, bool):
            return new
    elif isinstance(old, float) and isinstance(new, int):
        return float(new)
    elif isinstance(old, (int, float, str)) and type(new) is type(old):
        return new
    elif isinstance(new, list) and isinstance(old, (list, int)):  # a number's list: a sweep, if the key's rule allows
        return new
    elif isinstance(old, dict):
        raise ConfigError(f"config key '{key}' is a section: set one of its keys ({key}.{next(iter(old), '...')}=...)")
    raise ConfigError(f"config key '{key}' expects {type(old).__name__} (like {old!r}), got {new!r}")


def set_key(cfg, dotted, value):
    """Set cfg['a']['b'] = value for dotted = 'a.b', refusing keys the config does not have."""
    *parents, last = dotted.split(".")
    node = cfg
    for i, part in enumerate(parents):
        if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"unknown config key '{'.'.join(parents[:i + 1])}' (in '{dotted}')")
        node = node[part]
    if last not in node:
        raise ConfigError(f"unknown config key '{dotted}'")
    node[last] = _check_type(dotted, node[last], value)


def dotted_items(tree, prefix=""):
    """{'a': {'b': 1}} -> [('a.b', 1)]: a nested override section as --set pairs."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from dotted_items(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def parse_set(pair):
    if "=" not in pair:
        raise ConfigError(f"--set expects key=value, got '{pair}'")
    key, text = pair.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string; a user means the number
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


OVERRIDE_SECTIONS = ("demo", "eval.demo")  # sections of overrides, applied by name (train.py --demo, evaluate.py --demo)


def load_config(path, sets=(), demo_section=None):
    """Read the YAML config, remove the override sections, apply the one named demo_section ("demo", "eval.demo")
    and then the --set pairs ('a.b=value')."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        cfg = yaml.safe_load(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found (pass --config config.yaml from the repository)")
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read ({e.strerror})")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file '{path}' is not UTF-8 text (line {line}): save it as UTF-8")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {getattr(e, 'problem', None) or e}")
    if not isinstance(cfg, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    overrides = {}
    for name in OVERRIDE_SECTIONS:
        *parents, last = name.split(".")
        node = cfg
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        overrides[name] = node.pop(last, None) if isinstance(node, dict) else None
    if demo_section:
        prefix = demo_section.rpartition(".")[0]
        for key, value in dotted_items(overrides[demo_section] or {}, prefix + "." if prefix else ""):
            set_key(cfg, key, value)
    for pair in sets:
        set_key(cfg, *parse_set(pair))
    return cfg


def flatten_sets(groups):
    """argparse gives --set a b --set c as [[a, b], [c]]."""
    return [pair for group in (groups or []) for pair in group]


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v):
    return (_int(v) or isinstance(v, float)) and math.isfinite(v)


def _pair(ok):
    return lambda v: isinstance(v, list) and len(v) == 2 and all(map(ok, v))


def OPTIONAL(rule):
    return rule[0] + " or null", lambda v: v is None or rule[1](v)


def one_of(*options):
    return "one of " + ", ".join(options), lambda v: v in options


COUNT = "an integer >= 0", lambda v: _int(v) and v >= 0
POSITIVE_INT = "an integer >= 1", lambda v: _int(v) and v >= 1
PATCHES = "a positive multiple of the patch size 14", lambda v: _int(v) and v >= 14 and v % 14 == 0
POSITIVE = "a number > 0", lambda v: _num(v) and v > 0
NON_NEGATIVE = "a number >= 0", lambda v: _num(v) and v >= 0
FRACTION = "a number in [0, 1]", lambda v: _num(v) and 0 <= v <= 1
BELOW_ONE = "a number in [0, 1)", lambda v: _num(v) and 0 <= v < 1
HALF = "a number in [0, 0.5)", lambda v: _num(v) and 0 <= v < 0.5  # the second global crop needs twice it
BELOW_ONE_PAIR = "two numbers in [0, 1)", _pair(BELOW_ONE[1])
SCALE = "[lo, hi] with 0 < lo <= hi <= 1", lambda v: _pair(lambda x: _num(x) and 0 < x <= 1)(v) and v[0] <= v[1]
SHARE = "a number in (0, 1]", lambda v: _num(v) and 0 < v <= 1
FLAG = "true or false", lambda v: isinstance(v, bool)
TEXT = "a non-empty string", lambda v: isinstance(v, str) and v.strip() != ""

# key -> (what its value must be, the check): every key train.py reads, checked before anything is loaded (the
# sort keys are checked by diff_sort itself, below)
CONFIG_RULES = {
    "out_dir": TEXT, "seed": COUNT,
    "model.arch": one_of(*BACKBONE_NAMES), "model.weights": OPTIONAL(TEXT),
    "model.num_register_tokens": COUNT, "model.drop_path_rate": BELOW_ONE, "model.head_hidden": POSITIVE_INT,
    "model.head_out": POSITIVE_INT, "model.head_layers": POSITIVE_INT,
    "model.pos_embed_rule": one_of("neco", "dinov2"), "model.teacher_head": one_of("random", "copy"),
    "data.root": TEXT, "data.global_size": PATCHES, "data.global_scale": SCALE, "data.local_size": PATCHES,
    "data.local_scale": SCALE, "data.n_local": COUNT, "data.min_overlap": HALF, "data.num_workers": COUNT,
    "data.augment_on_device": FLAG,
    "neco.roi_size": POSITIVE_INT, "neco.references": one_of("queue", "batch"), "neco.queue_size": POSITIVE_INT,
    "neco.num_references": POSITIVE_INT,
    "optim.epochs": POSITIVE_INT, "optim.batch_size": POSITIVE_INT, "optim.lr_backbone": POSITIVE,
    "optim.lr_head": POSITIVE, "optim.weight_decay": NON_NEGATIVE, "optim.weight_decay_end": NON_NEGATIVE,
    "optim.momentum_teacher": FRACTION, "optim.momentum_teacher_end": FRACTION, "optim.clip_grad": NON_NEGATIVE,
    "optim.betas": BELOW_ONE_PAIR,
    "train.device": one_of("auto", "cpu", "cuda"), "train.precision": one_of("bf16", "fp32"),
    "train.ckpt_every": POSITIVE_INT, "train.log_every": POSITIVE_INT, "train.max_bad_steps": POSITIVE_INT,
    "train.max_steps": OPTIONAL(COUNT), "train.compile": FLAG,
    "train.fused_attention": FLAG, "train.fused_adamw": FLAG, "train.grad_checkpointing": FLAG,
    # evaluate.py
    "eval.device": one_of("auto", "cpu", "cuda"), "eval.precision": one_of("fp32", "bf16"),
    "eval.num_workers": COUNT, "eval.vis_images": COUNT, "eval.voc_train_split": one_of("trainaug", "train"),
    "eval.roots.voc": TEXT, "eval.roots.ade20k": TEXT, "eval.roots.coco": TEXT, "eval.roots.cityscapes": TEXT,
    "eval.roots.spair": TEXT,
    "eval.incontext.protocol": one_of("hbird", "dip"), "eval.incontext.image_size": PATCHES,
    "eval.incontext.memory_size": ("an integer >= 1, a list of them (a sweep) or null", lambda v: v is None or (
        POSITIVE_INT[1](v) or isinstance(v, list) and len(v) > 0 and all(map(POSITIVE_INT[1], v)))), "eval.incontext.aug_epochs": COUNT,
    "eval.incontext.k": POSITIVE_INT, "eval.incontext.temperature": OPTIONAL(POSITIVE),
    "eval.incontext.fraction": SHARE, "eval.incontext.subset_file": OPTIONAL(TEXT), "eval.incontext.seed": COUNT,
    "eval.incontext.batch_size": POSITIVE_INT, "eval.incontext.pos_embed_rule": one_of("dinov2", "neco"),
    "eval.linear.image_size": PATCHES, "eval.linear.out_size": POSITIVE_INT, "eval.linear.train_aug": FLAG,
    "eval.linear.epochs": POSITIVE_INT, "eval.linear.batch_size": POSITIVE_INT, "eval.linear.lr": POSITIVE,
    "eval.linear.momentum": BELOW_ONE, "eval.linear.weight_decay": NON_NEGATIVE, "eval.linear.lr_step_epoch": COUNT,
    "eval.linear.lr_gamma": POSITIVE, "eval.linear.coco_fraction": SHARE, "eval.linear.seed": COUNT,
    "eval.linear.pos_embed_rule": one_of("dinov2", "neco"),
    "eval.cluster.image_size": PATCHES, "eval.cluster.gt_size": POSITIVE_INT,
    "eval.cluster.ks": ("a list of cluster counts (0: the number of classes)",
                        lambda v: isinstance(v, list) and len(v) > 0 and all(map(COUNT[1], v))),
    "eval.cluster.pca_dim": POSITIVE_INT, "eval.cluster.seeds": POSITIVE_INT, "eval.cluster.iters": COUNT,
    "eval.cluster.redo": POSITIVE_INT, "eval.cluster.max_points_per_centroid": POSITIVE_INT,
    "eval.cluster.batch_size": POSITIVE_INT, "eval.cluster.pos_embed_rule": one_of("dinov2", "neco"),
    "eval.spair.split": one_of("test", "val", "trn"), "eval.spair.image_size": POSITIVE_INT,
    "eval.spair.tokens": one_of("last_block", "final_norm"), "eval.spair.cell": one_of("corner", "centre"),
    "eval.spair.pairs_per_bin": OPTIONAL(POSITIVE_INT), "eval.spair.pos_embed_rule": one_of("dinov2", "neco"),
    "eval.spair.thresholds": ("a list of numbers > 0", lambda v: isinstance(v, list) and len(v) > 0
                              and all(map(POSITIVE[1], v))),
}


def get_key(cfg, dotted):
    node = cfg
    for i, part in enumerate(dotted.split(".")):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"config key '{dotted}' is missing (no '{'.'.join(dotted.split('.')[:i + 1])}' in the "
                              f"config file; compare it with the repository's config.yaml)")
        node = node[part]
    return node


def validate(cfg, prefix="", demo=False):
    """Fail in the first second on a mistake that would otherwise surface after minutes of loading. prefix "eval."
    checks the evaluation keys (evaluate.py), prefix "" the training ones and how they fit together (train.py)."""
    for key, (what, ok) in CONFIG_RULES.items():
        if key.startswith("eval.") != (prefix == "eval."):
            continue
        value = get_key(cfg, key)
        if not ok(value):
            raise ConfigError(f"config key '{key}' must be {what}, got {'nothing' if value is None else repr(value)}")
    if prefix == "eval.":
        s = cfg["eval"]["incontext"]
        if s["subset_file"] is not None and not Path(s["subset_file"]).expanduser().is_file():
            raise ConfigError(f"config key 'eval.incontext.subset_file' names {s['subset_file']}, which is not a "
                              f"file: give a text file with one train image id per line")
        if s["subset_file"] is not None and s["fraction"] != 1:
            raise ConfigError("config key 'eval.incontext.fraction' must be 1 when eval.incontext.subset_file names "
                              "the subset")
        pick_device(cfg["eval"]["device"], "eval.device")
        return
    m, d, n, t = cfg["model"], cfg["data"], cfg["neco"], cfg["train"]
    pick_device(t["device"], "train.device")
    if n["references"] == "queue" and n["queue_size"] < n["num_references"]:
        raise ConfigError("config key 'neco.queue_size' must be at least neco.num_references")
    if n["references"] == "batch" and n["num_references"] > n["roi_size"] ** 2:
        raise ConfigError("config key 'neco.num_references' must be <= neco.roi_size^2 in batch mode")
    try:  # the sort's own argument checks, on a tiny input
        for steepness in (n["student_steepness"], n["teacher_steepness"]):
            diff_sort(torch.zeros(1, n["num_references"]), n["sort_network"], steepness, n["sort_distribution"],
                      n["sort_art_lambda"])
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config section 'neco': {e}")
    root = Path(d["root"])
    if not root.is_dir() and not demo:
        raise ConfigError(f"data.root '{root}' is not a folder: point data.root at COCO train2017 (or any folder "
                          f"of images), e.g. --set data.root=/data/coco/images/train2017, or run with --demo")
    weights = m["weights"]
    if weights not in (None, "hub") and not Path(weights).is_file():
        raise ConfigError(f"model.weights '{weights}' is not a file: give a DINOv2 state_dict file, 'hub' for the "
                          f"official checkpoint, or null for random initialisation")

# -----------------------------------------------------------------------------
# the networks: backbone + projection head, applied to every patch token


class NeCoModel(nn.Module):
    """Backbone + head; state_dict keys 'backbone.*' and 'head.*' (evaluate.py and model.py read them)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views):
        """views: list of (B, 3, s, s) crops -> list of (B, s/14, s/14, out) projected patch maps.
        Crops of the same size go through the backbone together (one call per size, as DINO's multi-crop wrapper)."""
        outs = [None] * len(views)
        for size in sorted({v.shape[-1] for v in views}, reverse=True):
            idx = [i for i, v in enumerate(views) if v.shape[-1] == size]
            x = torch.cat([views[i] for i in idx])  # (len(idx) * B, 3, s, s)
            tokens = self.backbone.forward_features(x)["x_norm_patchtokens"]  # (len(idx) * B, N, D)
            z = self.head(tokens)  # (len(idx) * B, N, out), unit norm
            side = size // self.backbone.patch_size
            for i, chunk in zip(idx, z.chunk(len(idx))):
                outs[i] = chunk.unflatten(1, (side, side))  # (B, side, side, out)
        return outs


def build_models(cfg):
    """Student and teacher start from the same backbone weights; the teacher's projection head is its own random
    draw (model.teacher_head: random, as the public run) or a copy of the student's (copy). The teacher never gets
    gradients; only the student has stochastic depth. Both resize pos_embed by model.pos_embed_rule."""
    m = cfg["model"]
    backbones = [build_backbone(m["arch"], weights, m["num_register_tokens"], rate, m["pos_embed_rule"])
                 for weights, rate in ((m["weights"], m["drop_path_rate"]), (None, 0.0))]
    student, teacher = [NeCoModel(b, ProjectionHead(b.embed_dim, m["head_hidden"], m["head_out"], m["head_layers"]))
                        for b in backbones]  # the teacher's head is drawn after the student's
    teacher.backbone.load_state_dict(student.backbone.state_dict())
    if m["teacher_head"] == "copy":
        teacher.head.load_state_dict(student.head.state_dict())
    teacher.requires_grad_(False)
    # DINOv2's mask_token is only used by iBOT masking, never here: a parameter without a gradient would stall
    # DistributedDataParallel's gradient buckets, so it stays frozen (and unchanged in the checkpoint)
    student.backbone.mask_token.requires_grad_(False)
    return student, teacher


# -----------------------------------------------------------------------------
# the NeCo loss


def pair_queries(maps_t, maps_s, boxes, g, v, roi_size):
    """RoI-align teacher crop g and student crop v over their intersection -> (B, roi_size^2, out) each, at least
    float32: under bf16 autocast the maps come out of the head in bf16, and the loss runs in float32 (roi_align
    also needs maps and boxes of one dtype)."""
    B = boxes.shape[0]
    map_t, map_s = (m.float() if m.element_size() < 4 else m for m in (maps_t[g], maps_s[v]))
    roi_g, roi_v = crop_intersection_rois(boxes[:, g], boxes[:, v], map_t.shape[1], map_s.shape[1])
    batch_idx = torch.arange(B, device=boxes.device, dtype=boxes.dtype)[:, None]
    rois_t, rois_s = (torch.cat([batch_idx, roi], 1).to(m.dtype) for roi, m in ((roi_g, map_t), (roi_v, map_s)))
    q_t = roi_align(map_t.permute(0, 3, 1, 2), rois_t, roi_size,
                    spatial_scale=1.0, sampling_ratio=ROI_SAMPLING, aligned=True)  # (B, out, r, r)
    q_s = roi_align(map_s.permute(0, 3, 1, 2), rois_s, roi_size,
                    spatial_scale=1.0, sampling_ratio=ROI_SAMPLING, aligned=True)
    return q_t.flatten(2).transpose(1, 2), q_s.flatten(2).transpose(1, 2)  # (B, r*r, out)


ROI_SAMPLING = -1  # roi_align's adaptive default, as the public run: ceil(bin side) samples per bin side


def sort_cross_entropy(sim_s, sim_t, ncfg):
    """sim_*: (R, n) similarities of R queries to n references. Sort both, each with its network's steepness;
    cross-entropy of the student's relaxed permutation matrices against the teacher's, summed over ranks, averaged
    over queries and references."""
    # check_finite=False: no host sync for a NaN check; non-finite similarities give a non-finite loss, and
    # train_step skips that step on the device
    kw = dict(network=ncfg["sort_network"], distribution=ncfg["sort_distribution"],
              art_lambda=ncfg["sort_art_lambda"], check_finite=False)
    with torch.no_grad():
        _, P_t = diff_sort(sim_t, steepness=ncfg["teacher_steepness"], **kw)  # (R, n, n)
    _, P_s = diff_sort(sim_s, steepness=ncfg["student_steepness"], **kw)
    # P can hold exact zeros (logistic at high steepness underflows); clamping at the smallest normal float keeps
    # log finite and leaves every entry that is not already denormal unchanged.
    log_P_s = torch.log(P_s.clamp_min(torch.finfo(P_s.dtype).tiny))
    return -(P_t * log_P_s).sum(-1).mean()


def pair_similarities(maps_t, maps_s, boxes, refs_for_pair, ncfg):
    """maps_t: 2 teacher maps (B, h, w, out); maps_s: V student maps; boxes (B, V, 4) in image pixels.
    refs_for_pair(g, q_t) -> (B, n_ref, out) teacher reference patches for that pair.
    Returns (sim_s, sim_t), each (10*B*Q, n_ref) float32: the cosine similarities of every query patch of the
    10 (g, v) pairs (g a global crop, v any other crop) to its image's references."""
    sims_s, sims_t = [], []
    for g in range(2):
        for v in range(len(maps_s)):
            if v == g:
                continue
            q_t, q_s = pair_queries(maps_t, maps_s, boxes, g, v, ncfg["roi_size"])  # (B, Q, out)
            refs = F.normalize(refs_for_pair(g, q_t).float(), dim=-1)  # (B, n_ref, out)
            sims_t.append(F.normalize(q_t, dim=-1) @ refs.transpose(1, 2))  # (B, Q, n_ref) cosine
            sims_s.append(F.normalize(q_s, dim=-1) @ refs.transpose(1, 2))
    n_ref = sims_s[0].shape[-1]
    return torch.cat(sims_s).reshape(-1, n_ref), torch.cat(sims_t).reshape(-1, n_ref)


def neco_loss(maps_t, maps_s, boxes, refs_for_pair, ncfg):
    """The mean over the 10 (g, v) pairs of the sort cross-entropy: all pairs go through one sort call, and every
    pair has B*Q rows, so the mean over rows is the mean over pairs."""
    return sort_cross_entropy(*pair_similarities(maps_t, maps_s, boxes, refs_for_pair, ncfg), ncfg)


# -----------------------------------------------------------------------------
# reference patches: a FIFO queue of teacher patches per global crop, or the batch itself


class PatchQueue:
    """queue[g] holds the latest teacher head embeddings of global crop g (FIFO). Only filled rows are sampled."""

    def __init__(self, size, dim, device):
        self.feats = torch.zeros(2, size, dim, device=device)
        self.ptr = [0, 0]
        self.filled = [0, 0]

    def push(self, g, patches, count, gen):
        """Write `count` random rows of patches (M, dim) at the pointer, wrapping around."""
        size = self.feats.shape[1]
        count = min(count, size, patches.shape[0])
        pick = torch.randperm(patches.shape[0], generator=gen, device=gen.device)[:count].to(patches.device)
        slots = (self.ptr[g] + torch.arange(count, device=patches.device)) % size
        self.feats[g, slots] = patches[pick].float()
        self.ptr[g] = (self.ptr[g] + count) % size
        self.filled[g] = min(self.filled[g] + count, size)

    def sample(self, g, rows, n, gen):
        """(rows, n, dim): n distinct filled rows of queue g for each of `rows` images. When the queue holds enough
        rows, they are distinct over the whole draw, as in the public code once its queue is full; while it fills,
        distinct within each image (a queue with fewer than n rows repeats them). The counts are host ints: no sync."""
        filled = self.filled[g]
        if rows * n <= filled:
            idx = torch.randperm(filled, generator=gen, device=gen.device)[:rows * n].view(rows, n)
        else:  # one random key per row and image, sorted: a permutation of the filled rows per image
            idx = torch.rand(rows, filled, generator=gen, device=gen.device).argsort(dim=1)
            idx = idx.repeat(1, -(-n // filled))[:, :n]
        return self.feats[g, idx.to(self.feats.device)]

    def state_dict(self):
        return {"feats": self.feats.cpu(), "ptr": list(self.ptr), "filled": list(self.filled)}

    def load_state_dict(self, state):
        self.feats.copy_(state["feats"])
        self.ptr, self.filled = list(state["ptr"]), list(state["filled"])


def all_gather_cat(x):
    """Concatenate x over ranks in rank order (identity without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def sum_over_ranks(counts, device):
    """Host ints of this rank -> their elementwise sums over the ranks (one all_reduce; unchanged in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return counts
    total = torch.tensor(counts, device=device)
    dist.all_reduce(total)
    return total.tolist()


def rank_slice(x, B):
    """This rank's rows of a tensor drawn for the whole (global) batch: every rank draws the same random numbers
    from the shared generator and keeps its part, so N ranks reproduce the single-process step exactly."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return x[rank * B:(rank + 1) * B]


def make_reference_sampler(ncfg, queue, gen, B):
    n_ref = ncfg["num_references"]

    def from_queue(g, q_t):
        global_B = B * (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)
        return rank_slice(queue.sample(g, global_B, n_ref, gen), B)  # (B, n_ref, out)

    def from_batch(g, q_t):
        pool = all_gather_cat(q_t.detach()).flatten(0, 1)  # (global_B * Q, out): mostly other images' patches
        global_B = pool.shape[0] // q_t.shape[1]
        pick = torch.randperm(pool.shape[0], generator=gen, device=gen.device)[:global_B * n_ref]
        return rank_slice(pool[pick.to(pool.device)].unflatten(0, (global_B, n_ref)), B)  # (B, n_ref, out)

    return from_queue if ncfg["references"] == "queue" else from_batch


# -----------------------------------------------------------------------------
# optimizer and per-step schedules


def param_groups(student, cfg):
    """Four AdamW groups: backbone / head x decay / no decay (biases and 1-D parameters: norms, LayerScale)."""
    o = cfg["optim"]
    groups = []
    for part, lr in (("backbone", o["lr_backbone"]), ("head", o["lr_head"])):
        decay, no_decay = [], []
        for name, p in getattr(student, part).named_parameters():
            (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
        groups.append({"params": decay, "base_lr": lr, "apply_wd": True})
        groups.append({"params": no_decay, "base_lr": lr, "apply_wd": False, "weight_decay": 0.0})
    return groups


def cosine(start, end, step, total):
    """Cosine from start (step 0) to end (step total), per step."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step, total) / total))


def schedules(cfg, step, total):
    o = cfg["optim"]
    return {"lr_scale": cosine(1.0, 0.0, step, total),
            "wd": cosine(o["weight_decay"], o["weight_decay_end"], step, total),
            "momentum": cosine(o["momentum_teacher"], o["momentum_teacher_end"], step, total)}


# -----------------------------------------------------------------------------
# checkpoints: everything needed to continue bit for bit, written atomically


def rng_state(gen):
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": np_state_to_tensor(), "shared": gen.get_state()}


def np_state_to_tensor():
    # numpy's state tuple holds an ndarray: store plain types so the file loads with weights_only=True
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def set_rng_state(state, gen):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    s = state["numpy"]
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))
    gen.set_state(state["shared"])


def disk_error(e, path):
    """The OSError in e's chain (torch.save wraps it in a RuntimeError) as one line naming path; None if none."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    if e is None:
        return None
    if e.errno == errno.ENOSPC:
        return f"no space left on {path.parent} (writing {path.name}): free some space, then re-run to resume"
    return f"cannot write {path} ({e.strerror or e}): fix the folder or choose another out_dir, then re-run"


def write_atomic(path, write, commit=True):
    """write(f) into path.tmp and fsync it; with commit, rename it over path and fsync the folder, so that a kill
    or a power loss at any moment leaves the old file or the new one. On failure path.tmp is removed (a full disk
    stays usable) and an OSError becomes TrainingStopped with one line."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if commit:
            commit_atomic(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        message = disk_error(e, path) if isinstance(e, (OSError, RuntimeError)) else None
        if message:
            raise TrainingStopped(message) from None
        raise


def commit_atomic(path):
    """Rename path.tmp (written and fsynced by write_atomic) over path, then fsync the folder (the rename itself)."""
    try:
        os.replace(path.with_name(path.name + ".tmp"), path)
        folder = os.open(path.parent, os.O_RDONLY)
        os.fsync(folder)
        os.close(folder)
    except OSError as e:
        raise TrainingStopped(disk_error(e, path)) from None


def save_checkpoint(path, state, commit=True):
    """Atomic torch.save (write_atomic); without commit it stays in path.tmp until commit_atomic(path)."""
    write_atomic(path, lambda f: torch.save(state, f), commit)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint '{path}' cannot be read ({type(e).__name__}); move it away to start afresh")


# keys a resume may change (with their sub-keys): where and how fast the run goes, and the learning rates (the advice
# after a non-finite stop); every other key defines the run and must match the checkpoint's (config.yaml's header)
RESUME_MAY_CHANGE = ("out_dir", "eval", "model.weights", "data.num_workers", "data.augment_on_device",
                     "optim.lr_backbone", "optim.lr_head", "optim.clip_grad", "train")


def check_same_run(ckpt_cfg, cfg, path):
    """Refuse a resume whose run-defining settings differ: a changed batch size, seed or data set would otherwise
    recompute the schedule in the middle of the run."""
    old, new = dict(dotted_items(ckpt_cfg)), dict(dotted_items(cfg))
    show = lambda c, k: repr(c[k]) if k in c else "(not set)"
    changed = [f"{k} {show(old, k)} -> {show(new, k)}" for k in sorted(old.keys() | new.keys())
               if old.get(k, ()) != new.get(k, ()) and not any(k == p or k.startswith(p + ".")
                                                                for p in RESUME_MAY_CHANGE)]
    if changed:
        raise ConfigError(f"'{path}' holds a run with other settings ({', '.join(changed)}): re-run with its "
                          f"values, or start afresh with another out_dir (or move {path} away)")


def trim_log(log_path, step):
    """Keep the log lines of steps up to the checkpoint's (later ones are recomputed; no checkpoint: a fresh log)
    and drop lines that do not parse (cut off by a full disk or a power loss). Rewritten atomically."""
    def write(out):
        if log_path.is_file():
            with open(log_path, "rb") as f:
                for line in f:
                    try:
                        keep = json.loads(line)["step"] <= step
                    except (ValueError, KeyError, TypeError):
                        continue
                    if keep:
                        out.write(line.rstrip(b"\n") + b"\n")

    write_atomic(log_path, write)


def lock_out_dir(out_dir):
    """Create out_dir, check that files can be created in it, and hold an exclusive lock on out_dir/train.lock for
    the life of the run; the kernel releases it when the process ends, however it ends. Returns the lock file."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()  # what writing last.pt.tmp needs
        lock = open(out_dir / "train.lock", "a+")
    except OSError as e:
        raise ConfigError(f"out_dir '{out_dir}' is not writable ({e.strerror}): choose another out_dir")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ConfigError(f"out_dir '{out_dir}' is in use by {holder}: wait for it to end or choose another out_dir")
    except OSError as e:  # a file system without locks (some network mounts): run, but say so
        print(f"warning: cannot lock {lock.name} ({e.strerror}): nothing stops a second run on this out_dir",
              file=sys.stderr)
    lock.truncate(0)
    lock.write(f"train.py (pid {os.getpid()} on {socket.gethostname()})\n")
    lock.flush()
    return lock


# -----------------------------------------------------------------------------
# data: the batch order is a function of (seed, epoch) and each sample's crops of (seed, epoch, index), so a resumed
# run sees exactly the batches an uninterrupted one would


def epoch_batches(n_images, batch, epoch, seed, start, rank, world):
    """Index lists of this rank's share of each global batch of the epoch, from batch `start` on (drop last)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_images, generator=g).tolist()
    per_rank = batch // world
    return [order[b * batch + rank * per_rank: b * batch + (rank + 1) * per_rank]
            for b in range(start, n_images // batch)]


def make_loader(dataset, batches, cfg, device):
    workers = cfg["data"]["num_workers"]
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate_multicrop, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False, prefetch_factor=4 if workers else None,
        generator=torch.Generator(),  # its own generator: the loader never draws from the global RNG
        worker_init_fn=ignore_stop_signals)


def ignore_stop_signals(worker_id):
    """Ctrl-C and schedulers signal the whole process group: the loader workers leave SIGINT/SIGTERM to the main
    process, which saves and then ends them (a worker killed mid-step would abort the step with an error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# -----------------------------------------------------------------------------
# the loop


def setup_distributed():
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def make_optimizer(student, cfg):
    o = cfg["optim"]
    return torch.optim.AdamW(param_groups(student, cfg), lr=o["lr_backbone"], betas=tuple(o["betas"]),
                             weight_decay=o["weight_decay"], fused=cfg["train"]["fused_adamw"])


def speed_settings(student, teacher, cfg, compile_backend="inductor"):
    """The train.* switches that change speed and memory, not the method: attention kernel, activation
    checkpointing, torch.compile. Compiling block by block leaves the loop over blocks (and activation
    checkpointing around each block) as it is; the blocks compile once per crop size."""
    t = cfg["train"]
    student.backbone.grad_checkpointing = t["grad_checkpointing"]
    for net in (student, teacher):
        net.backbone.set_fused_attention(t["fused_attention"])
        if t["compile"]:
            for block in net.backbone.blocks:
                block.compile(backend=compile_backend)


def make_autocast(cfg, device):
    """bf16 autocast of the networks on CUDA (train.precision bf16); a no-op context otherwise."""
    return torch.autocast("cuda", dtype=torch.bfloat16,
                          enabled=device.type == "cuda" and cfg["train"]["precision"] == "bf16")


def pick_device(want, key="train.device"):
    """auto | cpu | cuda -> the torch.device (auto: cuda when a GPU is visible)."""
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"config key '{key}' is cuda but no GPU is visible (use auto or cpu)")
    return torch.device("cuda", torch.cuda.current_device())


def agreed_stop(signum, device):
    """The signal number any rank received (0: none), the same on every rank, so that all stop at the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return signum
    flag = torch.tensor([signum], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def train(cfg, demo=False):
    """The run, with out_dir locked (rank 0) and SIGINT/SIGTERM turned into a checkpoint and an Interrupted."""
    rank, world = setup_distributed()
    lock = lock_out_dir(Path(cfg["out_dir"])) if rank == 0 else None
    stop = {"signal": 0, "in_loop": False}

    def on_signal(signum, frame):
        stop["signal"] = stop["signal"] or signum
        if not stop["in_loop"]:  # nothing trained yet: stop at once
            raise Interrupted(signum, "before the first step (nothing new to save)")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run_training(cfg, demo, rank, world, stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if lock:
            lock.close()


def run_training(cfg, demo, rank, world, stop):
    is_main = rank == 0
    o, ncfg, d = cfg["optim"], cfg["neco"], cfg["data"]
    if o["batch_size"] % world:
        raise ConfigError(f"optim.batch_size {o['batch_size']} must be divisible by the {world} processes")
    device = pick_device(cfg["train"]["device"])
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    out_dir = Path(cfg["out_dir"])
    ckpt_path, log_path = out_dir / "last.pt", out_dir / "log.jsonl"
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    if ckpt:  # before the data and the model are loaded
        check_same_run(ckpt["config"], cfg, ckpt_path)

    if demo:  # the synthetic scenes of data.py, in data/synthetic/ (rewritten unless a previous call completed)
        make_synthetic_voc()
    transform = MultiCrop(d["global_size"], d["local_size"], tuple(d["global_scale"]), tuple(d["local_scale"]),
                          d["n_local"], d["min_overlap"], on_device=d["augment_on_device"])
    dataset = TrainImages(d["root"], transform, seed=cfg["seed"])
    iters_per_epoch = len(dataset) // o["batch_size"]
    if iters_per_epoch == 0:
        raise ConfigError(f"data.root '{d['root']}' has {len(dataset)} images, fewer than optim.batch_size "
                          f"{o['batch_size']}")
    total_steps = o["epochs"] * iters_per_epoch
    max_steps = cfg["train"]["max_steps"]
    stop_step = total_steps if max_steps is None else min(total_steps, max_steps)  # 0: save the start and stop

    try:
        student, teacher = build_models(cfg)
    except (ValueError, RuntimeError) as e:  # unknown arch, checkpoint keys that do not match the arch
        raise ConfigError(f"model: {e}")
    student.to(device).train()
    teacher.to(device).eval()
    use_cuda = device.type == "cuda"
    optimizer = make_optimizer(student, cfg)
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])  # queue and reference draws, same on all ranks
    queue = PatchQueue(ncfg["queue_size"], cfg["model"]["head_out"], device)

    step, skipped_images, bad_steps, bad_in_a_row, elapsed = 0, 0, 0, 0, 0.0
    if ckpt:
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, fresh in zip(optimizer.param_groups, param_groups(student, cfg)):
            group["base_lr"] = fresh["base_lr"]  # the learning rates may change on resume (RESUME_MAY_CHANGE)
        queue.load_state_dict(ckpt["queue"])
        set_rng_state(ckpt["rng"], gen)
        step, skipped_images, bad_steps = ckpt["step"], ckpt["skipped_images"], ckpt["bad_steps"]
        elapsed = ckpt["elapsed_s"]
        if is_main:
            print(f"resuming from {ckpt_path} at step {step}/{total_steps}")
    if is_main:
        trim_log(log_path, step)  # no checkpoint: a fresh log (a run that never saved left nothing to continue)
    kept_step, unverified = (step if ckpt else None), None  # the steps of last.pt and of last.pt.tmp
    del ckpt

    model = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if use_cuda else None)
    speed_settings(student, teacher, cfg)
    autocast = make_autocast(cfg, device)
    refs_for_pair = make_reference_sampler(ncfg, queue, gen, o["batch_size"] // world)

    def checkpoint(commit):
        """Write last.pt.tmp; with commit (the end, a signal) rename it to last.pt at once, otherwise flush_log does
        once a later step has had a finite loss with these weights: after lr 1e6 the first step's loss is finite
        and its update wrecks the (finite) weights, which must not become the last.pt the advice resumes from."""
        nonlocal kept_step, unverified
        if is_main:
            save_checkpoint(ckpt_path, {
                "student": student.state_dict(), "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(), "queue": queue.state_dict(), "rng": rng_state(gen),
                "step": step, "config": cfg, "skipped_images": skipped_images, "bad_steps": bad_steps,
                "elapsed_s": elapsed}, commit)
        kept_step, unverified = (step, None) if commit else (kept_step, step)

    # The step never waits for the GPU: losses and "was it finite" flags stay on the device and are read once per
    # train.log_every steps, when the log lines are written.
    pending = []  # (step, epoch, schedule values, loss tensor, finite tensor, unreadable files met by this rank)

    def flush_log():
        nonlocal bad_steps, bad_in_a_row, t_last, elapsed, kept_step, unverified, skipped_images
        if not pending:
            return
        values = torch.stack([torch.stack([p[3].float(), p[4].float()]) for p in pending]).tolist()
        unreadable = sum_over_ranks([p[5] for p in pending], device)
        now = time.time()
        img_per_s = len(pending) * o["batch_size"] / max(now - t_last, 1e-9)
        elapsed += now - t_last
        t_last = now
        verified = False
        try:
            for (s, epoch, sched, *_), (loss, finite), n_unreadable in zip(pending, values, unreadable):
                skipped_images += n_unreadable
                if finite:
                    bad_in_a_row = 0
                    losses.append(loss)
                    verified |= unverified is not None and s > unverified
                else:
                    bad_steps += 1
                    bad_in_a_row += 1
                if is_main:
                    log.write(json.dumps({
                        "step": s, "epoch": epoch, "loss": loss if finite else None,
                        "lr": o["lr_backbone"] * sched["lr_scale"], "lr_head": o["lr_head"] * sched["lr_scale"],
                        "wd": sched["wd"], "momentum": sched["momentum"], "img_per_s": round(img_per_s, 2),
                        "skipped_images": skipped_images, "bad_steps": bad_steps}) + "\n")
            if is_main:
                log.flush()
        except OSError as e:
            raise TrainingStopped(disk_error(e, log_path)) from None
        pending.clear()
        if verified:  # the weights of last.pt.tmp have given a finite loss: they become last.pt
            if is_main:
                os.fsync(log.fileno())
                commit_atomic(ckpt_path)
            kept_step, unverified = unverified, None
        if is_main:
            bar.set_postfix(loss=f"{losses[-1]:.4f}" if losses else "-",
                            lr=f"{o['lr_backbone'] * sched['lr_scale']:.2e}", img_s=f"{img_per_s:.1f}", refresh=False)
        if bad_in_a_row >= cfg["train"]["max_bad_steps"]:
            bar.close()
            if is_main:
                ckpt_path.with_name(ckpt_path.name + ".tmp").unlink(missing_ok=True)
            kept = (f"{ckpt_path} keeps step {kept_step}" if kept_step is not None else "no checkpoint was kept")
            raise TrainingStopped(f"{bad_in_a_row} steps in a row had a non-finite loss (step {step}); {kept}: "
                                  f"re-run with a lower optim.lr_backbone (and lr_head)")

    bar = tqdm(total=stop_step, initial=step, disable=not is_main, dynamic_ncols=True, desc="neco")
    log = open(log_path, "a") if is_main else None
    t_last, losses = time.time(), []
    t = cfg["train"]
    stop["in_loop"] = True  # from here on a signal ends the current step, then saves
    while step < stop_step:
        epoch, start = divmod(step, iters_per_epoch)
        dataset.set_epoch(epoch)
        batches = epoch_batches(len(dataset), o["batch_size"], epoch, cfg["seed"], start, rank, world)
        batches = batches[:stop_step - step]
        for crops, boxes, n_unreadable in make_loader(dataset, batches, cfg, device):
            if crops is None:  # READ_ATTEMPTS unreadable files in a row: the folder is gone or holds no images
                if world == 1:  # (under torchrun the other ranks wait in a collective: no checkpoint there)
                    flush_log()
                    checkpoint(commit=True)
                bar.close()
                raise ConfigError(f"data.root '{d['root']}': {READ_ATTEMPTS} image files in a row could not be "
                                  f"read (the warnings above name them); check the folder, then re-run")
            sched = schedules(cfg, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * sched["lr_scale"]
                if group["apply_wd"]:
                    group["weight_decay"] = sched["wd"]
            crops = [c.to(device, non_blocking=True) for c in crops]
            boxes = boxes.to(device, non_blocking=True)
            if d["augment_on_device"]:
                crops = augment_views(crops, gen, o["batch_size"] // world)
            loss, finite = train_step(model, student, teacher, optimizer, queue, gen, crops, boxes, refs_for_pair,
                                      cfg, autocast, sched["momentum"])
            step += 1
            pending.append((step, epoch, sched, loss, finite, n_unreadable))
            bar.update(1)
            # losses are read at log points, at checkpoints and one step after each (which verifies last.pt.tmp);
            # under torchrun the ranks agree on a signal there, every step in a single process
            at_log = step % t["log_every"] == 0 or step % t["ckpt_every"] <= 1 or step == stop_step
            signum = agreed_stop(stop["signal"], device) if (at_log or world == 1) and step < stop_step else 0
            if at_log or signum:
                flush_log()
            if step % t["ckpt_every"] == 0 or step == stop_step or signum:
                checkpoint(commit=step == stop_step or bool(signum))
            if signum:
                bar.close()
                raise Interrupted(signum, f"at step {step}; checkpoint saved to {ckpt_path}; re-run the same "
                                          f"command to resume")
    bar.close()
    if not ckpt_path.is_file():  # max_steps 0: the starting weights, e.g. as the baseline of an evaluation
        checkpoint(commit=True)
    if is_main:
        log.close()
        first = sum(losses[:5]) / max(len(losses[:5]), 1) if losses else float("nan")
        last = sum(losses[-5:]) / max(len(losses[-5:]), 1) if losses else float("nan")
        print(f"done: step {step}/{total_steps}, loss {first:.4f} -> {last:.4f} (first/last 5 steps of this "
              f"session), {elapsed / 60:.1f} min, {skipped_images} unreadable images replaced, {bad_steps} steps "
              f"skipped; checkpoint {ckpt_path}")
    if world > 1:
        dist.destroy_process_group()
    return step


def augment_views(crops, gen, per_rank):
    """uint8 crops of every view (B, 3, s, s) -> photometrically augmented, normalised float crops, on their device
    (data.augment_batch). The parameters are drawn for the full global batch (per_rank images per rank) from the
    shared generator and each rank keeps its slice, as with the references: N ranks augment their images as one
    process would."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    out = []
    for view in crops:
        params = photometric_params(per_rank * world, gen)
        out.append(augment_batch(view, {key: rank_slice(value, per_rank) for key, value in params.items()}))
    return out


def teacher_maps(teacher, queue, gen, crops, ncfg, autocast):
    """The teacher's maps of the 2 global crops; in queue mode this step's teacher patches are pushed before the
    references are drawn, as in the public code."""
    with torch.no_grad(), autocast:
        maps_t = teacher(crops[:2])  # 2 x (B, h, w, out): the teacher sees the global crops only
    if ncfg["references"] == "queue":
        for g in range(2):
            patches = all_gather_cat(maps_t[g].flatten(0, 2))  # (global_B * h * w, out)
            global_B = patches.shape[0] // (maps_t[g].shape[1] * maps_t[g].shape[2])
            queue.push(g, patches, 10 * global_B, gen)
    return maps_t


def all_ranks_finite(loss):
    """A device bool: the loss is finite on every rank (every rank skips together)."""
    finite = torch.isfinite(loss)
    if dist.is_available() and dist.is_initialized():
        flag = finite.float()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag > 0
    return finite


def update(student, teacher, optimizer, finite, momentum, clip_grad):
    """EMA of the teacher towards the student as it was before this step (the public code updates the teacher in
    its training step, which runs before the optimizer step), then the AdamW step of the student; both skipped when
    `finite` (a device bool) is False."""
    # teacher = m * teacher + (1 - m) * student, as teacher += w * (student - teacher) with w = 0 on a skipped step
    # (w stays on the device; three multi-tensor kernels)
    weight = (1.0 - momentum) * finite.float()
    t_params = list(teacher.parameters())
    delta = torch._foreach_sub([p.detach() for p in student.parameters()], t_params)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(t_params, delta)
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(student.parameters(), clip_grad, foreach=True)
    if optimizer.defaults.get("fused"):
        # the fused AdamW kernel skips its update on the device when found_inf is set (GradScaler's mechanism)
        optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()
        optimizer.step()
    elif finite.item():  # unfused optimizer: decide on the host
        optimizer.step()


def train_step(model, student, teacher, optimizer, queue, gen, crops, boxes, refs_for_pair, cfg, autocast,
               momentum):
    """One NeCo step. Returns (loss, finite) as device tensors; a non-finite loss leaves student, teacher and
    optimizer untouched (the step is skipped) without the host waiting for the device."""
    maps_t = teacher_maps(teacher, queue, gen, crops, cfg["neco"], autocast)
    with autocast:
        maps_s = model(crops)  # V x (B, h_v, w_v, out): the student sees every crop
    loss = neco_loss(maps_t, maps_s, boxes, refs_for_pair, cfg["neco"])
    finite = all_ranks_finite(loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    update(student, teacher, optimizer, finite, momentum, cfg["optim"]["clip_grad"])
    return loss.detach(), finite


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description="NeCo post-training of a DINOv2 backbone (resumes from <out_dir>/last.pt)")
    p.add_argument("--config", default="config.yaml", help="the YAML config (default: config.yaml)")
    p.add_argument("--set", nargs="+", action="append", metavar="KEY=VALUE",
                   help="override config keys, e.g. --set optim.epochs=1 data.root=/data/coco/images/train2017")
    p.add_argument("--demo", action="store_true",
                   help="offline demo: tiny backbone from random weights on synthetic scenes, CPU, ~3 minutes")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, flatten_sets(args.set), "demo" if args.demo else None)
        validate(cfg, demo=args.demo)
        train(cfg, demo=args.demo)
    except (ConfigError, FileNotFoundError, TrainingStopped) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"interrupted {e}", file=sys.stderr)
        return 128 + e.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
