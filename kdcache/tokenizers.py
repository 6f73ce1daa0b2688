"""Identifying tokenizers: token-level distillation needs the student to tokenize exactly as the
teacher did, which the cache checks through this hash."""

from __future__ import annotations

import hashlib
import json


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides how text becomes ids (vocabulary, normaliser, special tokens, chat template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = json.loads(backend.to_str())
        payload.pop("truncation", None)
        payload.pop("padding", None)
        text = json.dumps(payload, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()))
    template = getattr(tokenizer, "chat_template", None)  # renders chat data into the text that is tokenized
    chat = "" if not template else json.dumps(template, sort_keys=True)
    return hashlib.sha256((text + special + chat).encode()).hexdigest()
