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

REG (``cls_dim`` > 0; spec methods.md §1): a representation vector (B, cls_dim), noised with the image's time, is
embedded by ``Linear -> LayerNorm`` and *prepended* as one extra token without a positional embedding (REG's zero
row); it passes every block with the same conditioning, and the shared final layer's token 0 goes to a zero-init
``Linear(D -> cls_dim)``: its velocity. Hidden states then have T + 1 tokens (the slot first).
Samplers see one packed state per sample, the flattened image followed by the vector (:meth:`SiT.initial_state`,
:meth:`SiT.velocity`, :meth:`SiT.image_of`), so every ODE/SDE sampler and CFG rule integrates both jointly.

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

from reed.activation_checkpoint import ActivationCheckpointing

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

    def forward(self, x: Tensor, return_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, N, D) -> (B, N, D); with ``return_logits`` also the pre-softmax logits (B, H, N, N) (HASTE), computed
        only then (the fused kernel never materialises them)."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        logits = (q * self.scale) @ k.transpose(-2, -1) if return_logits or not self.fused_attn else None
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = logits.softmax(dim=-1) @ v
        x = self.proj(x.transpose(1, 2).reshape(B, N, D))
        return (x, logits) if return_logits else x


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

    def forward(self, x: Tensor, c: Tensor, return_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        # Each (B, D).
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, -1)
        a = self.attn(_modulate(self.norm1(x), shift_msa, scale_msa), return_logits=return_logits)
        a, logits = a if return_logits else (a, None)
        x = x + gate_msa.unsqueeze(1) * a
        x = x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return (x, logits) if return_logits else x


class FinalLayer(nn.Module):
    """(B, T, D), c (B, D) -> (B, T, p * p * C): adaLN-modulated LayerNorm (shift/scale, no gate), Linear."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def modulated(self, x: Tensor, c: Tensor) -> Tensor:
        """The normalised and modulated tokens (B, T, D), before the output Linear."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return _modulate(self.norm_final(x), shift, scale)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.linear(self.modulated(x, c))


# ----------------------------------------------------------------------------------------------------
# SiT
# ----------------------------------------------------------------------------------------------------
class SiT(ActivationCheckpointing, nn.Module):
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
        cls_dim: width of REG's entangled representation token (0: none).
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
        cls_dim: int = 0,
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
        if not isinstance(cls_dim, int) or cls_dim < 0:
            raise ValueError(f"cls_dim must be an int >= 0, got cls_dim={cls_dim!r}")

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
        self.cls_dim = cls_dim
        self.num_prefix = 1 if cls_dim else 0  # extra tokens before the image tokens in the hidden states
        if cls_dim:  # REG: the entangled token's input embedder and velocity head (reference names in comments)
            self.cls_embedder = nn.Sequential(nn.Linear(cls_dim, hidden_size),  # cls_projectors2
                                              nn.LayerNorm(hidden_size, eps=1e-6))  # wg_norm
            self.cls_head = nn.Linear(hidden_size, cls_dim)  # linear_cls
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
        if self.cls_dim:  # the class velocity is exactly 0 at init
            nn.init.zeros_(self.cls_head.weight)
            nn.init.zeros_(self.cls_head.bias)

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
        out: list[int | str] = []
        for d in taps:  # block d's output, or "attn:d": block d's pre-softmax attention logits (B, H, N, N)
            depth = int(d[5:]) if isinstance(d, str) and d.startswith("attn:") else int(d)
            if not 1 <= depth <= self.depth:
                raise ValueError(f"tap depth {depth} is out of range 1..{self.depth} (model depth={self.depth})")
            out.append(f"attn:{depth}" if isinstance(d, str) else depth)
        return out

    def _run_blocks(self, h: Tensor, c: Tensor, taps: set, last: int) -> dict:
        hiddens: dict = {}
        for i, block in enumerate(self.blocks[:last], start=1):
            if f"attn:{i}" in taps:
                h, hiddens[f"attn:{i}"] = self.run_block(block, h, c, return_logits=True)
            else:
                h = self.run_block(block, h, c)
            if i in taps:
                hiddens[i] = h
        hiddens["_last"] = h
        return hiddens

    def _embed(self, x: Tensor, t: Tensor, y: Tensor, cls: Tensor | None) -> tuple[Tensor, Tensor]:
        """Input tokens (B, num_prefix + T, D) and the conditioning c (B, D)."""
        h = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        if self.cls_dim:
            if cls is None or cls.shape != (x.shape[0], self.cls_dim):
                got = None if cls is None else tuple(cls.shape)
                raise ValueError(f"this SiT generates a {self.cls_dim}-d representation token with the image (REG): "
                                 f"pass cls of shape ({x.shape[0]}, {self.cls_dim}), got {got}")
            slot = self.cls_embedder(cls.to(h.dtype)).unsqueeze(1)  # no positional embedding (REG's zero row)
            h = torch.cat([slot, h], dim=1)
        elif cls is not None:
            raise ValueError("cls was given but this SiT has no representation token (cls_dim=0)")
        return h, self.t_embedder(t) + self.y_embedder(y)

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor, taps: Sequence[int] = (), cls: Tensor | None = None
    ) -> tuple[Tensor | tuple[Tensor, Tensor], dict[int, Tensor]]:
        """Predict the velocity.

        Args:
            x: (B, C, H, W) noisy input x_t.
            t: (B,) float times in [0, 1] (0 = data, 1 = noise).
            y: (B,) long labels in [0, num_classes]; ``num_classes`` = null class.
            taps: block depths (1 = output of block 1) whose hidden states to return; ``"attn:d"`` returns block
                d's pre-softmax attention logits (B, heads, N, N) instead (HASTE).
            cls: (B, cls_dim) the noisy representation token at time t (REG models only; required there).

        Returns:
            ``(v, hiddens)``: v of shape (B, C, H, W) and ``{depth: (B, T, D)}`` for each requested tap,
            the raw residual stream after that block (before any norm). REG models return
            ``((v, v_cls), hiddens)`` with v_cls (B, cls_dim) and hidden states of T + 1 tokens, the slot first.
        """
        tap_set = set(self._check_inputs(x, t, y, taps))
        h, c = self._embed(x, t, y, cls)
        hiddens = self._run_blocks(h, c, tap_set, self.depth)
        h = hiddens.pop("_last")
        if not self.cls_dim:
            return self.unpatchify(self.final_layer(h, c)), hiddens  # (B, T, p * p * C) -> image
        m = self.final_layer.modulated(h, c)
        return (self.unpatchify(self.final_layer.linear(m[:, 1:])), self.cls_head(m[:, 0])), hiddens

    def hidden_states(self, x: Tensor, t: Tensor, y: Tensor, taps: Sequence[int],
                      cls: Tensor | None = None) -> dict[int, Tensor]:
        """``{depth: (B, T, D)}`` of the requested taps, running the blocks only up to the deepest one (no
        output head): what a teacher that is read at one block needs (SRA)."""
        tap_set = set(self._check_inputs(x, t, y, taps))
        h, c = self._embed(x, t, y, cls)
        last = max((int(str(d).removeprefix("attn:")) for d in tap_set), default=0)
        hiddens = self._run_blocks(h, c, tap_set, last)
        hiddens.pop("_last")
        return hiddens

    # ---- samplers' view: one packed state per sample (the image, then REG's vector) ----
    def initial_state(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Noise to start sampling from: (n, C, H, W), or for REG (n, C*H*W + cls_dim) with the vector's noise
        drawn after the image's (as REG's generate.py)."""
        x = torch.randn(n, self.in_channels, self.input_size, self.input_size, generator=generator)
        if not self.cls_dim:
            return x
        return torch.cat([x.flatten(1), torch.randn(n, self.cls_dim, generator=generator)], dim=1)

    def _split(self, state: Tensor) -> tuple[Tensor, Tensor]:
        n_img = self.in_channels * self.input_size**2
        if state.dim() != 2 or state.shape[1] != n_img + self.cls_dim:
            raise ValueError(f"packed REG state must be (B, {n_img + self.cls_dim}), got {tuple(state.shape)}")
        x = state[:, :n_img].reshape(-1, self.in_channels, self.input_size, self.input_size)
        return x, state[:, n_img:]

    def velocity(self, state: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The samplers' ``model_fn``: velocity of a state from :meth:`initial_state` (same shape)."""
        if not self.cls_dim:
            return self(state, t, y)[0]
        x, cls = self._split(state)
        (v, v_cls), _ = self(x, t, y, cls=cls)
        return torch.cat([v.flatten(1), v_cls.to(v.dtype)], dim=1)

    def guidance_scale(self, cfg_scale: float, cls_cfg_scale: float | None = None) -> float | Tensor:
        """The samplers' ``cfg_scale`` for this model's state: ``cfg_scale`` itself, or for REG a per-element scale
        over the packed state (C*H*W + cls_dim,): ``cfg_scale`` on the image and ``cls_cfg_scale`` (None: the same)
        on the representation token, whose drift is the conditional one alone when ``cls_cfg_scale`` is 0; no
        guidance of either when ``cfg_scale`` <= 1 (REG's samplers.py)."""
        if not self.cls_dim or cfg_scale <= 1.0:
            return cfg_scale
        w_cls = cfg_scale if cls_cfg_scale is None else cls_cfg_scale if cls_cfg_scale > 0 else 1.0
        n_img = self.in_channels * self.input_size**2
        return torch.cat([torch.full((n_img,), float(cfg_scale), dtype=torch.float64),
                          torch.full((self.cls_dim,), float(w_cls), dtype=torch.float64)])

    def image_of(self, state: Tensor) -> Tensor:
        """The image (B, C, H, W) of a sampled state (REG's vector is discarded, as REG does)."""
        return state if not self.cls_dim else self._split(state)[0]


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
