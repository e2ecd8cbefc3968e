"""The naive way to let an LLM see: caption the image, then ask a text-only LLM with the caption as text.

No image tokens reach the LLM: it reads "Image: {caption}" before the first question, in its own template
(the tokenizer's chat_template where it has one, else "Image: {caption}\\nQuestion: {q} Answer:").
Whatever the caption leaves out, the answer cannot know. The captioner is any generative blipkit model
(``--via-caption`` on ``ask``/``chat``/``serve``, ``blipkit.via_caption(model)``) or a photo tagger
("a photo of a {label}", ``default-photo``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from blipkit.api import Images, Model
from blipkit.errors import ConfigError
from blipkit.loading import BLIPKIT_FORMAT, Loaded, load_checkpoint, torch_dtype
from blipkit.models.chat_cache import ChatCache, position_keys, reusable
from blipkit.models.decoding import Sampling
from blipkit.models.fast_linear import accelerate
from blipkit.models.llm_io import LLMInputs
from blipkit.parts import build_llm, load_tokenizer, read_config, resolve
from blipkit.processing import ImageInput, as_image_list
from blipkit.templates import Template, TokenizerTemplate
from blipkit.text import Prompt, TextProcessor

Captioner = Callable[..., list[str]]  # (images, **caption options) -> one caption per image
SHORT_ANSWER = "{}\nAnswer the question using a single word or phrase."  # LLaVA-1.5's VQA instruction


PHOTO_TAGGER = "asset:efficientnet-lite0"  # the packaged ImageNet tagger as the captioner


def is_bridge(raw: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is a caption-then-LLM bridge (``"family": "caption"`` in blipkit format)."""
    return raw.get("format") == BLIPKIT_FORMAT and raw.get("family") == "caption"


def load_bridge(
    path: Path,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    batch_size: int = 16,
    kernels: str = "auto",
) -> CaptionThenLLM:
    """The bridge a config names: ``captioner`` a model name/dir/hub id or the packaged photo tagger;
    ``llm`` an LLM dir/asset, or None for the captioner's own."""
    from blipkit.config import LLMConfig, config_from_dict
    from blipkit.models.text_llm import CaptionBridgeConfig, TextLLM

    cfg = config_from_dict(CaptionBridgeConfig, read_config(path / "config.json").get("config"), str(path))
    if cfg.captioner == PHOTO_TAGGER:
        from blipkit.models.tagger import PhotoTagger

        tagger = PhotoTagger.load(device=device)

        def captioner(images: Any, **_: Any) -> list[str]:
            if isinstance(images, torch.Tensor):  # processed by ``tagger.processor`` (the server)
                return tagger.caption_pixels(images)
            return tagger.caption(images)

        processor, llm, tokenizer = tagger.processor, None, None
    else:
        local = path / cfg.captioner
        ref = local if local.exists() else cfg.captioner
        source = Model(load_checkpoint(ref, dtype, device, trust_remote_code, kernels=kernels), batch_size)
        source.require("caption")
        captioner, processor = source.caption, source.processor
        llm, tokenizer = (source.model.llm, source.tokenizer) if source.model.has_llm else (None, None)
    if cfg.llm is not None:
        ref = resolve(cfg.llm, path)
        llm = build_llm(LLMConfig(pretrained=str(ref)), None, path, torch_dtype(dtype), trust_remote_code)
        tokenizer = load_tokenizer(ref, trust_remote_code)
    if llm is None:
        raise ConfigError(
            f"{path / 'config.json'}: the captioner has no LLM to answer with; name one in 'llm'"
        )
    model = TextLLM(cfg, llm)
    if device:
        model.to(device)
    accelerate(model, kernels)
    text = TextProcessor.for_model(model, tokenizer, None)
    return CaptionThenLLM(Loaded(model, text, processor, path), captioner, batch_size)


class CaptionThenLLM(Model):
    """A ``Model`` whose ``ask`` and ``chat`` go through a caption: ``caption`` is the captioner's."""

    def __init__(self, loaded: Loaded, captioner: Captioner, batch_size: int = 16):
        super().__init__(loaded, batch_size)
        self.captioner = captioner

    @classmethod
    def from_model(cls, model: Model) -> CaptionThenLLM:
        """``model`` captions, and its own LLM answers from the caption alone."""
        from blipkit.models.text_llm import CaptionBridgeConfig, TextLLM

        model.require("caption")
        cfg = CaptionBridgeConfig(name=f"{model.config.name}+caption", prompts=model.config.prompts)
        llm = TextLLM(cfg, model.model.llm)
        text = TextProcessor.for_model(llm, model.tokenizer, None)
        return cls(Loaded(llm, text, model.processor, model.path), model.caption, model.batch_size)

    @classmethod
    def blind(cls, model: Model) -> CaptionThenLLM:
        """``model``'s LLM asked with no image information at all: the floor every bridge must clear."""
        bridge = cls.from_model(model)
        bridge.captioner = lambda images, **_: [""] * len(images)
        return bridge

    @property
    def family(self) -> str:
        return "caption"

    def describe(self, images: Images | torch.Tensor) -> list[str]:
        """The captioner's caption of each image (or processed (B, 3, S, S) batch): the text the LLM reads."""
        return self.captioner(images if isinstance(images, torch.Tensor) else as_image_list(images))

    def caption(self, images: Images, prompt: str | None = None, **kwargs: Any) -> list[str]:
        """The captioner's captions (``prompt`` and options go to it where it takes them)."""
        if prompt is None and not kwargs:
            return self.describe(images)
        return self.captioner(as_image_list(images), prompt=prompt, **kwargs)

    def template_for(self, caption: str) -> Template | TokenizerTemplate:
        """The LLM's template with the caption in front of the first user message (none when it is empty)."""
        template = self.text.template
        if not caption:
            return template
        if isinstance(template, TokenizerTemplate):
            return template.with_image(f"Image: {caption}\n")
        return replace(template, prefix=f"Image: {{system}}\n{template.prefix}", system=caption)

    def llm_inputs(self, images: Any, prompts: Sequence[Prompt]) -> LLMInputs:
        """The prompts' text alone: they already hold their images' captions."""
        ids, mask = self.text.llm_batch([p.llm_ids for p in prompts])
        return self.model.text_inputs(ids.to(self.device), mask.to(self.device))

    def complete(self, images: Any, prompts: Sequence[Prompt], *args: Any, **kwargs: Any) -> list[list[int]]:
        """New token ids per prompt (see ``Model.complete``); ``images`` is not read: the captions are in the
        prompts."""
        return super().complete([None] * len(prompts), prompts, *args, **kwargs)

    def generate(
        self,
        images: Images,
        prompts: Sequence[str],
        max_new_tokens: int = 30,
        num_beams: int = 1,
        **generate_kwargs: Any,
    ) -> list[str]:
        """One answer per (image, question) pair, each asked with its image's caption (a chat LLM is asked
        for a short answer, as LLaVA-1.5 asks for VQA answers)."""
        captions = self.describe(images)
        chat_llm = isinstance(self.text.template, TokenizerTemplate)
        fitted = [
            self.text.prompt(
                self.text.question(SHORT_ANSWER.format(q) if chat_llm else q, self.template_for(c)),
                max_new_tokens,
            )
            for c, q in zip(captions, prompts, strict=True)
        ]
        sampling = Sampling.from_kwargs(num_beams, **generate_kwargs)
        return [self.text.decode(t) for t in self.complete(None, fitted, max_new_tokens, sampling)]

    def ask(
        self, image: ImageInput, question: str, max_new_tokens: int | None = None, **generate_kwargs: Any
    ) -> str:
        n = max_new_tokens or self.config.prompts.vqa_max_new_tokens
        return self.generate([image], [question], n, **generate_kwargs)[0]

    def chat(self, image: ImageInput, max_new_tokens: int = 30, reuse_cache: bool = True) -> CaptionChat:
        return CaptionChat(self, image, max_new_tokens, reuse_cache)


class CaptionChat:
    """Multi-turn chat about one image through its caption; ``history`` holds (user, assistant) turns.

    With ``reuse_cache`` greedy turns keep the LLM's keys/values, as ``blipkit.api.Chat`` does."""

    def __init__(
        self, model: CaptionThenLLM, image: ImageInput, max_new_tokens: int = 30, reuse_cache: bool = True
    ):
        self.model = model
        self.caption = model.describe([image])[0]
        self.template = model.template_for(self.caption)
        self.max_new_tokens = max_new_tokens
        self.history: list[tuple[str, str]] = []
        self.reuse_cache = reuse_cache
        self._kv = ChatCache()

    @property
    def cached_tokens(self) -> int:
        """LLM positions of the last turn's prompt read from the cache."""
        return self._kv.reused

    def prompt(self, message: str) -> Prompt:
        """The fitted prompt for ``message`` (the caption stays in front of the oldest turn kept)."""
        return self.model.text.chat(self.history, message, self.max_new_tokens, self.template)

    def send(self, message: str, **generate_kwargs: Any) -> str:
        sampling, prompt, m = Sampling.from_kwargs(**generate_kwargs), self.prompt(message), self.model
        if self.reuse_cache and reusable(m.model, m.decoder, sampling):
            with torch.inference_mode():
                inputs = m.llm_inputs(None, [prompt])  # text only: no image positions
                keys = position_keys(prompt.llm_ids, inputs, None)
                tokens = self._kv.generate(m.decoder.lean, m.decoder.eos, inputs, keys, self.max_new_tokens)
        else:
            self._kv.clear()
            tokens = m.complete(None, [prompt], self.max_new_tokens, sampling)[0]
        answer = m.text.decode(tokens)
        self.history.append((message, answer))
        return answer

    def reset(self) -> None:
        self.history.clear()
        self._kv.clear()
