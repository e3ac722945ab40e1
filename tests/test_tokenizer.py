"""Tokenizers: UTF-8 bytes for random-weights models, a checkpoint's tokenizer.json otherwise."""

import json
import sys
from pathlib import Path

import pytest

from espc.frontend.spec import ModelSpec
from espc.runtime.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer

TEXT = "Grüße, 世界! naïve café 🙂"


def spec(vocab: int, weights: str = "random:0") -> ModelSpec:
    return ModelSpec(
        layers=1, hidden=16, heads=2, ffn=32, vocab=vocab, dtype="float32", max_context=64, weights=weights
    )


def test_byte_round_trip():
    tokenizer = load_tokenizer(spec(300))
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.eos_token_id is None
    ids = tokenizer.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and max(ids) < tokenizer.vocab_size
    assert tokenizer.decode(ids) == TEXT


def test_byte_decode_replaces_invalid():
    tokenizer = ByteTokenizer(300)
    assert tokenizer.decode([0xE4, 104, 299, 105]) == "\ufffdh\ufffdi"  # a cut sequence, an id > 255


def test_byte_tokenizer_needs_vocab_256():
    with pytest.raises(TokenizerError, match="vocab >= 256, the model has vocab = 100: text prompts need a tokenizer"):
        load_tokenizer(spec(100))


def write_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer trained on a few strings, with Llama's BOS post-processor."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["hello world", "hello there", TEXT] * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.save(str(directory / "tokenizer.json"))


def test_hf_round_trip_and_eos(tmp_path):
    write_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    tokenizer = load_tokenizer(spec(300, str(tmp_path)))
    assert isinstance(tokenizer, HFTokenizer)
    ids = tokenizer.encode(TEXT)
    assert ids[0] == 0 and len(ids) < len(TEXT.encode("utf-8"))  # BOS, then merged tokens
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.eos_token_id == 1


def test_hf_eos_from_generation_config(tmp_path):
    write_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 0]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert HFTokenizer(tmp_path).eos_token_id == 1


def test_hf_vocab_larger_than_model(tmp_path):
    write_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json has 2\d\d tokens, more than the model's vocab = 256"):
        load_tokenizer(spec(256, str(tmp_path)))


def test_checkpoint_without_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer.json: text prompts need a tokenizer"):
        load_tokenizer(spec(300, "ckpt"), base_dir=tmp_path)


def test_hf_without_tokenizers_package(tmp_path, monkeypatch):
    write_tokenizer(tmp_path)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes the import fail
    with pytest.raises(TokenizerError, match="needs the tokenizers package: pip install tokenizers"):
        load_tokenizer(spec(300, str(tmp_path)))
