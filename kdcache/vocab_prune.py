"""Vocabulary pruning of a student (TextPruner's technique): keep only the tokens the run's data tokenizes to,
plus the special and added tokens, remove the other word-embedding rows, and write a tokenizer that numbers the
kept tokens 0..K-1. A small encoder's word embeddings are most of its parameters (MiniLM: 11.7M of 22.7M), so
this is what makes a few-layer student of it small. The pruned model and tokenizer load with AutoModel* /
AutoTokenizer; text made of kept tokens tokenizes as before (ids renumbered), other words become the unknown token.

Only WordPiece and Unigram tokenizers are pruned: a subset of their vocabulary segments a kept word as the full
one did (longest match / best segmentation over pieces that are all still there). BPE's merges are not."""

from __future__ import annotations

import json
import tempfile
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from kdcache.models import ModelError

__all__ = ["PRUNABLE_MODELS", "kept_ids", "prune_tokenizer", "prune_embeddings", "id_map", "same_tokens", "prune_student"]

PRUNABLE_MODELS = ("WordPiece", "Unigram")  # tokenizer.json model types whose vocabulary can lose entries
_CONFIG_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id")


def kept_ids(tokenizer, id_lists: Iterable[Sequence[int]]) -> np.ndarray:
    """The sorted token ids to keep: every id in ``id_lists`` (the run's tokenized data), the special tokens and
    the added tokens. [K] int64."""
    keep = set(int(i) for i in tokenizer.all_special_ids)
    keep.update(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}))
    for ids in id_lists:
        keep.update(int(i) for i in ids)
    return np.asarray(sorted(keep), dtype=np.int64)


def id_map(keep: np.ndarray, vocab_size: int) -> np.ndarray:
    """old id -> new id ([vocab_size] int64; -1 for a removed token)."""
    old_to_new = np.full(vocab_size, -1, dtype=np.int64)
    old_to_new[keep] = np.arange(len(keep))
    return old_to_new


def _remap_ids(node, old_to_new: np.ndarray):
    """A post-processor / padding JSON node with its token ids renumbered (TemplateProcessing's ``ids`` lists,
    BertProcessing's / RobertaProcessing's ``[token, id]`` pairs, padding's ``pad_id``)."""
    if isinstance(node, list):
        return [_remap_ids(v, old_to_new) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "ids" and isinstance(value, list):
            out[key] = [int(old_to_new[i]) for i in value]
        elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
            out[key] = [value[0], int(old_to_new[value[1]])]
        elif key == "pad_id" and isinstance(value, int):
            out[key] = int(old_to_new[value])
        else:
            out[key] = _remap_ids(value, old_to_new)
    return out


def prune_tokenizer(tokenizer, keep: np.ndarray, who: str):
    """A copy of the fast ``tokenizer`` holding only the ``keep`` ids, renumbered in their order. It is written to a
    temporary folder and loaded back with AutoTokenizer, so that it is exactly what a saved student will load."""
    from transformers import AutoTokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"prune_vocabulary: {who} has a Python tokenizer ({type(tokenizer).__name__}) with no tokenizer.json "
                         "to prune: use a model with a fast tokenizer, or remove prune_vocabulary")
    state = json.loads(backend.to_str())
    model = state["model"]
    if model.get("type") not in PRUNABLE_MODELS:
        raise ModelError(f"prune_vocabulary: {who}'s tokenizer is {model.get('type')}, which cannot lose vocabulary entries "
                         f"(only {' and '.join(PRUNABLE_MODELS)} can): remove prune_vocabulary")
    size = backend.get_vocab_size(with_added_tokens=True)
    old_to_new = id_map(keep, size)
    if model["type"] == "WordPiece":
        model["vocab"] = {tok: int(old_to_new[i]) for tok, i in model["vocab"].items() if old_to_new[i] >= 0}
    else:  # Unigram: a list of [piece, score], the id being the position
        if model.get("unk_id") is not None:
            model["unk_id"] = int(old_to_new[model["unk_id"]])
        model["vocab"] = [model["vocab"][i] for i in keep if i < len(model["vocab"])]
    state["added_tokens"] = [{**t, "id": int(old_to_new[t["id"]])} for t in state.get("added_tokens", [])]
    for key in ("post_processor", "padding"):
        if state.get(key) is not None:
            state[key] = _remap_ids(state[key], old_to_new)
    with tempfile.TemporaryDirectory(prefix="kdcache-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        with open(f"{tmp}/tokenizer.json", "w") as f:
            json.dump(state, f, ensure_ascii=False)
        pruned = AutoTokenizer.from_pretrained(tmp)
    pruned.padding_side = tokenizer.padding_side
    if len(pruned) != len(keep):
        raise ModelError(f"prune_vocabulary: the pruned tokenizer of {who} has {len(pruned)} tokens, not the {len(keep)} kept: "
                         "its tokenizer.json has entries kdcache does not renumber; remove prune_vocabulary")
    return pruned


@torch.no_grad()
def prune_embeddings(model: nn.Module, keep: np.ndarray, who: str) -> nn.Module:
    """``model`` with its input embeddings cut to the ``keep`` rows (in order) and its config's vocab_size and
    special token ids renumbered. A model whose output layer is over the vocabulary (tied or not) is refused."""
    if model.get_output_embeddings() is not None:
        raise ModelError(f"prune_vocabulary: {who} has an output layer over its vocabulary, whose rows would have to go too: "
                         "remove prune_vocabulary (it serves models with a task head)")
    old = model.get_input_embeddings()  # [V, D]
    if int(keep[-1]) >= old.num_embeddings:
        raise ModelError(f"prune_vocabulary: {who}'s tokenizer has ids up to {int(keep[-1])} but its embeddings only "
                         f"{old.num_embeddings} rows: resize its embeddings to the tokenizer and save it again")
    old_to_new = id_map(keep, old.num_embeddings)
    config = model.config
    ids = {name: getattr(config, name, None) for name in _CONFIG_TOKEN_IDS}
    ids = {name: (int(old_to_new[v]) if v is not None and 0 <= v < len(old_to_new) and old_to_new[v] >= 0 else None)
           for name, v in ids.items() if v is not None}
    rows = old.weight[torch.as_tensor(keep, device=old.weight.device)].clone()  # [K, D]
    # from_pretrained draws no random numbers: a pruned run's dropout and data order stay those of the whole model's
    new = nn.Embedding.from_pretrained(rows, freeze=not old.weight.requires_grad, padding_idx=ids.get("pad_token_id"))
    model.set_input_embeddings(new)
    config.vocab_size = len(keep)
    for name, value in ids.items():
        setattr(config, name, value)
    return model


def same_tokens(before: Iterable[Sequence[int]], after: Iterable[Sequence[int]], old_to_new: np.ndarray) -> int:
    """The first position (feature number) where ``after`` (the pruned tokenizer's ids) is not ``before`` renumbered,
    or -1 when every feature tokenizes the same: the check that pruning changed ids, never tokens."""
    for n, (b, a) in enumerate(zip(before, after, strict=True)):
        if not np.array_equal(old_to_new[np.asarray(b, dtype=np.int64)], np.asarray(a, dtype=np.int64)):
            return n
    return -1


def prune_student(model: nn.Module, tokenizer, task, config, labels, splits: list, features: list, who: str):
    """Prune the student and its tokenizer to the ids of ``features`` (the run's features of each of ``splits``, cut by
    ``tokenizer``), then cut ``splits`` again with the pruned tokenizer and check that every feature holds the same
    tokens as before, renumbered (a ModelError names the first that does not).

    Returns (model, pruned tokenizer, the features cut by it, one per split; None stays None)."""
    from kdcache import data as kdata

    kept = [f for f in features if f is not None]
    keep = kept_ids(tokenizer, (ids for f in kept for ids in f["input_ids"]))
    before = model.get_input_embeddings().num_embeddings
    pruned = prune_tokenizer(tokenizer, keep, who)
    model = prune_embeddings(model, keep, who)
    old_to_new = id_map(keep, max(before, len(tokenizer)))
    recut = []
    for split, rows, old in zip(("train", "eval"), splits, features):
        if old is None:
            recut.append(None)
            continue
        new = kdata.make_features(task, rows, pruned, config, labels, split)
        bad = same_tokens(old["input_ids"], new["input_ids"], old_to_new)
        if bad >= 0:
            raise ModelError(f"prune_vocabulary: {split} feature {bad} tokenizes differently with the pruned tokenizer of {who}: "
                             "its tokenizer cannot be pruned safely; remove prune_vocabulary")
        recut.append(new)
    return model, pruned, recut
