"""
Benchmarks, one subcommand per part of the project; each prints one JSON line per measurement and a markdown
table at the end.

    python bench.py train [--arch dinov2_vits14_reg] [--batch 64] [--device auto]   # the training step
    python bench.py sort [--n 49 16 64 128] [--threads 1 0] [--hogs 2] [--rounds 3]  # diff_sort vs diffsort
    python bench.py incontext [--memory 10240000] [--images 1449]                   # the in-context search
    python bench.py scaling                                # sort cost against n and rows, search against memory
    python bench.py augment                                # photometric augmentation: loader (CPU) or device

train: train.train_step on synthetic crops of the real sizes (no dataset): images/s, ms per step, peak memory and
the step's phases (train.py's record_function ranges under torch.profiler: CPU time, and GPU time on CUDA), for the
fast path (augmentation on the device, bf16 autocast on CUDA, SDPA attention, fused AdamW, no host sync) and the
faithful fp32 path (explicit attention, torch's default AdamW, augmentation in the loader, outside the step). CUDA:
the paper's shape (ViT-S/14-reg, batch 64, 2 x 518 + 4 x 98 px); the CPU a small one (batch 4, 2 x 224 px).

sort: forward+backward time and peak memory of sort.diff_sort against diffsort 0.2.0's DiffSortNet (the dense
method of NeCo's public code; `pip install diffsort==0.2.0`) at NeCo's shape (3136 rows = 64 images x 49 queries,
n = 49, bitonic, Cauchy, steepness 100) and other n; fewer rows for both where diffsort would need more than
--dense-max-mib. With 1 torch thread and with all (--threads 1 0), beside --hogs busy-looping processes if asked.

incontext: evaluate.topk_inner_product, the exact k-NN search of the in-context protocol, on random unit features:
10.24M x 384 memory patches, 1,449 val images x 1,296 queries, 16 images per call, k = 30, float16 keys on CUDA (as
evaluate.py). The CPU runs a reduced scale. augment: the photometric augmentation per image in a loader worker (one
thread: torchvision's pipeline against crops only) and batched on the device (train.augment_views).

Every measurement runs in a fresh child process, so that its peak memory is its own.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import data
import evaluate
import sort
import train

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.yaml")

# -----------------------------------------------------------------------------
# common: devices, peak memory, one child process per measurement
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()

def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"

def device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"

def resident_bytes():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def peak_resident_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status; peak memory needs Linux")

def reset_peak(device):
    """Start a peak-memory window and return the bytes in use now. CUDA: the allocator's counters. CPU: the
    process's peak resident set (VmHWM, reset through clear_refs), which counts every allocation, torch's or not;
    hence one fresh process per measurement."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                            # resets VmHWM to the current resident set
    return resident_bytes()

def peak_bytes(device):
    sync(device)
    return torch.cuda.max_memory_allocated() if device == "cuda" else peak_resident_bytes()

def run_child(argv):
    """`python bench.py <argv>` in a fresh process; it prints its result as the last line, a JSON object."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, argv)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench.py {' '.join(map(str, argv))} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "---:|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")

# -----------------------------------------------------------------------------
# train: the training step, fast path against the faithful fp32 path
PATHS = {  # the config switches of each path (train.compile is added to the fast path by --compile)
    "fast": {"train.precision": "bf16", "train.fused_attention": True, "train.fused_adamw": True,
             "data.augment_on_device": True},
    "faithful": {"train.precision": "fp32", "train.fused_attention": False, "train.fused_adamw": False,
                 "data.augment_on_device": False},
    "fp32_sdpa": {"train.precision": "fp32", "train.fused_attention": True, "train.fused_adamw": False,
                  "data.augment_on_device": False},  # ~ the public run's xformers attention
}
PAPER_SHAPE = ("dinov2_vits14_reg", 64, 518, 98)  # arch, batch, global and local crop size of the paper's run
PHASES = ("augment", "teacher", "student", "loss", "backward", "update")  # train.py's record_function names

def synthetic_step_inputs(cfg, device, seed=0):
    """Crops (2 global + n_local local, each (B, 3, s, s)) and boxes (B, V, 4) in the pixels of a 640 x 480 image,
    all overlapping, as the loader gives them: uint8 with data.augment_on_device, else normalised float."""
    d, B = cfg["data"], cfg["optim"]["batch_size"]
    g = torch.Generator().manual_seed(seed)
    sizes = [d["global_size"]] * 2 + [d["local_size"]] * d["n_local"]
    if d["augment_on_device"]:
        crops = [torch.randint(0, 256, (B, 3, s, s), generator=g, dtype=torch.uint8).to(device) for s in sizes]
    else:
        crops = [torch.randn(B, 3, s, s, generator=g).to(device) for s in sizes]
    xy = torch.rand(B, len(sizes), 2, generator=g) * 100
    wh = 200 + torch.rand(B, len(sizes), 2, generator=g) * 200  # every box holds [100, 200]^2
    return crops, torch.cat([xy, xy + wh], -1).to(device)

def cmd_train_one(args):
    """Child of `train`: one path. Warm-up steps (compile, autotuning, the queue fills), `steps` steps timed
    together (synchronised only at the ends, as in training), then `breakdown` steps under torch.profiler, whose
    phases are train.py's record_function ranges. Prints JSON; {"oom": true} when CUDA runs out of memory."""
    sets = [f"model.arch={args.arch}", "model.weights=null", f"optim.batch_size={args.batch}",
            f"data.global_size={args.global_size}", f"data.local_size={args.local_size}",
            f"train.compile={args.compile and args.path == 'fast'}", f"train.device={args.device}"]
    cfg = train.load_config(CONFIG, sets + [f"{key}={value}" for key, value in PATHS[args.path].items()])
    device = torch.device(args.device)
    torch.manual_seed(0)
    student, teacher = train.build_models(cfg)
    student.to(device).train()
    teacher.to(device).eval()
    train.speed_settings(student, teacher, cfg)
    optimizer, autocast = train.make_optimizer(student, cfg), train.make_autocast(cfg, device)
    gen = torch.Generator(device=device).manual_seed(0)
    queue = train.PatchQueue(cfg["neco"]["queue_size"], cfg["model"]["head_out"], device)
    refs = train.make_reference_sampler(cfg["neco"], queue, gen, args.batch)
    crops, boxes = synthetic_step_inputs(cfg, device)

    def step():  # what train.train runs once the batch is on the device
        views = train.augment_views(crops, gen, args.batch) if cfg["data"]["augment_on_device"] else crops
        return train.train_step(student, student, teacher, optimizer, queue, gen, views, boxes, refs, cfg,
                                autocast, cfg["optim"]["momentum_teacher"])

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        for _ in range(args.warmup):
            step()
        reset_peak(args.device)
        start = time.perf_counter()
        for _ in range(args.steps):
            loss, finite = step()
        sync(args.device)
        ms = (time.perf_counter() - start) * 1e3 / args.steps
        peak = peak_bytes(args.device)
        with profile(activities=activities) as prof:
            for _ in range(args.breakdown):
                step()
            sync(args.device)
    except torch.cuda.OutOfMemoryError:
        print(json.dumps({"oom": True}))
        return
    if not finite.item():
        raise RuntimeError(f"{args.path} path: non-finite loss in the benchmark step")
    columns = phase_columns(args.device)
    phases = dict.fromkeys(columns, 0.0)
    for event in prof.key_averages():  # ms per step: the range's CPU time; on CUDA also the GPU time in it
        if event.key in PHASES:
            phases[f"{event.key}_ms"] += event.cpu_time_total / 1e3 / args.breakdown
            if args.device == "cuda":
                phases[f"{event.key}_cuda_ms"] += getattr(event, "device_time_total", 0) / 1e3 / args.breakdown
    print(json.dumps({"ms": ms, "peak_mib": peak / 2**20, "loss": loss.item(), **phases,
                      "precision": "bf16" if args.device == "cuda" and cfg["train"]["precision"] == "bf16" else "fp32"}))

def phase_columns(device):
    return [f"{p}{suffix}_ms" for p in PHASES for suffix in (("", "_cuda") if device == "cuda" else ("",))]

def cmd_train(args):
    device = train.pick_device(args.device, "--device").type
    cuda = device == "cuda"
    defaults = {"batch": 64 if cuda else 4, "global_size": 518 if cuda else 224, "steps": 10 if cuda else 3,
                "warmup": 3 if cuda else 1}
    shape = {key: default if getattr(args, key) is None else getattr(args, key) for key, default in defaults.items()}
    if min(shape["batch"], shape["global_size"], shape["steps"], args.breakdown) < 1 or shape["warmup"] < 0:
        raise ValueError("--batch, --global-size, --steps and --breakdown must be >= 1, --warmup >= 0")
    results = []
    for path in args.paths:
        batch = shape["batch"]
        while True:  # the faithful path may not fit at the fast path's batch: halve it until it does
            one = run_child(["train-one", path, "--device", device, "--arch", args.arch, "--batch", batch,
                             "--global-size", shape["global_size"], "--local-size", args.local_size,
                             "--steps", shape["steps"], "--warmup", shape["warmup"], "--breakdown", args.breakdown]
                            + (["--compile"] if args.compile else []))
            if not one.get("oom") or batch == 1:
                break
            print(json.dumps({"bench": "train", "path": path, "batch": batch, "oom": True}), flush=True)
            batch //= 2
        if one.get("oom"):
            raise RuntimeError(f"{path} path: out of memory even at batch 1")
        line = {"bench": "train", "path": path, "arch": args.arch, "device": device, "batch": batch,
                "global_size": shape["global_size"], "local_size": args.local_size,
                "compile": args.compile and path == "fast", "precision": one.pop("precision"),
                **{k: float(f"{v:.4g}") for k, v in one.items()}, "img_per_s": float(f"{batch * 1e3 / one['ms']:.4g}")}
        print(json.dumps(line), flush=True)
        results.append(line)
    columns = phase_columns(device)
    print(f"\ntraining step (train.train_step), {args.arch}, 2 x {shape['global_size']} + 4 x {args.local_size} px "
          f"crops, {device_name(device)}; ms/step over {shape['steps']} steps after {shape['warmup']} warm-up; phases: "
          f"ms per step of train.py's record_function ranges under torch.profiler ({args.breakdown} steps; CPU time"
          f"{', and _cuda: GPU time' if cuda else ''}); peak = "
          f"{'max allocated' if cuda else 'peak resident set of the process'}\n")
    table(["path", "precision", "batch", "ms/step", "images/s", "peak MiB", *(c.replace("_", " ") for c in columns)],
          [[r["path"], r["precision"], r["batch"], r["ms"], r["img_per_s"], r["peak_mib"], *[r[c] for c in columns]]
           for r in results])
    by_path = {r["path"]: r for r in results}
    if {"fast", "faithful"} <= by_path.keys():
        print(f"\nfast path: {by_path['fast']['img_per_s'] / by_path['faithful']['img_per_s']:.2f}x the faithful "
              f"path's images/s")
    fast = by_path.get("fast")
    if fast and (args.arch, fast["batch"], fast["global_size"], fast["local_size"]) == PAPER_SHAPE:
        hours = 25 * (118287 // 64) * 64 / fast["img_per_s"] / 3600
        print(f"25 COCO epochs (1,848 steps of 64 images each) at the fast path's speed: {hours:.2f} h")

# -----------------------------------------------------------------------------
# augment: the photometric augmentation in the loader workers or on the training device
def cmd_augment_one(args):
    """Child of `augment`. Per image: the loader's CPU work with one thread (one DataLoader worker), the reference
    pipeline (MultiCrop with torchvision's photometric ops) against crops only (data.augment_on_device); then
    train.augment_views on the device for a whole batch. Prints JSON."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(3, 30, 40, generator=g)                  # a smooth 640 x 480 image, like a photo
    img = (torch.nn.functional.interpolate(low[None], size=(480, 640), mode="bilinear")[0] * 255).to(torch.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loader_ms = {}
    for name, on_device in (("reference", False), ("crops_only", True)):
        transform = data.MultiCrop(args.global_size, args.local_size, on_device=on_device)
        transform(img)
        start = time.perf_counter()
        for _ in range(args.images):
            transform(img)
        loader_ms[name] = (time.perf_counter() - start) * 1e3 / args.images
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    sizes = [args.global_size] * 2 + [args.local_size] * 4
    crops = [torch.randint(0, 256, (args.batch, 3, s, s), generator=g, dtype=torch.uint8).to(device) for s in sizes]
    gen = torch.Generator(device=device).manual_seed(0)
    train.augment_views(crops, gen, args.batch)
    base = reset_peak(args.device)
    start = time.perf_counter()
    for _ in range(args.repeats):
        train.augment_views(crops, gen, args.batch)
    sync(args.device)
    device_ms = (time.perf_counter() - start) * 1e3 / args.repeats / args.batch
    print(json.dumps({"loader_reference_ms": loader_ms["reference"], "loader_crops_only_ms": loader_ms["crops_only"],
                      "device_ms": device_ms, "device_peak_mib": (peak_bytes(args.device) - base) / 2**20}))

def cmd_augment(args):
    device = train.pick_device(args.device, "--device").type
    batch = args.batch or (64 if device == "cuda" else 8)
    one = run_child(["augment-one", "--device", device, "--batch", batch, "--images", args.images, "--repeats",
                     args.repeats, "--global-size", args.global_size, "--local-size", args.local_size])
    line = {"bench": "augment", "device": device, "batch": batch, "global_size": args.global_size,
            "local_size": args.local_size, **{k: round(v, 2) for k, v in one.items()}}
    print(json.dumps(line), flush=True)
    print(f"\nper image of 2 x {args.global_size} + 4 x {args.local_size} px crops (640 x 480 source); loader: one "
          f"thread, {cpu_name()}; device: {device_name(device)}, batches of {batch}\n")
    table(["where", "ms per image", "images/s of 16 loader workers"],
          [["loader: crop + torchvision photometric (augment_on_device false)", line["loader_reference_ms"],
            round(16e3 / line["loader_reference_ms"])],
           ["loader: crop only (augment_on_device true)", line["loader_crops_only_ms"],
            round(16e3 / line["loader_crops_only_ms"])],
           [f"train.augment_views on {device}", line["device_ms"], ""]])

# -----------------------------------------------------------------------------
# sort: diff_sort against diffsort 0.2.0
METHODS = ("ours", "diffsort")

def dense_rows_cap(n, network, max_mib):
    """diffsort keeps a few (rows, n, n) tensors per layer for backward: its peak was measured at 17-18 bytes per
    row, layer and n^2 (float32, CPU). The largest multiple of 49 rows whose estimate fits under max_mib (>= 49)."""
    per_row = 18 * len(sort.network_layers(n, network)[1]) * n * n
    return max(49, int(max_mib * 2**20 // per_row) // 49 * 49)

def make_sorter(method, n, args):
    """A function x (rows, n) -> (x_sorted, P) for the method."""
    if method == "ours":
        return sort.DiffSort(n, args.network, args.steepness, args.distribution, check_finite=False)  # as train.py
    try:
        import diffsort
    except ImportError:
        raise RuntimeError("bench.py sort compares against diffsort: pip install diffsort==0.2.0 "
                           "(listed in tests/requirements.txt)") from None
    return diffsort.DiffSortNet(args.network, n, device=args.device, steepness=args.steepness,
                                distribution=args.distribution)

def sort_inputs(rows, n, device):
    """x like NeCo's cosine similarities (uniform in [-1, 1]) and fixed random upstream gradients."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(rows, n, generator=g) * 2 - 1).to(device).requires_grad_()
    grads = (torch.randn(rows, n, generator=g).to(device), torch.randn(rows, n, n, generator=g).to(device))
    return x, grads

def forward_backward(sorter, x, grads):
    x_sorted, P = sorter(x)
    torch.autograd.backward((x_sorted, P), grads)
    x.grad = None

def timed_peak_run(sorter, x, grads, device):
    """(ms, peak MiB) of one forward+backward; peak = memory in use above what was in use just before the run
    (inputs, gradients, code)."""
    base = reset_peak(device)
    start = time.perf_counter()
    forward_backward(sorter, x, grads)
    sync(device)
    ms = (time.perf_counter() - start) * 1e3
    return ms, max(0, peak_bytes(device) - base) / 2**20    # the kernel's RSS counters lag by a few pages

def cmd_sort_one(args):
    """Child of `sort` and `scaling`, one per method, shape and thread count: a run on 64 rows loads the method's
    code and lazy state, then `repeats` runs on the real input, the first of which gives the peak memory."""
    if args.threads:
        torch.set_num_threads(args.threads)
    sorter = make_sorter(args.method, args.n, args)
    forward_backward(sorter, *sort_inputs(64, args.n, args.device))
    x, grads = sort_inputs(args.rows, args.n, args.device)
    times, peak = [], None
    for _ in range(args.repeats):
        ms, mib = timed_peak_run(sorter, x, grads, args.device)
        times.append(ms)
        peak = mib if peak is None else peak
    print(json.dumps({"ms": statistics.median(times), "peak_mib": peak, "threads": torch.get_num_threads()}))

def run_sort_child(method, n, rows, args, threads=0):
    return run_child(["sort-one", method, n, rows, "--repeats", args.repeats, "--network", args.network,
                      "--steepness", args.steepness, "--distribution", args.distribution, "--device", args.device,
                      "--threads", threads])

def cmd_sort(args):
    """Per n and thread count, `rounds` rounds of one fresh child per method, alternating, so that both see the
    same load; medians over the rounds. --hogs starts busy-looping processes for the whole run (a loaded CPU)."""
    args.device = train.pick_device(args.device, "--device").type
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    results = []
    try:
        for n in args.n:
            sort.check_arguments(n, args.network, args.steepness, args.distribution)
            rows = min(args.rows, dense_rows_cap(n, args.network, args.dense_max_mib))
            for threads in args.threads if args.device == "cpu" else [0]:
                runs = [[run_sort_child(m, n, rows, args, threads) for m in METHODS] for _ in range(args.rounds)]
                line = {"bench": "sort", "n": n, "rows": rows, "network": args.network, "device": args.device,
                        "threads": runs[0][0]["threads"], "hogs": args.hogs, "rounds": args.rounds}
                for i, method in enumerate(METHODS):
                    for key in ("ms", "peak_mib"):
                        line[f"{method}_{key}"] = round(statistics.median(r[i][key] for r in runs), 1)
                line["speedup"] = round(line["diffsort_ms"] / line["ours_ms"], 2)
                line["memory_ratio"] = round(line["diffsort_peak_mib"] / max(line["ours_peak_mib"], 1e-3), 2)
                print(json.dumps(line), flush=True)
                results.append(line)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    print(f"\nforward+backward, {args.network}, {args.distribution}, steepness {args.steepness}, "
          f"{cpu_name() if args.device == 'cpu' else device_name(args.device)}, {args.hogs} busy-loop processes "
          f"beside it; median of {args.rounds} rounds x {args.repeats} runs; peak = memory above the inputs\n")
    table(["rows", "n", "threads", "ours ms", "diffsort ms", "speedup", "ours peak MiB", "diffsort peak MiB",
           "memory ratio"],
          [[r["rows"], r["n"], r["threads"], r["ours_ms"], r["diffsort_ms"], f"{r['speedup']}x", r["ours_peak_mib"],
            r["diffsort_peak_mib"], f"{r['memory_ratio']}x"] for r in results])

# -----------------------------------------------------------------------------
# incontext: the exact k-NN search of the in-context protocol
VOC_VAL_IMAGES, PATCHES_504 = 1449, 36 * 36  # VOC val, 504 px -> 36 x 36 patches per image

def random_unit_rows(n, dim, dtype, device, seed, chunk=1 << 20):
    """(n, dim) random unit vectors, made chunk by chunk on the device (10.24M x 384 at once in float32 would be
    15.7 GB)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(n, dim, dtype=dtype, device=device)
    for start in range(0, n, chunk):
        x = torch.randn(min(chunk, n - start), dim, generator=g, device=device)
        out[start:start + len(x)] = torch.nn.functional.normalize(x, dim=1)
    return out

def cmd_incontext_one(args):
    """Child of `incontext` and `scaling`: keys as evaluate.build_memory keeps them (float16 on CUDA, float32 on
    the CPU), queries made per batch of `batch_images` images outside the timed part, evaluate.topk_inner_product
    timed per batch. Peak = memory above the keys. Prints JSON."""
    key_dtype = torch.float16 if args.device == "cuda" else torch.float32
    keys = random_unit_rows(args.memory, args.dim, key_dtype, args.device, seed=0)
    evaluate.topk_inner_product(random_unit_rows(64, args.dim, torch.float32, args.device, 1), keys[:4096], args.k)
    base = reset_peak(args.device)
    seconds = 0.0
    for first in range(0, args.images, args.batch_images):
        n_images = min(args.batch_images, args.images - first)
        queries = random_unit_rows(n_images * args.patches, args.dim, torch.float32, args.device, seed=1 + first)
        sync(args.device)
        start = time.perf_counter()
        scores, indices = evaluate.topk_inner_product(queries, keys, args.k)  # (q, k) each
        sync(args.device)
        seconds += time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mib": (peak_bytes(args.device) - base) / 2**20}))

def incontext_line(device, memory, images, args):
    one = run_child(["incontext-one", "--device", device, "--memory", memory, "--images", images, "--dim", args.dim,
                     "--k", args.k, "--patches", args.patches, "--batch-images", args.batch_images])
    queries = images * args.patches
    flops_per_s = 2 * args.dim * queries * memory / one["seconds"]  # 2 x dim flops per query-key product
    voc_flops = 2 * 384 * VOC_VAL_IMAGES * PATCHES_504 * 10_240_000
    return {"bench": "incontext", "device": device, "memory": memory, "queries": queries, "dim": args.dim,
            "k": args.k, "seconds": float(f"{one['seconds']:.4g}"), "peak_mib": round(one["peak_mib"], 1),
            "tflops": round(flops_per_s / 1e12, 3),
            "voc_scale_minutes": round(voc_flops / flops_per_s / 60, 1)}  # measured or, if smaller, projected

def cmd_incontext(args):
    device = train.pick_device(args.device, "--device").type
    cuda = device == "cuda"
    memory = args.memory or (10_240_000 if cuda else 262_144)
    images = args.images or (VOC_VAL_IMAGES if cuda else 8)
    line = incontext_line(device, memory, images, args)
    print(json.dumps(line), flush=True)
    full = (memory, images, args.patches, args.dim) == (10_240_000, VOC_VAL_IMAGES, PATCHES_504, 384)
    print(f"\nin-context search (evaluate.topk_inner_product), k {args.k}, dim {args.dim}, "
          f"{'float16' if cuda else 'float32'} keys, {args.batch_images} images of {args.patches} queries per "
          f"call, {device_name(device)}; peak = memory above the keys; TFLOP/s counts the 2 x dim flops of each "
          f"query-key product\n")
    table(["memory", "queries", "seconds", "peak MiB", "TFLOP/s",
           f"VOC scale (10.24M x 1.88M), min{'' if full else ', projected linearly'}"],
          [[line["memory"], line["queries"], line["seconds"], line["peak_mib"], line["tflops"],
            line["voc_scale_minutes"]]])

# -----------------------------------------------------------------------------
# scaling: how sort and search costs grow
def cmd_scaling(args):
    device = train.pick_device(args.device, "--device").type
    args.device = device
    cuda = device == "cuda"
    sort_rows = args.sort_rows or (3136 if cuda else 392)
    rows_list = args.rows or ([784, 3136, 12544, 50176] if cuda else [196, 784, 3136])
    memories = args.memories or ([1_280_000, 2_560_000, 5_120_000, 10_240_000] if cuda else
                                 [32_768, 65_536, 131_072, 262_144])
    images = args.images or (16 if cuda else 4)
    sort_lines, search_lines = [], []
    points = [(n, sort_rows) for n in args.n]
    points += [(49, rows) for rows in rows_list if (49, rows) not in points]  # NeCo's n, more and more rows
    for n, rows in points:
        sort.check_arguments(n, args.network, args.steepness, args.distribution)
        one = run_sort_child("ours", n, rows, args)
        line = {"bench": "scaling_sort", "n": n, "rows": rows, "device": device, "ms": round(one["ms"], 1),
                "peak_mib": round(one["peak_mib"], 1),
                "layers": len(sort.network_layers(n, args.network)[1])}
        print(json.dumps(line), flush=True)
        sort_lines.append(line)
    for memory in memories:
        line = incontext_line(device, memory, images, args)
        line["bench"] = "scaling_search"
        print(json.dumps(line), flush=True)
        search_lines.append(line)
    print(f"\n{device_name(device)}\n\nsort.diff_sort forward+backward ({args.network}, {args.distribution}, "
          f"steepness {args.steepness}, median of {args.repeats}); peak = memory above the inputs\n")
    table(["n", "rows", "network layers", "ms", "peak MiB", "ms per row"],
          [[r["n"], r["rows"], r["layers"], r["ms"], r["peak_mib"], round(r["ms"] / r["rows"], 4)]
           for r in sort_lines])
    print(f"\nin-context search (k {args.k}, {images * args.patches} queries)\n")
    table(["memory", "seconds", "peak MiB", "TFLOP/s"],
          [[r["memory"], r["seconds"], r["peak_mib"], r["tflops"]] for r in search_lines])

# -----------------------------------------------------------------------------
def add_sort_options(p):
    p.add_argument("--network", default="bitonic", choices=sort.NETWORKS)
    p.add_argument("--steepness", type=float, default=100.0)
    p.add_argument("--distribution", default="cauchy", choices=sort.DISTRIBUTIONS)

def add_search_options(p):
    p.add_argument("--dim", type=int, default=384, help="feature dim (ViT-S: 384)")
    p.add_argument("--k", type=int, default=30, help="neighbours")
    p.add_argument("--patches", type=int, default=PATCHES_504, help="queries per image (504 px: 36 x 36)")
    p.add_argument("--batch-images", type=int, default=16, help="images searched per call (eval.incontext.batch_size)")

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    devices = ("auto", "cpu", "cuda")

    p = commands.add_parser("train", help="training step: fast path vs faithful fp32 path, with its phases")
    p.add_argument("--arch", default="dinov2_vits14_reg", help="model.arch (random weights of that architecture)")
    p.add_argument("--batch", type=int, help="images per step (default: 64 on CUDA, 4 on the CPU)")
    p.add_argument("--global-size", type=int, help="global crop size (default: 518 on CUDA, 224 on the CPU)")
    p.add_argument("--local-size", type=int, default=98, help="local crop size")
    p.add_argument("--steps", type=int, help="timed steps (default: 10 on CUDA, 3 on the CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 3 on CUDA, 1 on the CPU)")
    p.add_argument("--breakdown", type=int, default=2, help="profiled steps (the phases' mean per step)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbones' blocks in the fast path")
    p.add_argument("--paths", nargs="+", default=["fast", "faithful"], choices=list(PATHS),
                   help="fp32_sdpa: faithful numerics with the fused attention kernel")
    p.add_argument("--device", default="auto", choices=devices)
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("sort", help="diff_sort vs diffsort.DiffSortNet: forward+backward time and peak memory")
    p.add_argument("--rows", type=int, default=3136, help="rows sorted at once (NeCo: 64 images x 49 queries)")
    p.add_argument("--n", type=int, nargs="+", default=[49, 16, 64, 128], help="lengths to sort")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    p.add_argument("--dense-max-mib", type=float, default=4700,
                   help="use fewer rows (for both methods) where diffsort would need more memory than this")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="torch threads (0: all)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of both methods, alternating (median reported)")
    p.add_argument("--hogs", type=int, default=0, help="busy-looping processes beside the run (a loaded CPU)")
    p.add_argument("--device", default="auto", choices=devices)
    add_sort_options(p)
    p.set_defaults(run=cmd_sort)

    p = commands.add_parser("incontext", help="the in-context k-NN search on random features: time, peak memory")
    p.add_argument("--memory", type=int, help="memory patches (default: 10,240,000 on CUDA, 262,144 on the CPU)")
    p.add_argument("--images", type=int, help="val images searched (default: 1,449 on CUDA, 8 on the CPU)")
    p.add_argument("--device", default="auto", choices=devices)
    add_search_options(p)
    p.set_defaults(run=cmd_incontext)

    p = commands.add_parser("scaling", help="sort cost against n and rows; search time against memory size")
    p.add_argument("--n", type=int, nargs="+", default=[16, 32, 49, 64, 128, 256], help="sort lengths")
    p.add_argument("--sort-rows", type=int, help="rows for the n sweep (default: 3136 on CUDA, 392 on the CPU)")
    p.add_argument("--rows", type=int, nargs="+", help="rows for the sweep at n = 49")
    p.add_argument("--memories", type=int, nargs="+", help="memory sizes of the search sweep")
    p.add_argument("--images", type=int, help="val images of the search sweep (default: 16 on CUDA, 4 on the CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=devices)
    add_sort_options(p)
    add_search_options(p)
    p.set_defaults(run=cmd_scaling)

    p = commands.add_parser("augment", help="photometric augmentation: in the loader (CPU) or on the device")
    p.add_argument("--batch", type=int, help="images per device batch (default: 64 on CUDA, 8 on the CPU)")
    p.add_argument("--images", type=int, default=10, help="images timed in the loader")
    p.add_argument("--repeats", type=int, default=3, help="device batches timed")
    p.add_argument("--global-size", type=int, default=518)
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--device", default="auto", choices=devices)
    p.set_defaults(run=cmd_augment)

    add_children(commands)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, RuntimeError, FileNotFoundError, train.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

def add_children(commands):
    """The internal subcommands: one measurement in this process."""
    p = commands.add_parser("train-one", help="internal: one path of `train`")
    p.add_argument("path", choices=list(PATHS))
    for name in ("--batch", "--global-size", "--local-size", "--steps", "--warmup", "--breakdown"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--arch", required=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", required=True, choices=("cpu", "cuda"))
    p.set_defaults(run=cmd_train_one)

    p = commands.add_parser("sort-one", help="internal: one method and shape of `sort`")
    p.add_argument("method", choices=METHODS)
    p.add_argument("n", type=int)
    p.add_argument("rows", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", required=True, choices=("cpu", "cuda"))
    add_sort_options(p)
    p.set_defaults(run=cmd_sort_one)

    p = commands.add_parser("augment-one", help="internal: the measurements of `augment`")
    for name in ("--batch", "--images", "--repeats", "--global-size", "--local-size"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--device", required=True, choices=("cpu", "cuda"))
    p.set_defaults(run=cmd_augment_one)

    p = commands.add_parser("incontext-one", help="internal: one search of `incontext`")
    for name in ("--memory", "--images"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--device", required=True, choices=("cpu", "cuda"))
    add_search_options(p)
    p.set_defaults(run=cmd_incontext_one)

if __name__ == "__main__":
    main()
