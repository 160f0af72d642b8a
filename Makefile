# The two commands a newcomer needs: `make demo` and `make test`. Both install what is
# missing first (idempotent): a .venv with the pinned torch, the project, and the Debian
# package with the real Fashion-MNIST files.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Label Studio pins its own stack (Django, an exact label-studio-sdk): it gets its own venv.
LS_VENV := .venv-labelstudio
LS_VERSION := 1.23.2
# cpu -> onnxruntime, gpu -> onnxruntime-gpu. Never both in one venv: they overwrite
# each other. Switching needs a fresh venv (make clean-venv).
ORT ?= cpu
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# compose v1 (Debian): validates docker-compose.yml without a Docker engine (tests/test_compose.py)
DOCKER_COMPOSE := /usr/bin/docker-compose
CHROMEDRIVER := /usr/bin/chromedriver
HAPROXY := /usr/sbin/haproxy
DATA := data/fashion-mnist-lt
MINORITY := coat,sandal,bag

.PHONY: setup setup-test test-quality test-install java postgres containers image images test-containers test-e2e demo test test-fast soak lint bench-train bench-imbalance bench-serving bench-labeling bench-loop clean-venv

# What the demo and your own images use: the venvs, the real Fashion-MNIST, Java.
setup: $(VENV)/.installed-$(ORT) $(LS_VENV)/.installed-$(LS_VERSION) $(FASHION_MNIST) java

# ... and the servers only the tests start (PostgreSQL, HAProxy, Chromium, compose v1).
setup-test: setup $(DOCKER_COMPOSE) postgres $(CHROMEDRIVER) $(HAPROXY)

# torch first, from the pinned releases, so no resolver pulls another torch build.
$(VENV)/.installed-$(ORT): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[$(ORT),dev]'
	$(PY) -m pip check
	touch $@

# uv only inside the Label Studio venv: it resolves Django & co fast, and no torch is involved.
$(LS_VENV)/.installed-$(LS_VERSION):
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q uv
	$(LS_VENV)/bin/uv pip install -q --python $(LS_VENV)/bin/python label-studio==$(LS_VERSION)
	$(LS_VENV)/bin/python -c 'import label_studio; print("label-studio", label_studio.__version__)'
	touch $@

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# TorchServe's frontend needs Java 11+: Debian's JRE where the machine has none.
java:
	@command -v java >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless; }

# Debian's Chromium and its driver: tests/test_browser.py is an annotator in a real browser
# (Selenium drives the system Chromium; nothing is downloaded).
$(CHROMEDRIVER):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq --no-install-recommends chromium chromium-driver

# Debian's PostgreSQL server (binaries only are needed): the tests of Label Studio and of
# the capture index on PostgreSQL start their own instance in a temporary data directory
# (tests/postgres.py).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq --no-install-recommends postgresql; }

# Debian's HAProxy: tests/test_replicas.py puts it in front of two TorchServe replicas
# (its package starts no listener of its own).
$(HAPROXY):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq --no-install-recommends haproxy

$(DOCKER_COMPOSE):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq --no-install-recommends docker-compose

$(DATA)/scenario.json: | setup
	$(VENV)/bin/visionloop data fashion-mnist --out $(DATA) --imbalance-ratio 100 \
		--minority $(MINORITY) --pool-per-class 3000 --seed 0

# The whole loop with real TorchServe and Label Studio on loopback; report in runs/demo/.
demo: setup $(DATA)/scenario.json
	$(VENV)/bin/visionloop demo --scenario $(DATA) --out runs/demo

# pytest-randomly shuffles the order (each test stands alone) and the seed is printed:
# PYTEST_ARGS=--randomly-seed=N repeats an order, PYTEST_ARGS="-p no:randomly" keeps the
# files' order.
test: setup-test
	$(PY) -m pytest -q -m "not container and not install and not e2e and not quality" \
		--durations=15 $(PYTEST_ARGS)

test-fast: setup-test
	$(PY) -m pytest -q -m "not slow and not container and not install and not e2e and not quality"

# Model quality and the loop's value against the figures bench/ recorded (~25 min): the
# default `visionloop train` on two long-tailed scenarios over three seeds, the loop
# simulated on cached embeddings against random labels; .ci/run runs it.
test-quality: setup-test
	$(PY) -m pytest -q -s -m quality $(PYTEST_ARGS)

# The whole loop end to end (~8 min): the README's own-images walkthrough as written, on
# real photos, and the quick demo; .ci/run runs it.
# Not shuffled, like test-install and test-containers: a few long scenarios, run in the
# files' order; make test and make test-quality shuffle.
test-e2e: setup-test
	$(PY) -m pytest -q -s -p no:randomly -m e2e

# The wheel in a fresh virtualenv, torch from the pinned wheels (~4 min); .ci/run runs it.
test-install: setup
	$(PY) -m pytest -q -s -p no:randomly -m install

# Debian's podman (rootful, runc: deploy/podman.sh) and mmdebstrap, which builds the local
# base image (no registry serves one here); the dnsname plugin resolves compose services.
containers:
	@command -v podman >/dev/null && command -v mmdebstrap >/dev/null && \
		command -v runc >/dev/null && command -v catatonit >/dev/null || { \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends \
		podman runc catatonit mmdebstrap golang-github-containernetworking-plugin-dnsname; }

# The visionloop image (Dockerfile) from the local base and the project's wheel.
image: setup containers
	deploy/build-image.sh visionloop:latest $(ORT)

# Every image docker-compose.yml names: visionloop's, PostgreSQL's, Label Studio's, HAProxy's.
images: image
	deploy/podman.sh build --pull=never -t visionloop-postgres:latest deploy/postgres
	deploy/podman.sh build --pull=never -t visionloop-labelstudio:latest deploy/labelstudio
	deploy/podman.sh build --pull=never -t visionloop-haproxy:latest deploy/haproxy

# Builds the images and runs them for real (~15 min): not part of `make test`; .ci/run
# runs both.
test-containers: setup-test containers
	$(PY) -m pytest -q -s -p no:randomly -m container

# The long versions of the fault tests `make test` runs short: a 5-minute load soak with a
# worker killed, 3000 random (not fixed-seed) fuzz inputs per path. Prints the counts.
soak: setup-test
	VISIONLOOP_SOAK_SECONDS=300 VISIONLOOP_FUZZ_EXAMPLES=3000 \
		$(PY) -m pytest -q -s -p no:cacheprovider tests/test_soak.py tests/test_fuzz.py

# lint-imports reads a package from its folder; visionloop's stages live in sibling folders
# (pyproject's package-dir), so it reads a copy laid out as the installed package is.
lint: setup
	$(VENV)/bin/ruff check core visionloop trainer serving labeling bench tests
	rm -rf build/lint && mkdir -p build/lint && cp -r visionloop build/lint/ && \
		for stage in core trainer serving labeling; do cp -r $$stage build/lint/visionloop/; done
	cd build/lint && ../../$(VENV)/bin/lint-imports ../../pyproject.toml

bench-train: setup
	$(PY) -m bench.train_throughput

bench-imbalance: setup
	$(PY) -m bench.imbalance --out reports/bench-imbalance

bench-serving: setup
	$(PY) -m bench.serving

bench-labeling: setup
	$(PY) -m bench.label_strategies

# Does the loop pay? Strategies vs random to 80% of the whole-pool gain, the gate's wrong
# decisions, and the learners side by side (results in bench/results/).
bench-loop: setup
	$(PY) -m bench.active_learning --seeds 0,1,2
	$(PY) -m bench.gate
	$(PY) -m bench.learners --seeds 0,1,2

clean-venv:
	rm -rf $(VENV) $(LS_VENV)
