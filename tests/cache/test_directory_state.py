"""kdcache.cache.directory_state: the state of a dump's cache directory decided from what it holds (hit, resume,
fresh, redo, repair), its refusals with their advice followed, and the preparation and clean-up around a dump."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from cache_synth import PER_EXAMPLE, SPECS, make_batch, make_truth

from kdcache.cache import CacheError, CacheMismatchError, ShardWriter
from kdcache.cache.directory_state import (
    FRESH,
    HIT,
    REDO,
    REPAIR,
    RESUME,
    check_location,
    clean_failed,
    damage,
    dir_state,
    first_difference,
    intact_hit,
    prepare_dir,
    verdict,
)
from kdcache.cache.format import LOCK_NAME, MANIFEST_NAME, MARKER_NAME, PROGRESS_NAME, shard_name
from kdcache.cache.ownership import CACHE, write_marker

INPUTS = {"task": "test", "num_examples": None, "teacher_identity": {"name": "t", "weights_sha256": "aa"}}
FP = "fp-1"


def _complete(path, inputs=INPUTS, fp=FP):
    """A complete cache of 14 generated features in 3 shards whose manifest records ``fp`` and ``inputs``."""
    spec = SPECS["fp16-none"]
    truth = make_truth(spec, 14, seed=3, per_example=PER_EXAMPLE["fp16-none"])
    writer = ShardWriter(path, spec, bound={"fingerprint": fp})
    write_marker(path, CACHE)
    for index, lo in enumerate(range(0, 14, 5)):
        writer.open_shard(index, (lo, min(lo + 5, 14)))
        writer.write(make_batch(spec, truth, np.arange(lo, min(lo + 5, 14))))
        writer.close_shard()
    writer.write_manifest({"num_features": 14, "fingerprint": fp, "fingerprint_inputs": inputs, "shard_examples": 5})
    return spec


def test_a_new_or_empty_directory_is_fresh_and_looking_writes_nothing(tmp_path):
    assert dir_state(tmp_path / "new", FP, INPUTS, force=False) == FRESH
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / LOCK_NAME).write_text("")  # a lock alone is not content
    assert dir_state(tmp_path / "empty", FP, INPUTS, force=False) == FRESH
    assert dir_state(tmp_path / "empty", FP, INPUTS, force=True) == FRESH  # nothing to clear


def test_a_complete_cache_is_a_hit_a_progress_marker_a_resume_and_force_a_redo(tmp_path):
    spec = _complete(tmp_path / "c")
    assert dir_state(tmp_path / "c", FP, INPUTS, force=False) == HIT
    assert dir_state(tmp_path / "c", FP, INPUTS, force=True) == REDO
    assert intact_hit(tmp_path / "c", FP, INPUTS, spec, force=False)
    assert verdict(tmp_path / "c", FP, INPUTS, spec, force=False) == HIT
    partial = tmp_path / "p"
    prepare_dir(partial, FRESH, {"fingerprint": FP, "fingerprint_inputs": INPUTS, "num_examples": 7, "num_features": 14,
                                 "shard_examples": 5}, spec, {"fingerprint": FP})
    assert dir_state(partial, FP, INPUTS, force=False) == RESUME


def test_other_inputs_are_refused_naming_the_first_difference_and_force_redoes(tmp_path):
    _complete(tmp_path / "c", inputs={**INPUTS, "teacher_identity": {"name": "t", "weights_sha256": "bb"}}, fp="fp-0")
    with pytest.raises(CacheMismatchError, match=r"complete cache for different inputs: field 'teacher_identity.weights_sha256' "
                                                 r"is 'bb' there but 'aa' for this run; pass --force to redo it"):
        dir_state(tmp_path / "c", FP, INPUTS, force=False)
    assert dir_state(tmp_path / "c", FP, INPUTS, force=True) == REDO  # the advice
    assert first_difference({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 2}}) == ("fingerprint", None, None)


def test_foreign_linked_or_unmarked_content_is_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match=r"is not a kdcache cache \(it holds notes.txt\); choose an empty or new directory"):
        dir_state(foreign, FP, INPUTS, force=True)
    linked = tmp_path / "linked"
    _complete(linked)
    os.replace(linked / MANIFEST_NAME, tmp_path / "elsewhere.json")
    (linked / MANIFEST_NAME).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(CacheError, match=r"its manifest.json is a link or not a plain file, and kdcache never follows links"):
        dir_state(linked, FP, INPUTS, force=False)
    unmarked = tmp_path / "unmarked"
    unmarked.mkdir()
    (unmarked / shard_name(0)).write_bytes(b"not arrow")
    with pytest.raises(CacheError, match=r"but no " + re.escape(MARKER_NAME) + r".*kdcache clears only its own caches"):
        dir_state(unmarked, FP, INPUTS, force=True)
    write_marker(unmarked, CACHE)  # kdcache's, but shards without a progress marker cannot be matched
    with pytest.raises(CacheError, match=r"holds shard files but no dump.json; pass --force to redo it"):
        dir_state(unmarked, FP, INPUTS, force=False)
    assert dir_state(unmarked, FP, INPUTS, force=True) == REDO


def test_a_damaged_shard_is_named_and_the_verdict_is_a_repair(tmp_path):
    path = tmp_path / "c"
    spec = _complete(path)
    assert damage(path, spec, INPUTS) is None
    data = bytearray((path / shard_name(1)).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / shard_name(1)).write_bytes(bytes(data))
    assert shard_name(1) in damage(path, spec, INPUTS)
    assert not intact_hit(path, FP, INPUTS, spec, force=False)
    assert verdict(path, FP, INPUTS, spec, force=False) == REPAIR
    assert damage(path, spec, {**INPUTS, "task": "other"}) is not None  # other inputs than the manifest's


def test_prepare_keeps_a_repairs_shard_plan_and_drops_shards_of_another(tmp_path):
    path = tmp_path / "c"
    spec = _complete(path)  # 5 features per shard
    progress = {"fingerprint": FP, "fingerprint_inputs": INPUTS, "num_examples": 7, "num_features": 14}
    assert prepare_dir(path, REPAIR, {**progress, "shard_examples": 9}, spec, {"fingerprint": FP}) == 5
    assert not (path / MANIFEST_NAME).exists() and len(list(path.glob("shard-*.arrow"))) == 3
    assert prepare_dir(path, RESUME, {**progress, "shard_examples": 9}, spec, {"fingerprint": FP}) == 5
    json_progress = json.loads((path / PROGRESS_NAME).read_text())
    json_progress["shard_examples"] = 4
    (path / PROGRESS_NAME).write_text(json.dumps(json_progress))  # another plan: none of the shards fits it
    prepare_dir(path, RESUME, progress, spec, {"fingerprint": FP})
    assert list(path.glob("shard-*.arrow")) == []


def test_a_failed_fresh_dump_leaves_nothing_and_a_failed_redo_keeps_the_marker(tmp_path):
    spec = SPECS["fp16-none"]
    progress = {"fingerprint": FP, "fingerprint_inputs": INPUTS, "num_examples": 7, "num_features": 14, "shard_examples": 5}
    prepare_dir(tmp_path / "f", FRESH, progress, spec, {"fingerprint": FP})
    assert {p.name for p in (tmp_path / "f").iterdir()} == {MARKER_NAME, PROGRESS_NAME}
    clean_failed(tmp_path / "f", FRESH)
    assert list((tmp_path / "f").iterdir()) == []
    prepare_dir(tmp_path / "r", FRESH, progress, spec, {"fingerprint": FP})
    clean_failed(tmp_path / "r", REDO)
    assert [p.name for p in (tmp_path / "r").iterdir()] == [MARKER_NAME]
    _complete(tmp_path / "c")
    clean_failed(tmp_path / "c", FRESH)  # published shards: nothing is removed
    assert (tmp_path / "c" / MANIFEST_NAME).exists()


def test_a_failed_fresh_dump_removes_only_its_own_names_and_never_a_link_target(tmp_path):
    """clean_failed beside a foreign file and a link named like a shard: the link goes (it is a name the dump used),
    what it points to and the foreign file stay."""
    spec = SPECS["fp16-none"]
    progress = {"fingerprint": FP, "fingerprint_inputs": INPUTS, "num_examples": 7, "num_features": 14, "shard_examples": 5}
    path = tmp_path / "f"
    prepare_dir(path, FRESH, progress, spec, {"fingerprint": FP})
    outside = tmp_path / "outside.arrow"
    outside.write_bytes(b"not kdcache's")
    (path / shard_name(0)).symlink_to(outside)
    (path / "notes.txt").write_text("the user's")
    clean_failed(path, FRESH)
    assert [p.name for p in path.iterdir()] == ["notes.txt"] and (path / "notes.txt").read_text() == "the user's"
    assert outside.read_bytes() == b"not kdcache's"


def test_a_cache_dir_under_a_file_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match=r"is under .*file, which is a file, not a directory: choose a --cache-dir in a directory"):
        check_location(tmp_path / "file" / "cache")
    check_location(tmp_path / "dir" / "cache")  # the advice
