"""A tiny random BLIP-2 whose LLM tokenizer is byte-level (GPT-2 style, one token per byte, no merges), so
that any text, JSON included, can be generated; the word-level tokenizers of ``hf_tiny`` cannot write "{"."""

from __future__ import annotations

import os

import torch
import transformers
from hf_tiny import IMAGE_TOKEN, make_blip2
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import Blip2ForConditionalGeneration

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's order; "</s>" is both BOS and EOS, as in OPT


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """OPT's special tokens, then the 256 byte-level symbols; "<image>" last (as ``make_tokenizer`` does)."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B:1", special_tokens=[("</s>", vocab["</s>"])]
    )
    out = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    out.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return out


def make_byte_blip2(path: str | os.PathLike) -> None:
    """``make_blip2(path, llm="opt")`` with the byte-level tokenizer: the LLM's embeddings resized to it (the
    new rows seeded, the global random state untouched)."""
    make_blip2(path, llm="opt", num_query_tokens=4)
    tok = byte_tokenizer()
    model = Blip2ForConditionalGeneration.from_pretrained(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.language_model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.config.text_config.vocab_size = len(tok)
    model.config.image_token_index = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def llm_alone(model, prompt: str, tokens: int) -> str:
    """transformers' own greedy continuation of ``prompt`` by the model's LLM, no image."""
    tok = model.tokenizer
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.model.llm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
