"""What the teacher's forward pass is reduced to before it leaves the device: the chosen hidden
layers, pooled or per token. Shared by dump-teacher and the online-distillation baseline so the
two feed the student identical targets."""

from __future__ import annotations

import torch

from kdcache.row_blocks import row_blocks, rows_per_block


class LayerError(ValueError):
    """A requested hidden layer does not exist in the model."""


def resolve_layers(layers: list[int], num_hidden_layers: int) -> tuple[int, ...]:
    """Hugging Face hidden_states indices (0 = embeddings, negatives from the end) -> non-negative, sorted."""
    count = num_hidden_layers + 1  # hidden_states holds the embeddings plus one entry per layer
    resolved = []
    for layer in layers:
        index = layer if layer >= 0 else count + layer
        if not 0 <= index < count:
            raise LayerError(
                f"teacher_layers_to_distill: layer {layer} does not exist; the teacher has hidden_states "
                f"0..{count - 1} (0 = embeddings; -1 = last layer)"
            )
        resolved.append(index)
    return tuple(sorted(set(resolved)))


def select_hidden(
    hidden_states: tuple[torch.Tensor, ...],
    layers: tuple[int, ...],
    attention_mask: torch.Tensor,
    pooling: str,
) -> torch.Tensor:
    """Stack the chosen layers and pool them: [B, L, S, H] for "none", [B, L, 1, H] for cls/mean.

    Padding positions are zeroed so they cannot influence quantisation."""
    h = torch.stack([hidden_states[i] for i in layers], dim=1)  # [B, L, S, H]
    mask = attention_mask.to(h.dtype)[:, None, :, None]  # [B, 1, S, 1]
    if pooling == "none":
        return h * mask
    if pooling == "cls":
        return h[:, :, :1, :]
    if pooling == "mean":
        summed = (h * mask).sum(dim=2, keepdim=True)  # [B, L, 1, H]
        return summed / mask.sum(dim=2, keepdim=True).clamp(min=1)
    raise ValueError(f"unknown pooling {pooling!r}")


def pool_student(h: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool a student's hidden states [B, S, H] the way the teacher's were: [B, 1, H] (or as is)."""
    if pooling == "none":
        return h
    if pooling == "cls":
        return h[:, :1, :]
    mask = attention_mask.to(h.dtype)[:, :, None]  # [B, S, 1]
    return (h * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)


# -- vocabulary-scale heads: what leaves the device per position -----------------------------------

def reduce_topk(logits: torch.Tensor, k: int, temperatures: tuple[float, ...]) -> dict[str, torch.Tensor]:
    """The k largest logits of each position and the exact mass outside them at each temperature.

    logits: [..., V]. Returns ``idx`` [..., k] (descending), ``logp`` [..., k] float16 log-probabilities
    at T=1, ``logrest`` [..., n_T] float16 log of the mass outside the top-k at each temperature, all on
    logits' device. Both sums are taken directly in float32, the tail's over the non-top-k entries, so
    nothing cancels: lse_T(all) = logaddexp(lse_T(top-k), lse_T(rest)), one pass over the vocabulary per
    temperature. The passes run block by block of rows (kdcache.row_blocks: no [N, V] float32 copy of the
    logits; each row's result is the same for any blocking)."""
    lead = logits.shape[:-1]
    out = {"idx": torch.empty((*lead, k), dtype=torch.long, device=logits.device),
           "logp": torch.empty((*lead, k), dtype=torch.float16, device=logits.device),
           "logrest": torch.empty((*lead, len(temperatures)), dtype=torch.float16, device=logits.device)}
    for blk in row_blocks(tuple(logits.shape), rows_per_block(logits)):
        for name, value in _reduce_topk_rows(logits[blk], k, temperatures).items():
            out[name][blk] = value
    return out


def _reduce_topk_rows(logits: torch.Tensor, k: int, temperatures: tuple[float, ...]) -> dict[str, torch.Tensor]:
    """reduce_topk of one block of rows [..., V]."""
    lf = logits.float()  # [..., V]
    top, idx = lf.topk(k, dim=-1)  # [..., k] descending
    outside = lf.scatter(-1, idx, float("-inf"))  # [..., V], the top-k removed
    rest, lse_one = [], None
    for t in (*temperatures, *(() if 1.0 in temperatures else (1.0,))):
        lse_rest = (outside / t).logsumexp(dim=-1)  # [...] the tail, at t
        lse_all = torch.logaddexp(lse_rest, (top / t).logsumexp(dim=-1))  # [...] the whole vocabulary, at t
        if t == 1.0:
            lse_one = lse_all
        if len(rest) < len(temperatures):
            rest.append((lse_rest - lse_all).clamp(min=-60.0))  # exp(-60): nothing left
    logp = (top - lse_one.unsqueeze(-1)).clamp(min=-6.0e4)  # [..., k] at T=1; a masked (-inf) logit stays finite in float16
    return {"idx": idx, "logp": logp.to(torch.float16), "logrest": torch.stack(rest, dim=-1).to(torch.float16)}


def reduce_sampled(logits: torch.Tensor, draws: int, temperatures: tuple[float, ...],
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """``draws`` tokens drawn (with replacement) from the teacher at T=1 per position, as distinct ids
    with counts: an unbiased estimate of the teacher distribution (Anshumann et al., 2025).

    logits: [..., V]. Returns ``idx`` [..., draws] (distinct ids ascending, unused slots 0), ``count``
    [..., draws] uint8 (summing to ``draws``), ``logp`` [..., draws] float16 (0 in unused slots) and
    ``lse`` [..., n_T] float32, logsumexp over the vocabulary of logp/T: with it the draws are
    importance-weighted to any stored temperature without bias."""
    lead, V = logits.shape[:-1], logits.shape[-1]
    logp_all = torch.log_softmax(logits.float(), dim=-1).reshape(-1, V)  # [N, V]
    drawn = torch.multinomial(logp_all.exp(), draws, replacement=True, generator=generator)  # [N, draws]
    drawn = drawn.sort(dim=-1).values
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = new.long().cumsum(dim=-1) - 1  # [N, draws] slot of each draw's id
    idx = torch.zeros_like(drawn).scatter_(1, slot, drawn)  # [N, draws]
    count = torch.zeros_like(drawn).scatter_add_(1, slot, torch.ones_like(drawn))  # [N, draws]
    logp = torch.where(count > 0, logp_all.gather(1, idx), torch.zeros((), device=logits.device))  # [N, draws]
    lse = torch.stack([torch.logsumexp(logp_all / t, dim=-1) for t in temperatures], dim=-1)  # [N, n_T]
    return {"idx": idx.reshape(*lead, draws), "count": count.to(torch.uint8).reshape(*lead, draws),
            "logp": logp.to(torch.float16).reshape(*lead, draws), "lse": lse.reshape(*lead, len(temperatures))}


# -- a teacher whose task head was never trained ----------------------------------------------------

def untrained_head_problem(model: torch.nn.Module, task, teacher_name: str, tolerance: float = 0.2) -> str | None:
    """Why ``model``'s task head looks never trained (one line with the fix), or None.

    A head saved right after ``from_pretrained`` added it holds its initialisation: every bias exactly
    zero and weights of std ``config.initializer_range``. One optimizer step moves every bias, so a
    trained head never matches both. Heads without a bias (tied LM heads) cannot be told apart this
    way and pass; so do models whose config names no initializer_range but whose biases moved."""
    init_std = getattr(getattr(model, "config", None), "initializer_range", None)
    linears = []
    for head in task.head_modules:
        module = getattr(model, head, None)
        if isinstance(module, torch.nn.Module):
            linears += [(f"{head}.{name}" if name else head, m) for name, m in module.named_modules()
                        if isinstance(m, torch.nn.Linear)]
    with_bias = [(name, m) for name, m in linears if m.bias is not None]
    if not with_bias:
        return None
    with torch.no_grad():
        if any(bool(m.bias.any()) for _, m in with_bias):
            return None
        stds = [float(m.weight.float().std()) for _, m in linears]
    if init_std and not all(abs(s - init_std) <= tolerance * init_std for s in stds):
        return None
    names = ", ".join(name for name, _ in linears)
    return (f"teacher {teacher_name!r} has a {task.name} head that was never trained: the weights of {names} are still "
            f"at their initialisation (biases all zero, weight std {max(stds):.4f} vs initializer_range {init_std}); a teacher "
            "must be fine-tuned on the task first, e.g. `kdcache train` with use_distillation: false")
