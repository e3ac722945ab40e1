"""The official `openai` client drives `espc serve` as users do: chat completions (streamed
and not) rendered with the chat template, logprobs checked against log_softmax of the
engine's own fp32 logits (`return_logits`), and n > 1 / prompt lists, each choice equal to
`Engine.generate` with the request's seed + its index. The prefix cache as clients see
it: a repeated prompt reports its block-aligned prefix in
`usage.prompt_tokens_details.cached_tokens` (streamed or not, prompt lists and n counted as
prompt_tokens are), with the same greedy text, the hit tokens in /metrics, and nothing
cached with `[runtime] prefix_caching = false`. One engine (4 CPU workers) behind uvicorn,
on loopback (and one without prefix caching)."""

import random

import pytest
import torch

from espc.runtime.engine import Engine
from espc.runtime.sampling import SamplingParams
from espc.runtime.server import ServerThread, create_app
from espc.runtime.tokenizer import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from tests.kv_checks import assert_only_cache_holds_kv
from tests.test_serve import GROUPS, MODEL, scrape, tiny_spec, wait_idle
from tests.tolerances import TOLERANCES

openai = pytest.importorskip("openai")

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


@pytest.fixture(scope="module")
def served():
    with Engine(tiny_spec(128), kv_capacity=1024, **GROUPS) as engine:
        with ServerThread(create_app(engine)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            yield engine, client


def chat_prompt(messages) -> list[int]:
    """The prompt espc must build: ChatML (random weights) as bytes, no special tokens added."""
    return list(ChatTemplate(DEFAULT_CHAT_TEMPLATE).render(messages).encode("utf-8"))


def expected_logprobs(engine: Engine, prompt: list[int], max_tokens: int, k: int):
    """Greedy tokens, and (chosen logprob, top-k ids, top-k logprobs) per token, from the
    engine's fp32 logits rows in float64."""
    [completion] = engine.generate(prompt, SamplingParams(max_new_tokens=max_tokens, return_logits=True), timeout=60)
    rows = torch.log_softmax(torch.stack(completion.logits).double(), dim=-1)
    top = rows.topk(k, dim=-1)
    chosen = rows[torch.arange(len(rows)), torch.tensor(completion.token_ids)]
    return completion.token_ids, chosen, top.indices, top.values


def test_chat_completion_and_its_stream(served):
    engine, client = served
    prompt = chat_prompt(CONVERSATION)
    [expected] = engine.generate(prompt, SamplingParams(max_new_tokens=10, temperature=0.8, seed=5), timeout=60)

    answer = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_completion_tokens=10, temperature=0.8, seed=5)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-") and answer.model == MODEL
    [choice] = answer.choices
    assert (choice.index, choice.finish_reason, choice.message.role) == (0, "length", "assistant")
    assert choice.message.content == expected.text and choice.logprobs is None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (len(prompt), 10, len(prompt) + 10)

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CONVERSATION, max_tokens=10, temperature=0.8, seed=5, stream=True, stream_options={"include_usage": True},
    ))
    *deltas, usage = chunks
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in deltas) == expected.text
    assert [chunk.choices[0].finish_reason for chunk in deltas] == [None] * (len(deltas) - 1) + ["length"]
    assert usage.choices == [] and usage.usage.completion_tokens == 10


def test_chat_stop_strings_and_the_rest_of_the_context(served):
    engine, client = served
    messages = [{"role": "user", "content": [{"type": "text", "text": "two"}, {"type": "text", "text": "parts"}]}]
    prompt = chat_prompt([{"role": "user", "content": "two\nparts"}])  # text parts joined by newlines
    [full] = engine.generate(prompt, SamplingParams(max_new_tokens=128 - len(prompt)), timeout=60)
    answer = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)  # no max_tokens: up to max_context
    assert answer.choices[0].message.content == full.text and answer.usage.completion_tokens == 128 - len(prompt)
    stop = next(chr(token) for token in full.token_ids[1:] if 32 < token < 127)
    stopped = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == full.text[: full.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    # Both read the blocks Engine.generate left cached; the stop string cancels its request,
    # whose end still reports them.
    block = engine.spec.runtime.kv_block_size
    cached = (len(prompt) - 1) // block * block
    assert (answer.usage.prompt_tokens_details.cached_tokens, stopped.usage.prompt_tokens_details.cached_tokens) == (cached, cached)
    assert_only_cache_holds_kv(wait_idle(engine))


def test_completion_logprobs_equal_log_softmax_of_the_logits(served):
    engine, client = served
    prompt, k, max_tokens = list(range(60, 90)), 3, 6
    tokens, chosen, top_ids, top_values = expected_logprobs(engine, prompt, max_tokens, k)
    text = engine.tokenizer.decode
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=k)
    logprobs = answer.choices[0].logprobs
    assert logprobs.tokens == [text([token]) for token in tokens]
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs, dtype=torch.float64), chosen, **TOLERANCES[torch.float32])
    for position, alternatives in enumerate(logprobs.top_logprobs):
        assert len(alternatives) == len({text([token]) for token in top_ids[position].tolist()})  # texts may coincide (bytes > 127)
        assert max(alternatives.values()) == pytest.approx(float(top_values[position, 0]), abs=1e-5)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(max_tokens)]

    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=k, stream=True))
    assert [t for chunk in streamed for t in chunk.choices[0].logprobs.token_logprobs] == logprobs.token_logprobs
    assert [t for chunk in streamed for t in chunk.choices[0].logprobs.text_offset] == logprobs.text_offset


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_logprobs_and_top_logprobs(served, stream):
    engine, client = served
    k, max_tokens = 4, 5
    tokens, chosen, top_ids, top_values = expected_logprobs(engine, chat_prompt(CONVERSATION), max_tokens, k)
    request = dict(model=MODEL, messages=CONVERSATION, max_tokens=max_tokens, temperature=0, logprobs=True, top_logprobs=k)
    if stream:
        entries = [entry for chunk in client.chat.completions.create(**request, stream=True) if chunk.choices[0].logprobs
                   for entry in chunk.choices[0].logprobs.content]
    else:
        entries = client.chat.completions.create(**request).choices[0].logprobs.content
    text = engine.tokenizer.decode
    assert [entry.token for entry in entries] == [text([token]) for token in tokens]
    assert all(entry.bytes == list(entry.token.encode()) for entry in entries)
    torch.testing.assert_close(torch.tensor([entry.logprob for entry in entries], dtype=torch.float64), chosen, **TOLERANCES[torch.float32])
    served_top = torch.tensor([[alternative.logprob for alternative in entry.top_logprobs] for entry in entries], dtype=torch.float64)
    torch.testing.assert_close(served_top, top_values, **TOLERANCES[torch.float32])
    assert [[alternative.token for alternative in entry.top_logprobs] for entry in entries] == [
        [text([token]) for token in row] for row in top_ids.tolist()
    ]


def test_n_choices_and_prompt_lists_each_with_the_seed_plus_their_index(served):
    engine, client = served
    prompts, n, max_tokens, seed = [[7, 8, 9, 10], [200, 100, 50]], 3, 8, 40

    def expected(prompt, index):
        params = SamplingParams(max_new_tokens=max_tokens, temperature=1.0, seed=seed + index)
        return engine.generate(prompt, params, timeout=60)[0].text

    wanted = [expected(prompt, p * n + i) for p, prompt in enumerate(prompts) for i in range(n)]
    assert len(set(wanted)) > 1  # the seeds differ, so (almost surely) do the samples
    answer = client.completions.create(model=MODEL, prompt=prompts, n=n, max_tokens=max_tokens, seed=seed)
    assert [choice.index for choice in answer.choices] == list(range(len(prompts) * n))
    assert [choice.text for choice in answer.choices] == wanted
    assert answer.usage.prompt_tokens == 7 and answer.usage.completion_tokens == len(prompts) * n * max_tokens

    texts = [""] * len(wanted)
    for chunk in client.completions.create(model=MODEL, prompt=prompts, n=n, max_tokens=max_tokens, seed=seed, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == wanted

    chat = client.chat.completions.create(model=MODEL, messages=CONVERSATION, n=2, max_tokens=6, seed=seed)
    prompt = chat_prompt(CONVERSATION)
    assert [choice.message.content for choice in chat.choices] == [
        engine.generate(prompt, SamplingParams(max_new_tokens=6, temperature=1.0, seed=seed + i), timeout=60)[0].text for i in range(2)
    ]
    assert_only_cache_holds_kv(wait_idle(engine))
    engine.check_kv()


def test_errors_reach_the_client_as_openai_errors(served):
    engine, client = served
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs = true"):
        client.chat.completions.create(model=MODEL, messages=CONVERSATION, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 120}], max_completion_tokens=20)
    with pytest.raises(openai.BadRequestError, match="unrecognized request argument supplied: tools"):
        client.chat.completions.create(model=MODEL, messages=CONVERSATION, tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=CONVERSATION)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


def served_url(client) -> str:
    """The server's root URL (the client's base URL is its /v1)."""
    return str(client.base_url.copy_with(path="/")).rstrip("/")


def unique_text(seed: int, length: int) -> str:
    """Printable text no other test sends (a prefix-cache hit needs the same leading blocks)."""
    return "".join(random.Random(seed).choices("abcdefghijklmnopqrstuvwxyz ,.", k=length))


def answer(client, endpoint: str, prompt, stream: bool, **fields) -> tuple[list[str], object]:
    """Each choice's text and the usage of one greedy request, streamed or not."""
    chat = endpoint == "chat"
    request = dict(model=MODEL, max_tokens=8, temperature=0, **fields) | ({"messages": prompt} if chat else {"prompt": prompt})
    create = client.chat.completions.create if chat else client.completions.create
    if not stream:
        response = create(**request)
        return [choice.message.content if chat else choice.text for choice in response.choices], response.usage
    *chunks, last = create(**request, stream=True, stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + ((choice.delta.content or "") if chat else choice.text)
    assert last.choices == []
    return [texts[index] for index in sorted(texts)], last.usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_repeated_prompt_reports_its_cached_prefix(served, endpoint, stream):
    engine, client = served
    block = engine.spec.runtime.kv_block_size
    seed = {"completions": 0, "chat": 1}[endpoint] * 2 + stream  # a prompt of its own per case
    if endpoint == "chat":
        text = unique_text(seed, 5 * block + 3 - len(chat_prompt([{"role": "user", "content": ""}])))
        prompt, ids = [{"role": "user", "content": text}], chat_prompt([{"role": "user", "content": text}])
    else:
        prompt = ids = list(unique_text(seed, 5 * block + 3).encode())
    assert len(ids) == 5 * block + 3
    # The second request borrows the first one's KV of every full block of the prompt short
    # of its last token (which must be computed to sample from): 5 blocks.
    cached = (len(ids) - 1) // block * block
    url = served_url(client)
    before = scrape(url)

    first_texts, first = answer(client, endpoint, prompt, stream)
    second_texts, second = answer(client, endpoint, prompt, stream)
    assert second_texts == first_texts
    assert (first.prompt_tokens, second.prompt_tokens) == (len(ids), len(ids))
    assert second.prompt_tokens_details.cached_tokens == cached
    shared = first.prompt_tokens_details.cached_tokens
    if endpoint == "chat":  # its first block, "<|im_start|>user", may be cached by other chat requests
        assert shared in (0, block)
    else:
        assert shared == 0

    after = scrape(url)
    assert after["espc_prefix_cache_hit_tokens_total"] - before["espc_prefix_cache_hit_tokens_total"] == shared + cached
    queried = after["espc_prefix_cache_queried_tokens_total"] - before["espc_prefix_cache_queried_tokens_total"]
    assert queried >= shared + cached
    assert after["espc_prefix_cache_hit_ratio"] == pytest.approx(
        after["espc_prefix_cache_hit_tokens_total"] / after["espc_prefix_cache_queried_tokens_total"],
    )
    assert after["espc_prefix_cache_entries"] >= 1 and after["espc_prefix_cache_cached_tokens"] >= cached

    if endpoint == "completions":  # the prompt twice, n = 2: four choices prefilled side by side
        texts, usage = answer(client, endpoint, [prompt, prompt], stream, n=2)
        assert texts == first_texts * 4
        # Each prompt counted once (its first choice's); which choices find the cached
        # prefix on their instances is the scheduler's placement (test_serve checks the sum).
        assert usage.prompt_tokens == 2 * len(ids)
        assert usage.prompt_tokens_details.cached_tokens in (0, cached, 2 * cached)
    engine.check_kv()


def test_without_prefix_caching_nothing_is_cached():
    spec = tiny_spec(128, runtime="prefix_caching = false")
    with Engine(spec, kv_capacity=1024, **GROUPS) as engine, ServerThread(create_app(engine)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        block = engine.spec.runtime.kv_block_size
        prompt = list(unique_text(10, 5 * block + 3).encode())
        answers = [answer(client, "completions", prompt, stream) for stream in (False, True)]
        assert answers[0][0] == answers[1][0]
        assert [usage.prompt_tokens_details.cached_tokens for _, usage in answers] == [0, 0]
        samples = scrape(server.url)
        assert samples["espc_prefix_cache_enabled"] == 0
        assert samples["espc_prefix_cache_hit_tokens_total"] == 0 and samples["espc_prefix_cache_entries"] == 0
        assert_only_cache_holds_kv(wait_idle(engine))  # nothing kept past its request
        engine.check_kv()
