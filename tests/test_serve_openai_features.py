"""What real OpenAI clients send, through the official ``openai`` package against a live server on tiny random
models: stop sequences, seeds, several choices, log-probabilities, usage chunks, ``/v1/completions``, JSON
under a schema (xgrammar), and several images for LLaVA (answered as transformers' LLaVA answers them)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from hf_tiny_bytes import llm_alone, make_byte_blip2
from hf_tiny_llava import make_llava, num_image_features
from live_server import live
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
jsonschema = pytest.importorskip("jsonschema")

import blipkit  # noqa: E402
from blipkit.serve import create_app  # noqa: E402
from blipkit.templates import TEMPLATES  # noqa: E402


def png(seed: int, size: tuple[int, int] = (28, 28)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def image_part(data: bytes) -> dict:
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()},
    }


def ask(data: bytes, question: str = "what is in the picture ?") -> list[dict]:
    return [{"role": "user", "content": [image_part(data), {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def model(opt_dir):
    return blipkit.load(opt_dir)


@pytest.fixture(scope="module")
def client(model):
    with live(create_app(model, model_name="tiny")) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def greedy(model, data: bytes, question: str, tokens: int) -> str:
    return model.generate([data], [f"Question: {question} Answer:"], max_new_tokens=tokens)[0]


def chat(client, data: bytes, question: str = "what is in the picture ?", **options):
    return client.chat.completions.create(model="tiny", messages=ask(data, question), **options)


def streamed(client, data: bytes, **options) -> tuple[dict[int, str], dict[int, str], list]:
    """Text and finish reason per choice of a streamed chat, and the chunks."""
    chunks = list(chat(client, data, stream=True, **options))
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return texts, finish, chunks


# --- /v1/chat/completions ---------------------------------------------------------------------------------


def test_stop_sequences_cut_the_answer(client, model):
    data = png(1)
    full = greedy(model, data, "what is in the picture ?", 12)
    words = full.split()
    assert len(words) >= 4, full
    stop = f" {words[2]}"
    expected = full[: full.index(stop)]
    for value in (stop, ["never in it", stop]):
        r = chat(client, data, max_tokens=12, stop=value)
        assert r.choices[0].message.content == expected
        assert r.choices[0].finish_reason == "stop"
    texts, finish, _ = streamed(client, data, max_tokens=12, stop=stop)
    assert texts == {0: expected} and finish == {0: "stop"}  # nothing past the stop was streamed
    assert chat(client, data, max_tokens=12, stop="never in it").choices[0].message.content == full


def test_seed_makes_sampling_reproducible(client):
    data = png(2)

    def sample(seed: int) -> str:
        return chat(client, data, max_tokens=10, temperature=1.0, seed=seed).choices[0].message.content

    assert sample(5) == sample(5) == sample(5)
    assert len({sample(s) for s in range(5)}) > 1  # the seed is what changes the text


def test_several_choices_streamed_and_whole(client):
    data = png(3)
    options = {"max_tokens": 8, "temperature": 1.0, "seed": 11}
    whole = chat(client, data, n=3, **options)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content for c in whole.choices]
    assert (
        texts[0] == chat(client, data, **options).choices[0].message.content
    )  # choice 0 samples with the seed
    assert len(set(texts)) > 1
    assert whole.usage.completion_tokens == sum(
        chat(client, data, n=1, **{**options, "seed": 11 + i}).usage.completion_tokens for i in range(3)
    )
    streamed_texts, finish, _ = streamed(client, data, n=3, **options)
    assert streamed_texts == dict(enumerate(texts)) and set(finish) == {0, 1, 2}
    greedy_choices = chat(client, data, n=2, max_tokens=5).choices
    assert greedy_choices[0].message.content == greedy_choices[1].message.content


def test_logprobs_are_the_models_own(client, model):
    data = png(4)
    r = chat(client, data, max_tokens=6, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content).strip() == choice.message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True
        )
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.bytes == list(t.token.encode())
    # the same numbers from one teacher-forced forward pass over the prompt and the answer
    tok = model.tokenizer
    prompt = tok("Question: what is in the picture ? Answer:")["input_ids"]
    answer = tok(" " + choice.message.content, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model.model(model.pixel_values([data]), torch.tensor([prompt + answer])).logits[0]
    want = torch.log_softmax(logits.float(), -1)[len(prompt) - 1 : -1].gather(
        1, torch.tensor(answer)[:, None]
    )
    np.testing.assert_allclose([t.logprob for t in content], want[:, 0].numpy(), atol=1e-4)
    streamed_chunks = list(chat(client, data, max_tokens=6, logprobs=True, stream=True))
    tokens = [
        t.token for c in streamed_chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.content
    ]
    assert tokens == [t.token for t in content]
    assert chat(client, data, max_tokens=3).choices[0].logprobs is None


def test_usage_chunk_and_max_completion_tokens(client):
    data = png(5)
    _, finish, chunks = streamed(
        client, data, max_completion_tokens=3, stream_options={"include_usage": True}
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens <= 3
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1]) and finish[0] in ("stop", "length")
    r = chat(client, data, max_completion_tokens=2)
    assert r.usage.completion_tokens <= 2
    assert all(c.usage is None for c in streamed(client, data, max_tokens=2)[2])  # not asked: no usage chunk


def test_unknown_fields_are_ignored_known_unsupported_ones_named(client):
    data = png(6)
    assert chat(client, data, max_tokens=2, extra_body={"a_future_field": {"x": 1}}).choices
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    refused = [
        ({"tools": [tool]}, "tools"),
        ({"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}, "audio"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ]
    for options, name in refused:
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, data, max_tokens=2, **options)
        assert name in err.value.message and err.value.body["param"] == name


# --- /v1/completions --------------------------------------------------------------------------------------


def test_completions_continue_text_prompts(client, model):
    r = client.completions.create(model="tiny", prompt="a photo of a", max_tokens=7)
    assert r.object == "text_completion" and r.choices[0].text == llm_alone(model, "a photo of a", 7)
    assert r.usage.prompt_tokens == len(model.tokenizer("a photo of a")["input_ids"])
    many = client.completions.create(model="tiny", prompt=["a cat", "the dog is"], max_tokens=4, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[2].text == many.choices[3].text == llm_alone(model, "the dog is", 4)
    echo = client.completions.create(model="tiny", prompt="a cat", max_tokens=4, echo=True)
    assert echo.choices[0].text == "a cat" + many.choices[0].text
    full = llm_alone(model, "a photo of a", 7)
    stop = f" {full.split()[1]}"
    cut = client.completions.create(model="tiny", prompt="a photo of a", max_tokens=7, stop=stop)
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_completions_options(client, model):
    def sample(seed: int) -> str:
        r = client.completions.create(model="tiny", prompt="a red", max_tokens=8, temperature=1.0, seed=seed)
        return r.choices[0].text

    assert sample(3) == sample(3) and len({sample(s) for s in range(4)}) > 1
    r = client.completions.create(model="tiny", prompt="a red", max_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(
        len(top) <= 2 and max(top.values()) == pytest.approx(v)
        for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chunks = list(
        client.completions.create(
            model="tiny", prompt="a red", max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    for options, name in (({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny", prompt="a", max_tokens=2, **options)
        assert name in err.value.message


# --- response_format: JSON under a grammar ----------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "animal": {"type": "string", "enum": ["cat", "dog", "bird"]},
        "count": {"type": "integer"},
        "seen": {"type": "boolean"},
        "colors": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["animal", "count", "seen", "colors"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def json_client(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-bytes")
    make_byte_blip2(path)
    with live(create_app(blipkit.load(path), model_name="bytes")) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def json_chat(client, seed: int, tokens: int, response_format: dict, **options):
    return client.chat.completions.create(
        model="bytes",
        messages=ask(png(seed), "describe it as JSON"),
        max_tokens=tokens,
        temperature=1.0,
        seed=seed,
        response_format=response_format,
        **options,
    )


def test_json_object_always_parses_even_from_random_weights(json_client):
    free = json_chat(json_client, 0, 40, {"type": "text"}).choices[0].message.content
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)  # unconstrained, the random model writes no JSON
    for seed, tokens in [(0, 8), (1, 12), (2, 25), (3, 60)]:
        r = json_chat(json_client, seed, tokens, {"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < tokens
    chunks = list(json_chat(json_client, 4, 30, {"type": "json_object"}, stream=True))
    assert isinstance(
        json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), dict
    )


def test_json_schema_answers_validate(json_client):
    response_format = {"type": "json_schema", "json_schema": {"name": "sighting", "schema": SCHEMA}}
    for seed in range(3):
        r = json_chat(json_client, seed, 90, response_format)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as err:
        json_chat(json_client, 0, 20, bad)
    assert err.value.body["param"] == "response_format"


def test_json_needs_a_tokenizer_that_can_write_it(client):
    with pytest.raises(openai.BadRequestError) as err:  # the tiny word-level vocabulary has no "{"
        chat(client, png(9), max_tokens=4, response_format={"type": "json_object"})
    assert err.value.body["param"] == "response_format"


# --- several images ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava-multi")
    hf = make_llava(path, llm="llama", tower="clip")
    model = blipkit.load(path)
    with live(create_app(model, model_name="llava")) as url:
        yield (path, hf, model), openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def llava_reference(ref, text: str, images: list[bytes], tokens: int) -> str:
    """transformers' LLaVA answer: each "<image>" of ``text`` expanded to P image tokens, images in order."""
    path, hf, model = ref
    tok = model.tokenizer
    ids = tok(text)["input_ids"]
    image_id = hf.config.image_token_index
    assert ids.count(image_id) == len(images)
    expanded = [t for i in ids for t in ([i] * num_image_features(hf) if i == image_id else [i])]
    photos = [Image.open(io.BytesIO(d)).convert("RGB") for d in images]
    pixels = CLIPImageProcessorPil.from_pretrained(path)(images=photos, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor([expanded]),
            attention_mask=torch.ones(1, len(expanded), dtype=torch.long),
            pixel_values=pixels,
            max_new_tokens=tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, len(expanded) :], skip_special_tokens=True).strip()


def test_llava_reads_each_image_at_its_placeholder(llava):
    ref, client = llava
    a, b = png(20), png(21)
    system = TEMPLATES["llava_v1"].system
    one_turn = [
        {"role": "user", "content": [image_part(a), image_part(b), {"type": "text", "text": "what is it ?"}]}
    ]
    r = client.chat.completions.create(model="llava", messages=one_turn, max_tokens=6)
    text = f"{system} USER: <image>\n<image>\nwhat is it ? ASSISTANT:"
    assert r.choices[0].message.content == llava_reference(ref, text, [a, b], 6)
    across = [
        {"role": "user", "content": [image_part(a), {"type": "text", "text": "what is it ?"}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": [{"type": "text", "text": "and this one ?"}, image_part(b)]},
    ]
    r = client.chat.completions.create(model="llava", messages=across, max_tokens=6)
    text = f"{system} USER: <image>\nwhat is it ? ASSISTANT: a cat</s>USER: and this one ? <image> ASSISTANT:"
    assert r.choices[0].message.content == llava_reference(ref, text, [a, b], 6)
    swapped = [
        {"role": "user", "content": [image_part(b), image_part(a), {"type": "text", "text": "what is it ?"}]}
    ]
    text = f"{system} USER: <image>\n<image>\nwhat is it ? ASSISTANT:"
    r = client.chat.completions.create(model="llava", messages=swapped, max_tokens=6)
    assert r.choices[0].message.content == llava_reference(ref, text, [b, a], 6)


def test_one_image_families_name_the_limit(client):
    two = [
        {"role": "user", "content": [image_part(png(7)), image_part(png(8)), {"type": "text", "text": "?"}]}
    ]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=two, max_tokens=2)
    assert "one image" in err.value.message and err.value.body["code"] == "too_many_images"
    same_twice = [*ask(png(7)), {"role": "assistant", "content": "a cat"}, *ask(png(7), "and now ?")]
    assert client.chat.completions.create(model="tiny", messages=same_twice, max_tokens=2).choices
