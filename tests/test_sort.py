"""sort.py: the fast path against the plain-autograd reference (float64 to 1e-10, float32 gradients to 1e-4 of
the largest), both against the diffsort 0.2.0 oracle (float32 P to 1e-6, gradients to 1e-4 of the largest;
float64 1e-10 / 1e-8), float64 gradchecks of both, properties of P, the hard-network limit, determinism over
thread counts and row splits, shapes, autocast and argument errors."""

import threading

import pytest
import torch

import sort
from sort import DISTRIBUTIONS, NETWORKS, DiffSort, diff_sort


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


def largest_differences(a, b):
    """Max |difference| of x_sorted and of P, and of the gradients relative to the largest gradient."""
    return ((a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().max().item(),
            ((a[2] - b[2]).abs().max() / b[2].abs().max()).item())


# -----------------------------------------------------------------------------
# exactness: fast path vs reference, both vs diffsort


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_fast_path_matches_reference(network, distribution):
    # 150 rows at n = 49: two blocks of 128 rows, the last partial
    for n, rows in ((2, 40), (3, 40), (5, 40), (11, 40), (49 if network == "bitonic" else 24, 150)):
        for dtype, tol in ((torch.float64, (1e-10, 1e-10, 1e-10)), (torch.float32, (1e-6, 1e-6, 1e-4))):
            x = torch.randn(rows, n, dtype=dtype, generator=torch.Generator().manual_seed(n)) * 0.3
            x[0, 1] = x[0, 0]                                      # a tie
            fast = loss_and_grad(lambda t: diff_sort(t, network, 20.0, distribution), x)
            ref = loss_and_grad(lambda t: diff_sort(t, network, 20.0, distribution, fast=False), x)
            assert all(d <= t for d, t in zip(largest_differences(fast, ref), tol)), (n, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_matches_diffsort(dtype, network, distribution):
    diffsort = pytest.importorskip("diffsort")
    tol = (1e-6, 1e-6, 1e-4) if dtype == torch.float32 else (1e-10, 1e-10, 1e-8)
    if dtype == torch.float64 and distribution == "gaussian":
        # diffsort's NormalCDF.backward keeps sigma = 1/steepness as torch.tensor(sigma), a float32, so its float64
        # gradients are off by ~1e-7 relative (ours agree with finite differences, see the gradchecks)
        tol = (1e-10, 1e-10, 1e-6)
    for n in ((2, 7, 22, 49) if network == "bitonic" else (2, 7, 24)):
        for steepness in (5.0, 100.0):
            x = torch.randn(64, n, dtype=dtype, generator=torch.Generator().manual_seed(n))
            x[0, 1] = x[0, 0]                                      # a tie
            oracle = loss_and_grad(diffsort.DiffSortNet(network, n, steepness=steepness, distribution=distribution), x)
            for fast in (True, False):
                ours = loss_and_grad(lambda t: diff_sort(t, network, steepness, distribution, fast=fast), x)
                assert all(d <= t for d, t in zip(largest_differences(ours, oracle), tol)), (n, steepness, fast)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("network,n", [("bitonic", 5), ("bitonic", 4), ("odd_even", 5)])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_gradcheck_float64(fast, network, n, distribution):
    x = distinct(2, n, seed=n, spread=0.4).requires_grad_()   # spaced away from ties and the kinks of `optimal`
    assert torch.autograd.gradcheck(lambda t: diff_sort(t, network, 3.0, distribution, fast=fast), (x,), eps=1e-6,
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


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("n", [2, 3, 5, 16, 49, 64, 100])
def test_large_steepness_gives_the_hard_permutation(fast, network, n):
    x = distinct(5, n, seed=n)
    x_sorted, P = diff_sort(x, network, steepness=1e9, fast=fast)       # Cauchy: each comparator off by ~1/(pi 1e9)
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
            assert torch.equal(x_sorted[:20], diff_sort(x[:20], network, 1e30, "logistic", fast=False)[0])
        else:
            assert in_order, (network, n)


def test_neco_setting_float32_P_strictly_positive():
    x = torch.rand(128, 49, generator=torch.Generator().manual_seed(0)) * 2 - 1     # cosine similarities
    _, P = diff_sort(x, "bitonic", 100.0, "cauchy")
    assert P.dtype == torch.float32 and (P > 0).all() and torch.isfinite(P.log()).all()


def test_thread_counts_and_row_splits_do_not_change_results(monkeypatch):
    """Rows are independent and every task runs single-threaded on rows in multiples of 64: 1100 rows (tasks and
    blocks of 128, the last partial) with 1, 2 and 3 threads, and the same rows in uneven pieces with 64-row blocks
    and one large task, give x_sorted, P and the gradient to the bit."""
    x = torch.randn(1100, 49, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    w_sorted, w_P = torch.randn(1100, 49, generator=g), torch.randn(1100, 49, 49, generator=g)

    def run(rows):
        t = x[rows].clone().requires_grad_()
        x_sorted, P = diff_sort(t, "bitonic", 100.0)
        ((x_sorted * w_sorted[rows]).sum() + (P * w_P[rows]).sum()).backward()
        return x_sorted.detach(), P.detach(), t.grad

    threads = torch.get_num_threads()
    assert sort.split_rows(1100, 64, 4, torch.device("cpu"))[:2] == (128, 128)
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(run(slice(0, 1100)))
            assert torch.get_num_threads() == count                # restored after forward and backward
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(sort, "CPU_BLOCK_BYTES", 1)           # 64-row blocks
    monkeypatch.setattr(sort, "TASKS", 1)
    assert sort.split_rows(1030, 64, 4, torch.device("cpu"))[:2] == (64, 1024)
    pieces = (run(slice(i, j)) for i, j in ((0, 1), (1, 70), (70, 1100)))
    results.append([torch.cat(parts) for parts in zip(*pieces)])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_tasks_run_single_threaded_on_a_pool(monkeypatch):
    """With 2 torch threads the rows are split into tasks that run on Python threads, each with 1 torch thread."""
    seen = []
    sort_values = sort.sort_values

    def recording(*args):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return sort_values(*args)

    monkeypatch.setattr(sort, "sort_values", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        diff_sort(torch.randn(3136, 49), "bitonic", 100.0)
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 9 and {count for _, count in seen} == {1}   # 3136 rows: 8 tasks of 3 x 128 rows + 64
    assert threading.get_ident() not in {ident for ident, _ in seen}


@pytest.mark.parametrize("fast", [True, False])
def test_no_grad_and_inference_mode(fast):
    x = torch.randn(300, 49, generator=torch.Generator().manual_seed(2))
    expected = diff_sort(x, "bitonic", 100.0, fast=fast)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(diff_sort(x, "bitonic", 100.0, fast=fast), expected))
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(diff_sort(x, "bitonic", 100.0, fast=fast), expected))


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
        for fast in (True, False):
            t = x.clone().requires_grad_()
            pick(*diff_sort(t, network, 4.0, "logistic", fast=fast)).backward()
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


@pytest.mark.parametrize("fast", [True, False])
def test_module_matches_function(fast):
    x = torch.randn(10, 13, dtype=torch.float64)
    module = DiffSort(13, "bitonic", 30.0, "logistic_phi", art_lambda=0.5, fast=fast)
    for a, b in zip(module(x), diff_sort(x, "bitonic", 30.0, "logistic_phi", art_lambda=0.5, fast=fast)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fast", [True, False])
def test_autocast_and_low_precision_inputs_compute_in_float32(fast):
    x = torch.randn(8, 49)
    expected = diff_sort(x, "bitonic", 100.0, fast=fast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = diff_sort(x, "bitonic", 100.0, fast=fast)
    assert all(g.dtype == torch.float32 and torch.equal(g, e) for g, e in zip(got, expected))
    half = x.to(torch.bfloat16)
    got = diff_sort(half, "bitonic", 100.0, fast=fast)
    assert all(torch.equal(g, e) for g, e in zip(got, diff_sort(half.float(), "bitonic", 100.0, fast=fast)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("fast", [True, False])
def test_cuda_matches_cpu(fast):
    """Both paths on CUDA: float64 against the CPU to 1e-10, float32 under bf16 autocast against the CPU's float32."""
    x = torch.randn(3136, 49, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cpu = loss_and_grad(lambda t: diff_sort(t, "bitonic", 100.0, fast=fast), x)
    gpu = loss_and_grad(lambda t: [o.cpu() for o in diff_sort(t.cuda(), "bitonic", 100.0, fast=fast)], x)
    assert all(d <= 1e-10 for d in largest_differences(gpu, cpu))
    x = x.float()
    cpu = loss_and_grad(lambda t: diff_sort(t, "bitonic", 100.0, fast=fast), x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu = loss_and_grad(lambda t: [o.cpu() for o in diff_sort(t.cuda(), "bitonic", 100.0, fast=fast)], x)
    assert all(d <= t for d, t in zip(largest_differences(gpu, cpu), (1e-5, 1e-5, 1e-3)))


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

