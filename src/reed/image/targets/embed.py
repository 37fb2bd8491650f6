"""``reed embed``: compute one target source over a data set into a target store (:mod:`reed.store`).

Every source the config can name works: the fitted encoder, a pretrained image encoder, caption embeddings from a
sentence encoder or a VLM, or an array file. Shards are split across processes (``accelerate launch``) and a rerun
resumes where an interrupted one stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from reed.config import Config, TargetConfig
from reed.errors import ConfigError, DataError
from reed.io import pick_device


def _as_tensor_idx(indices) -> torch.Tensor:
    return torch.as_tensor(np.asarray(indices), dtype=torch.long)


def row_function(tg: TargetConfig, ds, device: torch.device | str = "cpu",
                 batch_size: int = 64) -> tuple[Callable[[np.ndarray], torch.Tensor], str, dict]:
    """(indices -> rows (B,T,D)/(B,D), weights fingerprint, preprocessing record) for target ``tg`` over ``ds``."""
    if tg.kind == "attention":
        raise ConfigError(f"target '{tg.name}' is kind attention: attention maps are computed online every step "
                          "(layers x heads x T x T per image is too large to store); train with source: encoder")
    pool = tg.kind == "pooled"
    if tg.source == "fitted_encoder":
        from reed.image.targets.fitted_encoder import encoder_fingerprint, load_encoder

        try:
            enc = load_encoder(tg.path, device=device)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"target '{tg.name}': {e}") from None

        def rows(idx):
            x = ds.pixels(_as_tensor_idx(idx)).to(device)
            with torch.no_grad():
                return enc.pooled(x) if pool else enc.tokens(x)

        return rows, encoder_fingerprint(enc), {"input": "pixels in [-1,1]", "kind": tg.kind}
    if tg.source == "encoder":
        from reed.image.targets.encoders import load_image_encoder

        res = ds.raw_images(_as_tensor_idx([0])).shape[-1]
        try:
            enc = load_image_encoder(tg.encoder, tg.path, resolution=res, device=device)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"target '{tg.name}': {e}") from None

        def rows(idx):
            z = enc(ds.raw_images(_as_tensor_idx(idx)).to(device))
            return z.mean(dim=1) if pool else z

        spec = enc.spec
        return rows, enc.fingerprint, {"encoder": tg.encoder, "mean": list(spec.mean), "std": list(spec.std),
                                       "resize": spec.resize, "normalize_first": spec.normalize_first,
                                       "resolution": res, "kind": tg.kind}
    if tg.source in ("caption_text", "vlm"):
        from reed.image.targets.prepare import dataset_captions

        if not pool:
            raise DataError(f"target '{tg.name}': caption embeddings are pooled vectors; set kind: pooled")
        captions = dataset_captions(ds, tg.captions)
        if tg.source == "caption_text":
            from reed.image.targets.text import SentenceEncoder, resolve_text_encoder

            enc = SentenceEncoder.from_pretrained(resolve_text_encoder(tg.encoder), device=str(device))

            def rows(idx):
                return enc.encode([captions[i] for i in idx], batch_size=batch_size)

            return rows, enc.fingerprint, {"encoder": tg.encoder, "pooling": "masked mean, L2-normalised"}
        from reed.image.targets.vlm import embed_captions_vlm

        def rows(idx):
            imgs = ds.raw_images(_as_tensor_idx(idx)).permute(0, 2, 3, 1).numpy()
            return embed_captions_vlm(tg.encoder, imgs, [captions[i] for i in idx], layer=tg.layer,
                                      batch_size=batch_size, device=str(device), progress=False)

        return rows, f"vlm:{tg.encoder}", {"vlm": tg.encoder, "layer": tg.layer, "pooling": "masked mean"}
    if tg.source == "file":
        from reed.image.targets.prepare import load_array

        z = load_array(tg.path)
        return (lambda idx: z[_as_tensor_idx(idx)]), f"file:{tg.path}", {}
    raise ConfigError(f"target '{tg.name}': source '{tg.source}' cannot be embedded (it already is a store)")


def embed_target(cfg: Config, name: str, out: str | Path, *, dtype: str = "float16", shard_size: int = 10_000,
                 batch_size: int = 64, process_index: int = 0, num_processes: int = 1, device: str | None = None,
                 progress: bool = True, barrier: Callable[[], None] | None = None) -> dict:
    """Compute target ``name`` of ``cfg`` over its data set into the store ``out``; returns a report.

    With several processes, each computes its shards; after ``barrier()`` process 0 writes the manifest.
    """
    from reed.image.data import load_dataset
    from reed.store import TargetStoreWriter

    tgs = [t for t in cfg.targets if t.name == name]
    if not tgs:
        raise ConfigError(f"no target named '{name}' in the config (have: {[t.name for t in cfg.targets]})")
    tg = tgs[0]
    dev = pick_device(device)
    ds = load_dataset(cfg.image.data)
    rows, fp, pre = row_function(tg, ds, dev, batch_size)
    first = rows(np.array([0]))
    shape = tuple(first.shape[1:])
    writer = TargetStoreWriter(out, source=f"{tg.source}:{tg.encoder if tg.source != 'file' else tg.path}",
                               count=len(ds), shape=shape, dtype=dtype, shard_size=shard_size,
                               weights_fingerprint=fp, dataset_fingerprint=ds.fingerprint, preprocessing=pre)
    report = writer.write(rows, batch_size=batch_size, process_index=process_index, num_processes=num_processes,
                          progress=progress)
    if barrier is not None:
        barrier()
    if process_index == 0:
        writer.finalize()
    return {"store": str(out), "shape": list(shape), "count": len(ds), **report}
