# zettabee: `make demo` runs the main job on a built-in lab; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMPS := .stamps

.PHONY: deps demo demo-clean test lint unit integration guest fault-test bench deb clean

deps: $(STAMPS)/apt $(STAMPS)/venv

$(STAMPS)/apt: scripts/apt-packages.txt scripts/install-deps
	./scripts/install-deps
	@mkdir -p $(STAMPS) && touch $@

# pip copies the executables of plugins/ into the venv: a changed one is installed again.
$(STAMPS)/venv: setup.cfg pyproject.toml $(wildcard plugins/*) $(STAMPS)/apt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@mkdir -p $(STAMPS) && touch $@

demo: deps
	$(PY) -m lab.demo

demo-clean: deps
	$(PY) -m lab.demo --clean

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy zettabee nsca bench lab

unit: deps
	$(PY) -m pytest tests/unit

integration: deps guest
	$(PY) -m pytest -m integration

# The OpenZFS lab guest's image: built once per recipe (lab/guest-build.sh), then cached in
# /var/tmp/zettabee-lab/guest/ (about 5-8 minutes the first time).
guest: deps
	$(PY) -m lab.guest build --zfs all

# The guests' images build in the background while the suite runs the zfs-fuse tests (it
# runs those first); a guest test that comes before its image is ready waits for it.
test: lint
	@mkdir -p $(STAMPS)
	$(PY) -m lab.guest build --zfs all >$(STAMPS)/guest-build.log 2>&1 & build=$$!; \
	$(PY) -m pytest; status=$$?; \
	wait $$build || { echo "guest image build failed: $(STAMPS)/guest-build.log"; cat $(STAMPS)/guest-build.log; }; \
	exit $$status

# Faults forced on the lab; ends with the table fault | expected | observed | data.
# (make test runs them too: they are part of the pytest suite.)
fault-test: deps
	$(PY) -m pytest tests/integration/faults

# Each benchmark appends its figures, the machine and its load to bench/results/*.jsonl
# (bench/README.md explains them). Several minutes: 500 MB sends, a fleet of 500 pairs.
bench: deps
	$(PY) bench/bench_update.py
	$(PY) bench/bench_fleet.py --jobs 4,8
	$(PY) bench/bench_plugins.py
	$(PY) bench/bench_nsca.py

# The Debian package: dist/zettabee_<version>_all.deb (debian/, debhelper and pybuild;
# the build tools are in scripts/apt-packages.txt). The tree's own files are not touched.
deb: $(STAMPS)/apt
	./scripts/build-deb

clean:
	rm -rf $(STAMPS) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
