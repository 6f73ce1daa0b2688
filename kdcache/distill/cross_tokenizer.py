"""Training a student whose tokenizer differs from the teacher's, from the teacher's cache.

The cache stores, per target position, the characters (context_end, target_end) of the text the
teacher had read and of the token it predicted, and the manifest stores the teacher vocabulary's
continuation strings. A student position whose context ends at the same character as a teacher
position's (:func:`kdcache.tokenization_alignment.align`) receives that position's top-k, whose ids the trainer maps
into the student's vocabulary (:func:`kdcache.tokenization_alignment.fold_topk`); the other positions learn from
the hard labels only. The alignment rule is documented in :mod:`kdcache.tokenization_alignment` and docs/causal-lm.md."""

from __future__ import annotations

from typing import Sequence

import torch

from kdcache.cache import CacheMismatchError, CacheReader
from kdcache.cache.format import CONTINUATIONS, TargetSpec
from kdcache.distill.collator import positions_key, target_key
from kdcache.tokenization_alignment import align, continuation_strings, vocab_map


class CrossTokenizer:
    """The teacher-to-student vocabulary map and the per-batch layout of teacher rows on student positions."""

    def __init__(self, teacher_strings: Sequence[str | None], student_tokenizer):
        self.vocab_map = torch.from_numpy(vocab_map(teacher_strings, continuation_strings(student_tokenizer)))  # [V_t]
        self.teacher_vocab = len(teacher_strings)
        self.mapped = int((self.vocab_map >= 0).sum())
        self.positions = 0  # student target positions seen
        self.aligned = 0  # of which aligned with a teacher position

    @classmethod
    def from_cache(cls, reader: CacheReader, student_tokenizer) -> "CrossTokenizer":
        strings = reader.manifest.get("tokenizer", {}).get(CONTINUATIONS)
        if not strings:
            raise CacheMismatchError("cross_tokenizer", None, True,
                                     f"{reader.path} stores no teacher vocabulary for another tokenizer: re-run dump-teacher "
                                     "with this kdcache version (add --force when cache_dir names this cache)")
        return cls(strings, student_tokenizer)

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


__all__ = ["CONTINUATIONS", "CrossTokenizer"]
