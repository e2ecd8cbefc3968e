"""The training loop shared by both stages: cached features in, AdamW with warm-up + cosine, checkpoints,
exact ``--resume``, losses to CSV and a PNG plot; on the main process a tqdm bar on a terminal and TensorBoard
scalars in ``OUT/tensorboard`` (``blipkit.train.logging``).

Single process: ``blipkit train stage2 --config configs/default_stage2.json --out runs/stage2``.
Several: ``torchrun --nproc_per_node 2 -m blipkit.train stage2 --config ... --out ...``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from blipkit import loading
from blipkit.config import Blip2Config, get_config
from blipkit.data.sources import TrainingSet, stage1_set, stage2_set
from blipkit.errors import ConfigError, ResumeError
from blipkit.models.blip2 import Blip2, Visual
from blipkit.processing import ImageProcessor
from blipkit.text import TextProcessor
from blipkit.train import batches
from blipkit.train.config import TrainConfig
from blipkit.train.distributed import DistEnv, init_distributed, sum_gradients
from blipkit.train.features import cached_features
from blipkit.train.init import init_qformer_from_bert
from blipkit.train.logging import NOT_LOSSES, RunLog, check_settings
from blipkit.train.schedule import DataOrder, lr_factor
from blipkit.train.stage1 import TextBatch, stage1_losses
from blipkit.train.stage2 import (
    embedding_scale,
    relative_distance,
    slot_targets,
    warm_start_loss,
)

RESUME_FILE = "resume.json"  # step, scheduler, optimiser hyperparameters, config; names the tensors file
RESUME_TENSORS = "resume-{step:08d}.safetensors"  # trainable weights, optimiser state, RNG state
LEGACY_RESUME_FILE = "resume.pt"  # the pickle of older versions: never loaded
LOSSES_FILE = "losses.csv"
PLOT_FILE = "losses.png"


def model_config(cfg: TrainConfig) -> Blip2Config:
    """The architecture: a shipped config name or a model-config JSON file."""
    if cfg.model.endswith(".json"):
        return Blip2Config.from_json(cfg.model)
    return get_config(cfg.model)


def build_training_model(cfg: TrainConfig, model_cfg: Blip2Config) -> Blip2:
    """Frozen LLM (fp32; bf16 runs use autocast) + fresh or initialised Q-Former and bridge."""
    llm = loading.build_llm(model_cfg.llm, None, None, torch.float32, cfg.trust_remote_code)
    model = Blip2(model_cfg, nn.Identity(), llm)  # images come from the feature cache
    if cfg.init_from:
        load_trained(model, cfg.init_from)
    elif cfg.qformer_init:
        init_qformer_from_bert(model.qformer, loading.resolve(cfg.qformer_init))
    return model


def load_trained(model: Blip2, checkpoint: str | Path) -> None:
    """The Q-Former and bridge weights of a blipkit checkpoint dir, strictly (fp32)."""
    trained = loading.read_state_dict(Path(checkpoint) / loading.BRIDGE_FILE)
    # floats to fp32; anything else stays as it is, for the strict check to name it
    trained = {k: v.float() if v.is_floating_point() else v for k, v in trained.items()}
    qformer = {k[len("qformer.") :]: v for k, v in trained.items() if k.startswith("qformer.")}
    loading.load_strict(model.qformer, qformer, f"Q-Former weights of {checkpoint}")
    bridge = {k[len("bridge.") :]: v for k, v in trained.items() if k.startswith("bridge.")}
    if bridge and model.has_llm:
        loading.load_strict(model.bridge, bridge, f"bridge weights of {checkpoint}")


def build_teacher(model: Blip2, checkpoint: str | Path) -> Blip2:
    """A frozen copy of ``checkpoint``'s Q-Former and bridge that shares ``model``'s (frozen) LLM."""
    if not model.has_llm:
        raise ConfigError("teacher: the keep loss compares visual prompts, and this model has no LLM")
    teacher = copy.deepcopy(model, memo={id(model.llm): model.llm})  # the LLM is shared, not copied
    load_trained(teacher, checkpoint)
    teacher.qformer.requires_grad_(False)
    teacher.bridge.requires_grad_(False)
    return teacher.eval()


def trainable_parts(model: Blip2) -> nn.ModuleDict:
    parts = {"qformer": model.qformer}
    if model.has_llm:
        parts["bridge"] = model.bridge
    return nn.ModuleDict(parts)


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases / norms / the temperature do not (LAVIS)."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


class Trainer:
    def _apply(self, loss: Tensor) -> float:
        """One optimiser step on ``loss``: backward, gradients summed over processes, clipped; returns the
        learning rate the step used."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sum_gradients(self.trainable, self.env)
        if self.cfg.grad_clip:
            params = [p for p in self.trainable.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        return lr

    def _start(self, cfg: TrainConfig, out_dir: str | Path, env: DistEnv | None) -> None:
        """What every trainer sets up first: config, output dir, processes, threads, seed, device."""
        self.cfg, self.out = cfg, Path(out_dir)
        check_settings(cfg)
        self.env = env or init_distributed()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.batch_size % self.env.world_size:
            raise ConfigError(
                f"batch_size {cfg.batch_size} is not divisible by {self.env.world_size} processes"
            )
        torch.manual_seed(cfg.seed)
        self.device = torch.device(f"cuda:{self.env.local_rank}" if torch.cuda.is_available() else "cpu")

    def __init__(
        self, cfg: TrainConfig, out_dir: str | Path, resume: bool = False, env: DistEnv | None = None
    ):
        self._start(cfg, out_dir, env)
        self.model_cfg = model_config(cfg)
        self.model_cfg.qformer.max_text_tokens = cfg.max_text_tokens  # recorded in the checkpoints
        self.model = build_training_model(cfg, self.model_cfg).to(self.device)
        self.teacher = build_teacher(self.model, cfg.teacher) if cfg.teacher else None
        if self.teacher is not None:  # the keep loss's unit; the word embeddings are frozen
            self.keep_scale = embedding_scale(self.model.llm.get_input_embeddings().weight)
        self.trainable = trainable_parts(self.model)
        if cfg.trainable:
            prefixes = tuple(p.strip() for p in cfg.trainable.split(",") if p.strip())
            for name, param in self.trainable.named_parameters():
                param.requires_grad_(name.startswith(prefixes))
            if not any(p.requires_grad for p in self.trainable.parameters()):
                raise ConfigError(
                    f"trainable={cfg.trainable!r} matches no parameter of the Q-Former or bridge"
                )
        self.data = self._training_set()
        self.features = self._features()
        self.order = DataOrder(len(self.data), cfg.batch_size, cfg.seed, cfg.views, cfg.augment_prob)
        trust = cfg.trust_remote_code
        self.qformer_tok = loading.load_tokenizer(loading.resolve(self.model_cfg.qformer_tokenizer), trust)
        self.llm_tok = None
        if self.model.has_llm:
            llm_ref = self.model_cfg.llm.tokenizer or self.model_cfg.llm.pretrained
            self.llm_tok = loading.load_tokenizer(loading.resolve(llm_ref), trust)
        self.text = TextProcessor(self.model_cfg, self.llm_tok, self.qformer_tok)
        self.vocabulary = (
            self._caption_vocabulary() if cfg.stage == "stage2" and cfg.warm_start_steps else None
        )
        self.optimizer = make_optimizer(self.trainable, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        )
        self.step = 0
        names = self._loss_names()
        if not set(names) - {"warm_start"} and cfg.max_steps > cfg.warm_start_steps:
            raise ConfigError(f"loss_weights={cfg.loss_weights!r} leaves no loss after the warm start")
        self.columns = ["step", "loss", *names, "lr", "epoch", "samples_per_s"]
        self._prepare_output(resume)

    # --- setup ----------------------------------------------------------------------------------------------
    def _loss_names(self) -> list[str]:
        stage1 = ["itc", "itm", "itg"]
        if self.cfg.stage == "stage1":
            return stage1
        warm = ["warm_start"] if self.cfg.warm_start_steps else []
        lm = ["lm"] if self._weighted("lm") else []
        keep = ["keep"] if self.teacher is not None else []
        return warm + lm + keep + (stage1 if self.cfg.stage1_weight else [])

    def _weighted(self, loss: str) -> bool:
        """False for a loss whose factor in ``loss_weights`` is 0 (used for ``lm``: no LLM forward then)."""
        return self.cfg.loss_weight.get(loss, 1.0) != 0

    def _training_set(self) -> TrainingSet:
        cfg = self.cfg
        if cfg.stage == "stage1":
            return stage1_set(cfg.data, cfg.image_root)
        prompts = self.model_cfg.prompts
        extra = [p.strip() for p in cfg.caption_prompts.split("|") if p.strip()]
        caption = prompts.caption or ""
        return stage2_set(cfg.data, prompts.vqa, caption, cfg.image_root, cfg.caption_examples, extra)

    def _features(self) -> np.ndarray:
        from blipkit import assets

        root = Path(self.cfg.feature_cache) if self.cfg.feature_cache else assets.cache_dir() / "features"
        vision_cfg = self.model_cfg.vision

        def make_encoder() -> nn.Module:
            return loading.build_vision(vision_cfg, None, None, self.cfg.trust_remote_code).eval()

        processor = ImageProcessor.from_dict(self.model_cfg.processor)
        name = vision_cfg.pretrained or vision_cfg.kind
        if (vision_cfg.feature_layer, vision_cfg.select) != (-1, "full"):  # other features of the same tower
            name += f"@layer{vision_cfg.feature_layer}/{vision_cfg.select}"
        return cached_features(
            make_encoder,
            self.data.images,
            processor,
            root,
            name,
            self.cfg.views,
            self.cfg.seed,
            self.env.is_main,
            self.env.barrier,
            augment=self.cfg.augment,
        )

    def _warm_start_texts(self, examples) -> tuple[list[str], list[str]]:
        """(captions, targets) of the examples; missing captions are an error when they are needed."""
        captions = [self.data.captions[e] for e in examples]
        if self.cfg.warm_start_text != "target" and not all(captions):
            raise ConfigError("the warm start spells captions, and some images have none (warm_start_text)")
        return [c or "" for c in captions], [self.data.targets[e] or "" for e in examples]

    def _caption_vocabulary(self) -> Tensor:
        """The LLM token ids the warm start may ask for (the cross-entropy's candidates)."""
        captions, targets = self._warm_start_texts(range(len(self.data)))
        texts = sorted(set(captions) | set(targets)) if self.cfg.warm_start_text == "both" else None
        texts = texts or sorted(set(captions if self.cfg.warm_start_text == "caption" else targets))
        ids, mask = self.text.word_tokens(texts)
        return torch.unique(ids[mask.bool()]).to(self.device)

    def _warm_start_targets(self, examples, num_queries: int) -> Tensor:
        """(b, Q) LLM token per prompt position: caption tokens, target tokens, or the first half of each."""
        captions, targets = self._warm_start_texts(examples)
        mode = self.cfg.warm_start_text
        if mode != "both":
            ids, mask = self.text.word_tokens(captions if mode == "caption" else targets)
            return slot_targets(ids, mask, num_queries).to(self.device)
        half = num_queries // 2
        first = slot_targets(*self.text.word_tokens(captions), half)
        second = slot_targets(*self.text.word_tokens(targets), num_queries - half)
        return torch.cat([first, second], dim=1).to(self.device)

    def _prepare_output(self, resume: bool) -> None:
        saved = (self.out / RESUME_FILE).exists() or (self.out / LEGACY_RESUME_FILE).exists()
        if resume and saved:
            self._load_state(*self._read_state())
        elif saved:
            raise ResumeError(
                f"{self.out} already holds a run; pass --resume to continue it or pick a new --out"
            )
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
            self._truncate_log()
        self.env.barrier()

    def _read_state(self) -> tuple[dict, dict[str, Tensor]]:
        """The saved JSON and the safetensors file it names; nothing is unpickled."""
        file = self.out / RESUME_FILE
        if not file.exists():
            raise ResumeError(
                f"{self.out / LEGACY_RESUME_FILE} is resume state in the pickle format of older blipkit "
                "versions; it is not loaded (unpickling can run code): start the run again in a new --out"
            )
        try:
            state = json.loads(file.read_text())
            name = state["tensors"]
        except (ValueError, KeyError, TypeError) as e:
            raise ResumeError(f"{file} is not blipkit resume state: {e!r}") from None
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise ResumeError(f"{file}: 'tensors' must name a .safetensors file beside it, got {name!r}")
        try:
            return state, load_file(str(self.out / name))
        except (OSError, SafetensorError) as e:
            raise ResumeError(f"{self.out / name} is not a readable safetensors file: {e}") from None

    def _load_state(self, state: dict, tensors: dict[str, Tensor]) -> None:
        try:
            trainable = {k[len("trainable.") :]: v for k, v in tensors.items() if k.startswith("trainable.")}
            self.trainable.load_state_dict(trainable)
            self.optimizer.load_state_dict(_optimizer_state(state["optimizer"], tensors, self.optimizer))
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(tensors["rng.torch"])
            self.step = int(state["step"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ResumeError(f"{self.out / RESUME_FILE} does not fit this run: {e!r}") from None

    def _truncate_log(self) -> None:
        """Keep the logged steps up to the resumed step (a killed run may have logged past its checkpoint)."""
        log = self.out / LOSSES_FILE
        if not log.exists():
            return
        rows = list(csv.DictReader(log.open()))
        kept = [r for r in rows if int(r["step"]) <= self.step]
        if len(kept) != len(rows) or self.step == 0:
            self._write_rows(kept if self.step else [], mode="w")

    # --- one step -------------------------------------------------------------------------------------------
    def _image_embeds(self, examples: np.ndarray, views: np.ndarray) -> Tensor:
        rows = [self.features[self.data.image_index[e], v] for e, v in zip(examples, views, strict=True)]
        return torch.from_numpy(np.stack(rows)).float().to(self.device)  # (G, P, Dv)

    def _caption_batch(self, examples: np.ndarray) -> TextBatch:
        captions = [self.data.captions[e] or "" for e in examples]
        ids, mask = self.text.qformer_batch(captions)
        names = {c: i for i, c in enumerate(sorted(set(captions)))}
        group = torch.tensor([names[c] for c in captions])
        return TextBatch(ids.to(self.device), mask.to(self.device), group.to(self.device), self._rows())

    def _rows(self) -> slice:
        b = self.cfg.batch_size // self.env.world_size
        return slice(self.env.rank * b, (self.env.rank + 1) * b)

    def _stage1(self, examples: np.ndarray, image_embeds: Tensor, step: int) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        losses = stage1_losses(
            self.model.qformer,
            image_embeds,
            self._caption_batch(examples),
            self.env,
            generator,
            self.cfg.label_smoothing,
        )
        return {name: s / n for name, (s, n) in vars(losses).items()}

    def _visual(self, examples: np.ndarray, image_embeds: Tensor) -> Visual:
        """This process's image features (b, P, Dv) and Q-Former prompt tokens (b, T)."""
        rows = self._rows()
        prompts = [self.data.prompts[e] for e in examples[rows]]
        ids, mask = self.text.qformer_batch(prompts)
        return Visual(
            image_embeds=image_embeds[rows],
            qformer_input_ids=ids.to(self.device),
            qformer_attention_mask=mask.to(self.device),
        )

    def _keep(self, visual: Visual, prefix: Tensor, examples: np.ndarray) -> Tensor:
        """Mean relative distance of the visual prompt tokens to the teacher's on the same inputs (with
        ``keep_plain_view``: on the plain view of the same images, so augmented views learn its prompt)."""
        if self.cfg.keep_plain_view:
            plain = self._image_embeds(examples, np.zeros(len(examples), dtype=np.int64))[self._rows()]
            visual = dataclasses.replace(visual, image_embeds=plain)
        with torch.no_grad():
            target = self.teacher.visual_prompt(visual)  # (b, Q, Dl)
        return relative_distance(prefix, target, self.keep_scale) / (self.cfg.batch_size * prefix.shape[1])

    def _stage2(self, examples: np.ndarray, image_embeds: Tensor, step: int) -> dict[str, Tensor]:
        cfg, rows = self.cfg, self._rows()
        visual = self._visual(examples, image_embeds)
        prefix = self.model.visual_prompt(visual)  # (b, Q, Dl)
        losses = {"keep": self._keep(visual, prefix, examples)} if self.teacher is not None else {}
        if step < cfg.warm_start_steps:
            targets = self._warm_start_targets(examples[rows], prefix.shape[1])  # (b, Q)
            table = self.model.llm.get_input_embeddings().weight
            total = warm_start_loss(prefix, targets, table, self.vocabulary, cfg.warm_start_mse_weight)
            losses["warm_start"] = total / (cfg.batch_size * prefix.shape[1])
        elif self._weighted("lm"):
            prompts = [self.data.prompts[e] for e in examples]
            targets = [self.data.targets[e] for e in examples]
            encdec = self.model.is_encoder_decoder
            ids, mask, labels = self.text.lm_batch(prompts, targets, cfg.max_text_tokens, encdec)
            count = int((labels != -100).sum())  # scored tokens of the global batch
            local = batches.trim(mask[rows], ids[rows], labels[rows])
            mask, ids, labels = (t.to(self.device) for t in local)
            inputs = self.model.llm_inputs(prefix, ids, mask)  # (b, Q+T, Dl)
            losses["lm"] = self.model.lm_loss(inputs, labels, reduction="sum") / count
        if cfg.stage1_weight:
            extra = self._stage1(examples, image_embeds, step)
            losses.update({k: v * cfg.stage1_weight for k, v in extra.items()})
        return losses

    def train_step(self, step: int) -> dict[str, float]:
        examples = self.order.examples(step)
        image_embeds = self._image_embeds(examples, self.order.feature_views(step))
        self.trainable.train()
        bf16 = self.cfg.precision == "bf16"
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else None
        with autocast or contextlib.nullcontext():
            if self.cfg.stage == "stage1":
                losses = self._stage1(examples, image_embeds, step)
            else:
                losses = self._stage2(examples, image_embeds, step)
        total = sum(self.cfg.loss_weight.get(k, 1.0) * v for k, v in losses.items())
        lr = self._apply(total)
        values = torch.stack([v.detach().float() for v in (total, *losses.values())])
        if self.env.enabled:
            torch.distributed.all_reduce(values)
        row = {"loss": float(values[0])} | {k: float(v) for k, v in zip(losses, values[1:], strict=True)}
        return row | {"lr": lr}

    # --- the run --------------------------------------------------------------------------------------------
    def run(self, on_step: Callable[[int, dict], None] | None = None) -> Path:
        """Train from ``self.step`` to ``max_steps``; returns the final blipkit checkpoint dir."""
        cfg = self.cfg
        log = RunLog(cfg, self.out, self.step, self.env.is_main)
        start, first = time.perf_counter(), self.step
        try:
            while self.step < cfg.max_steps:
                row = self.train_step(self.step)
                self.step += 1
                elapsed = time.perf_counter() - start
                rate = (self.step - first) * cfg.batch_size / elapsed
                row = {"step": self.step, **row, "epoch": self.order.epoch(self.step), "samples_per_s": rate}
                if self.env.is_main:
                    self._write_rows([row])
                    log.step(row)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                    self.save()
                    log.flush()
                if on_step is not None:
                    on_step(self.step, row)
        finally:
            log.close()
        return self.export()

    # --- saving ---------------------------------------------------------------------------------------------
    def _write_rows(self, rows: list[dict], mode: str = "a") -> None:
        log = self.out / LOSSES_FILE
        new = mode == "w" or not log.exists()
        with log.open(mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore", restval="")
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def save(self) -> None:
        """Resumable state (weights, optimiser, scheduler, RNG, step) and a loadable blipkit checkpoint."""
        if not self.env.is_main:
            return
        optimizer, tensors = _split_optimizer_state(self.optimizer.state_dict())
        tensors |= {f"trainable.{k}": v for k, v in self.trainable.state_dict().items()}
        tensors["rng.torch"] = torch.get_rng_state()
        name = RESUME_TENSORS.format(step=self.step)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _write_atomically(self.out / name, lambda tmp: save_file(tensors, str(tmp)))
        state = {
            "step": self.step,
            "tensors": name,
            "scheduler": self.scheduler.state_dict(),
            "optimizer": optimizer,
            "config": self.cfg.to_dict(),
        }
        # the JSON names the tensors file and is written last: a kill before it keeps the previous state
        _write_atomically(self.out / RESUME_FILE, lambda tmp: tmp.write_text(json.dumps(state, indent=1)))
        for old in self.out.glob(RESUME_TENSORS.replace("{step:08d}", "*")):
            if old.name != name:
                old.unlink(missing_ok=True)
        loading.save_checkpoint(self.model, self.out / "checkpoint")
        plot_losses(self.out / LOSSES_FILE, self.out / PLOT_FILE)

    def export(self) -> Path:
        """The final blipkit checkpoint (fp32) and, with ``export_fp16``, a half-size copy to ship."""
        final = self.out / "final"
        if self.env.is_main:
            loading.save_checkpoint(self.model, final)
            if self.cfg.export_fp16:
                from blipkit.train.export import export_fp16

                export_fp16(final, self.out / "final-fp16")
        self.env.barrier()
        return final


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path`` (a kill leaves old or new)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _split_optimizer_state(state: dict) -> tuple[dict, dict[str, Tensor]]:
    """An optimiser ``state_dict`` as JSON (param groups, other state) and ``optimizer.INDEX.KEY`` tensors."""
    tensors, other = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                other.setdefault(str(index), {})[key] = value
    return {"param_groups": state["param_groups"], "state": other}, tensors


def _optimizer_state(saved: dict, tensors: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """Inverse of ``_split_optimizer_state``; tuples that JSON made lists (``betas``) are tuples again."""
    state: dict[int, dict] = {int(i): dict(entry) for i, entry in saved["state"].items()}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    groups = [
        {k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in group.items()}
        for group, current in zip(saved["param_groups"], optimizer.param_groups, strict=True)
    ]
    return {"state": state, "param_groups": groups}


def plot_losses(csv_file: Path, png_file: Path) -> bool:
    """Plot every loss column of the CSV against the step; False when matplotlib is missing.

    A ``Figure`` of its own, not pyplot: the caller's matplotlib backend (a notebook's) is left as it is."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    rows = list(csv.DictReader(csv_file.open())) if csv_file.exists() else []
    if not rows:
        return False
    skip = {"step", *NOT_LOSSES}
    steps = [int(r["step"]) for r in rows]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for key in rows[0]:
        if key in skip:
            continue
        values = [float(r[key]) if r.get(key) else np.nan for r in rows]
        ax.plot(steps, values, label=key, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_file, dpi=100)
    return True
