"""Everything `kdcache compare` and the training report measure, in one package: one model's metric, size and speed
(`measure`), the paired interleaved timing behind the speed criterion (`speed`), the teacher's metric read from a
cache of the eval split (`teacher_cache`), the guide's common issues found in a training log (`diagnose`), and the
evaluation report that puts them together (`report`). Submodules are imported where used: `report` and `measure`
load torch and transformers, `diagnose` and `speed` do not."""
