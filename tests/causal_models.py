"""Tiny decoder-only models for the causal-LM tests, built here: byte-level BPE tokenizers trained on
the shipped SciTLDR sample (data/scitldr, Apache-2.0) with the `tokenizers` library, a ChatML chat
template, and GPT-2, Llama and Qwen2 shapes from their configs, saved with save_pretrained. No network."""

from __future__ import annotations

from pathlib import Path

from helpers import read_jsonl
from seq2seq_models import TLDR_TRAIN, save_random

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


PLAIN_CHAT = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}### assistant: {% endif %}")


def build_lm_tokenizer(out: Path, vocab_size: int = 800, chat: bool = True, template: str = CHATML) -> Path:
    """A GPT-2-style byte-level BPE (no special tokens added to a text; <|endoftext|> ends one), with
    ChatML's <|im_start|>/<|im_end|> and a chat template (ChatML's by default) when ``chat``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    texts = [r["document"] + "\n" + r["summary"] for r in read_jsonl(TLDR_TRAIN)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=specials[1:] if chat else [])
    if chat:
        fast.chat_template = template
    fast.save_pretrained(out)
    # The fixture must tokenize meaningfully: text round-trips, and words are more than single bytes.
    sample = read_jsonl(TLDR_TRAIN, 5)[0]["summary"]
    ids = fast(sample)["input_ids"]
    assert fast.decode(ids) == sample
    assert len(ids) < 0.5 * len(sample)
    return out


def make_causal(path: Path, tokenizer_dir: Path, shape: str = "gpt2", layers: int = 2, width: int = 32, seed: int = 0,
                extra_vocab: int = 0, positions: int = 256, init_range: float = 0.02) -> Path:
    """A randomly initialised GPT-2 / Llama / Qwen2 of ``layers`` layers, saved with the tokenizer. ``extra_vocab``
    pads the embedding matrix beyond the tokenizer (rows no token reaches, as Qwen's 152,064 over 151,643);
    a larger ``init_range`` gives a peaked (more teacher-like) random distribution."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok) + extra_vocab
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if shape == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=4, n_positions=positions,
                            initializer_range=init_range, **ids)
        cls = GPT2LMHeadModel
    elif shape in ("llama", "qwen2"):
        cfg_cls, cls = (LlamaConfig, LlamaForCausalLM) if shape == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        config = cfg_cls(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                         initializer_range=init_range, tie_word_embeddings=True, **ids)
    else:
        raise ValueError(shape)
    return save_random(cls, config, tok, path, seed)


def chat_rows(rows: list[dict], chars: int = 160) -> list[dict]:
    """Chat conversations from SciTLDR rows: a user asks for the TLDR of (the start of) an abstract, the
    assistant answers with the reference TLDR."""
    return [{"messages": [{"role": "user", "content": "TLDR: " + r["document"][:chars]},
                          {"role": "assistant", "content": r["summary"]}]} for r in rows]


def text_rows(rows: list[dict]) -> list[dict]:
    """Plain text: each row's TLDR."""
    return [{"text": r["summary"]} for r in rows]
