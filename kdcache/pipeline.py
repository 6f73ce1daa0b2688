"""`FineTunePipeline`, the guide's entry point: with distillation on it finds or dumps the
teacher cache, then trains the student from it; with it off it fine-tunes plainly."""

from __future__ import annotations

from typing import Optional

from kdcache.config import FineTuneConfig
from kdcache.dump import DumpResult, dump_teacher
from kdcache.train import TrainResult, train_student


class FineTunePipeline:
    """Runs one configured fine-tuning or distillation job."""

    def __init__(self, config: FineTuneConfig):
        if not isinstance(config, FineTuneConfig):
            raise TypeError(f"FineTunePipeline takes a FineTuneConfig, got {type(config).__name__}")
        self.config = config
        self.dump_result: Optional[DumpResult] = None
        self.result: Optional[TrainResult] = None

    def train(self, train_dataset=None, eval_dataset=None) -> TrainResult:
        """Train on `datasets.Dataset` objects (or the config's files when omitted)."""
        cache_dir = None
        if self.config.use_distillation:
            self.dump_result = dump_teacher(self.config, train_dataset=train_dataset, progress=not self.config.disable_tqdm)
            cache_dir = str(self.dump_result.cache_dir)
        self.result = train_student(self.config, train_dataset=train_dataset, eval_dataset=eval_dataset, cache_dir=cache_dir)
        return self.result
