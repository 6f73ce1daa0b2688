"""FineTuneConfig: the guide's configuration snippets, validation errors that name the field,
and YAML pipelines whose unknown keys are errors."""

from __future__ import annotations

import pytest

from kdcache import ConfigError, FineTuneConfig


def test_guide_basic_configuration_runs_as_written():
    # The guide's "Basic Configuration" snippet, import line changed.
    config = FineTuneConfig(
        model_name="distilbert-base-uncased",  # Student model
        task_type="text_classification",
        use_distillation=True,
        teacher_model_name="bert-large-uncased",
        distillation_alpha=0.5,  # Weight between soft and hard targets
        temperature=2.0,  # Softening temperature
    )
    assert config.distillation_alpha == 0.5 and config.temperature == 2.0 and config.distill_logits


def test_guide_advanced_configuration_runs_as_written():
    config = FineTuneConfig(
        model_name="distilbert-base-uncased",
        task_type="text_classification",
        use_distillation=True,
        teacher_model_name="bert-large-uncased",
        distillation_alpha=0.7,
        temperature=3.0,
        distill_logits=True,
        distill_hidden_states=True,
        teacher_layers_to_distill=[0, 6, 11],
        batch_size=32,
        learning_rate=2e-5,
        num_epochs=3,
    )
    assert config.teacher_layers_to_distill == [0, 6, 11]


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("task_type", "image_generation", "unknown task"),
        ("distillation_alpha", 1.5, "[0, 1]"),
        ("temperature", 0.0, "> 0"),
        ("batch_size", 0, "positive integer"),
        ("learning_rate", -1.0, "> 0"),
        ("hidden_dtype", "int4", "float16, int8"),
        ("hidden_pooling", "max", "none, cls, mean"),
        ("teacher_layers_to_distill", [], "non-empty list"),
        ("train_file", "data.txt", ".jsonl"),
        ("lr_scheduler_type", "step", "linear, constant"),
    ],
)
def test_invalid_values_name_the_field_and_flag(field, value, words):
    with pytest.raises(ConfigError) as err:
        FineTuneConfig(model_name="m", **{field: value})
    message = str(err.value)
    assert f"FineTuneConfig.{field}" in message
    assert "--" + field.replace("_", "-") in message
    assert words in message


def test_distillation_with_nothing_to_distil_is_an_error():
    with pytest.raises(ConfigError, match="use_distillation"):
        FineTuneConfig(model_name="m", use_distillation=True, distill_logits=False, distill_hidden_states=False)


def test_scheduler_reaches_the_trainer_and_constant_with_warmup_is_the_advice(tmp_path):
    """lr_scheduler_type is the Trainer's own schedule; "constant" with a warm-up is refused, and the advice works."""
    from kdcache.train import training_arguments

    args = training_arguments(FineTuneConfig(model_name="m", lr_scheduler_type="cosine"), tmp_path, ("labels",))
    assert args.lr_scheduler_type == "cosine"
    with pytest.raises(ConfigError, match="set lr_scheduler_type to constant_with_warmup, or warmup_ratio to 0"):
        FineTuneConfig(model_name="m", lr_scheduler_type="constant", warmup_ratio=0.1)
    config = FineTuneConfig(model_name="m", lr_scheduler_type="constant_with_warmup", warmup_ratio=0.1)
    args = training_arguments(config, tmp_path, ("labels",))
    assert (args.lr_scheduler_type, args.get_warmup_steps(100)) == ("constant_with_warmup", 10)


def test_transfer_set_fields_are_checked():
    """A transfer proportion needs a transfer set and both kinds of row in a batch; transfer rows need distillation."""
    base = dict(model_name="m", use_distillation=True, transfer_file="t.jsonl", batch_size=4)
    for extra, words in (({"transfer_proportion": 0.1}, "gives 0 transfer rows per batch"),
                         ({"transfer_proportion": 0.9}, "gives 4 transfer rows per batch"),
                         ({"transfer_proportion": 0.5, "transfer_file": None}, "there is no transfer set"),
                         ({"use_distillation": False}, "needs use_distillation: true"),
                         ({"transfer_file": "t.txt"}, "must end in .json")):
        with pytest.raises(ConfigError, match=words):
            FineTuneConfig(**{**base, **extra})
    assert FineTuneConfig(**base, transfer_proportion=0.25).transfer_proportion == 0.25  # 1 of 4 rows


def test_yaml_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model_name: m\ndistilation_alpha: 0.3\n")
    with pytest.raises(ConfigError) as err:
        FineTuneConfig.from_yaml(path)
    assert "'distilation_alpha'" in str(err.value) and "distillation_alpha" in str(err.value)


def test_yaml_values_are_coerced_and_overrides_win(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model_name: m\nteacher_layers_to_distill: [-1, -2]\nuse_distillation: true\nnum_epochs: 2\n")
    config = FineTuneConfig.from_yaml(path, {"num_epochs": "5", "use_mixed_precision": "true", "layer_map": "12: 6"})
    assert config.teacher_layers_to_distill == [-1, -2]
    assert config.num_epochs == 5.0 and config.use_mixed_precision is True and config.layer_map == {12: 6}


def test_cli_strings_that_are_not_numbers_are_errors():
    with pytest.raises(ConfigError, match="batch_size"):
        FineTuneConfig.from_dict({"model_name": "m", "batch_size": "lots"})


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = FineTuneConfig(model_name="m", use_distillation=True, distill_hidden_states=True, layer_map={4: 2})
    config.save(tmp_path / "c.yaml")
    assert FineTuneConfig.from_yaml(tmp_path / "c.yaml") == config


def test_the_defaults_are_the_recommended_recipe():
    """`kdcache recommend` says the config's defaults are the measured recipe (docs/recipe.md): they must be."""
    from kdcache.recommend import format_recommendations, recommended_recipe

    config = FineTuneConfig(model_name="m")
    recipe = recommended_recipe("text_classification")
    assert {k: getattr(config, k) for k in recipe} == recipe
    assert "lr_scheduler_type=constant_with_warmup, warmup_ratio=0.1, learning_rate=0.0001" in format_recommendations()


def test_recommend_prints_each_task_s_default_temperature():
    """The temperature `kdcache recommend --task T` prints is the one a run of that task gets when none is set
    (train.py resolves it with default_temperature); token classification's is measured (docs/recipe.md)."""
    import re

    from kdcache.recommend import TEMPERATURE_GUIDE, default_temperature, format_recommendations
    from kdcache.tasks import task_names

    for task in task_names():
        printed = re.search(r"^  temperature: (.+)$", format_recommendations(task), re.M).group(1)
        if task == "text_classification":
            assert printed == f"{default_temperature(task, 2)} (binary), {default_temperature(task, 6)} (multi-class)"
        else:
            assert float(printed) == default_temperature(task, None), task
    assert default_temperature("token_classification") == TEMPERATURE_GUIDE["token_classification"] == 1.0
    assert default_temperature("text_classification", 7) == TEMPERATURE_GUIDE["multi_class_classification"] == 1.0


def test_a_transfer_set_at_alpha_0_is_refused_then_the_advice_works():
    """At distillation_alpha 0 (and no hidden term) transfer rows would get no loss at all: refused, naming the fix."""
    fields = dict(model_name="m", use_distillation=True, transfer_file="t.jsonl")
    with pytest.raises(ConfigError, match=r"raise distillation_alpha \(--distillation-alpha\) or remove transfer_file"):
        FineTuneConfig(**fields, distillation_alpha=0.0)
    assert FineTuneConfig(**fields, distillation_alpha=0.5).transfer_file == "t.jsonl"
    hidden = FineTuneConfig(**fields, distillation_alpha=0.0, distill_hidden_states=True)  # the hidden term teaches them
    assert hidden.distill_hidden_states
