"""Tiny random Hugging Face models and tokenizers built offline, for tests and benchmarks.

Nothing here touches a hub: the tokenizer is a byte-level BPE trained on a few sentences, so any
text (newlines, emoji, non-ASCII) tokenizes, and the models are random `from_config` weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a stupid idiot and I hate you.",
    "Complete the following text.\nText: hello world\nContinuation:",
    "What a lovely day for a walk in the park with friends.",
    "This is a test of the tokenizer, with commas, newlines\nand numbers 123.",
]

# ChatML-style template with a system role (like SmolLM2's).
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A template that rejects the system role (like Gemma's): the system line must be folded.
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(chat_template: str | None = None, vocab_size: int = 400):
    """A byte-level BPE tokenizer (no BOS added, like SmolLM2), optionally with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
        fast.eos_token = "<|im_end|>"
    return fast


def _llama_config(vocab_size: int, n_layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def _gemma3_config(vocab_size: int, n_layers: int):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        max_position_embeddings=256,
        sliding_window=8,
        architectures=["Gemma3ForCausalLM"],
    )


def build_tiny_model(
    path: str | Path,
    *,
    arch: str = "llama",
    n_layers: int = 3,
    chat_template: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny random causal LM plus tokenizer to `path` and return it.

    Args:
        path: Output directory.
        arch: "llama" or "gemma3".
        n_layers: Number of blocks.
        chat_template: Optional Jinja chat template for the tokenizer.
        seed: Seed for the random weights.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(chat_template)
    vocab = len(tokenizer)
    config = {"llama": _llama_config, "gemma3": _gemma3_config}[arch](vocab, n_layers)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init is tiny; scale weights up a little so layers differ visibly and sampling varies.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
