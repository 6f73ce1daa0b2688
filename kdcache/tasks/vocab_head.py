"""What tasks with a language-model head share (seq2seq and causal LM): the stored target ``logits``
is per position over the tokenizer's vocabulary, in mode ``topk`` (the k largest and the exact rest
mass at each stored temperature), ``sampled`` (k draws with counts) or ``full``; the config values
that decide it are part of the cache's lookup inputs; and a model must have an output row for
every token of its tokenizer (extra rows of a padded embedding matrix are tolerated, never stored)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from kdcache.cache.format import DEFAULT_TEMPERATURES, TargetSpec
from kdcache.config import FineTuneConfig
from kdcache.tasks.base import Task
from kdcache.tasks.data_checks import DataError

if TYPE_CHECKING:
    import torch


class VocabularyHead(Task):
    """A task whose model outputs a distribution over the vocabulary at each target position."""

    vocabulary_head = True
    field_defaults = {**Task.field_defaults, "logits_mode": "topk", "logits_k": 6}

    def target_params(self, config: FineTuneConfig) -> dict[str, Any]:
        params: dict[str, Any] = {"logits_mode": config.logits_mode}
        if config.logits_mode != "full":
            params.update(logits_k=config.logits_k, temperatures=temperatures(config))
        return params

    def check_vocabulary(self, model_config, tokenizer, who: str) -> Optional[str]:
        rows = output_rows(model_config)
        if rows is not None and rows < len(tokenizer):
            return (f"{who}: its output layer has {rows} rows but its tokenizer has {len(tokenizer)} tokens; "
                    "resize its embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))) and save it again")
        return None

    def output_rows(self, model_config) -> Optional[int]:
        return output_rows(model_config)

    def logits_spec(self, config: FineTuneConfig, tokenizer) -> TargetSpec:
        """``logits`` per position over the tokenizer's vocabulary (rows of a padded embedding matrix that no
        token reaches are not stored), in the config's mode."""
        vocab = len(tokenizer)
        if config.logits_mode == "full":
            return TargetSpec("logits", "position", vocab)
        if config.logits_k > vocab:
            raise DataError(f"logits_k (--logits-k) {config.logits_k} is larger than the vocabulary ({vocab} tokens): "
                            f"choose at most {vocab}")
        return TargetSpec("logits", "position", vocab, config.logits_mode, config.logits_k, tuple(temperatures(config)))

    def output_targets(self, outputs) -> dict[str, torch.Tensor]:
        return {"logits": outputs.logits}  # [B, P, V]


def temperatures(config: FineTuneConfig) -> list[float]:
    """The temperatures whose normalisers a topk / sampled cache stores, ascending."""
    return sorted({float(t) for t in (config.temperatures or DEFAULT_TEMPERATURES)})


def output_rows(model_config) -> Optional[int]:
    """Rows of the output layer (an EncoderDecoderModel's config nests the decoder's)."""
    decoder = getattr(model_config, "decoder", None)
    size = getattr(decoder, "vocab_size", None) if decoder is not None else None
    return size if size is not None else getattr(model_config, "vocab_size", None)
