"""The SQuAD metric: exact match and token F1 of predicted answer strings, as the official
evaluation scripts compute them (SQuAD v1.1 ``evaluate-v1.1.py``, with SQuAD 2.0's rule for
empty answers).

- Answers are compared after the official normalisation: lower-case, remove punctuation
  (``string.punctuation``), remove the articles a / an / the, collapse whitespace.
- An example scores the maximum over its gold answers.
- An example without a gold answer (unanswerable, SQuAD 2.0) has the gold answer ``""``: the
  empty prediction scores 1 on it, anything else 0 (and the empty prediction scores 0 against a
  non-empty gold answer), as in ``evaluate-v2.0.py``.
- :func:`squad_metrics` reports percentages (0-100), like the official scripts.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Lower-case, strip punctuation and the articles a/an/the, collapse whitespace (official SQuAD)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 of the normalised strings (bag of whitespace tokens).

    If either side normalises to no tokens, 1.0 when both do and 0.0 otherwise (SQuAD 2.0 rule)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_list(answers: Iterable[str]) -> list[str]:
    golds = [str(a) for a in answers]
    return golds if golds else [""]  # unanswerable: the only correct prediction is the empty string


def squad_metrics(predictions: Sequence[str], references: Sequence[Iterable[str]]) -> dict[str, float]:
    """Mean exact match and F1 in percent (0-100) over examples.

    predictions[i]: the predicted answer string of example i ("" = no answer).
    references[i]: its gold answer strings (an empty list means "no answer": gold [""]).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for pred, refs in zip(predictions, references):
        golds = _gold_list(refs)
        em += max(exact_match(pred, g) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    n = len(predictions)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}
