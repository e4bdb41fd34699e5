"""Tiny, randomly initialised causal LMs and a tokenizer, built fully offline.

Helper for tests (not a test module). Hub downloads are unavailable, so every
fixture here is constructed from a config and a tokenizer trained on SAMPLE_TEXT.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

FAMILIES: list[str] = [
    "llama",
    "gpt2",
    "opt",
    "bloom",
    "gpt_neox",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi",
    "phi3",
]

VOCAB_SIZE = 512
# Smaller than VOCAB_SIZE on purpose: real checkpoints often pad the embedding
# matrix beyond the tokenizer's vocabulary.
TOKENIZER_VOCAB_SIZE = 400
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, in this order
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

HIDDEN = 64
HEADS = 4
KV_HEADS = 2  # GQA where supported, so head bookkeeping bugs show up
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 128
MAX_POSITIONS = 1024  # SAMPLE_TEXT (~620 tokens) fits in one sequence
SLIDING_WINDOW = 8  # shorter than typical test sequences, so it changes the logits

SAMPLE_TEXT = """\
The old lighthouse stood at the edge of the harbour for more than a hundred years. \
Every evening the keeper climbed the narrow stairs, trimmed the wick, and watched the \
beam sweep across the water. Fishing boats came home by its light, and children in the \
village learned to count the seconds between each flash.

In the spring the town held a market in the square. Farmers brought bread, cheese, \
apples and honey, and a man with a small cart sold hot soup to anyone who was cold. \
People talked about the weather, the price of wool, and the new road that would one day \
connect the village to the city in the north.

A good recipe for tea is simple. Boil fresh water, warm the pot, and add one spoon of \
leaves for each cup. Let it rest for four minutes, then pour it slowly. Some people add \
milk and sugar, while others prefer it plain with a slice of lemon.

Computers read numbers, not words. Before a language model can learn from a sentence, \
the text is split into small pieces called tokens, and every token is given a number. \
The model then learns which token is likely to come next, one step at a time, until it \
can write a whole paragraph on its own.

The river was quiet that morning. A heron waited in the shallow water, and the mist \
lifted slowly from the fields. Somewhere a dog barked, a door opened, and the day began.
"""


def _mixed_layer_types(num_layers: int) -> list[str]:
    # Irregular pattern (S F F S S F F S ...), so code that regenerates the list from a
    # period or copies it without re-indexing after layer removal gives wrong results.
    return ["full_attention" if i % 4 in (1, 2) else "sliding_attention" for i in range(num_layers)]


def tiny_config(model_type: str, num_layers: int = 6, vocab_size: int = VOCAB_SIZE) -> PreTrainedConfig:
    """Config for a tiny causal LM of the given family."""
    special = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    # Llama-style families share most field names.
    llama_like = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        **special,
    )
    gemma_like = dict(llama_like, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM)

    if model_type == "llama":
        kwargs = dict(llama_like, tie_word_embeddings=True)  # as in SmolLM2
    elif model_type in ("qwen2", "qwen3"):
        # Layers >= max_window_layers use sliding attention; the config turns this into layer_types.
        kwargs = dict(
            llama_like,
            head_dim=HEAD_DIM,
            use_sliding_window=True,
            sliding_window=SLIDING_WINDOW,
            max_window_layers=num_layers // 2,
        )
    elif model_type == "mistral":
        kwargs = dict(llama_like, sliding_window=SLIDING_WINDOW)  # one window for all layers
    elif model_type == "gemma":
        kwargs = dict(gemma_like)
    elif model_type in ("gemma2", "gemma3_text"):
        kwargs = dict(gemma_like, sliding_window=SLIDING_WINDOW, layer_types=_mixed_layer_types(num_layers))
    elif model_type in ("phi", "phi3"):
        kwargs = dict(llama_like)
    elif model_type == "gpt2":
        kwargs = dict(
            vocab_size=vocab_size,
            n_embd=HIDDEN,
            n_layer=num_layers,
            n_head=HEADS,
            n_inner=INTERMEDIATE,
            n_positions=MAX_POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **special,
        )
    elif model_type == "opt":
        kwargs = dict(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            num_hidden_layers=num_layers,
            num_attention_heads=HEADS,
            ffn_dim=INTERMEDIATE,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=MAX_POSITIONS,
            dropout=0.0,
            **special,
        )
    elif model_type == "bloom":
        # ALiBi: no position embeddings, hence no max_position_embeddings.
        kwargs = dict(vocab_size=vocab_size, hidden_size=HIDDEN, n_layer=num_layers, n_head=HEADS, **special)
    elif model_type == "gpt_neox":
        kwargs = dict(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            num_hidden_layers=num_layers,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POSITIONS,
            **special,
        )
    else:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {FAMILIES}")

    # The attention implementation is left to transformers' default (sdpa; eager for bloom and
    # gemma2). It is not saved in config.json, so forcing one here would make a reloaded model use
    # a different kernel and give slightly different logits. Both are deterministic on CPU.
    return AutoConfig.for_model(model_type, **kwargs)


_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    # Train once per process; the trainer is deterministic for a fixed corpus.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Same normalizer and pre-tokenizer as transformers' Qwen2Tokenizer: AutoTokenizer forces that
    # class onto qwen2 checkpoints and rebuilds these parts, so matching them keeps the ids identical.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte is encodable: no <unk> in practice
        show_progress=False,
    )
    tok.train_from_iterator(SAMPLE_TEXT.split("\n"), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Fresh byte-level BPE tokenizer (same vocabulary on every call). Adds no BOS/EOS automatically."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_POSITIONS,
    )


def make_tiny_model(model_type: str, num_layers: int = 6, seed: int = 0) -> PreTrainedModel:
    """Randomly initialised float32 causal LM in eval mode; same seed -> same weights."""
    config = tiny_config(model_type, num_layers=num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_tiny_model(model_type: str, directory: str | Path, num_layers: int = 6, seed: int = 0) -> Path:
    """Save model and tokenizer so the Auto* classes can load `directory` offline."""
    directory = Path(directory)
    make_tiny_model(model_type, num_layers=num_layers, seed=seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
