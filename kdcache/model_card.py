"""The saved student's Hugging Face model card (README.md in its folder): the hub's YAML metadata (base model, teacher,
datasets, metrics, tags, library) and a body with how it was made, so that a student pushed to a hub says so.

Built with huggingface_hub's ModelCard / ModelCardData (installed with transformers), which validate the header."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from kdcache.cache.durable import write_atomic
from kdcache.config import FineTuneConfig
from kdcache.recommend import teacher_name_for

CARD_NAME = "README.md"
MARKER = "<!-- written by kdcache: rewritten by train-student and kdcache compare -->"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "owner/name"; a local path is not one
# The guide's "Evaluation Criteria", as `kdcache compare` checks them (kdcache/evaluation/report.py).
CRITERIA = ("metric >= 90% of the teacher's", "inference >= 50% faster", "size >= 40% smaller")


def hub_id(name: Optional[str]) -> Optional[str]:
    """``name`` when it reads as a hub repository id and is no local folder, else None (a local path in the header
    would be refused by the hub, and says nothing to a reader elsewhere)."""
    if not name or Path(name).exists() or not _HUB_ID.match(name):
        return None
    return name


def _eval_source(config: FineTuneConfig) -> tuple[str, str]:
    """(dataset type, dataset name) of the eval split, as the model-index names them."""
    if config.eval_file:
        return "json", Path(config.eval_file).name
    return config.dataset_name or "json", config.dataset_name or "unknown"


def _settings(config: FineTuneConfig, temperature: Optional[float], layer_map: dict) -> list[tuple[str, str]]:
    rows = [("training", f"{config.num_epochs:g} epochs, learning_rate {config.learning_rate:g} ({config.lr_scheduler_type}), "
                         f"batch_size {config.batch_size}, seed {config.seed}")]
    if not config.use_distillation:
        return [("distillation", "none: fine-tuned on the labels alone (use_distillation: false)")] + rows
    t = temperature or config.temperature
    t_text = f"{t:g}" if t else "the task default"
    rows = [("teacher", teacher_name_for(config)),
            ("logits", f"KL at temperature {t_text}, distillation_alpha {config.distillation_alpha:g}"
                       + (f", {config.logits_mode} logits (k {config.logits_k})" if config.logits_mode not in (None, "full") else "")
             if config.distill_logits else "not distilled"),
            ("hidden states", (f"teacher layer -> student layer {layer_map}, {config.hidden_dtype} in the cache, "
                               f"hidden_loss_weight {config.hidden_loss_weight:g}") if config.distill_hidden_states and layer_map
             else "not distilled")] + rows
    return rows


def build_card(config: FineTuneConfig, metrics: dict[str, float], metric: str, temperature: Optional[float] = None,
               layer_map: Optional[dict] = None, criteria: Optional[list[dict[str, Any]]] = None):
    """The student's ModelCard from its run: ``metrics`` are its eval metrics without the ``eval_`` prefix,
    ``metric`` the task's primary one, ``criteria`` the guide's criteria as `kdcache compare` measured them
    (report.json's ``criteria``) or None before a compare."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from kdcache.tasks import task_class

    hub_task = task_class(config.task_type).hub_task  # None for a task the hub has no id for: no pipeline tag, no results
    teacher = teacher_name_for(config) if config.use_distillation else None
    base, dataset = hub_id(config.model_name), hub_id(config.dataset_name)
    name = Path(config.output_dir).name
    results = None
    if metric in metrics and hub_task:
        dataset_type, dataset_name = _eval_source(config)
        results = [EvalResult(task_type=hub_task, dataset_type=dataset_type, dataset_name=dataset_name, metric_type=metric,
                              metric_value=round(float(metrics[metric]), 4),
                              dataset_split=None if config.eval_file else config.eval_split)]
    data = ModelCardData(
        model_name=name, base_model=base, datasets=[dataset] if dataset else None, library_name="transformers",
        pipeline_tag=hub_task, metrics=[metric], eval_results=results,
        tags=["kdcache"] + (["knowledge-distillation", "distillation"] if teacher else []),
        **({"teacher_model": teacher} if teacher else {}),
    )
    made = (f"distilled from the teacher `{teacher}` by kdcache (knowledge distillation)"
            if teacher else "fine-tuned plainly by kdcache (no distillation): a baseline")
    lines = [MARKER, "", f"# {name}", "",
             f"A {config.task_type.replace('_', ' ')} student initialised from `{config.model_name}`, {made}.", "",
             "## Data", "",
             f"- training: {config.train_file or (str(config.dataset_name) + ' / ' + config.train_split)}"
             + (f", plus the transfer set {config.transfer_file}" if config.transfer_file else ""),
             f"- evaluation: {config.eval_file or (str(config.dataset_name) + ' / ' + config.eval_split if config.dataset_name else 'none')}",
             "", "## Results", ""]
    lines += (["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in metrics.items()
                                                     if isinstance(v, (int, float))]) if metrics else ["No evaluation data."]
    lines += ["", "## The guide's criteria", ""]
    if criteria:
        verdict = {True: "pass", False: "FAIL", None: "not measured"}
        lines += ["| criterion | figure | result |", "|---|---|---|"]
        lines += [f"| {c['criterion']} | {c['figure']} | {verdict[c['passed']]} |" for c in criteria]
    elif teacher:
        lines += [f"Not measured yet: `kdcache compare` measures them ({', '.join(CRITERIA)}) and rewrites this card."]
    else:
        lines += ["A plain student has no teacher to be measured against."]
    lines += ["", "## How it was made", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _settings(config, temperature, layer_map or {})]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def ours_or_absent(folder: Path) -> bool:
    """Whether kdcache may write the card in ``folder``: no README.md there, or one that kdcache wrote."""
    path = folder / CARD_NAME
    if path.is_symlink():
        return False
    return not path.exists() or MARKER in path.read_text(errors="replace")


def write_card(folder: Path, card) -> Optional[Path]:
    """Save ``card`` as folder/README.md unless a README.md that kdcache did not write is there; returns its path or None."""
    if not ours_or_absent(folder):
        return None
    path = folder / CARD_NAME
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, str(card))  # what ModelCard.save writes, replaced whole and never through a link
    return path


def card_from_run(folder: Path, criteria: Optional[list[dict[str, Any]]] = None, metrics: Optional[dict[str, float]] = None):
    """The card of a student that train-student saved in ``folder`` (its kdcache_config.yaml and kdcache_report.json),
    with ``criteria`` and ``metrics`` as `kdcache compare` measured them; None when the folder holds no such run."""
    import json

    from kdcache.tasks import get_task
    from kdcache.train import CONFIG_NAME, REPORT_NAME

    if not (folder / CONFIG_NAME).is_file() or not (folder / REPORT_NAME).is_file():
        return None
    config = FineTuneConfig.from_yaml(folder / CONFIG_NAME)
    run = json.loads((folder / REPORT_NAME).read_text())
    if metrics is None:
        metrics = {k[len("eval_"):]: v for k, v in (run.get("eval") or {}).items() if k.startswith("eval_") and k != "eval_features"}
    layer_map = {int(k): v for k, v in (run.get("layer_map") or {}).items()}
    return build_card(config, metrics, get_task(config.task_type).primary_metric(), run.get("temperature"), layer_map, criteria)
