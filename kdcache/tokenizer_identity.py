"""Identifying tokenizers: token-level distillation needs the student to tokenize exactly as the
teacher did, which the cache checks through this hash."""

from __future__ import annotations

import hashlib
import json

# init kwargs of a Python ("slow") tokenizer that never change which ids a text becomes: file
# locations, padding / truncation defaults, decoding and bookkeeping. Everything else is hashed.
_INERT_INIT_KWARGS = frozenset({
    "name_or_path", "vocab_file", "merges_file", "tokenizer_file", "spm_file", "model_max_length", "padding_side",
    "truncation_side", "clean_up_tokenization_spaces", "model_input_names", "processor_class", "auto_map", "backend",
    "use_fast", "local_files_only", "is_local", "_commit_hash", "cache_dir", "revision", "token", "trust_remote_code",
    "added_tokens_decoder",  # the added tokens are in the vocabulary, hashed as such
})


def _tokenizing_settings(tokenizer) -> dict:
    """A Python tokenizer's init kwargs that change tokenization (special tokens are hashed on their own)."""
    kwargs = getattr(tokenizer, "init_kwargs", None) or {}
    return {k: v for k, v in kwargs.items() if k not in _INERT_INIT_KWARGS and not k.endswith(("_token", "_tokens"))}


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides how text becomes ids (vocabulary, normaliser, special tokens, chat template).

    A fast tokenizer's normaliser is in its backend's JSON; a Python tokenizer keeps it in its init
    kwargs (do_lower_case, strip_accents, tokenize_chinese_chars, ...), hashed with its class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = json.loads(backend.to_str())
        payload.pop("truncation", None)
        payload.pop("padding", None)
        text = json.dumps(payload, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
        text += json.dumps([type(tokenizer).__name__, _tokenizing_settings(tokenizer)], sort_keys=True, default=str)
    special = json.dumps(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()))
    template = getattr(tokenizer, "chat_template", None)  # renders chat data into the text that is tokenized
    chat = "" if not template else json.dumps(template, sort_keys=True)
    return hashlib.sha256((text + special + chat).encode()).hexdigest()
