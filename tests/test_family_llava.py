"""LLaVA through the same API, CLI and server as BLIP-2: the prompts its conversation template builds are
answered with the tokens transformers' own ``LlavaForConditionalGeneration`` generates for them; the original
repo's layout answers like the llava-hf dir built from the same weights; InstructBLIP through CLI, server."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from hf_tiny import IMAGE_TOKEN
from hf_tiny_llava import make_llava, make_llava_original, num_image_features
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import blipkit
from blipkit.cli import main
from blipkit.processing import expand_to_square

# llava-1.5-hf's chat template: content parts, the image placeholder written by the template
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava-hf")
    hf = make_llava(path, llm="llama", tower="clip", feature_layer=-2, select="default")
    return path, hf, blipkit.load(path)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(path)  # square: no padding
    return path


def reference_tokens(path, hf, text, image, max_new_tokens):
    """transformers' greedy tokens for ``text`` (one image placeholder) and ``image``."""
    tok = blipkit.load(path).tokenizer
    ids = tok(text)["input_ids"]
    image_id = hf.config.image_token_index
    k = ids.index(image_id)
    ids = ids[:k] + [image_id] * num_image_features(hf) + ids[k + 1 :]
    pixels = CLIPImageProcessorPil.from_pretrained(path)(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pixel_values=pixels,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return [t for t in out[0, len(ids) :].tolist() if t != tok.eos_token_id]


def test_ask_caption_chat_match_transformers(llava, photo):
    path, hf, m = llava
    image = Image.open(photo).convert("RGB")
    assert m.family == "llava" and m.capabilities == ("caption", "ask", "chat")
    assert m.text.template.name == "llava_v1"  # a tokenizer without a chat_template
    question = m.text.question("what is in the image ?")
    assert question.endswith(f"USER: {IMAGE_TOKEN}\nwhat is in the image ? ASSISTANT:")
    want = reference_tokens(path, hf, question, image, 8)
    assert m.ask(photo, "what is in the image ?", max_new_tokens=8) == m.text.decode(want)
    prompt = m.text.caption_prompt("Describe this image in detail.")
    want = reference_tokens(path, hf, prompt, image, 12)
    assert m.caption(photo, prompt="Describe this image in detail.", max_new_tokens=12) == [
        m.text.decode(want)
    ]
    chat = m.chat(photo, max_new_tokens=6)
    chat.send("what is it ?")
    second = chat.prompt("and the color ?")
    assert second.text.count(IMAGE_TOKEN) == 1 and "</s>USER: and the color ? ASSISTANT:" in second.text
    want = reference_tokens(path, hf, second.text, image, 6)
    assert chat.send("and the color ?") == m.text.decode(want)


def test_batched_equals_one_by_one(llava, tmp_path):
    _, _, m = llava
    rng = np.random.default_rng(5)
    files = []
    for i, size in enumerate([(40, 28), (28, 60), (33, 33)]):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(files[-1])
    questions = ["what is it ?", "what color is the dog on the grass ?", "is there a cat ?"]
    batched = m.generate(files, [m.text.question(q) for q in questions], max_new_tokens=6)
    assert batched == [m.ask(f, q, max_new_tokens=6) for f, q in zip(files, questions, strict=True)]
    beams = m.caption(files, prompt="describe", max_new_tokens=5, num_beams=2)
    assert beams == [m.caption(f, prompt="describe", max_new_tokens=5, num_beams=2)[0] for f in files]


def test_tokenizer_chat_template_with_content_parts(tmp_path, photo):
    path = tmp_path / "llava-tmpl"
    hf = make_llava(path, llm="qwen2", tower="clip", select="full", chat_template=LLAVA_HF_TEMPLATE)
    m = blipkit.load(path)
    assert m.text.template.name == "tokenizer"
    assert m.text.question("what is it ?") == f"USER: {IMAGE_TOKEN}\nwhat is it ? ASSISTANT:"
    chat = m.chat(photo, max_new_tokens=5)
    chat.send("what is it ?")
    prompt = chat.prompt("and the dog ?").text
    assert prompt.count(IMAGE_TOKEN) == 1 and prompt.endswith("USER: and the dog ? ASSISTANT:")
    image = Image.open(photo).convert("RGB")
    assert chat.send("and the dog ?") == m.text.decode(reference_tokens(path, hf, prompt, image, 5))


def test_original_layout_answers_like_llava_hf(llava, photo, tmp_path):
    path, _, m = llava
    original = blipkit.load(make_llava_original(tmp_path / "orig", path, image_aspect_ratio="square"))
    assert original.family == "llava" and original.text.template.name == "llava_v1"
    assert original.text.settings.image_token_index == -200  # the tokenizer has no <image> token
    for q in ("what is in the image ?", "is the dog red ?"):
        assert original.ask(photo, q, max_new_tokens=8) == m.ask(photo, q, max_new_tokens=8)


def test_original_layout_pads_to_square(llava, tmp_path):
    path, _, _ = llava
    padded = blipkit.load(make_llava_original(tmp_path / "orig-pad", path, image_aspect_ratio="pad"))
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 50, 3), dtype=np.uint8))
    clip = CLIPImageProcessorPil.from_pretrained(path)
    fill = tuple(int(x * 255) for x in clip.image_mean)
    want = clip(images=[expand_to_square(wide, fill)], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(padded.processor(wide), want, atol=1e-5, rtol=1e-5)


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_cli_and_server(llava, photo, capsys, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from blipkit.serve import create_app

    path, _, m = llava
    assert main(["ask", str(photo), "what is it ?", "--model", str(path), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == m.ask(photo, "what is it ?", max_new_tokens=6)
    assert (
        main(["caption", str(photo), "--model", str(path), "--prompt", "describe", "--max-new-tokens", "5"])
        == 0
    )
    assert m.caption(photo, prompt="describe", max_new_tokens=5)[0] in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("what is it ?\nand the color ?\n"))
    assert main(["chat", str(photo), "--model", str(path), "--max-new-tokens", "5"]) == 0
    chat = m.chat(photo, max_new_tokens=5)
    assert capsys.readouterr().out.split("\n")[:2] == [
        chat.send("what is it ?"),
        chat.send("and the color ?"),
    ]
    with TestClient(create_app(m, model_name="tiny-llava")) as c:
        image = {"type": "image_url", "image_url": {"url": data_uri(photo)}}
        body = {
            "model": "tiny-llava",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "what is it ?"}, image]}],
        }
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == m.ask(photo, "what is it ?", max_new_tokens=5)
        r = c.post("/v1/embeddings", json={"model": "tiny-llava", "input": "a cat"})
        assert r.status_code == 400 and "cannot embed" in r.text


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_instructblip_through_cli_and_server(llm, photo, tmp_path, capsys):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from hf_tiny_instructblip import make_instructblip

    from blipkit.serve import create_app

    path = tmp_path / f"instructblip-{llm}"
    make_instructblip(path, llm=llm)
    m = blipkit.load(path)
    assert m.capabilities == ("caption", "ask", "chat") and m.model.question_aware
    assert main(["ask", str(photo), "what is it ?", "--model", str(path), "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == m.ask(photo, "what is it ?", max_new_tokens=5)
    with TestClient(create_app(m, model_name="tiny")) as c:
        image = {"type": "image_url", "image_url": {"url": data_uri(photo)}}
        body = {
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [image, {"type": "text", "text": "what is it ?"}]}],
        }
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == m.ask(photo, "what is it ?", max_new_tokens=5)
