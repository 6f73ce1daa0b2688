"""Stage two with the Trainer options wired through: dynamic batching (length-grouped sampler),
gradient checkpointing, pooled hidden states, an explicit layer map; the read-ahead serves the
batches."""

from __future__ import annotations

import pytest

from kdcache import FineTuneConfig
from kdcache.dump import dump_teacher
from kdcache.models import ModelError
from kdcache.train import train_student


def test_dynamic_batching_checkpointing_and_read_ahead(tmp_path, kdcache_home, trained_teacher, tiny_student, small_data):
    config = FineTuneConfig(
        model_name=str(tiny_student), teacher_model_name=str(trained_teacher), use_distillation=True,
        distill_hidden_states=True, teacher_layers_to_distill=[0, -1], hidden_dtype="float16", hidden_pooling="cls",
        layer_map={0: 0, -1: 2}, use_dynamic_batching=True, gradient_checkpointing=True,
        train_file=str(small_data["train"]), max_length=48, batch_size=16, num_epochs=1, disable_tqdm=True,
        output_dir=str(tmp_path / "out"),
    )
    dump_teacher(config, progress=False)
    result = train_student(config)
    assert result.cache_reads["prefetched"] >= 15 and result.cache_reads["read_now"] <= 1
    assert any("loss_hidden" in h for h in result.log_history)


def test_layer_map_out_of_range_is_an_error(tmp_path, kdcache_home, trained_teacher, tiny_student, small_data):
    config = FineTuneConfig(
        model_name=str(tiny_student), teacher_model_name=str(trained_teacher), use_distillation=True,
        distill_hidden_states=True, teacher_layers_to_distill=[-1], layer_map={-1: 7},
        train_file=str(small_data["train"]), max_length=48, disable_tqdm=True, output_dir=str(tmp_path / "out"),
    )
    dump_teacher(config, progress=False)
    with pytest.raises(ModelError, match="hidden_states 0..2"):
        train_student(config)
