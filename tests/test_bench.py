"""bench.py train / incontext / scaling / augment at tiny shapes: the commands run end to end on the CPU, and what they
report is consistent (images/s from ms, both paths compute the same loss in fp32, the search's work from its
shape). The sort comparison's smoke test is in test_sort.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def bench(*args):
    done = subprocess.run([sys.executable, "bench.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return lines, done.stdout


def test_bench_train_fast_and_faithful_paths():
    lines, out = bench("train", "--device", "cpu", "--arch", "vit_tiny14_reg", "--batch", 2, "--global-size", 56,
                       "--local-size", 28, "--steps", 2, "--warmup", 1, "--breakdown", 1,
                       "--paths", "fast", "faithful", "fp32_sdpa")
    fast, faithful, sdpa = lines
    assert [line["path"] for line in lines] == ["fast", "faithful", "fp32_sdpa"]
    for line in lines:
        assert (line["batch"], line["global_size"], line["precision"]) == (2, 56, "fp32")  # no bf16 on the CPU
        # 4 significant digits whatever the step time (a loaded CPU can take more than 10 s per step)
        assert line["img_per_s"] == pytest.approx(2e3 / line["ms"], rel=1e-3)
        # the profiler's ranges of train.train_step, each a real part of the step
        assert all(line[f"{phase}_ms"] > 0 for phase in ("teacher", "student", "loss", "backward", "update"))
        assert line["peak_mib"] > 0
    assert fast["augment_ms"] > 0 and faithful["augment_ms"] == 0 == sdpa["augment_ms"]  # where augmentation runs
    # the same start and synthetic batch without augmentation, both fp32: the same loss after 3 steps, up to the
    # float rounding of the two attention kernels
    assert faithful["loss"] == pytest.approx(sdpa["loss"], rel=1e-3)
    assert "| fast | fp32 | 2 |" in out and "fast path:" in out and "| path | precision |" in out


def test_bench_incontext_reports_the_search_it_ran():
    lines, out = bench("incontext", "--device", "cpu", "--memory", 50000, "--images", 3, "--patches", 40,
                       "--batch-images", 2, "--dim", 32, "--k", 7)
    (line,) = lines
    assert (line["memory"], line["queries"], line["dim"], line["k"]) == (50000, 120, 32, 7)
    assert line["seconds"] > 0 and line["peak_mib"] >= 0
    rate = 120 * 50000 / line["seconds"]                         # query-key products per second
    assert line["tflops"] == pytest.approx(2 * 32 * rate / 1e12, rel=0.05, abs=2e-3)
    # the projection scales the measured flop rate to the VOC search at dim 384
    assert line["voc_scale_minutes"] == pytest.approx(1449 * 1296 * 10_240_000 * 384 / (rate * 32) / 60, rel=0.05)
    assert "projected linearly" in out


def test_bench_scaling_sweeps():
    lines, out = bench("scaling", "--device", "cpu", "--n", 4, 16, "--sort-rows", 64, "--rows", 32, 64,
                       "--memories", 1000, 3000, "--images", 1, "--patches", 30, "--repeats", 1)
    sorts = [(line["n"], line["rows"], line["layers"]) for line in lines if line["bench"] == "scaling_sort"]
    assert sorts == [(4, 64, 3), (16, 64, 10), (49, 32, 21), (49, 64, 21)]  # bitonic: log2(w)(log2(w)+1)/2 layers
    assert [line["memory"] for line in lines if line["bench"] == "scaling_search"] == [1000, 3000]
    assert "| 16 | 64 | 10 |" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_cuda_without_a_gpu_is_a_one_line_error():
    done = subprocess.run([sys.executable, "bench.py", "train", "--device", "cuda"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == "error: --device is cuda but no GPU is visible (use auto or cpu)\n"


def test_bench_augment_reports_both_places():
    lines, out = bench("augment", "--device", "cpu", "--batch", 2, "--images", 2, "--repeats", 1, "--global-size", 56,
                       "--local-size", 28)
    (line,) = lines
    assert (line["batch"], line["global_size"], line["local_size"]) == (2, 56, 28)
    assert line["loader_reference_ms"] > line["loader_crops_only_ms"] > 0  # the photometric ops cost something
    assert line["device_ms"] > 0
    assert "| loader: crop only (augment_on_device true) |" in out
