"""
Benchmarks of the project's parts: each subcommand prints one JSON line per measurement, then a markdown table.
Every measurement runs in a fresh child process, so that its peak memory is its own. Options left unset take the
paper's scale on CUDA and a small one on the CPU.

    python bench.py train [--arch dinov2_vits14_reg] [--batch 64] [--device auto]   # the training step
    python bench.py sort [--n 49 16 64 128] [--threads 1 0] [--hogs 2] [--rounds 3]  # diff_sort vs diffsort
    python bench.py incontext [--memory 10240000] [--images 1449]                   # the in-context search
    python bench.py scaling                                # sort cost against n and rows, search against memory
    python bench.py augment                                # photometric augmentation: loader (CPU) or device

train: train.train_step on synthetic crops: images/s, peak memory and the step's phases (its record_function ranges
under torch.profiler), for the fast path (augmentation on the device, bf16 on CUDA, SDPA attention, fused AdamW)
and the faithful fp32 path (explicit attention, torch's AdamW, augmentation in the loader). sort: forward+backward
of sort.diff_sort against diffsort 0.2.0's DiffSortNet (the public NeCo code's sorter) at NeCo's shape (3136 rows =
64 images x 49 queries, bitonic, Cauchy, steepness 100). incontext: evaluate.topk_inner_product at the VOC scale
(10.24M x 384 memory, 1,449 x 1,296 queries, k 30). augment: per image in a loader worker, and batched on the device.
"""

import argparse
import importlib.util
import json
import os
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
VOC_VAL_IMAGES, PATCHES_504 = 1449, 36 * 36  # VOC val, 504 px -> 36 x 36 patches per image
DEVICE_DEFAULTS = {  # (CUDA, CPU) values of the options left unset
    "train": {"batch": (64, 4), "global_size": (518, 224), "steps": (10, 3), "warmup": (3, 1)},
    "incontext": {"memory": (10_240_000, 262_144), "images": (VOC_VAL_IMAGES, 8)},
    "scaling": {"sort_rows": (3136, 392), "rows": ([784, 3136, 12544, 50176], [196, 784, 3136]),
                "memories": ([1_280_000, 2_560_000, 5_120_000, 10_240_000], [32_768, 65_536, 131_072, 262_144]),
                "images": (16, 4)},
    "augment": {"batch": (64, 8)},
}

# -----------------------------------------------------------------------------
# common: timing, peak memory, one child process per measurement, the output
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()

def timed_ms(fn, calls, device):
    """ms per call of fn over `calls` calls, synchronised only at the ends (as in training), and fn's last result."""
    sync(device)
    start, out = time.perf_counter(), None
    for _ in range(calls):
        out = fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3 / max(calls, 1), out

def cpu_name():
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    return names[0] if names else "cpu"

def device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"

def reset_peak(device):
    """Start a peak-memory window; -> the bytes in use now. CUDA: the allocator's counters. CPU: the process's peak
    resident set (VmHWM, reset through clear_refs), which counts every allocation, torch's or not."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def peak_mib(device, base=0):
    """The window's peak in MiB above base bytes (the kernel's resident-set counters lag by a few pages: >= 0)."""
    sync(device)
    if device == "cuda":
        return max(0, torch.cuda.max_memory_allocated() - base) / 2**20
    kib = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    return max(0, kib[0] * 1024 - base) / 2**20

def run_child(name, args, **changes):
    """CHILDREN[name](args with changes) in a fresh `python bench.py` process -> its result (a dict)."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "child", name,
                           json.dumps({**vars(args), **changes})], capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise RuntimeError(f"bench.py {name} {changes} failed: {why}")
    return json.loads(done.stdout.strip().splitlines()[-1])

def emit(line):
    print(json.dumps(line), flush=True)
    return line

def table(caption, lines, keys):
    """A markdown table of the lines' values under keys, headed by the keys ("_" read as a space)."""
    header = [key.replace("_", " ").replace("mib", "MiB") for key in keys]
    print(f"\n{caption}\n\n| " + " | ".join(header) + " |\n|" + "---:|" * len(keys))
    for line in lines:
        print("| " + " | ".join(str(line[key]) for key in keys) + " |")

def synthetic_batch(B, sizes, device, seed=0):
    """uint8 crops (B, 3, s, s) per size, and boxes (B, V, 4) in the pixels of a 640 x 480 image, all overlapping."""
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randint(0, 256, (B, 3, s, s), generator=g, dtype=torch.uint8).to(device) for s in sizes]
    xy = torch.rand(B, len(sizes), 2, generator=g) * 100
    wh = 200 + torch.rand(B, len(sizes), 2, generator=g) * 200  # every box holds [100, 200]^2
    return crops, torch.cat([xy, xy + wh], -1).to(device)

# -----------------------------------------------------------------------------
# train: the training step, fast path against the faithful fp32 path
PATH_KEYS = ("train.precision", "train.fused_attention", "train.fused_adamw", "data.augment_on_device")
PATHS = {"fast": ("bf16", True, True, True), "faithful": ("fp32", False, False, False),  # (--compile: fast only)
         "fp32_sdpa": ("fp32", True, False, False)}  # faithful numerics, ~ the public run's xformers attention
PAPER_SHAPE = ("dinov2_vits14_reg", 64, 518, 98)  # arch, batch, global and local crop size of the paper's run
PHASES = ("augment", "teacher", "student", "loss", "backward", "update")  # train.py's record_function names

def phase_columns(device):
    return [f"{p}{suffix}_ms" for p in PHASES for suffix in (("", "_cuda") if device == "cuda" else ("",))]

def train_one(a):
    """Child of train: warm-up steps (compile, autotuning, the queue fills), a.steps steps timed, then a.breakdown
    steps under torch.profiler. {"oom": True} when CUDA runs out of memory."""
    sets = {"model.arch": a.arch, "model.weights": "null", "optim.batch_size": a.batch, "train.device": a.device,
            "data.global_size": a.global_size, "data.local_size": a.local_size, "train.compile": a.compile,
            **dict(zip(PATH_KEYS, PATHS[a.path]))}
    cfg = train.load_config(CONFIG, [f"{key}={value}" for key, value in sets.items()])
    device, on_device = torch.device(a.device), cfg["data"]["augment_on_device"]
    torch.manual_seed(0)
    student, teacher = train.build_models(cfg)
    student.to(device).train()
    teacher.to(device).eval()
    train.speed_settings(student, teacher, cfg)
    optimizer, autocast = train.make_optimizer(student, cfg), train.make_autocast(cfg, device)
    gen = torch.Generator(device=device).manual_seed(0)
    queue = train.PatchQueue(cfg["neco"]["queue_size"], cfg["model"]["head_out"], device)
    refs = train.make_reference_sampler(cfg["neco"], queue, gen, a.batch)
    crops, boxes = synthetic_batch(a.batch, [a.global_size] * 2 + [a.local_size] * cfg["data"]["n_local"], device)
    if not on_device:  # the loader's work, outside the step
        crops = train.augment_views(crops, gen, a.batch)

    def step():  # what train.train runs once the batch is on the device
        views = train.augment_views(crops, gen, a.batch) if on_device else crops
        return train.train_step(student, student, teacher, optimizer, queue, gen, views, boxes, refs, cfg, autocast,
                                cfg["optim"]["momentum_teacher"])

    try:
        timed_ms(step, a.warmup, a.device)
        reset_peak(a.device)
        ms, (loss, finite) = timed_ms(step, a.steps, a.device)
        peak = peak_mib(a.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
        with profile(activities=activities) as prof:
            timed_ms(step, a.breakdown, a.device)
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    if not finite.item():
        raise RuntimeError(f"{a.path} path: non-finite loss in the benchmark step")
    phases = dict.fromkeys(phase_columns(a.device), 0.0)
    for event in prof.key_averages():  # ms per step: the range's CPU time; on CUDA also the GPU time in it
        if event.key in PHASES:
            phases[f"{event.key}_ms"] += event.cpu_time_total / 1e3 / a.breakdown
            if a.device == "cuda":
                phases[f"{event.key}_cuda_ms"] += event.device_time_total / 1e3 / a.breakdown
    return {"ms": ms, "peak_mib": peak, "loss": loss.item(), **phases}

def cmd_train(args):
    if min(args.batch, args.global_size, args.steps, args.breakdown) < 1 or args.warmup < 0:
        raise ValueError("--batch, --global-size, --steps and --breakdown must be >= 1, --warmup >= 0")
    results, cuda = [], args.device == "cuda"
    for path in args.paths:
        batch, compile_blocks = args.batch, args.compile and path == "fast"
        # the faithful path may not fit at the fast path's batch: halve it until it does
        while (one := run_child("train_one", args, path=path, batch=batch, compile=compile_blocks)).get("oom"):
            if batch == 1:
                raise RuntimeError(f"{path} path: out of memory even at batch 1")
            emit({"bench": "train", "path": path, "batch": batch, "oom": True})
            batch //= 2
        results.append(emit({"bench": "train", "path": path, "arch": args.arch, "device": args.device,
                             "batch": batch, "global_size": args.global_size, "local_size": args.local_size,
                             "compile": compile_blocks, "precision": PATHS[path][0] if cuda else "fp32",
                             **{k: float(f"{v:.4g}") for k, v in one.items()},
                             "img_per_s": float(f"{batch * 1e3 / one['ms']:.4g}")}))
    table(f"train.train_step, {args.arch}, 2 x {args.global_size} + 4 x {args.local_size} px crops, "
          f"{device_name(args.device)}; ms per step over {args.steps} steps after {args.warmup} warm-up; phases: ms "
          f"per step in its record_function ranges ({args.breakdown} profiled steps; CPU time"
          f"{', _cuda: GPU time' if cuda else ''}); peak: {'max allocated' if cuda else 'peak resident set'}",
          results, ["path", "precision", "batch", "ms", "img_per_s", "peak_mib", *phase_columns(args.device)])
    by_path = {r["path"]: r for r in results}
    if {"fast", "faithful"} <= by_path.keys():
        print(f"\nfast path: {by_path['fast']['img_per_s'] / by_path['faithful']['img_per_s']:.2f}x the faithful "
              f"path's images/s")
    fast = by_path.get("fast")
    if fast and (args.arch, fast["batch"], fast["global_size"], fast["local_size"]) == PAPER_SHAPE:
        hours = 25 * (118287 // 64) * 64 / fast["img_per_s"] / 3600
        print(f"25 COCO epochs (1,848 steps of 64 images each) at the fast path's speed: {hours:.2f} h")

# -----------------------------------------------------------------------------
# sort: diff_sort against diffsort 0.2.0
METHODS = ("ours", "diffsort")

def dense_rows_cap(n, network, max_mib):
    """diffsort keeps a few (rows, n, n) tensors per layer for backward: its peak was measured at 17-18 bytes per
    row, layer and n^2 (float32, CPU). The largest multiple of 49 rows whose estimate fits under max_mib (>= 49)."""
    per_row = 18 * len(sort.network_layers(n, network)[1]) * n * n
    return max(49, int(max_mib * 2**20 // per_row) // 49 * 49)

def sort_one(a):
    """Child of sort and scaling: one run on 64 rows loads the method's code and lazy state, then a.repeats runs on x
    like NeCo's cosine similarities (uniform in [-1, 1]) with fixed upstream gradients; the first gives the peak."""
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.method == "ours":
        sorter = sort.DiffSort(a.n, a.network, a.steepness, a.distribution, check_finite=False)  # as train.py
    else:
        import diffsort
        sorter = diffsort.DiffSortNet(a.network, a.n, device=a.device, steepness=a.steepness,
                                      distribution=a.distribution)
    times, peaks = [], []
    for rows in [64] + [a.rows] * a.repeats:
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(rows, a.n, generator=g) * 2 - 1).to(a.device).requires_grad_()
        grads = (torch.randn(rows, a.n, generator=g).to(a.device),  # upstream gradients of x_sorted and P
                 torch.randn(rows, a.n, a.n, generator=g).to(a.device))
        base = reset_peak(a.device)  # the peak above the inputs and gradients
        times.append(timed_ms(lambda: torch.autograd.backward(sorter(x), grads), 1, a.device)[0])
        peaks.append(peak_mib(a.device, base))
    return {"ms": statistics.median(times[1:]), "peak_mib": peaks[1], "threads": torch.get_num_threads()}

def cmd_sort(args):
    """Per n and thread count, rounds of one fresh child per method, alternating, so that both see the same load;
    medians over the rounds. --hogs busy-looping processes run beside the whole benchmark (a loaded CPU)."""
    if importlib.util.find_spec("diffsort") is None:
        raise RuntimeError("bench.py sort compares against diffsort: pip install diffsort==0.2.0")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    results = []
    try:
        for n in args.n:
            sort.check_arguments(n, args.network, args.steepness, args.distribution)
            rows = min(args.rows, dense_rows_cap(n, args.network, args.dense_max_mib))
            for threads in args.threads if args.device == "cpu" else [0]:
                runs = [{m: run_child("sort_one", args, method=m, n=n, rows=rows, threads=threads) for m in METHODS}
                        for _ in range(args.rounds)]
                line = {"bench": "sort", "n": n, "rows": rows, "network": args.network, "device": args.device,
                        "threads": runs[0]["ours"]["threads"], "hogs": args.hogs, "rounds": args.rounds}
                line.update({f"{m}_{key}": round(statistics.median(r[m][key] for r in runs), 1)
                             for m in METHODS for key in ("ms", "peak_mib")})
                line["speedup"] = round(line["diffsort_ms"] / line["ours_ms"], 2)
                line["memory_ratio"] = round(line["diffsort_peak_mib"] / max(line["ours_peak_mib"], 1e-3), 2)
                results.append(emit(line))
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    table(f"forward+backward, {args.network}, {args.distribution}, steepness {args.steepness}, "
          f"{cpu_name() if args.device == 'cpu' else device_name(args.device)}, {args.hogs} busy-loop processes "
          f"beside it; median of {args.rounds} rounds x {args.repeats} runs; peak = memory above the inputs; "
          f"speedup and memory ratio: diffsort / ours",
          results, ["rows", "n", "threads", "ours_ms", "diffsort_ms", "speedup", "ours_peak_mib", "diffsort_peak_mib",
                    "memory_ratio"])

# -----------------------------------------------------------------------------
# incontext and scaling: the exact k-NN search of the in-context protocol; how sort and search costs grow
def random_unit_rows(n, dim, dtype, device, seed, chunk=1 << 20):
    """(n, dim) random unit vectors, made chunk by chunk on the device (10.24M x 384 at once in float32: 15.7 GB)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(n, dim, dtype=dtype, device=device)
    for start in range(0, n, chunk):
        x = torch.randn(min(chunk, n - start), dim, generator=g, device=device)
        out[start:start + len(x)] = torch.nn.functional.normalize(x, dim=1)
    return out

def search_one(a):
    """Child of incontext and scaling: keys as evaluate.build_memory keeps them (float16 on CUDA), queries made outside
    the timed part, evaluate.topk_inner_product timed per call of a.batch_images images. Peak = above the keys."""
    keys = random_unit_rows(a.memory, a.dim, torch.float16 if a.device == "cuda" else torch.float32, a.device, 0)
    evaluate.topk_inner_product(random_unit_rows(64, a.dim, torch.float32, a.device, 1), keys[:4096], a.k)
    base, ms = reset_peak(a.device), 0.0
    for first in range(0, a.images, a.batch_images):
        n_queries = min(a.batch_images, a.images - first) * a.patches
        queries = random_unit_rows(n_queries, a.dim, torch.float32, a.device, 1 + first)
        ms += timed_ms(lambda: evaluate.topk_inner_product(queries, keys, a.k), 1, a.device)[0]
    return {"seconds": ms / 1e3, "peak_mib": peak_mib(a.device, base)}

def search_line(args, memory, bench):
    one = run_child("search_one", args, memory=memory)
    queries = args.images * args.patches
    flops_per_s = 2 * args.dim * queries * memory / one["seconds"]  # 2 x dim flops per query-key product
    voc_flops = 2 * 384 * VOC_VAL_IMAGES * PATCHES_504 * 10_240_000
    return emit({"bench": bench, "device": args.device, "memory": memory, "queries": queries, "dim": args.dim,
                 "k": args.k, "seconds": float(f"{one['seconds']:.4g}"), "peak_mib": round(one["peak_mib"], 1),
                 "tflops": round(flops_per_s / 1e12, 3),
                 "voc_scale_minutes": round(voc_flops / flops_per_s / 60, 1)})  # measured or, if smaller, projected

def cmd_incontext(args):
    line = search_line(args, args.memory, "incontext")
    full = (args.memory, args.images, args.patches, args.dim) == (10_240_000, VOC_VAL_IMAGES, PATCHES_504, 384)
    table(f"in-context search (evaluate.topk_inner_product), k {args.k}, dim {args.dim}, "
          f"{'float16' if args.device == 'cuda' else 'float32'} keys, {args.batch_images} images of {args.patches} "
          f"queries per call, {device_name(args.device)}; peak = memory above the keys; tflops: TFLOP/s of the 2 x dim "
          f"flops of each query-key product; voc scale: minutes for 10.24M keys x 1.88M queries"
          f"{'' if full else ', projected linearly'}",
          [line], ["memory", "queries", "seconds", "peak_mib", "tflops", "voc_scale_minutes"])

def cmd_scaling(args):
    points = [(n, args.sort_rows) for n in args.n]
    points += [(49, rows) for rows in args.rows if (49, rows) not in points]  # NeCo's n, more and more rows
    sort_lines = []
    for n, rows in points:
        sort.check_arguments(n, args.network, args.steepness, args.distribution)
        one = run_child("sort_one", args, method="ours", n=n, rows=rows, threads=0)
        sort_lines.append(emit({"bench": "scaling_sort", "n": n, "rows": rows, "device": args.device,
                                "layers": len(sort.network_layers(n, args.network)[1]), "ms": round(one["ms"], 1),
                                "peak_mib": round(one["peak_mib"], 1), "ms_per_row": round(one["ms"] / rows, 4)}))
    search_lines = [search_line(args, memory, "scaling_search") for memory in args.memories]
    table(f"{device_name(args.device)}\n\nsort.diff_sort forward+backward ({args.network}, {args.distribution}, "
          f"steepness {args.steepness}, median of {args.repeats}); layers of the sorting network; peak = memory "
          f"above the inputs", sort_lines, ["n", "rows", "layers", "ms", "peak_mib", "ms_per_row"])
    table(f"in-context search (k {args.k}, {args.images * args.patches} queries)", search_lines,
          ["memory", "seconds", "peak_mib", "tflops"])

# -----------------------------------------------------------------------------
# augment: the photometric augmentation in the loader workers or on the training device
def augment_one(a):
    """Child of augment. Per image: the loader's CPU work with one thread (one DataLoader worker), the reference
    pipeline (MultiCrop with torchvision's photometric ops) against crops only; then train.augment_views batched."""
    low = torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(0))  # a smooth 640 x 480 image, like a photo
    img = (torch.nn.functional.interpolate(low[None], size=(480, 640), mode="bilinear")[0] * 255).to(torch.uint8)
    threads, result = torch.get_num_threads(), {}
    torch.set_num_threads(1)
    for name, on_device in (("loader_reference_ms", False), ("loader_crops_only_ms", True)):
        transform = data.MultiCrop(a.global_size, a.local_size, on_device=on_device)
        transform(img)
        result[name] = timed_ms(lambda: transform(img), a.images, "cpu")[0]
    torch.set_num_threads(threads)
    crops, _ = synthetic_batch(a.batch, [a.global_size] * 2 + [a.local_size] * 4, a.device)
    gen = torch.Generator(device=a.device).manual_seed(0)
    train.augment_views(crops, gen, a.batch)
    base = reset_peak(a.device)
    result["device_ms"] = timed_ms(lambda: train.augment_views(crops, gen, a.batch), a.repeats, a.device)[0] / a.batch
    return {**result, "device_peak_mib": peak_mib(a.device, base)}

def cmd_augment(args):
    one = run_child("augment_one", args)
    line = emit({"bench": "augment", "device": args.device, "batch": args.batch, "global_size": args.global_size,
                 "local_size": args.local_size, **{k: round(v, 2) for k, v in one.items()}})
    loader = [("loader: crop + torchvision photometric (augment_on_device false)", line["loader_reference_ms"]),
              ("loader: crop only (augment_on_device true)", line["loader_crops_only_ms"])]
    rows = [{"where": where, "ms_per_image": ms, "images/s_of_16_workers": round(16e3 / ms)} for where, ms in loader]
    rows.append({"where": f"train.augment_views on {args.device}", "ms_per_image": line["device_ms"],
                 "images/s_of_16_workers": ""})
    table(f"per image of 2 x {args.global_size} + 4 x {args.local_size} px crops (640 x 480 source); loader: one "
          f"thread, {cpu_name()}; device: {device_name(args.device)}, batches of {args.batch}", rows,
          ["where", "ms_per_image", "images/s_of_16_workers"])

# -----------------------------------------------------------------------------
CHILDREN = {f.__name__: f for f in (train_one, sort_one, search_one, augment_one)}

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
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
    p = commands.add_parser("sort", help="diff_sort vs diffsort.DiffSortNet: forward+backward time and peak memory")
    p.add_argument("--rows", type=int, default=3136, help="rows sorted at once (NeCo: 64 images x 49 queries)")
    p.add_argument("--n", type=int, nargs="+", default=[49, 16, 64, 128], help="lengths to sort")
    p.add_argument("--dense-max-mib", type=float, default=4700,
                   help="use fewer rows (for both methods) where diffsort would need more memory than this")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="torch threads (0: all)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of both methods, alternating (median reported)")
    p.add_argument("--hogs", type=int, default=0, help="busy-looping processes beside the run (a loaded CPU)")
    p = commands.add_parser("incontext", help="the in-context k-NN search on random features: time, peak memory")
    p.add_argument("--memory", type=int, help="memory patches (default: 10,240,000 on CUDA, 262,144 on the CPU)")
    p.add_argument("--images", type=int, help="val images searched (default: 1,449 on CUDA, 8 on the CPU)")
    p = commands.add_parser("scaling", help="sort cost against n and rows; search time against memory size")
    p.add_argument("--n", type=int, nargs="+", default=[16, 32, 49, 64, 128, 256], help="sort lengths")
    p.add_argument("--sort-rows", type=int, help="rows for the n sweep (default: 3136 on CUDA, 392 on the CPU)")
    p.add_argument("--rows", type=int, nargs="+", help="rows for the sweep at n = 49")
    p.add_argument("--memories", type=int, nargs="+", help="memory sizes of the search sweep")
    p.add_argument("--images", type=int, help="val images of the search sweep (default: 16 on CUDA, 4 on the CPU)")
    p = commands.add_parser("augment", help="photometric augmentation: in the loader (CPU) or on the device")
    p.add_argument("--batch", type=int, help="images per device batch (default: 64 on CUDA, 8 on the CPU)")
    p.add_argument("--images", type=int, default=10, help="images timed in the loader")
    p.add_argument("--repeats", type=int, default=3, help="device batches timed")
    p.add_argument("--global-size", type=int, default=518)
    p.add_argument("--local-size", type=int, default=98)
    for name, p in commands.choices.items():
        p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        if name in ("sort", "scaling"):
            p.add_argument("--repeats", type=int, default=3, help="timed runs per child (the median is reported)")
            p.add_argument("--network", default="bitonic", choices=sort.NETWORKS)
            p.add_argument("--steepness", type=float, default=100.0)
            p.add_argument("--distribution", default="cauchy", choices=sort.DISTRIBUTIONS)
        if name in ("incontext", "scaling"):
            p.add_argument("--dim", type=int, default=384, help="feature dim (ViT-S: 384)")
            p.add_argument("--k", type=int, default=30, help="neighbours")
            p.add_argument("--patches", type=int, default=PATCHES_504, help="queries per image (504 px: 36 x 36)")
            p.add_argument("--batch-images", type=int, default=16, help="images per call (eval.incontext.batch_size)")
    return parser.parse_args(argv)

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:  # internal: one measurement, its result as the last line of stdout
        print(json.dumps(CHILDREN[argv[1]](argparse.Namespace(**json.loads(argv[2])))))
        return
    args = parse_args(argv)
    try:
        args.device = train.pick_device(args.device, "--device").type
        for key, (on_cuda, on_cpu) in DEVICE_DEFAULTS.get(args.command, {}).items():
            if getattr(args, key) is None:
                setattr(args, key, on_cuda if args.device == "cuda" else on_cpu)
        globals()[f"cmd_{args.command}"](args)
    except (ValueError, RuntimeError, FileNotFoundError, train.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    main()
