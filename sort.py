"""
Differentiable sorting networks (Petersen et al., ICML 2021 / ICLR 2022), as used by NeCo's loss.

    x_sorted, P = diff_sort(x, network="bitonic", steepness=100.0)   # x: (rows, n)
    # x_sorted[r, k] = sum_i x[r, i] * P[r, i, k]; P is doubly stochastic, sorted ascending.

The numbers are those of the `diffsort` 0.2.0 package (float32 P bit for bit), but a layer here is a mix of
wire pairs instead of dense selection-matrix products, and backward keeps only x and the per-layer
comparator coefficients alpha (rows x layers x n/2 numbers) instead of every layer's (rows, n, n) tensors.

How it runs: each input element's trajectory over the wires (a row of P) evolves independently, so we push a
block of rows through ALL layers while its state is still in cache, then move on to the next block. Streaming
the whole batch through memory once per layer is memory-bound on a CPU; block-by-block is several times faster
and gives the same numbers. Backward recomputes a block's forward (from the saved alphas, no comparisons
needed), keeps that block's per-layer states, and walks the layers in reverse. Only elementwise ops and
last-dim sums: deterministic on CPU and CUDA. This file imports only torch; copy it into your project.
"""

import math
from functools import lru_cache

import torch
import torch.nn as nn

NETWORKS = ("bitonic", "odd_even")
DISTRIBUTIONS = ("cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal")

# bytes of one block's state (rows, wires, n + 1): ~L2-sized on a CPU, large on a GPU to fill the device
CPU_BLOCK_BYTES = 1 << 19
CUDA_BLOCK_BYTES = 1 << 25

# -----------------------------------------------------------------------------
# network layouts


class Layer:
    """One layer of disjoint comparators, laid out so that the wires [start, start + 2*C*m) reshape to (C, 2, m):
    chunk c compares wire start + 2mc + j (slot a) with wire start + 2mc + m + j (slot b), for j < m.
    Wires outside that range pass through unchanged."""

    def __init__(self, start, chunks, m, descending=None, fixed=None):
        self.start, self.chunks, self.m = start, chunks, m
        self.stop = start + 2 * chunks * m
        self.size = chunks * m                # comparators in this layer
        self.descending = descending          # (C, 1) bool or None: min goes to slot b, max to slot a
        self.fixed = fixed                    # (C, m) bool or None: comparators touching a dummy wire (no-ops)
        self.fixed_alpha = None               # (C, m): alpha that makes a no-op (1 ascending, 0 descending)
        if fixed is not None:
            # float32 so that torch.where promotes it to alpha's dtype (float32 or float64) exactly
            asc = torch.ones(chunks, 1) if descending is None else (~descending).float()
            self.fixed_alpha = asc.expand(chunks, m).clone()

    def to(self, device):
        moved = Layer(self.start, self.chunks, self.m)
        moved.descending = None if self.descending is None else self.descending.to(device)
        moved.fixed = None if self.fixed is None else self.fixed.to(device)
        moved.fixed_alpha = None if self.fixed_alpha is None else self.fixed_alpha.to(device)
        return moved


def bitonic_layers(n):
    """Bitonic network on N = 2^ceil(log2 n) wires; real wire i sits at padded position i + N - n, the first
    N - n positions are dummy wires, and a comparator touching a dummy wire changes nothing. Returns (N, layers)."""
    blocks = max(1, math.ceil(math.log2(n)))
    wires = 2 ** blocks
    pad = wires - n
    layers = []
    for b in range(blocks):
        for l in range(b + 1):
            m = 2 ** (b - l)
            chunks = wires // (2 * m)
            first = torch.arange(chunks) * 2 * m                   # (C,) first wire of each chunk
            # the direction is constant inside a chunk because 2m divides 2^(b+1)
            descending = ((first // 2 ** (b + 1)) % 2 == 1).unsqueeze(1)
            # slot a is the lower wire, so a comparator touches a dummy iff its slot a does
            fixed = (first.unsqueeze(1) + torch.arange(m)) < pad  # (C, m)
            layers.append(Layer(0, chunks, m, descending if descending.any() else None,
                                fixed if fixed.any() else None))
    return wires, layers


def odd_even_layers(n):
    """Odd-even transposition network: n layers; layer t compares (0,1), (2,3), ... for even t and (1,2),
    (3,4), ... for odd t, all ascending. Returns (n, layers)."""
    return n, [Layer(t % 2, (n - t % 2) // 2, 1) for t in range(n)]


@lru_cache(maxsize=64)
def network_layout(n, network, device):
    """(wires, layers) for a network on n inputs, with its masks on `device` (cached)."""
    if network == "bitonic":
        wires, layers = bitonic_layers(n)
    elif network == "odd_even":
        wires, layers = odd_even_layers(n)
    else:
        raise ValueError(f"unknown sorting network {network!r}; use one of {NETWORKS}")
    return wires, [layer.to(device) for layer in layers]


# -----------------------------------------------------------------------------
# one relaxed comparator: alpha = F(steepness * (x_b - x_a)) and its derivative
# (the op order follows diffsort's so that float32 results agree bit for bit)


def comparator_alpha(d, distribution, steepness, art_lambda):
    """alpha for d = x_b - x_a (any shape): the weight of x_a in the min (ascending comparator)."""
    if distribution == "cauchy":
        return torch.atan(d * steepness) * (1 / math.pi) + 0.5
    if distribution == "logistic":
        return torch.sigmoid(d * steepness)
    if distribution == "logistic_phi":
        return torch.sigmoid(d * steepness / (d.abs() + 1e-10).pow(art_lambda))
    if distribution == "gaussian":
        sigma = 1 / steepness
        return 0.5 + 0.5 * torch.erf(d / sigma / math.sqrt(2))
    if distribution == "reciprocal":
        v = d * steepness
        return 0.5 * (v / (2 + v.abs()) + 1)
    if distribution == "optimal":
        v = d * steepness
        outside = (v > 0.25).to(v.dtype) - (v < -0.25).to(v.dtype)   # sign(v) where |v| > 1/4, else 0
        return v.clamp(-0.25, 0.25) + 0.5 + outside * (0.25 - 1 / 16 / (v.abs() + 1e-10))
    raise ValueError(f"unknown distribution {distribution!r}; use one of {DISTRIBUTIONS}")


def comparator_alpha_grad(d, alpha, distribution, steepness, art_lambda):
    """d alpha / d d, elementwise (alpha is comparator_alpha(d), passed in to save work)."""
    if distribution == "cauchy":
        v = d * steepness
        return steepness / math.pi / (1 + v * v)
    if distribution == "logistic":
        return steepness * alpha * (1 - alpha)
    if distribution == "logistic_phi":
        # v = s d (|d| + eps)^-lambda  =>  dv/dd = s (|d| + eps)^-lambda (1 - lambda |d| / (|d| + eps))
        r = d.abs() + 1e-10
        dv = steepness * r.pow(-art_lambda) * (1 - art_lambda * d.abs() / r)
        return alpha * (1 - alpha) * dv
    if distribution == "gaussian":
        v = d * steepness
        return steepness / math.sqrt(2 * math.pi) * torch.exp(-0.5 * v * v)
    if distribution == "reciprocal":
        return steepness / (2 + (d * steepness).abs()).square()
    if distribution == "optimal":
        a = (d * steepness).abs()
        return steepness * torch.where(a > 0.25, 1 / (16 * (a + 1e-10).square()), torch.ones_like(a))
    raise ValueError(f"unknown distribution {distribution!r}; use one of {DISTRIBUTIONS}")


# -----------------------------------------------------------------------------
# the block kernels. A block's state q is (B, wires, n + 1): q[r, w, i] for i < n is the weight of input i on
# wire w (= P[r, i, w] transposed, so the contiguous dim is the inputs) and q[r, w, n] is the value on wire w.
# Mixing the value with the same coefficients as the weights gives x_sorted and P in one pass.


def pair_views(q, layer):
    """Slot-a and slot-b views of q's wires (dim 1): (B, wires, ...) -> two (B, C, m, ...)."""
    pairs = q[:, layer.start:layer.stop].unflatten(1, (layer.chunks, 2, layer.m))
    return pairs[:, :, 0], pairs[:, :, 1]


def mix_coefficients(alpha, layer):
    """(ca, cb), each (B, C, m): out_a = ca*in_a + cb*in_b and out_b = cb*in_a + ca*in_b. An ascending
    comparator puts the min (alpha*x_a + (1-alpha)*x_b) on a; a descending one puts it on b."""
    one_minus = 1 - alpha
    if layer.descending is None:
        return alpha, one_minus
    return torch.where(layer.descending, one_minus, alpha), torch.where(layer.descending, alpha, one_minus)


def mix_layer(src, dst, layer, ca, cb, tmp):
    """dst = the layer applied to src, both (B, wires, n + 1). Products and sums are rounded separately (no fused
    multiply-add) so that the result is diffsort's to the bit and tiny weights keep their relative precision."""
    a_in, b_in = pair_views(src, layer)
    a_out, b_out = pair_views(dst, layer)
    ca, cb = ca.unsqueeze(-1), cb.unsqueeze(-1)            # (B, C, m, 1): broadcast over the n + 1 columns
    tmp = tmp[:a_in.numel()].view(a_in.shape)
    torch.mul(a_in, ca, out=a_out)
    torch.mul(b_in, cb, out=tmp)
    a_out.add_(tmp)
    torch.mul(a_in, cb, out=b_out)
    torch.mul(b_in, ca, out=tmp)
    b_out.add_(tmp)
    if layer.start > 0:                                      # pass-through wires (odd_even only)
        dst[:, :layer.start] = src[:, :layer.start]
    if layer.stop < src.shape[1]:
        dst[:, layer.stop:] = src[:, layer.stop:]


def initial_state(x, wires):
    """(B, n) -> (B, wires, n + 1): identity weights on the real wires (the last n), values in the last column."""
    B, n = x.shape
    q = x.new_zeros(B, wires, n + 1)
    q[:, wires - n:, :n] = torch.eye(n, dtype=x.dtype, device=x.device)
    q[:, wires - n:, n] = x
    return q


def block_rows(x, wires):
    """Rows per block: one block's state stays around CPU_BLOCK_BYTES (L2-sized) on a CPU."""
    budget = CUDA_BLOCK_BYTES if x.is_cuda else CPU_BLOCK_BYTES
    return max(1, budget // (wires * (x.shape[1] + 1) * x.element_size()))


def sort_forward(x, layout, distribution, steepness, art_lambda):
    """x (rows, n) -> x_sorted (rows, n), P (rows, n, n), alphas (layers, rows, max comparators)."""
    wires, layers = layout
    rows, n = x.shape
    pad = wires - n
    x_sorted = torch.empty_like(x)
    P = x.new_empty(rows, n, n)
    alphas = x.new_empty(len(layers), rows, max(layer.size for layer in layers))
    step = block_rows(x, wires)
    tmp = x.new_empty(step * wires // 2 * (n + 1))
    # torch's CPU kernels compute the last (numel mod 2 * vector width) elements with scalar code, whose exp /
    # atan / pow differ from the vectorised ones by an ulp, and an ulp in alpha grows to ~1e-6 in P over 60
    # odd-even layers. Computing alpha in a buffer padded to a multiple of 64 keeps every element on the
    # vectorised path, as in diffsort's (rows, n/2) tensors, so the results do not depend on the block size.
    d_buffer = x.new_zeros(-(-step * alphas.shape[2] // 64) * 64)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        q = initial_state(x[r0:r1], wires)
        nxt = torch.empty_like(q)
        for t, layer in enumerate(layers):
            xa, xb = pair_views(q[:, :, n], layer)                          # (B, C, m)
            d = d_buffer[:xa.numel()].view(xa.shape)
            torch.sub(xb, xa, out=d)
            alpha = comparator_alpha(d_buffer, distribution, steepness, art_lambda)[:xa.numel()].view(xa.shape)
            if layer.fixed is not None:
                alpha = torch.where(layer.fixed, layer.fixed_alpha, alpha)
            alphas[t, r0:r1, :layer.size] = alpha.flatten(1)
            mix_layer(q, nxt, layer, *mix_coefficients(alpha, layer), tmp)
            q, nxt = nxt, q
        x_sorted[r0:r1] = q[:, pad:, n]
        P[r0:r1] = q[:, pad:, :n].transpose(1, 2)                          # (B, wires, inputs) -> (B, n, n)
    return x_sorted, P, alphas


def sort_backward(x, alphas, grad_sorted, grad_P, layout, distribution, steepness, art_lambda):
    """Gradient w.r.t. x (rows, n), block by block: recompute the block's layer inputs from the saved alphas,
    then go through the layers in reverse. The adjoint g has the layout of the state q."""
    wires, layers = layout
    rows, n = x.shape
    pad = wires - n
    grad_x = torch.empty_like(x)
    step = block_rows(x, wires)
    tmp_a = x.new_empty(step * wires // 2 * (n + 1))
    tmp_b = torch.empty_like(tmp_a)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        B = r1 - r0
        states = x.new_empty(len(layers), B, wires, n + 1)                 # input of every layer, this block only
        states[0] = initial_state(x[r0:r1], wires)
        coefficients = []
        for t, layer in enumerate(layers):
            alpha = alphas[t, r0:r1, :layer.size].unflatten(1, (layer.chunks, layer.m))
            coefficients.append(mix_coefficients(alpha, layer))
            if t + 1 < len(layers):
                mix_layer(states[t], states[t + 1], layer, *coefficients[t], tmp_a)

        g = x.new_zeros(B, wires, n + 1)
        g[:, pad:, :n] = grad_P[r0:r1].transpose(1, 2)
        g[:, pad:, n] = grad_sorted[r0:r1]
        for t in reversed(range(len(layers))):
            layer = layers[t]
            ca, cb = coefficients[t]
            alpha = alphas[t, r0:r1, :layer.size].unflatten(1, (layer.chunks, layer.m))
            a_in, b_in = pair_views(states[t], layer)
            g_a, g_b = pair_views(g, layer)
            shape = a_in.shape
            g_diff = torch.sub(g_a, g_b, out=tmp_a[:a_in.numel()].view(shape))
            in_diff = torch.sub(a_in, b_in, out=tmp_b[:a_in.numel()].view(shape))
            # d loss / d ca - d loss / d cb = sum over columns (g_a - g_b)(in_a - in_b); ca = alpha or 1 - alpha
            g_alpha = in_diff.mul_(g_diff).sum(-1)                          # (B, C, m)
            if layer.descending is not None:
                g_alpha = torch.where(layer.descending, -g_alpha, g_alpha)
            if layer.fixed is not None:
                g_alpha = g_alpha.masked_fill(layer.fixed, 0)
            xa, xb = pair_views(states[t][:, :, n], layer)
            g_d = g_alpha * comparator_alpha_grad(xb - xa, alpha, distribution, steepness, art_lambda)
            # adjoint of the mix (its matrix [[ca, cb], [cb, ca]] is symmetric); with ca + cb = 1:
            # g_a' = ca g_a + cb g_b = g_a - cb (g_a - g_b), g_b' = g_b + cb (g_a - g_b)
            shift = g_diff.mul_(cb.unsqueeze(-1))
            g_a.sub_(shift)
            g_b.add_(shift)
            # and alpha's own dependence on the values x_a, x_b of this layer's input (d = x_b - x_a)
            gxa, gxb = pair_views(g[:, :, n], layer)
            gxa.sub_(g_d)
            gxb.add_(g_d)
        grad_x[r0:r1] = g[:, pad:, n]
    return grad_x


class DiffSortFunction(torch.autograd.Function):
    """(x (rows, n), layout, distribution, steepness, art_lambda) -> (x_sorted (rows, n), P (rows, n, n)).
    Saves x and the alphas only; x must be float32 or float64, finite, and contiguous."""

    @staticmethod
    def forward(ctx, x, layout, distribution, steepness, art_lambda):
        x_sorted, P, alphas = sort_forward(x, layout, distribution, steepness, art_lambda)
        ctx.save_for_backward(x, alphas)
        ctx.settings = (layout, distribution, steepness, art_lambda)
        return x_sorted, P

    @staticmethod
    def backward(ctx, grad_sorted, grad_P):
        x, alphas = ctx.saved_tensors
        grad_x = sort_backward(x, alphas, grad_sorted.contiguous(), grad_P, *ctx.settings)
        return grad_x, None, None, None, None


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


def run_sort(x, layout, distribution, steepness, art_lambda):
    """Validate x (..., n), flatten it to rows, sort in float32/64 with autocast off, restore the shape."""
    if not x.is_floating_point():
        raise ValueError(f"diff_sort: x must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("diff_sort: x contains NaN or infinite values; the relaxed sort needs finite inputs")
    shape = x.shape
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()                  # float16 / bfloat16 (e.g. under autocast): compute in float32
    with torch.autocast(x.device.type, enabled=False):
        x_sorted, P = DiffSortFunction.apply(x.reshape(-1, shape[-1]).contiguous(), layout, distribution,
                                             float(steepness), float(art_lambda))
    return x_sorted.view(shape), P.view(*shape, shape[-1])


def diff_sort(x, network="bitonic", steepness=10.0, distribution="cauchy", art_lambda=0.25):
    """Relaxed ascending sort of x (..., n) along its last dim. Returns (x_sorted (..., n), P (..., n, n)) with
    x_sorted[..., k] = sum_i x[..., i] * P[..., i, k]."""
    if x.dim() == 0:
        raise ValueError("diff_sort: x must have at least one dimension (..., n), got a 0-dim tensor")
    n = x.shape[-1]
    check_arguments(n, network, steepness, distribution)
    return run_sort(x, network_layout(n, network, x.device), distribution, steepness, art_lambda)


class DiffSort(nn.Module):
    """nn.Module form of diff_sort for a fixed n; the network layout is built once and kept per device."""

    def __init__(self, n, network="bitonic", steepness=10.0, distribution="cauchy", art_lambda=0.25):
        super().__init__()
        check_arguments(n, network, steepness, distribution)
        self.n, self.network, self.steepness = n, network, steepness
        self.distribution, self.art_lambda = distribution, art_lambda
        wires, layers = bitonic_layers(n) if network == "bitonic" else odd_even_layers(n)
        self.layouts = {torch.device("cpu"): (wires, layers)}

    def forward(self, x):
        if x.dim() == 0 or x.shape[-1] != self.n:
            raise ValueError(f"DiffSort(n={self.n}) expects x of shape (..., {self.n}), got {tuple(x.shape)}")
        if x.device not in self.layouts:
            wires, layers = self.layouts[torch.device("cpu")]
            self.layouts[x.device] = (wires, [layer.to(x.device) for layer in layers])
        return run_sort(x, self.layouts[x.device], self.distribution, self.steepness, self.art_lambda)

    def extra_repr(self):
        return (f"n={self.n}, network={self.network!r}, steepness={self.steepness}, "
                f"distribution={self.distribution!r}, art_lambda={self.art_lambda}")
