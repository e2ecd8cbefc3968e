"""LLaVA-family training on cached frozen-tower features, LLaVA's two stages with the shared loop.

- ``llava1`` (feature alignment): the projector alone learns to turn patch features into what the frozen LLM
  reads, on caption requests ("Describe the image briefly." -> "a red circle").
- ``llava2`` (instruction tuning): the projector on easy-VQA questions, "Describe the image." sentences and
  multi-turn conversations that refer back (``blipkit.data.conversations``).

Every prompt is rendered with the model's own template and tokenised by its ``TextProcessor`` exactly as
``Model.ask`` / ``Model.chat`` render and tokenise it at inference; the LM loss is on the assistant answers
(and the end-of-turn token after each) only. The LLM and the tower stay frozen: only the projector trains
(``trainable`` may narrow it to ``projector.linear_2`` etc.). Features come from the same cache as the BLIP-2
trainer's (``blipkit.train.features``): the tower's full output, the CLS row dropped here when the model
reads patches only, ``pool`` applied by the model.

``blipkit train llava1 --config configs/default_llava_stage1.json --out runs/llava/stage1``, then ``llava2``
with ``--init_from=runs/llava/stage1/final``; ``--resume`` continues a run exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from blipkit import loading
from blipkit.convert import blipkit_llava
from blipkit.data import conversations as conv
from blipkit.data.sources import EASY_VQA, read_examples
from blipkit.errors import ConfigError
from blipkit.models.blip2 import Visual
from blipkit.models.llava import Llava, LlavaConfig
from blipkit.processing import ImageProcessor
from blipkit.text import TextProcessor
from blipkit.train import batches
from blipkit.train.config import TrainConfig
from blipkit.train.distributed import DistEnv
from blipkit.train.features import cached_features
from blipkit.train.loop import Trainer, make_optimizer
from blipkit.train.schedule import DataOrder, lr_factor

STAGE_KINDS = {"llava1": ("caption",), "llava2": ("vqa", "caption", "describe", "chat")}
DEFAULT_NAMES = ("default", "default-llava")


def llava_model_config(cfg: TrainConfig) -> LlavaConfig:
    """The architecture: ``default-llava`` (``blipkit_llava.default_config``) or a JSON file holding a
    ``LlavaConfig`` (or a blipkit LLaVA checkpoint's config.json); ``pool`` > 0 overrides its pooling."""
    if cfg.model in DEFAULT_NAMES:
        model_cfg = blipkit_llava.default_config()
    elif cfg.model.endswith(".json"):
        raw = loading.read_config(Path(cfg.model))
        model_cfg = LlavaConfig.from_dict(raw.get("config", raw), source=cfg.model)
    else:
        raise ConfigError(
            f"llava stages: model must be 'default-llava' or a LLaVA config JSON, got {cfg.model!r}"
        )
    if cfg.pool:
        model_cfg.pool = cfg.pool
    return model_cfg


class CachedTower(nn.Module):
    """Stands in for the frozen tower while training on cached features: it only reports their layout."""

    def __init__(self, hidden_size: int, num_tokens: int, has_cls: bool):
        super().__init__()
        self.hidden_size, self.num_tokens, self.has_cls = hidden_size, num_tokens, has_cls

    def forward(self, pixel_values: Tensor) -> Tensor:
        raise RuntimeError("training reads cached features (image_embeds); it has no vision tower")


def conversation_tokens(
    text: TextProcessor, turns: tuple[tuple[str, str], ...]
) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation, labels -100 except on the assistant answers.

    Each prompt is the template's rendering of the history so far and the new message, tokenised as
    ``Model.chat`` tokenises it; each answer follows as its own tokens. The token that ends an answer is
    scored too: end-of-sequence after the last answer, and after an earlier one where the rendered history
    puts it there (ChatML's ``<|im_end|>``), so the model learns to stop where generation stops."""
    tok = text.require_llm()
    eos = tok.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for i, (user, answer) in enumerate(turns):
        prompt, _ = text.llm_ids(text.template.render(turns[:i], user))
        if prompt[: len(ids)] != ids:
            raise ValueError(f"turn {i}: the rendered history does not tokenise as the turns before it did")
        rest = prompt[len(ids) :]
        ended = bool(ids) and rest[:1] == [eos]  # the previous answer's end, as the history renders it
        labels += [eos] * ended + [-100] * (len(rest) - ended)
        reply = tok(answer.strip(), add_special_tokens=False)["input_ids"]
        ids = prompt + reply
        labels += reply
    return ids + [eos], labels + [eos]


class LlavaTrainer(Trainer):
    """The shared loop (``Trainer.run``, checkpoints, exact resume, losses.csv / .png) on a ``Llava``."""

    def __init__(
        self, cfg: TrainConfig, out_dir: str | Path, resume: bool = False, env: DistEnv | None = None
    ):
        if cfg.stage not in STAGE_KINDS:
            raise ConfigError(f"LlavaTrainer trains {sorted(STAGE_KINDS)}, not {cfg.stage!r}")
        self._start(cfg, out_dir, env)
        self.model_cfg = llava_model_config(cfg)
        self.teacher = None
        self.model = self._build_model().to(self.device)
        self.trainable = nn.ModuleDict({"projector": self.model.projector})
        self._select_trainable()
        llm_ref = self.model_cfg.llm.tokenizer or self.model_cfg.llm.pretrained
        tokenizer = loading.load_tokenizer(loading.resolve(llm_ref), cfg.trust_remote_code)
        self.text = TextProcessor.for_model(self.model, tokenizer, None)
        self.conversations = self._conversations()
        self.images = read_examples(cfg.data, cfg.image_root)[0]
        position = {path: i for i, path in enumerate(self.images)}
        self.image_index = [position[c.image] for c in self.conversations]
        self.tokens = [conversation_tokens(self.text, c.turns) for c in self.conversations]
        self.features = self._features()
        self.order = DataOrder(len(self.conversations), cfg.batch_size, cfg.seed, cfg.views, cfg.augment_prob)
        self.optimizer = make_optimizer(self.trainable, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        )
        self.step = 0
        self.columns = ["step", "loss", "lm", "lr", "epoch", "samples_per_s"]
        self._prepare_output(resume)

    # --- setup ----------------------------------------------------------------------------------------------
    def _build_model(self) -> Llava:
        """Frozen LLM (fp32; bf16 runs use autocast), a stand-in tower, a fresh or initialised projector."""
        cfg, model_cfg = self.cfg, self.model_cfg
        llm = loading.build_llm(model_cfg.llm, None, None, torch.float32, cfg.trust_remote_code)
        model = Llava(model_cfg, self._cached_tower(), llm)
        if cfg.init_from:
            projector = blipkit_llava.read_projector(Path(cfg.init_from))
            loading.load_strict(model.projector, {k: v.float() for k, v in projector.items()}, cfg.init_from)
        return model

    def _cached_tower(self) -> CachedTower:
        """The layout of the tower's features at the processor's size, from its config (no weights read)."""
        spec, model_cfg = self.model_cfg.vision, self.model_cfg
        if spec.kind != "dinov2" or not spec.pretrained:
            raise ConfigError(
                "llava stages train on cached DINOv2 features: vision.kind 'dinov2' + pretrained"
            )
        raw = loading.read_config(loading.resolve(spec.pretrained) / "config.json")
        size = model_cfg.processor.get("image_size") or raw["image_size"]
        layers = 1 if isinstance(model_cfg.feature_layer, int) else len(model_cfg.feature_layer)
        grid = size // raw["patch_size"]
        return CachedTower(raw["hidden_size"] * layers, grid * grid + (model_cfg.select == "full"), True)

    def _select_trainable(self) -> None:
        prefixes = tuple(p.strip() for p in self.cfg.trainable.split(",") if p.strip())
        if not prefixes:
            return
        for name, param in self.trainable.named_parameters():
            param.requires_grad_(name.startswith(prefixes))
        if not any(p.requires_grad for p in self.trainable.parameters()):
            raise ConfigError(f"trainable={self.cfg.trainable!r} matches no parameter of the projector")

    def _conversations(self) -> list[conv.Conversation]:
        cfg = self.cfg
        if not cfg.data.startswith(EASY_VQA):
            raise ConfigError(
                f"llava stages build conversations from easy-VQA (data 'easy-vqa:train'), not {cfg.data!r}"
            )
        kinds = [k.strip() for k in cfg.conversation_kinds.split(",") if k.strip()] or STAGE_KINDS[cfg.stage]
        return conv.conversations(cfg.data[len(EASY_VQA) :], kinds, cfg.chats_per_image, cfg.seed)

    def _features(self) -> np.ndarray:
        """The tower's full output per (image, view), shared with the BLIP-2 trainer's cache."""
        from blipkit import assets

        cfg, model_cfg = self.cfg, self.model_cfg
        root = Path(cfg.feature_cache) if cfg.feature_cache else assets.cache_dir() / "features"
        layer = model_cfg.feature_layer
        name = model_cfg.vision.pretrained or model_cfg.vision.kind
        if layer != -1:
            name += f"@layer{layer}/full"

        def make_encoder() -> nn.Module:
            from blipkit.models.towers import build_tower

            source = loading.resolve(model_cfg.vision.pretrained)
            return build_tower(model_cfg.vision.kind, source=source, feature_layer=layer, select="full")

        processor = ImageProcessor.from_dict(model_cfg.processor)
        return cached_features(
            make_encoder,
            self.images,
            processor,
            root,
            name,
            cfg.views,
            cfg.seed,
            self.env.is_main,
            self.env.barrier,
            augment=self.cfg.augment,
        )

    # --- one step -------------------------------------------------------------------------------------------
    def _image_embeds(self, examples: np.ndarray, views: np.ndarray) -> Tensor:
        rows = [self.features[self.image_index[e], v] for e, v in zip(examples, views, strict=True)]
        feats = torch.from_numpy(np.stack(rows)).float().to(self.device)  # (G, P+1, Dv)
        return feats[:, 1:] if self.model_cfg.select == "default" else feats  # the tower's output

    def train_step(self, step: int) -> dict[str, float]:
        examples = self.order.examples(step)
        image_embeds = self._image_embeds(examples, self.order.feature_views(step))
        rows = self._rows()
        ids, mask = self.text.llm_batch([self.tokens[e][0] for e in examples])
        labels, _ = self.text.llm_batch([self.tokens[e][1] for e in examples])
        labels = labels.masked_fill(mask == 0, -100)
        count = int((labels != -100).sum())  # scored tokens of the global batch
        mask, ids, labels = (t.to(self.device) for t in batches.trim(mask[rows], ids[rows], labels[rows]))
        self.trainable.train()
        bf16 = self.cfg.precision == "bf16"
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        with autocast:
            prefix = self.model.visual_prompt(Visual(image_embeds=image_embeds[rows]))  # (b, P, Dl)
            inputs = self.model.llm_inputs(prefix, ids, mask)  # (b, T + P - 1, Dl)
            loss = self.model.lm_loss(inputs, labels, reduction="sum") / count
        lr = self._apply(loss)
        value = loss.detach().float().reshape(1)
        if self.env.enabled:
            torch.distributed.all_reduce(value)
        return {"loss": float(value), "lm": float(value), "lr": lr}

    # --- saving ---------------------------------------------------------------------------------------------
    def export(self) -> Path:
        """The final LLaVA checkpoint (fp32) and, with ``export_fp16``, the half-size copy to ship."""
        final = self.out / "final"
        if self.env.is_main:
            blipkit_llava.save_checkpoint(self.model, final)
            if self.cfg.export_fp16:
                blipkit_llava.save_checkpoint(self.model, self.out / "final-fp16", fp16=True)
        self.env.barrier()
        return final
