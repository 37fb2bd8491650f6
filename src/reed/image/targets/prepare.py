"""Turn the config's target list into target providers the trainer reads per batch.

A provider returns, for global example indices, (B,T,D) for ``kind: tokens`` or (B,D) for ``kind: pooled``:

* in-memory tensors: ``fitted_encoder`` and ``caption_text`` targets are computed once over the (un-augmented)
  data and cached as target stores (:mod:`reed.store`) under ``<cache_dir>/targets/`` keyed by encoder and data
  fingerprints;
  ``file`` targets are read from an array file;
* ``store`` targets are memory-mapped rows of a store written by ``reed embed`` (:mod:`reed.store`);
* ``encoder`` targets run a frozen image encoder on every batch (the reference's way; slow).

"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from reed.config import TargetConfig
from reed.errors import DataError
from reed.image.data import ImageDataset
from reed.io import PICKLE_REFUSED, is_pickle_refusal
from reed.store import TargetStore, TargetStoreWriter, check_target_values


def _cache_path(cache_dir: Path, tg: TargetConfig, key: str, data_fp: str) -> Path:
    h = hashlib.sha256(f"{tg.source}|{tg.kind}|{key}|{data_fp}".encode()).hexdigest()[:16]
    return cache_dir / "targets" / f"{tg.name}-{h}"


def _cached(path: Path, tg: TargetConfig, key: str, ds: ImageDataset, compute) -> torch.Tensor:
    """The (N, ...) float32 targets in the target store at ``path``; when the store is not there they are computed by
    ``compute()``, stored (one float32 shard; the encoder key and data fingerprint in its manifest) and returned."""
    if (path / "manifest.json").is_file():
        # values are checked by the caller's validate_target (scanning here too would warn twice)
        return TargetStore(path, expect_count=len(ds), expect_dataset=ds.fingerprint,
                           scan=False).get(np.arange(len(ds)))
    z = validate_target(tg, compute(), len(ds), str(path))
    w = TargetStoreWriter(path, source=tg.source, count=len(z), shape=tuple(z.shape[1:]), dtype="float32",
                          shard_size=max(len(z), 1), weights_fingerprint=key, dataset_fingerprint=ds.fingerprint,
                          preprocessing={"target": tg.name, "kind": tg.kind})
    w.write(lambda idx: z[torch.as_tensor(idx)], batch_size=max(len(z), 1), progress=False)
    w.finalize()
    return z


@torch.no_grad()
def _fitted_encoder_targets(enc, tg: TargetConfig, ds: ImageDataset, batch: int = 512) -> torch.Tensor:
    """Tokens (N,T,D) or pooled (N,D) of the loaded fitted encoder ``enc`` over the whole data set."""
    outs = []
    for i in range(0, len(ds), batch):
        x = ds.pixels(torch.arange(i, min(i + batch, len(ds))))
        outs.append(enc.tokens(x) if tg.kind == "tokens" else enc.pooled(x))
    return torch.cat(outs).float()


def dataset_captions(ds: ImageDataset, captions_dir: str | None = None) -> list[str]:
    """Captions for each example: a ``reed caption`` directory, stored ones (``captions`` in the npz), or generated
    for the digits default."""
    if captions_dir:
        from reed.image.targets.vlm import read_captions

        caps = read_captions(captions_dir)
        if len(caps) != len(ds):
            raise DataError(f"captions in {captions_dir}: {len(caps)} captions for {len(ds)} examples")
        return caps
    if ds.captions is not None:
        return ds.captions
    if ds.name == "digits":
        from reed.image.targets.captions import caption_dataset

        raw = ((ds.images[:, 0] + 1.0) * 8.0).numpy()  # back to sklearn's 0..16 ink units
        return caption_dataset(raw, ds.labels.numpy())
    raise DataError(f"data set '{ds.name}' has no captions: add a 'captions' array to the .npz file")


def _caption_targets(tg: TargetConfig, ds: ImageDataset, cache_dir: Path, progress: bool) -> torch.Tensor:
    from reed.image.targets.text import SentenceEncoder, resolve_text_encoder

    if tg.kind != "pooled":
        raise DataError(f"target '{tg.name}': caption embeddings are pooled vectors; set kind: pooled")
    captions = dataset_captions(ds, tg.captions)
    enc = SentenceEncoder.from_pretrained(resolve_text_encoder(tg.encoder))
    z = enc.encode(captions, batch_size=128, progress=progress)
    out = cache_dir / "captions" / f"{ds.name}-{ds.fingerprint}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(captions) + "\n")
    return z.float()


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
        if is_pickle_refusal(e):
            raise DataError(f"target file {p} {PICKLE_REFUSED}") from None
        raise DataError(f"target file {p} is corrupt or unreadable ({e})") from None
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"target file {p} holds a {arr.dtype} array; targets must be real numbers (float32/float16)")
    return torch.from_numpy(np.asarray(arr, dtype=np.float32))


def validate_target(tg: TargetConfig, z: torch.Tensor, n: int, source: str) -> torch.Tensor:
    """Check a target tensor (N,T,D) / (N,D) against the config and data set, and its values
    (:func:`reed.store.check_target_values`); returns it as float32."""
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
    check_target_values(z, f"target '{tg.name}' from {source}")  # NaN/inf, fp32 norm overflow, zero vectors
    return z.float()


class _HostRows:
    """A target provider's two halves (:mod:`reed.loader`): ``read(indices)`` on the host (a data-loader worker)
    and ``finish(rows, device)`` on the main process; ``get`` is both."""

    def read(self, indices) -> torch.Tensor:
        return self.get(indices)

    def finish(self, rows: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        return rows.to(device, non_blocking=True)


class TensorTargets(_HostRows):
    """Targets held in memory: (N,T,D) or (N,D)."""

    def __init__(self, z: torch.Tensor):
        self.z = z

    @property
    def dim(self) -> int:
        return int(self.z.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example's target: (T, D) or (D,)."""
        return tuple(self.z.shape[1:])

    def get(self, indices) -> torch.Tensor:
        return self.z[indices]


def _weights_fingerprint(tg: TargetConfig) -> str | None:
    """Fingerprint of the encoder a store was made with, when its weights are at hand (else None: not checked)."""
    try:
        if tg.source == "fitted_encoder" and tg.path:
            from reed.image.targets.fitted_encoder import encoder_fingerprint, load_encoder

            return encoder_fingerprint(load_encoder(tg.path))
        if tg.source == "encoder":
            from reed.image.targets.encoders import load_image_encoder

            return load_image_encoder(tg.encoder, tg.path).fingerprint
    except (FileNotFoundError, ValueError, OSError):
        return None
    return None


class StoreTargets(_HostRows):
    """Targets memory-mapped from a :class:`~reed.store.TargetStore`; each batch is checked for NaN."""

    def __init__(self, tg: TargetConfig, ds):
        from reed.store import TargetStore

        self.name = tg.name
        where = tg.store or tg.path
        if not (Path(where) / "manifest.json").is_file() and tg.source != "store":
            raise DataError(f"target '{tg.name}': no target store at {where}; compute it first with "
                            f"`reed embed <config> --target {tg.name}`")
        self.store = TargetStore(where, expect_count=len(ds), expect_dim=tg.dim, expect_dataset=ds.fingerprint)
        expected = _weights_fingerprint(tg)
        stored = self.store.meta.get("weights_fingerprint")
        if expected and stored and expected != stored:
            raise DataError(f"target '{tg.name}': store {where} was computed with different encoder weights "
                            f"({stored[:40]}...) than {tg.encoder if tg.source == 'encoder' else tg.path} now has "
                            f"({expected[:40]}...); rerun `reed embed` into a new directory")
        want = 2 if tg.kind == "tokens" else 1
        if len(self.store.shape) != want:
            layout = "(N,T,D)" if want == 2 else "(N,D)"
            raise DataError(f"target '{tg.name}': store {where} holds rows of shape {self.store.shape}, but kind "
                            f"'{tg.kind}' needs {layout}")

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example's target: (T, D) or (D,)."""
        return tuple(self.store.shape)

    def read(self, indices) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows as stored (float16 / bfloat16 / int8 and scales): the host-to-device copy moves 2 or 1 bytes
        per value instead of 4; checked for NaN/inf here, on the host."""
        values, scale = self.store.get_stored(indices)
        bad = not torch.isfinite(scale).all() if scale is not None else \
            values.is_floating_point() and not torch.isfinite(values).all()
        if bad:
            raise DataError(f"target '{self.name}': store {self.store.dir} has NaN/inf rows in this batch")
        return values, scale

    def finish(self, rows, device: torch.device | str) -> torch.Tensor:
        from reed.store import dequantize

        values, scale = rows
        return dequantize(values.to(device, non_blocking=True),
                          None if scale is None else scale.to(device, non_blocking=True))

    def get(self, indices) -> torch.Tensor:
        return self.finish(self.read(indices), "cpu")


class OnlineEncoderTargets(_HostRows):
    """A frozen image encoder run on the raw images of every batch (no store): the host reads the uint8 images,
    the encoder runs on the device in the main process."""

    def __init__(self, tg: TargetConfig, ds, device: torch.device | str = "cpu"):
        from reed.image.targets.encoders import load_image_encoder

        self.tg, self.ds = tg, ds
        res = self.resolution = ds.raw_images([0]).shape[-1]
        self.cuda = torch.device(device).type == "cuda"
        name = tg.encoder_dtype if tg.encoder_dtype != "auto" else "bfloat16" if self.cuda else "float32"
        try:
            self.encoder = load_image_encoder(tg.encoder, tg.path, resolution=res, device=device,
                                              dtype=getattr(torch, name))
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"target '{tg.name}': {e}") from None
        if self.cuda:
            self.encoder.model.to(memory_format=torch.channels_last)
        if tg.encoder_compile:
            if tg.kind == "attention":  # its logits come from forward hooks added per call, which compiling would bake
                raise DataError(f"target '{tg.name}': encoder_compile does not apply to kind 'attention' (its "
                                "logits are read with per-call hooks); set encoder_compile: false")
            model = self.encoder.model
            if hasattr(model, "forward_features"):  # timm / MoCo v3: what ImageEncoder calls
                model.forward_features = torch.compile(model.forward_features)
            else:
                model.compile()
        self.device = device

    @property
    def dim(self) -> int:
        """The token width D; for ``kind: attention`` the encoder's number of heads."""
        if self.tg.kind == "attention":
            return int(self.encoder.model.config.num_attention_heads)
        return int(self.encoder.dim)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example's target: (T, D), (D,) or, for attention maps, (layers, heads, T, T)."""
        if self.tg.kind == "pooled":
            return (self.dim,)
        t = int(self.encoder.num_tokens(self.resolution))
        if self.tg.kind == "attention":
            return (len(self.tg.attention_layers), self.dim, t, t)
        return (t, self.dim)

    def read(self, indices) -> torch.Tensor:
        return self.ds.raw_images(indices)

    def get(self, indices) -> torch.Tensor:
        return self.finish(self.read(indices), self.device)

    @torch.no_grad()
    def finish(self, rows: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        images = rows.to(self.device, non_blocking=True)
        if self.cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.tg.kind == "attention":
            return self.encoder.attention_logits(images, list(self.tg.attention_layers))
        z = self.encoder(images)
        return z.mean(dim=1) if self.tg.kind == "pooled" else z


def prepare_targets(targets: list[TargetConfig], ds: ImageDataset, cache_dir: str | Path = ".cache/reed",
                    progress: bool = True, device: torch.device | str = "cpu") -> dict[str, object]:
    """{name: provider} for every target (``provider.get(indices)`` -> (B,T,D)/(B,D), ``provider.dim``).

    In-memory sources are computed once and cached; stores are validated on open.
    """
    cache = Path(cache_dir)
    out: dict[str, object] = {}
    for tg in targets:
        if tg.source == "file":
            out[tg.name] = TensorTargets(validate_target(tg, load_array(tg.path), len(ds), tg.path))
            continue
        if tg.source == "store" or tg.store:
            out[tg.name] = StoreTargets(tg, ds)
            continue
        if tg.source == "encoder":
            out[tg.name] = OnlineEncoderTargets(tg, ds, device)
            continue
        if tg.source == "vlm":
            raise DataError(f"target '{tg.name}': VLM caption embeddings are computed once with "
                            f"`reed embed <config> --target {tg.name} --out DIR`; then use source: store, path: DIR")
        if tg.source == "fitted_encoder":
            from reed.image.targets.fitted_encoder import encoder_fingerprint, load_encoder

            try:
                enc = load_encoder(tg.path)  # loaded once: its fingerprint keys the cache, it computes on a miss
                key = encoder_fingerprint(enc)
            except (FileNotFoundError, ValueError) as e:
                raise DataError(f"target '{tg.name}': cannot load the fitted encoder at {tg.path}: {e}. "
                                "Fit it first with `reed fit-encoder <config>`.") from None
        else:
            key = f"text:{tg.encoder}"
        path = _cache_path(cache, tg, key, ds.fingerprint)
        if tg.source == "fitted_encoder":
            z = _cached(path, tg, key, ds, lambda: _fitted_encoder_targets(enc, tg, ds))  # noqa: B023 - called now
        else:
            z = _cached(path, tg, key, ds, lambda: _caption_targets(tg, ds, cache, progress))  # noqa: B023
        out[tg.name] = TensorTargets(validate_target(tg, z, len(ds), str(path)))
    return out
