"""
NeCo post-training: a student ViT learns to order patches by their similarity to reference patches the same way as
its EMA teacher does, through a differentiable sorting network. Re-running a command resumes from <out_dir>/last.pt.

    python train.py --config config.yaml                     # the paper's run (COCO train2017, ViT-S/14-reg)
    python train.py --config config.yaml --demo              # offline demo on synthetic scenes, CPU, ~1 minute
    torchrun --nproc_per_node=4 train.py --config config.yaml   # several GPUs (DistributedDataParallel)
"""
import argparse, contextlib, errno, fcntl, functools, json, math, os, signal, socket, sys, tempfile, time
from collections import namedtuple
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.profiler import record_function
from torchvision.ops import roi_align
from tqdm import tqdm

from data import (READ_ATTEMPTS, STOP_SIGNALS, MultiCrop, TrainImages, augment_batch, crop_intersection_rois,
                  epoch_batches, make_synthetic_voc, photometric_params, train_loader)
from model import BACKBONE_NAMES, build_student_teacher, patch_size_of, round_to_patch
from sort import diff_sort

# -----------------------------------------------------------------------------
# the NeCo loss: for each pair (g, v) of a global crop g and another crop v, the patches of the region both show are
# sorted by their similarity to reference patches; the student's soft ordering learns the teacher's
ROI_SAMPLING = -1  # roi_align's adaptive default, as the public run: ceil(bin side) samples per bin side

def pair_queries(maps_t, maps_s, boxes, g, v, roi_size):
    """RoI-align teacher crop g and student crop v over their intersection -> (B, roi_size^2, out) each, float32."""
    map_t, map_s = (m.float() if m.element_size() < 4 else m for m in (maps_t[g], maps_s[v]))
    roi_g, roi_v = crop_intersection_rois(boxes[:, g], boxes[:, v], map_t.shape[1], map_s.shape[1])
    batch_idx = torch.arange(boxes.shape[0], device=boxes.device, dtype=boxes.dtype)[:, None]
    queries = []
    for m, roi in ((map_t, roi_g), (map_s, roi_v)):
        rois = torch.cat([batch_idx, roi], 1).to(m.dtype)  # (B, 5): image index, x1, y1, x2, y2 in map cells
        q = roi_align(m.permute(0, 3, 1, 2), rois, roi_size, spatial_scale=1.0, sampling_ratio=ROI_SAMPLING,
                      aligned=True)  # (B, out, r, r)
        queries.append(q.flatten(2).transpose(1, 2))  # (B, r*r, out)
    return queries

def pair_similarities(maps_t, maps_s, boxes, refs_for_pair, ncfg):
    """maps_t: 2 teacher maps (B, h, w, out); maps_s: V student maps; boxes (B, V, 4) in image pixels -> (sim_s,
    sim_t), each (10*B*Q, n_ref): cosine similarities of the query patches of the 10 pairs to their references."""
    sims_s, sims_t = [], []
    for g, v in [(g, v) for g in range(2) for v in range(len(maps_s)) if v != g]:
        q_t, q_s = pair_queries(maps_t, maps_s, boxes, g, v, ncfg["roi_size"])  # (B, Q, out)
        refs = F.normalize(refs_for_pair(g, q_t).float(), dim=-1)  # (B, n_ref, out)
        sims_t.append(F.normalize(q_t, dim=-1) @ refs.transpose(1, 2))  # (B, Q, n_ref) cosine
        sims_s.append(F.normalize(q_s, dim=-1) @ refs.transpose(1, 2))
    return torch.cat(sims_s).flatten(0, 1), torch.cat(sims_t).flatten(0, 1)

def sort_cross_entropy(sim_s, sim_t, ncfg):
    """sim_*: (R, n) similarities of R queries to n references, sorted each with its own steepness -> cross-entropy
    of the student's relaxed permutation matrices against the teacher's, summed over ranks, averaged over the rest."""
    # check_finite=False: no host sync for a NaN check (a non-finite loss skips the step on the device)
    kw = dict(network=ncfg["sort_network"], distribution=ncfg["sort_distribution"],
              art_lambda=ncfg["sort_art_lambda"], check_finite=False)
    with torch.no_grad():
        _, P_t = diff_sort(sim_t, steepness=ncfg["teacher_steepness"], **kw)  # (R, n, n)
    _, P_s = diff_sort(sim_s, steepness=ncfg["student_steepness"], **kw)
    # P can hold exact zeros (logistic at high steepness underflows): the smallest normal float keeps log finite
    log_P_s = torch.log(P_s.clamp_min(torch.finfo(P_s.dtype).tiny))
    return -(P_t * log_P_s).sum(-1).mean()

def neco_loss(maps_t, maps_s, boxes, refs_for_pair, ncfg):
    """The mean over the 10 (g, v) pairs of the sort cross-entropy (one sort call: every pair has B*Q rows)."""
    return sort_cross_entropy(*pair_similarities(maps_t, maps_s, boxes, refs_for_pair, ncfg), ncfg)

# -----------------------------------------------------------------------------
# reference patches: a FIFO queue of teacher patches per global crop, or the batch itself. Every rank draws for the
# global batch from the shared generator and keeps its slice: N ranks reproduce the single-process step
class PatchQueue:
    """queue[g] holds the latest teacher head embeddings of global crop g (FIFO). Only filled rows are sampled."""

    def __init__(self, size, dim, device):
        self.feats = torch.zeros(2, size, dim, device=device)
        self.ptr, self.filled = [0, 0], [0, 0]

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
        """(rows, n, dim): n distinct filled rows per image, over the whole draw too if the queue holds enough."""
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

def world_size():  # the number of processes (torchrun)
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

def all_gather_cat(x):  # concatenated over the ranks, in rank order
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)

def rank_slice(x, B):  # this rank's B rows of a tensor drawn for the whole batch
    start = dist.get_rank() * B if world_size() > 1 else 0
    return x[start:start + B]

def make_reference_sampler(ncfg, queue, gen, B):
    """refs_for_pair(g, q_t) -> (B, num_references, out): this rank's references for global crop g."""
    n_ref, global_B = ncfg["num_references"], B * world_size()

    def refs_for_pair(g, q_t):
        if ncfg["references"] == "queue":
            return rank_slice(queue.sample(g, global_B, n_ref, gen), B)
        pool = all_gather_cat(q_t.detach()).flatten(0, 1)  # (global_B * Q, out): mostly other images' patches
        pick = torch.randperm(pool.shape[0], generator=gen, device=gen.device)[:global_B * n_ref]
        return rank_slice(pool[pick.to(pool.device)].unflatten(0, (global_B, n_ref)), B)
    return refs_for_pair

# -----------------------------------------------------------------------------
# the networks: student and teacher start from the same backbone weights, each with a projection head on every patch
# token (model.NeCoModel); the teacher's head is its own draw as in the public run (or a copy), it gets no gradients
def build_models(cfg):  # -> (student, teacher); the model section's keys are build_student_teacher's arguments
    return build_student_teacher(**cfg["model"])

# -----------------------------------------------------------------------------
# the training step. It never waits for the GPU: the loss and its "finite" flag stay on the device, and a
# non-finite step is skipped there. The phases are named for the profiler (python bench.py train)
def augment_views(crops, gen, per_rank):
    """uint8 crops (B, 3, s, s) per view -> augmented float crops, the parameters drawn for the global batch."""
    with record_function("augment"):
        return [augment_batch(view, {key: rank_slice(value, per_rank)  # each view its own draw
                                     for key, value in photometric_params(per_rank * world_size(), gen).items()})
                for view in crops]

def train_step(model, student, teacher, optimizer, queue, gen, crops, boxes, refs_for_pair, cfg, autocast, momentum):
    """One NeCo step on crops (2 global + local views) and boxes (B, V, 4); model: the student or its DDP wrapper.
    -> (loss, finite) on the device; a loss not finite on every rank leaves everything untouched."""
    with record_function("teacher"), torch.no_grad(), autocast:
        maps_t = teacher(crops[:2])  # 2 x (B, h, w, out): the teacher sees the global crops only
        if cfg["neco"]["references"] == "queue":  # this step's patches go in before the draw, as the public code
            for g, (_, h, w, _) in enumerate(m.shape for m in maps_t):
                patches = all_gather_cat(maps_t[g].flatten(0, 2))  # (global_B * h * w, out)
                queue.push(g, patches, 10 * (patches.shape[0] // (h * w)), gen)  # 10 x global_B rows
    with record_function("student"), autocast:
        maps_s = model(crops)  # V x (B, h_v, w_v, out): the student sees every crop
    with record_function("loss"):
        loss = neco_loss(maps_t, maps_s, boxes, refs_for_pair, cfg["neco"])
        finite = torch.isfinite(loss).float()
        if world_size() > 1:  # every rank skips together
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        finite = finite > 0
    with record_function("backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with record_function("update"):
        # EMA towards the student as it was before this step (the public code updates its teacher before the
        # optimizer step): teacher += w * (student - teacher), w = 1 - m, or 0 on a skipped step (on the device)
        t_params = list(teacher.parameters())
        delta = torch._foreach_sub([p.detach() for p in student.parameters()], t_params)
        torch._foreach_mul_(delta, (1.0 - momentum) * finite.float())
        torch._foreach_add_(t_params, delta)
        if cfg["optim"]["clip_grad"] > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg["optim"]["clip_grad"], foreach=True)
        if optimizer.defaults.get("fused"):
            # the fused AdamW kernel skips its update on the device when found_inf is set (GradScaler's mechanism)
            optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()
            optimizer.step()
        elif finite.item():  # unfused optimizer: decide on the host
            optimizer.step()
    return loss.detach(), finite

# -----------------------------------------------------------------------------
# optimizer and per-step schedules
def param_groups(student, cfg):
    """Four AdamW groups: backbone / head x decay / no decay (biases and 1-D parameters: norms, LayerScale)."""
    groups = []
    for part, lr in (("backbone", cfg["optim"]["lr_backbone"]), ("head", cfg["optim"]["lr_head"])):
        decay, no_decay = [], []
        for name, p in getattr(student, part).named_parameters():
            (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
        groups.append({"params": decay, "base_lr": lr, "apply_wd": True})
        groups.append({"params": no_decay, "base_lr": lr, "apply_wd": False, "weight_decay": 0.0})
    return groups

def make_optimizer(student, cfg):
    o = cfg["optim"]
    return torch.optim.AdamW(param_groups(student, cfg), lr=o["lr_backbone"], betas=tuple(o["betas"]),
                             weight_decay=o["weight_decay"], fused=cfg["train"]["fused_adamw"])

def schedules(cfg, step, total):
    """The lr scale, weight decay and teacher momentum of this step: cosine per step from start to end value."""
    o, c = cfg["optim"], 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # 1 at step 0, 0 at total
    return {"lr_scale": c, "wd": o["weight_decay_end"] + c * (o["weight_decay"] - o["weight_decay_end"]),
            "momentum": o["momentum_teacher_end"] + c * (o["momentum_teacher"] - o["momentum_teacher_end"])}

def set_schedule(optimizer, cfg, step, total):  # this step's learning rates and weight decays -> schedules()
    sched = schedules(cfg, step, total)
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = group["base_lr"] * sched["lr_scale"], sched["wd"] * group["apply_wd"]
    return sched

# -----------------------------------------------------------------------------
# checkpoints: all that continues a run bit for bit (torch's generators: nothing draws from Python's or numpy's)
class TrainingStopped(RuntimeError):
    """The run cannot go on (too many bad steps in a row, a file that cannot be written): reported as one line."""

def disk_error(e, path):
    """The OSError in e's chain (torch.save wraps it) as a one-line TrainingStopped naming path; None if none."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    if e is not None:
        problem = (f"no space left on {path.parent} (writing {path.name}): free some space" if e.errno == errno.ENOSPC
                   else f"cannot write {path} ({e.strerror or e}): fix the folder or choose another out_dir")
        return TrainingStopped(problem + ", then re-run to resume")

def write_atomic(path, write, commit=True):
    """write(f) into path.tmp and fsync; commit renames it over path: a kill leaves the old file or the new one."""
    tmp = Path(f"{path}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if commit:
            commit_atomic(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a full disk stays usable
        raise disk_error(e, path) or e  # a disk error as one line, anything else as it is

def commit_atomic(path):  # rename path.tmp over path, then fsync the folder, which holds the rename
    try:
        os.replace(f"{path}.tmp", path)
        folder = os.open(path.parent, os.O_RDONLY)
        os.fsync(folder)
        os.close(folder)
    except OSError as e:
        raise disk_error(e, path) from None

# keys a resume may change (with their sub-keys): where and how fast the run goes, and the learning rates (the advice
# after a non-finite stop); every other key defines the run and must match the checkpoint's (config.yaml's header)
RESUME_MAY_CHANGE = ("out_dir", "eval", "model.weights", "data.num_workers", "data.augment_on_device",
                     "optim.lr_backbone", "optim.lr_head", "optim.clip_grad", "train")

def check_same_run(ckpt_cfg, cfg, path):
    """Refuse a resume whose run-defining settings differ (a changed batch size would recompute the schedule)."""
    old, new, free = dict(dotted_items(ckpt_cfg)), dict(dotted_items(cfg)), tuple(k + "." for k in RESUME_MAY_CHANGE)
    show = lambda c, k: repr(c[k]) if k in c else "(not set)"
    changed = [f"{k} {show(old, k)} -> {show(new, k)}" for k in sorted(old.keys() | new.keys())
               if old.get(k, ()) != new.get(k, ()) and not f"{k}.".startswith(free)]
    if changed:
        raise ConfigError(f"'{path}' holds a run with other settings ({', '.join(changed)}): re-run with its "
                          f"values, or start afresh with another out_dir (or move {path} away)")

def trim_log(log_path, step):
    """Keep the log lines up to step, drop those that do not parse (cut off by a full disk or a power loss)."""
    def keep(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False
    lines = log_path.read_bytes().split(b"\n") if log_path.is_file() else []
    write_atomic(log_path, lambda f: f.write(b"".join(line + b"\n" for line in lines if keep(line))))

def lock_out_dir(out_dir):
    """Create out_dir, check that files can be created in it, lock out_dir/train.lock while the process lives."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()  # what writing last.pt.tmp needs
        lock = open(out_dir / "train.lock", "a+")
    except OSError as e:
        raise ConfigError(f"out_dir '{out_dir}' is not writable ({e.strerror}): choose another out_dir")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel releases it however the process ends
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ConfigError(f"out_dir '{out_dir}' is in use by {holder}: wait for it to end or choose another out_dir")
    except OSError as e:  # a file system without locks (some network mounts): run, but say so
        print(f"warning: cannot lock {lock.name} ({e.strerror}): nothing stops a second run here", file=sys.stderr)
    lock.truncate(0)
    print(f"train.py (pid {os.getpid()} on {socket.gethostname()})", file=lock, flush=True)
    return lock

# -----------------------------------------------------------------------------
# the loop. Batches and crops are functions of (seed, epoch, index): a resumed run sees those of an uninterrupted one
class Interrupted(BaseException):
    """SIGINT or SIGTERM; a BaseException (as KeyboardInterrupt), so that no `except Exception` swallows it."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum

def on_signal(stop, signum, frame):  # before the loop stop at once; in it the current step ends, then the run saves
    stop["signum"] = stop["signum"] or signum
    if not stop["in_loop"]:
        raise Interrupted(signum, "before the first step (nothing new to save)")

def over_ranks(values, device, op="SUM"):  # this rank's host ints -> their elementwise SUM (or MAX) over the ranks
    if world_size() == 1:
        return values
    total = torch.tensor(values, device=device)
    dist.all_reduce(total, op=getattr(dist.ReduceOp, op))
    return total.tolist()

def speed_settings(student, teacher, cfg, compile_backend="inductor"):
    """The train.* switches of speed and memory; compiling block by block keeps activation checkpointing as it is."""
    t = cfg["train"]
    student.backbone.grad_checkpointing = t["grad_checkpointing"]
    for net in (student, teacher):
        net.backbone.set_fused_attention(t["fused_attention"])
        if t["compile"]:
            for block in net.backbone.blocks:
                block.compile(backend=compile_backend)

def make_autocast(cfg, device):  # bf16 autocast of the networks on CUDA (train.precision bf16), else a no-op
    return torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda" and cfg["train"]["precision"] == "bf16")

Pending = namedtuple("Pending", "step epoch sched loss finite n_unreadable")  # loss, finite: read at the next log
COUNTERS = ("step", "skipped_images", "bad_steps", "elapsed_s")  # the counters a checkpoint holds

class Run:
    """What the loop shares: data, models, optimizer, queue, files and counters, from <out_dir>/last.pt if any."""

    def __init__(self, cfg, demo, rank, world):
        o, d, max_steps = cfg["optim"], cfg["data"], cfg["train"]["max_steps"]
        if o["batch_size"] % world:
            raise ConfigError(f"optim.batch_size {o['batch_size']} must be divisible by the {world} processes")
        self.cfg, self.device, self.is_main = cfg, pick_device(cfg["train"]["device"]), rank == 0
        self.ckpt_path, self.log_path, ckpt = Path(cfg["out_dir"]) / "last.pt", Path(cfg["out_dir"]) / "log.jsonl", None
        torch.manual_seed(cfg["seed"])
        if self.ckpt_path.is_file():  # checked before anything is loaded
            try:
                ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ConfigError(f"checkpoint '{self.ckpt_path}' cannot be read ({type(e).__name__}): move it away")
            check_same_run(ckpt["config"], cfg, self.ckpt_path)
        if demo:  # the synthetic scenes of data.py, in data/synthetic/ (rewritten unless a previous call completed)
            make_synthetic_voc()
        self.dataset = TrainImages(d["root"], MultiCrop(
            d["global_size"], d["local_size"], tuple(d["global_scale"]), tuple(d["local_scale"]), d["n_local"],
            d["min_overlap"], on_device=d["augment_on_device"]), seed=cfg["seed"])
        if len(self.dataset) < o["batch_size"]:
            raise ConfigError(f"data.root '{d['root']}' has {len(self.dataset)} images, fewer than optim.batch_size")
        self.total_steps = o["epochs"] * (len(self.dataset) // o["batch_size"])  # the schedules span them
        self.stop_step = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        try:
            student, teacher = build_models(cfg)
        except (ValueError, RuntimeError) as e:  # checkpoint keys that do not match the arch
            raise ConfigError(f"model: {e}")
        self.student, self.teacher = student.to(self.device).train(), teacher.to(self.device).eval()
        self.optimizer = make_optimizer(student, cfg)
        self.queue = PatchQueue(cfg["neco"]["queue_size"], cfg["model"]["head_out"], self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg["seed"])  # the same draws on every rank
        self.step = self.skipped_images = self.bad_steps = self.bad_in_a_row = 0
        self.elapsed_s, self.t_last, self.log, self.bar = 0.0, time.time(), None, None
        self.kept_step = self.unverified = None  # the steps of last.pt and last.pt.tmp (None: no such file)
        self.losses, self.pending = [], []  # the finite losses of this process; Pending steps
        if ckpt:  # continue where save left off, with the learning rates of the config (a resume may change them)
            for name in ("student", "teacher", "optimizer", "queue"):
                getattr(self, name).load_state_dict(ckpt[name])
            for group, fresh in zip(self.optimizer.param_groups, param_groups(self.student, cfg)):
                group["base_lr"] = fresh["base_lr"]
            torch.set_rng_state(ckpt["rng"]["torch"])
            if torch.cuda.is_available() and ckpt["rng"]["cuda"]:
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
            self.gen.set_state(ckpt["rng"]["shared"])
            for key in COUNTERS:
                setattr(self, key, ckpt[key])
            self.kept_step = self.step
            if self.is_main:
                print(f"resuming from {self.ckpt_path} at step {self.step}/{self.total_steps}")
        if self.is_main:
            trim_log(self.log_path, self.step)  # no checkpoint: a fresh log (a run that never saved left nothing)

    def save(self, commit):
        """Write last.pt.tmp; with commit (the end, a signal) it becomes last.pt at once, else once a later step had
        a finite loss (flush_log): after lr 1e6 a finite step can wreck the weights, which must not become last.pt."""
        if self.is_main:
            state = {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(), "config": self.cfg,
                     "optimizer": self.optimizer.state_dict(), "queue": self.queue.state_dict(),
                     "rng": {"torch": torch.get_rng_state(), "shared": self.gen.get_state(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                     **{key: getattr(self, key) for key in COUNTERS}}
            write_atomic(self.ckpt_path, lambda f: torch.save(state, f), commit)
        self.kept_step, self.unverified = (self.step, None) if commit else (self.kept_step, self.step)

    def flush_log(self):
        """Read the pending losses (one transfer), write their log lines, count unreadable images and non-finite
        steps, commit last.pt.tmp once a later step was finite; stop after train.max_bad_steps in a row."""
        if not self.pending:
            return
        o, now, verified = self.cfg["optim"], time.time(), False
        values = torch.stack([torch.stack([p.loss.float(), p.finite.float()]) for p in self.pending]).tolist()
        unreadable = over_ranks([p.n_unreadable for p in self.pending], self.device)
        img_per_s = len(self.pending) * o["batch_size"] / max(now - self.t_last, 1e-9)
        self.elapsed_s, self.t_last = self.elapsed_s + now - self.t_last, now
        try:
            for p, (loss, finite), n_unreadable in zip(self.pending, values, unreadable):
                self.skipped_images, self.bad_steps = self.skipped_images + n_unreadable, self.bad_steps + (not finite)
                self.bad_in_a_row = 0 if finite else self.bad_in_a_row + 1
                if finite:
                    self.losses.append(loss)
                    verified |= self.unverified is not None and p.step > self.unverified
                if self.is_main:
                    self.log.write(json.dumps({"step": p.step, "epoch": p.epoch, "loss": loss if finite else None,
                        "lr": o["lr_backbone"] * p.sched["lr_scale"], "lr_head": o["lr_head"] * p.sched["lr_scale"],
                        "wd": p.sched["wd"], "momentum": p.sched["momentum"], "img_per_s": round(img_per_s, 2),
                        "skipped_images": self.skipped_images, "bad_steps": self.bad_steps}) + "\n")
            if self.is_main:
                self.log.flush()
                if verified:  # the log reaches the disk before the checkpoint it leads up to
                    os.fsync(self.log.fileno())
        except OSError as e:
            raise disk_error(e, self.log_path) from None
        if verified:  # the weights of last.pt.tmp have given a finite loss: they become last.pt
            if self.is_main:
                commit_atomic(self.ckpt_path)
            self.kept_step, self.unverified = self.unverified, None
        lr = o["lr_backbone"] * self.pending[-1].sched["lr_scale"]
        self.pending.clear()
        self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}" if self.losses else "-", lr=f"{lr:.2e}",
                             img_s=f"{img_per_s:.1f}", refresh=False)
        if self.bad_in_a_row >= self.cfg["train"]["max_bad_steps"]:
            if self.is_main:
                Path(f"{self.ckpt_path}.tmp").unlink(missing_ok=True)
            kept = ("no checkpoint was kept" if self.kept_step is None
                    else f"{self.ckpt_path} keeps step {self.kept_step}")
            raise TrainingStopped(f"{self.bad_in_a_row} steps in a row had a non-finite loss (step {self.step}); "
                                  f"{kept}: re-run with a lower optim.lr_backbone (and lr_head)")

def train(cfg, demo=False):
    """The whole run -> the last step. SIGINT/SIGTERM end the current step, save and raise Interrupted."""
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets WORLD_SIZE, RANK and LOCAL_RANK
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        rank = dist.get_rank()
    lock = lock_out_dir(Path(cfg["out_dir"])) if rank == 0 else None
    stop, run = {"signum": 0, "in_loop": False}, None
    previous = {s: signal.signal(s, functools.partial(on_signal, stop)) for s in STOP_SIGNALS}
    try:
        run = Run(cfg, demo, rank, world)
        o, t, per_rank = cfg["optim"], cfg["train"], cfg["optim"]["batch_size"] // world
        model = run.student if world == 1 else nn.parallel.DistributedDataParallel(
            run.student, device_ids=[run.device.index] if run.device.type == "cuda" else None)
        speed_settings(run.student, run.teacher, cfg)
        autocast = make_autocast(cfg, run.device)
        refs_for_pair = make_reference_sampler(cfg["neco"], run.queue, run.gen, per_rank)
        run.bar = tqdm(total=run.stop_step, initial=run.step, disable=not run.is_main, dynamic_ncols=True, desc="neco")
        run.log, run.t_last = open(run.log_path, "a") if run.is_main else None, time.time()
        stop["in_loop"] = True  # from here on a signal ends the current step, then saves
        while run.step < run.stop_step:
            epoch, start = divmod(run.step, len(run.dataset) // o["batch_size"])
            run.dataset.set_epoch(epoch)
            batches = epoch_batches(len(run.dataset), o["batch_size"], epoch, cfg["seed"], start, rank, world)
            for crops, boxes, n_unreadable in train_loader(run.dataset, batches[:run.stop_step - run.step],
                                                           cfg["data"]["num_workers"], run.device.type == "cuda"):
                if crops is None:  # READ_ATTEMPTS unreadable files in a row: the folder is gone or holds no images
                    if world == 1:  # (under torchrun the other ranks wait in a collective: no checkpoint there)
                        run.flush_log()
                        run.save(commit=True)
                    raise ConfigError(f"data.root '{cfg['data']['root']}': {READ_ATTEMPTS} image files in a row could "
                                      f"not be read (the warnings above name them); check the folder, then re-run")
                sched = set_schedule(run.optimizer, cfg, run.step, run.total_steps)
                crops = [c.to(run.device, non_blocking=True) for c in crops]
                if cfg["data"]["augment_on_device"]:
                    crops = augment_views(crops, run.gen, per_rank)
                loss, finite = train_step(model, run.student, run.teacher, run.optimizer, run.queue, run.gen, crops,
                                          boxes.to(run.device, non_blocking=True), refs_for_pair, cfg, autocast,
                                          sched["momentum"])
                run.step += 1
                run.pending.append(Pending(run.step, epoch, sched, loss, finite, n_unreadable))
                run.bar.update(1)
                # losses are read at log points, at checkpoints and one step after each (which verifies
                # last.pt.tmp); under torchrun the ranks agree on a signal there, every step in a single process
                at_log = run.step % t["log_every"] == 0 or run.step % t["ckpt_every"] <= 1 or run.step == run.stop_step
                agree = (at_log or world == 1) and run.step < run.stop_step
                signum = over_ranks([stop["signum"]], run.device, "MAX")[0] if agree else 0
                if at_log or signum:
                    run.flush_log()
                if run.step % t["ckpt_every"] == 0 or run.step == run.stop_step or signum:
                    run.save(commit=run.step == run.stop_step or bool(signum))
                if signum:
                    raise Interrupted(signum, f"at step {run.step}; checkpoint saved to {run.ckpt_path}; re-run the "
                                              f"same command to resume")
        if not run.ckpt_path.is_file():  # max_steps 0: the starting weights, e.g. as the baseline of an evaluation
            run.save(commit=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for f in ([run.bar, run.log] if run else []) + [lock]:
            if f is not None:
                f.close()
    if run.is_main:
        head, tail = run.losses[:5], run.losses[-5:]
        ran = (f"loss {sum(head) / len(head):.4f} -> {sum(tail) / len(tail):.4f} (first/last 5 steps of this process)"
               if head else "no step to run")
        print(f"done: step {run.step}/{run.total_steps}, {ran}, {run.elapsed_s / 60:.1f} min, {run.skipped_images} "
              f"unreadable images replaced, {run.bad_steps} steps skipped; checkpoint {run.ckpt_path}")
    if world > 1:
        dist.destroy_process_group()
    return run.step

# -----------------------------------------------------------------------------
# config: one YAML file, any key overridable with --set section.key=value, checked by a table of rules (evaluate.py
# uses load_config, check_rules with its own table, and pick_device too; bench.py load_config and pick_device)
class ConfigError(ValueError):
    """A mistake in the config or on the command line: reported as one line, no traceback."""

def parse_set(pair):
    """'a.b=value' -> ('a.b', value), the value read as YAML (and 1e-5, a string to YAML 1.1, as the number)."""
    key, is_pair, value = pair.partition("=")
    if not is_pair:
        raise ConfigError(f"--set expects key=value, got '{pair}'")
    with contextlib.suppress(yaml.YAMLError, ValueError):  # not YAML, not a number: the text as it is
        value = yaml.safe_load(value) if value.strip() else None
        value = float(value) if isinstance(value, str) else value
    return key.strip(), value

def set_key(cfg, dotted, value):
    """cfg['a']['b'] = value for dotted 'a.b', refusing keys the config does not have and whole sections."""
    *parents, last = dotted.split(".")
    node = cfg
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        raise ConfigError(f"unknown config key '{dotted}'")
    if isinstance(node[last], dict):
        raise ConfigError(f"config key '{dotted}' is a section: set one of its keys, e.g. "
                          f"{dotted}.{next(iter(node[last]), '...')}=...")
    node[last] = value

def dotted_items(tree, prefix=""):  # {'a': {'b': 1}} -> ('a.b', 1): a nested section as --set pairs
    for k, v in tree.items():
        yield from dotted_items(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

def load_config(path, sets=(), demo_section=None):
    """The YAML config without its override sections "demo" and "eval.demo", then demo_section's and the --set pairs."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        cfg = yaml.safe_load(raw.decode("utf-8"))
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
    evals = cfg.get("eval") if isinstance(cfg.get("eval"), dict) else {}
    overrides = {"demo": cfg.pop("demo", None), "eval.demo": evals.pop("demo", None)}
    demo = dotted_items(overrides[demo_section] or {}, demo_section.removesuffix("demo")) if demo_section else []
    for key, value in [*demo, *map(parse_set, sets)]:  # "eval.demo" sets eval.* keys
        set_key(cfg, key, value)
    return cfg

def rule(what, ok, optional=False):  # (what a value must be, its check); optional: null as well
    return (what + " or null", lambda v: v is None or ok(v)) if optional else (what, ok)

def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

def is_num(v):
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)

def one_of(*options):
    return "one of " + ", ".join(options), lambda v: v in options

def each(section, keys, check):  # one rule for several keys of a section
    return {f"{section}.{key}": check for key in keys.split()}

COUNT = rule("an integer >= 0", lambda v: is_int(v) and v >= 0)
POSITIVE_INT = rule("an integer >= 1", lambda v: is_int(v) and v >= 1)
PATCHES = rule("a size in pixels >= 8", lambda v: is_int(v) and v >= 8)  # then snapped to the patch
POSITIVE = rule("a number > 0", lambda v: is_num(v) and v > 0)
NON_NEGATIVE = rule("a number >= 0", lambda v: is_num(v) and v >= 0)
FRACTION = rule("a number in [0, 1]", lambda v: is_num(v) and 0 <= v <= 1)
BELOW_ONE = rule("a number in [0, 1)", lambda v: is_num(v) and 0 <= v < 1)
HALF = rule("a number in [0, 0.5)", lambda v: is_num(v) and 0 <= v < 0.5)  # the second global crop needs twice it
BELOW_ONE_PAIR = rule("two numbers in [0, 1)", lambda v: isinstance(v, list) and len(v) == 2
                      and all(map(BELOW_ONE[1], v)))
SCALE = rule("[lo, hi] with 0 < lo <= hi <= 1", lambda v: isinstance(v, list) and len(v) == 2
             and all(is_num(x) and 0 < x <= 1 for x in v) and v[0] <= v[1])
SHARE = rule("a number in (0, 1]", lambda v: is_num(v) and 0 < v <= 1)
FLAG = rule("true or false", lambda v: isinstance(v, bool))
TEXT = rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
DEVICE, POS_EMBED = one_of("auto", "cpu", "cuda"), one_of("dinov2", "neco")
SORT = ("a value diff_sort takes", lambda v: True)  # checked by diff_sort itself, in validate

# key -> (what its value must be, the check): every key train.py reads (evaluate.py's eval.*: its EVAL_RULES)
CONFIG_RULES = {
    "out_dir": TEXT, "seed": COUNT, "model.arch": one_of(*BACKBONE_NAMES), "model.weights": rule(*TEXT, optional=True),
    "model.num_register_tokens": COUNT, "model.drop_path_rate": BELOW_ONE, "model.pos_embed_rule": POS_EMBED,
    "model.teacher_head": one_of("random", "copy"), **each("model", "head_hidden head_out head_layers", POSITIVE_INT),
    "data.root": TEXT, **each("data", "global_size local_size", PATCHES), "data.min_overlap": HALF,
    **each("data", "global_scale local_scale", SCALE), **each("data", "n_local num_workers", COUNT),
    "data.augment_on_device": FLAG, "neco.references": one_of("queue", "batch"),
    **each("neco", "roi_size queue_size num_references", POSITIVE_INT), "optim.betas": BELOW_ONE_PAIR,
    **each("neco", "sort_network sort_distribution sort_art_lambda student_steepness teacher_steepness", SORT),
    **each("optim", "epochs batch_size", POSITIVE_INT), **each("optim", "lr_backbone lr_head", POSITIVE),
    **each("optim", "weight_decay weight_decay_end clip_grad", NON_NEGATIVE),
    **each("optim", "momentum_teacher momentum_teacher_end", FRACTION),
    "train.device": DEVICE, "train.precision": one_of("bf16", "fp32"), "train.max_steps": rule(*COUNT, optional=True),
    **each("train", "ckpt_every log_every max_bad_steps", POSITIVE_INT),
    **each("train", "compile fused_attention fused_adamw grad_checkpointing", FLAG),
}

def check_rules(cfg, rules, owned):
    """Each key of rules is in cfg and holds what its rule asks; each key of cfg that owned(key) claims has a rule."""
    for key in (k for k, _ in dotted_items(cfg) if owned(k) and k not in rules):  # a misspelt key would be ignored
        raise ConfigError(f"config key '{key}' is unknown: compare the config file with the repository's config.yaml")
    for key, (what, ok) in rules.items():
        value, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(value, dict) or part not in value:
                raise ConfigError(f"config key '{key}' is missing (no '{'.'.join(parts[:i + 1])}' in the config file; "
                                  f"compare it with the repository's config.yaml)")
            value = value[part]
        if not ok(value):
            raise ConfigError(f"config key '{key}' must be {what}, got {'nothing' if value is None else repr(value)}")

def validate(cfg, demo=False):
    """Fail in the first second, not after minutes of loading: the rules, then what one key alone cannot say."""
    check_rules(cfg, CONFIG_RULES, owned=lambda key: not key.startswith("eval."))
    m, d, n = cfg["model"], cfg["data"], cfg["neco"]
    pick_device(cfg["train"]["device"], "train.device")
    p = patch_size_of(m["arch"])  # the crops snap to whole patches: 518/98 px are 37x37/7x7 at /14, 32x32/6x6 at /16
    d["global_size"], d["local_size"] = round_to_patch(d["global_size"], p), round_to_patch(d["local_size"], p)
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
    if not Path(d["root"]).is_dir() and not demo:
        raise ConfigError(f"data.root '{d['root']}' is not a folder: point it at COCO train2017 (or any folder of "
                          f"images), e.g. --set data.root=/data/coco/images/train2017, or run with --demo")
    if m["weights"] not in (None, "hub") and not Path(m["weights"]).is_file():
        raise ConfigError(f"model.weights '{m['weights']}' is not a file: give a backbone state_dict file, 'hub' for "
                          f"the official checkpoint, or null for random initialisation")

def pick_device(want, key="train.device"):
    """auto | cpu | cuda -> the torch.device (auto: cuda when a GPU is visible); key names the setting in errors."""
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key if key.startswith('--') else f'config key {key!r}'} is cuda but no GPU is visible "
                          f"(use auto or cpu)")
    return torch.device("cuda", torch.cuda.current_device())

# -----------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description="NeCo post-training of a DINOv2 backbone (resumes from <out_dir>/last.pt)")
    p.add_argument("--config", default="config.yaml", help="the YAML config (default: config.yaml)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set optim.epochs=1 data.root=/data/coco/images/train2017")
    p.add_argument("--demo", action="store_true", help="offline demo: a tiny backbone on synthetic scenes, CPU, ~1 min")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set, "demo" if args.demo else None)
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
