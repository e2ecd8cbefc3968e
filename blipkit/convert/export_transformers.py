"""A loaded blipkit model as a transformers ``save_pretrained`` dir (``blipkit export --to transformers``).

The key maps are the loaders', inverted: ``hf_blip2.to_hf`` (the inverse of ``hf_blip2.filter_hf``) and
``TO_HF_LLAVA`` (the transformers 5 rows of ``hf_llava.PREFIXES``, turned around). The dir holds
config.json, generation_config.json, model.safetensors, the tokenizer (with its image token), the image
processor (``export_processors``) and the processor ``AutoProcessor`` loads.

What each transformers class represents exactly, and what is refused (``NotRepresentable``, naming the class
that could, or that none can):

- ``Blip2ForConditionalGeneration``: BLIP-2's EVA ViT -> Q-Former over its queries alone -> linear bridge ->
  any transformers causal or seq2seq LM. A Q-Former text path and ITC / ITM / ITG heads, which generation
  never reads, are left out (and reported). Refused: another vision tower under a Q-Former (none can), an
  MLP bridge (none can), a question-aware Q-Former (``InstructBlipForConditionalGeneration`` can), a
  retrieval-only model (``Blip2ForImageTextRetrieval`` can).
- ``LlavaForConditionalGeneration``: a CLIP, SigLIP or DINOv2 tower read at ``hidden_states`` layers, CLS
  dropped or kept -> MLP projector (a linear one is written as linear -> identity -> identity matrix) ->
  any transformers causal LM. blipkit drops the blocks past the deepest layer read, so the tower is written
  that deep and the layers as absolute indices. Refused: DINOv2 read after its final LayerNorm
  (``last_hidden_state``, as ``default-llava`` reads it: transformers' LLaVA reads ``hidden_states``, which
  come before it; none can) and pooled patches (``pool`` > 1; none can).

Where the tokenizer has no image token (the original LLaVA repo's -200, or a BLIP-2 LLM's own tokenizer),
``<image>`` is added; where its id falls past the LLM's embedding rows they get one zero row (the image
positions are overwritten by the visual prompt, so no output changes) and generation suppresses the token.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blipkit.convert import export_processors, hf_blip2, hf_llava
from blipkit.errors import CheckpointError, UsageError

TARGETS = ("transformers",)
IMAGE_TOKEN = "<image>"
BLIP2 = "Blip2ForConditionalGeneration"
LLAVA = "LlavaForConditionalGeneration"

# blipkit key prefixes / parts Blip2ForConditionalGeneration has no place for; generation never reads them
# (its Q-Former runs the queries alone), so they are left out of the export and reported
BLIP2_LEFT_OUT = {
    "qformer.word_embeddings.": "the Q-Former text path",
    "qformer.position_embeddings.": "the Q-Former text path",
    ".text_ffn.": "the Q-Former text path",
    "qformer.vision_proj.": "the ITC/ITM heads",
    "qformer.text_proj.": "the ITC/ITM heads",
    "qformer.itm_head.": "the ITC/ITM heads",
    "qformer.temp": "the ITC/ITM heads",
    "qformer.lm_": "the ITG head",
}
# blipkit prefix -> transformers 5 (in-memory) prefix: the rows of hf_llava.PREFIXES that map the 5.x layout
TO_HF_LLAVA: tuple[tuple[str, str], ...] = tuple(
    (dst, src)
    for src, dst in hf_llava.PREFIXES
    if src in ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head.")
)
# where each tower kind keeps its position embeddings, and whether a CLS row is among them
_POSITIONS = {
    "clip": ("embeddings.position_embedding.weight", 1),
    "siglip": ("embeddings.position_embedding.weight", 0),
    "dinov2": ("embeddings.position_embeddings", 1),
}
BACKBONE_FIELDS = ("stage_names", "out_features", "out_indices")  # DINOv2's backbone outputs, one per block


class NotRepresentable(UsageError):
    """The model has a part the transformers class cannot hold; says what, and which class could."""


@dataclass
class Export:
    """What ``export`` wrote."""

    path: Path
    architecture: str
    num_tensors: int
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: where, as what, and anything left out or added."""
        dtype = str(self.dtype).removeprefix("torch.")
        notes = "".join(f"; {n}" for n in self.notes)
        return f"wrote {self.path} ({self.architecture}, {self.num_tensors} tensors, {dtype}){notes}"


@dataclass
class _Plan:
    """Everything to write, computed before anything is."""

    architecture: str
    config: Any  # the transformers config
    state_dict: dict[str, Tensor]  # transformers (5.x in-memory or saved) names
    tokenizer: Any
    save_processor: Callable[[Path, Any], None]  # (out dir, tokenizer)
    suppress: list[int] = field(default_factory=list)  # token ids generation must not emit
    notes: list[str] = field(default_factory=list)


# --- checks ------------------------------------------------------------------------------------------------
def _refuse(what: str, could: str | None) -> NotRepresentable:
    where = f"{could} represents it; blipkit does not export to it" if could else "no transformers class does"
    return NotRepresentable(f"cannot export to transformers: {what}; {where}")


def _family_model(model: Any) -> Any:
    if not hasattr(model, "model") or not hasattr(model, "tokenizer"):
        raise UsageError(f"export takes a blipkit.Model (blipkit.load), got {type(model).__name__}")
    return model.model


def _check_causal(llm: Any, kind: str) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    mapping = MODEL_FOR_CAUSAL_LM_MAPPING if kind == "causal" else MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
    if type(llm.config) not in mapping:
        raise _refuse(
            f"the language model ({type(llm).__name__}, model_type {llm.config.model_type!r}) is not one of "
            "transformers' own classes (code shipped with a checkpoint)",
            None,
        )


def _check_blip2(model: Any) -> None:
    cfg = model.config
    if model.llm is None:
        raise _refuse(
            f"{BLIP2} needs a language model and this is a retrieval-only model", "Blip2ForImageTextRetrieval"
        )
    if cfg.vision.kind != "eva":
        raise _refuse(
            f"a {cfg.vision.kind} vision tower under a Q-Former ({BLIP2}'s vision model is BLIP-2's EVA ViT, "
            "Blip2VisionModel)",
            None,
        )
    if cfg.bridge.kind != "linear":
        raise _refuse(f"a {cfg.bridge.kind!r} bridge ({BLIP2}'s language_projection is one Linear)", None)
    if model.question_aware:
        raise _refuse(
            f"a question-aware Q-Former (bridge.text_input: the prompt joins the queries), which {BLIP2} "
            "lacks",
            "InstructBlipForConditionalGeneration",
        )
    _check_causal(model.llm, cfg.llm.kind)


def _check_llava(model: Any) -> None:
    cfg, tower = model.config, model.vision
    if tower.final_norm:
        depth = tower.model.config.num_hidden_layers
        raise _refuse(
            f"the {tower.kind} tower is read after its final LayerNorm (feature_layer -1: last_hidden_state) "
            f"and {LLAVA} reads the tower's hidden_states, which come before that LayerNorm (a model trained "
            f"on feature_layer {depth}, the last block without it, exports)",
            None,
        )
    if cfg.pool != 1:
        raise _refuse(f"patches averaged over {cfg.pool} x {cfg.pool} blocks (pool {cfg.pool})", None)
    _check_causal(model.llm, "causal")


def check(model: Any) -> str:
    """The transformers class ``model`` (a ``blipkit.Model``) exports to; ``NotRepresentable`` if none."""
    inner = _family_model(model)
    family = getattr(inner.config, "family", "blip2")
    if family == "blip2":
        _check_blip2(inner)
        return BLIP2
    if family == "llava":
        _check_llava(inner)
        return LLAVA
    if family == "caption":
        raise _refuse("a caption-then-LLM bridge feeds the LLM a captioner's text, not image features", None)
    raise _refuse(
        f"a {family} model ({type(inner).__name__}) is not a generation model blipkit exports "
        f"({BLIP2}, {LLAVA})",
        "CLIPModel / SiglipModel" if family == "clip" else None,
    )


# --- shared steps ------------------------------------------------------------------------------------------
def _tensors(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """The module's state dict in ``dtype``, on the CPU (where the export is written from)."""
    return {k: v.detach().to("cpu", dtype) for k, v in module.state_dict().items()}


def _image_token(tokenizer: Any, token: str, llm: Any) -> tuple[Any, int, int]:
    """(a copy of the tokenizer holding ``token`` as one special token, its id, embedding rows needed)."""
    from tokenizers import AddedToken

    tok = copy.deepcopy(tokenizer)
    if token not in tok.get_vocab():
        tok.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    ids = tok.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise CheckpointError(f"the tokenizer splits the image token {token!r} into {ids}")
    rows = llm.get_input_embeddings().weight.shape[0]
    return tok, ids[0], max(rows, ids[0] + 1)


def _pad_vocab(llm: Any, state_dict: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    """The LLM's input and output embeddings (every name that holds them) with zero rows up to ``rows``."""
    embeddings = [llm.get_input_embeddings(), llm.get_output_embeddings()]
    ptrs = {e.weight.data_ptr() for e in embeddings if e is not None}
    originals = dict(llm.state_dict())
    out = {}
    for k, v in state_dict.items():
        if originals[k].data_ptr() in ptrs and v.shape[0] < rows:
            v = torch.cat([v, v.new_zeros(rows - v.shape[0], *v.shape[1:])])
        out[k] = v
    return out


def _llm_parts(
    llm: Any, tokenizer: Any, dtype: torch.dtype
) -> tuple[dict[str, Tensor], dict, Any, int, bool]:
    """(LLM state dict, text config dict, tokenizer with ``<image>``, its id, whether rows were added)."""
    tok, image_id, rows = _image_token(tokenizer, IMAGE_TOKEN, llm)
    state = _tensors(llm, dtype)
    text_config = llm.config.to_dict()
    padded = rows > llm.get_input_embeddings().weight.shape[0]
    if padded:
        state = _pad_vocab(llm, state, rows)
        text_config["vocab_size"] = rows
    return state, text_config, tok, image_id, padded


def _token_notes(tokenizer: Any, image_id: int, padded: bool) -> list[str]:
    notes = []
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        notes.append(f"added the token {IMAGE_TOKEN!r} (id {image_id}) to the tokenizer")
    if padded:
        notes.append(f"one zero embedding row for it (vocab {image_id + 1}; generation suppresses it)")
    return notes


# --- BLIP-2 ------------------------------------------------------------------------------------------------
def _left_out(key: str) -> str | None:
    return next((why for part, why in BLIP2_LEFT_OUT.items() if part in key), None)


def _plan_blip2(model: Any, dtype: torch.dtype) -> _Plan:
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    inner = model.model
    cfg, v, q = inner.config, inner.config.vision, inner.config.qformer
    llm_sd, text_config, tok, image_id, padded = _llm_parts(inner.llm, model.tokenizer, dtype)
    state, dropped = {}, []
    for part in ("vision", "qformer", "bridge"):
        for k, t in _tensors(getattr(inner, part), dtype).items():
            why = _left_out(f"{part}.{k}")
            if why:
                dropped.append(why)
            else:
                state[f"{part}.{k}"] = t
    state.update({f"llm.{k}": t for k, t in llm_sd.items()})
    try:
        hf_state = hf_blip2.to_hf(state)
    except KeyError as e:
        raise CheckpointError(f"export to {BLIP2}: {e.args[0]}") from None
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            layer_norm_eps=v.layer_norm_eps,
            hidden_act="gelu",
            qkv_bias=True,
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            vocab_size=q.vocab_size,
            hidden_size=q.hidden_size,
            num_hidden_layers=q.num_layers,
            num_attention_heads=q.num_heads,
            intermediate_size=q.intermediate_size,
            hidden_act="gelu",
            max_position_embeddings=q.max_position_embeddings,
            layer_norm_eps=q.layer_norm_eps,
            pad_token_id=q.pad_token_id,
            cross_attention_frequency=q.cross_attention_frequency,
            encoder_hidden_size=q.encoder_hidden_size,
            use_qformer_text_input=False,
        ).to_dict(),
        text_config=text_config,
        num_query_tokens=q.num_query_tokens,
        image_token_index=image_id,
        use_decoder_only_language_model=cfg.llm.kind == "causal",
    )
    notes = _token_notes(model.tokenizer, image_id, padded)
    if dropped:
        parts = ", ".join(why for why in dict.fromkeys(BLIP2_LEFT_OUT.values()) if why in dropped)
        notes.append(f"left out {parts} ({BLIP2} has none; generation does not read them)")
    processor = model.processor

    def save_processor(out: Path, tokenizer: Any) -> None:
        export_processors.save_blip2_processor(out, processor, tokenizer, q.num_query_tokens)

    return _Plan(BLIP2, config, hf_state, tok, save_processor, [image_id] if padded else [], notes)


# --- LLaVA -------------------------------------------------------------------------------------------------
def _llava_key(key: str, base: str) -> str:
    for dst, src in TO_HF_LLAVA:
        dst = dst.format(base=base)
        if key.startswith(dst):
            return src + key[len(dst) :]
    raise CheckpointError(
        f"export to {LLAVA}: no place for {key!r} (the LLM must be a base model {base!r} + lm_head)"
    )


def _tower_config(tower: Any) -> dict[str, Any]:
    """The tower's transformers config dict as blipkit built it (only as deep as it is read), with the image
    size its position embeddings were made for (blipkit sets the processor's size on DINOv2, which
    interpolates them)."""
    config = tower.model.config.to_dict()
    for key in BACKBONE_FIELDS:  # derived from the depth, which blipkit may have cut
        config.pop(key, None)
    name, cls = _POSITIONS[tower.kind]
    rows = tower.model.state_dict()[name].shape[-2] - cls
    side = math.isqrt(rows)
    if side * side == rows:
        config["image_size"] = side * config["patch_size"]
    return config


def _projector(model: Any, dtype: torch.dtype) -> tuple[dict[str, Tensor], str]:
    """The projector as transformers' two linear layers, and its activation (a linear projector is followed
    by an identity activation and an identity matrix)."""
    state = _tensors(model.projector, dtype)
    proj = model.config.projector
    if proj.kind == "mlp2x_gelu":
        return state, proj.act
    width = model.projector.linear_1.out_features
    state["linear_2.weight"] = torch.eye(width, dtype=dtype)
    if proj.bias:
        state["linear_2.bias"] = torch.zeros(width, dtype=dtype)
    return state, "linear"


def _plan_llava(model: Any, dtype: torch.dtype) -> _Plan:
    from transformers import LlavaConfig

    inner = model.model
    cfg, tower = inner.config, inner.vision
    llm_sd, text_config, tok, image_id, padded = _llm_parts(inner.llm, model.tokenizer, dtype)
    projector, act = _projector(inner, dtype)
    state = {f"vision.model.{k}": t for k, t in _tensors(tower.model, dtype).items()}
    state.update({f"projector.{k}": t for k, t in projector.items()})
    state.update({f"llm.{k}": t for k, t in llm_sd.items()})
    base = type(inner.llm).base_model_prefix
    hf_state = {_llava_key(k, base): t for k, t in state.items()}
    layers = tower.layers[0] if isinstance(cfg.feature_layer, int) else list(tower.layers)
    select = "default" if cfg.select == "default" and tower.has_cls else "full"
    vision_config = _tower_config(tower)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_id,
        vision_feature_layer=layers,
        vision_feature_select_strategy=select,
        projector_hidden_act=act,
        multimodal_projector_bias=cfg.projector.bias,
        image_seq_length=inner.num_visual_tokens,
    )
    processor = model.processor

    def save_processor(out: Path, tokenizer: Any) -> None:
        export_processors.save_llava_processor(
            out, processor, tokenizer, vision_config["patch_size"], select, IMAGE_TOKEN, tower.has_cls
        )

    notes = _token_notes(model.tokenizer, image_id, padded)
    if cfg.template != "tokenizer":
        notes.append(f"no chat template (blipkit's {cfg.template!r} template is not the tokenizer's)")
    return _Plan(LLAVA, config, hf_state, tok, save_processor, [image_id] if padded else [], notes)


# --- writing -----------------------------------------------------------------------------------------------
def check_out_dir(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """A usable OUT: absent, an empty dir, or (with ``overwrite``) a dir to replace that is not the source."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if source is not None and out.exists() and out.resolve() == Path(source).resolve():
        raise UsageError(f"{out} is the checkpoint being exported; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} exists and is not empty; pass --overwrite to replace it")


def _build(plan: _Plan, dtype: torch.dtype) -> Any:
    """The transformers model, loaded strictly from the plan's state dict."""
    import transformers

    cls = getattr(transformers, plan.architecture)
    hf, info = cls.from_pretrained(
        None, config=plan.config, state_dict=plan.state_dict, dtype=dtype, output_loading_info=True
    )
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise CheckpointError(f"export to {plan.architecture}: {problems} {info.get('error_msgs') or ''}")
    return hf


def _generation_config(llm: Any, suppress: list[int]) -> Any:
    config = copy.deepcopy(llm.generation_config)
    if suppress:
        config.suppress_tokens = sorted(set(config.suppress_tokens or []) | set(suppress))
    return config


def _num_tensors(out: Path) -> int:
    from safetensors import safe_open

    return sum(len(safe_open(str(f), "pt").keys()) for f in out.glob("*.safetensors"))


def export(
    model: Any, out_dir: str | os.PathLike, overwrite: bool = False, dtype: torch.dtype = torch.float32
) -> Export:
    """Write ``model`` (a ``blipkit.Model``) to ``out_dir`` as a transformers dir (see the module docstring).

    Nothing is written when the model cannot be represented (``NotRepresentable``) or ``out_dir`` is in use
    (``UsageError``). The dir is built beside ``out_dir`` and moved there when complete, so a failed export
    leaves ``out_dir`` as it was.
    """
    out = Path(out_dir)
    check_out_dir(out, overwrite, getattr(model, "path", None))
    architecture = check(model)
    plan = (_plan_blip2 if architecture == BLIP2 else _plan_llava)(model, dtype)
    hf = _build(plan, dtype)
    hf.generation_config = _generation_config(model.model.llm, plan.suppress)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        hf.save_pretrained(staging)
        plan.tokenizer.save_pretrained(staging)
        plan.save_processor(staging, plan.tokenizer)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return Export(out, architecture, _num_tensors(out), dtype, plan.notes)
