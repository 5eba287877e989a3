# Two commands on a fresh machine: `make run` and `make test` (each sets everything up first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedemu-installed
# Outer bound for each MPI test session: a hang becomes a failure, never a stuck CI.
MPI_TEST_TIMEOUT ?= 900

.PHONY: run test test-unit test-mpi test-slurm test-slow bench lint clean pool

$(STAMP): pyproject.toml setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[mpich,dev]'
	touch $(STAMP)

# FedStitch and FedAvg from scratch on the same data and devices, 3 MPI ranks each, then side by side.
QUICK := runs/quickstart
run: $(STAMP) pool
	$(BIN)/fedemu run examples/quickstart.toml --ranks 3 --set output.trace=$(QUICK)-fedstitch.h5 --set output.overwrite=true
	$(BIN)/fedemu run examples/quickstart.toml --ranks 3 --set algorithm=fedavg --set output.trace=$(QUICK)-fedavg.h5 --set output.overwrite=true
	$(BIN)/fedemu compare $(QUICK)-fedavg.h5 $(QUICK)-fedstitch.h5

test: test-unit test-mpi test-slurm

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q

# The MPI suite asserts on values gathered across ranks, at 1 and at 4 ranks.
test-mpi: $(STAMP)
	timeout $(MPI_TEST_TIMEOUT) $(BIN)/mpiexec -n 1 $(BIN)/python -m mpi4py -m pytest -q -p no:cacheprovider tests/mpi
	timeout $(MPI_TEST_TIMEOUT) $(BIN)/mpiexec -n 4 $(BIN)/python -m mpi4py -m pytest -q -p no:cacheprovider tests/mpi

# Real Slurm on this machine: slurm/local_cluster.sh starts a one-node cluster (as root: it installs
# slurm-wlm and munge if missing), the tests submit jobs, a job array and a requeue, then stop it.
# Without root the tests skip.
test-slurm: $(STAMP)
	$(BIN)/python -m pytest -q --runslow tests/test_slurm_cluster.py

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q --runslow -m slow

# Every benchmark, one after another (roughly half an hour here; peers.py first builds its two peer venvs, ~6 GB each).
# Each prints its table and writes JSON to benchmarks/results/; docs/performance.md has the figures.
BENCHMARKS := overhead scaling clients peers stitch_step algorithms rl_weighting
bench: $(STAMP) pool
	set -e; for b in $(BENCHMARKS); do echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py; done

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache

# The quickstart's pretrained block pool (3 tiny timm models, ~1 MB, 1-2 min here), built once and cached.
POOL := data/pools/quickstart
pool: $(POOL)/manifest.json
$(POOL)/manifest.json: | $(STAMP)
	$(BIN)/fedemu pools pretrain examples/quickstart.toml --set pool.path=$(POOL)
