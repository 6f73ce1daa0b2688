"""kdcache's on-disk teacher cache (format v3): memory-mapped Arrow IPC shards plus a manifest.

One row per feature (what the model sees in one forward pass), keyed by a dense feature id and
carrying its example id; target fields per example or per position, hidden states per token or
pooled. The contract between stage one (dump-teacher writes it) and stage two (train-student
reads it). Depends on numpy and pyarrow only (torch only inside the quantisation functions).
"""

from .errors import CacheError, CacheMismatchError, NonFiniteError
from .fingerprint import canonical_json, fingerprint, hash_files, sha256_file
from .format import FORMAT_VERSION, HiddenSpec, StoreSpec, TargetSpec
from .quant import dequantize_int8, dequantize_int8_torch, quantize_int8
from .reader import CacheReader, TeacherRows
from .summary import format_summary, summarize
from .writer import BackgroundWriter, ShardWriter, TeacherBatch, WriterPool

__all__ = [
    "FORMAT_VERSION",
    "StoreSpec",
    "TargetSpec",
    "HiddenSpec",
    "TeacherBatch",
    "TeacherRows",
    "ShardWriter",
    "BackgroundWriter",
    "WriterPool",
    "CacheReader",
    "CacheError",
    "CacheMismatchError",
    "NonFiniteError",
    "summarize",
    "format_summary",
    "fingerprint",
    "canonical_json",
    "sha256_file",
    "hash_files",
    "quantize_int8",
    "dequantize_int8",
    "dequantize_int8_torch",
]
