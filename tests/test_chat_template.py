"""Chat templates: espc renders messages as transformers' `apply_chat_template` does, for a
real tokenizer directory written here (tokenizer.json + tokenizer_config.json), and falls
back to the documented ChatML default for random weights."""

import json
from pathlib import Path

import pytest

from espc.frontend.spec import ModelSpec
from espc.runtime.tokenizer import DEFAULT_CHAT_TEMPLATE, TokenizerError, load_chat_template, load_tokenizer
from tests.test_tokenizer import write_tokenizer

# Llama-3's template shape: BOS written by the template, a system message taken out first,
# loop controls, namespace, tojson, raise_exception on a bad role order.
LLAMA_LIKE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] %}{% endif %}"
    "{% if ns.system %}<|system|>\n{{ ns.system | trim }}\n{% endif %}"
    "{% for message in messages %}"
    "  {% if message['role'] == 'system' %}{% continue %}{% endif %}"
    "  {% if (message['role'] == 'user') != (loop.index0 % 2 == (1 if ns.system else 0)) %}"
    "    {{ raise_exception('roles must alternate user/assistant/user/...') }}"
    "  {% endif %}"
    "  <|{{ message['role'] }}|>\n{{ message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "  {% if message.name is defined %}{{ {'name': message.name, 'note': 'é'} | tojson }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "hello world"}],
    [
        {"role": "system", "content": "  be brief  "},
        {"role": "user", "content": "Grüße, 世界!"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "naïve café 🙂", "name": "zoë"},
    ],
]


def checkpoint(directory: Path, template, *, file: str | None = None) -> ModelSpec:
    write_tokenizer(directory)
    eos = {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {"bos_token": "<s>", "eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast"}
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if file is not None:
        (directory / "chat_template.jinja").write_text(file)
    return ModelSpec(layers=1, hidden=16, heads=2, ffn=32, vocab=300, dtype="float32", max_context=64, weights=str(directory))


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_rendering_equals_transformers_apply_chat_template(tmp_path, conversation, generation_prompt):
    transformers = pytest.importorskip("transformers")
    spec = checkpoint(tmp_path, LLAMA_LIKE)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = CONVERSATIONS[conversation]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    rendered = load_chat_template(spec).render(messages, add_generation_prompt=generation_prompt)
    assert rendered == expected
    assert rendered.startswith("<s>") and ("<|assistant|>\n" in rendered) == (generation_prompt or conversation == 1)
    # Token ids as apply_chat_template(tokenize=True) gives them: no second BOS.
    expected_ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False)
    assert load_tokenizer(spec).encode(rendered, add_special_tokens=False) == list(expected_ids)


def test_named_templates_and_the_template_file(tmp_path):
    transformers = pytest.importorskip("transformers")
    named = [{"name": "default", "template": LLAMA_LIKE}, {"name": "tool_use", "template": "{{ raise_exception('tools') }}"}]
    (tmp_path / "named").mkdir()
    spec = checkpoint(tmp_path / "named", named)
    messages = CONVERSATIONS[1]
    expected = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "named")).apply_chat_template(messages, tokenize=False)
    assert load_chat_template(spec).render(messages, add_generation_prompt=False) == expected

    (tmp_path / "file").mkdir()
    spec = checkpoint(tmp_path / "file", "{{ raise_exception('the config template is not used') }}", file="{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    expected = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "file")).apply_chat_template(messages, tokenize=False)
    assert load_chat_template(spec).render(messages, add_generation_prompt=False) == expected


def test_errors_name_the_template(tmp_path):
    spec = checkpoint(tmp_path, LLAMA_LIKE)
    with pytest.raises(TokenizerError, match="chat_template: rendering the messages failed: roles must alternate"):
        load_chat_template(spec).render([{"role": "assistant", "content": "first"}])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(TokenizerError, match="tokenizer_config.json chat_template: the chat template does not compile"):
        load_chat_template(spec)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}]}))
    with pytest.raises(TokenizerError, match=r"names \['tool_use'\] but no \"default\""):
        load_chat_template(spec)


def test_random_weights_and_checkpoints_without_a_template_get_chatml(tmp_path):
    random = ModelSpec(layers=1, hidden=16, heads=2, ffn=32, vocab=300, dtype="float32", max_context=64, weights="random:0")
    for spec in (random, checkpoint(tmp_path, None)):
        template = load_chat_template(spec)
        assert template.source == DEFAULT_CHAT_TEMPLATE
        rendered = template.render([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
        assert rendered == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
