"""
Differentiable sorting networks (Petersen et al., ICML 2021 / ICLR 2022), as used by NeCo's loss, with the numbers
of the `diffsort` 0.2.0 package that NeCo's public code used.

    x_sorted, P = diff_sort(x, network="bitonic", steepness=100.0)   # x: (rows, n)
    # x_sorted[r, k] = sum_i x[r, i] * P[r, i, k]; P is doubly stochastic, sorted ascending.

First the algorithm in plain autograd (the reference, `fast=False`), then the fast path (`fast=True`, the
default): the same numbers, a fraction of the memory and time. Imports only torch: copy this file.
"""

import math
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

NETWORKS = ("bitonic", "odd_even")
DISTRIBUTIONS = ("cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal")

# -----------------------------------------------------------------------------
# the reference: a sorting network whose comparators are relaxed, one layer at a time, in plain autograd.
# Each wire carries a value (for every row) and the weights of the inputs on it; P starts as the identity.
def comparator_alpha(d, distribution, steepness, art_lambda):
    """alpha = F(steepness * d) for d = x_b - x_a: the weight of x_a in the relaxed min (diffsort's op order)."""
    v = steepness * d
    if distribution == "cauchy":
        return 1 / math.pi * torch.atan(v) + 0.5
    if distribution == "logistic":
        return torch.sigmoid(v)
    if distribution == "logistic_phi":
        return torch.sigmoid(d * steepness / (d.abs() + 1e-10).pow(art_lambda))
    if distribution == "gaussian":
        return 0.5 + 0.5 * torch.erf(d / (1 / steepness) / math.sqrt(2))  # Phi(v), the standard normal CDF
    if distribution == "reciprocal":
        return 0.5 * (v / (2 + v.abs()) + 1)
    if distribution == "optimal":
        beyond = (v > 0.25).to(v.dtype) - (v < -0.25).to(v.dtype)      # sign(v) where |v| > 1/4
        return v.clamp(-0.25, 0.25) + 0.5 + beyond * (0.25 - 1 / 16 / (v.abs() + 1e-10))
    raise ValueError(f"unknown distribution {distribution!r}; use one of {DISTRIBUTIONS}")

def relaxed_min_max(alpha, a, b, descending):
    """New contents of slots a and b: the relaxed min goes to slot a and the max to slot b, or swapped."""
    lo = alpha * a + (1 - alpha) * b
    hi = (1 - alpha) * a + alpha * b
    return torch.where(descending, hi, lo), torch.where(descending, lo, hi)

# A layer of disjoint comparators: wires [start, start + 2 * chunks * m) reshape to (chunks, 2, m), and comparator
# (c, j) compares wire a = start + 2mc + j (slot a) with wire b = a + m (slot b). descending, dummy: (chunks, m).
# group: while this layer runs, wires only ever mixed inside consecutive groups of this size (for the fast path).
Layer = namedtuple("Layer", "start chunks m descending dummy group")

def wire_pairs(t, layer):
    """Slot-a and slot-b views of t (wires, ...): (chunks, m, ...) each."""
    pairs = t[layer.start:layer.start + 2 * layer.chunks * layer.m].unflatten(0, (layer.chunks, 2, layer.m))
    return pairs[:, 0], pairs[:, 1]

def with_pairs(t, layer, a, b):
    """t (wires, ...) with a, b (chunks, m, ...) on the layer's slots a and b; wires outside it pass through."""
    stop = layer.start + 2 * layer.chunks * layer.m
    return torch.cat([t[:layer.start], torch.stack([a, b], 1).flatten(0, 2), t[stop:]])

def comparator_layer(x, P, layer, distribution, steepness, art_lambda):
    """One layer on x (wires, rows), the value on each wire, and P (wires, n, rows), the weight of each input on
    each wire: alpha = F(steepness (x_b - x_a)), then the same min/max mix of the values and of the weights."""
    x_a, x_b = wire_pairs(x, layer)                                   # (chunks, m, rows)
    alpha = comparator_alpha(x_b - x_a, distribution, steepness, art_lambda)
    alpha = torch.where(layer.dummy[..., None], 1.0, alpha)           # a dummy comparator changes nothing
    descending = layer.descending[..., None]                          # (chunks, m, 1)
    P_a, P_b = wire_pairs(P, layer)                                   # (chunks, m, n, rows)
    x = with_pairs(x, layer, *relaxed_min_max(alpha, x_a, x_b, descending))
    P = with_pairs(P, layer, *relaxed_min_max(alpha[:, :, None], P_a, P_b, descending[..., None]))
    return x, P

def bitonic_network(n):
    """Bitonic network on N = 2^ceil(log2 n) wires. Real wire i sits at i + N - n: the first N - n wires are
    dummies, and a comparator touching one leaves both wires unchanged (diffsort's padding). Block b, layer l
    compares (a, a + m), m = 2^(b-l), descending when a // 2^(b+1) is odd. Returns (N, layers)."""
    blocks = max(1, math.ceil(math.log2(n)))
    wires = 2 ** blocks
    layers = []
    for b in range(blocks):
        for l in range(b + 1):
            m = 2 ** (b - l)
            a = torch.arange(wires).view(-1, 2, m)[:, 0]              # (chunks, m): wire a of each comparator
            dummy = a < wires - n                                     # a < b: if either is a dummy, a is
            descending = (a // 2 ** (b + 1) % 2 == 1) & ~dummy
            layers.append(Layer(0, wires // (2 * m), m, descending, dummy, 2 ** (b + 1)))
    return wires, layers

def odd_even_network(n):
    """Odd-even transposition: layer t compares (0,1), (2,3), ... for even t, (1,2), (3,4), ... for odd t."""
    layers = []
    for t in range(n):
        chunks = (n - t % 2) // 2                                     # n = 2 has one empty layer: left out
        never = torch.zeros(chunks, 1, dtype=torch.bool)
        layers += [Layer(t % 2, chunks, 1, never, never, n)] if chunks else []
    return n, layers

def reference_sort(x, net, distribution, steepness, art_lambda):
    """x (rows, n) -> x_sorted (rows, n), P (rows, n, n), the network (wires, layers) one layer at a time."""
    (wires, layers), (rows, n) = net, x.shape
    x = F.pad(x.T, (0, 0, wires - n, 0))                              # (wires, rows), the dummy wires first
    P = torch.eye(n, dtype=x.dtype, device=x.device)[..., None].expand(n, n, rows)
    P = F.pad(P, (0, 0, 0, 0, wires - n, 0))                          # (wires, n, rows): input i on wire i
    for layer in layers:
        x, P = comparator_layer(x, P, layer, distribution, steepness, art_lambda)
    return x[wires - n:].T, P[wires - n:].permute(2, 1, 0)            # P[r, i, k]: input i at rank k

# -----------------------------------------------------------------------------
# the fast path. The values alone decide every alpha, so they go through the network first, as above. P is then
# a linear mix of the wires' weights, pushed through ALL layers one cache-sized block of rows at a time. Backward
# keeps only x and every comparator's d = x_b - x_a, and recomputes the rest. Rows are split into tasks that run
# single-threaded on a pool of Python threads (see run_tasks).
CPU_BLOCK_BYTES = 1 << 21     # a block's state (wires, wires, B rows) in the L2 cache of a core
CUDA_BLOCK_BYTES = 1 << 24    # larger: a block has to fill the GPU
TASKS = 8                     # CPU: rows are split into about this many tasks, so that a slow thread can be helped
PARALLEL_ELEMENTS = 1 << 18   # CPU: a smaller block state runs on one thread (measured: n = 16 slower on two)

@lru_cache(maxsize=64)
def network_layers(n, name, device="cpu"):
    """(wires, layers) of a network on n inputs, its masks on `device` (cached)."""
    wires, layers = bitonic_network(n) if name == "bitonic" else odd_even_network(n)
    return wires, [l._replace(descending=l.descending.to(device), dummy=l.dummy.to(device)) for l in layers]

def per_layer(packed, layers):
    """Each layer's (chunks, m, rows) view of a (comparators, rows) tensor."""
    parts = packed.split([layer.chunks * layer.m for layer in layers])
    return [p.unflatten(0, (layer.chunks, layer.m)) for p, layer in zip(parts, layers)]

def sort_values(x, net, D, C, distribution, steepness, art_lambda):
    """x (rows, n) through the network as comparator_layer moves it, to the bit; writes every layer's
    d = x_b - x_a into D[t] and its c into C[t] (chunks, m, rows). c is the share of a wire's content that moves
    to the other wire of its pair: 1 - alpha ascending, alpha descending, 0 for a dummy. Returns x_sorted."""
    (wires, layers), n = net, x.shape[1]
    x = F.pad(x.T, (0, 0, wires - n, 0))                              # (wires, rows)
    for layer, d, c in zip(layers, D, C):
        x_a, x_b = wire_pairs(x, layer)
        alpha = comparator_alpha(torch.sub(x_b, x_a, out=d), distribution, steepness, art_lambda)
        alpha.masked_fill_(layer.dummy[..., None], 1)
        x = with_pairs(x, layer, *relaxed_min_max(alpha, x_a, x_b, layer.descending[..., None]))
        torch.where(layer.descending[..., None], alpha, 1 - alpha, out=c)
    return x[wires - n:].T

def values_backward(g, layers, D, C, dC, g_C):
    """In place on g (wires, rows): the gradient w.r.t. the sorted values becomes that w.r.t. the input values.
    g_C[t]: dL/dc from the weights; dC[t] = dc/dd. In the c form a layer is a <- a - c (a - b), b <- b + c (a - b)."""
    for t in reversed(range(len(layers))):
        g_a, g_b = wire_pairs(g, layers[t])
        e = g_b - g_a
        g_d = g_C[t].addcmul_(e, D[t], value=-1).mul_(dC[t])          # + the values' own dL/dc: e (a - b)
        g_a.addcmul_(e, C[t]).sub_(g_d)
        g_b.addcmul_(e, C[t], value=-1).add_(g_d)

class Block:
    """Pushes B rows of P at a time through all layers, in a state (wires, wires, B): state[i, w, r] is the weight
    of input i on wire w in row r (rows last, so every op is one long vectorised loop). While the wires mix only
    inside groups of g, an input stays on the wires of its group and only the diagonal (g, g) blocks change: a
    layer works on those alone, viewed as (G, g, g, B), less the leading groups that hold only dummy inputs. The
    mix is in place: a <- a - c (a - b), b <- b + c (a - b) (rounded differently from the reference, < 1e-6)."""

    def __init__(self, net, n, B, like, C, g_C=None):
        wires, layers = net
        pad = wires - n
        self.state = like.new_empty(wires, wires, B)
        self.eye = torch.eye(wires, dtype=like.dtype, device=like.device)[..., None].expand_as(self.state)
        self.layers = []
        for t, (layer, c) in enumerate(zip(layers, C)):
            G, g, skip = wires // layer.group, layer.group, pad // layer.group
            blocks = self.state.unflatten(0, (G, g)).unflatten(2, (G, g)).diagonal(0, 0, 2).permute(3, 0, 1, 2)
            blocks = blocks[skip:] if G - skip > 1 else blocks[skip:, pad % g:]   # one group: real inputs only
            chunks = layer.chunks // G
            pairs = blocks[:, :, layer.start:layer.start + 2 * chunks * layer.m].unflatten(2, (chunks, 2, layer.m))
            grouped = lambda u: u.unflatten(0, (G, chunks))[skip:]   # (chunks, m, rows) -> (G', chunks/G, m, rows)
            g_c = None if g_C is None else grouped(g_C[t])
            self.layers.append((pairs[:, :, :, 0], pairs[:, :, :, 1], grouped(c).unsqueeze(1), g_c))

    def push(self, b0, diffs=None):
        """Rows b0:b0+B of the task through all layers; diffs: keep every layer's a - b, for pull."""
        self.state.copy_(self.eye)
        for t, (a, b, c, _) in enumerate(self.layers):                # a, b: (G', inputs, chunks/G, m, B)
            c = c.narrow(-1, b0, self.state.shape[2])
            diff = torch.sub(a, b) if diffs is None else torch.sub(a, b, out=diffs[t])
            a.addcmul_(diff, c, value=-1)
            b.addcmul_(diff, c)

    def pull(self, b0, diffs):
        """The transpose of push, on a state that holds dL/dP: writes dL/dc = sum over inputs of (g_b - g_a)(a - b)
        into g_C."""
        B = self.state.shape[2]
        for t in reversed(range(len(self.layers))):
            g_a, g_b, c, g_c = self.layers[t]
            c = c.narrow(-1, b0, B)
            e = g_b - g_a
            torch.sum(diffs[t].mul_(e), dim=1, out=g_c.narrow(-1, b0, B))
            g_a.addcmul_(e, c)
            g_b.addcmul_(e, c, value=-1)

def split_rows(rows, wires, itemsize, device):
    """(B, T, threads): rows per block and per task, both multiples of 64 so that no kernel has a scalar tail (it
    rounds differently) and the results do not depend on how the rows are split; the threads to run the tasks on.
    Below PARALLEL_ELEMENTS per block an op is so short that threads would mostly wait for the GIL."""
    cuda = device.type == "cuda"
    fit = (CUDA_BLOCK_BYTES if cuda else CPU_BLOCK_BYTES) // (wires ** 2 * itemsize)     # rows in the budget
    B = max(64, min(fit, rows + 63 if cuda else rows // TASKS) // 64 * 64)
    T = -(-rows // B) * B if cuda else max(B, rows // (TASKS * B) * B)
    return B, T, torch.get_num_threads() if wires ** 2 * B >= PARALLEL_ELEMENTS else 1

def run_tasks(task, starts, device, threads):
    """CPU: the tasks on a pool of `threads` Python threads, each task single-threaded (torch ops
    release the GIL). On a shared CPU the OS deschedules threads: then one op split over all threads stalls them
    all at its end, thousands of times per call, while here a slow thread delays only its own task and the others
    take the rest. The results do not depend on the thread count. CUDA: one after the other."""
    if device.type != "cpu":
        return [task(r0) for r0 in starts]
    torch_threads, grad, inference = torch.get_num_threads(), torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def single_threaded(r0):                   # a new thread starts with torch's defaults: the caller's modes
        torch.set_num_threads(1)
        with torch.set_grad_enabled(grad), torch.inference_mode(inference):
            task(r0)

    try:
        with ThreadPoolExecutor(max(1, min(threads, len(starts)))) as pool:
            list(pool.map(single_threaded, starts))
    finally:
        torch.set_num_threads(torch_threads)

class FastSort(torch.autograd.Function):
    """(x (rows, n), net, distribution, steepness, art_lambda) -> (x_sorted (rows, n), P (rows, n, n))."""

    @staticmethod
    def forward(ctx, x, net, distribution, steepness, art_lambda):
        (wires, layers), (rows, n) = net, x.shape
        B, T, threads = split_rows(rows, wires, x.element_size(), x.device)
        x_pad = F.pad(x, (0, 0, 0, -rows % T))                        # whole tasks; rows past the end are 0
        D, C = x.new_empty(2, sum(layer.chunks * layer.m for layer in layers), len(x_pad))  # (comparators, rows)
        x_sorted, P = torch.empty_like(x), x.new_empty(rows, n, n)

        def task(r0):
            D_t, C_t = per_layer(D[:, r0:r0 + T], layers), per_layer(C[:, r0:r0 + T], layers)
            x_sorted[r0:r0 + T] = sort_values(x_pad[r0:r0 + T], net, D_t, C_t, distribution, steepness,
                                              art_lambda)[:rows - r0]
            block = Block(net, n, B, x, C_t)
            for b0 in range(0, min(T, rows - r0), B):
                block.push(b0)
                P[r0 + b0:r0 + b0 + B] = block.state[wires - n:, wires - n:, :rows - r0 - b0].permute(2, 0, 1)

        run_tasks(task, range(0, rows, T), x.device, threads)
        ctx.save_for_backward(x, D)
        ctx.settings = (net, distribution, steepness, art_lambda, B, T, threads)
        ctx.set_materialize_grads(False)      # an unused output gets None, and its part of backward is skipped
        return x_sorted, P

    @staticmethod
    def backward(ctx, grad_sorted, grad_P):
        x, D = ctx.saved_tensors
        net, distribution, steepness, art_lambda, B, T, threads = ctx.settings
        (wires, layers), (rows, n) = net, x.shape
        descending = torch.cat([layer.descending.flatten() for layer in layers])[:, None]   # (comparators, 1)
        dummy = torch.cat([layer.dummy.flatten() for layer in layers])[:, None]
        g_x = torch.empty_like(x)

        def task(r0):
            with torch.enable_grad():                                 # every comparator's c and dc/dd at once
                d = D[:, r0:r0 + T].detach().requires_grad_()
                alpha = comparator_alpha(d, distribution, steepness, art_lambda).masked_fill(dummy, 1)
                c = torch.where(descending, alpha, 1 - alpha)
                dC, = torch.autograd.grad(c, d, torch.ones_like(c))
            C_t, g_C = per_layer(c.detach(), layers), per_layer(torch.zeros_like(dC), layers)
            if grad_P is not None:
                block = Block(net, n, B, x, C_t, g_C)
                diffs = [torch.empty_like(a) for a, *_ in block.layers]
                for b0 in range(0, min(T, rows - r0), B):
                    block.push(b0, diffs)
                    block.state.zero_()
                    block.state[wires - n:, wires - n:, :rows - r0 - b0] = grad_P[r0 + b0:r0 + b0 + B].permute(
                        1, 2, 0)
                    block.pull(b0, diffs)
            g = x.new_zeros(wires, T)
            if grad_sorted is not None:
                g[wires - n:, :rows - r0] = grad_sorted[r0:r0 + T].T
            values_backward(g, layers, per_layer(d.detach(), layers), C_t, per_layer(dC, layers), g_C)
            g_x[r0:r0 + T] = g[wires - n:, :rows - r0].T

        run_tasks(task, range(0, rows, T), x.device, threads)
        return g_x, None, None, None, None

# -----------------------------------------------------------------------------
# public API
def check_arguments(n, network, steepness, distribution):
    if n < 2:
        raise ValueError(f"diff_sort needs at least 2 elements to sort, got n={n}")
    if network not in NETWORKS:
        raise ValueError(f"unknown sorting network {network!r}; use one of {NETWORKS}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; use one of {DISTRIBUTIONS}")
    if not steepness > 0:
        raise ValueError(f"steepness must be positive, got {steepness}")

def diff_sort(x, network="bitonic", steepness=10.0, distribution="cauchy", art_lambda=0.25, check_finite=True,
              fast=True):
    """Relaxed ascending sort of x (..., n) along its last dim. Returns (x_sorted (..., n), P (..., n, n)) with
    x_sorted[..., k] = sum_i x[..., i] * P[..., i, k]. fast=False runs the reference (the same numbers with
    diffsort's memory). float16 / bfloat16 inputs and autocast compute in float32.
    check_finite=False skips the NaN/inf check, which costs a host-device sync on CUDA; a non-finite input then
    gives non-finite outputs in its own rows only (for callers that test their loss anyway, like a training step)."""
    if x.dim() == 0:
        raise ValueError("diff_sort: x must have shape (..., n), got a 0-dim tensor")
    shape, n = x.shape, x.shape[-1]
    check_arguments(n, network, steepness, distribution)
    if not x.is_floating_point():
        raise ValueError(f"diff_sort: x must be a floating-point tensor, got {x.dtype}")
    if check_finite and not torch.isfinite(x).all():
        raise ValueError("diff_sort: x contains NaN or infinite values; the relaxed sort needs finite inputs")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    net = network_layers(n, network, x.device)
    with torch.autocast(x.device.type, enabled=False):
        x_sorted, P = (FastSort.apply if fast else reference_sort)(x.reshape(-1, n), net, distribution,
                                                                   float(steepness), float(art_lambda))
    return x_sorted.view(shape), P.view(*shape, n)

class DiffSort(nn.Module):
    """diff_sort as a module for a fixed n."""

    def __init__(self, n, network="bitonic", steepness=10.0, distribution="cauchy", art_lambda=0.25,
                 check_finite=True, fast=True):
        super().__init__()
        check_arguments(n, network, steepness, distribution)
        self.n, self.network, self.steepness, self.distribution = n, network, steepness, distribution
        self.art_lambda, self.check_finite, self.fast = art_lambda, check_finite, fast

    def forward(self, x):
        if x.dim() == 0 or x.shape[-1] != self.n:
            raise ValueError(f"DiffSort(n={self.n}) expects x of shape (..., {self.n}), got {tuple(x.shape)}")
        return diff_sort(x, self.network, self.steepness, self.distribution, self.art_lambda, self.check_finite,
                         self.fast)

    def extra_repr(self):
        return (f"n={self.n}, network={self.network!r}, steepness={self.steepness}, "
                f"distribution={self.distribution!r}, art_lambda={self.art_lambda}, fast={self.fast}")
