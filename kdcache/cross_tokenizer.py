"""Cross-tokenizer distillation, in one place: a student whose tokenizer differs from the teacher's trains from the
teacher's causal-LM cache. Stage one stores, per target position, the characters (context_end, target_end) of the text
the teacher had read and of the token it predicted, and the teacher vocabulary's continuation strings
(:func:`continuation_strings`); stage two checks that the cache can serve another tokenizer (:func:`crosses`,
:func:`check_stored_target`), and builds one :class:`CrossTokenizer` (``CrossTokenizer.for_run``), which the collator
asks to lay the teacher's rows on the student's aligned positions (``place``) and the trainer asks for the loss of the
teacher's top-k mapped into the student's vocabulary (``topk_kl``). Positions that do not align learn from the hard
labels only. Documented in docs/causal-lm.md.

The alignment rule
------------------
A causal LM at position t has read tokens 0..t and predicts token t + 1. From a fast tokenizer's
``offset_mapping`` (the char span (start, end) of each token in the text; byte-level BPE with
trim_offsets leaves the leading space out of the span, which changes starts, never ends), each
target position t (predicting token t + 1) gets:

- ``context_end[t] = offsets[t][1]``: the text the model has read ends at this char;
- ``target_end[t] = offsets[t + 1][1]``: the predicted token ends at this char.

A student target position s and a teacher target position t ALIGN iff context_end_s ==
context_end_t (both models have read exactly the same prefix of the text) and that value occurs
exactly once among the candidate positions of each side. A value occurring more than once means
a token boundary falls inside a character (byte-level BPE splits a multi-byte character into
tokens that all report the whole character's span), so there the prefix read is ambiguous: such
positions never align. An aligned pair whose target_end is equal too predicts the same span of
text: it is "span-aligned". Both shares are reported (see ``alignment_share``).

At an aligned position both next-token distributions are over continuations of the same text
prefix, so a teacher token maps to the student token that appends the same text: its
"continuation string", leading space included when the token starts a new word (byte-level BPE
"Ġhello" -> " hello", "llo" -> "llo"; WordPiece "hello" -> " hello", "##llo" -> "llo";
SentencePiece "▁hello" -> " hello"). It is computed generically with an anchor word:
s(id) = decode(anchor + [id]) minus the prefix decode(anchor). Special tokens, tokens whose text
holds U+FFFD (part of a UTF-8 character) and tokens whose decode does not extend the anchor's get
None: they map to nothing.

Known limits: a tokenizer that adds a prefix space (byte-level BPE with add_prefix_space) reports
that invented space, when it is a token of its own at position 0, with the first character's span
(0, 1); and uncased WordPiece maps "Hello" and "hello" to the same token, so its continuation
strings are lowercase and match only the other side's lowercase tokens.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np
import torch

from kdcache.cache import CacheMismatchError, CacheReader
from kdcache.cache.format import CONTINUATIONS, TargetSpec
from kdcache.distill.collator import positions_key, target_key
from kdcache.distill.losses import mapped_topk_kl
from kdcache.tokenizer_identity import tokenizer_hash

__all__ = ["CONTINUATIONS", "CrossTokenizer", "crosses", "check_stored_target", "refuse_token_hidden", "cross_hint",
           "continuation_strings", "vocab_map", "target_offsets", "align", "fold_topk", "alignment_share"]

log = logging.getLogger(__name__)

ANCHOR_TEXT = "x"  # a plain word every tokenizer encodes; the continuation of a token is read after it
REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for a partial UTF-8 character


# --- vocabularies ------------------------------------------------------------------------------


def _special_ids(tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens, added special tokens included."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special)
    return ids


def continuation_strings(tokenizer) -> list[Optional[str]]:
    """The text each token id 0..len(tokenizer)-1 appends after a preceding word (None: maps to nothing).

    One batch decode of [anchor, id] for the whole vocabulary (about a second per 100k ids)."""
    anchor = tokenizer(ANCHOR_TEXT, add_special_tokens=False)["input_ids"]
    prefix = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    decoded = tokenizer.batch_decode([anchor + [i] for i in range(len(tokenizer))],
                                     clean_up_tokenization_spaces=False)  # exact text; a decoder's own cleanup still applies
    special = _special_ids(tokenizer)
    out: list[Optional[str]] = []
    for i, text in enumerate(decoded):
        ok = i not in special and text.startswith(prefix) and len(text) > len(prefix) and REPLACEMENT_CHAR not in text
        out.append(text[len(prefix):] if ok else None)
    return out


def vocab_map(teacher_strings: Sequence[Optional[str]], student_strings: Sequence[Optional[str]]) -> np.ndarray:
    """int64 [V_teacher]: the student id whose continuation string equals the teacher id's, -1 when
    none (the lowest student id when several share the string)."""
    student_id: dict[str, int] = {}
    for i, s in enumerate(student_strings):
        if s is not None:
            student_id.setdefault(s, i)
    return np.array([-1 if s is None else student_id.get(s, -1) for s in teacher_strings], dtype=np.int64)


# --- positions ---------------------------------------------------------------------------------


def target_offsets(offsets: np.ndarray, loss_positions: np.ndarray) -> np.ndarray:
    """uint32 [P, 2]: (context_end, target_end) of each target position t of one sequence.

    offsets: [S, 2] char spans of the sequence's tokens; loss_positions: [P] sorted positions t whose
    next token t + 1 carries loss (so t + 1 < S)."""
    offsets = np.asarray(offsets).reshape(-1, 2)  # [S, 2]
    t = np.asarray(loss_positions, dtype=np.int64).reshape(-1)  # [P]
    if t.size and (t.min() < 0 or t.max() + 1 >= len(offsets)):
        raise ValueError(f"loss positions must lie in [0, {len(offsets) - 1}) for a sequence of {len(offsets)} tokens")
    return np.stack([offsets[t, 1], offsets[t + 1, 1]], axis=1).astype(np.uint32)  # [P, 2]


def _unique_rows(ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The values occurring exactly once in ctx [P] (ascending) and the row where each occurs."""
    values, first, counts = np.unique(np.asarray(ctx).reshape(-1), return_index=True, return_counts=True)
    once = counts == 1
    return values[once], first[once]


def align(student_ctx: np.ndarray, teacher_ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(student_rows, teacher_rows) int64 [A]: the aligned pairs by the rule above, in student order.

    student_ctx [P_s], teacher_ctx [P_t]: context_end of one example's target positions. Neither needs
    to be sorted (the teacher's may be several windows of the example concatenated), but a text
    position should be a target in one window only: a repeated value never aligns."""
    s_values, s_rows = _unique_rows(student_ctx)
    t_values, t_rows = _unique_rows(teacher_ctx)
    common = np.intersect1d(s_values, t_values)  # values unique on both sides
    s = s_rows[np.searchsorted(s_values, common)]
    t = t_rows[np.searchsorted(t_values, common)]
    order = np.argsort(s, kind="stable")
    return s[order].astype(np.int64), t[order].astype(np.int64)


# --- targets -----------------------------------------------------------------------------------


def fold_topk(idx: torch.Tensor, logp: torch.Tensor, logrest: torch.Tensor, vmap: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's stored top-k at aligned positions, as a tempered distribution over student ids.

    idx [..., k] int64 teacher ids (descending), logp [..., k] log-probabilities at T=1, logrest [...]
    log of the teacher's mass outside the top-k at ``temperature``, vmap [V_t] int64 (-1: unmapped).
    Returns s_idx [..., k] int64 student ids (0 in invalid slots), p [..., k] float32 tempered teacher
    probability per slot (0 in invalid slots), rest [...] float32 mass of everything else and valid
    [..., k] bool. An unmapped entry's mass goes to rest; entries mapping to one student id are summed
    into the first. p.sum(-1) + rest == 1 on every row; a padded row (zeros) gives p 0, rest 1."""
    logrest = logrest.float()  # [...]
    top_mass = -torch.expm1(logrest)  # [...] 1 - exp(logrest), exact for small tails
    q = torch.softmax(logp.float() / temperature, dim=-1) * top_mass.unsqueeze(-1)  # [..., k] tempered
    s = vmap[idx]  # [..., k] student ids, -1 unmapped
    mapped = s >= 0  # [..., k]
    k = idx.shape[-1]
    same = (s.unsqueeze(-1) == s.unsqueeze(-2)) & mapped.unsqueeze(-1) & mapped.unsqueeze(-2)  # [..., k, k]
    earlier = torch.ones(k, k, dtype=torch.bool, device=idx.device).tril(-1)  # [k, k] j < i
    valid = mapped & ~(same & earlier).any(-1)  # [..., k] first slot of each student id
    merged = (same.float() @ q.unsqueeze(-1)).squeeze(-1)  # [..., k] mass of the slot's student id
    p = torch.where(valid, merged, torch.zeros((), device=q.device))  # [..., k]
    rest = logrest.exp() + torch.where(mapped, torch.zeros((), device=q.device), q).sum(-1)  # [...]
    s_idx = torch.where(valid, s, torch.zeros((), dtype=s.dtype, device=s.device))  # [..., k]
    return s_idx, p, rest, valid


# --- measurement -------------------------------------------------------------------------------


def _text_targets(tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Per text, uint32 [S - 1, 2] (context_end, target_end) of every position but the last."""
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for offsets in enc["offset_mapping"]:
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # [S, 2]
        out.append(target_offsets(offsets, np.arange(max(len(offsets) - 1, 0))))
    return out


def alignment_share(teacher_tokenizer, student_tokenizer, texts: Sequence[str]) -> dict[str, Any]:
    """How much of a causal-LM cache a student with another tokenizer can use on ``texts``.

    Each text is tokenized without special tokens; every position but the last is a target. Returns
    the shares of the student's target positions that align / span-align with a teacher position
    (``context_aligned``, ``span_aligned``), the same from the teacher's side (``teacher_*``), the
    share of the teacher's mappable vocabulary (non-None continuation strings) with a student id
    (``vocab_mapped``), and the counts behind them."""
    student = _text_targets(student_tokenizer, texts)
    teacher = _text_targets(teacher_tokenizer, texts)
    n_student = sum(len(x) for x in student)
    n_teacher = sum(len(x) for x in teacher)
    if n_student == 0 or n_teacher == 0:
        raise ValueError("alignment_share: the texts give no target positions")
    aligned = span = 0
    for s_off, t_off in zip(student, teacher):
        s_rows, t_rows = align(s_off[:, 0], t_off[:, 0])
        aligned += len(s_rows)
        span += int((s_off[s_rows, 1] == t_off[t_rows, 1]).sum())
    t_strings = continuation_strings(teacher_tokenizer)
    mapped = vocab_map(t_strings, continuation_strings(student_tokenizer))
    mappable = sum(s is not None for s in t_strings)
    return {
        "context_aligned": aligned / n_student,
        "span_aligned": span / n_student,
        "teacher_context_aligned": aligned / n_teacher,
        "teacher_span_aligned": span / n_teacher,
        "vocab_mapped": int((mapped >= 0).sum()) / max(mappable, 1),
        "texts": len(texts),
        "student_positions": n_student,
        "teacher_positions": n_teacher,
        "aligned_positions": aligned,
        "span_aligned_positions": span,
        "teacher_vocab_mappable": mappable,
        "teacher_vocab_mapped": int((mapped >= 0).sum()),
    }


# --- the run ------------------------------------------------------------------------------------


def crosses(config, reader: CacheReader, student_tokenizer) -> bool:
    """cross_tokenizer is on and the student's tokenizer is not the one the cache was dumped with."""
    return config.cross_tokenizer and reader.manifest.get("tokenizer_hash") != tokenizer_hash(student_tokenizer)


def cross_hint(reader: CacheReader) -> str:
    """The way out of a tokenizer mismatch when the cache can serve another tokenizer (it stores offsets)."""
    if any(t.mode == "offsets" for t in reader.spec.targets):
        return ", or set cross_tokenizer: true (--cross-tokenizer true) to distil at the positions both tokenizations align on"
    return ""


def refuse_token_hidden(path) -> None:
    """Per-token hidden states line up with the teacher's tokens only: a cache storing them cannot serve another
    tokenizer while they are distilled."""
    raise CacheMismatchError("cross_tokenizer", False, True,
                             f"{path} stores per-token hidden states, which need the teacher's tokenizer: with cross_tokenizer "
                             "turn distill_hidden_states off (--distill-hidden-states false)")


def check_stored_target(reader: CacheReader, path, target: TargetSpec) -> Optional[TargetSpec]:
    """Refuse a cache that cannot serve ``target`` (the student's spec) across tokenizers: it needs the character
    offsets and top-k logits. Returns the stored spec whose temperatures the run must find (None for the offsets)."""
    stored = reader.spec.target(target.name)
    if stored is None or (target.mode != "offsets" and stored.mode != "topk"):
        what = "no character offsets" if stored is None else f"{target.name!r} in mode {stored.mode!r}"
        raise CacheMismatchError("cross_tokenizer", None if stored is None else stored.mode, target.mode,
                                 f"{path} stores {what}: a student with another tokenizer trains from a causal_lm cache "
                                 "with logits_mode topk; re-run dump-teacher with logits_mode: topk")
    return stored if target.mode != "offsets" else None


class CrossTokenizer:
    """The teacher-to-student vocabulary map, the per-batch layout of teacher rows on student positions (the
    collator's ``place``) and the loss of the mapped top-k (the trainer's ``topk_kl``)."""

    def __init__(self, vocab_map: torch.Tensor, student_vocab: int):
        """``vocab_map`` [V_t] int64: the student id of each teacher id, -1 for none; ``student_vocab``: the
        student tokenizer's size, the width of the distribution the student learns."""
        self.vocab_map = vocab_map  # [V_t]
        self.student_vocab = int(student_vocab)
        self.teacher_vocab = len(vocab_map)
        self.mapped = int((self.vocab_map >= 0).sum())
        self.positions = 0  # student target positions seen
        self.aligned = 0  # of which aligned with a teacher position

    @classmethod
    def from_strings(cls, teacher_strings: Sequence[str | None], student_tokenizer) -> "CrossTokenizer":
        """From the teacher vocabulary's continuation strings and the student's tokenizer."""
        student_strings = continuation_strings(student_tokenizer)
        return cls(torch.from_numpy(vocab_map(teacher_strings, student_strings)), len(student_strings))

    @classmethod
    def for_run(cls, config, reader: CacheReader, source_tokenizer, student_tokenizer) -> Optional["CrossTokenizer"]:
        """Stage two's entry point: None unless the run crosses tokenizers (``source_tokenizer``: the one the student's
        rows were cut with), else the map from the cache to ``student_tokenizer`` (the student's, pruned or not)."""
        if not crosses(config, reader, source_tokenizer):
            return None
        aligner = cls.from_cache(reader, student_tokenizer)
        log.info("cross-tokenizer: %d of the teacher's %d tokens map to the student's vocabulary", aligner.mapped, aligner.teacher_vocab)
        return aligner

    @classmethod
    def from_cache(cls, reader: CacheReader, student_tokenizer) -> "CrossTokenizer":
        """From the continuation strings the cache's manifest stores."""
        strings = reader.manifest.get("tokenizer", {}).get(CONTINUATIONS)
        if not strings:
            raise CacheMismatchError("cross_tokenizer", None, True,
                                     f"{reader.path} stores no teacher vocabulary for another tokenizer: re-run dump-teacher "
                                     "with this kdcache version (add --force when cache_dir names this cache)")
        return cls.from_strings(strings, student_tokenizer)

    def topk_kl(self, s: torch.Tensor, comps: dict[str, torch.Tensor], spec: TargetSpec, temperature: float,
                mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """T²·KL of the student's logits ``s`` [B, P, V_s] against the teacher's stored top-k ``comps`` (idx, logp,
        logrest [B, P, m]) mapped into the student's vocabulary at ``temperature``, over ``mask`` [B, P]; and the
        components with ``idx`` [B, P, 1] the teacher's most likely mapped token (for agreement)."""
        if self.vocab_map.device != s.device:  # moved once, not copied every step
            self.vocab_map = self.vocab_map.to(s.device)
        idx, p, rest, valid = fold_topk(comps["idx"], comps["logp"], comps["logrest"][..., spec.temperature_index(temperature)],
                                        self.vocab_map, temperature)
        loss = mapped_topk_kl(s, idx, p, rest, valid, temperature, mask)
        return loss, {**comps, "idx": idx.gather(-1, p.argmax(-1, keepdim=True))}  # [B, P, 1]

    def place(self, batch: dict[str, torch.Tensor], fetched: dict[str, torch.Tensor], targets: Sequence[TargetSpec],
              mask: torch.Tensor) -> None:
        """Replace the fetched teacher rows ([B, P_t, ...], each row's first n real) by rows on the student's positions
        [B, S, ...] and add ``teacher_<name>:aligned`` [B, S] (True where a teacher position aligned).

        batch["offsets"] [B, P_s, 2]: the student's (context_end, target_end) per position of ``mask`` [B, S], in order."""
        offsets = next(t for t in targets if t.mode == "offsets")
        t_off = fetched.pop(target_key(offsets.name))  # [B, P_t, 2]
        t_n = fetched.pop(positions_key(offsets.name))  # [B]
        s_off = batch["offsets"]  # [B, P_s, 2]
        B, S = mask.shape
        s_rows, t_rows, rows = [], [], []
        for b in range(B):
            where = mask[b].nonzero()[:, 0]  # [n_s] student positions, in order
            s_ctx = s_off[b, : len(where), 0].numpy()
            t_ctx = t_off[b, : int(t_n[b]), 0].numpy()
            si, ti = align(s_ctx, t_ctx)
            self.positions += len(where)
            self.aligned += len(si)
            s_rows.append(where[torch.from_numpy(si)])
            t_rows.append(torch.from_numpy(ti))
            rows.append(torch.full((len(si),), b, dtype=torch.long))
        b_idx, s_idx, t_idx = torch.cat(rows), torch.cat(s_rows), torch.cat(t_rows)
        aligned = torch.zeros((B, S), dtype=torch.bool)
        aligned[b_idx, s_idx] = True
        for t in targets:
            if t.mode == "offsets":
                continue
            fetched.pop(positions_key(t.name), None)
            for key in [k for k in fetched if k.startswith(target_key(t.name) + ":")]:
                value = fetched[key]  # [B, P_t, m]
                out = value.new_zeros((B, S, *value.shape[2:]))
                out[b_idx, s_idx] = value[b_idx, t_idx]
                fetched[key] = out
            fetched[target_key(t.name, "aligned")] = aligned

    @property
    def share(self) -> float:
        """Share of the student's target positions that aligned so far."""
        return self.aligned / self.positions if self.positions else float("nan")
