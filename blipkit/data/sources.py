"""Turn a data spec into training examples: "easy-vqa:train", a captions .jsonl/.csv, a VQA .jsonl, webdataset
.tar shards or .parquet files (a path or a glob, "shards/*.tar"), an imagefolder or ``save_to_disk`` dir, or
"hf:NAME[:SPLIT]" (a Hugging Face dataset: a hub id or a dir; split "train" by default)."""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blipkit.data import easy_vqa, formats
from blipkit.data.files import DataError, is_vqa_file, read_captions, read_vqa, sample_examples
from blipkit.data.records import CaptionExample, VqaExample

EASY_VQA = "easy-vqa:"
HF = "hf:"
GLOB = ("*", "?", "[")


@dataclass
class TrainingSet:
    """Parallel lists, one entry per example; ``images`` fixes the order of the cached image features."""

    images: list[str]  # unique image paths
    image_index: list[int] = field(default_factory=list)  # example -> position in ``images``
    prompts: list[str] = field(default_factory=list)  # stage 1: the caption; stage 2: the LLM prompt
    targets: list[str | None] = field(default_factory=list)  # stage 2: the text the LLM must produce
    captions: list[str | None] = field(default_factory=list)  # the image's caption, when known

    def __len__(self) -> int:
        return len(self.image_index)

    def add(self, image: str, prompt: str, target: str | None, caption: str | None) -> None:
        self.image_index.append(self._position[image])
        self.prompts.append(prompt)
        self.targets.append(target)
        self.captions.append(caption)

    def __post_init__(self) -> None:
        self._position = {path: i for i, path in enumerate(self.images)}


def held_samples(spec: str) -> Iterator[formats.Sample] | None:
    """The samples (with metadata) of a spec naming shards, parquet files or a Hugging Face dataset; None for
    other specs (files of rows)."""
    if spec.startswith(HF):
        name, _, split = spec[len(HF) :].partition(":")
        return formats.hf_samples(name, split or "train")
    if Path(spec).is_dir():
        return formats.hf_samples(spec)
    if not Path(spec).exists() and any(c in spec for c in GLOB):
        paths = sorted(glob.glob(spec))
        if not paths:
            raise DataError(f"{spec}: no files match")
    elif formats.kind_of(spec) in formats.CONTAINERS:
        paths = [spec]
    else:
        return None
    others = sorted({p for p in paths if formats.kind_of(p) not in formats.CONTAINERS})
    if others:
        raise DataError(f"{spec}: expected webdataset .tar shards or .parquet files, got {others[0]}")
    return formats.Inputs(tuple(paths)).samples(meta=True)


def read_examples(spec: str, image_root: str | None = None) -> tuple[list[str], list]:
    """(image paths, examples) of a data spec; the examples are CaptionExample or VqaExample."""
    if spec.startswith(EASY_VQA):
        split = spec[len(EASY_VQA) :]
        images = sorted(set(easy_vqa.image_paths(split).values()))
        return images, easy_vqa.vqa_examples(split)
    samples = held_samples(spec)
    if samples is not None:
        examples = sample_examples(samples, spec)
    else:
        examples = read_vqa(spec, image_root) if is_vqa_file(spec) else read_captions(spec, image_root)
    return sorted({e.image for e in examples}), examples


def image_captions(examples: list) -> list[CaptionExample]:
    """One example per distinct (image, caption) pair, in first-seen order."""
    seen: dict[tuple[str, str], None] = {}
    for e in examples:
        if e.caption:
            seen.setdefault((e.image, e.caption), None)
    return [CaptionExample(image, caption) for image, caption in seen]


def stage1_set(spec: str, image_root: str | None = None) -> TrainingSet:
    """Image-caption pairs (VQA data contributes the captions its rows carry)."""
    images, examples = read_examples(spec, image_root)
    captions = image_captions(examples)
    if not captions:
        raise DataError(f"{spec}: stage 1 needs captions, and none were found")
    out = TrainingSet(images)
    for e in captions:
        out.add(e.image, e.caption, None, e.caption)
    return out


def stage2_set(
    spec: str,
    vqa_template: str,
    caption_prompt: str,
    image_root: str | None = None,
    with_captions: bool = False,
    caption_prompts: Sequence[str] = (),
) -> TrainingSet:
    """(prompt, target) pairs: VQA rows as ``vqa_template.format(question) -> answer``, captions as
    ``caption_prompt -> caption`` (for VQA data only with ``with_captions``); with ``caption_prompts``
    each caption also comes once after one of them in turn ("a photo of" -> "a red circle")."""
    images, examples = read_examples(spec, image_root)
    out = TrainingSet(images)
    vqa = [e for e in examples if isinstance(e, VqaExample)]
    for e in vqa:
        out.add(e.image, vqa_template.format(e.question.strip()), e.answer, e.caption)
    if with_captions or not vqa:
        captions = image_captions(examples)
        for e in captions:
            out.add(e.image, caption_prompt, e.caption, e.caption)
        for k, e in enumerate(captions if caption_prompts else []):
            prompt = caption_prompts[k % len(caption_prompts)]
            out.add(e.image, prompt, easy_vqa.continue_caption(prompt, e.caption), e.caption)
    return out
