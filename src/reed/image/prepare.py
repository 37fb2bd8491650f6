"""Data preparation: an ImageFolder tree -> ADM-cropped uint8 image shards -> SD-VAE posterior moments (spec §5).

``prepare_images`` lists ``src/<class>/**/<image>`` (labels = index of the sorted class folder names), sorts the files
by (class folder, relative path), centre-crops each the ADM way (:func:`center_crop_adm`) and writes shards of
``shard_size`` files. ``prepare_latents`` encodes those shards with a diffusers ``AutoencoderKL`` (pixels x/127.5 - 1,
fp32) and stores concat[posterior mean, posterior std] (std, not logvar) per example. The format is described in
:mod:`reed.image.shards`, which also reads it.

Sharding, resuming, atomicity:

* Shard ``i`` is made from the files ``[i*S, (i+1)*S)`` of the sorted list, so which file lands in which shard never
  depends on the number of processes. Process ``p`` of ``P`` writes the shards with ``i % P == p`` (pass
  ``accelerator.process_index`` / ``num_processes`` under ``accelerate launch``).
* Every ``.npy``, text and JSON file is written atomically (:mod:`reed.io`: a unique temp name, then a rename).
  A shard is finished when its sidecar ``shard_00000.json`` (count, sha256, skipped files, and the parameters it
  was made with) exists; the sidecar is written last and removed first when a shard is redone. A rerun re-hashes
  each of its shards and keeps those that verify; a shard with a missing/changed file, a stale sidecar or a leftover
  temp file is redone.
* With ``finalize=True`` a process that finds every shard finished after its own work writes ``manifest.json``
  (so the last process to finish writes it; concurrent writers produce identical bytes). Readers need the manifest.
  :func:`finalize_images` / :func:`finalize_latents` do this step alone, e.g. after ``accelerator.wait_for_everyone()``.

Unreadable images (truncated, not an image, empty) are skipped, printed by name with the error, and listed under
``skipped`` in the sidecar, the manifest and the returned report. A skipped file makes its shard one row shorter; the
rows of ``images_i.npy``, ``labels_i.npy`` and ``sources_i.txt`` stay aligned (row k of each is the same example), and
global example indices are the running count over shards (``ImageShards.offsets``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from reed.errors import ConfigError, DataError
from reed.image.shards import (
    IMAGES_KIND,
    LATENTS_KIND,
    MANIFEST,
    VERSION,
    ImageShards,
    MissingDataError,
    fingerprint_of,
    sha256_files,
)
from reed.io import (
    atomic_path,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    commit,
    stale_temps,
    temp_file,
)

__all__ = [
    "center_crop_adm",
    "finalize_images",
    "finalize_latents",
    "list_image_folder",
    "load_vae",
    "prepare_images",
    "prepare_latents",
]


# ----------------------------------------------------------------------------------------------- small helpers


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def _name(prefix: str, i: int, ext: str) -> str:
    return f"{prefix}_{i:05d}.{ext}"


def _temp_files(out: Path, i: int) -> list[Path]:
    """Leftover temp files of shard ``i`` (an interrupted write; also those named the way older versions did)."""
    return stale_temps(out, f"*_{i:05d}.*")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _check_process(process_index: int, num_processes: int) -> None:
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ConfigError(f"process_index {process_index} must be in [0, num_processes={num_processes})")


def _open_memmap(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


# ----------------------------------------------------------------------------------------------- images


def center_crop_adm(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM centre crop (guided-diffusion ``center_crop_arr``, EDM2 ``center-crop-dhariwal``; spec §5) -> (R,R,3) uint8.

    The image is converted to RGB; while its short side is >= 2R it is halved with a BOX filter (sizes floor-divided by
    2); then it is resized with BICUBIC so the short side is R (long side ``round(side * R / short)``); then the
    central R x R window is cut, offset ``(size - R) // 2`` on each axis.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    y, x = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[y : y + resolution, x : x + resolution])


def _image_extensions() -> frozenset[str]:
    """Lower-case extensions (with dot) that some installed PIL plugin opens."""
    return frozenset(e.lower() for e in Image.registered_extensions())


def list_image_folder(src: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """List an ImageFolder / ImageNet-train tree ``src/<class>/**/<image>``.

    Returns ``([(relpath, label)], classes)``: ``classes`` are the sorted names of the (non-hidden) sub-folders of
    ``src`` and a label is the index of its top-level folder there; ``relpath`` is POSIX, relative to ``src``; the list
    is sorted by (class, relpath). Files with an extension PIL knows are listed (case-insensitive) without being opened,
    so a corrupt file is listed and reported later; other files, hidden files and folders, files directly in ``src``
    and symlinked sub-folders below a class folder are ignored.
    Raises :class:`MissingDataError` / :class:`DataError` naming ``src`` if it is missing, has no class folders or no
    images.
    """
    root = Path(src)
    if not root.exists():
        raise MissingDataError(f"image folder {src} does not exist")
    if not root.is_dir():
        raise DataError(f"image folder {src} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {src} has no class sub-folders (expected {src}/<class>/<image>)")
    exts = _image_extensions()
    items: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for f in filenames:
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts:
                    items.append((f"{rel_dir}/{f}", label))
    if not items:
        raise DataError(f"image folder {src} has no image files in its {len(classes)} class folders")
    items.sort(key=lambda t: (classes[t[1]], t[0]))
    return items, classes


def _load_one(path: Path, resolution: int) -> np.ndarray:
    with Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not later
        return center_crop_adm(im, resolution)


def _decode(src: Path, rels: Sequence[str], resolution: int, num_workers: int) -> Iterator[np.ndarray | str]:
    """Yield (R,R,3) uint8 or an error string per file, in order."""

    def job(rel: str) -> np.ndarray | str:
        if "\n" in rel or "\r" in rel:
            return "ValueError: line break in the file name"
        try:
            return _load_one(src / rel, resolution)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file and say so"
            return f"{type(e).__name__}: {e}"

    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as pool:  # PIL releases the GIL while decoding and resizing
            yield from pool.map(job, rels)
    else:
        yield from map(job, rels)


def _listing_sha(entries: Sequence[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for rel, label in entries:
        h.update(f"{label}\t{rel}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _image_files(i: int) -> dict[str, str]:
    return {"images": _name("images", i, "npy"), "labels": _name("labels", i, "npy"),
            "sources": _name("sources", i, "txt")}


def _image_params(i: int, entries: Sequence[tuple[str, int]], start: int, resolution: int) -> dict[str, Any]:
    """What a finished image shard's sidecar must say to be reused."""
    return {"kind": IMAGES_KIND, "index": i, "start": start, "stop": start + len(entries), "resolution": resolution,
            "listing_sha256": _listing_sha(entries), **_image_files(i)}


def _sidecar_ok(out: Path, i: int, params: dict[str, Any], files: Sequence[str], rehash: bool) -> dict[str, Any] | None:
    """The sidecar of shard ``i`` if it matches ``params``, its files exist (and re-hash equal), and no temp is left."""
    side = _read_json(out / _name("shard", i, "json"))
    if side is None or any(side.get(k) != v for k, v in params.items()) or _temp_files(out, i):
        return None
    paths = [out / f for f in files]
    if not all(p.is_file() for p in paths):
        return None
    if rehash and sha256_files(paths) != side.get("sha256"):
        return None
    return side


def _write_image_shard(
    src: Path, out: Path, params: dict[str, Any], entries: Sequence[tuple[str, int]], resolution: int,
    num_workers: int, bar: tqdm,
) -> dict[str, Any]:
    i = params["index"]
    files = _image_files(i)
    (out / _name("shard", i, "json")).unlink(missing_ok=True)
    for t in _temp_files(out, i):
        t.unlink(missing_ok=True)
    img_path = out / files["images"]
    labels: list[int] = []
    sources: list[str] = []
    skipped: list[dict[str, str]] = []
    with temp_file(img_path) as tmp:
        rows = _open_memmap(tmp, np.uint8, (len(entries), resolution, resolution, 3))
        for (rel, label), res in zip(entries, _decode(src, [r for r, _ in entries], resolution, num_workers)):
            if isinstance(res, str):
                skipped.append({"file": rel, "error": res})
                _say(f"skipped {src / rel}: {res}")
            else:
                rows[len(labels)] = res
                labels.append(label)
                sources.append(rel)
            bar.update(1)
        n = len(labels)
        rows.flush()
        if n < len(entries):  # skipped files: copy the n written rows into a file of the right length
            with atomic_path(img_path) as short_tmp:
                if n:
                    short = _open_memmap(short_tmp, np.uint8, (n, resolution, resolution, 3))
                    for a in range(0, n, 256):
                        short[a : min(a + 256, n)] = rows[a : min(a + 256, n)]
                    short.flush()
                    del short
                else:
                    with open(short_tmp, "wb") as f:
                        np.save(f, np.zeros((0, resolution, resolution, 3), np.uint8))
            del rows
        else:
            del rows
            commit(tmp, img_path)
    atomic_save_npy(out / files["labels"], np.asarray(labels, dtype=np.int64))
    atomic_write_bytes(out / files["sources"], "".join(s + "\n" for s in sources).encode("utf-8", "surrogateescape"))
    sha = sha256_files([out / files[k] for k in ("images", "labels", "sources")])
    side = {**params, "count": n, "sha256": sha, "skipped": skipped}
    atomic_write_json(out / _name("shard", i, "json"), side, indent=1)
    return side


def _plan(items: Sequence[tuple[str, int]], shard_size: int) -> list[tuple[int, Sequence[tuple[str, int]]]]:
    """[(start, entries)] per shard: shard i is items[i*S : (i+1)*S]."""
    return [(i * shard_size, items[i * shard_size : (i + 1) * shard_size])
            for i in range(math.ceil(len(items) / shard_size))]


def _finish_images(
    src: Path, out: Path, items: Sequence[tuple[str, int]], classes: list[str], resolution: int, shard_size: int,
) -> tuple[dict[str, Any] | None, list[int]]:
    """Write the manifest if every shard is finished; else remove a stale manifest. -> (manifest | None, pending)."""
    sides, pending = [], []
    for i, (start, entries) in enumerate(_plan(items, shard_size)):
        params = _image_params(i, entries, start, resolution)
        side = _sidecar_ok(out, i, params, list(_image_files(i).values()), rehash=False)
        if side is None:
            pending.append(i)
        sides.append(side)
    if pending:
        (out / MANIFEST).unlink(missing_ok=True)
        return None, pending
    manifest = {
        "kind": IMAGES_KIND, "version": VERSION, "resolution": resolution,
        "count": sum(s["count"] for s in sides), "classes": classes, "num_classes": len(classes),
        "shard_size": shard_size, "fingerprint": fingerprint_of([s["sha256"] for s in sides]),
        "shards": [{"index": s["index"], "count": s["count"], "images": s["images"], "labels": s["labels"],
                    "sources": s["sources"], "sha256": s["sha256"]} for s in sides],
        "skipped": [k for s in sides for k in s["skipped"]],
        "source": str(src.resolve()),
    }
    atomic_write_json(out / MANIFEST, manifest, indent=1)
    return manifest, []


def finalize_images(src: str | Path, out: str | Path, *, resolution: int = 256, shard_size: int = 10000) -> dict:
    """Write ``<out>/manifest.json`` from the finished shards' sidecars and return it (the parameters must be those
    the shards were prepared with). DataError naming the unfinished shards otherwise."""
    items, classes = list_image_folder(src)
    manifest, pending = _finish_images(Path(src), Path(out), items, classes, resolution, shard_size)
    if manifest is None:
        raise DataError(f"{out}: shards {pending} are not finished; run prepare_images for them first")
    return manifest


def prepare_images(
    src: str | Path,
    out: str | Path,
    *,
    resolution: int = 256,
    shard_size: int = 10000,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    finalize: bool = True,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Convert an ImageFolder tree into ADM-cropped uint8 shards (see the module docstring for the format and rules).

    Process ``process_index`` of ``num_processes`` writes shards ``i % num_processes == process_index``;
    ``num_workers`` > 0 decodes with that many threads. Returns a report: ``count`` (examples in this process's
    shards), ``shards`` (its shard indices), ``written`` / ``reused`` (indices), ``skipped`` ([{"file", "error"}] in its
    shards), ``seconds``, ``manifest`` (path, or None while other shards are pending) and ``pending``.
    """
    t0 = time.perf_counter()
    _check_process(process_index, num_processes)
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    if resolution < 1:
        raise ConfigError(f"resolution must be >= 1, got {resolution}")
    src_p, out_p = Path(src), Path(out)
    items, classes = list_image_folder(src_p)
    out_p.mkdir(parents=True, exist_ok=True)
    plan = _plan(items, shard_size)
    mine = [i for i in range(len(plan)) if i % num_processes == process_index]

    todo, sides = [], {}
    for i in mine:
        start, entries = plan[i]
        params = _image_params(i, entries, start, resolution)
        side = _sidecar_ok(out_p, i, params, list(_image_files(i).values()), rehash=True)
        if side is None:
            todo.append((i, params))
        else:
            sides[i] = side
    reused = sorted(sides)
    if todo:
        (out_p / MANIFEST).unlink(missing_ok=True)  # the shards are about to change
    total = sum(len(plan[i][1]) for i, _ in todo)
    with tqdm(total=total, unit="img", desc=f"images [{process_index}/{num_processes}]", disable=not progress) as bar:
        for i, params in todo:
            sides[i] = _write_image_shard(src_p, out_p, params, plan[i][1], resolution, num_workers, bar)

    manifest, pending = (None, [])
    if finalize:
        manifest, pending = _finish_images(src_p, out_p, items, classes, resolution, shard_size)
    skipped = [k for i in mine for k in sides[i]["skipped"]]
    report = {
        "count": sum(sides[i]["count"] for i in mine), "shards": mine, "written": [i for i, _ in todo],
        "reused": reused, "skipped": skipped, "seconds": time.perf_counter() - t0,
        "manifest": str(out_p / MANIFEST) if manifest else None, "pending": pending,
    }
    _print_report("images", out_p, report)
    return report


def _print_report(what: str, out: Path, r: dict[str, Any]) -> None:
    msg = (f"{what} -> {out}: {r['count']} examples in {len(r['shards'])} shards "
           f"({len(r['written'])} written, {len(r['reused'])} reused) in {r['seconds']:.1f}s")
    if r.get("skipped"):
        names = ", ".join(f"{s['file']} ({s['error']})" for s in r["skipped"])
        msg += f"; {len(r['skipped'])} skipped: {names}"
    if r["manifest"]:
        msg += f"; manifest {r['manifest']}"
    elif r["pending"]:
        msg += f"; manifest waits for shards {r['pending']}"
    _say(msg)


# ----------------------------------------------------------------------------------------------- latents

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _state_fingerprint(module: torch.nn.Module) -> str:
    """Hex sha256 over a module's state dict: names, dtypes, shapes and raw bytes, in sorted name order."""
    h = hashlib.sha256()
    for k, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_vae(vae: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, str, str]:
    """Load a diffusers ``AutoencoderKL`` (fp32, eval, frozen) -> (model on ``device``, name, weights fingerprint).

    ``vae`` is a local diffusers directory (``config.json`` + weights; a pipeline directory with a ``vae/`` sub-folder
    also works) or a hub id already in the Hugging Face cache. :class:`MissingDataError` (a FileNotFoundError) naming
    it when neither exists. ``name`` is the resolved directory or the hub id; the fingerprint is a sha256 over the
    loaded weights (:func:`_state_fingerprint`).
    """
    from diffusers import AutoencoderKL

    s = str(vae)
    path = Path(s).expanduser()
    subfolder = None
    if path.exists():
        if not path.is_dir():
            raise DataError(f"VAE {s} is a file; expected a diffusers AutoencoderKL directory with config.json")
        if not (path / "config.json").is_file():
            if (path / "vae" / "config.json").is_file():
                subfolder = "vae"
            else:
                raise MissingDataError(f"VAE directory {s} has no config.json (save it with save_pretrained)")
        name = str(path.resolve())
        try:
            model = AutoencoderKL.from_pretrained(name, subfolder=subfolder)
        except Exception as e:  # noqa: BLE001 - report the directory, not diffusers' internals
            raise DataError(f"VAE directory {s} cannot be loaded as an AutoencoderKL: {e}") from None
    else:
        if not _HUB_ID.match(s):
            raise MissingDataError(f"VAE {s} not found: no such directory")
        name = s
        try:
            model = AutoencoderKL.from_pretrained(s)
        except (OSError, ValueError) as e:  # diffusers: EnvironmentError when absent from the cache / offline
            raise MissingDataError(
                f"VAE {s!r} not found: no local directory of that name, and not loadable as a hub id from the "
                f"Hugging Face cache ({type(e).__name__}: {e})"
            ) from None
    fp = _state_fingerprint(model)
    model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    return model, name, fp


def _latent_params(i: int, image_sha: str, count: int, vae_fp: str, dtype: str, c: int, h: int) -> dict[str, Any]:
    return {"kind": LATENTS_KIND, "index": i, "images_sha256": image_sha, "count": count, "vae_fingerprint": vae_fp,
            "dtype": dtype, "latent_channels": c, "latent_size": h, "moments": _name("moments", i, "npy")}


@torch.inference_mode()
def _encode(vae: torch.nn.Module, pixels: np.ndarray, device: str | torch.device) -> np.ndarray:
    """uint8 (B,R,R,3) -> float32 (B,2C,h,w) = concat[latent_dist.mean, latent_dist.std] of x/127.5 - 1."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    dist = vae.encode(x).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float().cpu().numpy()


def _write_latent_shard(
    vae: torch.nn.Module, images: ImageShards, out: Path, params: dict[str, Any], batch_size: int,
    device: str | torch.device, bar: tqdm,
) -> dict[str, Any]:
    i, n, c, h = params["index"], params["count"], params["latent_channels"], params["latent_size"]
    (out / _name("shard", i, "json")).unlink(missing_ok=True)
    for t in _temp_files(out, i):
        t.unlink(missing_ok=True)
    path = out / params["moments"]
    with atomic_path(path) as tmp:
        if n == 0:
            with open(tmp, "wb") as f:
                np.save(f, np.zeros((0, 2 * c, h, h), params["dtype"]))
        else:
            rows = _open_memmap(tmp, params["dtype"], (n, 2 * c, h, h))
            base = int(images.offsets[i])
            for a in range(0, n, batch_size):
                b = min(a + batch_size, n)
                m = _encode(vae, images.images(np.arange(base + a, base + b)), device)
                if m.shape[1:] != (2 * c, h, h):
                    raise DataError(f"the VAE produced moments of shape {m.shape[1:]}, expected {(2 * c, h, h)}")
                rows[a:b] = m
                bar.update(b - a)
            rows.flush()
            del rows
    side = {**params, "sha256": sha256_files([path])}
    atomic_write_json(out / _name("shard", i, "json"), side, indent=1)
    return side


def _finish_latents(out: Path, images: ImageShards, header: dict[str, Any], all_params: list[dict[str, Any]]
                    ) -> tuple[dict[str, Any] | None, list[int]]:
    sides, pending = [], []
    for params in all_params:
        side = _sidecar_ok(out, params["index"], params, [params["moments"]], rehash=False)
        if side is None:
            pending.append(params["index"])
        sides.append(side)
    if pending:
        (out / MANIFEST).unlink(missing_ok=True)
        return None, pending
    manifest = {
        **header, "count": len(images), "fingerprint": fingerprint_of([s["sha256"] for s in sides]),
        "shards": [{"index": s["index"], "count": s["count"], "moments": s["moments"], "sha256": s["sha256"]}
                   for s in sides],
    }
    atomic_write_json(out / MANIFEST, manifest, indent=1)
    return manifest, []


def _latent_setup(images_dir: str | Path, out: str | Path, vae: str | Path, device: str | torch.device, dtype: str,
                  scale: float | None, shift: float | None):
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"dtype must be 'float16' or 'float32' (storage), got {dtype!r}")
    images = ImageShards(images_dir)
    out_p = Path(out)
    if out_p.resolve() == images.directory.resolve():
        raise ConfigError(f"latents must go to their own directory, not the images directory {images_dir}")
    model, name, vae_fp = load_vae(vae, device)
    cfg = model.config
    c = int(cfg.latent_channels)
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if images.resolution % factor:
        raise DataError(f"{images_dir}: resolution {images.resolution} is not divisible by the VAE's "
                        f"downsampling factor {factor}")
    h = images.resolution // factor
    if scale is None:
        scale = float(getattr(cfg, "scaling_factor", None) or 0.18215)
    if shift is None:
        shift = float(getattr(cfg, "shift_factor", None) or 0.0)
    header = {
        "kind": LATENTS_KIND, "version": VERSION, "images": str(images.directory.resolve()),
        "images_fingerprint": images.fingerprint, "vae": name, "vae_fingerprint": vae_fp, "scale": scale,
        "shift": shift, "latent_channels": c, "latent_size": h, "resolution": images.resolution, "dtype": dtype,
    }
    all_params = [_latent_params(i, e["sha256"], e["count"], vae_fp, dtype, c, h)
                  for i, e in enumerate(images.meta["shards"])]
    return images, out_p, model, header, all_params


def finalize_latents(images_dir: str | Path, out: str | Path, *, vae: str | Path, dtype: str = "float32",
                     scale: float | None = None, shift: float | None = None) -> dict:
    """Write ``<out>/manifest.json`` from finished latent shards and return it; DataError naming unfinished shards."""
    images, out_p, _, header, all_params = _latent_setup(images_dir, out, vae, "cpu", dtype, scale, shift)
    manifest, pending = _finish_latents(out_p, images, header, all_params)
    if manifest is None:
        raise DataError(f"{out}: latent shards {pending} are not finished; run prepare_latents for them first")
    return manifest


def prepare_latents(
    images_dir: str | Path,
    out: str | Path,
    *,
    vae: str | Path,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    finalize: bool = True,
    scale: float | None = None,
    shift: float | None = None,
) -> dict[str, Any]:
    """Encode prepared image shards with a diffusers ``AutoencoderKL`` into posterior moments (spec §5).

    Per example: x = uint8/127.5 - 1 (B,3,R,R), fp32 through ``vae.encode(x).latent_dist``; stored
    concat[mean, std] (2C, h, h) in ``dtype`` ("float32" or "float16", storage only). Latent shard i mirrors image
    shard i. ``scale`` / ``shift`` recorded for :func:`~reed.image.shards.sample_posterior` default to the VAE config's
    ``scaling_factor`` (0.18215 for the SD VAE) and ``shift_factor`` (absent: 0). Sharding, resuming and the manifest
    work as for :func:`prepare_images`; a shard is redone when its image shard, the VAE weights or ``dtype`` changed.
    Returns a report like :func:`prepare_images` (``skipped`` is always empty).
    """
    t0 = time.perf_counter()
    _check_process(process_index, num_processes)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    images, out_p, model, header, all_params = _latent_setup(images_dir, out, vae, device, dtype, scale, shift)
    out_p.mkdir(parents=True, exist_ok=True)
    mine = [p["index"] for p in all_params if p["index"] % num_processes == process_index]
    todo, reused = [], []
    for i in mine:
        if _sidecar_ok(out_p, i, all_params[i], [all_params[i]["moments"]], rehash=True) is None:
            todo.append(i)
        else:
            reused.append(i)
    if todo:
        (out_p / MANIFEST).unlink(missing_ok=True)
    total = sum(all_params[i]["count"] for i in todo)
    with tqdm(total=total, unit="img", desc=f"latents [{process_index}/{num_processes}]", disable=not progress) as bar:
        for i in todo:
            _write_latent_shard(model, images, out_p, all_params[i], batch_size, device, bar)
    manifest, pending = (None, [])
    if finalize:
        manifest, pending = _finish_latents(out_p, images, header, all_params)
    report = {
        "count": sum(all_params[i]["count"] for i in mine), "shards": mine, "written": todo, "reused": reused,
        "skipped": [], "seconds": time.perf_counter() - t0,
        "manifest": str(out_p / MANIFEST) if manifest else None, "pending": pending,
    }
    _print_report("latents", out_p, report)
    return report
