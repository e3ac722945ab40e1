"""Text <-> token ids for text prompts and streamed output, and chat messages -> prompt text.

A checkpoint's `tokenizer.json` is read with the `tokenizers` package (imported only then,
so token-id serving needs no extra dependency). Random-weights models have no tokenizer of
their own; they get UTF-8 bytes as ids, which exercises the whole text path on tiny specs.

Chat messages become a prompt through the checkpoint's chat template (`chat_template` in
`tokenizer_config.json`, or a `chat_template.jinja` file beside it), rendered with jinja2
as transformers' `apply_chat_template` renders it: a sandboxed environment with
`trim_blocks` and `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now` and a
`tojson` that keeps non-ASCII text, the special tokens (`bos_token`, `eos_token`, ...) as
variables, and the rendered text tokenized without adding special tokens (the template
writes them). Random-weights models, and checkpoints without a template, get
`DEFAULT_CHAT_TEMPLATE` (ChatML: `<|im_start|>role\ncontent<|im_end|>\n` per message).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from espc.frontend.spec import ModelSpec
from espc.runtime.weights import checkpoint_dir

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# ChatML, transformers' former class-level default: what models without a template of their
# own (random weights) are prompted with.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_NO_TOKENIZER = "text prompts need a tokenizer; prompts given as token ids still work"


class TokenizerError(ValueError):
    """No usable tokenizer for the model, or a malformed tokenizer file."""


class Tokenizer(Protocol):
    eos_token_id: int | None  # generation stops here; None: only at max_tokens
    vocab_size: int  # ids produced by encode are below this

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))  # bytes have no special tokens

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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

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


class ChatTemplate:
    """A chat template compiled once; `render(messages)` is the prompt text
    `apply_chat_template(messages, tokenize=False)` gives for the same template and special
    tokens. Raises TokenizerError for a template that does not compile or fails to render
    (its `raise_exception`, an undefined variable's misuse)."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None, origin: str = "chat template"):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source, self.origin = source, origin
        self.special_tokens = dict(special_tokens or {})
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateError as error:
            raise TokenizerError(f"{origin}: the chat template does not compile: {error}") from None

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, **variables) -> str:
        """The prompt of `messages` (dicts with role and content); `variables` reach the
        template beside the special tokens (and override them, as in transformers)."""
        import jinja2

        try:
            return self._template.render(
                messages=[dict(message) for message in messages], tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **{**self.special_tokens, **variables},
            )
        except jinja2.TemplateError as error:
            raise TokenizerError(f"{self.origin}: rendering the messages failed: {error}") from None


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: jinja's own escapes HTML characters
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def load_chat_template(spec: ModelSpec, base_dir: Path | None = None) -> ChatTemplate:
    """The chat template of `spec`'s model: the checkpoint's (`chat_template.jinja`, else
    tokenizer_config.json's `chat_template`: a string, or named templates of which "default"
    is used), with the special tokens tokenizer_config.json names; DEFAULT_CHAT_TEMPLATE for
    random weights and for checkpoints without a template."""
    if spec.random_seed is not None:
        return ChatTemplate(DEFAULT_CHAT_TEMPLATE, origin="the default chat template")
    directory = checkpoint_dir(spec, base_dir)
    config_path = directory / "tokenizer_config.json"
    config = _read_json(config_path)
    special: dict[str, str] = {}
    for key, value in config.items():
        token = value.get("content") if isinstance(value, dict) else value  # a serialised AddedToken, or its text
        if key.endswith("_token") and isinstance(token, str):
            special[key] = token
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        return ChatTemplate((directory / CHAT_TEMPLATE_FILE).read_text(), special, str(directory / CHAT_TEMPLATE_FILE))
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        if "default" not in named:
            raise TokenizerError(f"{config_path}: chat_template names {sorted(map(str, named))} but no \"default\"")
        template = named["default"]
    if template is None:
        return ChatTemplate(DEFAULT_CHAT_TEMPLATE, special, "the default chat template")
    if not isinstance(template, str):
        raise TokenizerError(f"{config_path}: chat_template must be a string or a list of named templates")
    return ChatTemplate(template, special, f"{config_path} chat_template")
