"""The user-facing model: caption, ask, chat, embed, similarity, match, classify."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from blipkit.errors import CapabilityError
from blipkit.loading import Loaded
from blipkit.models.blip2 import Blip2
from blipkit.processing import ImageInput, as_image_list, build_chat_prompt, build_prompt, tokenize

Images = ImageInput | Sequence[ImageInput]


class Model:
    """A loaded vision-language model with its tokenizer(s) and image processor."""

    def __init__(self, loaded: Loaded, batch_size: int = 16):
        self.model: Blip2 = loaded.model
        self.tokenizer = loaded.tokenizer
        self.processor = loaded.processor
        self.qformer_tokenizer = loaded.qformer_tokenizer
        self.path = loaded.path
        self.batch_size = batch_size
        self.config = self.model.config

    def __repr__(self) -> str:
        return f"blipkit.Model({self.config.name!r}, path={str(self.path)!r})"

    @property
    def device(self) -> torch.device:
        return self.model.qformer.query_tokens.device

    # --- inputs ---------------------------------------------------------------------------------------------
    def pixel_values(self, images: Images | Tensor) -> Tensor:
        """(B, 3, S, S) on the model's device; an already processed batch passes through."""
        if isinstance(images, Tensor):
            return images.to(self.device)
        return self.processor(images).to(self.device)

    @staticmethod
    def _items(images: Images | Tensor) -> list | Tensor:
        """A list of images, or an already processed (B, 3, S, S) batch as is."""
        return images if isinstance(images, Tensor) else as_image_list(images)

    def _tokenize(self, tokenizer: Any, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = tokenize(tokenizer, texts)
        return ids.to(self.device), mask.to(self.device)

    def _qformer_text(self, texts: list[str]) -> dict[str, Tensor]:
        if not self.config.bridge.text_input:
            return {}
        ids, mask = self._tokenize(self._require_qformer_tokenizer(), texts)
        return {"qformer_input_ids": ids, "qformer_attention_mask": mask}

    def _require_llm(self) -> None:
        if not self.model.has_llm or self.tokenizer is None:
            raise CapabilityError("this checkpoint has no language model: it cannot caption, answer or chat")

    def _require_qformer_tokenizer(self) -> Any:
        if self.qformer_tokenizer is None:
            raise CapabilityError(
                "this checkpoint has no Q-Former text path (a generation-only model): similarity, match, "
                "classify and text embeddings need a retrieval or stage-1 checkpoint"
            )
        return self.qformer_tokenizer

    # --- generation -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        images: Images | Tensor,
        prompts: list[str],
        max_new_tokens: int = 30,
        num_beams: int = 1,
        **generate_kwargs: Any,
    ) -> list[str]:
        """One answer per (image, prompt) pair, in batches of ``batch_size``."""
        self._require_llm()
        items = self._items(images)
        if len(prompts) != len(items):
            raise ValueError(f"{len(items)} images but {len(prompts)} prompts")
        tok = self.tokenizer
        kwargs = {
            "max_new_tokens": max_new_tokens,
            "num_beams": num_beams,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            **generate_kwargs,
        }
        if not kwargs.get("do_sample"):
            kwargs.setdefault("do_sample", False)
        out: list[str] = []
        for i in range(0, len(items), self.batch_size):
            chunk, texts = items[i : i + self.batch_size], prompts[i : i + self.batch_size]
            # right padding keeps relative positions intact for encoder-decoder LLMs (T5); decoder-only
            # prompts are left-packed by the model after the visual prompt is put in front
            ids, mask = self._tokenize(tok, texts)
            tokens = self.model.generate(
                self.pixel_values(chunk), ids, mask, **self._qformer_text(texts), **kwargs
            )
            out.extend(t.strip() for t in tok.batch_decode(tokens, skip_special_tokens=True))
        return out

    def caption(
        self,
        images: Images,
        prompt: str | None = None,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Describe each image; ``prompt`` (e.g. "a photo of") is continued by the model."""
        self._require_llm()
        items = self._items(images)
        text = prompt if prompt is not None else (self.config.prompts.caption or "")
        return self.generate(items, [text] * len(items), max_new_tokens, num_beams, **generate_kwargs)

    def ask(
        self, image: ImageInput, question: str, max_new_tokens: int | None = None, **generate_kwargs: Any
    ) -> str:
        """Answer a question about one image ("Question: {q} Answer:" style prompt)."""
        prompt = build_prompt(self.config.prompts.vqa, question)
        n = max_new_tokens or self.config.prompts.vqa_max_new_tokens
        return self.generate([image], [prompt], n, **generate_kwargs)[0]

    def chat(self, image: ImageInput, max_new_tokens: int = 30) -> Chat:
        """A conversation about one image that remembers earlier turns."""
        return Chat(self, image, max_new_tokens)

    # --- retrieval ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def image_query_embeddings(self, images: Images) -> Tensor:
        """Per-query ITC embeddings (N, Q, E), L2-normalised."""
        self._require_qformer_tokenizer()
        items = self._items(images)
        parts = [
            self.model.qformer.image_features(
                self.model.encode_image(self.pixel_values(items[i : i + self.batch_size]))
            )
            for i in range(0, len(items), self.batch_size)
        ]
        return torch.cat(parts).float()

    def embed_images(self, images: Images) -> Tensor:
        """One ITC embedding per image (N, E): the normalised mean of its query embeddings.

        ``similarity`` uses the exact BLIP-2 score (max over queries); this single vector is for indexes and
        clustering.
        """
        return torch.nn.functional.normalize(self.image_query_embeddings(images).mean(dim=1), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: str | Sequence[str]) -> Tensor:
        """ITC text embeddings (N, E), L2-normalised."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        tok = self._require_qformer_tokenizer()
        parts = []
        for i in range(0, len(texts), self.batch_size):
            ids, mask = self._tokenize(tok, texts[i : i + self.batch_size])
            parts.append(self.model.qformer.text_features(ids, mask))
        return torch.cat(parts).float()

    def similarity(self, images: Images, texts: str | Sequence[str]) -> Tensor:
        """ITC cosine similarity (N_img, N_txt): for each pair, the max over the image's queries."""
        img = self.image_query_embeddings(images)  # (N, Q, E)
        txt = self.embed_texts(texts)  # (M, E)
        return torch.einsum("nqe,me->nqm", img, txt).amax(dim=1)

    @torch.inference_mode()
    def match(self, images: Images, texts: str | Sequence[str]) -> Tensor:
        """ITM probability (N_img, N_txt) that the text matches the image."""
        tok = self._require_qformer_tokenizer()
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids, mask = self._tokenize(tok, texts)  # (M, T)
        rows = []
        items = self._items(images)
        for i in range(0, len(items), self.batch_size):
            feats = self.model.encode_image(self.pixel_values(items[i : i + self.batch_size]))  # (b, P, Dv)
            b, M = feats.shape[0], ids.shape[0]
            pair_feats = feats.repeat_interleave(M, dim=0)  # (b*M, P, Dv)
            logits = self.model.qformer.itm_logits(
                pair_feats, ids.repeat(b, 1), mask.repeat(b, 1)
            )  # (b*M, 2)
            rows.append(logits.softmax(dim=-1)[:, 1].view(b, M))
        return torch.cat(rows).float()

    def classify(
        self, images: Images, labels: Sequence[str], template: str | None = None
    ) -> list[dict[str, float]]:
        """Zero-shot classification: softmax over labels of ITC similarity / temperature.

        ``template`` (e.g. "a photo of {}") wraps each label; default: the model's ``prompts.classify``."""
        labels = list(labels)
        template = self.config.prompts.classify if template is None else template
        if not labels:
            raise ValueError("classify needs at least one label")
        sims = self.similarity(images, [build_prompt(template, label) for label in labels])
        probs = (sims / self.model.qformer.temp.detach().float().clamp(min=1e-3)).softmax(dim=-1)
        return [dict(zip(labels, map(float, row), strict=True)) for row in probs]


class Chat:
    """Multi-turn chat about one image. ``history`` holds (user, assistant) turns.

    When the visual prompt, the history and the new message would not fit the LLM's context window, the
    oldest turns are left out of the prompt (they stay in ``history``).
    """

    def __init__(self, model: Model, image: ImageInput, max_new_tokens: int = 30):
        model._require_llm()
        self.model = model
        self.image = model.processor(image)[0]  # decoded once: (3, S, S)
        self.max_new_tokens = max_new_tokens
        self.history: list[tuple[str, str]] = []

    def context_window(self) -> int:
        cfg = self.model.config
        llm_cfg = self.model.model.llm.config
        limit = cfg.llm.max_context or getattr(llm_cfg, "max_position_embeddings", None)
        return int(limit or getattr(llm_cfg, "n_positions", None) or 512)

    def prompt(self, message: str) -> str:
        """The prompt for ``message``: as many recent turns as fit the context window."""
        tok = self.model.tokenizer
        prompts = self.model.config.prompts
        budget = self.context_window() - self.model.config.qformer.num_query_tokens - self.max_new_tokens
        for start in range(len(self.history) + 1):
            text = build_chat_prompt(self.history[start:], message, prompts.vqa, prompts.chat_separator)
            if len(tok(text)["input_ids"]) <= budget:
                return text
        # even the message alone is too long: keep its end
        ids = tok(text, add_special_tokens=False)["input_ids"][-max(budget - 2, 1) :]
        return tok.decode(ids)

    def send(self, message: str, **generate_kwargs: Any) -> str:
        answer = self.model.generate(
            self.image[None], [self.prompt(message)], self.max_new_tokens, **generate_kwargs
        )[0]
        self.history.append((message, answer))
        return answer

    def reset(self) -> None:
        self.history.clear()
