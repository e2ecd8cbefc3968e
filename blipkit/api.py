"""The user-facing model: caption, ask, chat, embed, similarity, match, classify."""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from blipkit.errors import UsageError
from blipkit.loading import Loaded
from blipkit.models.blip2 import Visual
from blipkit.models.chat_cache import ChatCache, position_keys, reusable
from blipkit.models.continuous import Row, split_rows
from blipkit.models.decoding import Decoder, OnToken, Sampling
from blipkit.models.family import capabilities, require
from blipkit.models.llm_io import LLMInputs
from blipkit.models.quantize import OUTLIER_RATIO, Quantized, frozen_linears, quantize
from blipkit.processing import ImageInput, as_image_list
from blipkit.text import Prompt, fill

Images = ImageInput | Sequence[ImageInput]


class Model:
    """A loaded vision-language model with its text processor and image processor."""

    def __init__(self, loaded: Loaded, batch_size: int = 16):
        self.model: Any = loaded.model  # a family model: Blip2, Llava or DualEncoder
        self.text = loaded.text
        self.processor = loaded.processor
        self.path = loaded.path
        self.batch_size = batch_size
        self.config = self.model.config
        self._decoder: Decoder | None = None

    def __repr__(self) -> str:
        return f"blipkit.Model({self.config.name!r}, path={str(self.path)!r})"

    @property
    def tokenizer(self) -> Any:
        """The LLM's tokenizer (None without an LLM)."""
        return self.text.llm_tokenizer

    @property
    def qformer_tokenizer(self) -> Any:
        """The tokenizer of the Q-Former's text path (None without one)."""
        return self.text.qformer_tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def family(self) -> str:
        """``blip2`` (BLIP-2, InstructBLIP), ``llava`` or ``clip`` (CLIP, SigLIP)."""
        return getattr(self.config, "family", "blip2")

    @property
    def capabilities(self) -> tuple[str, ...]:
        """What this model can do, among caption, ask, chat, embed and match."""
        return capabilities(self.model)

    def require(self, capability: str) -> None:
        """``CapabilityError`` naming what the model can do when it cannot do ``capability``."""
        require(self.model, capability, f"model {self.config.name!r}")

    @property
    def decoder(self) -> Decoder:
        """The model's decoder (built on first use, then shared by every caller)."""
        if self._decoder is None:
            self.require_llm()
            self._decoder = Decoder(self.model, self.text.eos_token_id, self.text.llm_pad_id)
        return self._decoder

    def require_llm(self) -> None:
        """Raise CapabilityError when the model cannot generate text."""
        self.require("caption")
        self.text.require_llm()

    def quantize(self, mode: str = "int8", threshold: float = OUTLIER_RATIO) -> Quantized:
        """The frozen LLM's and vision encoder's Linear layers in 8 bits (``"int8"`` on CPU; ``"8bit"`` or
        ``"4bit"`` through bitsandbytes on CUDA), in place; see ``blipkit.models.quantize``. The output head
        stays as it is, and for int8 so do layers whose inputs carry outliers (found by a calibration run)."""
        self.require_llm()
        blip = self.model
        towers = {"llm": blip.llm}
        if isinstance(getattr(blip, "vision", None), torch.nn.Module):
            towers["vision"] = blip.vision
        head = blip.llm.get_output_embeddings()
        keep = {name for name, (_, _, layer) in frozen_linears(towers).items() if layer is head}
        done = quantize(towers, mode, self._calibration_run, keep, threshold)
        self._decoder = None  # the decoder's loops are rebuilt over the new layers
        return done

    def _calibration_run(self) -> None:
        """One short answer about a synthetic picture: what the layers' inputs look like in use."""
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (224, 224), (236, 232, 220))
        draw = ImageDraw.Draw(image)
        draw.ellipse((30, 40, 120, 130), fill=(200, 40, 40))
        draw.rectangle((110, 120, 200, 200), fill=(40, 90, 200))
        pixels = self.processor.preprocess(image)[None].to(self.device)
        prompt = self.text.prompt(self.text.question("What is in the image? Describe it."), 8)
        plain = Decoder(self.model, self.text.eos_token_id, self.text.llm_pad_id, greedy_head=False)
        self.complete(pixels, [prompt], 8, decoder=plain)  # (a greedy head would probe on random inputs)

    # --- inputs ---------------------------------------------------------------------------------------------
    def pixel_values(self, images: Images | Tensor) -> Tensor:
        """(B, 3, S, S) on the model's device; an already processed batch passes through."""
        if isinstance(images, Tensor):
            return images.to(self.device)
        return self.processor(images).to(self.device)

    @staticmethod
    def _items(images: Images | Tensor | Visual) -> list | Tensor | Visual:
        """A list of images, or an already processed (B, 3, S, S) batch / ``Visual`` as is."""
        return images if isinstance(images, (Tensor, Visual)) else as_image_list(images)

    def _to_device(self, t: Tensor) -> Tensor:
        return t.to(self.device)

    def visual(self, images: Images | Tensor | Visual, qformer_texts: Sequence[str] | None = None) -> Visual:
        """The image side of a generation: pixels (or the given ``Visual``) plus, for question-aware models,
        the Q-Former's reading of ``qformer_texts``."""
        visual = images if isinstance(images, Visual) else Visual(self.pixel_values(images))
        if getattr(self.model, "question_aware", False) and qformer_texts is not None:
            ids, mask = self.text.qformer_batch(qformer_texts)
            visual = Visual(
                visual.pixel_values, visual.image_embeds, visual.prefix, *map(self._to_device, (ids, mask))
            )
        return visual

    # --- generation -----------------------------------------------------------------------------------------
    def complete(
        self,
        images: Images | Tensor | Visual,
        prompts: Sequence[Prompt],
        max_new_tokens: int,
        sampling: Sampling | None = None,
        on_token: OnToken | None = None,
        decoder: Decoder | None = None,
        continuous: bool = True,
    ) -> list[list[int]]:
        """New token ids for each (image, prompt) pair, at most ``batch_size`` decoding at once (see
        ``complete_batches``). ``on_token(i, token)`` sees pair i's tokens as they come (see
        ``blipkit.models.decoding``); ``decoder`` replaces the model's own."""
        self.require_llm()
        items = self._items(images)
        n = items.batch_size if isinstance(items, Visual) else len(items)
        if len(prompts) != n:
            raise UsageError(f"{n} images but {len(prompts)} prompts")
        parts = (slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size))
        batches = ((items.rows(p) if isinstance(items, Visual) else items[p], prompts[p]) for p in parts)
        done = self.complete_batches(batches, max_new_tokens, sampling, on_token, decoder, continuous)
        return [tokens for batch in done for tokens in batch]

    @torch.inference_mode()
    def complete_batches(
        self,
        batches: Iterable[tuple[Any, Sequence[Prompt]]],
        max_new_tokens: int,
        sampling: Sampling | None = None,
        on_token: OnToken | None = None,
        decoder: Decoder | None = None,
        continuous: bool = True,
    ) -> Iterator[list[list[int]]]:
        """New token ids for each batch of (images, prompts), yielded batch by batch in order; batches are
        read (and their images encoded) only as decoding needs them.

        Greedy rows are batched continuously where the LLM allows it: when a row finishes, the next one takes
        its place, whichever batch it comes from (``blipkit.models.continuous``); otherwise, and with
        ``continuous=False``, each batch decodes on its own. ``on_token(i, token)`` numbers rows across
        batches.
        """
        decoder, sampling = decoder or self.decoder, sampling or Sampling()
        if not (continuous and decoder.joins(sampling)):
            start = 0
            for images, prompts in batches:
                sink = None if on_token is None else _offset(on_token, start)
                yield (
                    decoder.generate(self.llm_inputs(images, prompts), max_new_tokens, sampling, sink)
                    if prompts
                    else []
                )
                start += len(prompts)
            return
        waiting: deque[list] = deque()  # per batch read: [its tokens per row, rows still decoding]

        def rows() -> Iterator[Row]:
            start = 0
            for images, prompts in batches:
                entry: list = [[[] for _ in prompts], len(prompts)]
                waiting.append(entry)
                if not prompts:
                    continue
                sink = decoder.collector(entry[0], None if on_token is None else _offset(on_token, start))

                def leave(entry: list = entry) -> None:
                    entry[1] -= 1

                sinks = [functools.partial(sink, i) for i in range(len(prompts))]
                yield from split_rows(self.llm_inputs(images, prompts), max_new_tokens, sinks, leave)
                start += len(prompts)

        for _ in decoder.continuous(rows(), self.batch_size):
            while waiting and waiting[0][1] == 0:
                yield waiting.popleft()[0]
        while waiting:  # batches with no rows left to decode
            yield waiting.popleft()[0]

    def llm_inputs(self, images: Any, prompts: Sequence[Prompt]) -> LLMInputs:
        """What the LLM reads for a batch of (image, prompt) pairs: the visual prompt joined with the text."""
        visual = self.visual(images, [p.qformer_text for p in prompts])
        prefix = self.model.visual_prompt(visual)  # (b, Q, Dl)
        ids, mask = self.text.llm_batch([p.llm_ids for p in prompts])
        return self.model.llm_inputs(prefix, ids.to(self.device), mask.to(self.device))

    def generate(
        self,
        images: Images | Tensor | Visual,
        prompts: Sequence[str],
        max_new_tokens: int = 30,
        num_beams: int = 1,
        **generate_kwargs: Any,
    ) -> list[str]:
        """One answer per (image, prompt) pair; ``generate_kwargs`` as transformers' ``generate`` takes them
        (``do_sample``, ``temperature``, ``top_p``, ...)."""
        self.require_llm()
        fitted = [self.text.prompt(p, max_new_tokens) for p in prompts]
        sampling = Sampling.from_kwargs(num_beams, **generate_kwargs)
        return [self.text.decode(t) for t in self.complete(images, fitted, max_new_tokens, sampling)]

    def caption(
        self,
        images: Images | Tensor,
        prompt: str | None = None,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Describe each image; ``prompt`` (e.g. "a photo of") is continued by the model."""
        self.require_llm()
        items = self._items(images)
        text = self.text.caption_prompt(prompt)
        return self.generate(items, [text] * len(items), max_new_tokens, num_beams, **generate_kwargs)

    def ask(
        self, image: ImageInput, question: str, max_new_tokens: int | None = None, **generate_kwargs: Any
    ) -> str:
        """Answer a question about one image ("Question: {q} Answer:" style prompt, or the chat template)."""
        self.require("ask")
        n = max_new_tokens or self.config.prompts.vqa_max_new_tokens
        return self.generate([image], [self.text.question(question)], n, **generate_kwargs)[0]

    def chat(self, image: ImageInput, max_new_tokens: int = 30, reuse_cache: bool = True) -> Chat:
        """A conversation about one image that remembers earlier turns (``reuse_cache``: see ``Chat``)."""
        return Chat(self, image, max_new_tokens, reuse_cache)

    # --- retrieval ------------------------------------------------------------------------------------------
    def _image_batches(self, images: Images | Tensor) -> list[Tensor]:
        """Vision features (b, P, Dv) of each batch of ``images``."""
        items = self._items(images)
        return [
            self.model.encode_image(self.pixel_values(items[i : i + self.batch_size]))
            for i in range(0, len(items), self.batch_size)
        ]

    @torch.inference_mode()
    def image_features(self, images: Images | Tensor) -> Tensor:
        """The frozen vision encoder's features (N, P, Dv), in batches of ``batch_size``."""
        return torch.cat(self._image_batches(images))

    @torch.inference_mode()
    def image_query_embeddings(self, images: Images | Tensor) -> Tensor:
        """Image embeddings (N, K, E), L2-normalised: one per query (BLIP-2's ITC); K = 1 (dual encoders)."""
        self.require("embed")
        return torch.cat([self.model.image_embeddings(f) for f in self._image_batches(images)]).float()

    def embed_images(self, images: Images | Tensor) -> Tensor:
        """One embedding per image (N, E): for BLIP-2 the normalised mean of its query embeddings.

        ``similarity`` uses the exact BLIP-2 score (max over queries); this single vector is for indexes and
        clustering.
        """
        return torch.nn.functional.normalize(self.image_query_embeddings(images).mean(dim=1), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: str | Sequence[str]) -> Tensor:
        """Text embeddings (N, E) in the images' space, L2-normalised."""
        self.require("embed")
        texts = [texts] if isinstance(texts, str) else list(texts)
        parts = []
        for i in range(0, len(texts), self.batch_size):
            ids, mask = map(self._to_device, self.text.qformer_batch(texts[i : i + self.batch_size]))
            parts.append(self.model.text_embeddings(ids, mask))
        return torch.cat(parts).float()

    def similarity(self, images: Images | Tensor, texts: str | Sequence[str]) -> Tensor:
        """Cosine similarity (N_img, N_txt); BLIP-2: for each pair, the max over the image's queries (ITC)."""
        img = self.image_query_embeddings(images)  # (N, Q, E)
        txt = self.embed_texts(texts)  # (M, E)
        return torch.einsum("nqe,me->nqm", img, txt).amax(dim=1)

    @torch.inference_mode()
    def match(self, images: Images | Tensor, texts: str | Sequence[str]) -> Tensor:
        """Probability (N_img, N_txt) that the text matches the image: BLIP-2's ITM head, SigLIP's sigmoid."""
        self.require("match")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids, mask = map(self._to_device, self.text.qformer_batch(texts))  # (M, T)
        rows = []
        for feats in self._image_batches(images):  # (b, P, Dv)
            b, M = feats.shape[0], ids.shape[0]
            pair_feats = feats.repeat_interleave(M, dim=0)  # (b*M, P, Dv)
            probs = self.model.match_probs(pair_feats, ids.repeat(b, 1), mask.repeat(b, 1))  # (b*M,)
            rows.append(probs.view(b, M))
        return torch.cat(rows).float()

    def classify(
        self, images: Images | Tensor, labels: Sequence[str], template: str | None = None
    ) -> list[dict[str, float]]:
        """Zero-shot classification with the model's own scoring: BLIP-2 and CLIP a softmax over the labels of
        the scaled similarity (probabilities sum to 1); SigLIP a sigmoid per label (each on its own).

        ``template`` (e.g. "a photo of {}") wraps each label; default: the model's ``prompts.classify``."""
        labels = list(labels)
        template = self.config.prompts.classify if template is None else template
        if not labels:
            raise UsageError("classify needs at least one label")
        sims = self.similarity(images, [fill(template, label) for label in labels])
        with torch.no_grad():
            probs = self.model.label_probs(sims)
        return [dict(zip(labels, map(float, row), strict=True)) for row in probs]


def _offset(on_token: OnToken, start: int) -> OnToken:
    """``on_token`` for a batch that starts at pair ``start``."""
    return lambda row, token: on_token(start + row, token)


class Chat:
    """Multi-turn chat about one image. ``history`` holds (user, assistant) turns.

    When the visual prompt, the history and the new message would not fit the LLM's context window (or, for
    question-aware models, the Q-Former's), the oldest turns are left out of the prompt (they stay in
    ``history``).

    With ``reuse_cache`` a greedy turn keeps the LLM's keys/values for the next one, which then runs only the
    positions after what its prompt shares with the sequence so far (``blipkit.models.chat_cache``), with the
    same answers as a full recompute; ``cached_tokens`` counts the positions the last turn reused. This needs
    the lean greedy loop (a decoder-only LLM, no sampling or beams) and a visual prompt that does not read
    the text: question-aware models (``bridge.text_input``, such as the embedded ``default``, whose Q-Former
    reads the whole chat each turn) recompute every turn, and a sampled or beam turn drops the cache.
    """

    def __init__(self, model: Model, image: ImageInput, max_new_tokens: int = 30, reuse_cache: bool = True):
        model.require("chat")
        model.require_llm()
        self.model = model
        self.image = model.processor(image)  # decoded once: (1, 3, S, S)
        self.max_new_tokens = max_new_tokens
        self.reuse_cache = reuse_cache
        self.history: list[tuple[str, str]] = []
        self._kv = ChatCache()
        self._prefix: Tensor | None = None  # the visual prompt (1, Q, Dl), computed once when reused

    @property
    def cached_tokens(self) -> int:
        """LLM positions of the last turn's prompt read from the cache (0 when it ran them all)."""
        return self._kv.reused

    def prompt(self, message: str) -> Prompt:
        """The fitted prompt for ``message``."""
        return self.model.text.chat(self.history, message, self.max_new_tokens)

    def send(self, message: str, **generate_kwargs: Any) -> str:
        sampling = Sampling.from_kwargs(**generate_kwargs)
        prompt = self.prompt(message)
        if self.reuse_cache and reusable(self.model.model, self.model.decoder, sampling):
            tokens = self._cached_turn(prompt)
        else:
            self._kv.clear()
            tokens = self.model.complete(self.image, [prompt], self.max_new_tokens, sampling)[0]
        answer = self.model.text.decode(tokens)
        self.history.append((message, answer))
        return answer

    @torch.inference_mode()
    def _cached_turn(self, prompt: Prompt) -> list[int]:
        """Greedy tokens for ``prompt``, from the cache of the earlier turns."""
        m = self.model
        if self._prefix is None:
            self._prefix = m.model.visual_prompt(m.visual(self.image))  # (1, Q, Dl)
        inputs = m.llm_inputs(Visual(prefix=self._prefix), [prompt])
        keys = position_keys(prompt.llm_ids, inputs, m.text.settings.image_token_index)
        return self._kv.generate(m.decoder.lean, m.decoder.eos, inputs, keys, self.max_new_tokens)

    def reset(self) -> None:
        self.history.clear()
        self._kv.clear()
