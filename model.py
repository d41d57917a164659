"""
The DINOv2 vision transformer (with or without registers) and NeCo's projection head.

The module loads the official DINOv2 checkpoints with strict=True and gives the official features at any input size
whose sides are multiples of 14. It needs only torch and the standard library: copy this file alone into another
project if you like.

    from model import build_backbone
    vit = build_backbone("dinov2_vits14_reg", weights="hub")          # downloads once, then reads the cache
    vit = build_backbone("dinov2_vits14_reg", weights="ckpt.pth")     # a local file (DINOv2, NeCo or our train.py)
    vit = build_backbone("dinov2_vits14_reg", weights="hub", num_register_tokens=0)  # registers excluded
    feats = vit.forward_features(images)["x_norm_patchtokens"]         # (B, H/14 * W/14, D)

Offline: weights="hub" reads $TORCH_HOME/hub/checkpoints/<file> (default ~/.cache/torch/hub/checkpoints) and does
not touch the network when the file is there. Copy the official file there, or pass its path as weights.
Names: dinov2_vit{s,b,l,g}14 and dinov2_vit{s,b,l,g}14_reg (the hub's), plus vit_tiny14 and vit_tiny14_reg
(dim 192, depth 6, 3 heads, MLP 768, same 37x37 position grid) for the offline demo and the tests; the tiny
ones have no released weights.
"""

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

HUB_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
PATCH_SIZE = 14
POS_GRID = 37  # every DINOv2 checkpoint was trained at 518 px: 37 x 37 patches, pos_embed (1, 1 + 37*37, D)

# arch -> embed_dim, depth, num_heads, ffn hidden width, ffn kind ("swiglu": w12 = [2*hidden, D], w3 = [D, hidden])
ARCHS = {
    "dinov2_vits14": (384, 12, 6, 1536, "mlp"),
    "dinov2_vitb14": (768, 12, 12, 3072, "mlp"),
    "dinov2_vitl14": (1024, 24, 16, 4096, "mlp"),
    "dinov2_vitg14": (1536, 40, 24, 4096, "swiglu"),
    "vit_tiny14": (192, 6, 3, 768, "mlp"),
}
BACKBONE_NAMES = tuple(arch + suffix for arch in ARCHS for suffix in ("", "_reg"))
DEFAULT_REGISTERS = 4  # the released "_reg" checkpoints all have 4 registers

# keys that belong to a projection head (NeCo, DINO, iBOT): not part of the backbone, ignored when loading
HEAD_PREFIXES = ("head.", "heads.", "projection_head.", "dino_head.", "ibot_head.")
# wrappers around a backbone: DDP (module.), our train.py's ModuleDict (backbone.), Lightning (model.), compile
WRAPPER_PREFIXES = ("module.", "backbone.", "model.", "_orig_mod.")
# dicts that hold a state_dict; the teacher first because that is the model one evaluates after DINO-style training
CONTAINER_KEYS = ("teacher", "state_dict", "model", "student")

# -----------------------------------------------------------------------------
# layers


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
    def __init__(self, embed_dim, patch_size=PATCH_SIZE):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, H/14 * W/14, D), patches row-major
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows: q | k | v, heads contiguous within each
        self.proj = nn.Linear(dim, dim)
        self.fused = True  # False: the explicit softmax(q k^T / sqrt(d)) v of DINOv2's plain Attention class

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
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
        self.act = nn.GELU()  # exact (erf) GELU, as DINOv2
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """ViT-g's feed-forward: silu(x W1) * (x W2), then W3; W1 and W2 live fused in w12."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim, init_value=1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim, num_heads, ffn_hidden, ffn="mlp", drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, ffn_hidden) if ffn == "swiglu" else Mlp(dim, ffn_hidden)
        self.ls2 = LayerScale(dim)
        self.drop_path = drop_path

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path, self.training)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)
        return x


# -----------------------------------------------------------------------------
# the backbone


class DinoVisionTransformer(nn.Module):
    def __init__(self, embed_dim=384, depth=12, num_heads=6, ffn_hidden=1536, ffn="mlp", num_register_tokens=0,
                 interpolate_antialias=False, interpolate_offset=0.1, drop_path_rate=0.0):
        super().__init__()
        self.embed_dim = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = PATCH_SIZE
        self.num_register_tokens = num_register_tokens
        # how pos_embed is resized; the register and the non-register releases were trained with different rules
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.release_rule = (interpolate_antialias, interpolate_offset)  # the release's own: set_pos_embed_rule
        self.grad_checkpointing = False  # True: recompute each block in backward (saves memory for ViT-B/L)

        self.patch_embed = PatchEmbed(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + POS_GRID * POS_GRID, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        else:
            self.register_tokens = None  # no key at all: the non-register checkpoints must load strictly
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # DINOv2's rule: linear ramp over depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, ffn_hidden, ffn, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused here, but the checkpoints carry it
        self.init_weights()

    def init_weights(self):
        # DINOv2's init; LayerNorm, LayerScale (1.0), the patch conv and mask_token keep their constructor values
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_embed(self, grid_h, grid_w, dtype):
        """Position embedding for a grid_h x grid_w patch grid: (1, 1 + grid_h * grid_w, D)."""
        if grid_h == POS_GRID and grid_w == POS_GRID:
            return self.pos_embed  # the trained size: used unchanged
        D = self.embed_dim
        pos = self.pos_embed.float()  # resample in float32 even when the model runs in half precision
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, POS_GRID, POS_GRID, D).permute(0, 3, 1, 2)  # (1, D, 37, 37)
        if self.interpolate_offset:
            # the non-register release resizes by a scale factor with a +0.1 offset; the factor also sets where the
            # bicubic kernel samples, so it is not the same as asking for the output size
            scale = ((grid_h + self.interpolate_offset) / POS_GRID, (grid_w + self.interpolate_offset) / POS_GRID)
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic",
                                      antialias=self.interpolate_antialias)
        else:
            patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic",
                                      antialias=self.interpolate_antialias)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, D)
        return torch.cat((cls_pos, patch_pos), dim=1).to(dtype)  # (1, 1 + N, D)

    def prepare_tokens(self, x):
        """Images (B, 3, H, W) -> tokens (B, 1 + R + N, D) in the order [cls, registers, patches]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}; "
                             f"resize or crop the input")
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1 + N, D)
        # positions go to cls and patches only: the registers are inserted afterwards and get none
        x = x + self.interpolate_pos_embed(H // self.patch_size, W // self.patch_size, x.dtype)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)  # (B, 1 + R + N, D)
        return x

    def set_pos_embed_rule(self, rule):
        """How pos_embed is resized to other grids. "dinov2": the rule of the release these weights come from (the
        register release: the exact grid with antialias; the first release: a scale factor with a +0.1 offset).
        "neco": NeCo's own ViT, which resizes every model, registers included, by scale factors (grid + 0.1) / 37,
        bicubic, no antialias; NeCo's training and its linear and K-means evaluations ran with it. The two differ
        most at small grids such as the 7x7 of a 98 px local crop."""
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

    def run_block(self, block, x):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, x):
        x = self.prepare_tokens(x)
        for block in self.blocks:
            x = self.run_block(block, x)
        x_norm = self.norm(x)  # (B, 1 + R + N, D)
        R = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],  # (B, D)
            "x_norm_regtokens": x_norm[:, 1:1 + R],  # (B, R, D)
            "x_norm_patchtokens": x_norm[:, 1 + R:],  # (B, N, D)
            "x_prenorm": x,  # (B, 1 + R + N, D)
        }

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

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        """Patch tokens of the last n blocks (or of the listed blocks), cls and registers stripped.
        Each output is (B, N, D), or (B, D, H/14, W/14) with reshape; with return_class_token, (patches, cls)."""
        take = self.blocks_to_take(n)
        B, _, H, W = x.shape
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks[:take[-1] + 1]):  # blocks after the last one taken are not needed
            x = self.run_block(block, x)
            if i in take:
                outputs.append(self.norm(x) if norm else x)
        class_tokens = [out[:, 0] for out in outputs]  # (B, D)
        outputs = [out[:, 1 + self.num_register_tokens:] for out in outputs]  # (B, N, D)
        if reshape:
            h, w = H // self.patch_size, W // self.patch_size
            outputs = [out.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]  # (B, D, h, w)
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

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
    """Checkpoint dict -> (backbone state_dict with DINOv2's key names, ignored head keys as stored in the file)."""
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
    """(name, num_register_tokens) from a checkpoint's shapes, e.g. ("dinov2_vits14_reg", 4).
    A registers-excluded model trained from the _reg weights has no register_tokens and reads as the non-register
    name; shapes cannot tell the two apart (only the pos_embed resizing rule differs)."""
    sd, _ = clean_state_dict(state_dict)
    if "pos_embed" not in sd or "blocks.0.norm1.weight" not in sd:
        raise ValueError(f"not a DINOv2 backbone checkpoint: keys {shorten(sd)}")
    dim = sd["pos_embed"].shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for arch, (embed_dim, n_blocks, *_) in ARCHS.items():
        if (embed_dim, n_blocks) == (dim, depth):
            registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
            return (arch + "_reg" if registers else arch), registers
    raise ValueError(f"no known architecture has embed dim {dim} and {depth} blocks; known: {', '.join(ARCHS)}")


def hub_checkpoint(name):
    """(url, file name) of the official checkpoint for a hub name."""
    arch = name.removesuffix("_reg")
    if not arch.startswith("dinov2_"):
        raise ValueError(f"{name} has no released weights; use weights=None or a local checkpoint path")
    file_name = f"{arch}_reg{DEFAULT_REGISTERS}_pretrain.pth" if name.endswith("_reg") else f"{arch}_pretrain.pth"
    return f"{HUB_BASE_URL}/{arch}/{file_name}", file_name


def load_hub_state_dict(name):
    """The official checkpoint through torch.hub's cache: no network when the file is already there."""
    url, file_name = hub_checkpoint(name)
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated download, not a torch file, pickled objects beyond tensors and containers
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"cannot read checkpoint {path}: {first_line}") from None


def build_backbone(name, weights=None, num_register_tokens=None, drop_path_rate=0.0, pos_embed_rule="dinov2"):
    """A DINOv2 ViT by hub name. weights: None (random init), "hub", a file path, or a loaded state_dict.
    pos_embed_rule: "dinov2" (the release's own resizing of pos_embed, as the official code) or "neco" (see
    DinoVisionTransformer.set_pos_embed_rule).
    num_register_tokens=0 on a _reg name builds the registers-excluded variant and drops the checkpoint's
    register_tokens (it keeps the _reg release's pos_embed resizing rule, which those weights were trained with)."""
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")
    has_registers = name.endswith("_reg")
    embed_dim, depth, num_heads, ffn_hidden, ffn = ARCHS[name.removesuffix("_reg")]
    if num_register_tokens is None:
        num_register_tokens = DEFAULT_REGISTERS if has_registers else 0
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
    model = DinoVisionTransformer(
        embed_dim, depth, num_heads, ffn_hidden, ffn, num_register_tokens,
        # the register release resizes pos_embed to the exact grid with antialiasing, the first release by a
        # scale factor with a 0.1 offset and no antialiasing (see interpolate_pos_embed)
        interpolate_antialias=has_registers, interpolate_offset=0.0 if has_registers else 0.1,
        drop_path_rate=drop_path_rate).set_pos_embed_rule(pos_embed_rule)
    if state_dict is None:
        return model
    load_backbone_weights(model, state_dict, ignore_register_tokens=has_registers and num_register_tokens == 0)
    return model
