"""ProteinMPNN-style graph denoiser for masked-diffusion inverse folding (spec ``protein.md`` §1.3–1.4).

The network maps a backbone ``X`` (N, CA, C, O coordinates) and a partially masked sequence ``S_t`` to per-residue
log-probabilities over 22 tokens (20 amino acids, ``X`` = 20, ``MASK`` = 21). There is no time input: the
network infers the noise level from the number of MASK tokens it sees.

Pipeline:

* optional training-only Gaussian backbone noise (``backbone_noise`` Å, drawn from ``generator`` when given);
* :class:`ProteinFeatures`: k-nearest-neighbour graph on Cα (self included, masked pairs ranked last), edge
  features = 16-d relative-position embedding (66 classes, class 65 = different chains) concatenated with
  25 atom-pair distances × 16 RBFs = 400, ``Linear(416 -> H, no bias)`` then ``LayerNorm``;
* node init: one ``H``-vector (zeros; trainable only with ``learnable_node``) broadcast to every residue;
* ``encoder_layers`` × :class:`EncLayer` (message passing with node and edge updates, sequence-blind);
* sequence embedding ``Embedding(22 -> H)``; edge-sequence tensor ``h_ES = [h_E_ij, h_S_j]`` (2H);
* ``decoder_layers`` × :class:`DecLayer` (non-causal, no attend mask; inputs masked by ``mask_i`` only),
  each with the REED edge branch producing ``h_ES_new`` (used as next ``h_ES`` only with ``update_edge``);
* ``W_out: Linear(H -> 22)`` then ``log_softmax``.

Intermediate activations for representation alignment are exposed as named *taps*
(``"encoder"``, ``"decoder.{d}.nodes"``, ``"decoder.{d}.edges"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reed.activation_checkpoint import ActivationCheckpointing

__all__ = [
    "ATOM_PAIRS",
    "MASK_ID",
    "MPNN_PRESETS",
    "VOCAB",
    "DecLayer",
    "EncLayer",
    "MPNNDenoiser",
    "PositionalEncodings",
    "ProteinFeatures",
    "build_mpnn",
    "gather_edges",
    "gather_nodes",
    "knn_graph",
    "rbf",
    "virtual_cb",
]

#: Vocabulary size: 20 amino acids ``ACDEFGHIKLMNPQRSTVWY`` (0–19), unknown ``X`` (20), ``MASK`` (21).
VOCAB: int = 22
#: Index of the MASK token.
MASK_ID: int = 21

#: The 25 (atom at residue i, atom at neighbour j) pairs whose distances are RBF-encoded, in reference order.
ATOM_PAIRS: tuple[tuple[str, str], ...] = (
    ("CA", "CA"), ("N", "N"), ("C", "C"), ("O", "O"), ("Cb", "Cb"),
    ("CA", "N"), ("CA", "C"), ("CA", "O"), ("CA", "Cb"), ("N", "C"),
    ("N", "O"), ("N", "Cb"), ("Cb", "C"), ("Cb", "O"), ("O", "C"),
    ("N", "CA"), ("C", "CA"), ("O", "CA"), ("Cb", "CA"), ("C", "N"),
    ("O", "N"), ("Cb", "N"), ("C", "Cb"), ("O", "Cb"), ("C", "O"),
)  # fmt: skip

#: Preset architectures for :func:`build_mpnn`.
MPNN_PRESETS: dict[str, dict] = {
    "mpnn": dict(hidden=128, encoder_layers=3, decoder_layers=3, k_neighbors=30),
    "mpnn-small": dict(hidden=64, encoder_layers=2, decoder_layers=2, k_neighbors=16),
}

_MSG_SCALE = 30.0
_MAX_REL = 32
_NUM_POS = 16
_NUM_RBF = 16


# ----------------------------------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------------------------------
def _at_least_fp32(x: Tensor) -> Tensor:
    """Geometry is computed in float32 (or float64 if given), never in half precision."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def virtual_cb(X: Tensor) -> Tensor:
    """Virtual Cβ from the backbone.

    ``b = CA - N``, ``c = C - CA``, ``a = b × c``, ``Cβ = -0.58273431 a + 0.56802827 b - 0.54067466 c + CA``.

    Args:
        X: ``(..., 4, 3)`` backbone coordinates in the order N, CA, C, O.

    Returns:
        ``(..., 3)`` virtual Cβ coordinates.
    """
    n, ca, c = X[..., 0, :], X[..., 1, :], X[..., 2, :]
    b = ca - n
    cc = c - ca
    a = torch.linalg.cross(b, cc, dim=-1)
    return -0.58273431 * a + 0.56802827 * b - 0.54067466 * cc + ca


def rbf(D: Tensor, num: int = _NUM_RBF, d_min: float = 2.0, d_max: float = 22.0) -> Tensor:
    """Gaussian radial basis expansion ``exp(-((d - mu_k) / sigma)^2)``.

    Centres ``mu = linspace(d_min, d_max, num)``, width ``sigma = (d_max - d_min) / num``.

    Args:
        D: ``(...)`` distances in Å.

    Returns:
        ``(..., num)`` RBF features (same dtype as ``D``).
    """
    mu = torch.linspace(d_min, d_max, num, device=D.device, dtype=D.dtype)
    sigma = (d_max - d_min) / num
    return torch.exp(-(((D.unsqueeze(-1) - mu) / sigma) ** 2))


def gather_nodes(nodes: Tensor, E_idx: Tensor) -> Tensor:
    """Gather per-node features at neighbour indices.

    Args:
        nodes: ``(B, L, C)`` node features.
        E_idx: ``(B, L, K)`` neighbour indices into the L axis.

    Returns:
        ``(B, L, K, C)`` with ``out[b, i, k] = nodes[b, E_idx[b, i, k]]``.
    """
    B, L, K = E_idx.shape
    C = nodes.shape[-1]
    idx = E_idx.reshape(B, L * K, 1).expand(-1, -1, C)
    return torch.gather(nodes, 1, idx).view(B, L, K, C)


def gather_edges(edges: Tensor, E_idx: Tensor) -> Tensor:
    """Gather dense pairwise features at neighbour indices.

    Args:
        edges: ``(B, L, L, C)`` dense pair features.
        E_idx: ``(B, L, K)`` neighbour indices.

    Returns:
        ``(B, L, K, C)`` with ``out[b, i, k] = edges[b, i, E_idx[b, i, k]]``.
    """
    C = edges.shape[-1]
    idx = E_idx.unsqueeze(-1).expand(-1, -1, -1, C)
    return torch.gather(edges, 2, idx)


def knn_graph(CA: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """k-nearest-neighbour graph on Cα–Cα distances (self included).

    ``D_ij = mask_i mask_j sqrt(|CA_i - CA_j|^2 + 1e-6)``; pairs involving a masked residue get the row's
    maximum distance added (reference behaviour), so they rank last. Ties between such a pair and the
    farthest valid residue are broken in favour of the valid residue.

    Args:
        CA: ``(B, L, 3)`` Cα coordinates.
        mask: ``(B, L)`` 1 for valid residues.
        k: requested number of neighbours; ``K = min(k, L)``.

    Returns:
        ``D_neighbors`` ``(B, L, K)`` adjusted distances (ascending) and ``E_idx`` ``(B, L, K)`` int64 indices.
    """
    CA = _at_least_fp32(CA)
    mask = mask.to(CA.dtype)
    mask_2d = mask.unsqueeze(1) * mask.unsqueeze(2)
    dX = CA.unsqueeze(1) - CA.unsqueeze(2)
    D = mask_2d * torch.sqrt((dX**2).sum(-1) + 1e-6)
    D_max = D.max(dim=-1, keepdim=True).values
    D_adjust = D + (1.0 - mask_2d) * D_max
    K = min(k, CA.shape[1])
    # Tie-break key: masked pairs strictly after valid ones at equal adjusted distance.
    key = D_adjust + (1.0 - mask_2d) * (1e-4 * (D_max + 1.0))
    _, E_idx = torch.topk(key, K, dim=-1, largest=False)
    D_neighbors = torch.gather(D_adjust, -1, E_idx)
    return D_neighbors, E_idx


# ----------------------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------------------
class PositionalEncodings(nn.Module):
    """Relative-position embedding: 66 one-hot classes -> ``Linear(66 -> num_embeddings)``.

    Same chain: ``clip(offset + max_rel, 0, 2 max_rel)`` (classes 0..64); different chains: ``2 max_rel + 1`` (65).
    """

    def __init__(self, num_embeddings: int = _NUM_POS, max_relative_feature: int = _MAX_REL) -> None:
        super().__init__()
        self.max_rel = max_relative_feature
        self.linear = nn.Linear(2 * max_relative_feature + 2, num_embeddings)

    def classes(self, offset: Tensor, same_chain: Tensor) -> Tensor:
        """Class index ``(B, L, K)`` int64 from ``offset`` ``(B, L, K)`` and ``same_chain`` ``(B, L, K)`` (bool/0-1)."""
        same = same_chain.long()
        d = torch.clamp(offset + self.max_rel, 0, 2 * self.max_rel) * same + (1 - same) * (2 * self.max_rel + 1)
        return d.long()

    def forward(self, offset: Tensor, same_chain: Tensor) -> Tensor:
        """``(B, L, K)`` offsets and chain-equality flags -> ``(B, L, K, num_embeddings)``."""
        one_hot = F.one_hot(self.classes(offset, same_chain), 2 * self.max_rel + 2)
        return self.linear(one_hot.to(self.linear.weight.dtype))


class ProteinFeatures(nn.Module):
    """Edge features of the kNN graph (no node features).

    ``E = LayerNorm(Linear_416->H, no bias([pos16, rbf400]))``.
    """

    def __init__(
        self,
        edge_features: int = 128,
        num_positional_embeddings: int = _NUM_POS,
        num_rbf: int = _NUM_RBF,
        top_k: int = 30,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.num_rbf = num_rbf
        self.embeddings = PositionalEncodings(num_positional_embeddings)
        edge_in = num_positional_embeddings + num_rbf * len(ATOM_PAIRS)
        self.edge_embedding = nn.Linear(edge_in, edge_features, bias=False)
        self.norm_edges = nn.LayerNorm(edge_features)

    def forward(self, X: Tensor, mask: Tensor, residue_idx: Tensor, chain_encoding: Tensor) -> tuple[Tensor, Tensor]:
        """Compute edge features.

        Args:
            X: ``(B, L, 4, 3)`` backbone N, CA, C, O (already noised if desired).
            mask: ``(B, L)`` float, 1 for valid residues.
            residue_idx: ``(B, L)`` int64 residue numbering (chain offsets of 100 between chains).
            chain_encoding: ``(B, L)`` int64 chain ids (padding 0).

        Returns:
            ``E`` ``(B, L, K, H)`` edge features and ``E_idx`` ``(B, L, K)`` int64 neighbour indices.
        """
        X = _at_least_fp32(X)
        atoms = {"N": X[:, :, 0], "CA": X[:, :, 1], "C": X[:, :, 2], "O": X[:, :, 3], "Cb": virtual_cb(X)}
        D_neighbors, E_idx = knn_graph(atoms["CA"], mask, self.top_k)

        feats = []
        for a_i, a_j in ATOM_PAIRS:
            if a_i == "CA" and a_j == "CA":
                D = D_neighbors  # reference uses the mask-adjusted kNN distances for CA-CA
            else:
                A = atoms[a_i].unsqueeze(2)  # (B, L, 1, 3)
                Bn = gather_nodes(atoms[a_j], E_idx)  # (B, L, K, 3)
                D = torch.sqrt(((A - Bn) ** 2).sum(-1) + 1e-6)
            feats.append(rbf(D, self.num_rbf))
        rbf_all = torch.cat(feats, dim=-1)  # (B, L, K, 400)

        offset = gather_nodes(residue_idx.unsqueeze(-1), E_idx).squeeze(-1)
        offset = residue_idx.unsqueeze(-1) - offset
        chain_j = gather_nodes(chain_encoding.unsqueeze(-1), E_idx).squeeze(-1)
        same_chain = chain_encoding.unsqueeze(-1) == chain_j
        E_pos = self.embeddings(offset, same_chain)

        E = torch.cat([E_pos, rbf_all], dim=-1)
        E = self.norm_edges(self.edge_embedding(E))
        return E, E_idx


# ----------------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------------
class PositionWiseFeedForward(nn.Module):
    """``Linear(H -> 4H) -> GELU -> Linear(4H -> H)``."""

    def __init__(self, hidden: int, ff: int) -> None:
        super().__init__()
        self.W_in = nn.Linear(hidden, ff)
        self.W_out = nn.Linear(ff, hidden)
        self.act = nn.GELU()

    def forward(self, h: Tensor) -> Tensor:
        """``(..., H) -> (..., H)``."""
        return self.W_out(self.act(self.W_in(h)))


class _MLP3(nn.Module):
    """``Linear(in -> H) -> GELU -> Linear(H -> H) -> GELU -> Linear(H -> H)``."""

    def __init__(self, num_in: int, hidden: int) -> None:
        super().__init__()
        self.W1 = nn.Linear(num_in, hidden)
        self.W2 = nn.Linear(hidden, hidden)
        self.W3 = nn.Linear(hidden, hidden)
        self.act = nn.GELU()

    def forward(self, h: Tensor) -> Tensor:
        """``(..., in) -> (..., H)``."""
        return self.W3(self.act(self.W2(self.act(self.W1(h)))))


class EncLayer(nn.Module):
    """Encoder message-passing layer with node and edge updates.

    ``m_ij = MLP3([h_i, h_E_ij, h_j]) * mask_i mask_j``; ``h_i <- LN(h_i + Drop(sum_j m_ij / 30))``;
    ``h_i <- LN(h_i + Drop(FFN(h_i)))``; ``h_i <- mask_i h_i``; then with the updated nodes
    ``h_E_ij <- LN(h_E_ij + Drop(MLP3'([h_i, h_E_ij, h_j])))``.
    """

    def __init__(self, hidden: int, dropout: float = 0.1, scale: float = _MSG_SCALE) -> None:
        super().__init__()
        self.scale = scale
        self.message = _MLP3(3 * hidden, hidden)
        self.edge_message = _MLP3(3 * hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.norm3 = nn.LayerNorm(hidden)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.dense = PositionWiseFeedForward(hidden, 4 * hidden)

    @staticmethod
    def _cat(h_V: Tensor, h_E: Tensor, E_idx: Tensor) -> Tensor:
        h_j = gather_nodes(h_V, E_idx)
        h_i = h_V.unsqueeze(2).expand(-1, -1, E_idx.shape[-1], -1)
        return torch.cat([h_i, h_E, h_j], dim=-1)

    def forward(
        self, h_V: Tensor, h_E: Tensor, E_idx: Tensor, mask_V: Tensor, mask_attend: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``h_V`` ``(B, L, H)``, ``h_E`` ``(B, L, K, H)``, ``E_idx`` ``(B, L, K)``, ``mask_V`` ``(B, L)``,
        ``mask_attend`` ``(B, L, K)`` -> updated ``(h_V, h_E)`` with the same shapes."""
        m = self.message(self._cat(h_V, h_E, E_idx)) * mask_attend.unsqueeze(-1)
        h_V = self.norm1(h_V + self.dropout1(m.sum(-2) / self.scale))
        h_V = self.norm2(h_V + self.dropout2(self.dense(h_V)))
        h_V = mask_V.unsqueeze(-1) * h_V
        m_e = self.edge_message(self._cat(h_V, h_E, E_idx))
        h_E = self.norm3(h_E + self.dropout3(m_e))
        return h_V, h_E


class DecLayer(nn.Module):
    """Non-causal decoder layer with the REED edge branch.

    Input ``h_ESV_ij = mask_i [h_ES_ij, h_V_j]`` (3H). ``m_ij = MLP3([h_i, h_ESV_ij])`` (4H -> H, no attend mask);
    node update as in :class:`EncLayer`. Edge branch:
    ``dE = Lin(3H -> 2H)(GELU(Lin(3H -> 3H)(LN_3H([m_ij, h_ES_ij]))))``, ``h_ES_new = LN_2H(h_ES + Drop(dE))``.
    """

    def __init__(self, hidden: int, dropout: float = 0.1, scale: float = _MSG_SCALE) -> None:
        super().__init__()
        self.scale = scale
        self.message = _MLP3(4 * hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dense = PositionWiseFeedForward(hidden, 4 * hidden)
        # REED edge branch
        self.edge_norm_in = nn.LayerNorm(3 * hidden)
        self.edge_W1 = nn.Linear(3 * hidden, 3 * hidden)
        self.edge_W2 = nn.Linear(3 * hidden, 2 * hidden)
        self.edge_act = nn.GELU()
        self.edge_dropout = nn.Dropout(dropout)
        self.edge_norm_out = nn.LayerNorm(2 * hidden)

    def forward(
        self, h_V: Tensor, h_ES: Tensor, E_idx: Tensor, mask_V: Tensor, compute_edges: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Run one decoder layer.

        Args:
            h_V: ``(B, L, H)`` node states.
            h_ES: ``(B, L, K, 2H)`` edge-sequence states ``[h_E_ij, h_S_j]``.
            E_idx: ``(B, L, K)`` neighbour indices.
            mask_V: ``(B, L)`` residue mask.
            compute_edges: whether to evaluate the edge branch.

        Returns:
            New ``h_V`` ``(B, L, H)`` and ``h_ES_new`` ``(B, L, K, 2H)`` (``None`` if not computed).
        """
        K = E_idx.shape[-1]
        h_j = gather_nodes(h_V, E_idx)
        h_ESV = torch.cat([h_ES, h_j], dim=-1) * mask_V.view(*mask_V.shape, 1, 1)
        h_i = h_V.unsqueeze(2).expand(-1, -1, K, -1)
        m = self.message(torch.cat([h_i, h_ESV], dim=-1))
        h_V_new = self.norm1(h_V + self.dropout1(m.sum(-2) / self.scale))
        h_V_new = self.norm2(h_V_new + self.dropout2(self.dense(h_V_new)))
        h_V_new = mask_V.unsqueeze(-1) * h_V_new
        h_ES_new = None
        if compute_edges:
            e_in = torch.cat([m, h_ES], dim=-1)
            dE = self.edge_W2(self.edge_act(self.edge_W1(self.edge_norm_in(e_in))))
            h_ES_new = self.edge_norm_out(h_ES + self.edge_dropout(dE))
        return h_V_new, h_ES_new


# ----------------------------------------------------------------------------------------------------------------------
# Denoiser
# ----------------------------------------------------------------------------------------------------------------------
class MPNNDenoiser(ActivationCheckpointing, nn.Module):
    """ProteinMPNN encoder/decoder used as a time-free masked-diffusion denoiser (with REED taps).

    Args:
        hidden: width H of nodes and edges.
        encoder_layers: number of :class:`EncLayer`.
        decoder_layers: number of :class:`DecLayer` (also ``depth``).
        k_neighbors: k of the kNN graph (``K = min(k, L)``).
        dropout: dropout probability in every layer.
        backbone_noise: std (Å) of Gaussian noise added to the backbone in training mode.
        learnable_node: make the (zero-initialised) node init vector trainable.
        update_edge: feed the decoder edge-branch output ``h_ES_new`` to the next decoder layer.
        vocab: number of tokens (input embedding and output logits).
    """

    def __init__(
        self,
        hidden: int = 128,
        encoder_layers: int = 3,
        decoder_layers: int = 3,
        k_neighbors: int = 30,
        dropout: float = 0.1,
        backbone_noise: float = 0.1,
        learnable_node: bool = False,
        update_edge: bool = False,
        vocab: int = VOCAB,
    ) -> None:
        super().__init__()
        if decoder_layers < 1 or encoder_layers < 0:
            raise ValueError(
                f"need decoder_layers >= 1 and encoder_layers >= 0, got {encoder_layers=}, {decoder_layers=}"
            )
        self.hidden_size = hidden
        self.depth = decoder_layers
        self.k_neighbors = k_neighbors
        self.backbone_noise = backbone_noise
        self.learnable_node = learnable_node
        self.update_edge = update_edge
        self.vocab = vocab

        self.features = ProteinFeatures(hidden, top_k=k_neighbors)
        self.W_e = nn.Linear(hidden, hidden)
        self.W_s = nn.Embedding(vocab, hidden)
        self.node_embeds = nn.Parameter(torch.zeros(hidden), requires_grad=learnable_node)
        self.encoder_layers = nn.ModuleList([EncLayer(hidden, dropout) for _ in range(encoder_layers)])
        self.decoder_layers = nn.ModuleList([DecLayer(hidden, dropout) for _ in range(decoder_layers)])
        self.W_out = nn.Linear(hidden, vocab)

        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    # -- taps ----------------------------------------------------------------------------------------------------------
    def tap_names(self) -> list[str]:
        """Valid tap names: ``"encoder"``, then ``"decoder.{d}.nodes"`` and ``"decoder.{d}.edges"`` per layer."""
        names = ["encoder"]
        for d in range(self.depth):
            names += [f"decoder.{d}.nodes", f"decoder.{d}.edges"]
        return names

    @property
    def last_tap(self) -> str:
        """The last decoder layer's node states: what "the last block" means for this denoiser (the dispersive
        term's default)."""
        return f"decoder.{self.depth - 1}.nodes"

    def tap_dim(self, tap: str) -> int:
        """Feature width of a tap: ``H`` for encoder / node taps, ``2H`` for edge taps."""
        if tap not in self.tap_names():
            raise ValueError(f"unknown tap {tap!r}; valid taps: {self.tap_names()}")
        return 2 * self.hidden_size if tap.endswith(".edges") else self.hidden_size

    # -- forward -------------------------------------------------------------------------------------------------------
    def forward(
        self,
        X: Tensor,
        S_t: Tensor,
        mask: Tensor,
        residue_idx: Tensor,
        chain_encoding: Tensor,
        *,
        taps: Sequence[str] = (),
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Denoise a partially masked sequence on a backbone.

        Args:
            X: ``(B, L, 4, 3)`` float backbone N, CA, C, O (padding 0).
            S_t: ``(B, L)`` int64 noisy tokens (``MASK_ID`` allowed).
            mask: ``(B, L)`` float, 1 for valid residues.
            residue_idx: ``(B, L)`` int64 (padding -100).
            chain_encoding: ``(B, L)`` int64 chain ids (padding 0).
            taps: names from :meth:`tap_names` to return.
            generator: RNG for the training-only backbone noise.

        Returns:
            ``log_probs`` ``(B, L, vocab)`` and a dict with the requested taps (``"encoder"`` ``(B, L, H)``,
            ``"decoder.{d}.nodes"`` ``(B, L, H)``, ``"decoder.{d}.edges"`` ``(B, L, K, 2H)``) plus always
            ``"edge_index"`` ``(B, L, K)`` int64 and ``"edge_mask"`` ``(B, L, K)`` float
            (``mask_i * mask_{E_idx[i, k]}``).
        """
        valid = set(self.tap_names())
        taps = list(taps)
        bad = [t for t in taps if t not in valid]
        if bad:
            raise ValueError(f"unknown tap(s) {bad}; valid taps: {self.tap_names()}")
        want = set(taps)

        mask = mask.float()
        if self.training and self.backbone_noise > 0:
            noise = torch.randn(X.shape, generator=generator, device=X.device, dtype=X.dtype)
            X = X + self.backbone_noise * noise

        E, E_idx = self.features(X, mask, residue_idx, chain_encoding)
        B, L = mask.shape
        h_V = self.node_embeds.to(E.dtype).expand(B, L, -1)
        h_E = self.W_e(E)

        mask_j = gather_nodes(mask.unsqueeze(-1), E_idx).squeeze(-1)
        mask_attend = mask.unsqueeze(-1) * mask_j  # (B, L, K)

        for layer in self.encoder_layers:
            h_V, h_E = self.run_block(layer, h_V, h_E, E_idx, mask, mask_attend)

        out: dict[str, Tensor] = {}
        if "encoder" in want:
            out["encoder"] = h_V

        h_S = self.W_s(S_t)
        h_Sj = gather_nodes(h_S, E_idx)
        h_ES = torch.cat([h_E, h_Sj], dim=-1)

        for d, layer in enumerate(self.decoder_layers):
            edge_tap = f"decoder.{d}.edges"
            need_edges = edge_tap in want or (self.update_edge and d < self.depth - 1)
            h_V, h_ES_new = self.run_block(layer, h_V, h_ES, E_idx, mask, compute_edges=need_edges)
            if f"decoder.{d}.nodes" in want:
                out[f"decoder.{d}.nodes"] = h_V
            if edge_tap in want:
                out[edge_tap] = h_ES_new
            if self.update_edge and h_ES_new is not None:
                h_ES = h_ES_new

        log_probs = F.log_softmax(self.W_out(h_V).float(), dim=-1)
        out["edge_index"] = E_idx
        out["edge_mask"] = mask_attend
        return log_probs, out


def build_mpnn(preset: str | None = None, **kwargs) -> MPNNDenoiser:
    """Build an :class:`MPNNDenoiser` from an optional preset name in :data:`MPNN_PRESETS` plus overrides."""
    cfg: dict = {}
    if preset is not None:
        if preset not in MPNN_PRESETS:
            raise ValueError(f"unknown MPNN preset {preset!r}; choose from {sorted(MPNN_PRESETS)}")
        cfg.update(MPNN_PRESETS[preset])
    cfg.update(kwargs)
    return MPNNDenoiser(**cfg)
