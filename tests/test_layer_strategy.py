"""The guide's layer-selection strategies mapped onto the teacher's depth: with hidden states on and no layers named,
every task's default fits teachers of 2, 4, 6, 12 and 24 layers (the guide's lists assume 12); explicit lists are
still honoured and validated; `kdcache recommend --teacher` prints the resolved layers; a real dump and training run
with a 4-layer teacher store and distil the mapped layers."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli, write_pipeline

from kdcache.config import FineTuneConfig
from kdcache.layer_strategy import strategy_layers, teacher_layers
from kdcache.recommend import LAYER_SELECTION_GUIDE, default_layers, layer_strategy, requested_layers
from kdcache.tasks import task_names
from kdcache.teacher import LayerError, resolve_layers

DEPTHS = (2, 4, 6, 12, 24)
# What each strategy picks, by depth (hidden_states indices: 0 = embeddings, d = last layer).
EXPECTED = {
    "top_layers": {2: (1, 2), 4: (2, 3, 4), 6: (4, 5, 6), 12: (10, 11, 12), 24: (22, 23, 24)},
    "distributed": {2: (0, 1, 2), 4: (0, 1, 3, 4), 6: (0, 2, 4, 6), 12: (0, 4, 8, 12), 24: (0, 8, 16, 24)},
    "bookend": {2: (0, 1), 4: (0, 1, 2, 3), 6: (0, 1, 4, 5), 12: (0, 1, 10, 11), 24: (0, 1, 22, 23)},
}


def _config(task: str, **fields) -> FineTuneConfig:
    return FineTuneConfig(model_name="student", task_type=task, use_distillation=True, **fields)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("task", task_names())
def test_every_task_default_fits_the_teacher_depth(task, depth):
    config = _config(task, distill_hidden_states=True)
    strategy = layer_strategy(task)
    asked = requested_layers(config)
    assert asked == strategy  # no layers named: the run asks for its task's strategy, resolved on the teacher
    layers = teacher_layers(asked, depth)
    assert layers == EXPECTED[strategy][depth] == tuple(default_layers(task, depth))
    assert resolve_layers(list(layers), depth) == layers  # all exist on this teacher (the old default's layer 10 did not)
    assert all(0 <= l <= depth for l in layers) and list(layers) == sorted(set(layers))


@pytest.mark.parametrize("family", sorted(LAYER_SELECTION_GUIDE))
def test_at_twelve_layers_each_strategy_is_the_guides_list(family):
    row = LAYER_SELECTION_GUIDE[family]
    assert strategy_layers(row["strategy"], 12) == resolve_layers(row["layers"], 12)


def test_the_old_default_refused_a_six_layer_qa_teacher_and_the_mapped_one_does_not():
    from transformers import BertConfig

    from kdcache.dump import store_spec_for
    from kdcache.tasks import LabelInfo, get_task

    with pytest.raises(LayerError, match="layer 10 does not exist"):
        resolve_layers(LAYER_SELECTION_GUIDE["qa"]["layers"], 6)
    config = _config("question_answering", distill_hidden_states=True)
    spec = store_spec_for(config, get_task("question_answering"), BertConfig(num_hidden_layers=6, hidden_size=64,
                                                                             num_attention_heads=4), LabelInfo(0))
    assert spec.hidden.layers == (0, 1, 4, 5)


def test_explicit_layers_are_honoured_and_validated():
    config = _config("question_answering", teacher_layers_to_distill=[-1, 2])
    assert teacher_layers(requested_layers(config), 6) == (2, 6)  # not the strategy's
    too_deep = _config("question_answering", teacher_layers_to_distill=[0, 1, 10, 11])
    with pytest.raises(LayerError, match="layer 10 does not exist; the teacher has hidden_states 0..6"):
        teacher_layers(requested_layers(too_deep), 6)
    assert requested_layers(_config("question_answering")) is None  # no hidden states: nothing to store


def test_recommend_prints_the_strategy_and_the_teachers_layers(kdcache_home, trained_teacher):
    plain = run_cli(["recommend", "--task", "question_answering"], kdcache_home)
    assert "layers: bookend (the guide's [0, 1, 10, 11] for a 12-layer teacher)" in plain.stdout
    resolved = run_cli(["recommend", "--teacher", str(trained_teacher)], kdcache_home)  # a 4-layer BERT
    assert "layers: top_layers (the guide's [-1, -2, -3] for a 12-layer teacher); on the teacher's 4 layers: [2, 3, 4]" \
        in resolved.stdout
    assert "on the teacher's 4 layers: [0, 1, 2, 3]" in resolved.stdout  # QA's bookend
    assert "on the teacher's 4 layers: [0, 1, 3, 4]" in resolved.stdout  # generation's distributed


def test_a_four_layer_teacher_dumps_and_distils_the_mapped_layers(tmp_path, kdcache_home, trained_teacher, tiny_student,
                                                                   small_data):
    pipeline = write_pipeline(
        tmp_path / "p.yaml", model_name=str(tiny_student), teacher_model_name=str(trained_teacher),
        task_type="text_classification", train_file=str(small_data["train"]), max_length=48, batch_size=32,
        use_distillation=True, distill_hidden_states=True, num_epochs=1, output_dir=str(tmp_path / "student"),
        disable_tqdm=True, logging_steps=2)
    run_cli(["dump-teacher", "--config", str(pipeline)], kdcache_home)
    manifest = json.loads(next(kdcache_home.glob("*/manifest.json")).read_text())
    assert manifest["store"]["hidden"]["layers"] == [2, 3, 4]  # top_layers on 4 layers
    assert manifest["lookup_inputs"]["hidden"]["layers"] == "top_layers"
    run_cli(["train-student", "--config", str(pipeline)], kdcache_home)  # finds the cache by the same lookup inputs
    report = json.loads((tmp_path / "student" / "kdcache_report.json").read_text())
    assert sorted(int(k) for k in report["layer_map"]) == [2, 3, 4]
    assert any("loss_hidden" in h for h in report["log_history"])
