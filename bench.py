"""
Benchmarks, one subcommand per part of the project:

    python bench.py sort [--rows 3136] [--n 49 16 64 128] [--device cpu|cuda]

Every measurement prints one JSON line; a markdown table with the ratios follows at the end.

sort: forward+backward time and peak memory of sort.diff_sort against diffsort 0.2.0's DiffSortNet (the dense
method NeCo's public code used; `pip install diffsort==0.2.0`), side by side in one run, at NeCo's shape
(3136 rows = 64 images x 49 queries, n = 49, bitonic, Cauchy, steepness 100) and at other n. Where diffsort would
need more than --dense-max-mib (n = 128: ~17 GiB at 3136 rows), both methods get fewer rows. ~70 s on 2 cores.
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

import sort

# -----------------------------------------------------------------------------
# sort

METHODS = ("ours", "diffsort")


def dense_rows_cap(n, network, max_mib):
    """diffsort keeps a few (rows, n, n) tensors per layer for backward: its peak was measured at 17-18 bytes per
    row, layer and n^2 (float32, CPU). The largest multiple of 49 rows whose estimate fits under max_mib (>= 49)."""
    layers = sum(len(stage.layers) for stage in sort.build_layout(n, network)[1])
    per_row = 18 * layers * n * n
    return max(49, int(max_mib * 2**20 // per_row) // 49 * 49)


def make_sorter(method, n, args):
    """A function x (rows, n) -> (x_sorted, P) for the method."""
    if method == "ours":
        return sort.DiffSort(n, args.network, args.steepness, args.distribution)
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


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def resident_bytes():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status; peak memory needs Linux")


def timed_peak_run(sorter, x, grads, device):
    """(ms, peak MiB) of one forward+backward. Peak = memory in use above what was in use just before the run
    (inputs, gradients, code). CUDA: the allocator's peak. CPU: the process's peak resident set (VmHWM, reset
    through clear_refs), which counts every allocation, torch's or not; hence one fresh process per method."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                        # resets VmHWM to the current resident set
        base = resident_bytes()
    start = time.perf_counter()
    forward_backward(sorter, x, grads)
    sync(device)
    ms = (time.perf_counter() - start) * 1e3
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_resident_bytes()
    return ms, (peak - base) / 2**20


def cmd_sort_one(args):
    """Child process of `sort`, one per method and n: a run on 64 rows loads the method's code and lazy state,
    then `repeats` runs on the real input, the first of which gives the peak memory. Prints JSON."""
    sorter = make_sorter(args.method, args.n, args)
    forward_backward(sorter, *sort_inputs(64, args.n, args.device))
    x, grads = sort_inputs(args.rows, args.n, args.device)
    times, peak = [], None
    for _ in range(args.repeats):
        ms, mib = timed_peak_run(sorter, x, grads, args.device)
        times.append(ms)
        peak = mib if peak is None else peak
    print(json.dumps({"ms": statistics.median(times), "peak_mib": peak}))


def run_one(method, n, rows, args):
    command = [sys.executable, os.path.abspath(__file__), "sort-one", method, str(n), str(rows),
               "--repeats", str(args.repeats), "--network", args.network, "--steepness", str(args.steepness),
               "--distribution", args.distribution, "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sort-one {method} n={n} failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout)


def cmd_sort(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device available")
    results = []
    for n in args.n:
        sort.check_arguments(n, args.network, args.steepness, args.distribution)
        rows = min(args.rows, dense_rows_cap(n, args.network, args.dense_max_mib))
        line = {"bench": "sort", "n": n, "rows": rows, "network": args.network, "distribution": args.distribution,
                "steepness": args.steepness, "device": args.device, "threads": torch.get_num_threads()}
        for method in METHODS:                                  # one after the other, each in a fresh process
            one = run_one(method, n, rows, args)
            line.update({f"{method}_ms": round(one["ms"], 1), f"{method}_peak_mib": round(one["peak_mib"], 1)})
        line["speedup"] = round(line["diffsort_ms"] / line["ours_ms"], 2)
        line["memory_ratio"] = round(line["diffsort_peak_mib"] / max(line["ours_peak_mib"], 1e-3), 2)
        print(json.dumps(line), flush=True)
        results.append(line)
    device = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"\nforward+backward, {args.network}, {args.distribution}, steepness {args.steepness}, {device}, "
          f"median of {args.repeats}; peak = memory above the inputs during one forward+backward\n")
    print("| rows | n | ours ms | diffsort ms | speedup | ours peak MiB | diffsort peak MiB | memory ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']} | {r['n']} | {r['ours_ms']} | {r['diffsort_ms']} | {r['speedup']}x | "
              f"{r['ours_peak_mib']} | {r['diffsort_peak_mib']} | {r['memory_ratio']}x |")


# -----------------------------------------------------------------------------


def add_sort_options(p):
    p.add_argument("--network", default="bitonic", choices=sort.NETWORKS)
    p.add_argument("--steepness", type=float, default=100.0)
    p.add_argument("--distribution", default="cauchy", choices=sort.DISTRIBUTIONS)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("sort", help="diff_sort vs diffsort.DiffSortNet: forward+backward time and peak memory")
    p.add_argument("--rows", type=int, default=3136, help="rows sorted at once (NeCo: 64 images x 49 queries)")
    p.add_argument("--n", type=int, nargs="+", default=[49, 16, 64, 128], help="lengths to sort")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    p.add_argument("--dense-max-mib", type=float, default=4700,
                   help="use fewer rows (for both methods) where diffsort would need more memory than this")
    add_sort_options(p)
    p.set_defaults(run=cmd_sort)

    p = commands.add_parser("sort-one", help="internal: time and peak memory of one method, in this process")
    p.add_argument("method", choices=METHODS)
    p.add_argument("n", type=int)
    p.add_argument("rows", type=int)
    p.add_argument("--repeats", type=int, default=3)
    add_sort_options(p)
    p.set_defaults(run=cmd_sort_one)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
