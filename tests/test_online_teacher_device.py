"""The online teacher follows the batch to the student's device (issue 22: on a GPU it stayed on the CPU and the
first step failed with "Expected all tensors to be on the same device"). Checked on the CPU with the meta device."""

import torch
from transformers import BertConfig, BertForSequenceClassification

from kdcache.distill.trainer import OnlineTeacher
from kdcache.tasks import get_task


def _teacher() -> OnlineTeacher:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32))
    return OnlineTeacher(model, get_task("text_classification"), (1,), "none")


def test_teacher_moves_to_the_batch_device():
    teacher = _teacher()
    assert {p.device.type for p in teacher.model.parameters()} == {"cpu"}
    teacher.place(torch.device("meta"))  # a device other than the teacher's: every weight and buffer follows
    assert {p.device.type for p in teacher.model.parameters()} == {"meta"}
    assert {b.device.type for b in teacher.model.buffers()} <= {"meta"}


def test_call_places_the_teacher_before_its_forward():
    teacher = _teacher()
    cpu = {"input_ids": torch.randint(0, 50, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    out = teacher(cpu)  # already on the batch's device: runs there, targets there
    assert out["teacher_logits"].shape == (2, 2) and out["teacher_logits"].device.type == "cpu"
    meta = {k: v.to("meta") for k, v in cpu.items()}
    try:
        teacher(meta)  # the forward itself cannot run on meta tensors, but the teacher must have moved first
    except (RuntimeError, NotImplementedError):
        pass
    assert {p.device.type for p in teacher.model.parameters()} == {"meta"}
