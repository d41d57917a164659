"""sort.py: the relaxed sorting networks against a dense per-comparator reference written here from the spec
(../shared/reference/sorting.md), float64 gradchecks, properties of P, the hard-network limit, blocking and
determinism, shapes, argument errors, and the diffsort 0.2.0 oracle (values and gradients, Done-when
tolerances: float32 2e-6 / 1e-4 of the largest gradient, float64 1e-10 / 1e-8)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import sort
from sort import DISTRIBUTIONS, NETWORKS, DiffSort, diff_sort

# -----------------------------------------------------------------------------
# an independent dense reference: one comparator at a time, plain autograd


def reference_layers(n, network):
    """Layers as lists of (a, b, descending) on the real wires; comparators that touch a dummy wire are no-ops
    and left out."""
    if network == "odd_even":
        return [[(i, i + 1, False) for i in range(t % 2, n - 1, 2)] for t in range(n)]
    wires = 1
    while wires < n:
        wires *= 2
    pad = wires - n
    layers = []
    for b in range(wires.bit_length() - 1):
        for l in range(b + 1):
            m = 2 ** (b - l)
            layers.append([(s + j - pad, s + j + m - pad, (s + j) // 2 ** (b + 1) % 2 == 1)
                           for s in range(0, wires, 2 * m) for j in range(m) if s + j >= pad])
    return layers


def reference_alpha(d, distribution, steepness, art_lambda=0.25):
    v = steepness * d
    if distribution == "cauchy":
        return 0.5 + torch.atan(v) / math.pi
    if distribution == "logistic":
        return 1 / (1 + torch.exp(-v))
    if distribution == "logistic_phi":
        return 1 / (1 + torch.exp(-v / (d.abs() + 1e-10) ** art_lambda))
    if distribution == "gaussian":
        return 0.5 * (1 + torch.erf(v / math.sqrt(2)))
    if distribution == "reciprocal":
        return 0.5 + 0.5 * v / (2 + v.abs())
    if distribution == "optimal":
        beyond = (v.abs() > 0.25).to(v.dtype)
        return 0.5 + v.clamp(-0.25, 0.25) + torch.sign(v) * beyond * (0.25 - 1 / (16 * (v.abs() + 1e-10)))
    raise AssertionError(distribution)


def reference_sort(x, network, steepness, distribution):
    rows, n = x.shape
    values = list(x.unbind(1))                                          # wire w: (rows,)
    weights = list(torch.eye(n, dtype=x.dtype).expand(rows, n, n).unbind(2))  # wire w: P[:, :, w], (rows, n)
    for layer in reference_layers(n, network):
        for a, b, descending in layer:
            alpha = reference_alpha(values[b] - values[a], distribution, steepness)
            lo = alpha * values[a] + (1 - alpha) * values[b]
            hi = (1 - alpha) * values[a] + alpha * values[b]
            w_lo = alpha[:, None] * weights[a] + (1 - alpha[:, None]) * weights[b]
            w_hi = (1 - alpha[:, None]) * weights[a] + alpha[:, None] * weights[b]
            if descending:
                lo, hi, w_lo, w_hi = hi, lo, w_hi, w_lo
            values[a], values[b], weights[a], weights[b] = lo, hi, w_lo, w_hi
    return torch.stack(values, 1), torch.stack(weights, 2)


def distinct(rows, n, seed, dtype=torch.float64, spread=1.0):
    """Rows of distinct values: a random permutation of 0..n-1 scaled, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(rows)]).to(dtype)
    return (perm + 0.3 * torch.rand(rows, n, generator=g, dtype=dtype)) * spread


def loss_and_grad(fn, x, seed=0):
    """A random linear function of (x_sorted, P), and its gradient w.r.t. x."""
    x = x.detach().clone().requires_grad_()
    x_sorted, P = fn(x)
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(x_sorted.shape, generator=g, dtype=x.dtype)
    w2 = torch.randn(P.shape, generator=g, dtype=x.dtype)
    ((x_sorted * w1).sum() + (P * w2).sum()).backward()
    return x_sorted.detach(), P.detach(), x.grad


# -----------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_matches_dense_reference(network, distribution):
    for n in (2, 3, 5, 8, 11):
        x = torch.randn(6, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 0.3
        ours = loss_and_grad(lambda t: diff_sort(t, network, 7.0, distribution), x)
        ref = loss_and_grad(lambda t: reference_sort(t, network, 7.0, distribution), x)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("network,n", [("bitonic", 5), ("bitonic", 4), ("odd_even", 5)])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_gradcheck_float64(network, n, distribution):
    x = distinct(2, n, seed=n, spread=0.4).requires_grad_()   # spaced away from ties and the kinks of `optimal`
    assert torch.autograd.gradcheck(lambda t: diff_sort(t, network, 3.0, distribution), (x,), eps=1e-6,
                                    atol=1e-7, rtol=1e-5)


def test_gradcheck_neco_setting():
    x = distinct(2, 9, seed=3, spread=0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: diff_sort(t, "bitonic", 100.0, "cauchy"), (x,), eps=1e-7,
                                    atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_P_doubly_stochastic_and_consistent_with_x_sorted(network, distribution):
    for n in (7, 49):
        x = torch.randn(70, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        x_sorted, P = diff_sort(x, network, 20.0, distribution)
        assert P.shape == (70, n, n) and (P >= 0).all()
        ones = torch.ones(70, n, dtype=torch.float64)
        torch.testing.assert_close(P.sum(1), ones, rtol=0, atol=1e-12)
        torch.testing.assert_close(P.sum(2), ones, rtol=0, atol=1e-12)
        torch.testing.assert_close(x_sorted, torch.einsum("ri,rik->rk", x, P), rtol=0, atol=1e-12)


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("n", [2, 3, 5, 16, 49, 64, 100])
def test_large_steepness_gives_the_hard_permutation(network, n):
    x = distinct(5, n, seed=n)
    x_sorted, P = diff_sort(x, network, steepness=1e9)       # Cauchy: each comparator off by ~1/(pi 1e9)
    order = x.argsort(dim=1)
    hard = torch.zeros(5, n, n, dtype=torch.float64)
    hard.scatter_(1, order.unsqueeze(1), 1.0)                 # hard[r, order[r, k], k] = 1
    torch.testing.assert_close(P, hard, rtol=0, atol=1e-6)
    torch.testing.assert_close(x_sorted, x.sort(dim=1).values, rtol=0, atol=1e-5)


# diffsort's padding (dummy wires first, a comparator touching one is a no-op) leaves the bitonic network unable
# to sort some inputs for n = 22, 38, 42-46, 54, 70, ... (measured on random permutations); powers of two and
# NeCo's n = 49 sort. sort.py keeps these semantics: they are the numbers NeCo was trained with.
BITONIC_NOT_SORTING = (22,)


@pytest.mark.parametrize("network", NETWORKS)
def test_hard_networks_sort_random_permutations(network):
    # logistic at steepness 1e30 on integers: every alpha is exactly 0 or 1, so the relaxed network is the hard one
    for n in range(2, 34):
        x = distinct(200, n, seed=n).floor()
        x_sorted, P = diff_sort(x, network, 1e30, "logistic")
        assert torch.equal(torch.einsum("ri,rik->rk", x, P), x_sorted)
        assert torch.equal(P.sum(1), torch.ones(200, n, dtype=torch.float64))
        in_order = torch.equal(x_sorted, torch.arange(n, dtype=torch.float64).expand(200, n))
        if network == "bitonic" and n in BITONIC_NOT_SORTING:
            assert not in_order
            assert torch.equal(x_sorted[:20], reference_sort(x[:20], network, 1e30, "logistic")[0])
        else:
            assert in_order, (network, n)


def test_neco_setting_float32_P_strictly_positive():
    x = torch.rand(128, 49, generator=torch.Generator().manual_seed(0)) * 2 - 1     # cosine similarities
    _, P = diff_sort(x, "bitonic", 100.0, "cauchy")
    assert P.dtype == torch.float32 and (P > 0).all() and torch.isfinite(P.log()).all()


def test_block_size_does_not_change_results(monkeypatch):
    """Rows are independent: 150 rows at once (two blocks of 128, the last one partial) equal, to the bit, the
    same rows sorted in uneven pieces with 64-row blocks: x_sorted, P and the gradient."""
    x = torch.randn(150, 49, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    w_sorted, w_P = torch.randn(150, 49, generator=g), torch.randn(150, 49, 49, generator=g)

    def run(rows):
        t = x[rows].clone().requires_grad_()
        x_sorted, P = diff_sort(t, "bitonic", 100.0)
        ((x_sorted * w_sorted[rows]).sum() + (P * w_P[rows]).sum()).backward()
        return x_sorted.detach(), P.detach(), t.grad

    assert sort.block_rows(150, 64, 4, torch.device("cpu")) == 128
    whole = run(slice(0, 150))
    monkeypatch.setattr(sort, "CPU_BLOCK_BYTES", 1)           # the smallest blocks: 64 rows
    pieces = [run(slice(i, j)) for i, j in ((0, 1), (1, 70), (70, 150))]
    for k in range(3):
        assert torch.equal(whole[k], torch.cat([p[k] for p in pieces]))


def test_deterministic():
    x = torch.randn(300, 49, generator=torch.Generator().manual_seed(1))
    first, second = (loss_and_grad(lambda t: diff_sort(t, "bitonic", 100.0), x) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("network", NETWORKS)
def test_only_one_output_used(network):
    """Backward skips the part of an unused output (it gets no gradient); the rest must still be exact."""
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for pick in (lambda s, P: s.square().sum(), lambda s, P: (P * P.detach().log()).sum()):
        grads = []
        for fn in (diff_sort, reference_sort):
            t = x.clone().requires_grad_()
            pick(*fn(t, network, 4.0, "logistic")).backward()
            grads.append(t.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


def test_empty_batch():
    x = torch.zeros(0, 5, requires_grad=True)
    x_sorted, P = diff_sort(x)
    assert x_sorted.shape == (0, 5) and P.shape == (0, 5, 5)
    (x_sorted.sum() + P.sum()).backward()
    assert x.grad.shape == (0, 5)


def test_batch_dims_and_vectors():
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    x_sorted, P = diff_sort(x, "odd_even", 5.0)
    flat_sorted, flat_P = diff_sort(x.reshape(6, 6), "odd_even", 5.0)
    assert x_sorted.shape == (2, 3, 6) and P.shape == (2, 3, 6, 6)
    assert torch.equal(x_sorted.reshape(6, 6), flat_sorted) and torch.equal(P.reshape(6, 6, 6), flat_P)
    v_sorted, v_P = diff_sort(x[0, 0], "odd_even", 5.0)
    assert v_sorted.shape == (6,) and v_P.shape == (6, 6)
    assert torch.equal(v_sorted, flat_sorted[0]) and torch.equal(v_P, flat_P[0])


def test_module_matches_function():
    x = torch.randn(10, 13, dtype=torch.float64)
    module = DiffSort(13, "bitonic", 30.0, "logistic_phi", art_lambda=0.5)
    for a, b in zip(module(x), diff_sort(x, "bitonic", 30.0, "logistic_phi", art_lambda=0.5)):
        assert torch.equal(a, b)
    assert torch.device("cpu") in module.layouts


def test_autocast_and_low_precision_inputs_compute_in_float32():
    x = torch.randn(8, 49)
    expected = diff_sort(x, "bitonic", 100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = diff_sort(x, "bitonic", 100.0)
    assert all(g.dtype == torch.float32 and torch.equal(g, e) for g, e in zip(got, expected))
    half = x.to(torch.bfloat16)
    got = diff_sort(half, "bitonic", 100.0)
    assert all(torch.equal(g, e) for g, e in zip(got, diff_sort(half.float(), "bitonic", 100.0)))


@pytest.mark.parametrize("call,message", [
    (lambda: diff_sort(torch.randn(4, 1)), "at least 2"),
    (lambda: diff_sort(torch.tensor(1.0)), "0-dim"),
    (lambda: diff_sort(torch.randn(4, 5), network="merge"), "unknown sorting network"),
    (lambda: diff_sort(torch.randn(4, 5), distribution="laplace"), "unknown distribution"),
    (lambda: diff_sort(torch.randn(4, 5), steepness=0.0), "steepness must be positive"),
    (lambda: diff_sort(torch.randn(4, 5), steepness=-2.0), "steepness must be positive"),
    (lambda: diff_sort(torch.tensor([[0.0, float("nan"), 1.0]])), "contains NaN"),
    (lambda: diff_sort(torch.arange(6).view(2, 3)), "floating-point"),
    (lambda: DiffSort(1), "at least 2"),
    (lambda: DiffSort(5)(torch.randn(3, 4)), r"expects x of shape \(\.\.\., 5\)"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("network", NETWORKS)
def test_check_finite_off_keeps_rows_apart(network):
    """check_finite=False (train.py's setting: no host sync) sorts a NaN row into NaNs without an error, and
    rows stay independent: the finite rows' values and gradients equal a sort of the finite rows alone."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 12, generator=g, dtype=torch.float64)
    x_bad = x.clone()
    x_bad[2, 5] = float("nan")
    x_bad[4, 0] = float("inf")
    grads = torch.randn(6, 12, generator=g, dtype=torch.float64), torch.randn(6, 12, 12, generator=g,
                                                                            dtype=torch.float64)
    x_bad.requires_grad_()
    s_bad, P_bad = diff_sort(x_bad, network, steepness=20.0, check_finite=False)
    torch.autograd.backward((s_bad, P_bad), grads)
    keep = torch.tensor([0, 1, 3, 5])
    x_ok = x[keep].clone().requires_grad_()
    s_ok, P_ok = DiffSort(12, network, steepness=20.0, check_finite=False)(x_ok)
    torch.autograd.backward((s_ok, P_ok), (grads[0][keep], grads[1][keep]))
    assert not torch.isfinite(P_bad[2]).all() and not torch.isfinite(P_bad[4]).all()
    torch.testing.assert_close(P_bad[keep], P_ok, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_bad[keep], s_ok, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_bad.grad[keep], x_ok.grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="contains NaN"):
        DiffSort(12, network)(x_bad)                           # the default still refuses


# -----------------------------------------------------------------------------
# the oracle: diffsort 0.2.0, which NeCo's public code used


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_matches_diffsort(dtype, network, distribution):
    diffsort = pytest.importorskip("diffsort")
    value_tol, grad_tol = (2e-6, 1e-4) if dtype == torch.float32 else (1e-10, 1e-8)
    if dtype == torch.float64 and distribution == "gaussian":
        # diffsort's NormalCDF.backward keeps sigma = 1/steepness as torch.tensor(sigma), a float32, so its float64
        # gradients are off by ~1e-7 relative (ours agree with finite differences, see the gradchecks)
        grad_tol = 1e-6
    for n in ((2, 7, 49) if network == "bitonic" else (2, 7, 24)):
        for steepness in (5.0, 100.0):
            # 64 rows: every diffsort kernel then runs fully vectorised (see sort.comparator_alpha)
            x = torch.randn(64, n, dtype=dtype, generator=torch.Generator().manual_seed(n))
            x[0, 1] = x[0, 0]                                  # a tie
            oracle = diffsort.DiffSortNet(network, n, steepness=steepness, distribution=distribution)
            ref = loss_and_grad(oracle, x)
            ours = loss_and_grad(lambda t: diff_sort(t, network, steepness, distribution), x)
            assert torch.equal(ours[0], ref[0]), (n, steepness)   # the values follow diffsort's ops exactly
            assert (ours[1] - ref[1]).abs().max() <= value_tol, (n, steepness)
            assert (ours[2] - ref[2]).abs().max() <= grad_tol * ref[2].abs().max(), (n, steepness)


# -----------------------------------------------------------------------------
# bench.py sort: the command runs end to end and reports consistent numbers


def test_bench_sort_command():
    pytest.importorskip("diffsort")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "bench.py", "sort", "--rows", "64", "--n", "5", "--repeats", "1"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout.splitlines()[0])
    assert (line["n"], line["rows"], line["network"]) == (5, 64, "bitonic")
    assert line["speedup"] == round(line["diffsort_ms"] / line["ours_ms"], 2)
    assert line["ours_peak_mib"] >= 0 and line["diffsort_peak_mib"] >= 0
    assert "| 64 | 5 |" in done.stdout                        # the markdown table
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, "bench.py", "sort", "--device", "cuda"], cwd=root,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.startswith("error: --device cuda")
