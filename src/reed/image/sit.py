"""SiT: Scalable Interpolant Transformer (a DiT backbone trained as a flow / velocity model).

Architecture (see spec ``image.md`` §1):

* patch embed: ``Conv2d(C -> D, kernel = stride = p)`` flattened to ``(B, T, D)``,
  ``T = (input_size / p) ** 2``;
* fixed 2-D sin-cos positional embedding (MAE convention), persistent buffer ``pos_embed`` ``(1, T, D)``;
* conditioning ``c = TimestepEmbedder(t) + LabelEmbedder(y)`` of shape ``(B, D)``;
* ``depth`` adaLN-Zero transformer blocks;
* final layer: adaLN-modulated LayerNorm, ``Linear(D -> p * p * C)``, unpatchify to ``(B, C, H, W)``.

Conventions: ``t`` is in ``[0, 1]`` with ``t = 0`` clean data and ``t = 1`` pure noise; ``t`` is *not* scaled
by 1000. Labels ``y`` are in ``[0, num_classes]``; index ``num_classes`` is the null class used for
classifier-free guidance.
Label dropout is *not* done inside the model: call :func:`drop_labels` in the training loop.

Module and parameter names follow the reference SiT / REPA layout so that official checkpoints can be loaded.
One deliberate difference: the final layer is always ``hidden_size`` wide (the reference SiT-S presets are
broken because their final layer defaults to width 768).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SIT_PRESETS",
    "SiT",
    "build_sit",
    "drop_labels",
    "sincos_pos_embed_2d",
    "timestep_embedding",
]


def _presets() -> dict[str, dict]:
    sizes = {
        # name: (depth, hidden_size, num_heads, patch sizes)
        "XL": (28, 1152, 16, (2, 4, 8)),
        "L": (24, 1024, 16, (2, 4, 8)),
        "B": (12, 768, 12, (2, 4, 8)),
        "S": (12, 384, 6, (2, 4, 8)),
        # Small presets for CPU tests and demos (not in the reference).
        "T": (4, 128, 4, (1, 2, 4)),
        "M": (6, 256, 4, (2,)),
    }
    out: dict[str, dict] = {}
    for size, (depth, hidden, heads, patches) in sizes.items():
        for p in patches:
            out[f"SiT-{size}/{p}"] = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=p)
    return out


#: Preset architectures: name -> ``dict(depth=, hidden_size=, num_heads=, patch_size=)``.
SIT_PRESETS: dict[str, dict] = _presets()


# ----------------------------------------------------------------------------------------------------
# Fixed embeddings
# ----------------------------------------------------------------------------------------------------
def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """1-D sin-cos table ``pos`` (M,) -> (M, dim): ``[sin(pos * w), cos(pos * w)]``, w_i=10000^(-2i/dim)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos positional embedding (MAE convention), float32 of shape ``(grid_size**2, dim)``.

    Token ``n = row * grid_size + col``. The first ``dim / 2`` channels encode the column index and the last
    ``dim / 2`` the row index; each half is ``[sin(pos * w), cos(pos * w)]`` with
    ``w_i = 10000^(-i / (dim / 4))``, ``i = 0 .. dim/4 - 1``.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos positional embedding needs dim divisible by 4, got dim={dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (g, g) each; rows[r, c] = r, cols[r, c] = c
    emb_col = _sincos_1d(dim // 2, cols.reshape(-1))
    emb_row = _sincos_1d(dim // 2, rows.reshape(-1))
    return torch.cat([emb_col, emb_row], dim=1).float()


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep features ``t`` (B,) -> (B, dim) float32, laid out as ``[cos(t f_k), sin(t f_k)]``.

    ``f_k = exp(-ln(max_period) * k / (dim // 2))``, ``k = 0 .. dim//2 - 1``. ``t`` is used as given
    (no x1000).
    Always computed in float32 (also under autocast). An odd ``dim`` gets a trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# ----------------------------------------------------------------------------------------------------
# Sub-modules
# ----------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, D) with a strided Conv2d (kernel = stride = patch_size)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, T, D)


class TimestepEmbedder(nn.Module):
    """t (B,) in [0, 1] -> (B, D): 256-d sinusoid, then Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: Tensor) -> Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        # Outside autocast match the (maybe low-precision) weight dtype; under autocast Linear casts anyway.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """y (B,) long in [0, num_classes] -> (B, D). Row ``num_classes`` is the null (unconditional) class."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention (B, T, D) -> (B, T, D), qkv with bias, optional per-head q/k LayerNorm."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, fused_attn: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj(x)


class Mlp(nn.Module):
    """Linear(D -> hidden), GELU(tanh), Linear(hidden -> D). No dropout."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, T, D), shift/scale (B, D) -> x * (1 + scale) + shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block: (B, T, D), c (B, D) -> (B, T, D)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        fused_attn: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # Each (B, D).
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, -1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """(B, T, D), c (B, D) -> (B, T, p * p * C): adaLN-modulated LayerNorm (shift/scale, no gate), Linear."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------------------
# SiT
# ----------------------------------------------------------------------------------------------------
class SiT(nn.Module):
    """Class-conditional SiT velocity model.

    Args:
        input_size: spatial size H = W of the input (pixels or latents); must be divisible by ``patch_size``.
        in_channels: channels C of the input and of the output (e.g. 1 or 3 for pixels, 4 for SD-VAE latents).
        patch_size: patch size p.
        hidden_size: width D; must be divisible by ``num_heads`` and by 4.
        depth: number of transformer blocks.
        num_heads: attention heads.
        num_classes: number of real classes; label ``num_classes`` is the null (CFG) class.
        mlp_ratio: MLP hidden width as a multiple of D.
        qk_norm: per-head LayerNorm on queries and keys.
        fused_attn: use ``F.scaled_dot_product_attention`` (True) or explicit softmax attention (False).
    """

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        patch_size: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        num_classes: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        fused_attn: bool = True,
    ):
        super().__init__()
        for name, value in [
            ("input_size", input_size),
            ("in_channels", in_channels),
            ("patch_size", patch_size),
            ("hidden_size", hidden_size),
            ("depth", depth),
            ("num_heads", num_heads),
            ("num_classes", num_classes),
        ]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if input_size % patch_size != 0:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if hidden_size % 4 != 0:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 (2-D sin-cos pos embedding)")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got mlp_ratio={mlp_ratio}")

        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.null_class = num_classes
        self.grid_size = input_size // patch_size
        self.num_tokens = self.grid_size**2

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # Fixed (never trained) but persistent: saved/loaded with the state dict under the reference key.
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size).unsqueeze(0), persistent=True
        )
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, fused_attn) for _ in range(depth)]
        )
        # Always hidden_size wide (fixes the reference SiT-S decoder_hidden_size bug).
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Reference init: xavier Linear/conv, N(0, 0.02) label table + t-MLP, zero adaLN and output."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        # Patch embed: xavier on the conv weight viewed as a (D, C * p * p) matrix.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity ...
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # ... and the output is exactly 0.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, p * p * C) -> (B, C, H, W), tokens in row-major order, channels last within a patch."""
        p, c, g = self.patch_size, self.out_channels, self.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor, taps: Sequence[int]) -> list[int]:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            want = "(B, {}, {}, {})".format(*expected)
            raise ValueError(f"x must have shape {want}, got {tuple(x.shape)}")
        B = x.shape[0]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        if y.shape != (B,):
            raise ValueError(f"y must have shape ({B},), got {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"y must be an integer (long) tensor, got dtype {y.dtype}")
        taps = [int(d) for d in taps]
        for d in taps:
            if not 1 <= d <= self.depth:
                raise ValueError(f"tap depth {d} is out of range 1..{self.depth} (model depth={self.depth})")
        return taps

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor, taps: Sequence[int] = ()
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Predict the velocity.

        Args:
            x: (B, C, H, W) noisy input x_t.
            t: (B,) float times in [0, 1] (0 = data, 1 = noise).
            y: (B,) long labels in [0, num_classes]; ``num_classes`` = null class.
            taps: block depths (1 = output of block 1) whose hidden states to return.

        Returns:
            ``(v, hiddens)``: v of shape (B, C, H, W) and ``{depth: (B, T, D)}`` for each requested tap,
            the raw residual stream after that block (before any norm).
        """
        tap_set = set(self._check_inputs(x, t, y, taps))
        h = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        hiddens: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if i in tap_set:
                hiddens[i] = h
        out = self.final_layer(h, c)  # (B, T, p * p * C)
        return self.unpatchify(out), hiddens


# ----------------------------------------------------------------------------------------------------
# Builders and helpers
# ----------------------------------------------------------------------------------------------------
_BUILD_DEFAULTS = dict(input_size=32, in_channels=4, num_classes=1000)  # ImageNet 256 px, SD-VAE latents


def build_sit(name: str | None = None, **overrides) -> SiT:
    """Build a :class:`SiT` from a preset name in :data:`SIT_PRESETS`, overridden/extended by ``overrides``.

    Unless given, ``input_size=32, in_channels=4, num_classes=1000`` (the reference ImageNet latent setting).
    With ``name=None`` all of ``depth, hidden_size, num_heads, patch_size`` must be passed as keywords.
    """
    if name is None:
        cfg: dict = {}
    elif name in SIT_PRESETS:
        cfg = dict(SIT_PRESETS[name])
    else:
        raise ValueError(f"unknown SiT preset {name!r}; valid names: {', '.join(SIT_PRESETS)}")
    cfg = {**_BUILD_DEFAULTS, **cfg, **overrides}
    missing = [k for k in ("depth", "hidden_size", "num_heads", "patch_size") if k not in cfg]
    if missing:
        raise ValueError(f"build_sit: missing {missing} (pass a preset name or these keywords)")
    return SiT(**cfg)


def drop_labels(y: Tensor, prob: float, null_class: int, generator: torch.Generator | None = None) -> Tensor:
    """Classifier-free-guidance label dropout: each label becomes ``null_class`` with probability ``prob``.

    ``y`` (B,) long -> new (B,) tensor (the input is not modified). ``generator`` must live on ``y.device``.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got prob={prob}")
    if prob == 0.0:
        return y.clone()
    drop = torch.rand(y.shape, device=y.device, generator=generator) < prob
    return torch.where(drop, torch.full_like(y, null_class), y)
