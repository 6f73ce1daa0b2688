"""Causal language modelling: a decoder-only model (GPT-2, Llama, Qwen shapes: any
``AutoModelForCausalLM``) predicts each next token; the teacher is scored with teacher forcing on the
data's own text, so its cache is the teacher's view of the user's data (no generation).

Data, one example per row:
- plain text from ``text_column``, optionally after a ``prompt_column`` (prompt/completion data)
  whose tokens carry no loss, and with ``ignore_spans_column`` marking character spans
  ``[[start, end], ...]`` of the text that carry none (tool outputs, say);
- or chat conversations from ``messages_column`` (lists of ``{role, content}``), rendered with the
  tokenizer's chat template: only assistant turns carry loss (the turn's end marker included), and an
  assistant turn with ``"weight": 0`` carries none (the OpenAI fine-tuning convention).

Plain text ends with the tokenizer's end-of-sequence token, so a model learns where a text stops.

Features: one per example, at most ``max_length`` tokens (a longer example is an error that names
it); with ``packing``, the examples are concatenated and cut into ``max_length`` blocks (as
transformers' run_clm example does), with position ids restarting at each example so that attention
stays inside it (transformers builds the block-diagonal mask from position_ids when no
attention_mask is passed).

Targets: ``logits`` per position whose next token carries loss (masked positions are not stored), in
mode topk / sampled / full (:mod:`kdcache.tasks.vocab_head`), and ``offsets``: per stored position the
character offsets (context_end, target_end) of the text the model has read and of the token it
predicts, so that a student with another tokenizer can align its own positions
(:mod:`kdcache.cross_tokenizer`). Metric: perplexity of the loss-carrying tokens."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from kdcache.cache.format import TargetSpec
from kdcache.config import FineTuneConfig, field_error
from kdcache.tasks.columns import EXAMPLE_ID, IGNORE_INDEX, ensure_example_ids, example_positions
from kdcache.tasks.data_checks import DataError, user_columns
from kdcache.tasks.evaluation import inference_mode
from kdcache.tasks.labels import LabelInfo
from kdcache.tasks.vocab_head import VocabularyHead

if TYPE_CHECKING:
    import torch

OFFSETS = "offsets"  # feature column and stored target: [n_positions, 2] (context_end, target_end) characters
NLL, TOKENS = "nll", "tokens"  # infer() outputs per feature: summed negative log-likelihood, tokens scored


class CausalLM(VocabularyHead):
    name = "causal_lm"
    field_defaults = {**VocabularyHead.field_defaults, "max_length": 512, "text_column": "text"}
    own_fields = ("messages_column", "prompt_column", "ignore_spans_column", "packing", "cross_tokenizer")
    generates = True
    hub_task = "text-generation"
    auto_class = "AutoModelForCausalLM"
    input_keys = ("input_ids", "attention_mask", "position_ids")
    forward_keys = ("input_ids", "attention_mask", "position_ids")
    feature_target_keys = (OFFSETS,)
    lower_is_better = True

    def check_config(self, config: FineTuneConfig) -> None:
        """The data layouts exclude each other: chat data or prompt/completion columns; sequence-level KD needs the
        prompts it answers; cross-tokenizer alignment works on each example's own text, never a packed block."""
        super().check_config(config)
        if config.messages_column and (config.prompt_column or config.ignore_spans_column):
            raise field_error("messages_column", "chat data marks its prompts by role: remove prompt_column and ignore_spans_column")
        if config.sequence_kd and not (config.prompt_column or config.messages_column):
            raise field_error("sequence_kd", "has the teacher answer each example's prompt: set prompt_column or messages_column")
        if config.cross_tokenizer and config.packing:
            raise field_error("cross_tokenizer", "aligns each example's own text: turn packing off (a packed block mixes examples)")

    # -- data ------------------------------------------------------------------------------------
    def input_columns(self, config: FineTuneConfig) -> list[str]:
        if config.messages_column:
            return [config.messages_column]
        return [c for c in (config.prompt_column, config.text_column, config.ignore_spans_column) if c]

    def column_fields(self, need_labels: bool) -> list[tuple[str, str]]:
        return [("messages_column", "the chat conversations (lists of {role, content})"),
                ("prompt_column", "the prompt before each text (it carries no loss)"),
                ("ignore_spans_column", "character spans [[start, end], ...] of the text that carry no loss")]

    def value_fields(self, config: FineTuneConfig, need_labels: bool) -> list[tuple[str, str]]:
        # chat conversations and ignore spans are checked row by row as they are encoded
        return [] if config.messages_column else [("prompt_column", "text"), ("text_column", "text")]

    def check_columns(self, dataset, config: FineTuneConfig, split: str, need_labels: bool) -> None:
        super().check_columns(dataset, config, split, need_labels)
        if not config.messages_column and config.text_column not in dataset.column_names:
            raise DataError(f"the {split} dataset has no column {config.text_column!r} (its columns: "
                            f"{', '.join(user_columns(dataset))}); set text_column (--text-column) to the column holding the text, "
                            "or messages_column (--messages-column) to a column of chat conversations")

    def label_info(self, train_dataset, config: FineTuneConfig) -> LabelInfo:
        return LabelInfo(0)  # the labels are the text's own next tokens

    def feature_params(self, config: FineTuneConfig) -> dict[str, Any]:
        return {"max_length": config.max_length, "packing": config.packing, "prompt_column": config.prompt_column,
                "messages_column": config.messages_column, "ignore_spans_column": config.ignore_spans_column}

    def tokenize(self, dataset, tokenizer, config: FineTuneConfig, labels: LabelInfo, split: str):
        """Features of ``split``: ``input_ids``, ``attention_mask``, ``labels`` (the token, or -100 where it
        carries no loss), ``offsets`` of the positions whose next token carries loss, ``length``, and
        ``position_ids`` when packing. Errors name the example: too long, nothing to learn, a bad chat."""
        dataset = ensure_example_ids(dataset)
        encode = _ChatEncoder(tokenizer, config) if config.messages_column else _TextEncoder(tokenizer, config)
        packing = config.packing  # eval too: its perplexity is a sum over tokens, whichever block holds them

        def encode_batch(batch):
            out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "spans", "length")}
            for i, example_id in enumerate(batch[EXAMPLE_ID]):
                ids, carries, spans = encode({k: v[i] for k, v in batch.items()}, int(example_id), split)
                if not packing and len(ids) > config.max_length:
                    raise _too_long(int(example_id), len(ids), split, config)
                out["input_ids"].append(ids)
                out["labels"].append([t if c else IGNORE_INDEX for t, c in zip(ids, carries)])
                out["spans"].append(spans)
                out["length"].append(len(ids))
            return out

        remove = [c for c in dataset.column_names if c != EXAMPLE_ID]
        encoded = dataset.map(encode_batch, batched=True, remove_columns=remove, desc=f"tokenizing {split}")
        if packing:
            return _pack(encoded, config.max_length)
        return encoded.map(_finish_unpacked, batched=True, remove_columns=["spans"], desc=f"features {split}")

    def pad(self, tokenizer, rows: dict[str, list], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Right-padded tensors. Packed rows keep their ``position_ids``; padding continues them as a segment
        of its own (so attention never mixes it with a real example)."""
        import torch

        batch = super().pad(tokenizer, rows, tuple(k for k in keys if k not in ("position_ids", OFFSETS)))
        S = batch["input_ids"].shape[1]
        if "position_ids" in keys and "position_ids" in rows:
            pos = torch.zeros((len(rows["position_ids"]), S), dtype=torch.long)  # [B, S]
            for i, p in enumerate(rows["position_ids"]):
                pos[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
                pos[i, len(p):] = torch.arange(S - len(p))
            batch["position_ids"] = pos
        if OFFSETS in keys and OFFSETS in rows:
            P = max((len(o) for o in rows[OFFSETS]), default=0)
            off = torch.zeros((len(rows[OFFSETS]), P, 2), dtype=torch.int64)  # [B, P, 2]
            for i, o in enumerate(rows[OFFSETS]):
                if len(o):
                    off[i, : len(o)] = torch.as_tensor(o, dtype=torch.int64)
            batch[OFFSETS] = off
        return batch

    def model_inputs(self, batch: dict[str, torch.Tensor], with_labels: bool) -> dict[str, Any]:
        """Packed batches pass position_ids and no attention_mask: transformers then masks attention block-
        diagonally per example; no key-value cache is built in a forward pass over whole sequences."""
        inputs = super().model_inputs(batch, with_labels)
        if "position_ids" in inputs:
            inputs.pop("attention_mask", None)
        inputs["use_cache"] = False
        return inputs

    # -- sequence-level KD: the teacher writes the responses -----------------------------------------
    def target_params(self, config: FineTuneConfig) -> dict[str, Any]:
        params = super().target_params(config)
        if config.sequence_kd:  # the generation settings decide the rows the teacher is scored on
            params["sequence_kd"] = {"num_beams": config.num_beams, "max_new_tokens": _max_new_tokens(config),
                                     "length_penalty": config.length_penalty}
        return params

    def generates_responses(self, config: FineTuneConfig) -> bool:
        return bool(config.sequence_kd)

    @inference_mode
    def generate_responses(self, model, tokenizer, dataset, config: FineTuneConfig, device, batch_size: int = 16) -> list[str]:
        """Greedy or beam responses (num_beams, max_new_tokens, length_penalty) to each example's prompt, cut at
        the first special token the model writes (an end of turn or of text)."""
        chat = _ChatEncoder(tokenizer, config) if config.messages_column else None
        prompts = [chat.render(_prompt_turns(_messages(row[config.messages_column], i, config)), generation_prompt=True) if chat
                   else str(row[config.prompt_column] or "") for i, row in enumerate(dataset)]
        special = set(tokenizer.all_special_ids)
        stops = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)} - {None}
        side, tokenizer.padding_side = tokenizer.padding_side, "left"  # a decoder continues from the right end
        responses: list[str] = []
        try:
            for lo in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[lo:lo + batch_size], add_special_tokens=not config.messages_column, padding=True,
                                return_tensors="pt", return_token_type_ids=False).to(device)
                out = model.generate(**enc, num_beams=config.num_beams, max_new_tokens=_max_new_tokens(config),
                                     length_penalty=config.length_penalty, do_sample=False,
                                     eos_token_id=sorted(stops) or None, pad_token_id=tokenizer.pad_token_id)
                for ids in out[:, enc["input_ids"].shape[1]:].tolist():
                    cut = next((j for j, t in enumerate(ids) if t in special), len(ids))
                    responses.append(tokenizer.decode(ids[:cut]))
        finally:
            tokenizer.padding_side = side
        return responses

    def with_responses(self, dataset, responses: list[str], config: FineTuneConfig):
        if len(responses) != len(dataset):
            raise DataError(f"{len(responses)} generated responses for {len(dataset)} examples: re-run dump-teacher with --force")
        if config.messages_column:
            column = config.messages_column

            def replace(row, i):
                turns = _prompt_turns(row[column])
                return {column: turns + [{**{k: None for k in row[column][0]}, "role": "assistant", "content": responses[i]}]}
        else:
            column = config.text_column

            def replace(row, i):
                return {column: responses[i]}
        return dataset.map(replace, with_indices=True, desc="teacher responses")

    # -- targets -----------------------------------------------------------------------------------
    def target_specs(self, labels: LabelInfo, config: Optional[FineTuneConfig] = None, tokenizer=None) -> list[TargetSpec]:
        """``logits`` per loss-carrying position over the vocabulary, and their character ``offsets``."""
        if config is None or tokenizer is None:
            raise ValueError(f"{self.name}: target_specs needs the config and the tokenizer (the vocabulary is the width)")
        return [self.logits_spec(config, tokenizer), TargetSpec(OFFSETS, "position", 2, "offsets")]

    def kd_view(self, name: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return logits, self.position_mask(batch)  # [B, S, V], [B, S]

    def position_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, S]: positions whose next token carries loss (position t predicts token t + 1)."""
        import torch

        labels = batch["labels"]
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        return mask

    # -- evaluation --------------------------------------------------------------------------------
    @inference_mode
    def infer(self, model, tokenizer, batch: dict[str, torch.Tensor], config: FineTuneConfig) -> dict[str, list[Any]]:
        """Per feature: the summed negative log-likelihood of its loss-carrying tokens, and their count."""
        import torch

        logits = model(**self.model_inputs(batch, with_labels=False)).logits[:, :-1]  # [B, S-1, V]
        targets = batch["labels"][:, 1:]  # [B, S-1]
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")  # [B, S-1]
        counted = targets != IGNORE_INDEX
        return {NLL: (nll * counted).sum(1).tolist(), TOKENS: counted.sum(1).tolist()}

    def predictions(self, features, outputs: dict[str, list[Any]], examples, labels: LabelInfo, config: FineTuneConfig) -> list[Any]:
        """(summed NLL, tokens, characters they cover) per example (its features added up)."""
        position = example_positions(examples)
        preds = [[0.0, 0, 0] for _ in range(len(examples))]
        for example_id, nll, n, offsets in zip(features[EXAMPLE_ID], outputs[NLL], outputs[TOKENS], features[OFFSETS]):
            row = preds[position[int(example_id)]]
            row[0] += float(nll)
            row[1] += int(n)
            row[2] += int(sum(end - start for start, end in offsets))
        return preds

    def compute_metrics(self, predictions: list[Any], examples, labels: LabelInfo, config: FineTuneConfig) -> dict[str, float]:
        """Perplexity = exp(mean NLL per loss-carrying token) over the split, the mean NLL, the count, and bits per
        character (the NLL over the characters those tokens cover: comparable across tokenizers)."""
        total = sum(p[0] for p in predictions)
        tokens = sum(p[1] for p in predictions)
        chars = sum(p[2] if len(p) > 2 else 0 for p in predictions)
        loss = total / max(tokens, 1)
        return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss, "tokens": float(tokens),
                "bits_per_char": total / max(chars, 1) / math.log(2)}

    def primary_metric(self) -> str:
        return "perplexity"


# ------------------------------------------------------------------------------------------------------
class _TextEncoder:
    """Plain text (after an optional prompt) -> (ids, carries loss per token, character span per token)."""

    def __init__(self, tokenizer, config: FineTuneConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.eos = tokenizer.eos_token_id

    def __call__(self, row: dict[str, Any], example_id: int, split: str) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
        config = self.config
        prompt = str(row[config.prompt_column] or "") if config.prompt_column else ""
        text = prompt + str(row[config.text_column] or "")
        ignored = [(0, len(prompt))] if prompt else []
        if config.ignore_spans_column:
            ignored += [(len(prompt) + a, len(prompt) + b) for a, b in _spans(row[config.ignore_spans_column], example_id,
                                                                               len(text) - len(prompt), config)]
        enc = self.tokenizer(text, return_offsets_mapping=True, return_token_type_ids=False)
        ids, spans = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
            spans.append((len(text), len(text)))
        starts = np.asarray([s for s, _ in spans])
        special = set(self.tokenizer.all_special_ids)
        carries = [i > 0 and (t not in special or (t == self.eos and i == len(ids) - 1)) and not _inside(int(starts[i]), ignored)
                   for i, t in enumerate(ids)]
        if split == "train" and not any(carries[:-1]):
            raise _nothing_to_learn(example_id, "its prompt and ignore spans cover every token of the text")
        return ids, carries, spans


class _ChatEncoder:
    """A conversation rendered with the chat template; the assistant turns' spans carry loss."""

    def __init__(self, tokenizer, config: FineTuneConfig):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"the tokenizer {tokenizer.name_or_path!r} has no chat template, so messages_column "
                            f"({config.messages_column!r}) cannot be rendered: set one (tokenizer.chat_template = ...; "
                            "tokenizer.save_pretrained) or give plain text through text_column")
        self.tokenizer = tokenizer
        self.config = config

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def __call__(self, row: dict[str, Any], example_id: int, split: str) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
        messages = _messages(row[self.config.messages_column], example_id, self.config)
        text = self.render(messages)
        regions = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or m.get("weight") == 0:
                continue
            before = self.render(messages[:i], generation_prompt=True) if i else self.render([], generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (text.startswith(upto) and upto.startswith(before)):
                raise DataError(f"the chat template of {self.tokenizer.name_or_path!r} renders example {example_id}'s "
                                "conversation differently from its first turns, so the assistant turns cannot be located; "
                                "use a template whose rendering of a conversation extends the rendering of its prefixes")
            regions.append((len(before), len(upto)))
        if split == "train" and not regions:
            raise _nothing_to_learn(example_id, "it has no assistant turn with weight other than 0")
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_token_type_ids=False)
        ids, spans = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        carries = [i > 0 and any(a <= s < b for a, b in regions) for i, (s, _) in enumerate(spans)]
        if split == "train" and not any(carries):
            raise _nothing_to_learn(example_id, "its assistant turns render to no token")
        to_contents = _content_offsets(text, messages)
        return ids, carries, [(s, to_contents(e)) for s, e in spans]


def _content_offsets(text: str, messages: list[dict]):
    """Map an end offset in the rendered conversation to one in its contents alone (each message's content then one
    separator), so that two chat templates place the same conversation's characters alike: a student rendering it
    with another template aligns on these offsets. An offset in the template's own text maps to the start of the
    next content; a content the template altered (not found verbatim) maps as template text."""
    starts, canon, pos, total = [], [], 0, 0
    for m in messages:
        found = text.find(m["content"], pos)
        if found >= 0:
            starts.append((found, found + len(m["content"])))
            canon.append(total)
            pos = found + len(m["content"])
        total += len(m["content"]) + 1
    starts_at = np.asarray([a for a, _ in starts])

    def convert(x: int) -> int:
        i = int(np.searchsorted(starts_at, x, side="right")) - 1  # the last content starting at or before x
        if i >= 0 and x <= starts[i][1]:
            return canon[i] + x - starts[i][0]
        return canon[i + 1] if i + 1 < len(canon) else total
    return convert


def _prompt_turns(messages: list[dict]) -> list[dict]:
    """A conversation's prompt: its turns before a final assistant turn (all of them when it ends with another role)."""
    return list(messages[:-1]) if messages and messages[-1].get("role") == "assistant" else list(messages)


def _max_new_tokens(config: FineTuneConfig) -> int:
    return int(config.max_new_tokens or 128)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _messages(value: Any, example_id: int, config: FineTuneConfig) -> list[dict]:
    """A conversation as a list of {role, content[, weight]} dicts (None keys that Arrow adds dropped)."""
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(m, dict) for m in value):
        raise DataError(f"example {example_id}: column {config.messages_column!r} must hold a non-empty list of "
                        "{role, content} messages")
    out = []
    for m in value:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"example {example_id}: every message needs a string role and content, got {m!r}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _spans(value: Any, example_id: int, length: int, config: FineTuneConfig) -> list[tuple[int, int]]:
    if value is None:
        return []
    try:
        spans = [(int(a), int(b)) for a, b in value]
    except (TypeError, ValueError):
        raise DataError(f"example {example_id}: column {config.ignore_spans_column!r} must hold [[start, end], ...] "
                        f"character spans of the text, got {value!r}") from None
    for a, b in spans:
        if not 0 <= a <= b <= length:
            raise DataError(f"example {example_id}: ignore span [{a}, {b}] is outside its text (0..{length} characters)")
    return spans


def _inside(pos: int, regions: Sequence[tuple[int, int]]) -> bool:
    return any(a <= pos < b for a, b in regions)


def _target_offsets(spans: Sequence[tuple[int, int]], labels: Sequence[int]) -> list[list[int]]:
    """(context_end, target_end) of each position t whose next token t + 1 carries loss."""
    return [[spans[t][1], spans[t + 1][1]] for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]


def _finish_unpacked(batch: dict[str, list]) -> dict[str, list]:
    return {"attention_mask": [[1] * n for n in batch["length"]],
            OFFSETS: [_target_offsets(s, l) for s, l in zip(batch["spans"], batch["labels"])]}


def _pack(encoded, block: int):
    """Concatenate the examples and cut them into ``block``-token features; each example's first token
    predicts nothing (nothing before it in its example), and position ids restart at every example."""
    from datasets import Dataset

    ids, labels, spans, positions, owner = [], [], [], [], []
    for eid, row_ids, row_labels, row_spans in zip(encoded[EXAMPLE_ID], encoded["input_ids"], encoded["labels"], encoded["spans"]):
        ids += row_ids
        labels += [IGNORE_INDEX] + row_labels[1:]
        spans += [tuple(s) for s in row_spans]
        positions += list(range(len(row_ids)))
        owner += [int(eid)] * len(row_ids)
    columns: dict[str, list] = {k: [] for k in (EXAMPLE_ID, "input_ids", "attention_mask", "labels", "position_ids", OFFSETS, "length")}
    for lo in range(0, len(ids), block):
        hi = min(lo + block, len(ids))
        pos = positions[lo:hi]
        start = pos[0]
        pos = [p - start if owner[lo + j] == owner[lo] else p for j, p in enumerate(pos)]  # a cut example restarts at 0
        lab = list(labels[lo:hi])
        lab[0] = IGNORE_INDEX  # the block's first token has no context in the block
        columns[EXAMPLE_ID].append(owner[lo])
        columns["input_ids"].append(ids[lo:hi])
        columns["attention_mask"].append([1] * (hi - lo))
        columns["labels"].append(lab)
        columns["position_ids"].append(pos)
        columns[OFFSETS].append(_target_offsets(spans[lo:hi], lab))
        columns["length"].append(hi - lo)
    return Dataset.from_dict(columns)


def _too_long(example_id: int, n: int, split: str, config: FineTuneConfig) -> DataError:
    return DataError(f"{split} example {example_id} has {n} tokens, more than max_length ({config.max_length}): set max_length "
                     f"to {n} or more (--max-length {n}) if the model's context allows, turn packing on (--packing true: "
                     "examples are cut into max_length blocks), or shorten it")


def _nothing_to_learn(example_id: int, why: str) -> DataError:
    return DataError(f"training example {example_id} has no token that carries loss ({why}): remove it, or unmark part of it")
