"""Tiny encoder-decoder models for the seq2seq tests, built here: a BPE tokenizer trained on the
shipped SciTLDR sample (data/scitldr, Apache-2.0) with the `tokenizers` library, and T5, BART and
Marian shapes from their configs, saved with save_pretrained. No network."""

from __future__ import annotations

from pathlib import Path

from helpers import REPO, read_jsonl

TLDR_TRAIN = REPO / "data" / "scitldr" / "train.jsonl"
TLDR_VALID = REPO / "data" / "scitldr" / "validation.jsonl"


def build_tokenizer(out: Path, vocab_size: int = 1200, style: str = "t5") -> Path:
    """A byte-level BPE over the sample's abstracts and TLDRs. ``style`` "t5": a sequence ends in
    </s>; "bart": <s> ... </s>. Saved as a PreTrainedTokenizerFast that AutoTokenizer loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    texts = [r["document"] + "\n" + r["summary"] for r in read_jsonl(TLDR_TRAIN)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = "$A </s>" if style == "t5" else "<s> $A </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tok.token_to_id(t)) for t in ("</s>", "<s>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")
    fast.save_pretrained(out)
    # The fixture must tokenize meaningfully: text round-trips and few tokens are unknown.
    sample = read_jsonl(TLDR_TRAIN, 5)[0]["summary"]
    ids = fast(sample)["input_ids"]
    assert fast.decode(ids, skip_special_tokens=True).strip() == sample.strip()
    assert ids.count(fast.unk_token_id) == 0 and ids[-1] == fast.eos_token_id
    return out


def make_seq2seq(path: Path, tokenizer_dir: Path, shape: str = "t5", layers: int = 2, width: int = 32, seed: int = 0,
                 extra_vocab: int = 0) -> Path:
    """A randomly initialised T5 / BART / Marian of ``layers`` encoder and decoder layers, saved with the
    tokenizer. ``extra_vocab`` pads the embedding matrix beyond the tokenizer (rows no token reaches)."""
    from transformers import (
        AutoTokenizer,
        BartConfig,
        BartForConditionalGeneration,
        MarianConfig,
        MarianMTModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok) + extra_vocab
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    if shape == "t5":
        config = T5Config(vocab_size=vocab, d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=layers,
                          num_heads=4, decoder_start_token_id=tok.pad_token_id, **ids)
        cls = T5ForConditionalGeneration
    elif shape == "bart":
        config = BartConfig(vocab_size=vocab, d_model=width, encoder_layers=layers, decoder_layers=layers,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * width,
                            decoder_ffn_dim=2 * width, max_position_embeddings=600,
                            decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id, **ids)
        cls = BartForConditionalGeneration
    elif shape == "marian":
        config = MarianConfig(vocab_size=vocab, d_model=width, encoder_layers=layers, decoder_layers=layers,
                              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * width,
                              decoder_ffn_dim=2 * width, max_position_embeddings=600,
                              decoder_start_token_id=tok.pad_token_id, **ids)
        cls = MarianMTModel
    else:
        raise ValueError(shape)
    return save_random(cls, config, tok, path, seed)


def save_random(cls, config, tokenizer, path: Path, seed: int) -> Path:
    """A model of ``cls`` with random weights (seeded) from ``config``, saved with ``tokenizer``."""
    import torch

    torch.manual_seed(seed)
    cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def translation_rows(rows: list[dict], words: int = 12) -> list[dict]:
    """A synthetic parallel set in Hugging Face's layout, made here (no translation data is shipped):
    "en" is the first ``words`` words of each row's TLDR, "xx" the same words in reverse order
    ("we study deep nets" -> "nets deep study we"): deterministic, learnable, and as short in tokens."""
    out = []
    for row in rows:
        en = row["summary"].split()[:words]
        out.append({"translation": {"en": " ".join(en), "xx": " ".join(reversed(en))}})
    return out


def invoke_cli(args: list, kdcache_home: Path, check: bool = True):
    """Run `kdcache ARGS` in this process (helpers.run_cli's default; the seq2seq tests make about thirty calls)."""
    from helpers import run_cli

    return run_cli(args, kdcache_home, check=check)
