"""Whether a quality comparison can tell anything (issue 20 §2), shared by every quality section of the bench.

A teacher that is not clearly better than the plain student has nothing to teach, and students that all stay near
nothing cannot show a difference: either way the section is VOID and draws no verdict from its figures."""

from __future__ import annotations

import statistics
from typing import Any, Iterable, Mapping, Optional

MIN_TEACHER_MARGIN = 0.10  # the teacher beats the plain student by >= 10% relative on the task's metric
MIN_LEARNED = 0.30  # some student arm reaches >= 30% of the teacher's quality


def quality_ratio(value: float, teacher: float, higher_is_better: bool = True) -> float:
    """How much of the teacher's quality ``value`` has: value / teacher, or teacher / value for a loss-like metric
    (perplexity, bits/char), so that 1.0 is the teacher's and 0 is nothing learned in both directions."""
    if higher_is_better:
        return value / teacher if teacher else 0.0
    return teacher / value if value else 0.0


def setting_void(teacher: float, plain: float, arms: Iterable[float], higher_is_better: bool = True,
                 metric: str = "metric") -> Optional[str]:
    """Why a teacher-vs-students comparison is VOID (one line), or None when it can tell.

    teacher, plain: the teacher's and the plain student's score (a mean over seeds); arms: every student arm's
    score (plain included or not). Void when the teacher is less than MIN_TEACHER_MARGIN relatively better than
    plain, or when every arm is under MIN_LEARNED of the teacher's quality."""
    arms = list(arms) + [plain]
    if plain == 0:  # a plain student at zero: any teacher above it has an unbounded relative margin
        margin = float("inf") if (teacher > 0 if higher_is_better else False) else 0.0
    else:
        margin = (teacher - plain) / abs(plain) if higher_is_better else (plain - teacher) / abs(plain)
    if margin < MIN_TEACHER_MARGIN:
        return (f"VOID: the teacher ({metric} {teacher:.4g}) is {margin:+.1%} relative against the plain student "
                f"({plain:.4g}), under the {MIN_TEACHER_MARGIN:.0%} a teacher worth distilling needs; no conclusion is drawn")
    best = max(quality_ratio(a, teacher, higher_is_better) for a in arms)
    if best < MIN_LEARNED:
        return (f"VOID: no student learns the task (the best arm reaches {best:.0%} of the teacher's {metric}, under "
                f"{MIN_LEARNED:.0%}); no conclusion is drawn")
    return None


def paired_difference(plain: Mapping[int, float], distilled: Mapping[int, float],
                      higher_is_better: bool = True) -> Optional[dict[str, Any]]:
    """Distilled against plain over the seeds both have (paired: the same init and data order per seed), signed so that
    positive means distillation helped. ``diff`` the mean of the per-seed differences, ``spread`` the larger of the two
    arms' seed spreads (half their max - min) over those seeds, ``clear`` whether diff exceeds it, ``wins`` the seeds
    where distilled is ahead; None when no seed has both."""
    seeds = sorted(set(plain) & set(distilled))
    if not seeds:
        return None
    sign = 1.0 if higher_is_better else -1.0
    diffs = [sign * (distilled[x] - plain[x]) for x in seeds]
    spread = max((max(v[x] for x in seeds) - min(v[x] for x in seeds)) / 2 for v in (plain, distilled))
    diff = statistics.fmean(diffs)
    return {"diff": diff, "spread": spread, "clear": diff > spread, "wins": sum(x > 0 for x in diffs), "seeds": len(seeds),
            "by_seed": dict(zip(seeds, diffs))}
