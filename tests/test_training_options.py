"""Stage two with the Trainer options wired through: dynamic batching (length-grouped sampler),
gradient checkpointing, pooled hidden states, an explicit layer map; the read-ahead serves the
batches."""

from __future__ import annotations

import pytest

from kdcache import FineTuneConfig
from kdcache.dump import dump_teacher
from kdcache.models import ModelError
from kdcache.train import train_student

pytestmark = pytest.mark.slow  # students trained with checkpoints from the trained teacher's cache


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


def test_checkpoint_then_resume_keeps_projections(tmp_path, kdcache_home, trained_teacher, tiny_student, small_data):
    out = tmp_path / "out"
    config = FineTuneConfig(
        model_name=str(tiny_student), teacher_model_name=str(trained_teacher), use_distillation=True,
        distill_hidden_states=True, teacher_layers_to_distill=[-1], train_file=str(small_data["train"]), max_length=48,
        batch_size=16, num_epochs=1, save_steps=8, disable_tqdm=True, logging_steps=4, output_dir=str(out),
        lr_scheduler_type="linear",  # the learning rates below tell a resumed run from a fresh one only if they decay
    )
    dump_teacher(config, progress=False)
    first = train_student(config)
    checkpoint = out / "checkpoint-16"
    assert (checkpoint / "kd_projections.safetensors").exists() and (checkpoint / "optimizer.pt").exists()

    resumed = train_student(config.replace(num_epochs=2, resume_from_checkpoint="last"))
    logged = {h["step"]: h for h in resumed.log_history if "loss" in h}
    assert max(logged) == 32
    # Steps up to 16 are the first run's, restored from the checkpoint (a fresh 2-epoch run would have
    # logged other learning rates there: its schedule spans 32 steps).
    for h in first.log_history:
        if "loss" in h:
            assert logged[h["step"]]["learning_rate"] == h["learning_rate"]
    with pytest.raises(ModelError, match="no checkpoint directory"):
        train_student(config.replace(resume_from_checkpoint=str(tmp_path / "nope")))
