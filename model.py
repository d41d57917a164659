"""
Vision transformers of the DINO family (DINO, DINOv2 with or without registers, DINOv3), NeCo's projection head
and its student and teacher (build_student_teacher).

Each model loads its released backbone file with strict=True and gives the official features at any input size whose
sides are multiples of its patch size. The module needs only torch and the standard library: copy this file alone
into another project if you like.

    from model import build_backbone
    vit = build_backbone("dinov2_vits14_reg", weights="hub")          # downloads once, then reads the cache
    vit = build_backbone("dino_vits16", weights="ckpt.pth")           # a local file (official, NeCo or our train.py)
    vit = build_backbone("dinov2_vits14_reg", weights="hub", num_register_tokens=0)  # registers excluded
    feats = vit.forward_features(images)["x_norm_patchtokens"]         # (B, H/p * W/p, D)

Offline: weights="hub" reads $TORCH_HOME/hub/checkpoints/<file> (default ~/.cache/torch/hub/checkpoints) and does
not touch the network when the file is there. DINOv3's files are gated: request them, then pass the file's path or
put it in that folder under its released name (see DINOV3_FILES).
The three families differ only in a few switches (FAMILIES): DINO has no LayerScale, registers or mask_token;
DINOv2 adds LayerScale and, in the _reg release, 4 registers; DINOv3 replaces the learned position embedding with
RoPE on the patch tokens' queries and keys, has 4 storage tokens, LayerNorm eps 1e-5 and a zeroed key bias.
Every family is normalised with the ImageNet mean and std (IMAGENET_MEAN/STD; patch_features does it).
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# family -> what its releases share. pos_size: the image side the learned pos_embed was trained at (None: RoPE);
# eps: LayerNorm; layerscale: LayerScale init (None: no LayerScale); tokens: the name of the extra tokens after cls;
# k_bias_mask: the qkv bias is multiplied by a stored mask that zeroes the key third; ramp: stochastic depth grows
# linearly over depth (else every block gets the full rate); url: the released files' base
FAMILIES = {
    "dino": dict(pos_size=224, eps=1e-6, layerscale=None, tokens=None, mask_token=False, k_bias_mask=False,
                 ramp=True, url="https://dl.fbaipublicfiles.com/dino"),
    "dinov2": dict(pos_size=518, eps=1e-6, layerscale=1.0, tokens="register_tokens", mask_token=True,
                   k_bias_mask=False, ramp=True, url="https://dl.fbaipublicfiles.com/dinov2"),
    "dinov3": dict(pos_size=None, eps=1e-5, layerscale=1e-5, tokens="storage_tokens", mask_token=True,
                   k_bias_mask=True, ramp=False, url=None),
}
# name -> family, patch, embed_dim, depth, num_heads, ffn hidden, ffn ("mlp"; "swiglu": DINOv3's w1, w2, w3;
# "swiglu_fused": DINOv2's w12 = [2*hidden, D] and w3). The tiny ones (no released weights) serve the demo and tests.
ARCHS = {
    "dino_vits16": ("dino", 16, 384, 12, 6, 1536, "mlp"), "dino_vits8": ("dino", 8, 384, 12, 6, 1536, "mlp"),
    "dino_vitb16": ("dino", 16, 768, 12, 12, 3072, "mlp"), "dino_vitb8": ("dino", 8, 768, 12, 12, 3072, "mlp"),
    "dino_vit_tiny16": ("dino", 16, 192, 6, 3, 768, "mlp"),
    "dinov2_vits14": ("dinov2", 14, 384, 12, 6, 1536, "mlp"), "dinov2_vitb14": ("dinov2", 14, 768, 12, 12, 3072, "mlp"),
    "dinov2_vitl14": ("dinov2", 14, 1024, 24, 16, 4096, "mlp"),
    "dinov2_vitg14": ("dinov2", 14, 1536, 40, 24, 4096, "swiglu_fused"),
    "vit_tiny14": ("dinov2", 14, 192, 6, 3, 768, "mlp"),
    "dinov3_vits16": ("dinov3", 16, 384, 12, 6, 1536, "mlp"),
    "dinov3_vits16plus": ("dinov3", 16, 384, 12, 6, 1536, "swiglu"),  # int(6 * 384 * 2/3), a multiple of 8
    "dinov3_vitb16": ("dinov3", 16, 768, 12, 12, 3072, "mlp"),
    "dinov3_vitl16": ("dinov3", 16, 1024, 24, 16, 4096, "mlp"),
    "dinov3_vit_tiny16": ("dinov3", 16, 192, 6, 3, 768, "mlp"),
}
# DINOv2 names come with and without "_reg"; the others have one layout each
BACKBONE_NAMES = tuple(n + s for n, a in ARCHS.items() for s in (("", "_reg") if a[0] == "dinov2" else ("",)))
DEFAULT_REGISTERS = 4  # the DINOv2 "_reg" release and every DINOv3 model have 4
# DINO's released backbone files (the teacher's weights) under FAMILIES["dino"]["url"]
DINO_FILES = {"dino_vits16": "dino_deitsmall16_pretrain", "dino_vits8": "dino_deitsmall8_pretrain",
              "dino_vitb16": "dino_vitbase16_pretrain", "dino_vitb8": "dino_vitbase8_pretrain"}
# DINOv3's gated LVD-1689M files: the released name ends in the first 8 hex digits of the file's SHA-256
DINOV3_FILES = {"dinov3_vits16": "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
                "dinov3_vits16plus": "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
                "dinov3_vitb16": "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
                "dinov3_vitl16": "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"}
DINOV3_FORM = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
RELEASED = tuple(n for n in BACKBONE_NAMES if n.startswith("dinov2_") or n in DINO_FILES or n in DINOV3_FILES)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # every family's input normalisation
# keys that belong to a projection head (NeCo, DINO, iBOT): not part of the backbone, ignored when loading
HEAD_PREFIXES = ("head.", "heads.", "projection_head.", "dino_head.", "ibot_head.")
# wrappers around a backbone: DDP (module.), our train.py's ModuleDict (backbone.), Lightning (model.), compile
WRAPPER_PREFIXES = ("module.", "backbone.", "model.", "_orig_mod.")
# dicts that hold a state_dict; the teacher first because that is the model one evaluates after DINO-style training
CONTAINER_KEYS = ("teacher", "state_dict", "model", "student")

def patch_size_of(name):
    return ARCHS[name.removesuffix("_reg")][1]

def round_to_patch(size, patch_size):
    """An image side in pixels -> the nearest multiple of the patch size (half rounds up), at least one patch."""
    return patch_size * max(1, int(size / patch_size + 0.5))

# -----------------------------------------------------------------------------
# layers, shared by the families
def drop_path(x, rate, training):
    """Stochastic depth: drop the whole residual branch for a random subset of samples, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep)  # (B, 1, 1)
    if keep > 0.0:
        mask.div_(keep)
    return x * mask

class PatchEmbed(nn.Module):
    def __init__(self, embed_dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, H/p * W/p, D), patches row-major
        return self.proj(x).flatten(2).transpose(1, 2)

class RopeEmbed(nn.Module):
    """DINOv3's axial RoPE: per head, dims j and j + hd/2 rotate together (rotate-half); j < hd/4 by the row
    coordinate with period periods[j], the next hd/4 by the column coordinate. Coordinates are patch centres scaled
    to (-1, 1) per axis, so a larger image gets finer, not more, positions. The training-time coordinate rescale of
    DINOv3's pretraining is left out on purpose: post-training sees the positions the model is evaluated with."""

    def __init__(self, head_dim, base=100.0):
        super().__init__()
        periods = base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))  # (hd/4,)
        self.register_buffer("periods", periods)  # persistent: the released files carry it

    def forward(self, h, w):  # -> sin, cos, each (h * w, hd), float32
        coords_h = (torch.arange(h, device=self.periods.device, dtype=torch.float32) + 0.5) / h
        coords_w = (torch.arange(w, device=self.periods.device, dtype=torch.float32) + 0.5) / w
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)  # (hw, 2)
        angles = 2 * math.pi * (2 * coords - 1)[:, :, None] / self.periods.float()  # (hw, 2, hd/4)
        angles = angles.flatten(1).tile(2)  # (hw, hd): [h | w | h | w]
        return angles.sin(), angles.cos()

def apply_rope(x, sin, cos):
    """Rotate the last hw tokens of x (B, heads, N, hd); the first N - hw (cls, storage) stay as they are. The
    rotation runs in float32 (as DINOv3's released models) and is cast back."""
    prefix = x.shape[-2] - sin.shape[0]
    t = x[..., prefix:, :].float()
    t1, t2 = t.chunk(2, dim=-1)
    rotated = t * cos + torch.cat((-t2, t1), dim=-1) * sin
    return torch.cat((x[..., :prefix, :], rotated.to(x.dtype)), dim=-2)

class Attention(nn.Module):
    def __init__(self, dim, num_heads, k_bias_mask=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows: q | k | v, heads contiguous within each
        if k_bias_mask:  # DINOv3: a stored mask, 1 on q and v, 0 on k (a key bias only shifts all logits equally)
            self.qkv.register_buffer("bias_mask", torch.ones(3 * dim).index_fill_(0, torch.arange(dim, 2 * dim), 0))
        self.proj = nn.Linear(dim, dim)
        self.fused = True  # False: the explicit softmax(q k^T / sqrt(d)) v of DINO's and DINOv2's plain Attention

    def forward(self, x, rope=None):
        B, N, D = x.shape
        mask = getattr(self.qkv, "bias_mask", None)
        qkv = self.qkv(x) if mask is None else F.linear(x, self.qkv.weight, self.qkv.bias * mask.to(x.dtype))
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, h, N, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.fused:
            # SDPA uses the default scale head_dim^-0.5 and picks flash / memory-efficient kernels on GPU: the
            # (N, N) attention matrix is never stored
            x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        else:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, N, N)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, D))

class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU in every family
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

class SwiGLU(nn.Module):
    """silu(x W1) * (x W2), then W3. DINOv2's ViT-g stores W1 and W2 fused in w12, DINOv3's S+ as w1 and w2."""

    def __init__(self, dim, hidden, fused):
        super().__init__()
        if fused:
            self.w12 = nn.Linear(dim, 2 * hidden)
        else:
            self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1) if hasattr(self, "w12") else (self.w1(x), self.w2(x))
        return self.w3(F.silu(x1) * x2)

class LayerScale(nn.Module):
    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * self.gamma

class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); DINO has no LayerScale."""

    def __init__(self, dim, num_heads, ffn_hidden, ffn, fam, drop_path=0.0):
        super().__init__()
        ls = fam["layerscale"]
        self.norm1 = nn.LayerNorm(dim, eps=fam["eps"])
        self.attn = Attention(dim, num_heads, fam["k_bias_mask"])
        self.ls1 = LayerScale(dim, ls) if ls else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=fam["eps"])
        self.mlp = Mlp(dim, ffn_hidden) if ffn == "mlp" else SwiGLU(dim, ffn_hidden, fused=ffn == "swiglu_fused")
        self.ls2 = LayerScale(dim, ls) if ls else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x, rope=None):  # (B, T, D) -> (B, T, D)
        x = x + drop_path(self.ls1(self.attn(self.norm1(x), rope)), self.drop_path, self.training)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)
        return x

# -----------------------------------------------------------------------------
# the backbone
class VisionTransformer(nn.Module):
    def __init__(self, family="dinov2", patch_size=14, embed_dim=384, depth=12, num_heads=6, ffn_hidden=1536,
                 ffn="mlp", num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1,
                 drop_path_rate=0.0):
        super().__init__()
        fam = FAMILIES[family]
        self.family, self.embed_dim, self.n_blocks, self.num_heads = family, embed_dim, depth, num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        # how pos_embed is resized; DINOv2's register and first releases were trained with different rules
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.release_rule = (interpolate_antialias, interpolate_offset)  # the release's own: set_pos_embed_rule
        self.grad_checkpointing = False  # True: recompute each block in backward (saves memory for ViT-B/L)

        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_grid = fam["pos_size"] // patch_size if fam["pos_size"] else None  # 37 (DINOv2), 14 or 28 (DINO)
        if self.pos_grid:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid ** 2, embed_dim))
            self.rope_embed = None
        else:
            self.rope_embed = RopeEmbed(embed_dim // num_heads)
        self.register_tokens = None  # no key at all without registers: the plain checkpoints must load strictly
        if num_register_tokens:  # DINOv2's "register_tokens", DINOv3's "storage_tokens"
            setattr(self, fam["tokens"], nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # a linear ramp over depth
        rates = rates if fam["ramp"] else [drop_path_rate] * depth  # DINOv3: the full rate in every block
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, ffn_hidden, ffn, fam, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=fam["eps"])
        if fam["mask_token"]:
            # iBOT's masking token: the checkpoints carry it, NeCo never uses it. Frozen, because a parameter
            # without a gradient would stall DistributedDataParallel's gradient buckets
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim), requires_grad=False)
        self.init_weights()

    def init_weights(self):
        # DINOv2's init for every family; LayerNorm, LayerScale, the patch conv and mask_token keep their
        # constructor values
        if self.pos_grid:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.num_register_tokens:
            nn.init.normal_(self.extra_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def extra_tokens(self):  # (1, R, D): the registers or storage tokens
        return getattr(self, FAMILIES[self.family]["tokens"])

    def interpolate_pos_embed(self, grid_h, grid_w, dtype):
        """Position embedding for a grid_h x grid_w patch grid: (1, 1 + grid_h * grid_w, D)."""
        M = self.pos_grid
        if grid_h == M and grid_w == M:
            return self.pos_embed  # the trained size: used unchanged
        D = self.embed_dim
        pos = self.pos_embed.float()  # resample in float32 even when the model runs in half precision
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, M, M, D).permute(0, 3, 1, 2)  # (1, D, M, M)
        if self.interpolate_offset:
            # DINO and DINOv2's first release resize by a scale factor with a +0.1 offset; the factor also sets
            # where the bicubic kernel samples, so it is not the same as asking for the output size
            scale = ((grid_h + self.interpolate_offset) / M, (grid_w + self.interpolate_offset) / M)
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic",
                                      antialias=self.interpolate_antialias)
        else:
            patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic",
                                      antialias=self.interpolate_antialias)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, D)
        return torch.cat((cls_pos, patch_pos), dim=1).to(dtype)  # (1, 1 + N, D)

    def prepare_tokens(self, x):
        """Images (B, 3, H, W) -> tokens (B, 1 + R + N, D) in the order [cls, registers or storage, patches]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}; "
                             f"resize or crop the input")
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1 + N, D)
        if self.pos_grid:  # positions go to cls and patches only: the registers are inserted afterwards
            x = x + self.interpolate_pos_embed(H // self.patch_size, W // self.patch_size, x.dtype)
        if self.num_register_tokens:
            x = torch.cat((x[:, :1], self.extra_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)  # (B, 1 + R + N, D)
        return x

    def set_pos_embed_rule(self, rule):
        """How pos_embed is resized to other grids. "dinov2": the rule of the release these weights come from
        (DINOv2 with registers: the exact grid with antialias; DINOv2's first release and DINO: a scale factor
        with a +0.1 offset). "neco": NeCo's own ViT, which resizes every model, registers included, by scale
        factors (grid + 0.1) / 37, bicubic, no antialias; NeCo's training and its linear and K-means evaluations ran
        with it. The two differ most at small grids such as the 7x7 of a 98 px local crop. For DINO both rules are
        the same; DINOv3 has no learned position embedding, so either rule leaves it unchanged."""
        if rule == "dinov2":
            self.interpolate_antialias, self.interpolate_offset = self.release_rule
        elif rule == "neco":
            self.interpolate_antialias, self.interpolate_offset = False, 0.1
        else:
            raise ValueError(f"pos_embed rule must be 'dinov2' or 'neco', got {rule!r}")
        return self

    def set_fused_attention(self, fused):
        """True: scaled_dot_product_attention (flash / memory-efficient kernels); False: the explicit formula."""
        for block in self.blocks:
            block.attn.fused = fused

    def run_blocks(self, x, H, W, last=None):
        """Tokens through blocks 0..last (all by default); yields each block's output."""
        # RoPE is the same in every block (in eval mode, which post-training keeps): computed once
        rope = self.rope_embed(H // self.patch_size, W // self.patch_size) if self.rope_embed is not None else None
        for block in self.blocks[:None if last is None else last + 1]:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
            yield x

    def forward_features(self, x):
        H, W = x.shape[-2:]
        x = self.prepare_tokens(x)
        for x in self.run_blocks(x, H, W):
            pass
        x_norm = self.norm(x)  # (B, 1 + R + N, D)
        R = self.num_register_tokens
        out = {
            "x_norm_clstoken": x_norm[:, 0],  # (B, D)
            "x_norm_regtokens": x_norm[:, 1:1 + R],  # (B, R, D)
            "x_norm_patchtokens": x_norm[:, 1 + R:],  # (B, N, D)
            "x_prenorm": x,  # (B, 1 + R + N, D)
        }
        if self.family == "dinov3":
            out["x_storage_tokens"] = out["x_norm_regtokens"]  # DINOv3's name (normalised too)
        return out

    def blocks_to_take(self, n):
        """n: the last n blocks (int) or a list of block indices -> sorted list of block indices."""
        if isinstance(n, int):
            if not 1 <= n <= self.n_blocks:
                raise ValueError(f"n={n}: the model has {self.n_blocks} blocks")
            return list(range(self.n_blocks - n, self.n_blocks))
        take = [int(i) for i in n]
        if not take or len(set(take)) != len(take) or not all(0 <= i < self.n_blocks for i in take):
            raise ValueError(f"block indices {take}: give distinct indices in 0..{self.n_blocks - 1}")
        return sorted(take)  # outputs come in block order, as in DINOv2

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True,
                                return_extra_tokens=False):
        """Patch tokens of the last n blocks (or of the listed blocks), cls and registers stripped, as DINOv2's
        and DINOv3's. Each output is (B, N, D), or (B, D, H/p, W/p) with reshape; with return_class_token and/or
        return_extra_tokens, tuples (patches, cls, registers)."""
        take = self.blocks_to_take(n)
        B, _, H, W = x.shape
        x = self.prepare_tokens(x)
        outputs = [self.norm(t) if norm else t for i, t in enumerate(self.run_blocks(x, H, W, take[-1])) if i in take]
        R = self.num_register_tokens
        class_tokens = [out[:, 0] for out in outputs]  # (B, D)
        extra_tokens = [out[:, 1:1 + R] for out in outputs]  # (B, R, D)
        outputs = [out[:, 1 + R:] for out in outputs]  # (B, N, D)
        if reshape:
            h, w = H // self.patch_size, W // self.patch_size
            outputs = [out.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]  # (B, D, h, w)
        parts = [outputs] + [class_tokens] * return_class_token + [extra_tokens] * return_extra_tokens
        return tuple(zip(*parts)) if len(parts) > 1 else tuple(outputs)

    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]  # (B, D)

# -----------------------------------------------------------------------------
# the NeCo projection head
class ProjectionHead(nn.Module):
    """MLP in_dim -> hidden -> ... -> out with GELU between the linears (no BatchNorm); L2-normalised output."""

    def __init__(self, in_dim, hidden=2048, out=256, layers=3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"ProjectionHead: layers={layers}, need at least 1")
        dims = [in_dim] + [hidden] * (layers - 1) + [out]
        modules = []
        for i in range(layers):
            modules.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                modules.append(nn.GELU())
        self.mlp = nn.Sequential(*modules)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # (..., in_dim) -> (..., out), unit norm
        return F.normalize(self.mlp(x), dim=-1)

class NeCoModel(nn.Module):
    """Backbone + head on every patch token; state_dict keys 'backbone.*' and 'head.*' (train.py's checkpoints)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views):
        """(B, 3, s, s) crops -> (B, s/p, s/p, out) maps; one backbone call per crop size (DINO's multi-crop)."""
        outs = [None] * len(views)
        for size in sorted({v.shape[-1] for v in views}, reverse=True):
            idx = [i for i, v in enumerate(views) if v.shape[-1] == size]
            x = torch.cat([views[i] for i in idx])  # (len(idx) * B, 3, s, s)
            tokens = self.backbone.forward_features(x)["x_norm_patchtokens"]  # (len(idx) * B, N, D)
            z = self.head(tokens)  # (len(idx) * B, N, out), unit norm
            side = size // self.backbone.patch_size
            for i, chunk in zip(idx, z.chunk(len(idx))):
                outs[i] = chunk.unflatten(1, (side, side))  # (B, side, side, out)
        return outs

# -----------------------------------------------------------------------------
# checkpoints
def shorten(keys, first=5):
    """'a, b, c, d, e, ... (12 in all)': key lists in one-line messages."""
    keys = list(keys)
    text = ", ".join(keys[:first])
    return text + (f", ... ({len(keys)} in all)" if len(keys) > first else "")

def unwrap_container(sd):
    """Find the state_dict inside a checkpoint dict such as {"teacher": ..., "epoch": 3} or {"state_dict": ...}."""
    for _ in range(4):  # containers nest a few levels at most
        if not isinstance(sd, dict):
            raise ValueError(f"expected a state_dict (a dict of tensors), got {type(sd).__name__}")
        if all(isinstance(v, torch.Tensor) for v in sd.values()):
            return sd
        inner = [k for k in CONTAINER_KEYS if isinstance(sd.get(k), dict)]
        if not inner:
            raise ValueError(f"no state_dict in the checkpoint: top-level keys {shorten(map(str, sd))}; expected "
                             f"tensors or one of {', '.join(CONTAINER_KEYS)}")
        sd = sd[inner[0]]
    raise ValueError("no state_dict in the checkpoint: containers nest too deep")

def strip_wrapper_prefixes(key):
    """'module.backbone.blocks.0.x' -> 'blocks.0.x': remove wrapper prefixes, repeatedly, in any order."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key

def clean_state_dict(sd):
    """Checkpoint dict -> (backbone state_dict with the official key names, ignored head keys as stored in the file)."""
    sd = unwrap_container(sd)
    backbone, ignored = {}, []
    for key, value in sd.items():
        name = strip_wrapper_prefixes(key)
        if name.startswith(HEAD_PREFIXES):
            ignored.append(key)
            continue
        if name in backbone:
            raise ValueError(f"checkpoint has two tensors for {name!r} once prefixes are stripped (one is {key!r})")
        backbone[name] = value
    return backbone, ignored

def load_backbone_weights(model, state_dict, ignore_register_tokens=False):
    """Load a checkpoint dict into model strictly; projection-head keys are ignored (and said so)."""
    sd, ignored = clean_state_dict(state_dict)
    if ignore_register_tokens and "register_tokens" in sd:
        del sd["register_tokens"]
        ignored.append("register_tokens")
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit the backbone: missing keys [{shorten(missing)}], unexpected "
                           f"keys [{shorten(unexpected)}]; check the backbone name and num_register_tokens "
                           f"(infer_arch reads them from a checkpoint)")
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        raise RuntimeError(f"checkpoint shapes do not fit the backbone (checkpoint vs model): {shorten(wrong)}; "
                           f"check the backbone name (infer_arch reads it from a checkpoint)")
    model.load_state_dict(sd, strict=True)
    if ignored:
        print(f"model: ignored {len(ignored)} non-backbone checkpoint keys: {shorten(ignored)}", file=sys.stderr)
    return ignored

def infer_arch(state_dict):
    """(name, num_register_tokens) from a checkpoint's keys and shapes, e.g. ("dinov2_vits14_reg", 4). DINOv3
    carries rope_embed.periods, DINO no LayerScale; the patch conv gives the patch size. A registers-excluded model
    trained from DINOv2's _reg weights has no register_tokens and reads as the non-register name; shapes cannot
    tell the two apart (only the pos_embed resizing rule differs)."""
    sd, _ = clean_state_dict(state_dict)
    if "patch_embed.proj.weight" not in sd or "blocks.0.norm1.weight" not in sd:
        raise ValueError(f"not a DINO, DINOv2 or DINOv3 backbone checkpoint: keys {shorten(sd)}")
    family = "dinov3" if "rope_embed.periods" in sd else "dinov2" if "blocks.0.ls1.gamma" in sd else "dino"
    dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    ffn = "swiglu_fused" if "blocks.0.mlp.w12.weight" in sd else "swiglu" if "blocks.0.mlp.w1.weight" in sd else "mlp"
    for name, arch in ARCHS.items():
        if (arch[:4], arch[6]) == ((family, patch, dim, depth), ffn):
            registers = sd[FAMILIES[family]["tokens"]].shape[1] if FAMILIES[family]["tokens"] in sd else 0
            return (name + "_reg" if registers and family == "dinov2" else name), registers
    raise ValueError(f"no known {family} architecture has patch {patch}, embed dim {dim} and {depth} blocks; "
                     f"known: {', '.join(ARCHS)}")

def hub_checkpoint(name):
    """(url, file name) of the official checkpoint for a hub name (DINOv3: url None, the files are gated)."""
    arch = name.removesuffix("_reg")
    if name in DINOV3_FILES:
        return None, DINOV3_FILES[name]
    if name in DINO_FILES:
        return f"{FAMILIES['dino']['url']}/{DINO_FILES[name]}/{DINO_FILES[name]}.pth", f"{DINO_FILES[name]}.pth"
    if not arch.startswith("dinov2_"):
        raise ValueError(f"{name} has no released weights; use weights=None or a local checkpoint path")
    file_name = f"{arch}_reg{DEFAULT_REGISTERS}_pretrain.pth" if name.endswith("_reg") else f"{arch}_pretrain.pth"
    return f"{FAMILIES['dinov2']['url']}/{arch}/{file_name}", file_name

def load_hub_state_dict(name):
    """The official checkpoint through torch.hub's cache: no network when the file is already there."""
    url, file_name = hub_checkpoint(name)
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    if url is None:  # DINOv3: only the cache, under the released file name
        if not (cache_dir / file_name).is_file():
            raise FileNotFoundError(f"DINOv3 weights are gated: request them at {DINOV3_FORM}, then pass the file "
                                    f"as weights (model.weights=/path/{file_name}) or put it in {cache_dir}")
        return load_checkpoint_file(cache_dir / file_name)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=False, file_name=file_name,
                                                  weights_only=True)
    except OSError as e:  # no network, DNS failure, HTTP error: all OSError subclasses
        raise FileNotFoundError(f"cannot download {url} ({type(e).__name__}); put {file_name} in {cache_dir} "
                                f"($TORCH_HOME/hub/checkpoints) or pass a local path as weights") from None

def load_checkpoint_file(path):
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}; pass an existing file, or weights='hub' with "
                                f"the official file in $TORCH_HOME/hub/checkpoints")
    try:  # DINO's full checkpoints store their command line as an argparse.Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated download, not a torch file, pickled objects beyond tensors and containers
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"cannot read checkpoint {path}: {first_line}") from None

def build_backbone(name, weights=None, num_register_tokens=None, drop_path_rate=0.0, pos_embed_rule="dinov2"):
    """A ViT by hub name. weights: None (random init), "hub", a file path, or a loaded state_dict.
    pos_embed_rule: "dinov2" (the release's own resizing of pos_embed, as the official code) or "neco" (see
    VisionTransformer.set_pos_embed_rule).
    num_register_tokens=0 on a _reg name builds the registers-excluded variant and drops the checkpoint's
    register_tokens (it keeps the _reg release's pos_embed resizing rule, which those weights were trained with)."""
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")
    family, patch, embed_dim, depth, num_heads, ffn_hidden, ffn = ARCHS[name.removesuffix("_reg")]
    has_registers = name.endswith("_reg") or family == "dinov3"
    if num_register_tokens is None:
        num_register_tokens = DEFAULT_REGISTERS if has_registers else 0
    if family == "dinov3" and num_register_tokens != DEFAULT_REGISTERS:
        raise ValueError(f"num_register_tokens={num_register_tokens} does not fit {name}: DINOv3 models have "
                         f"{DEFAULT_REGISTERS} storage tokens")
    if num_register_tokens < 0 or (num_register_tokens and not has_registers):
        raise ValueError(f"num_register_tokens={num_register_tokens} does not fit {name}: only _reg names take "
                         f"registers (0 on a _reg name builds the registers-excluded variant)")
    # read the weights first: a missing file fails at once, before the random init (seconds for ViT-g)
    if weights is None:
        state_dict = None
    elif isinstance(weights, str) and weights == "hub":
        state_dict = load_hub_state_dict(name)
    elif isinstance(weights, (str, Path)):
        state_dict = load_checkpoint_file(weights)
    elif isinstance(weights, dict):
        state_dict = weights
    else:
        raise ValueError(f"weights must be None, 'hub', a path or a state_dict, got {type(weights).__name__}")
    # DINOv2's register release resizes pos_embed to the exact grid with antialiasing; its first release and DINO
    # by a scale factor with a 0.1 offset and no antialiasing (see interpolate_pos_embed)
    exact = name.endswith("_reg")
    model = VisionTransformer(family, patch, embed_dim, depth, num_heads, ffn_hidden, ffn, num_register_tokens,
                              interpolate_antialias=exact, interpolate_offset=0.0 if exact else 0.1,
                              drop_path_rate=drop_path_rate).set_pos_embed_rule(pos_embed_rule)
    if state_dict is None:
        return model
    load_backbone_weights(model, state_dict, ignore_register_tokens=exact and num_register_tokens == 0)
    return model

def build_student_teacher(arch, weights=None, num_register_tokens=None, drop_path_rate=0.0, pos_embed_rule="dinov2",
                          head_hidden=2048, head_out=256, head_layers=3, teacher_head="random"):
    """NeCo's student and teacher (NeCoModel each) from the same backbone weights; the teacher's head is its own random
    draw (teacher_head "random", as the public run) or a copy ("copy"). Only the student gets gradients and stochastic
    depth; the teacher follows it as an EMA."""
    if teacher_head not in ("random", "copy"):
        raise ValueError(f"teacher_head must be random or copy, got {teacher_head!r}")
    backbones = [build_backbone(arch, w, num_register_tokens, rate, pos_embed_rule)
                 for w, rate in ((weights, drop_path_rate), (None, 0.0))]
    student, teacher = [NeCoModel(b, ProjectionHead(b.embed_dim, head_hidden, head_out, head_layers))
                        for b in backbones]  # the teacher's head is drawn after the student's
    teacher.backbone.load_state_dict(student.backbone.state_dict())
    if teacher_head == "copy":
        teacher.head.load_state_dict(student.head.state_dict())
    teacher.requires_grad_(False)  # (the backbone's mask_token is frozen: NeCo never uses it)
    return student, teacher

def load_backbone(ckpt, teacher=False):
    """'hub:<name>', a train.py checkpoint (its student, or with teacher=True its EMA teacher) or a bare backbone
    state_dict file -> (backbone in eval mode, what was loaded). Weights that are not finite are refused: they would
    still give confident-looking features."""
    sd = None if ckpt.startswith("hub:") else load_checkpoint_file(ckpt)
    trained = isinstance(sd, dict) and isinstance(sd.get("student"), dict) and isinstance(sd.get("config"), dict)
    if teacher and not trained:
        raise ValueError("it holds no EMA teacher (only a train.py checkpoint, with student and teacher, does)")
    if sd is None:
        backbone, about = build_backbone(ckpt[4:], weights="hub"), {"arch": ckpt[4:], "weights": "official"}
    else:
        which = ("teacher" if teacher else "student") if trained else "state_dict"
        weights = sd[which] if trained else sd
        name, registers = infer_arch(weights)
        if trained:  # the config knows a registers-excluded _reg model; shapes cannot
            arch = sd["config"].get("model", {})
            name, registers = arch.get("arch", name), arch.get("num_register_tokens", registers)
        backbone = build_backbone(name, weights=weights, num_register_tokens=registers)
        about = {"arch": name, "num_register_tokens": registers, "weights": which,
                 **({"step": sd.get("step")} if trained else {})}
    bad = next((k for k, v in backbone.state_dict().items() if not v.isfinite().all()), None)
    if bad is not None:
        raise ValueError(f"tensor {bad} holds NaN or inf values (a diverged run or a damaged file)")
    return backbone.eval(), about

@torch.no_grad()
def patch_features(backbone, images, precision="fp32", last_block=False, pad=False):
    """uint8 images (B, 3, H, W) -> final-norm patch tokens (B, h, w, D), float32, not yet L2-normalised; last_block:
    the last block's tokens before the final norm; pad: zeros after normalising, centred, to a multiple of the patch;
    precision "bf16": autocast on CUDA."""
    mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    x, p = (images.float() / 255 - mean) / std, backbone.patch_size
    if pad:
        (dh, dw) = (-x.shape[2] % p, -x.shape[3] % p)
        x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16" and x.is_cuda):
        tokens = (backbone.get_intermediate_layers(x, n=1, norm=False)[0] if last_block
                  else backbone.forward_features(x)["x_norm_patchtokens"])  # (B, N, D)
    return tokens.float().reshape(len(x), x.shape[2] // p, x.shape[3] // p, -1)  # (B, h, w, D)
