"""Cache hits, --force, and bad input: each a clear error that names what is wrong, with nothing
half-written."""

from __future__ import annotations

import pytest
from datasets import Dataset
from helpers import make_bert, run_cli, write_pipeline

from kdcache import FineTuneConfig
from kdcache.cache import CacheError, CacheMismatchError
from kdcache.cache.format import SHARD_GLOB
from kdcache.dump import dump_teacher
from kdcache.models import ModelError
from kdcache.tasks import DataError
from kdcache.train import train_student


def config_for(teacher, student, data, tmp_path, **extra):
    values = dict(model_name=str(student), teacher_model_name=str(teacher), use_distillation=True,
                  train_file=str(data["train"]), max_length=48, batch_size=16, num_epochs=1, disable_tqdm=True,
                  output_dir=str(tmp_path / "out"))
    values.update(extra)
    return FineTuneConfig(**values)


@pytest.mark.slow
def test_second_dump_is_a_hit_and_force_redoes(tmp_path, kdcache_home, trained_teacher, tiny_student, small_data):
    config = config_for(trained_teacher, tiny_student, small_data, tmp_path)
    first = dump_teacher(config, progress=False)
    assert not first.hit
    shard = next(first.cache_dir.glob(SHARD_GLOB))
    stamp = shard.stat().st_mtime_ns
    second = dump_teacher(config, progress=False)
    assert second.hit and second.cache_dir == first.cache_dir
    assert shard.stat().st_mtime_ns == stamp  # nothing was rewritten
    third = dump_teacher(config, force=True, progress=False)
    assert not third.hit and third.manifest["fingerprint"] == first.manifest["fingerprint"]


@pytest.mark.slow
def test_other_data_in_the_same_cache_dir_names_the_field(tmp_path, kdcache_home, trained_teacher, tiny_student, small_data):
    cache = tmp_path / "cache"
    dump_teacher(config_for(trained_teacher, tiny_student, small_data, tmp_path, cache_dir=str(cache)), progress=False)
    other = config_for(trained_teacher, tiny_student, small_data, tmp_path, cache_dir=str(cache), max_train_samples=100)
    with pytest.raises(CacheMismatchError) as err:
        dump_teacher(other, progress=False)
    assert "dataset_hash" in str(err.value) and "--force" in str(err.value)


@pytest.mark.slow
def test_train_student_refuses_a_cache_for_other_inputs(tmp_path, kdcache_home, trained_teacher, tiny_student, small_data):
    cache = tmp_path / "cache"
    dump_teacher(config_for(trained_teacher, tiny_student, small_data, tmp_path, cache_dir=str(cache)), progress=False)
    with pytest.raises(CacheMismatchError, match="max_length"):
        train_student(config_for(trained_teacher, tiny_student, small_data, tmp_path, cache_dir=str(cache), max_length=32))
    with pytest.raises(CacheMismatchError, match="layers"):
        train_student(config_for(trained_teacher, tiny_student, small_data, tmp_path, cache_dir=str(cache),
                                 distill_hidden_states=True, teacher_layers_to_distill=[-1]))
    with pytest.raises(CacheError, match="no teacher cache"):
        train_student(config_for(trained_teacher, tiny_student, small_data, tmp_path, max_train_samples=64))


@pytest.mark.slow
def test_foreign_cache_dir_is_refused_and_left_alone(tmp_path, kdcache_home, trained_teacher, tiny_student, small_data):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(CacheError, match="not a kdcache cache"):
        dump_teacher(config_for(trained_teacher, tiny_student, small_data, tmp_path, cache_dir=str(foreign)), progress=False)
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
    with pytest.raises(CacheError, match="not a kdcache cache"):
        train_student(config_for(trained_teacher, tiny_student, small_data, tmp_path, cache_dir=str(foreign)))


@pytest.mark.slow
def test_bad_datasets(tmp_path, kdcache_home, trained_teacher, tiny_student, small_data):
    config = config_for(trained_teacher, tiny_student, small_data, tmp_path)
    with pytest.raises(DataError, match="empty"):
        dump_teacher(config, train_dataset=Dataset.from_dict({"text": [], "label": []}), progress=False)
    with pytest.raises(DataError, match="no column 'text'.*text_column"):
        dump_teacher(config, train_dataset=Dataset.from_dict({"sentence": ["a b"], "label": [0]}), progress=False)
    with pytest.raises(DataError, match="no column 'label'"):
        dump_teacher(config, train_dataset=Dataset.from_dict({"text": ["a b"]}), progress=False)
    bad_eval = Dataset.from_dict({"text": ["good film", "bad film"], "label": [1, 7]})
    with pytest.raises(DataError, match="label 7.*out of range"):
        train_student(config.replace(use_distillation=False), eval_dataset=bad_eval)
    assert not kdcache_home.exists() or not any(kdcache_home.iterdir())


def test_teacher_and_student_label_counts_must_match(tmp_path, kdcache_home, tokenizer_dir, small_data):
    teacher3 = make_bert(tmp_path / "t3", tokenizer_dir, layers=2, hidden=32, num_labels=3)
    config = FineTuneConfig(model_name=str(teacher3), teacher_model_name=str(teacher3), use_distillation=True,
                            train_file=str(small_data["train"]), max_length=48)
    with pytest.raises(ModelError, match="3 labels but the training data has 2"):
        dump_teacher(config, progress=False)
    assert not kdcache_home.exists() or not any(kdcache_home.iterdir())


def test_cli_reports_unknown_yaml_key_and_unknown_task(tmp_path, kdcache_home):
    bad_key = write_pipeline(tmp_path / "a.yaml", model_name="m", temprature=2.0)
    proc = run_cli(["dump-teacher", "--config", str(bad_key)], kdcache_home, check=False)
    assert proc.returncode != 0 and "unknown key 'temprature'" in proc.stderr and "temperature" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad_task = write_pipeline(tmp_path / "b.yaml", model_name="m", task_type="speech_recognition")
    proc = run_cli(["train-student", "--config", str(bad_task)], kdcache_home, check=False)
    assert proc.returncode != 0 and "unknown task 'speech_recognition'" in proc.stderr
    assert not kdcache_home.exists()


def test_a_teacher_without_a_trained_head_is_refused(tmp_path, kdcache_home, tokenizer_dir, small_data):
    from transformers import AutoTokenizer, BertConfig, BertModel

    bare = tmp_path / "bare"
    BertModel(BertConfig(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)).save_pretrained(bare)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(bare)
    config = FineTuneConfig(model_name=str(bare), teacher_model_name=str(bare), use_distillation=True,
                            train_file=str(small_data["train"]), max_length=48)
    with pytest.raises(ModelError, match="no trained text_classification head"):
        dump_teacher(config, progress=False)
    assert not kdcache_home.exists() or not any(kdcache_home.iterdir())


@pytest.mark.slow
def test_a_teacher_whose_head_was_never_trained_is_warned_about(tmp_path, kdcache_home, tokenizer_dir, small_data,
                                                               trained_teacher, caplog):
    """A 2-way head saved right after from_pretrained added it (random weights, zero biases) is dumped with
    a warning naming the head and the fix; the fine-tuned teacher dumps without one."""
    fresh = make_bert(tmp_path / "fresh", tokenizer_dir, layers=2, hidden=32, seed=3)
    for teacher, warned in ((fresh, True), (trained_teacher, False)):
        config = FineTuneConfig(model_name=str(teacher), teacher_model_name=str(teacher), use_distillation=True,
                                train_file=str(small_data["train"]), max_length=48, max_train_samples=32)
        caplog.clear()
        with caplog.at_level("WARNING", logger="kdcache.dump"):
            dump_teacher(config, cache_dir=str(tmp_path / f"cache-{warned}"), progress=False)
        lines = [r.getMessage() for r in caplog.records if "never trained" in r.getMessage()]
        assert bool(lines) == warned, lines
        if warned:
            assert "classifier" in lines[0] and "`kdcache train` with use_distillation: false" in lines[0]


@pytest.mark.slow
def test_no_cache_advice_followed_works(tmp_path, kdcache_home, trained_teacher, tiny_student, small_data):
    """'no teacher cache ...: run `kdcache dump-teacher` with the same config first': doing so lets train-student run."""
    config = config_for(trained_teacher, tiny_student, small_data, tmp_path, max_train_samples=64)
    with pytest.raises(CacheError, match="run `kdcache dump-teacher` with the same config first"):
        train_student(config)
    dump_teacher(config, progress=False)
    assert train_student(config).cache_dir is not None
