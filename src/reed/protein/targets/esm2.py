"""ESM-2 protein targets: per-residue hidden states (``single``) and symmetrised attention maps of all layers
and heads (``pair``), written into a protein target store; a tiny random ESM-2 for tests."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reed.errors import DataError, ReedError
from reed.protein.targets.store import ProteinTargetStore, ProteinTargetWriter

DEFAULT_ESM2 = "facebook/esm2_t33_650M_UR50D"
_ESM_LETTERS = frozenset("LAGVSERTDIKPNQFYMHWCXBUZO")


ESM_VOCAB = ("<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "D", "I", "K", "P", "N",
             "Q", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>")


def save_random_esm2(path: str | os.PathLike, *, hidden: int = 16, layers: int = 2, heads: int = 2,
                     seed: int = 0) -> Path:
    """Save a randomly initialised ESM-2-architecture model (real ESM vocabulary and tokenizer) to ``path``.

    For tests and offline benchmarks where the pretrained weights cannot be downloaded: it goes through the same
    loading code as ``facebook/esm2_*``, but its representations are those of an untrained network.
    """
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(ESM_VOCAB) + "\n")
    tok = EsmTokenizer(str(d / "vocab.txt"))
    torch.manual_seed(seed)
    cfg = EsmConfig(vocab_size=len(ESM_VOCAB), hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=2 * hidden, pad_token_id=1, mask_token_id=32,
                    position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                    max_position_embeddings=1026)
    EsmForMaskedLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model


def _model_help(model: str) -> str:
    hub = model if not _looks_like_path(model) else DEFAULT_ESM2
    return (f"on a machine with internet run `huggingface-cli download {hub} --local-dir DIR` (or "
            f"`EsmModel.from_pretrained('{hub}').save_pretrained(DIR)` plus the tokenizer) and pass model=DIR")


def load_esm2(model: str = DEFAULT_ESM2, *, device: str | torch.device = "cpu", attentions: bool = True):
    """``(tokenizer, EsmModel)`` from a local directory or a hub id (the hub cache, or a download when online);
    eval mode, gradients off. Raises :class:`ReedError` naming the model when it cannot be loaded."""
    from transformers import AutoTokenizer, EsmModel

    src = os.path.expanduser(str(model))
    if not Path(src).exists() and _looks_like_path(str(model)):
        raise ReedError(f"ESM-2 model directory not found: {model}; {_model_help(str(model))}")
    kwargs: dict[str, Any] = {"add_pooling_layer": False}
    if attentions:
        kwargs["attn_implementation"] = "eager"  # sdpa/flash kernels do not return attention maps
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        esm, info = EsmModel.from_pretrained(src, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ReedError(f"cannot load ESM-2 model '{model}' ({msg}); {_model_help(str(model))}") from e
    missing = sorted(k for k in info.get("missing_keys", ()) if k.split(".")[0] not in ("pooler", "contact_head"))
    if missing or info.get("mismatched_keys"):
        raise ReedError(f"ESM-2 model '{model}' lacks weights {missing[:8]} or has wrong shapes "
                        f"{list(info.get('mismatched_keys', []))[:8]}; is it an ESM-2 checkpoint?")
    return tokenizer, esm.float().to(device).eval().requires_grad_(False)


def _esm_ids(tokenizer, seq: str) -> list[int]:
    vocab = tokenizer.get_vocab()
    fallback = vocab.get("X", tokenizer.unk_token_id)
    body = [vocab[c] if c in _ESM_LETTERS and c in vocab else fallback for c in seq.upper()]
    return [tokenizer.cls_token_id, *body, tokenizer.eos_token_id]


def _budget_batches(lengths: Sequence[int], order: Sequence[int], batch_tokens: int) -> Iterator[list[int]]:
    """Consecutive groups of ``order`` whose padded size (max length + 2) * count stays within ``batch_tokens``
    (a single sequence over the budget forms its own batch)."""
    batch: list[int] = []
    longest = 0
    for i in order:
        t = lengths[i] + 2
        if batch and max(longest, t) * (len(batch) + 1) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, t)
    if batch:
        yield batch


def esm2_embeddings(sequences: list[str], model: str = DEFAULT_ESM2, *, layer: int = -1,
                    pair: str | None = "attention", device: str | torch.device = "cpu", batch_tokens: int = 4096,
                    progress: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """ESM-2 targets for each sequence, yielded in input order.

    ``single``: hidden state (L, hidden) of ``layer`` with BOS/EOS removed; layers are counted like fair-esm's
    ``repr_layers``: 0 = token embeddings, n_layers = the last layer (after the final LayerNorm), negative values
    from the end (default -1 = last). ``pair`` (when ``pair == "attention"``): every layer's and head's attention
    map with BOS/EOS removed, (L, L, n_layers * n_heads) ordered layer-major, symmetrised (A + A^T) / 2.
    Letters outside the ESM alphabet (and lower case is upper-cased) become ``X``.

    Sequences are sorted by length within windows of the input and batched so that padded tokens per batch stay
    within ``batch_tokens``; padding does not change the values (attention masks exclude it). ``model`` is a hub
    id or a local directory (see :func:`load_esm2`)."""
    from tqdm.auto import tqdm

    if pair not in (None, "attention"):
        raise ReedError(f"esm2_embeddings: pair must be 'attention' or None, got {pair!r}")
    sequences = list(sequences)
    for i, s in enumerate(sequences):
        if not isinstance(s, str) or not s:
            raise DataError(f"esm2_embeddings: sequence {i} is empty or not a string ({s!r})")
    if not sequences:
        return
    tokenizer, esm = load_esm2(model, device=device, attentions=pair == "attention")
    n_layers = int(esm.config.num_hidden_layers)
    li = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= li <= n_layers:
        raise ReedError(f"esm2_embeddings: layer {layer} out of range for '{model}' with {n_layers} layers")
    dev = next(esm.parameters()).device
    lengths = [len(s) for s in sequences]
    # Sort within windows so results can be yielded in input order without buffering the whole data set
    # (pair maps are large: L*L*n_layers*n_heads floats each).
    window_tokens = batch_tokens * (4 if pair else 64)
    bar = tqdm(total=len(sequences), desc="ESM-2", disable=not progress)
    start = 0
    while start < len(sequences):
        stop, tokens = start, 0
        while stop < len(sequences) and (stop == start or tokens + lengths[stop] + 2 <= window_tokens):
            tokens += lengths[stop] + 2
            stop += 1
        order = sorted(range(start, stop), key=lambda i: -lengths[i])
        done: dict[int, dict[str, np.ndarray]] = {}
        for group in _budget_batches(lengths, order, batch_tokens):
            done.update(_esm_batch(tokenizer, esm, [sequences[i] for i in group], group, li, n_layers, pair, dev))
            bar.update(len(group))
        for i in range(start, stop):
            yield done.pop(i)
        start = stop
    bar.close()


@torch.no_grad()
def _esm_batch(tokenizer, esm, seqs: list[str], idx: list[int], li: int, n_layers: int, pair: str | None,
               dev: torch.device) -> dict[int, dict[str, np.ndarray]]:
    ids = [_esm_ids(tokenizer, s) for s in seqs]
    T = max(len(t) for t in ids)
    input_ids = torch.full((len(ids), T), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(ids), T), dtype=torch.long)
    for b, t in enumerate(ids):
        input_ids[b, : len(t)] = torch.tensor(t)
        attn[b, : len(t)] = 1
    out = esm(input_ids=input_ids.to(dev), attention_mask=attn.to(dev), output_hidden_states=li != n_layers,
              output_attentions=pair == "attention")
    hidden = out.last_hidden_state if li == n_layers else out.hidden_states[li]
    maps = torch.stack(out.attentions, dim=1).flatten(1, 2) if pair == "attention" else None  # (B, C, T, T)
    if maps is not None and maps.shape[1] != n_layers * esm.config.num_attention_heads:
        raise ReedError(f"ESM-2 returned {maps.shape[1]} attention maps, expected layers*heads")
    res: dict[int, dict[str, np.ndarray]] = {}
    for b, (i, s) in enumerate(zip(idx, seqs)):
        L = len(s)
        item = {"single": hidden[b, 1 : L + 1].float().cpu().numpy()}
        if maps is not None:
            a = maps[b, :, 1 : L + 1, 1 : L + 1].float()
            item["pair"] = ((a + a.transpose(1, 2)) * 0.5).permute(1, 2, 0).contiguous().cpu().numpy()
        res[i] = item
    return res


def embed_proteins_esm2(names: Sequence[str], sequences: Sequence[str], out: str | os.PathLike, *,
                        model: str = DEFAULT_ESM2, layer: int = -1, pair: str | None = "attention",
                        device: str | torch.device = "cpu", batch_tokens: int = 4096,
                        progress: bool = True) -> ProteinTargetStore:
    """Write ESM-2 targets (:func:`esm2_embeddings`) for ``names`` into a store at ``out`` and open it. Names
    already in ``out`` are skipped, so an interrupted run resumes; the model, layer and pair setting are recorded in
    the store's meta and must match on resume."""
    names, sequences = list(names), list(sequences)
    if len(names) != len(sequences):
        raise DataError(f"embed_proteins_esm2: {len(names)} names but {len(sequences)} sequences")
    dup = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup:
        raise DataError(f"embed_proteins_esm2: duplicate names {dup[:10]}")
    writer = ProteinTargetWriter(out, meta={"source": "esm2", "model": str(model), "layer": int(layer),
                                            "pair": pair})
    todo = [i for i, n in enumerate(names) if not writer.has(n)]
    try:
        embs = esm2_embeddings([sequences[i] for i in todo], model, layer=layer, pair=pair, device=device,
                               batch_tokens=batch_tokens, progress=progress)
        for i, arrays in zip(todo, embs):
            writer.add(names[i], sequences[i], arrays)
    finally:
        writer.close()
    return ProteinTargetStore(out)


