"""Summarization and translation: an encoder-decoder writes a target text; the teacher is scored with
teacher forcing on the reference targets (or on its own generated ones, sequence-level KD).

One feature per example: the source truncated to ``max_length``, the target (``labels``, ending in
the tokenizer's end token) at most ``max_target_length`` tokens. The language-model head has a
vocabulary of outputs per decoder position, so the stored target ``logits`` is per position in
mode ``topk`` (the k largest and the exact rest mass at each stored temperature), ``sampled``
(k draws with counts) or ``full``. With ``sequence_kd`` the cache also stores the generated targets
(``labels``, mode ``tokens``), which replace the references in training.
Metrics: ROUGE (rouge-score) for summarization, BLEU and chrF (sacrebleu) for translation, on
generated text (``num_beams``, ``max_new_tokens``, ``length_penalty``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from kdcache.cache.format import TargetSpec
from kdcache.config import FineTuneConfig
from kdcache.tasks.columns import EXAMPLE_ID, IGNORE_INDEX, MODEL_INPUT_KEYS, ensure_example_ids, example_positions
from kdcache.tasks.data_checks import DataError
from kdcache.tasks.evaluation import inference_mode
from kdcache.tasks.labels import LabelInfo
from kdcache.tasks.vocab_head import VocabularyHead

if TYPE_CHECKING:
    import torch

TEXT = "text"  # the output field of infer(): generated text per feature


class Seq2SeqTask(VocabularyHead):
    """What summarization and translation share; subclasses say where source and reference come from."""

    auto_class = "AutoModelForSeq2SeqLM"
    forward_keys = ("input_ids", "attention_mask", "labels")  # teacher forcing: the decoder reads the targets
    generates = True

    # -- what a subclass provides -----------------------------------------------------------------
    def sources(self, batch: dict[str, list], config: FineTuneConfig) -> list[str]:
        raise NotImplementedError

    def references(self, batch: dict[str, list], config: FineTuneConfig) -> list[str]:
        raise NotImplementedError

    def has_references(self, dataset, config: FineTuneConfig) -> bool:
        raise NotImplementedError

    # -- data ------------------------------------------------------------------------------------
    def label_info(self, train_dataset, config: FineTuneConfig) -> LabelInfo:
        return LabelInfo(0)  # the labels are text: no label vocabulary beyond the tokenizer's

    def feature_params(self, config: FineTuneConfig) -> dict[str, Any]:
        return {"max_length": config.max_length, "max_target_length": config.max_target_length,
                "source_prefix": config.source_prefix}

    def target_params(self, config: FineTuneConfig) -> dict[str, Any]:
        params = super().target_params(config)
        if config.sequence_kd:
            params["sequence_kd"] = {"num_beams": config.num_beams, "max_new_tokens": _max_new_tokens(config),
                                     "length_penalty": config.length_penalty}
        return params

    def tokenize(self, dataset, tokenizer, config: FineTuneConfig, labels: LabelInfo, split: str):
        """One feature per example: ``input_ids``/``attention_mask`` of the source, ``length`` (source
        tokens) and ``labels`` (target ids) when the split has references. A training target longer than
        max_target_length, or empty, is an error that names the example."""
        dataset = ensure_example_ids(dataset)
        with_targets = self.has_references(dataset, config)

        def encode(batch):
            enc = tokenizer([config.source_prefix + s for s in self.sources(batch, config)], truncation=True,
                            max_length=config.max_length, return_token_type_ids=False)
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            if with_targets:
                refs = self.references(batch, config)
                targets = tokenizer(text_target=refs, truncation=split != "train", max_length=config.max_target_length,
                                    return_token_type_ids=False)["input_ids"]
                if split == "train":
                    _check_targets(targets, refs, batch[EXAMPLE_ID], tokenizer, config)
                enc["labels"] = targets
            return dict(enc)

        remove = [c for c in dataset.column_names if c != EXAMPLE_ID]
        features = dataset.map(encode, batched=True, remove_columns=remove, desc=f"tokenizing {split}")
        if with_targets and split == "train":
            _check_target_lengths(features, config)
        return features

    # -- models ----------------------------------------------------------------------------------
    def hidden_config(self, model_config):
        return getattr(model_config, "encoder", None) or model_config  # EncoderDecoderConfig nests its encoder's

    def hidden_states(self, outputs) -> tuple[torch.Tensor, ...]:
        return outputs.encoder_hidden_states  # over the source tokens (what n_tokens and attention_mask cover)

    # -- targets -----------------------------------------------------------------------------------
    def target_specs(self, labels: LabelInfo, config: Optional[FineTuneConfig] = None, tokenizer=None) -> list[TargetSpec]:
        """``logits`` per decoder position over the vocabulary, plus ``labels`` (tokens) with sequence_kd."""
        if config is None or tokenizer is None:
            raise ValueError(f"{self.name}: target_specs needs the config and the tokenizer (the vocabulary is the width)")
        specs = [self.logits_spec(config, tokenizer)]
        if config.sequence_kd:
            specs.append(TargetSpec("labels", "position", len(tokenizer), "tokens"))
        return specs

    def kd_view(self, name: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return logits, batch["labels"] != IGNORE_INDEX  # [B, P, V], [B, P]: the target positions carry loss

    def position_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["labels"] != IGNORE_INDEX  # [B, P]: decoder positions (labels are right-padded with -100)

    def generate_targets(self, model, batch: dict[str, torch.Tensor], config: FineTuneConfig, tokenizer) -> dict[str, torch.Tensor]:
        """The teacher's own outputs as labels [B, P]: generated ids after the decoder's start token, up to
        and including the end token, -100 beyond."""
        import torch

        out = _generate(model, batch, config)  # [B, 1 + P]
        ids = out[:, 1:]  # drop the decoder start token
        eos = model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        is_end = ids == eos if eos is not None else torch.zeros_like(ids, dtype=torch.bool)
        after = (is_end.long().cumsum(1) - is_end.long()) > 0  # [B, P] strictly after the first end token (generate's padding)
        return {"labels": ids.masked_fill(after, IGNORE_INDEX)}

    # -- evaluation --------------------------------------------------------------------------------
    @inference_mode
    def infer(self, model, tokenizer, batch: dict[str, torch.Tensor], config: FineTuneConfig) -> dict[str, list[Any]]:
        """Generated text per feature (the settings num_beams, max_new_tokens, length_penalty)."""
        out = _generate(model, batch, config)
        return {TEXT: [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]}

    def predictions(self, features, outputs: dict[str, list[Any]], examples, labels: LabelInfo, config: FineTuneConfig) -> list[Any]:
        position = example_positions(examples)
        preds: list[Any] = [""] * len(examples)
        for example_id, text in zip(features[EXAMPLE_ID], outputs[TEXT]):
            preds[position[int(example_id)]] = text
        return preds


class Summarization(Seq2SeqTask):
    name = "summarization"
    field_defaults = {**Seq2SeqTask.field_defaults, "max_length": 512, "max_target_length": 128, "text_column": "document",
                      "summary_column": "summary"}
    hub_task = "summarization"

    def input_columns(self, config: FineTuneConfig) -> list[str]:
        return [config.text_column, config.summary_column]

    def column_fields(self, need_labels: bool) -> list[tuple[str, str]]:
        fields = [("text_column", "the document to summarize")]
        return fields + ([("summary_column", "the reference summary")] if need_labels else [])

    def value_fields(self, config: FineTuneConfig, need_labels: bool) -> list[tuple[str, str]]:
        return [("text_column", "text")] + ([("summary_column", "texts")] if need_labels else [])  # several references allowed

    def sources(self, batch, config):
        return [str(t) for t in batch[config.text_column]]

    def references(self, batch, config):
        return [_first(r) for r in batch[config.summary_column]]

    def has_references(self, dataset, config):
        return config.summary_column in dataset.column_names

    def compute_metrics(self, predictions: list[Any], examples, labels: LabelInfo, config: FineTuneConfig) -> dict[str, float]:
        """ROUGE-1/2/L/Lsum F1 ×100 (rouge-score, Porter stemming; the best over several references)."""
        from rouge_score import rouge_scorer

        keys = ("rouge1", "rouge2", "rougeL", "rougeLsum")
        scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
        totals = dict.fromkeys(keys, 0.0)
        refs = examples[config.summary_column]
        for pred, ref in zip(predictions, refs):
            scores = scorer.score_multi(ref if isinstance(ref, list) else [str(ref)], pred or "")
            for key in keys:
                totals[key] += scores[key].fmeasure
        n = max(len(predictions), 1)
        return {key: 100.0 * value / n for key, value in totals.items()}

    def primary_metric(self) -> str:
        return "rougeL"


class Translation(Seq2SeqTask):
    name = "translation"
    field_defaults = {**Seq2SeqTask.field_defaults, "max_target_length": 128, "text_column": "translation"}
    hub_task = "translation"

    def input_columns(self, config: FineTuneConfig) -> list[str]:
        return [config.text_column]

    def column_fields(self, need_labels: bool) -> list[tuple[str, str]]:
        return [("text_column", "the {language: text} translation pairs")]

    def value_fields(self, config: FineTuneConfig, need_labels: bool) -> list[tuple[str, str]]:
        return []  # dicts: check_columns checks each row's languages

    def feature_params(self, config: FineTuneConfig) -> dict[str, Any]:
        return {**super().feature_params(config), "source_lang": config.source_lang, "target_lang": config.target_lang}

    def check_columns(self, dataset, config: FineTuneConfig, split: str, need_labels: bool) -> None:
        super().check_columns(dataset, config, split, need_labels)
        first = dataset[0][config.text_column]
        if not isinstance(first, dict):
            raise DataError(f"column {config.text_column!r} must hold {{language: text}} dicts (Hugging Face translation "
                            f"layout), got {type(first).__name__}; set text_column (--text-column) to that column")
        langs = ", ".join(sorted(first))
        wanted = [("source_lang", config.source_lang)] + ([("target_lang", config.target_lang)] if need_labels else [])
        for option, lang in wanted:
            if lang is None or lang not in first:
                what = "is not set" if lang is None else f"is {lang!r}, not a key of the translation dicts"
                raise DataError(f"{option} (--{option.replace('_', '-')}) {what}: set it to one of the {split} data's languages ({langs})")
        wanted_langs = [lang for _, lang in wanted]
        for lo in range(0, len(dataset), 50_000):
            for i, pair in enumerate(dataset[lo:lo + 50_000][config.text_column], start=lo):
                bad = next((lang for lang in wanted_langs if not isinstance(pair, dict) or not isinstance(pair.get(lang), str)), None)
                if bad is not None:
                    value = pair.get(bad) if isinstance(pair, dict) else pair
                    raise DataError(f"{split} data row {i} (counting from 0): column {config.text_column!r} holds "
                                    f"{'null' if value is None else repr(value)[:40]} for language {bad!r}, not a text: "
                                    "every row needs a string per language; fix or drop that row")

    def sources(self, batch, config):
        return [str(pair[config.source_lang]) for pair in batch[config.text_column]]

    def references(self, batch, config):
        return [str(pair[config.target_lang]) for pair in batch[config.text_column]]

    def has_references(self, dataset, config):
        return config.target_lang is not None and len(dataset) > 0 and config.target_lang in dataset[0][config.text_column]

    def compute_metrics(self, predictions: list[Any], examples, labels: LabelInfo, config: FineTuneConfig) -> dict[str, float]:
        """Corpus BLEU and chrF (sacrebleu's defaults: 13a tokenisation, chrF with character 6-grams)."""
        import sacrebleu

        refs = [str(pair[config.target_lang]) for pair in examples[config.text_column]]
        hyps = [p or "" for p in predictions]
        return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score}

    def primary_metric(self) -> str:
        return "bleu"


# ------------------------------------------------------------------------------------------------------
def _max_new_tokens(config: FineTuneConfig) -> int:
    return int(config.max_new_tokens or config.max_target_length)


def _first(value: Any) -> str:
    """A reference text: the first of several references."""
    if isinstance(value, (list, tuple)):
        return str(value[0]) if value else ""
    return str(value)


def _generate(model, batch: dict[str, torch.Tensor], config: FineTuneConfig) -> torch.Tensor:
    """model.generate on a padded batch with the config's settings: ids [B, 1 + P] (decoder start first)."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS and k != "token_type_ids"}
    return model.generate(**inputs, num_beams=config.num_beams, max_new_tokens=_max_new_tokens(config),
                          length_penalty=config.length_penalty, do_sample=False)


def _check_targets(targets: list[list[int]], refs: list[str], example_ids, tokenizer, config: FineTuneConfig) -> None:
    """Training targets must hold text: an empty target teaches the model to stop at once."""
    special = set(tokenizer.all_special_ids)
    for ids, ref, eid in zip(targets, refs, example_ids):
        if not ref.strip() or all(i in special for i in ids):
            raise DataError(f"the target of training example {int(eid)} is empty: every training example needs a reference "
                            "text; remove the empty ones")


def _check_target_lengths(features, config: FineTuneConfig) -> None:
    """Training targets must fit max_target_length (a cut target teaches the wrong end): the error names the
    first one too long and the longest of the split, so that its advice works in one step."""
    lengths = np.asarray([len(ids) for ids in features["labels"]])  # [F] target tokens
    over = np.nonzero(lengths > config.max_target_length)[0]
    if not over.size:
        return
    ids = features[EXAMPLE_ID]
    first, longest = int(over[0]), int(np.argmax(lengths))
    raise DataError(f"the target of training example {int(ids[first])} has {int(lengths[first])} tokens, more than max_target_length "
                    f"({config.max_target_length}); {over.size} training targets are, the longest {int(lengths[longest])} tokens "
                    f"(example {int(ids[longest])}): set max_target_length to {int(lengths[longest])} or more "
                    f"(--max-target-length {int(lengths[longest])}), or shorten the targets")
