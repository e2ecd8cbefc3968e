"""What a model family offers the ``Model`` facade: its capabilities and the calls behind each.

Families (one model file each in ``blipkit/models/``):

- ``blip2`` (``Blip2``: BLIP-2, InstructBLIP): vision -> Q-Former (queries [+ instruction]) -> linear -> LLM;
- ``llava`` (``Llava``): vision patches -> MLP projector -> at the prompt's image token -> LLM;
- ``clip`` (``DualEncoder``: CLIP and SigLIP): vision -> proj, text -> proj, scaled cosine.

A family serves a capability when its model has the calls listed for it:

``generate`` (caption, ask, chat): ``llm``, ``is_encoder_decoder``, ``require_llm()``,
    ``visual_prompt(Visual) -> (B, Nv, Dl)``, ``llm_inputs(prefix, ids, mask) -> LLMInputs``,
    ``lm_loss(inputs, labels)``, ``hf_generate(inputs, **kw)``.
``embed`` (embed_images / embed_texts / similarity / classify / index / search / cluster):
    ``encode_image(pixels) -> features``, ``image_embeddings(features) -> (B, K, E)`` L2-normalised
    (K = queries for BLIP-2, 1 for dual encoders; similarity is the max over K),
    ``text_embeddings(ids, mask) -> (B, E)`` L2-normalised, ``label_probs(similarity) -> probabilities``.
``match``: ``match_probs(features, ids, mask) -> (B,)``, the probability that text i matches image i.

``capabilities(model)`` names what a loaded model can do, for ``blipkit models`` and for the
``CapabilityError`` of a call it cannot serve.
"""

from __future__ import annotations

from typing import Any

from blipkit.errors import CapabilityError

CAPABILITIES = ("caption", "ask", "chat", "embed", "match")
_GENERATE = ("caption", "ask", "chat")

# what each family loads from, and what its models can do (a checkpoint may hold less: a BLIP-2 retrieval
# model has no LLM, a generation model no ITC/ITM heads)
FAMILIES: dict[str, dict[str, Any]] = {
    "blip2": {
        "models": "BLIP-2, InstructBLIP",
        "formats": [
            "transformers Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval",
            "transformers InstructBlipForConditionalGeneration",
            "blipkit checkpoints (blipkit train)",
        ],
        "capabilities": [*_GENERATE, "embed (retrieval heads)", "match (retrieval heads)"],
    },
    "llava": {
        "models": "LLaVA-1.5 style (any causal LM: Llama, Vicuna, Mistral, Qwen2, ...)",
        "formats": [
            "transformers LlavaForConditionalGeneration",
            "original LLaVA repo (LlavaLlamaForCausalLM)",
        ],
        "capabilities": list(_GENERATE),
    },
    "caption": {
        "models": "caption-then-LLM, the naive baseline (default-photo: an ImageNet tagger -> SmolLM2)",
        "formats": [
            "blipkit bridge configs ({'family': 'caption'})",
            "--via-caption on any generative model",
        ],
        "capabilities": list(_GENERATE),
    },
    "clip": {
        "models": "CLIP, SigLIP",
        "formats": ["transformers CLIPModel", "transformers SiglipModel"],
        "capabilities": ["embed", "match (SigLIP)"],
    },
}


def capabilities(model: Any) -> tuple[str, ...]:
    """The user-facing capabilities of a built family model, in ``CAPABILITIES`` order."""
    return tuple(c for c in CAPABILITIES if c in model.capabilities)


def require(model: Any, capability: str, family: str) -> None:
    """``CapabilityError`` naming what ``model`` can do when it lacks ``capability`` (and why, where the model
    says: ``model.why_not(capability)``)."""
    if capability not in model.capabilities:
        can = ", ".join(capabilities(model)) or "nothing"
        why = getattr(model, "why_not", lambda _: None)(capability)
        raise CapabilityError(f"{family} cannot {capability}{f' ({why})' if why else ''}; it can: {can}")
