"""Per-position targets land on the right student positions: a cache of hand-built teacher logits
(each value encodes its feature id and position) read back through the training collator in a
shuffled order, and the masked positions carry no loss.

Data: the shipped WNUT 2017 sample (token classification) and XQuAD sample (QA windows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import REPO, read_jsonl
from transformers import AutoTokenizer

from kdcache import data as kdata
from kdcache.cache import CacheReader, ShardWriter, StoreSpec, TeacherBatch
from kdcache.config import FineTuneConfig
from kdcache.distill.collator import DistillationCollator, TargetFetcher, target_key
from kdcache.distill.losses import kd_kl_loss
from kdcache.tasks import get_task


def _code(feature_id: int, position: int) -> float:
    """The hand-built teacher logit at (feature, position): recoverable from the value alone."""
    return feature_id + position / 1000.0


def _features(task_type: str, rows: list[dict], tokenizer_dir, **fields):
    from datasets import Dataset

    task = get_task(task_type)
    config = FineTuneConfig(model_name="student", task_type=task_type, **fields)
    raw = kdata.with_example_ids(Dataset.from_list(rows))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.padding_side = "right"
    labels = task.label_info(raw, config)
    return task, tok, labels, kdata.make_features(task, raw, tok, config, labels, "train")


def _hand_built_cache(path, task, labels, features) -> StoreSpec:
    spec = StoreSpec(targets=tuple(task.target_specs(labels)), hidden=None)
    (target,) = spec.targets
    lengths = np.asarray(features["length"])
    n, width, S = len(features), target.width, int(lengths.max())
    logits = np.zeros((n, S, width), dtype=np.float32)  # [F, S, C]
    for f in range(n):
        for s in range(lengths[f]):
            logits[f, s, :] = _code(f, s)
            logits[f, s, f % width] += 5.0  # a peaked distribution whose argmax depends on the feature
    writer = ShardWriter(path, spec)
    writer.open_shard(0, (0, n))
    ids = np.arange(n)
    writer.write(TeacherBatch(feature_ids=ids, example_ids=np.asarray(features[kdata.EXAMPLE_ID]),
                              n_tokens=lengths.astype(np.int32), n_positions=lengths.astype(np.int32),
                              targets={target.name: logits}))
    writer.close_shard()
    writer.write_manifest({"num_features": n})
    return spec


@pytest.mark.parametrize("task_type", ["token_classification", "question_answering"])
def test_teacher_logits_land_on_the_students_positions(tmp_path, tokenizer_dir, task_type):
    if task_type == "token_classification":
        rows, fields = read_jsonl(REPO / "data" / "wnut17" / "train.jsonl", 300), {"max_length": 40}
    else:
        rows, fields = read_jsonl(REPO / "data" / "xquad_en" / "train.jsonl", 12), {"max_length": 64, "doc_stride": 16}
    task, tok, labels, features = _features(task_type, rows, tokenizer_dir, **fields)
    if task_type == "question_answering":
        assert len(features) > 2 * len(rows)  # several windows per example
    spec = _hand_built_cache(tmp_path / "cache", task, labels, features)
    (target,) = spec.targets
    reader = CacheReader(tmp_path / "cache")
    collator = DistillationCollator(tok, TargetFetcher(reader, list(spec.targets), None), task)

    rng = np.random.default_rng(0)
    order = rng.permutation(len(features))[:16]  # a shuffled batch of features
    batch = collator([features[int(i)] for i in order])
    teacher = batch[target_key(target.name)]  # [B, S, C]
    assert teacher.shape[:2] == batch["input_ids"].shape
    for b, f in enumerate(order):
        n = int(features[int(f)]["length"])
        expected = torch.tensor([_code(int(f), s) for s in range(n)])
        assert torch.allclose(teacher[b, :n].min(-1).values, expected), f"feature {f}"
        assert torch.all(teacher[b, n:] == 0)  # beyond the feature's positions: padding
        assert int(batch["attention_mask"][b].sum()) == n

    # The loss sees only the rows the task marks: changing the teacher anywhere else changes nothing.
    torch.manual_seed(0)
    student = torch.randn(teacher.shape)
    s_view, mask = task.kd_view(target.name, student, batch)
    t_view, _ = task.kd_view(target.name, teacher, batch)
    loss = kd_kl_loss(s_view, t_view, 2.0, mask)
    assert torch.isfinite(loss) and loss > 0
    tampered = teacher.clone()
    ignored = ~batch["attention_mask"].bool()  # padding never carries loss
    if "labels" in batch:
        ignored |= batch["labels"] == -100  # nor do tokens without a tag (special tokens, later sub-words)
        assert ignored[batch["attention_mask"].bool()].any()  # the fixture has such tokens
    tampered[ignored] = 1e3 * torch.randn(int(ignored.sum()), teacher.shape[-1])
    t_view2, _ = task.kd_view(target.name, tampered, batch)
    assert torch.allclose(kd_kl_loss(s_view, t_view2, 2.0, mask), loss)
