"""How hard each sparse KD target pulls, at the same alpha: the gradient of top-k + rest, renormalised top-k and
sampled KL w.r.t. the student's logits, against the full-vocabulary KL's (norm ratio, cosine), on synthetic logits.

Used by docs/recipe.md ("Causal LM: why top-6 + rest ranked last"): arms whose gradients differ in size at one alpha
are trained at different effective KD weights, whatever their fidelity.

    python -m bench.kd_scale                     # 512 positions, 8,000-token vocabulary, k 6, 16 draws, T 1
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional


def measure(positions: int = 512, vocab: int = 8000, k: int = 6, draws: int = 16, temperature: float = 1.0,
            seed: int = 0) -> dict[str, Any]:
    """Per loss: |grad| / |grad of the full KL| and the cosine between them, over every position; and the teacher's
    mean top-k mass. Teacher logits: a shared Zipf-like profile plus noise; the student: a weaker copy."""
    import torch
    import torch.nn.functional as F

    from kdcache.distill.losses import kd_kl_loss, sampled_kl, topk_renormalized_kl, topk_rest_kl
    from kdcache.teacher import reduce_sampled, reduce_topk

    torch.manual_seed(seed)
    base = torch.randn(vocab) * 2.0  # [V]
    teacher = base + torch.randn(positions, vocab) * 1.5  # [N, V]
    student = (base * 0.7 + torch.randn(positions, vocab) * 1.5).requires_grad_(True)  # [N, V]

    def grad(loss: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(loss, student)[0]  # [N, V]

    T = temperature
    top = reduce_topk(teacher, k, (T,))
    drawn = reduce_sampled(teacher, draws, (T,), torch.Generator().manual_seed(seed))
    full = grad(kd_kl_loss(student, teacher, T))
    grads = {
        f"top-{k} + rest": grad(topk_rest_kl(student, top["idx"], top["logp"], top["logrest"][..., 0], T)),
        f"top-{k} renormalised": grad(topk_renormalized_kl(student, top["idx"], top["logp"], T)),
        f"{draws} sampled draws": grad(sampled_kl(student, drawn["idx"], drawn["count"], drawn["logp"], drawn["lse"][..., 0], T, draws)),
    }
    out: dict[str, Any] = {"teacher_topk_mass": float(top["logp"].float().exp().sum(-1).mean()), "losses": {}}
    for name, g in grads.items():
        out["losses"][name] = {"norm_over_full": float(g.norm() / full.norm()),
                               "cosine_with_full": float(F.cosine_similarity(g.flatten(), full.flatten(), 0))}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--positions", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.positions, args.vocab, args.k, args.draws, args.temperature), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
