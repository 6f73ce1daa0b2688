"""Which model a task builds and how its outputs are read (DESIGN.md §4): the Auto class, the head a teacher must
have trained, the from_pretrained arguments for a label set, and the stack whose hidden states are stored."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

    from kdcache.tasks.labels import LabelInfo


class TaskModel:
    """The model side of a task: its class, its head, and the checks a teacher's or student's config must pass."""

    auto_class: str = ""  # the transformers Auto class of the task's models, by name (transformers loads on first use)
    head_modules: tuple[str, ...] = ()  # top-level modules of the task head (must be trained in a teacher)

    @property
    def model_class(self) -> Any:
        """The transformers Auto class whose from_pretrained builds the task's teacher and student."""
        import transformers

        return getattr(transformers, self.auto_class)

    def model_kwargs(self, labels: LabelInfo) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments of a student built for these labels (e.g. num_labels)."""
        return {}

    def check_teacher_config(self, model_config, labels: LabelInfo, teacher_name: str) -> Optional[str]:
        """Why the teacher's config does not fit these labels (one line with the fix), or None."""
        return None

    def hidden_config(self, model_config):
        """The config of the stack whose hidden states are stored (its num_hidden_layers, hidden_size):
        the model's own; an encoder-decoder's encoder."""
        return model_config

    def hidden_states(self, outputs) -> tuple[torch.Tensor, ...]:
        """The stored stack's hidden states from outputs of a forward pass with output_hidden_states:
        ([B, S, H] per layer, 0 = embeddings), over the input tokens."""
        return outputs.hidden_states

    def output_rows(self, model_config) -> Optional[int]:
        """Rows of a vocabulary-scale output layer (to report padded embedding matrices); None for other heads."""
        return None

    def check_vocabulary(self, model_config, tokenizer, who: str) -> Optional[str]:
        """Why a model's output vocabulary does not fit its tokenizer (one line with the fix), or None.
        Only vocabulary-scale heads check anything."""
        return None
