"""Text <-> token ids for text prompts and streamed output.

A checkpoint's `tokenizer.json` is read with the `tokenizers` package (imported only then,
so token-id serving needs no extra dependency). Random-weights models have no tokenizer of
their own; they get UTF-8 bytes as ids, which exercises the whole text path on tiny specs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from espc.frontend.spec import ModelSpec
from espc.runtime.weights import checkpoint_dir

TOKENIZER_FILE = "tokenizer.json"
_NO_TOKENIZER = "text prompts need a tokenizer; prompts given as token ids still work"


class TokenizerError(ValueError):
    """No usable tokenizer for the model, or a malformed tokenizer file."""


class Tokenizer(Protocol):
    eos_token_id: int | None  # generation stops here; None: only at max_tokens
    vocab_size: int  # ids produced by encode are below this

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, for models without a tokenizer (random weights)."""

    eos_token_id: int | None = None
    vocab_size = 256

    def __init__(self, model_vocab: int):
        if model_vocab < self.vocab_size:
            raise TokenizerError(
                f"the byte tokenizer needs vocab >= {self.vocab_size}, the model has vocab = {model_vocab}: {_NO_TOKENIZER}"
            )

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Invalid UTF-8, and ids above 255 that a larger model can sample, become U+FFFD."""
        # 0xFF never occurs in UTF-8, so it stands in for an out-of-range id.
        return bytes(i if 0 <= i < 256 else 0xFF for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A checkpoint's `tokenizer.json` through the `tokenizers` package.

    `encode` adds the special tokens of the tokenizer's post-processor (Llama's BOS), as
    transformers' tokenizers do by default; `decode` drops special tokens from the output.
    """

    def __init__(self, directory: Path):
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise TokenizerError(
                f"{directory / TOKENIZER_FILE} needs the tokenizers package: pip install tokenizers"
            ) from None
        try:
            self._tokenizer = _Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as error:  # tokenizers raises its own Exception subclass
            raise TokenizerError(f"{directory / TOKENIZER_FILE}: {error}") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = self._eos_token_id(directory)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def _eos_token_id(self, directory: Path) -> int | None:
        """tokenizer_config.json's eos_token, else generation_config.json's then config.json's
        eos_token_id (the first when it is a list, as in Llama 3), else None."""
        token = _read_json(directory / "tokenizer_config.json").get("eos_token")
        if isinstance(token, dict):  # a serialised AddedToken
            token = token.get("content")
        if isinstance(token, str) and (token_id := self._tokenizer.token_to_id(token)) is not None:
            return token_id
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(directory / name).get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            if isinstance(eos, int):
                return eos
        return None


def _read_json(path: Path) -> dict[str, Any]:
    """The object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise TokenizerError(f"{path}: {error}") from None


def load_tokenizer(spec: ModelSpec, base_dir: Path | None = None) -> Tokenizer:
    """The tokenizer of `spec`'s model: the checkpoint's tokenizer.json, or UTF-8 bytes for
    random weights. A checkpoint without tokenizer.json is an error rather than bytes: a
    trained model fed byte ids would produce fluent-looking garbage."""
    if spec.random_seed is not None:
        return ByteTokenizer(spec.vocab)
    directory = checkpoint_dir(spec, base_dir)
    if not (directory / TOKENIZER_FILE).is_file():
        raise TokenizerError(f"checkpoint {directory} has no {TOKENIZER_FILE}: {_NO_TOKENIZER}")
    tokenizer = HFTokenizer(directory)
    if tokenizer.vocab_size > spec.vocab:
        raise TokenizerError(
            f"{directory / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens, more than the model's vocab = {spec.vocab}"
        )
    return tokenizer
