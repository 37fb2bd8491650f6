"""Turn the config's target list into target tensors, computed once per data set and cached on disk.

Each target becomes a tensor aligned with the data set: (N,T,D) for ``kind: tokens`` or (N,D) for
``kind: pooled``. Frozen encoders are run once over the (un-augmented) data and the result is stored as
safetensors under ``<cache_dir>/targets/`` keyed by the encoder and data fingerprints, so training never
recomputes a target and a second run starts immediately.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from reed.config import TargetConfig
from reed.data.images import ImageDataset
from reed.errors import DataError


def _cache_path(cache_dir: Path, tg: TargetConfig, key: str, data_fp: str) -> Path:
    h = hashlib.sha256(f"{tg.source}|{tg.kind}|{key}|{data_fp}".encode()).hexdigest()[:16]
    return cache_dir / "targets" / f"{tg.name}-{h}.safetensors"


def _atomic_save(tensor: torch.Tensor, path: Path, meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"z": tensor.contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)


@torch.no_grad()
def _fitted_encoder_targets(tg: TargetConfig, ds: ImageDataset, batch: int = 512) -> tuple[torch.Tensor, str]:
    from reed.targets.fitted_encoder import encoder_fingerprint, load_encoder

    enc = load_encoder(tg.path)
    outs = []
    for i in range(0, len(ds), batch):
        x = ds.images[i : i + batch]
        outs.append(enc.tokens(x) if tg.kind == "tokens" else enc.pooled(x))
    return torch.cat(outs).float(), encoder_fingerprint(enc)


def dataset_captions(ds: ImageDataset) -> list[str]:
    """Captions for each example: stored ones (``captions`` in the npz) or generated for the digits default."""
    if ds.captions is not None:
        return ds.captions
    if ds.name == "digits":
        from reed.targets.captions import caption_dataset

        raw = ((ds.images[:, 0] + 1.0) * 8.0).numpy()  # back to sklearn's 0..16 ink units
        return caption_dataset(raw, ds.labels.numpy())
    raise DataError(f"data set '{ds.name}' has no captions: add a 'captions' array to the .npz file")


def _caption_targets(tg: TargetConfig, ds: ImageDataset, cache_dir: Path, progress: bool) -> tuple[torch.Tensor, str]:
    from reed.targets.text import SentenceEncoder, resolve_text_encoder

    if tg.kind != "pooled":
        raise DataError(f"target '{tg.name}': caption embeddings are pooled vectors; set kind: pooled")
    captions = dataset_captions(ds)
    enc = SentenceEncoder.from_pretrained(resolve_text_encoder(tg.encoder))
    z = enc.encode(captions, batch_size=128, progress=progress)
    out = cache_dir / "captions" / f"{ds.name}-{ds.fingerprint}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(captions) + "\n")
    return z.float(), enc.fingerprint


def load_array(path: str | Path) -> torch.Tensor:
    """A target array from ``.npy``, ``.npz`` (first array or ``z``) or ``.safetensors`` (key ``z`` or the only key)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"target file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            d = load_file(str(p))
            arr = d["z"] if "z" in d else next(iter(d.values()))
            return arr.float()
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as f:
                arr = f["z"] if "z" in f.files else f[f.files[0]]
        else:
            arr = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - corrupt files raise many kinds
        raise DataError(f"target file {p} is corrupt or unreadable ({e})") from None
    return torch.from_numpy(np.asarray(arr, dtype=np.float32))


def validate_target(tg: TargetConfig, z: torch.Tensor, n: int, source: str) -> torch.Tensor:
    """Check a target tensor against the config and data set; returns it as float32."""
    want = 3 if tg.kind == "tokens" else 2
    if z.dim() != want:
        layout = "(N,T,D)" if want == 3 else "(N,D)"
        raise DataError(f"target '{tg.name}' from {source} has shape {tuple(z.shape)}, but kind '{tg.kind}' needs "
                        f"{layout}")
    if z.shape[0] != n:
        raise DataError(f"target '{tg.name}' from {source} has {z.shape[0]} rows but the data set has {n} examples")
    if tg.dim is not None and z.shape[-1] != tg.dim:
        raise DataError(f"target '{tg.name}' from {source} has dimension {z.shape[-1]}, but the config says "
                        f"targets.dim={tg.dim}")
    if not torch.isfinite(z).all():
        raise DataError(f"target '{tg.name}' from {source} contains NaN or inf values")
    return z.float()


def prepare_targets(targets: list[TargetConfig], ds: ImageDataset, cache_dir: str | Path = ".cache/reed",
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """{name: (N,T,D) or (N,D) float32} for every target, computing and caching encoder outputs as needed."""
    cache = Path(cache_dir)
    out: dict[str, torch.Tensor] = {}
    for tg in targets:
        if tg.source == "file":
            out[tg.name] = validate_target(tg, load_array(tg.path), len(ds), tg.path)
            continue
        if tg.source == "fitted_encoder":
            from reed.targets.fitted_encoder import encoder_fingerprint, load_encoder

            try:
                key = encoder_fingerprint(load_encoder(tg.path))
            except (FileNotFoundError, ValueError) as e:
                raise DataError(f"target '{tg.name}': cannot load the fitted encoder at {tg.path}: {e}. "
                                "Fit it first with `reed fit-encoder <config>`.") from None
        else:
            key = f"text:{tg.encoder}"
        path = _cache_path(cache, tg, key, ds.fingerprint)
        if path.is_file():
            z = load_array(path)
        else:
            if tg.source == "fitted_encoder":
                z, _ = _fitted_encoder_targets(tg, ds)
            else:
                z, _ = _caption_targets(tg, ds, cache, progress)
            _atomic_save(z, path, {"target": tg.name, "source": tg.source, "key": key, "data": ds.fingerprint})
        out[tg.name] = validate_target(tg, z, len(ds), str(path))
    return out
