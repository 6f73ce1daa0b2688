"""kdcache.dump.reduce_outputs without a device sync (issue 22): the per-position reduction front-aligns each row's
covered positions with a gather instead of a boolean index and a row count on the host, and stores the same arrays
as the syncing version it replaced (frozen below), byte for byte, on a tiny causal LM and token classifier with
padding and masked prompts."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kdcache.cache import TeacherBatch, quantize_int8
from kdcache.config import FineTuneConfig
from kdcache.dump import HostCopies, reduce_outputs, store_spec_for
from kdcache.tasks import get_task
from kdcache.tasks.base import LabelInfo
from kdcache.teacher import reduce_sampled, reduce_topk, select_hidden


# -- the syncing implementation this replaced (kdcache/dump.py before issue 22), frozen as the reference -----------
def _old_rows_to_front(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    B, P = counts.shape[0], int(counts.max()) if counts.numel() else 0
    front = torch.arange(P, device=counts.device)[None, :] < counts[:, None]  # [B, P]
    out = rows.new_zeros((B, P, *rows.shape[1:]))
    out[front] = rows
    return out


def old_reduce_outputs(task, outputs, batch, feature_ids, example_ids, spec, seed=0, copies: Optional[HostCopies] = None):
    own = copies is None
    copies = HostCopies(torch.device("cpu")) if own else copies
    attention_mask = batch["attention_mask"]
    fields = task.output_targets(outputs)
    positions = task.position_mask(batch) if spec.per_position else None
    counts = positions.sum(dim=1) if positions is not None else None
    out = TeacherBatch(feature_ids=feature_ids.astype(np.int64), example_ids=example_ids.astype(np.int64),
                       n_tokens=copies.copy(attention_mask.sum(dim=1).to(torch.int32)),
                       n_positions=copies.copy(counts.to(torch.int32)) if counts is not None else None)
    for t in spec.targets:
        if t.mode == "tokens":
            raw = copies.copy(batch[t.name].clamp(min=0).to(torch.int64))
            stored = np.dtype(t.columns()[t.name])
            copies.then(lambda name=t.name, raw=raw, dtype=stored: out.targets.__setitem__(name, raw.astype(dtype)))
            continue
        if t.mode == "offsets":
            raw = copies.copy(batch[t.name])
            copies.then(lambda name=t.name, raw=raw: out.targets.__setitem__(name, raw.astype(np.uint32)))
            continue
        value = fields[t.name]
        if value.shape[-1] > t.width:
            value = value[..., : t.width]
        if t.per == "position":
            value = value[positions]
        if t.mode == "full":
            full = _old_rows_to_front(value, counts) if t.per == "position" else value
            raw = copies.copy(full.float() if full.dtype == torch.bfloat16 else full)
            copies.then(lambda name=t.name, raw=raw: out.targets.__setitem__(name, raw.astype(np.float32, copy=False)))
            continue
        if t.mode == "topk":
            comps = reduce_topk(value, t.k, t.temperatures)
        else:
            generator = torch.Generator(device=value.device).manual_seed(int(seed) * 1_000_003 + int(feature_ids.min()))
            comps = reduce_sampled(value, t.k, t.temperatures, generator)
        dtypes = {suffix[1:]: np.dtype(dtype) for suffix, (dtype, _) in t.components().items()}
        raw = {c: copies.copy(_old_rows_to_front(v, counts)) for c, v in comps.items()}
        copies.then(lambda name=t.name, raw=raw, dtypes=dtypes: out.targets.__setitem__(
            name, {c: v.astype(dtypes[c], copy=False) for c, v in raw.items()}))
    h_spec = spec.hidden
    if h_spec is not None:
        hidden = select_hidden(task.hidden_states(outputs), h_spec.layers, attention_mask, h_spec.pooling)
        if h_spec.dtype == "float16":
            out.hidden = copies.copy(hidden.to(torch.float16))
        else:
            q, scale, idx, val = quantize_int8(hidden.float(), h_spec.n_outliers)
            out.hidden_q, out.hidden_scale = copies.copy(q), copies.copy(scale)
            out.hidden_outlier_idx, out.hidden_outlier_val = copies.copy(idx), copies.copy(val)
    if own:
        copies.issued()()
    return out


# -- cases: a tiny Llama (padded vocabulary, masked prompts, right padding, one row with no loss) and a tiny
# BERT token classifier (padding), in every store mode they have -------------------------------------------------
B, S = 5, 12
PROMPTS = [3, 0, 11, 4, 2]  # leading tokens without loss: row 2 keeps one, row 3 none


def _batch(vocab: int, lengths: list[int]) -> dict[str, torch.Tensor]:
    """Rows of ``lengths`` real tokens (padding after), labels -100 on padding and on each row's prompt."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (B, S), generator=g)
    pos = torch.arange(S)[None, :]
    mask = (pos < torch.tensor(lengths)[:, None]).long()  # [B, S]
    labels = ids.masked_fill((mask == 0) | (pos < torch.tensor(PROMPTS)[:, None]), -100)  # [B, S]
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels,
            "offsets": torch.randint(0, 100, (B, S, 2), generator=g)}


@pytest.fixture(scope="module")
def cases(tokenizer_dir):
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 6, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    bert = BertForTokenClassification(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, max_position_embeddings=64, num_labels=5)).eval()
    batch = _batch(len(tok), [12, 9, 12, 4, 7])
    ner_batch = {k: v for k, v in _batch(len(tok), [10, 9, 2, 4, 7]).items() if k != "offsets"}  # padded beyond the longest
    lm, ner = get_task("causal_lm"), get_task("token_classification")
    out = {}
    with torch.inference_mode():
        lm_out = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        lm_out.logits[batch["attention_mask"] == 0] = float("nan")  # padding the stored rows must never see
        ner_out = bert(input_ids=ner_batch["input_ids"], attention_mask=ner_batch["attention_mask"], output_hidden_states=True)
    for mode, k in (("topk", 6), ("sampled", 16), ("full", None)):
        config = FineTuneConfig(model_name=str(tokenizer_dir), task_type="causal_lm", text_column="text", use_distillation=True,
                                logits_mode=mode, **({"logits_k": k} if k else {}), temperatures=[1.0, 2.0],
                                **({"distill_hidden_states": True, "teacher_layers_to_distill": [1, 2], "hidden_dtype": "float16"}
                                   if mode == "topk" else {}))
        out[f"llama-{mode}"] = (lm, lm_out, store_spec_for(config, lm, llama.config, LabelInfo(0), tok), batch)
    for dtype in ("int8", "float16"):
        config = FineTuneConfig(model_name=str(tokenizer_dir), task_type="token_classification", use_distillation=True,
                                distill_hidden_states=True, teacher_layers_to_distill=[1, 2], hidden_dtype=dtype, hidden_outliers=4)
        out[f"ner-full-hidden-{dtype}"] = (ner, ner_out, store_spec_for(config, ner, bert.config, LabelInfo(5), tok), ner_batch)
    return out


def _arrays(tb: TeacherBatch) -> dict[str, np.ndarray]:
    out = {k: getattr(tb, k) for k in ("n_tokens", "n_positions", "hidden", "hidden_q", "hidden_scale", "hidden_outlier_idx",
                                       "hidden_outlier_val") if getattr(tb, k) is not None}
    for name, v in tb.targets.items():
        out.update({f"{name}:{c}": a for c, a in v.items()} if isinstance(v, dict) else {name: v})
    return out


def _reduce(fn, case, copies: Optional[HostCopies] = None) -> TeacherBatch:
    task, outputs, spec, batch = case
    rows = np.arange(100, 100 + B)
    return fn(task, outputs, batch, rows, rows // 2, spec, 7, copies)


CASES = ["llama-topk", "llama-sampled", "llama-full", "ner-full-hidden-int8", "ner-full-hidden-float16"]


@pytest.mark.parametrize("name", CASES)
def test_same_arrays_as_the_syncing_version(cases, name):
    """Every stored array (top-k, sampled draws, full logits, hidden states, counts) equals the old version's, dtype,
    shape and bytes; with NaN logits at padding, which neither version may store."""
    old, new = _arrays(_reduce(old_reduce_outputs, cases[name])), _arrays(_reduce(reduce_outputs, cases[name]))
    assert sorted(new) == sorted(old)
    for key in old:
        assert (new[key].dtype, new[key].shape) == (old[key].dtype, old[key].shape), key
        assert new[key].tobytes() == old[key].tobytes(), key
    # Meaningful input: rows of different covered counts (a causal LM's with none), fewer than the batch's positions
    # (so the cut did work), and no stored NaN.
    counts = old["n_positions"]
    assert len(set(counts.tolist())) > 3 and counts.max() < S - 1 and (0 in counts) == name.startswith("llama")
    assert np.isfinite(new["logits" if "full" in name else "logits:logp"]).all()


# -- no sync: the aten ops reduce_outputs runs, recorded ---------------------------------------------------------
class _Ops(TorchDispatchMode):
    """Counts the aten ops run under it and records those that wait for the device (``_syncs``)."""

    def __init__(self):
        super().__init__()
        self.syncing: list[str] = []
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.count += 1
        name = func.overloadpacket.__name__
        if _syncs(name, args, kwargs):
            self.syncing.append(str(func))
        return func(*args, **kwargs)


# Ops whose output size or value the host must read from the device: each one waits for the device's queue.
_READ_BACK = {"nonzero", "nonzero_static", "argwhere", "_local_scalar_dense", "item", "is_nonzero", "masked_select",
              "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "equal", "allclose", "masked_scatter", "bincount"}


def _syncs(name: str, args, kwargs) -> bool:
    """Whether an aten op (by name, with its arguments) must read a value back from the device to run."""
    if name in _READ_BACK:
        return True
    if name in ("index", "_index_put_impl_", "index_put", "index_put_"):  # a boolean mask among the indices
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if name == "repeat_interleave":  # the output size, unless given
        return kwargs.get("output_size") is None
    return False


def _syncing_ops(fn, case) -> tuple[list[str], int]:
    with torch.inference_mode(), _Ops() as ops:
        _reduce(fn, case)
    return ops.syncing, ops.count


@pytest.mark.parametrize("name", CASES)
def test_reduce_outputs_never_reads_back_from_the_device(cases, name):
    """No op of the reduction waits for the device: the host can queue the next forward while this batch's runs."""
    syncing, count = _syncing_ops(reduce_outputs, cases[name])
    assert count > 20  # the mode saw the reduction's ops
    assert syncing == []


@pytest.mark.parametrize("name", ["llama-topk", "llama-sampled", "ner-full-hidden-int8"])
def test_the_check_catches_the_syncing_version(cases, name):
    """The recorder finds the old version's syncs (its boolean index, row count and masked put), so the test above can fail."""
    syncing, _ = _syncing_ops(old_reduce_outputs, cases[name])
    assert any("index.Tensor" in s for s in syncing) and any(s in ("aten.item.default", "aten._local_scalar_dense.default")
                                                             for s in syncing)
    assert any("index_put" in s for s in syncing)
