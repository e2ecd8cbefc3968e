"""Training settings: defaults in one commented dataclass, overridden by a JSON file, then ``--key=value``.

An unknown key is an error that names it; a value is converted to the type of its default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipkit.errors import ConfigError

STAGES = ("stage1", "stage2", "llava1", "llava2")
LLAVA_STAGES = ("llava1", "llava2")  # blipkit.train.llava: the projector of a LLaVA-family model


@dataclass
class TrainConfig:
    # --- what to train --------------------------------------------------------------------------------------
    stage: str = "stage2"  # "stage1" (ITC/ITM/ITG, no LLM) or "stage2" (LM loss through the frozen LLM);
    # "llava1" / "llava2": a LLaVA projector on captions / on VQA + descriptions + chats (blipkit.train.llava)
    model: str = "default"  # architecture: a name in blipkit/configs or a model-config JSON file
    init_from: str | None = None  # blipkit checkpoint dir whose Q-Former (and bridge) start the run
    teacher: str | None = None  # stage 2: checkpoint whose visual prompts the "keep" loss holds the run to
    keep_plain_view: bool = False  # keep loss: the teacher reads each image's plain view (view 0), so the
    # run's prompts on augmented views learn the teacher's on the plain image (no LLM forward needed)
    qformer_init: str | None = "asset:all-minilm-l6-v2"  # BERT dir for the Q-Former (unused with init_from)
    trainable: str = ""  # comma-separated name prefixes to train (e.g. "qformer.text_proj"); "": all
    trust_remote_code: bool = False  # let the model's transformers dirs run the Python code they ship
    pool: int = 0  # llava stages: average k x k patch blocks before the projector (0: the model config's)
    conversation_kinds: str = ""  # llava stages: "vqa,caption,describe,chat" ("": llava1 caption, llava2 all)
    chats_per_image: int = 1  # llava stages: multi-turn conversations per image
    # --- data -----------------------------------------------------------------------------------------------
    data: str = "easy-vqa:train"  # "easy-vqa:train", captions .jsonl/.csv, or VQA .jsonl; webdataset .tar
    # shards or .parquet files with image bytes (a path or a glob: "shards/*.tar"); an imagefolder dir
    # (metadata.jsonl: file_name, text); "hf:NAME[:SPLIT]" (a Hugging Face dataset: hub id or dir; "train")
    image_root: str | None = None  # where relative image paths start (default: the data file's folder)
    caption_examples: bool = False  # stage 2 on VQA data: also learn "prompts.caption -> caption" per image
    caption_prompts: str = ""  # stage 2 with caption examples: "a photo of|this is|...": each caption also
    # comes once after one of these prompts in turn, continued by its words ("a photo of a" -> "red circle")
    views: int = 1  # cached feature views per image: 1 plain + (views - 1) augmented
    augment: str = "geometry"  # what augmented views change: "geometry" (size, position, flip: the shipped
    # default's recipe) or "scene" (also colour within its name, background, aspect, JPEG: ``scene_view``)
    augment_prob: float = 0.5  # chance that an example uses one of its augmented views
    feature_cache: str | None = None  # default: <blipkit cache dir>/features
    max_text_tokens: int = 64  # Q-Former and LLM texts are cut to this many tokens
    # --- optimisation ---------------------------------------------------------------------------------------
    batch_size: int = 32  # global batch, split evenly over processes
    max_steps: int = 1000
    lr: float = 1e-4  # BLIP-2
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 100  # linear warm-up from 0
    weight_decay: float = 0.05  # BLIP-2
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    precision: str = "fp32"  # or "bf16" autocast: only where bf16 matmuls are native (avx512_bf16, AMX, GPU)
    seed: int = 0
    threads: int = 0  # torch threads per process (0: torch's default)
    # --- losses ---------------------------------------------------------------------------------------------
    label_smoothing: float = 0.1  # ITC (BLIP-2)
    warm_start_steps: int = 0  # stage 2: first steps train the caption-embedding warm start (no LLM)
    warm_start_text: str = (
        "caption"  # what the prompt tokens spell: "caption", "target" or "both" (half each)
    )
    warm_start_mse_weight: float = 1.0
    stage1_weight: float = 0.0  # stage 2: add the stage-1 losses on captions, to keep the retrieval heads
    loss_weights: str = ""  # factors per loss (lm warm_start keep itc itm itg), e.g. "itm=4"; lm=0: no LLM
    # --- bookkeeping ----------------------------------------------------------------------------------------
    checkpoint_every: int = 200  # steps between resumable checkpoints (and a blipkit checkpoint)
    export_fp16: bool = True  # also write the final blipkit checkpoint's weights as fp16 (``final-fp16``)
    progress: bool | str = "auto"  # tqdm bar (loss, samples/s): "auto" on a terminal, "true" also into
    # pipes and log files, "false" never (blipkit.train.logging)
    tensorboard: bool | str = "auto"  # scalars in OUT/tensorboard: "auto" when the tensorboard package is
    # installed, "true" (an error without it) or "false"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.augment not in ("geometry", "scene"):
            raise ConfigError(f"augment must be 'geometry' or 'scene', got {self.augment!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.warm_start_text not in ("caption", "target", "both"):
            raise ConfigError(
                f"warm_start_text must be caption, target or both, got {self.warm_start_text!r}"
            )
        self.betas = tuple(self.betas)
        from blipkit.train.logging import canonical

        self.progress, self.tensorboard = (
            canonical("progress", self.progress),
            canonical("tensorboard", self.tensorboard),
        )
        self.loss_weight = parse_loss_weights(self.loss_weights)
        if self.teacher and self.stage != "stage2":
            raise ConfigError("teacher (the keep loss) is a stage 2 option")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LOSS_NAMES = ("lm", "warm_start", "keep", "itc", "itm", "itg")


def parse_loss_weights(text: str) -> dict[str, float]:
    """``"itm=4,itg=0.25"`` -> {"itm": 4.0, "itg": 0.25}; unknown names and bad numbers are errors."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in LOSS_NAMES:
            raise ConfigError(f"loss_weights: {item!r} is not NAME=FACTOR with NAME one of {LOSS_NAMES}")
        try:
            weights[name.strip()] = float(value)
        except ValueError as e:
            raise ConfigError(f"loss_weights: {value!r} in {item!r} is not a number") from e
    return weights


def _convert(name: str, value: Any, default: Any, optional: bool) -> Any:
    """A ``--key=value`` string in the type of the field's default ("none" for an optional field is None)."""
    if not isinstance(value, str):
        return value
    if optional and value.lower() in ("none", "null"):
        return None
    if isinstance(default, str) or default is None:
        return value
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"--{name} expects true/false, got {value!r}")
    if isinstance(default, (int, float)):
        try:
            return type(default)(value)
        except ValueError as e:
            raise ConfigError(f"--{name} expects a {type(default).__name__}, got {value!r}") from e
    if isinstance(default, tuple):
        return tuple(json.loads(value))
    return value


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, **fixed: Any
) -> TrainConfig:
    """Defaults <- JSON file <- ``--key=value`` overrides <- ``fixed`` (e.g. the stage named on the CLI)."""
    defaults = TrainConfig()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        values.update(json.loads(Path(path).read_text()))
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training key(s) {unknown} in {path}; known: {sorted(known)}")
    for item in overrides or []:
        key, sep, value = item.removeprefix("--").partition("=")
        key = key.replace("-", "_")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form --key=value")
        if key not in known:
            raise ConfigError(f"unknown training key {key!r} (from {item!r}); known: {sorted(known)}")
        optional = "None" in str(TrainConfig.__dataclass_fields__[key].type)
        values[key] = _convert(key, value, getattr(defaults, key), optional)
    values.update(fixed)
    return TrainConfig(**values)
