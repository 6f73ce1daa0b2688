"""The student as trained in stage two: the Hugging Face model plus one learned projection per
matched hidden layer (discarded after training; only the student is saved)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def proportional_layer_map(teacher_layers: tuple[int, ...], teacher_depth: int, student_depth: int) -> dict[int, int]:
    """Teacher hidden_states index l -> student index round(l · S / T) (0 stays the embeddings)."""
    return {l: int(round(l * student_depth / teacher_depth)) for l in teacher_layers}


class DistillationModel(nn.Module):
    """Wraps a student so its forward also returns projected hidden states for the matched layers."""

    accepts_loss_kwargs = False

    def __init__(self, student: nn.Module, layer_map: dict[int, int], teacher_hidden_size: int, task):
        """``task`` says which outputs are the target fields and which hidden states are distilled."""
        super().__init__()
        self.student = student
        self.output_targets = task.output_targets
        self.model_inputs = task.model_inputs
        self.hidden_states = task.hidden_states
        self.config = student.config
        self.teacher_layers = sorted(layer_map)  # stored teacher layers, in cache order
        self.student_layers = [layer_map[l] for l in self.teacher_layers]
        width = task.hidden_config(student.config).hidden_size
        self.projections = nn.ModuleList()
        for _ in self.teacher_layers:
            proj = nn.Linear(width, teacher_hidden_size)
            if width == teacher_hidden_size:  # start as the identity: same-width students match at once
                with torch.no_grad():
                    proj.weight.copy_(torch.eye(width))
                    proj.bias.zero_()
            self.projections.append(proj)

    def forward(self, output_kd_hidden: bool = False, **inputs):
        """Student outputs: `loss` (the model's own hard-label loss, None without labels), `targets`
        (the task's target fields, e.g. logits [B, C] or [B, S, C]) and, with output_kd_hidden,
        `kd_hidden` [B, L, S, H_teacher]."""
        outputs = self.student(**self.model_inputs(inputs, with_labels=True), output_hidden_states=output_kd_hidden and bool(self.projections))
        result = {"loss": getattr(outputs, "loss", None), "targets": self.output_targets(outputs)}
        if output_kd_hidden and self.projections:
            hs = self.hidden_states(outputs)
            result["kd_hidden"] = torch.stack(
                [proj(hs[s]) for proj, s in zip(self.projections, self.student_layers)], dim=1
            )  # [B, L, S, H_teacher]
        return result

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None, **kwargs: object) -> None:
        """Recompute the student's activations in the backward pass (the Trainer calls this)."""
        if hasattr(self.student, "activation_checkpointing_enable"):  # transformers >= 5.2x
            self.student.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        else:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable
