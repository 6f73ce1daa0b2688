"""causal_lm end to end: dump-teacher, the teacher deleted, train-student from the cache; what the cache
holds at the loss-carrying positions; every logits mode; hidden states through projections; GPT-2,
Llama and Qwen2 shapes; a padded embedding matrix; packing; and a student with another tokenizer.

Data: the shipped SciTLDR sample (data/scitldr, Apache-2.0). Models: tiny random decoders built from
configs over byte-level BPEs trained on the sample (tests/causal_models.py). The teachers are
initialised with a wide init range, so their next-token distributions are peaked (not uniform): a
student that distils them must move towards them, which the tests measure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from causal_models import build_lm_tokenizer, chat_rows, make_causal, text_rows
from helpers import read_jsonl, write_jsonl
from seq2seq_models import TLDR_TRAIN, invoke_cli

from kdcache import FineTuneConfig
from kdcache.cache import CacheMismatchError, CacheReader
from kdcache.dump import dump_teacher
from kdcache.tasks.columns import IGNORE_INDEX
from kdcache.train import train_student

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # slow: a causal-LM teacher trained, then students from each cache layout


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("causal")
    tok = build_lm_tokenizer(root / "tok", 800)
    rows = read_jsonl(TLDR_TRAIN, 48)
    return dict(root=root, tok=tok, rows=rows, texts=text_rows(rows), chats=chat_rows(rows[:24]))


def _config(lm, tmp_path: Path, teacher: Path, student: Path, **kw) -> FineTuneConfig:
    base = dict(model_name=str(student), teacher_model_name=str(teacher), task_type="causal_lm", use_distillation=True,
                max_length=128, batch_size=8, num_epochs=1, learning_rate=1e-3, logging_steps=1, disable_tqdm=True,
                cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"),
                # runs of a few steps: a warm-up would spend the first of them at lr 0 (no update to compare losses across)
                lr_scheduler_type="linear", warmup_ratio=0.0)
    return FineTuneConfig(**{**base, **kw})


def _dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


@torch.no_grad()
def _kl_to(teacher_logits: list[torch.Tensor], model_dir: Path, texts: list[dict]) -> float:
    """Mean KL(teacher ‖ model) at T=1 over every next-token position of ``texts`` (each row's summary + end)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, n = 0.0, 0
    for t_logits, row in zip(teacher_logits, texts):
        ids = tok(row["text"])["input_ids"] + [tok.eos_token_id]
        s = model(input_ids=torch.tensor([ids])).logits[0, :, : t_logits.shape[-1]].log_softmax(-1)
        t = t_logits.log_softmax(-1)
        total += float((t.exp() * (t - s)).sum(-1).sum())
        n += t.shape[0]
    return total / n


@torch.no_grad()
def _teacher_logits(teacher: Path, texts: list[dict]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    return [model(input_ids=torch.tensor([tok(r["text"])["input_ids"] + [tok.eos_token_id]])).logits[0, :, : len(tok)]
            for r in texts]


def test_topk_cache_distils_a_student_with_the_teacher_deleted(lm, tmp_path):
    teacher = make_causal(tmp_path / "teacher", lm["tok"], "gpt2", layers=2, width=64, init_range=0.3)
    student = make_causal(tmp_path / "student", lm["tok"], "gpt2", layers=1, width=32, seed=1)
    texts = lm["texts"]
    reference = _teacher_logits(teacher, texts[:16])
    before = _kl_to(reference, student, texts[:16])
    config = _config(lm, tmp_path, teacher, student, distillation_alpha=1.0, num_epochs=4)
    dump = dump_teacher(config, _dataset(texts), progress=False)
    reader = CacheReader(dump.cache_dir)
    assert reader.spec.target("logits").mode == "topk" and reader.spec.target("offsets").mode == "offsets"
    assert dump.manifest["teacher"]["output_rows"] == 800
    # every position but the last of each text carries a target: the text's tokens plus the end token
    assert int(reader.n_positions(reader.feature_ids()).sum()) == int(reader.n_tokens(reader.feature_ids()).sum()) - len(texts)
    shutil.rmtree(teacher)
    result = train_student(config, _dataset(texts), _dataset(texts[:16]))
    after = _kl_to(reference, tmp_path / "out", texts[:16])
    train_student(config.replace(use_distillation=False, output_dir=str(tmp_path / "plain")), _dataset(texts))
    plain = _kl_to(reference, tmp_path / "plain", texts[:16])
    assert after < 0.95 * before and after < 0.95 * plain, (before, after, plain)  # it moved towards the teacher, not the data
    report = json.loads((tmp_path / "out" / "kdcache_report.json").read_text())
    assert report["eval"]["eval_perplexity"] == pytest.approx(result.metrics["eval_perplexity"]) and report["eval"]["eval_perplexity"] > 1
    assert report["temperature"] == 1.0


def test_the_cache_holds_the_teacher_at_the_loss_positions_only(lm, tmp_path):
    """Chat data: only the assistant turns' positions are stored, each the teacher's own distribution there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = make_causal(tmp_path / "teacher", lm["tok"], "llama", layers=1, width=32, init_range=0.3)
    chats = lm["chats"][:6]
    config = _config(lm, tmp_path, teacher, teacher, messages_column="messages", logits_mode="full", max_length=160,
                     teacher_batch_size=4)
    dump = dump_teacher(config, _dataset(chats), progress=False)
    reader = CacheReader(dump.cache_dir)
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    rows = reader.get(list(range(len(chats))))
    for i, chat in enumerate(chats):
        text = tok.apply_chat_template(chat["messages"], tokenize=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        answer_at = text.index(chat["messages"][1]["content"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]  # [S, V]
        # positions whose next token starts inside the assistant turn (its content and end marker)
        wanted = [t for t in range(len(ids) - 1) if enc["offset_mapping"][t + 1][0] >= answer_at]
        stored = rows.targets["logits"][i]  # [n_positions, V]
        assert stored.shape == (len(wanted), 800)
        np.testing.assert_allclose(stored, logits[wanted].numpy(), atol=1e-4)
        # offsets count the contents' characters (each message's content, then one separator), not the template's
        answer, user = chat["messages"][1]["content"], chat["messages"][0]["content"]

        def content_offset(x: int, user=user, answer=answer, answer_at=answer_at) -> int:
            return len(user) + 1 + (x - answer_at if x <= answer_at + len(answer) else len(answer) + 1)

        offsets = rows.targets["offsets"][i]
        assert offsets.tolist() == [[content_offset(enc["offset_mapping"][t][1]), content_offset(enc["offset_mapping"][t + 1][1])]
                                    for t in wanted]


@pytest.mark.parametrize("mode,loss", [("sampled", "rest"), ("full", "rest"), ("topk", "renormalized")])
def test_every_logits_mode_trains(lm, tmp_path, mode, loss):
    teacher = make_causal(tmp_path / "teacher", lm["tok"], "gpt2", layers=1, width=32, init_range=0.3)
    student = make_causal(tmp_path / "student", lm["tok"], "gpt2", layers=1, width=32, seed=1)
    texts = lm["texts"][:16]
    config = _config(lm, tmp_path, teacher, student, logits_mode=mode, logits_k=8, topk_loss=loss)
    dump_teacher(config, _dataset(texts), progress=False)
    result = train_student(config, _dataset(texts), save=False)
    kd = [h["loss_kd"] for h in result.log_history if "loss_kd" in h]
    assert kd and all(np.isfinite(kd)) and kd[0] > 0


@pytest.mark.parametrize("shape", ["llama", "qwen2"])
def test_hidden_states_padded_vocabulary_and_packing(lm, tmp_path, shape):
    """Llama / Qwen2 shapes, a teacher whose embedding matrix has 13 rows no token reaches, hidden states
    through a projection (64 -> 32 wide), chat data packed into blocks."""
    teacher = make_causal(tmp_path / "teacher", lm["tok"], shape, layers=2, width=64, extra_vocab=13, init_range=0.3)
    student = make_causal(tmp_path / "student", lm["tok"], shape, layers=1, width=32, seed=1)
    config = _config(lm, tmp_path, teacher, student, messages_column="messages", packing=True, max_length=256,
                     teacher_layers_to_distill=[0, 2], layer_map={0: 0, 2: 1})
    dump = dump_teacher(config, _dataset(lm["chats"]), progress=False)
    reader = CacheReader(dump.cache_dir)
    assert reader.spec.target("logits").width == 800 and reader.spec.hidden.hidden_size == 64
    assert len(reader) < len(lm["chats"])  # packed: fewer blocks than conversations
    proc = invoke_cli(["inspect", dump.cache_dir], tmp_path / "home")
    assert "813 rows, its tokenizer 800 tokens: the 13 padded rows no token reaches are not stored" in proc.stdout
    shutil.rmtree(teacher)
    result = train_student(config, _dataset(lm["chats"]), save=False)
    hist = [h for h in result.log_history if "loss_hidden" in h]
    assert hist and hist[-1]["loss_hidden"] < hist[0]["loss_hidden"] and all(h["loss_kd"] > 0 for h in hist)


# -- another tokenizer -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cross(lm, tmp_path_factory) -> dict:
    """A teacher over the 800-token BPE with a topk cache of the texts; a student over a 500-token BPE."""
    root = tmp_path_factory.mktemp("cross")
    teacher = make_causal(root / "teacher", lm["tok"], "gpt2", layers=2, width=64, init_range=0.3)
    other = build_lm_tokenizer(root / "tok500", 500)
    student = make_causal(root / "student", other, "gpt2", layers=1, width=32, seed=1)
    data = write_jsonl(root / "train.jsonl", lm["texts"][:24])
    config = _config(lm, root, teacher, student, train_file=str(data))
    dump_teacher(config, progress=False)
    shutil.rmtree(teacher)
    return dict(root=root, config=config, student=student, data=data)


def test_a_student_with_another_tokenizer_is_refused_with_the_way_out(cross):
    with pytest.raises(CacheMismatchError, match=r"500-token tokenizer.*or set cross_tokenizer: true \(--cross-tokenizer true\)"):
        train_student(cross["config"], save=False)


def test_cross_tokenizer_trains_at_the_aligned_positions(cross, monkeypatch):
    import kdcache.train as train_module

    seen = {}
    real = train_module.CrossTokenizer.from_cache

    def spy(reader, tokenizer):
        seen["aligner"] = real(reader, tokenizer)
        return seen["aligner"]

    monkeypatch.setattr(train_module.CrossTokenizer, "from_cache", staticmethod(spy))
    result = train_student(cross["config"].replace(cross_tokenizer=True), save=False)
    aligner = seen["aligner"]
    assert 0.3 < aligner.share < 1.0, aligner.share  # different BPEs: many, not all, positions align
    assert 300 < aligner.mapped < 800  # the smaller BPE's merges nest in the larger's: most of its tokens are the teacher's
    kd = [h["loss_kd"] for h in result.log_history if "loss_kd" in h]
    assert kd and all(np.isfinite(kd)) and all(k > 0 for k in kd)


def test_cross_tokenizer_with_the_same_tokenizer_is_the_plain_layout(lm, tmp_path):
    """The alignment rule, applied to identical tokenizations, reproduces the token-level layout exactly."""
    from transformers import AutoTokenizer

    from kdcache.cross_tokenizer import CrossTokenizer
    from kdcache.distill.collator import DistillationCollator, TargetFetcher
    from kdcache.tasks import get_task
    from kdcache.tasks.labels import LabelInfo

    teacher = make_causal(tmp_path / "teacher", lm["tok"], "gpt2", layers=1, width=32, init_range=0.3)
    config = _config(lm, tmp_path, teacher, teacher)
    texts = lm["texts"][:8]
    dump = dump_teacher(config, _dataset(texts), progress=False)
    reader = CacheReader(dump.cache_dir)
    task = get_task("causal_lm")
    tok = AutoTokenizer.from_pretrained(teacher)
    feats = task.tokenize(_dataset(texts), tok, config, LabelInfo(0), "train").add_column("kd_feature_id", list(range(len(texts))))
    specs = [reader.spec.target("logits"), reader.spec.target("offsets")]
    rows = [feats[i] for i in range(len(texts))]
    plain = DistillationCollator(tok, TargetFetcher(reader, specs[:1], None), task)(rows)
    aligner = CrossTokenizer.from_cache(reader, tok)
    crossed = DistillationCollator(tok, TargetFetcher(reader, specs, None), task, aligner)(rows)
    assert torch.equal(crossed["teacher_logits:aligned"], task.position_mask(plain))
    for comp in ("idx", "logp", "logrest"):
        assert torch.equal(crossed[f"teacher_logits:{comp}"], plain[f"teacher_logits:{comp}"])
    assert bool((aligner.vocab_map[aligner.vocab_map >= 0] == torch.nonzero(aligner.vocab_map >= 0)[:, 0]).all())
    assert "offsets" not in crossed and int((plain["labels"] != IGNORE_INDEX).sum()) > 0


# -- responses the teacher writes (sequence-level KD) -------------------------------------------------
def test_sequence_kd_scores_the_teachers_own_responses_and_resumes_without_regenerating(lm, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from kdcache.cache.generated import read_generated
    from kdcache.tasks import get_task
    from kdcache.tasks.causal_lm import CausalLM
    from kdcache.tasks.labels import LabelInfo

    teacher = make_causal(tmp_path / "teacher", lm["tok"], "gpt2", layers=1, width=32, init_range=0.3)
    student = make_causal(tmp_path / "student", lm["tok"], "gpt2", layers=1, width=32, seed=1)
    chats = lm["chats"][:8]
    config = _config(lm, tmp_path, teacher, student, messages_column="messages", sequence_kd=True, max_new_tokens=12,
                     max_length=240, teacher_batch_size=4)
    dump = dump_teacher(config, _dataset(chats), progress=False)
    responses = read_generated(dump.cache_dir)
    assert len(responses) == 8 and dump.manifest["generated"]["rows"] == 8
    assert dump.manifest["fingerprint_inputs"]["targets"]["sequence_kd"] == {"num_beams": 1, "max_new_tokens": 12, "length_penalty": 1.0}
    # the responses are the teacher's greedy continuations of each prompt
    tok = AutoTokenizer.from_pretrained(teacher)
    task = get_task("causal_lm")
    from transformers import AutoModelForCausalLM

    again = task.generate_responses(AutoModelForCausalLM.from_pretrained(teacher).eval(), tok, _dataset(chats), config, "cpu")
    assert again == responses and any(r.strip() for r in responses)
    # the cache holds the teacher's view of its own responses: the stored positions are theirs
    rewritten = task.with_responses(_dataset(chats), responses, config)
    feats = task.tokenize(rewritten, tok, config, LabelInfo(0), "train")
    with CacheReader(dump.cache_dir) as reader:  # closed: its shared lock would (rightly) keep the resumed dump out
        assert reader.n_positions(reader.feature_ids()).tolist() == [len(o) for o in feats["offsets"]]
    assert [m[-1]["content"] for m in rewritten["messages"]] == responses
    assert [m[0]["content"] for m in rewritten["messages"]] == [c["messages"][0]["content"] for c in chats]
    # a killed dump resumes from the published responses, never generating again
    manifest = json.loads((dump.cache_dir / "manifest.json").read_text())
    (dump.cache_dir / "manifest.json").unlink()
    (dump.cache_dir / manifest["shards"][0]["file"]).unlink()
    (dump.cache_dir / "shard-00000.json").unlink()
    (dump.cache_dir / "dump.json").write_text(json.dumps({k: manifest[k] for k in ("fingerprint", "fingerprint_inputs", "num_examples",
                                                                                     "num_features", "shard_examples")}))

    def no_generation(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(CausalLM, "generate_responses", no_generation)
    resumed = dump_teacher(config, _dataset(chats), progress=False)
    assert not resumed.hit and read_generated(resumed.cache_dir) == responses
    shutil.rmtree(teacher)
    result = train_student(config, _dataset(chats), save=False)
    assert result.log_history and np.isfinite(result.log_history[-1]["train_loss"])
    # a student with another tokenizer learns the teacher's text too
    other = build_lm_tokenizer(tmp_path / "tok500", 500)
    cross_student = make_causal(tmp_path / "student500", other, "gpt2", layers=1, width=32, seed=1)
    crossed = train_student(config.replace(model_name=str(cross_student), cross_tokenizer=True), _dataset(chats), save=False)
    assert any(h.get("loss_kd", 0) > 0 for h in crossed.log_history)


def test_sequence_kd_needs_prompts_and_a_cache_with_responses(lm, tmp_path):
    from kdcache.config import ConfigError

    with pytest.raises(ConfigError, match=r"sequence_kd.*set prompt_column or messages_column"):
        FineTuneConfig(model_name="m", task_type="causal_lm", sequence_kd=True)
    teacher = make_causal(tmp_path / "teacher", lm["tok"], "gpt2", layers=1, width=32)
    config = _config(lm, tmp_path, teacher, teacher, messages_column="messages", max_length=240)
    dump_teacher(config, _dataset(lm["chats"][:4]), progress=False)
    with pytest.raises(CacheMismatchError, match=r"stores no teacher-written responses.*re-run dump-teacher with sequence_kd: true "
                                                 r"\(add --force when cache_dir names this cache\)"):
        train_student(config.replace(sequence_kd=True), _dataset(lm["chats"][:4]), save=False)
    # the advice, followed
    dump_teacher(config.replace(sequence_kd=True, max_new_tokens=8), _dataset(lm["chats"][:4]), force=True, progress=False)
    train_student(config.replace(sequence_kd=True, max_new_tokens=8), _dataset(lm["chats"][:4]), save=False)


def test_cross_tokenizer_loss_reaches_the_whole_student_vocabulary():
    """A student vocabulary larger than the teacher's: mapped ids beyond the teacher's width get their gradient."""
    from kdcache.cache.format import TargetSpec
    from kdcache.cross_tokenizer import CrossTokenizer
    from kdcache.distill.trainer import DistillationTrainer

    trainer = DistillationTrainer.__new__(DistillationTrainer)  # the loss alone: no model, no data
    trainer.cross_tokenizer = CrossTokenizer(torch.tensor([5, 900, -1, 1100]), student_vocab=1200)
    trainer.temperature, trainer.topk_loss = 1.0, "rest"
    spec = TargetSpec("logits", "position", 4, "topk", 2, (1.0,))
    student = torch.zeros(1, 1, 1200, requires_grad=True)
    comps = {"idx": torch.tensor([[[3, 1]]]), "logp": torch.log(torch.tensor([[[0.6, 0.3]]])),
             "logrest": torch.log(torch.tensor([[[0.1]]]))}
    loss, _, _ = trainer._sparse_kd(spec, student, comps, None, agreement=False)
    loss.backward()
    grad = student.grad[0, 0]
    assert grad[1100] < 0 and grad[900] < 0 and grad[0] > 0  # pulled up where the teacher puts mass, down elsewhere
    assert float(loss.detach()) == pytest.approx(0.6 * np.log(0.6 * 1200) + 0.3 * np.log(0.3 * 1200) + 0.1 * np.log(0.1 * 1200 / 1198), rel=1e-4)


def test_inspect_verify_checks_the_teachers_responses(lm, tmp_path):
    teacher = make_causal(tmp_path / "teacher", lm["tok"], "gpt2", layers=1, width=32)
    config = _config(lm, tmp_path, teacher, teacher, messages_column="messages", sequence_kd=True, max_new_tokens=6, max_length=240)
    dump = dump_teacher(config, _dataset(lm["chats"][:4]), progress=False)
    assert invoke_cli(["inspect", "--verify", dump.cache_dir], tmp_path / "home").returncode == 0
    data = bytearray((dump.cache_dir / "generated.arrow").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dump.cache_dir / "generated.arrow").write_bytes(bytes(data))
    proc = invoke_cli(["inspect", "--verify", dump.cache_dir], tmp_path / "home", check=False)
    assert proc.returncode != 0 and "generated.arrow: its checksum does not match generated.json" in proc.stderr
    with pytest.raises(Exception, match="checksum does not match.*re-run dump-teacher with --force"):
        train_student(config, _dataset(lm["chats"][:4]), save=False)
    # the advice, followed
    dump_teacher(config, _dataset(lm["chats"][:4]), force=True, progress=False)
    assert invoke_cli(["inspect", "--verify", dump.cache_dir], tmp_path / "home").returncode == 0
    train_student(config, _dataset(lm["chats"][:4]), save=False)


def test_cross_tokenizer_refusals_whose_advice_works(lm, tmp_path):
    """A sampled cache, then per-token hidden states: each refusal names the fix, and the fix trains."""
    teacher = make_causal(tmp_path / "teacher", lm["tok"], "gpt2", layers=2, width=32)
    other = build_lm_tokenizer(tmp_path / "tok500", 500)
    student = make_causal(tmp_path / "student", other, "gpt2", layers=1, width=32, seed=1)
    texts = _dataset(lm["texts"][:8])
    config = _config(lm, tmp_path, teacher, student, cross_tokenizer=True, logits_mode="sampled", teacher_layers_to_distill=[2])
    dump_teacher(config, texts, progress=False)
    with pytest.raises(CacheMismatchError, match=r"in mode 'sampled'.*re-run dump-teacher with logits_mode: topk"):
        train_student(config, texts, save=False)
    config = config.replace(logits_mode="topk")
    dump_teacher(config, texts, force=True, progress=False)
    with pytest.raises(CacheMismatchError, match=r"per-token hidden states.*turn distill_hidden_states off \(--distill-hidden-states false\)"):
        train_student(config, texts, save=False)
    result = train_student(config.replace(distill_hidden_states=False), texts, save=False)
    assert any(h.get("loss_kd", 0) > 0 for h in result.log_history)
    # a cache without the teacher vocabulary's strings (as one from before they were stored)
    manifest_path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["tokenizer"]["continuations"]
    from kdcache.cache.format import MANIFEST_DIGEST, manifest_digest

    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)  # as that kdcache wrote it: its own checksum matches
    manifest_path.write_text(json.dumps(manifest))
    config = config.replace(distill_hidden_states=False)
    with pytest.raises(CacheMismatchError, match=r"stores no teacher vocabulary.*re-run dump-teacher .*add --force"):
        train_student(config, texts, save=False)
    dump_teacher(config, texts, force=True, progress=False)
    train_student(config, texts, save=False)


def test_cross_tokenizer_chat_aligns_across_chat_templates(lm, tmp_path):
    """Offsets of chat data index the messages' contents, not the rendered text: a student whose tokenizer renders
    conversations with another template (and has another vocabulary) aligns on the assistant turns."""
    from causal_models import PLAIN_CHAT
    from transformers import AutoTokenizer

    from kdcache.tasks import get_task
    from kdcache.tasks.labels import LabelInfo

    teacher = make_causal(tmp_path / "teacher", lm["tok"], "gpt2", layers=1, width=32, init_range=0.3)
    other = build_lm_tokenizer(tmp_path / "tok_other", 500, template=PLAIN_CHAT)
    student = make_causal(tmp_path / "student", other, "gpt2", layers=1, width=32, seed=1)
    chats = lm["chats"][:8]
    config = _config(lm, tmp_path, teacher, student, messages_column="messages", max_length=240, cross_tokenizer=True)
    task = get_task("causal_lm")
    both = [task.tokenize(_dataset(chats), AutoTokenizer.from_pretrained(m), config, LabelInfo(0), "train") for m in (teacher, student)]
    answer = chats[0]["messages"][1]["content"]
    canon_start = len(chats[0]["messages"][0]["content"]) + 1  # the answer's first character among the contents
    for feats in both:  # each side's last stored position predicts the end of the answer's turn, in content characters
        ends = [o[1] for o in feats[0]["offsets"]]
        assert ends[0] > canon_start and max(ends) == canon_start + len(answer) + 1
    dump_teacher(config, _dataset(chats), progress=False)
    import kdcache.train as train_module

    seen = {}
    real = train_module.CrossTokenizer.from_cache

    def spy(reader, tokenizer):
        seen["aligner"] = real(reader, tokenizer)
        return seen["aligner"]

    train_module.CrossTokenizer.from_cache = staticmethod(spy)
    try:
        result = train_student(config, _dataset(chats), save=False)
    finally:
        train_module.CrossTokenizer.from_cache = staticmethod(real)
    assert seen["aligner"].share > 0.5, seen["aligner"].share
    assert all(np.isfinite(h["loss_kd"]) for h in result.log_history if "loss_kd" in h)
