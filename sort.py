"""
Differentiable sorting networks (Petersen et al., ICML 2021 / ICLR 2022), as used by NeCo's loss.

    x_sorted, P = diff_sort(x, network="bitonic", steepness=100.0)   # x: (rows, n)
    # x_sorted[r, k] = sum_i x[r, i] * P[r, i, k]; P is doubly stochastic, sorted ascending.

The numbers of the `diffsort` 0.2.0 package, which NeCo's public code used (float32 to the bit, up to
subnormals), but a layer is a mix of wire pairs instead of dense selection-matrix products, and backward keeps
only x and the comparator coefficients alpha (layers x wires/2 x rows numbers) instead of every layer's
(rows, n, n) tensors. How it runs:
1. The values alone decide every alpha, so they go through the network first, all rows at once.
2. P follows from the alphas by linear mixing, one block of rows through ALL layers at a time, while the block
   is in cache: streaming the whole batch through memory once per layer is memory-bound on a CPU. Rows are the
   last, contiguous dim of a block's state, so every op is a long vectorised loop. In a bitonic network the
   wires only mix inside groups of 2^(b+1) during block b of the network, so the state is kept per group
   ("stages"), about half the work of a dense (wires, wires) state.
3. Backward replays the values from the saved alphas, then each block's states, and walks the layers back.
Only elementwise ops and sums over a dim: deterministic on CPU and CUDA. Imports only torch: copy this file.
"""

import math
from functools import lru_cache

import torch
import torch.nn as nn

NETWORKS = ("bitonic", "odd_even")
DISTRIBUTIONS = ("cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal")

# Bytes of a block's largest state (wires, wires, rows). CPU: 2 MiB measured fastest on 2 cores with 2 MiB of L2
# each (every op is split over both). GPU: larger, a block has to fill the device (untested: no GPU here).
# Rows per block are a multiple of 64 and at least 64, see block_rows.
CPU_BLOCK_BYTES = 1 << 21
CUDA_BLOCK_BYTES = 1 << 24

# -----------------------------------------------------------------------------
# network layouts


class Layer:
    """Disjoint comparators inside every group of a stage: the group's wires [start, start + 2*chunks*m) reshape
    to (chunks, 2, m), and chunk c compares slot a (wire start + 2mc + j) with slot b (wire start + 2mc + m + j),
    j < m. Wires of the group outside that range pass through unchanged."""

    def __init__(self, start, chunks, m, descending=None, fixed=None):
        self.start, self.chunks, self.m = start, chunks, m
        self.stop = start + 2 * chunks * m
        self.descending = descending   # (groups, 1, 1, 1) bool or None: the min goes to slot b, the max to slot a
        self.fixed = fixed             # (groups, chunks, m, 1) bool or None: comparators that touch a dummy wire
        self.fixed_alpha = None        # alpha that makes those a no-op: 1 if ascending, 0 if descending
        if fixed is not None:
            ascending = torch.ones(1, 1, 1, 1) if descending is None else (~descending).float()
            # float32 so that torch.where promotes it exactly to alpha's dtype (float32 or float64)
            self.fixed_alpha = ascending.expand(fixed.shape).contiguous()

    def to(self, device):
        moved = Layer(self.start, self.chunks, self.m)
        for name in ("descending", "fixed", "fixed_alpha"):
            value = getattr(self, name)
            setattr(moved, name, None if value is None else value.to(device))
        return moved


class Stage:
    """Consecutive layers during which wires mix only inside `groups` groups of `size` consecutive wires, so that
    the weights of a block of B rows fit in (groups, size, size, B). Inputs below `first_input` are dummies."""

    def __init__(self, groups, size, layers, first_input=0):
        self.groups, self.size, self.layers, self.first_input = groups, size, layers, first_input

    def to(self, device):
        return Stage(self.groups, self.size, [layer.to(device) for layer in self.layers], self.first_input)


def bitonic_stages(n):
    """Bitonic network on N = 2^ceil(log2 n) wires: block b = 0..log2(N)-1 has layers l = 0..b comparing wires
    (s+j, s+j+m), m = 2^(b-l), descending when (s+j) // 2^(b+1) is odd. Real wire i sits at padded position
    i + N - n; the first N - n positions are dummy wires, and a comparator touching one changes nothing.
    Block b is one stage with groups of 2^(b+1) wires, so the direction is that of the group. Returns (N, stages).
    With this padding (diffsort's) the hard network fails to sort some inputs for some n (22, 38, 42-46, 54, 70,
    ...; measured on random permutations); powers of two and NeCo's n = 49 sort. Kept: it is what NeCo trained on."""
    blocks = max(1, math.ceil(math.log2(n)))
    wires = 2 ** blocks
    pad = wires - n
    stages = []
    for b in range(blocks):
        size = 2 ** (b + 1)
        groups = wires // size
        descending = (torch.arange(groups) % 2 == 1).view(groups, 1, 1, 1)
        layers = []
        for l in range(b + 1):
            m = 2 ** (b - l)
            chunks = size // (2 * m)
            wire_a = (torch.arange(groups).view(-1, 1, 1) * size + torch.arange(chunks).view(1, -1, 1) * 2 * m
                      + torch.arange(m))                            # (groups, chunks, m): slot a, the lower wire
            fixed = (wire_a < pad).unsqueeze(-1)                    # slot a is a dummy iff the comparator touches one
            layers.append(Layer(0, chunks, m, descending if descending.any() else None,
                                fixed if fixed.any() else None))
        stages.append(Stage(groups, size, layers, first_input=pad if groups == 1 else 0))
    return wires, stages


def odd_even_stages(n):
    """Odd-even transposition network: n layers, layer t compares (0,1), (2,3), ... for even t and (1,2),
    (3,4), ... for odd t, all ascending. One stage with one group. Returns (n, stages)."""
    return n, [Stage(1, n, [Layer(t % 2, (n - t % 2) // 2, 1) for t in range(n)])]


def build_layout(n, network):
    if network == "bitonic":
        return bitonic_stages(n)
    if network == "odd_even":
        return odd_even_stages(n)
    raise ValueError(f"unknown sorting network {network!r}; use one of {NETWORKS}")


@lru_cache(maxsize=64)
def network_layout(n, network, device):
    """(wires, stages) for a network on n inputs, with its masks on `device` (cached)."""
    wires, stages = build_layout(n, network)
    return wires, [stage.to(device) for stage in stages]


# -----------------------------------------------------------------------------
# one relaxed comparator: alpha = F(steepness * (x_b - x_a)) and its derivative.
# The op order follows diffsort's, so float32 alphas agree to the bit. That also needs every element on torch's
# vectorised path: a CPU kernel computes the last (numel mod 2 * vector width) elements of its range with scalar
# exp / atan / pow, which differ by an ulp, and the steepness turns an ulp in x into ~1e-6 in P after many
# layers. Our value tensors have a multiple of 64 columns, so there is no such tail (unless many threads split
# a kernel at odd places; diffsort has the same limits).


def comparator_alpha(d, distribution, steepness, art_lambda):
    """alpha for d = x_b - x_a (any shape): the weight of x_a in the min of an ascending comparator."""
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
    """d alpha / d d, elementwise; alpha = comparator_alpha(d) is passed in to save work."""
    if distribution == "cauchy":
        v = d * steepness
        return steepness / math.pi / (1 + v * v)
    if distribution == "logistic":
        return steepness * alpha * (1 - alpha)
    if distribution == "logistic_phi":
        # v = s d (|d| + eps)^-lambda, so dv/dd = s (|d| + eps)^-lambda (1 - lambda |d| / (|d| + eps))
        r = d.abs() + 1e-10
        return alpha * (1 - alpha) * steepness * r.pow(-art_lambda) * (1 - art_lambda * d.abs() / r)
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
# the mix of a layer: out_a = ca*in_a + cb*in_b, out_b = cb*in_a + ca*in_b on every compared pair


def mix_coefficients(alpha, layer):
    """(ca, cb) from alpha, same shape. An ascending comparator puts the min, alpha*x_a + (1-alpha)*x_b, on slot a
    and the max on slot b; a descending one the other way round."""
    one_minus = 1 - alpha
    if layer.descending is None:
        return alpha, one_minus
    return torch.where(layer.descending, one_minus, alpha), torch.where(layer.descending, alpha, one_minus)


def mix_pairs(a_in, b_in, a_out, b_out, ca, cb, tmp):
    """Products and sums rounded separately, as in diffsort, so that values and weights stay the same to the
    bit. (A fused multiply-add is 1.7x faster on the weights but drifts up to 1.2e-6 from diffsort's P over the
    64 layers of an odd-even network; the values must stay exact: every later alpha depends on them.)"""
    torch.mul(a_in, ca, out=a_out)
    torch.mul(b_in, cb, out=tmp)
    a_out.add_(tmp)
    torch.mul(a_in, cb, out=b_out)
    torch.mul(b_in, ca, out=tmp)
    b_out.add_(tmp)


def mix_pairs_backward(g_a, g_b, cb, g_diff):
    """The transposed mix, in place on the gradients w.r.t. the outputs. The mix is the symmetric matrix
    [[ca, cb], [cb, ca]] and ca + cb = 1, so g_a -> ca g_a + cb g_b = g_a - cb (g_a - g_b) and g_b -> g_b + cb
    (g_a - g_b), where g_diff holds g_a - g_b."""
    g_a.addcmul_(g_diff, cb, value=-1)
    g_b.addcmul_(g_diff, cb)


def copy_pass_through(src, dst, stage, layer, dim):
    """Wires of a group outside [layer.start, layer.stop), along `dim`, keep their content. Only odd_even layers
    have such wires, and the odd_even network is a single group, so `dim` may index all wires."""
    if layer.start > 0:
        dst.narrow(dim, 0, layer.start).copy_(src.narrow(dim, 0, layer.start))
    if layer.stop < stage.size:
        rest = stage.size - layer.stop
        dst.narrow(dim, layer.stop, rest).copy_(src.narrow(dim, layer.stop, rest))


# -----------------------------------------------------------------------------
# the values (wires, R): all rows at once. They alone decide every alpha; the weights (P) just follow.


def value_pairs(values, stage, layer):
    """Slot-a and slot-b views of values (wires, R), each (G, chunks, m, R)."""
    pairs = values.view(stage.groups, stage.size, -1)[:, layer.start:layer.stop]
    pairs = pairs.unflatten(1, (layer.chunks, 2, layer.m))
    return pairs[:, :, 0], pairs[:, :, 1]


def per_layer(packed, layers):
    """Each layer's part of a (layers, comparators, R) tensor (alphas, their gradients), viewed (G, chunks, m, R)."""
    R = packed.shape[2]
    return [packed[t, :stage.groups * layer.chunks * layer.m].view(stage.groups, layer.chunks, layer.m, R)
            for t, (stage, layer) in enumerate(layers)]


def sort_values(values, layers, alphas, distribution, steepness, art_lambda):
    """Run values (wires, R) through the network, filling alphas (layers, comparators, R) on the way. Returns the
    sorted values and every layer's (ca, cb), each (G, chunks, m, R)."""
    nxt, tmp = torch.empty_like(values), torch.empty_like(alphas[0]).view(-1)
    coefficients = []
    for (stage, layer), alpha in zip(layers, per_layer(alphas, layers)):
        a_in, b_in = value_pairs(values, stage, layer)
        torch.sub(b_in, a_in, out=alpha)                      # d = x_b - x_a
        new_alpha = comparator_alpha(alpha, distribution, steepness, art_lambda)
        if layer.fixed is not None:
            new_alpha = torch.where(layer.fixed, layer.fixed_alpha, new_alpha)
        alpha.copy_(new_alpha)
        coefficients.append(mix_coefficients(alpha, layer))
        mix_pairs(a_in, b_in, *value_pairs(nxt, stage, layer), *coefficients[-1], tmp[:alpha.numel()].view_as(alpha))
        copy_pass_through(values, nxt, stage, layer, 0)
        values, nxt = nxt, values
    return values, coefficients


def replay_values(values, layers, alphas):
    """The values entering each layer, (layers, wires, R), from the saved alphas; and every layer's (ca, cb)."""
    inputs = values.new_empty(len(layers), *values.shape)
    inputs[0] = values
    tmp = torch.empty_like(alphas[0]).view(-1)
    coefficients = []
    for t, ((stage, layer), alpha) in enumerate(zip(layers, per_layer(alphas, layers))):
        coefficients.append(mix_coefficients(alpha, layer))
        if t + 1 < len(layers):
            mix_pairs(*value_pairs(inputs[t], stage, layer), *value_pairs(inputs[t + 1], stage, layer),
                      *coefficients[-1], tmp[:alpha.numel()].view_as(alpha))
            copy_pass_through(inputs[t], inputs[t + 1], stage, layer, 0)
    return inputs, coefficients


def values_backward(inputs, layers, alphas, coefficients, g_alphas, g_values, distribution, steepness, art_lambda):
    """Turn g_values (wires, R), the gradient w.r.t. the sorted values, into that w.r.t. the input values, in
    place. g_alphas (a (G, chunks, m, R) tensor per layer) hold dL/dca - dL/dcb from the weights on entry."""
    tmp = torch.empty_like(alphas[0]).view(-1)
    alphas = per_layer(alphas, layers)
    for t in reversed(range(len(layers))):
        stage, layer = layers[t]
        alpha, g = alphas[t], g_alphas[t]
        a_in, b_in = value_pairs(inputs[t], stage, layer)
        g_a, g_b = value_pairs(g_values, stage, layer)
        g_diff = torch.sub(g_a, g_b, out=tmp[:alpha.numel()].view_as(alpha))
        g = g + g_diff * (a_in - b_in)                        # the values' own share of dL/dca - dL/dcb
        if layer.descending is not None:                      # there ca = 1 - alpha
            g = torch.where(layer.descending, -g, g)
        if layer.fixed is not None:                           # a constant alpha
            g = g.masked_fill(layer.fixed, 0)
        g_d = g * comparator_alpha_grad(b_in - a_in, alpha, distribution, steepness, art_lambda)
        mix_pairs_backward(g_a, g_b, coefficients[t][1], g_diff)
        g_a.sub_(g_d)                                         # alpha depends on d = x_b - x_a
        g_b.add_(g_d)
    return g_values


# -----------------------------------------------------------------------------
# the weights, block by block. A block's state in a stage is (G, g, g, B): state[k, i, w, r] is the weight of
# input k*g + i on wire k*g + w for row r (P transposed, rows last so that every op is a long vectorised loop).


def weight_pairs(state, stage, layer):
    """Slot-a and slot-b views of a state (G, g, g, B), each (G, I, chunks, m, B), I = the inputs that matter."""
    pairs = state[:, stage.first_input:, layer.start:layer.stop].unflatten(2, (layer.chunks, 2, layer.m))
    return pairs[:, :, :, 0], pairs[:, :, :, 1]


def identity_state(stage, B, like):
    """The first stage's state before any layer: every input on its own wire."""
    eye = torch.eye(stage.size, dtype=like.dtype, device=like.device)
    return eye.expand(stage.groups, stage.size, stage.size).unsqueeze(-1).expand(-1, -1, -1, B)


def regroup(old, new):
    """The next stage's state (G/2, 2g, 2g, B) from (G, g, g, B): groups 2k and 2k + 1 become the diagonal blocks
    of group k (no input has crossed to the other group's wires yet)."""
    g = old.shape[2]
    pairs = old.unflatten(0, (-1, 2))                         # (G/2, 2, g, g, B)
    new[:, :g, :g] = pairs[:, 0]
    new[:, :g, g:] = 0
    new[:, g:, :g] = 0
    new[:, g:, g:] = pairs[:, 1]


def ungroup(new, old):
    """The transpose of regroup: the gradient w.r.t. the previous stage's state from that w.r.t. the next one."""
    g = old.shape[2]
    pairs = old.unflatten(0, (-1, 2))
    pairs[:, 0] = new[:, :g, :g]
    pairs[:, 1] = new[:, g:, g:]


def block_rows(rows, wires, itemsize, device):
    """Rows per block: a multiple of 64 (so that no kernel has a scalar tail, see comparator_alpha), the largest
    state (wires, wires, B) near the device's block budget, and the rows split evenly over the blocks."""
    budget = CUDA_BLOCK_BYTES if device.type == "cuda" else CPU_BLOCK_BYTES
    most = max(64, budget // (wires * wires * itemsize) // 64 * 64)
    blocks = max(1, -(-rows // most))
    return max(64, -(-rows // blocks // 64) * 64)


def scratch(stages, B, like):
    """A buffer for the largest (G, I, chunks, m, B) half of any layer's state."""
    return like.new_empty(max(s.groups * (s.size - s.first_input) * s.size // 2 * B for s in stages))


class WeightStep:
    """One layer from buffer src to buffer dst, both (G, g, g, B). The views are made once per call and serve
    every block: slicing tensors costs about as much Python time as the arithmetic on a block."""

    def __init__(self, stage, layer, src, dst, tmp, adjoint=None, tmp_b=None):
        self.stage, self.layer, self.src, self.dst = stage, layer, src, dst
        self.a_in, self.b_in = weight_pairs(src, stage, layer)
        self.a_out, self.b_out = weight_pairs(dst, stage, layer)
        self.tmp = tmp[:self.a_in.numel()].view(self.a_in.shape)
        if adjoint is not None:                               # backward: the gradient w.r.t. the layer's output
            self.g_a, self.g_b = weight_pairs(adjoint, stage, layer)
            self.tmp_b = tmp_b[:self.a_in.numel()].view(self.a_in.shape)

    def forward(self, ca, cb):
        mix_pairs(self.a_in, self.b_in, self.a_out, self.b_out, ca, cb, self.tmp)
        copy_pass_through(self.src, self.dst, self.stage, self.layer, 2)

    def backward(self, cb, g_alpha):
        """Write dL/dca - dL/dcb = sum over inputs of (g_a - g_b)(in_a - in_b) into g_alpha (G, chunks, m, B),
        then turn the adjoint into the gradient w.r.t. the layer's input."""
        g_diff = torch.sub(self.g_a, self.g_b, out=self.tmp)
        in_diff = torch.sub(self.a_in, self.b_in, out=self.tmp_b)
        torch.sum(in_diff.mul_(g_diff), dim=1, out=g_alpha)
        mix_pairs_backward(self.g_a, self.g_b, cb, g_diff)


def block_slices(coefficients, r0, B):
    """Every layer's (ca, cb) for rows r0:r0+B, shaped to broadcast over the inputs: (G, 1, chunks, m, B)."""
    return [(ca.narrow(-1, r0, B), cb.narrow(-1, r0, B)) for ca, cb in coefficients]


def weights_forward(layout, coefficients, n, rows, B, like):
    """P (rows, n, n) from every layer's (ca, cb), one block of B rows through all layers at a time."""
    wires, stages = layout
    pad = wires - n
    tmp = scratch(stages, B, like)
    buffers = [like.new_empty(2, s.groups, s.size, s.size, B) for s in stages]   # a stage alternates between two
    steps = [[WeightStep(stage, layer, buffers[s][j % 2], buffers[s][(j + 1) % 2], tmp)
              for j, layer in enumerate(stage.layers)] for s, stage in enumerate(stages)]
    outputs = [buffers[s][len(stage.layers) % 2] for s, stage in enumerate(stages)]
    coefficients = [(ca.unsqueeze(1), cb.unsqueeze(1)) for ca, cb in coefficients]
    start = identity_state(stages[0], B, like)
    P = like.new_empty(rows, n, n)
    for r0 in range(0, rows, B):
        block = iter(block_slices(coefficients, r0, B))
        for s in range(len(stages)):
            if s == 0:
                buffers[0][0].copy_(start)
            else:
                regroup(outputs[s - 1], buffers[s][0])
            for step in steps[s]:
                step.forward(*next(block))
        r1 = min(rows, r0 + B)
        P[r0:r1] = outputs[-1][0, pad:, pad:, :r1 - r0].permute(2, 0, 1)    # (n inputs, n wires, B) -> (B, n, n)
    return P


def weights_backward(layout, coefficients, grad_P, g_alphas, B, like):
    """Fill g_alphas (a (G, chunks, m, R) tensor per layer) with the weights' share of dL/dca - dL/dcb, block by
    block: replay the block's states from the coefficients and keep them (this block only), then go through the
    layers in reverse with an adjoint laid out like the state."""
    wires, stages = layout
    rows, n = grad_P.shape[:2]
    pad = wires - n
    tmp_a, tmp_b = scratch(stages, B, like), scratch(stages, B, like)
    saved = [like.new_empty(len(s.layers) + 1, s.groups, s.size, s.size, B) for s in stages]
    adjoints = [like.new_empty(s.groups, s.size, s.size, B) for s in stages]
    steps = [[WeightStep(stage, layer, saved[s][j], saved[s][j + 1], tmp_a, adjoints[s], tmp_b)
              for j, layer in enumerate(stage.layers)] for s, stage in enumerate(stages)]
    coefficients = [(ca.unsqueeze(1), cb.unsqueeze(1)) for ca, cb in coefficients]
    start = identity_state(stages[0], B, like)
    for r0 in range(0, rows, B):
        block = block_slices(coefficients, r0, B)
        t = 0
        for s in range(len(stages)):
            if s == 0:
                saved[0][0].copy_(start)
            else:
                regroup(saved[s - 1][-1], saved[s][0])
            for step in steps[s]:
                if step is not steps[-1][-1]:                   # the network's output itself is not needed
                    step.forward(*block[t])
                t += 1
        r1 = min(rows, r0 + B)
        adjoints[-1].zero_()
        adjoints[-1][0, pad:, pad:, :r1 - r0] = grad_P[r0:r1].permute(1, 2, 0)
        for s in reversed(range(len(stages))):
            for step in reversed(steps[s]):
                t -= 1
                step.backward(block[t][1], g_alphas[t].narrow(-1, r0, B))
            if s > 0:
                ungroup(adjoints[s], adjoints[s - 1])


def sort_forward(x, layout, distribution, steepness, art_lambda):
    """x (rows, n) -> x_sorted (rows, n), P (rows, n, n), alphas (layers, comparators, R) and B, the rows per
    block; R = rows rounded up to whole blocks, comparators = the most in a layer."""
    wires, stages = layout
    rows, n = x.shape
    B = block_rows(rows, wires, x.element_size(), x.device)
    layers = [(stage, layer) for stage in stages for layer in stage.layers]
    values = x.new_zeros(wires, -(-rows // B) * B)           # dummy wires and rows past the end stay 0
    values[wires - n:, :rows] = x.T
    alphas = x.new_empty(len(layers), max(stage.groups * layer.chunks * layer.m for stage, layer in layers),
                         values.shape[1])
    values, coefficients = sort_values(values, layers, alphas, distribution, steepness, art_lambda)
    P = weights_forward(layout, coefficients, n, rows, B, x)
    return values[wires - n:, :rows].T.contiguous(), P, alphas, B


def sort_backward(x, alphas, B, grad_sorted, grad_P, layout, distribution, steepness, art_lambda):
    """Gradient w.r.t. x (rows, n): replay the values from the saved alphas, collect dL/dca - dL/dcb from the
    weights block by block, then take it back through the values together with grad_sorted (either gradient may
    be None: that output was not used)."""
    wires, stages = layout
    rows, n = x.shape
    layers = [(stage, layer) for stage in stages for layer in stage.layers]
    values = x.new_zeros(wires, alphas.shape[2])
    values[wires - n:, :rows] = x.T
    inputs, coefficients = replay_values(values, layers, alphas)
    g_alphas = per_layer(torch.zeros_like(alphas), layers)
    if grad_P is not None:
        weights_backward(layout, coefficients, grad_P, g_alphas, B, x)
    g_values = torch.zeros_like(values)
    if grad_sorted is not None:
        g_values[wires - n:, :rows] = grad_sorted.T
    values_backward(inputs, layers, alphas, coefficients, g_alphas, g_values, distribution, steepness, art_lambda)
    return g_values[wires - n:, :rows].T.contiguous()


class DiffSortFunction(torch.autograd.Function):
    """(x (rows, n), layout, distribution, steepness, art_lambda) -> (x_sorted (rows, n), P (rows, n, n)).
    Saves x and the alphas only. x must be float32 or float64 and finite."""

    @staticmethod
    def forward(ctx, x, layout, distribution, steepness, art_lambda):
        x_sorted, P, alphas, B = sort_forward(x, layout, distribution, steepness, art_lambda)
        ctx.save_for_backward(x, alphas)
        ctx.settings = (B, layout, distribution, steepness, art_lambda)
        ctx.set_materialize_grads(False)       # an unused output gets None, and its part of backward is skipped
        return x_sorted, P

    @staticmethod
    def backward(ctx, grad_sorted, grad_P):
        x, alphas = ctx.saved_tensors
        B, *settings = ctx.settings
        return sort_backward(x, alphas, B, grad_sorted, grad_P, *settings), None, None, None, None


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


def run_sort(x, layout, distribution, steepness, art_lambda, check_finite):
    """Check x (..., n), flatten it to rows, sort in float32 or float64 with autocast off, restore the shape."""
    if not x.is_floating_point():
        raise ValueError(f"diff_sort: x must be a floating-point tensor, got {x.dtype}")
    # the check reads a flag back from the device: on CUDA it makes the host wait for the GPU
    if check_finite and not torch.isfinite(x).all():
        raise ValueError("diff_sort: x contains NaN or infinite values; the relaxed sort needs finite inputs")
    shape = x.shape
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()                       # float16 / bfloat16, e.g. under autocast: compute in float32
    with torch.autocast(x.device.type, enabled=False):
        x_sorted, P = DiffSortFunction.apply(x.reshape(-1, shape[-1]), layout, distribution,
                                             float(steepness), float(art_lambda))
    return x_sorted.view(shape), P.view(*shape, shape[-1])


def diff_sort(x, network="bitonic", steepness=10.0, distribution="cauchy", art_lambda=0.25, check_finite=True):
    """Relaxed ascending sort of x (..., n) along its last dim. Returns (x_sorted (..., n), P (..., n, n)) with
    x_sorted[..., k] = sum_i x[..., i] * P[..., i, k].
    check_finite=False skips the NaN/inf check, which costs a host-device sync on CUDA; a non-finite input then
    gives non-finite outputs (for callers that test their loss anyway, like a training step)."""
    if x.dim() == 0:
        raise ValueError("diff_sort: x must have shape (..., n), got a 0-dim tensor")
    n = x.shape[-1]
    check_arguments(n, network, steepness, distribution)
    return run_sort(x, network_layout(n, network, x.device), distribution, steepness, art_lambda, check_finite)


class DiffSort(nn.Module):
    """diff_sort as a module for a fixed n; the network layout is built once and kept per device."""

    def __init__(self, n, network="bitonic", steepness=10.0, distribution="cauchy", art_lambda=0.25,
                 check_finite=True):
        super().__init__()
        check_arguments(n, network, steepness, distribution)
        self.n, self.network, self.steepness = n, network, steepness
        self.distribution, self.art_lambda, self.check_finite = distribution, art_lambda, check_finite
        self.layouts = {torch.device("cpu"): build_layout(n, network)}

    def forward(self, x):
        if x.dim() == 0 or x.shape[-1] != self.n:
            raise ValueError(f"DiffSort(n={self.n}) expects x of shape (..., {self.n}), got {tuple(x.shape)}")
        if x.device not in self.layouts:
            wires, stages = self.layouts[torch.device("cpu")]
            self.layouts[x.device] = (wires, [stage.to(x.device) for stage in stages])
        return run_sort(x, self.layouts[x.device], self.distribution, self.steepness, self.art_lambda,
                        self.check_finite)

    def extra_repr(self):
        return (f"n={self.n}, network={self.network!r}, steepness={self.steepness}, "
                f"distribution={self.distribution!r}, art_lambda={self.art_lambda}")
