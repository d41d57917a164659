"""bench.py's subcommands at tiny shapes: they run end to end on the CPU (each measurement in its own child process),
and what they report is consistent (images/s from ms, both fp32 paths compute the same loss, the sort speedup from
its times, the search's work from its shape, the layers of the sorting network)."""
import json

import pytest
import torch

import bench


def run_bench(capsys, *args):
    bench.main([str(a) for a in args])  # the parent in this process; every measurement in a fresh child
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], out


def test_bench_train_fast_and_faithful_paths(capsys):
    lines, out = run_bench(capsys, "train", "--device", "cpu", "--arch", "vit_tiny14_reg", "--batch", 2,
                           "--global-size", 28, "--local-size", 14, "--steps", 1, "--warmup", 1, "--breakdown", 1,
                           "--paths", "fast", "faithful", "fp32_sdpa")
    fast, faithful, sdpa = lines
    assert [line["path"] for line in lines] == ["fast", "faithful", "fp32_sdpa"]
    for line in lines:
        assert (line["batch"], line["global_size"], line["precision"]) == (2, 28, "fp32")  # no bf16 on the CPU
        # 4 significant digits whatever the step time (a loaded CPU can take more than 10 s per step)
        assert line["img_per_s"] == pytest.approx(2e3 / line["ms"], rel=1e-3)
        # the profiler's ranges of train.train_step, each a real part of the step
        assert all(line[f"{phase}_ms"] > 0 for phase in ("teacher", "student", "loss", "backward", "update"))
        assert line["peak_mib"] > 0
    assert fast["augment_ms"] > 0 and faithful["augment_ms"] == 0 == sdpa["augment_ms"]  # where augmentation runs
    # the same start and synthetic batch, augmented in the loader, both fp32: the same loss at the second step (after
    # one update), up to the float rounding of the two attention kernels
    assert faithful["loss"] == pytest.approx(sdpa["loss"], rel=1e-3)
    assert "| fast | fp32 | 2 |" in out and "fast path:" in out and "| path | precision |" in out


def test_bench_sort_command(capsys):
    pytest.importorskip("diffsort")
    lines, out = run_bench(capsys, "sort", "--device", "cpu", "--rows", 64, "--n", 5, "--repeats", 1)
    assert [line["threads"] for line in lines] == [1, torch.get_num_threads()]  # --threads 1 0 by default
    line = lines[0]
    assert (line["n"], line["rows"], line["network"]) == (5, 64, "bitonic")
    assert line["speedup"] == round(line["diffsort_ms"] / line["ours_ms"], 2)
    assert line["ours_peak_mib"] >= 0 and line["diffsort_peak_mib"] >= 0
    assert "| 64 | 5 | 1 |" in out  # the markdown table


def test_bench_incontext_reports_the_search_it_ran(capsys):
    lines, out = run_bench(capsys, "incontext", "--device", "cpu", "--memory", 50000, "--images", 3, "--patches", 40,
                           "--batch-images", 2, "--dim", 32, "--k", 7)
    (line,) = lines
    assert (line["memory"], line["queries"], line["dim"], line["k"]) == (50000, 120, 32, 7)
    assert line["seconds"] > 0 and line["peak_mib"] >= 0
    rate = 120 * 50000 / line["seconds"]  # query-key products per second
    assert line["tflops"] == pytest.approx(2 * 32 * rate / 1e12, rel=0.05, abs=2e-3)
    # the projection scales the measured flop rate to the VOC search at dim 384
    assert line["voc_scale_minutes"] == pytest.approx(1449 * 1296 * 10_240_000 * 384 / (rate * 32) / 60, rel=0.05)
    assert "projected linearly" in out


def test_bench_scaling_sweeps(capsys):
    lines, out = run_bench(capsys, "scaling", "--device", "cpu", "--n", 4, 49, "--sort-rows", 32, "--rows", 32, 64,
                           "--memories", 1000, 3000, "--images", 1, "--patches", 30, "--repeats", 1)
    sorts = [(line["n"], line["rows"], line["layers"]) for line in lines if line["bench"] == "scaling_sort"]
    # bitonic: log2(w)(log2(w)+1)/2 layers for the next power of two w; (49, 32) is measured once
    assert sorts == [(4, 32, 3), (49, 32, 21), (49, 64, 21)]
    assert [line["memory"] for line in lines if line["bench"] == "scaling_search"] == [1000, 3000]
    assert "| 4 | 32 | 3 |" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "sort", "incontext", "scaling", "augment"])
def test_bench_cuda_without_a_gpu_is_a_one_line_error(capsys, command):
    with pytest.raises(SystemExit) as exit:
        bench.main([command, "--device", "cuda"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == "error: --device is cuda but no GPU is visible (use auto or cpu)\n"


def test_bench_augment_reports_both_places(capsys):
    lines, out = run_bench(capsys, "augment", "--device", "cpu", "--batch", 2, "--images", 2, "--repeats", 1,
                           "--global-size", 56, "--local-size", 28)
    (line,) = lines
    assert (line["batch"], line["global_size"], line["local_size"]) == (2, 56, 28)
    assert line["loader_reference_ms"] > line["loader_crops_only_ms"] > 0  # the photometric ops cost something
    assert line["device_ms"] > 0
    assert "| loader: crop only (augment_on_device true) |" in out
