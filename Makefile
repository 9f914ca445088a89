# The two commands of README.md: `make run` (default workflow) and `make test`.
# Both build .venv first when it is missing or requirements changed.
VENV ?= .venv
STAMP := $(VENV)/.tunesmith-installed
CORES ?= 1
GPUS ?= 1
# pytest-xdist workers for `make test`, each running whole test modules (--dist loadfile). Two
# suit a 2-core machine: most of a workflow test is one process importing or waiting, and the
# other worker fills that time. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2

.PHONY: setup run test test-fast report dag docs clean wheelhouse

# CUDA=1: the CUDA environment of requirements-cuda.txt (unsloth, liger-kernel, CUDA torch).
REQUIREMENTS := $(if $(CUDA),requirements-cuda.txt,requirements.txt)
# Offline installs (docs/offline-install.md): `make wheelhouse` downloads every file of the
# environment into WHEELHOUSE, for the target PYTHON (a version, e.g. 3.12) and PLATFORM (e.g.
# manylinux_2_28_x86_64), both this machine's when unset, leaving out what the `pip freeze` in
# IMAGE_FREEZE provides; `make setup WHEELHOUSE=dir` then installs from it with no network.
WHEELHOUSE ?=
WHEELHOUSE_OUT = $(or $(WHEELHOUSE),wheelhouse$(if $(CUDA),-cuda))
PLATFORM ?=
IMAGE_FREEZE ?=

$(STAMP): requirements.txt requirements-cuda.txt tools/setup_env.sh pyproject.toml $(if $(WHEELHOUSE),$(WHEELHOUSE)/requirements.lock)
	WHEELHOUSE=$(WHEELHOUSE) bash tools/setup_env.sh $(VENV) $(REQUIREMENTS)
	touch $(STAMP)

wheelhouse:
	python3 tools/wheelhouse.py build $(REQUIREMENTS) $(WHEELHOUSE_OUT) $(if $(PYTHON),--python-version $(PYTHON)) \
		$(if $(PLATFORM),--platform $(PLATFORM)) $(if $(IMAGE_FREEZE),--image-freeze $(IMAGE_FREEZE))

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) --resources gpu=$(GPUS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/python -m pytest -ra --durations=25 -n $(TEST_WORKERS) --dist loadfile tests

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/python -m pytest -ra -n $(TEST_WORKERS) --dist loadfile -m "not slow and not slurm" tests

report: $(STAMP)
	$(VENV)/bin/snakemake --report report.html

# The docs site into site/ (`$(VENV)/bin/mkdocs serve` serves it while you edit).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

dag: $(STAMP)
	$(VENV)/bin/snakemake --rulegraph | dot -Tsvg > docs/rulegraph.svg

clean:
	rm -rf results logs benchmarks site mlflow.db mlflow.db.lock mlartifacts report.html
