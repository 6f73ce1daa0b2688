"""GrowingFileDigest: the sha256 of a file hashed while it is appended to equals the sha256 of the finished file, and
a file shorter than the writer said fails loudly (a checksum of bytes that are not there would publish a bad shard)."""

from __future__ import annotations

import hashlib
import random

import pytest

from kdcache.cache.fingerprint import GrowingFileDigest, sha256_file


def test_digest_while_appending_equals_the_finished_files(tmp_path):
    path = tmp_path / "shard.arrow.tmp"
    rng = random.Random(0)
    with open(path, "wb", buffering=0) as f:
        digest = GrowingFileDigest(path, chunk=1000)  # small chunks: a part spans several reads
        for _ in range(40):
            f.write(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 5000))))
            digest.grew(f.tell())
        f.write(b"footer")  # written after the last grew(): hashed at the end
    size = path.stat().st_size
    assert digest.hexdigest(size) == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_shorter_than_written_raises(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"x" * 100)
    digest = GrowingFileDigest(path)
    with pytest.raises(OSError, match="shorter"):
        digest.hexdigest(150)
