"""What the teacher's forward pass is reduced to before it leaves the device: the chosen hidden
layers, pooled or per token. Shared by dump-teacher and the online-distillation baseline so the
two feed the student identical targets."""

from __future__ import annotations

import torch


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
