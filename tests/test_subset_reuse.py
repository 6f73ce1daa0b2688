"""A student that asks for a subset of what the cache stores reuses it: fewer layers, a stored temperature,
pooled hidden states derived from per-token ones. One that needs more is refused in one line that says
what to change or re-dump, and that advice, followed, trains.

Data: the first 256 rows of the shipped mr_polarity sample (conftest.small_data) and 12 rows of the
shipped SciTLDR sample (data/scitldr). Models: the session's fine-tuned 4-layer BERT teacher, the tiny
random BERT student (conftest), and tiny random GPT-2s (tests/causal_models.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from causal_models import build_lm_tokenizer, make_causal, text_rows
from helpers import fails_cleanly, read_jsonl, write_jsonl, write_pipeline
from seq2seq_models import TLDR_TRAIN, invoke_cli

from kdcache.cache import CacheReader

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # slow: students from the trained teacher's caches

STORED = [0, 2, 4]  # hidden_states of the 4-layer teacher kept in the per-token cache


@pytest.fixture(scope="module")
def caches(tmp_path_factory, trained_teacher, tiny_student, small_data):
    """A per-token cache of layers 0, 2, 4 at its default location, and a mean-pooled one at a named cache_dir."""
    root = tmp_path_factory.mktemp("subset")
    common = dict(model_name=str(tiny_student), task_type="text_classification", use_distillation=True,
                  teacher_model_name=str(trained_teacher), distill_hidden_states=True, teacher_layers_to_distill=STORED,
                  hidden_dtype="float16", train_file=str(small_data["train"]), max_length=48, batch_size=32, num_epochs=1,
                  learning_rate=2e-3, disable_tqdm=True, logging_steps=2)
    per_token = write_pipeline(root / "per_token.yaml", **common, output_dir=str(root / "student"))
    pooled = write_pipeline(root / "pooled.yaml", **common, hidden_pooling="mean", cache_dir=str(root / "pooled_cache"),
                            output_dir=str(root / "student_pooled"))
    home = root / "home"
    invoke_cli(["dump-teacher", "--config", per_token], home)
    invoke_cli(["dump-teacher", "--config", pooled], home)
    (cache,) = home.iterdir()
    return dict(root=root, home=home, per_token=per_token, pooled=pooled, cache=cache, pooled_cache=root / "pooled_cache")


def _report(path) -> dict:
    return json.loads((path / "kdcache_report.json").read_text())


def test_fewer_layers_reuse_the_cache(caches, tmp_path):
    out = tmp_path / "out"
    invoke_cli(["train-student", "--config", caches["per_token"], "--teacher-layers-to-distill", "[-1, 2]",
                "--output-dir", out], caches["home"])
    report = _report(out)
    assert report["cache_dir"] == str(caches["cache"]) and report["layer_map"] == {"2": 1, "4": 2}
    assert any(h.get("loss_hidden", 0) > 0 for h in report["log_history"])
    assert list(caches["home"].iterdir()) == [caches["cache"]]  # no second dump


def test_a_layer_not_stored_and_the_advice_followed(caches, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(caches["home"], home)
    out = tmp_path / "out"
    proc = invoke_cli(["train-student", "--config", caches["per_token"], "--teacher-layers-to-distill", "[1, 4]",
                       "--output-dir", out], home, check=False)
    fails_cleanly(proc, "layer 1 is not stored", f"(stored layers: {STORED})", "re-run dump-teacher with the layers this student needs")
    assert not out.exists()
    invoke_cli(["dump-teacher", "--config", caches["per_token"], "--teacher-layers-to-distill", "[1, 4]"], home)
    invoke_cli(["train-student", "--config", caches["per_token"], "--teacher-layers-to-distill", "[1, 4]", "--output-dir", out], home)
    report = _report(out)
    assert report["cache_dir"] != str(home / caches["cache"].name) and set(report["layer_map"]) == {"1", "4"}


def test_pooled_states_derived_from_per_token_ones(caches):
    """CLS = the first stored token, mean = the mean over the stored tokens: by hand from get_padded, and as the
    teacher itself pooled them into the mean-pooled cache (float16 rounding apart)."""
    ids = list(range(0, 256, 7))
    with CacheReader(caches["cache"]) as per_token, CacheReader(caches["pooled_cache"]) as pooled:
        padded, mask = per_token.get_padded(ids, 48, [0, 2])  # [B, 2, 48, H], [B, 48]
        cls = per_token.get_pooled(ids, [0, 2], "cls")  # [B, 2, H]
        mean = per_token.get_pooled(ids, [0, 2], "mean")
        np.testing.assert_array_equal(cls, padded[:, :, 0])
        by_hand = (padded * mask[:, None, :, None]).sum(axis=2) / mask.sum(axis=1)[:, None, None]
        np.testing.assert_allclose(mean, by_hand, rtol=1e-5, atol=1e-6)
        teacher_mean = pooled.get_pooled(ids, [0, 2])
        assert not np.allclose(cls, teacher_mean, atol=1e-2)  # CLS is not the mean: the comparison can fail
        np.testing.assert_allclose(mean, teacher_mean, atol=2e-3 * np.abs(teacher_mean).max())
        with pytest.raises(Exception, match="pooled by 'mean'"):
            pooled.get_pooled(ids, [0], "cls")  # a pooled cache cannot be re-pooled
        with pytest.raises(Exception, match=r"ask for one of \['cls', 'mean'\]"):
            per_token.get_pooled(ids, [0], "none")  # "none" is per-token: not a pooling to derive (it once gave a mean)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_pooled_student_trains_from_the_per_token_cache(caches, tmp_path, pooling):
    out = tmp_path / "out"
    invoke_cli(["train-student", "--config", caches["per_token"], "--hidden-pooling", pooling, "--output-dir", out], caches["home"])
    report = _report(out)
    assert report["cache_dir"] == str(caches["cache"])  # found at the per-token lookup, not re-dumped
    hidden = [h["loss_hidden"] for h in report["log_history"] if "loss_hidden" in h]
    assert len(hidden) >= 3 and hidden[-1] < hidden[0]
    assert list(caches["home"].iterdir()) == [caches["cache"]]


@pytest.mark.parametrize("wanted", ["none", "cls"])
def test_other_pooling_than_the_pooled_cache_is_refused_and_the_advice_followed(caches, tmp_path, wanted):
    out = tmp_path / "out"
    args = ["train-student", "--config", caches["pooled"], "--output-dir", out]
    proc = invoke_cli([*args, "--hidden-pooling", wanted], caches["home"], check=False)
    line = fails_cleanly(proc, "stores hidden states pooled by 'mean'", f"hidden_pooling is {wanted!r}",
                         "set hidden_pooling: mean (--hidden-pooling mean)", f"re-run dump-teacher with hidden_pooling: {wanted}")
    assert not out.exists()
    advice = line.split("(--hidden-pooling ")[1].split(")")[0]
    invoke_cli([*args, "--hidden-pooling", advice], caches["home"])
    assert _report(out)["cache_dir"] == str(caches["pooled_cache"])


def test_a_stored_temperature_is_reused_and_one_not_stored_refused(tmp_path):
    """A top-k causal-LM cache holds the normalisers of temperatures 1 and 2: a student at 2 trains from it; at 3 it is
    refused, and the advice (re-dump with temperatures including 3, --force on this cache_dir) makes it train."""
    tok = build_lm_tokenizer(tmp_path / "tok", 800)
    teacher = make_causal(tmp_path / "teacher", tok, "gpt2", layers=1, width=32)
    student = make_causal(tmp_path / "student", tok, "gpt2", layers=1, width=32, seed=1)
    data = write_jsonl(tmp_path / "train.jsonl", text_rows(read_jsonl(TLDR_TRAIN, 12)))
    pipeline = write_pipeline(
        tmp_path / "p.yaml", model_name=str(student), teacher_model_name=str(teacher), task_type="causal_lm",
        use_distillation=True, logits_mode="topk", logits_k=4, temperatures=[1.0, 2.0], train_file=str(data), max_length=128,
        batch_size=4, num_epochs=1, disable_tqdm=True, logging_steps=1, cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
    )
    home = tmp_path / "home"
    invoke_cli(["dump-teacher", "--config", pipeline], home)
    invoke_cli(["train-student", "--config", pipeline, "--temperature", "2"], home)
    assert _report(tmp_path / "out")["temperature"] == 2.0
    shutil.rmtree(tmp_path / "out")
    proc = invoke_cli(["train-student", "--config", pipeline, "--temperature", "3"], home, check=False)
    fails_cleanly(proc, "temperature 3 is not stored in the cache (stored: 1, 2)", "re-run dump-teacher with temperatures including 3",
                  "--force")
    assert not (tmp_path / "out").exists()
    # In this same process: train_student closed the trained run's reader (its shared read lock), so the re-dump may run.
    invoke_cli(["dump-teacher", "--config", pipeline, "--temperatures", "1,2,3", "--force"], home)
    invoke_cli(["train-student", "--config", pipeline, "--temperature", "3"], home)
    assert _report(tmp_path / "out")["temperature"] == 3.0
