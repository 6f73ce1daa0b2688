"""kdcache: offline knowledge distillation for Hugging Face models.

Stage one (`dump_teacher`) runs the teacher once and writes its outputs to a cache; stage two
(`train_student`) trains students from the cache without loading the teacher."""

from kdcache.config import ConfigError, FineTuneConfig
from kdcache.monitor import DistillationMonitor

__version__ = "0.1.0"


def __getattr__(name: str):
    """Heavy entry points load lazily, so `import kdcache` stays fast for the CLI's help."""
    lazy = {
        "FineTunePipeline": ("kdcache.pipeline", "FineTunePipeline"),
        "dump_teacher": ("kdcache.dump", "dump_teacher"),
        "train_student": ("kdcache.train", "train_student"),
        "CacheReader": ("kdcache.cache", "CacheReader"),
        "CacheError": ("kdcache.cache", "CacheError"),
        "CacheMismatchError": ("kdcache.cache", "CacheMismatchError"),
        "load_sweep": ("kdcache.sweep", "load_sweep"),
        "run_sweep": ("kdcache.sweep", "run_sweep"),
        "augment_dataset": ("kdcache.augment", "augment_dataset"),
        "AugmentOptions": ("kdcache.augment", "AugmentOptions"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")


__all__ = [
    "ConfigError", "FineTuneConfig", "FineTunePipeline", "DistillationMonitor", "dump_teacher", "train_student",
    "CacheReader", "CacheError", "CacheMismatchError", "load_sweep", "run_sweep", "augment_dataset", "AugmentOptions",
    "__version__",
]
