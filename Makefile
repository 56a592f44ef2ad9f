# Two commands for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# On a Jetson (aarch64) the venv must see JetPack's own torch and torchvision.
VENV_FLAGS := $(if $(filter x86_64,$(ARCH)),,--system-site-packages)
STAMP := $(VENV)/.installed
DEMO_OUT ?= out/demo

.PHONY: venv demo test clean digits-weights fashion-data photo-data fashion-weights lab-tools
FASHION_DIR := /usr/share/datasets/fashion-mnist
FASHION_FILES := $(addprefix $(FASHION_DIR)/,train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
	t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Never replace a torch that is already there; on x86 without one take the CPU build.
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already present: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif [ "$(ARCH)" = "x86_64" ]; then \
		$(PY) -m pip install -q torch==2.13.0 torchvision==0.28.0; \
	else \
		echo "no torch found: install JetPack's torch and torchvision first" >&2; exit 1; \
	fi
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

# The bundled default: digits_cnn (trained here on scikit-learn's real handwritten digits) over
# 4 devices. Offline: the default plan (no method, fill or budget flag: the best candidate within
# half of NMR's memory, chosen by partition, which says which and why), the paper's plan and lop,
# their accuracy under every failed set in one table and one plot; online, on the default plan:
# 4 local nodes, a stream of 400 frames at 20 FPS, device 2 killed at frame 60 and restarted at 160
# (20 FPS leaves room on a 2-core machine that runs all 8 processes; `--rate 50` is the issue-8 check).
demo: venv
	@mkdir -p $(DEMO_OUT)
	$(VENV)/bin/robustdice partition --model digits_cnn --devices 4 --out $(DEMO_OUT)/default
	$(VENV)/bin/robustdice partition --model digits_cnn --devices 4 --paper --out $(DEMO_OUT)/paper
	$(VENV)/bin/robustdice partition --model digits_cnn --devices 4 --method lop --out $(DEMO_OUT)/lop
	$(VENV)/bin/robustdice evaluate --plan $(DEMO_OUT)/default --plan $(DEMO_OUT)/paper --plan $(DEMO_OUT)/lop \
		--plot $(DEMO_OUT)/accuracy.png
	@# A fresh cluster folder each run: its keys are made anew (the key maker never overwrites one).
	rm -rf $(DEMO_OUT)/cluster
	$(VENV)/bin/robustdice cluster --plan $(DEMO_OUT)/default --frames 400 --rate 20 --kill 2@60 --restart 2@160 \
		--workdir $(DEMO_OUT)/cluster --plot $(DEMO_OUT)/timeline.png

# The network lab's tests (network namespaces with nftables faults) need nft: install it when
# this is a Debian machine we are root on; elsewhere those tests are skipped and say why.
lab-tools:
	@command -v nft >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -q nftables >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q nftables >/dev/null 2>&1; }; }; } || \
		echo "note: nftables is not installed: the network-lab tests will be skipped (apt-get install nftables)"

# Three pytest workers, a test file each (its module fixtures are made once): much of the suite
# waits on live nodes' timeouts, and the other workers' tests use the cores meanwhile. On this
# 2-core machine the same tree took 470 s of pytest with 3 workers and 507 s with 2 (2026-12-08;
# the CPU was busy 86 % of the time with 2); an older tree took 16 min with 2 where 1 took 24.
TEST_WORKERS ?= 3

test: venv lab-tools
	@# The Fashion-MNIST tests skip (naming `make fashion-data`) where the data cannot be installed.
	@$(MAKE) --no-print-directory fashion-data || echo "Fashion-MNIST unavailable: its tests will be skipped" >&2
	@$(MAKE) --no-print-directory photo-data || echo "training photos unavailable: the tests that calibrate 224x224 or users' own models will be skipped" >&2
	@# pytest exits 5 when it collects nothing; that is not a failure of the code.
	@$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

digits-weights: venv
	$(PY) -m robustdice.partitioner.zoo.digits train --out partitioner/zoo/weights/digits_cnn.pt

# Fashion-MNIST (60k train + 10k test, IDX files) from Debian's dataset-fashion-mnist package.
fashion-data:
	@if [ -n "$$(ls $(FASHION_FILES) 2>/dev/null | wc -l | grep -x 4)" ]; then \
		echo "Fashion-MNIST present in $(FASHION_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing from $(FASHION_DIR). Install it as root:" >&2; \
		echo "  apt-get install -y dataset-fashion-mnist   (Debian/Ubuntu; package dataset-fashion-mnist)" >&2; \
		echo "or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz" >&2; \
		echo "and t10k-labels-idx1-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist there." >&2; \
		exit 1; \
	fi

# Unlabelled photos for the 224x224 models' calibration and distillation (partitioner/zoo/photos.py):
# the photo wallpapers of two Debian packages, a source disjoint from their evaluation photos.
PHOTO_PACKAGES := mate-backgrounds plasma-workspace-wallpapers
photo-data: venv
	@# The check exits 3 when photos are missing; any other failure is shown, not taken for "missing".
	@check() { $(PY) -c 'import sys; from robustdice.partitioner.zoo.photos import photos_missing; sys.exit(3 if photos_missing() else 0)'; }; \
	check; rc=$$?; \
	if [ $$rc = 0 ]; then echo "training photos present"; exit 0; fi; \
	if [ $$rc != 3 ]; then echo "could not check the training photos (exit $$rc)" >&2; exit 1; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q $(PHOTO_PACKAGES) >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(PHOTO_PACKAGES) >/dev/null; }; \
		if check; then echo "training photos installed"; \
		else echo "installed $(PHOTO_PACKAGES), but the photos are still missing or unreadable" >&2; exit 1; fi; \
	else \
		echo "The training photos are missing. Install them as root:" >&2; \
		echo "  apt-get install -y $(PHOTO_PACKAGES)" >&2; \
		exit 1; \
	fi

# fashion_vgg's shipped weights: 20 epochs, seed 0, two torch threads (about 20 minutes on an idle
# 2-core x86; the result depends on the thread count through the order of float additions).
fashion-weights: venv fashion-data
	OMP_NUM_THREADS=2 $(PY) -m robustdice.partitioner.zoo.fashion train --out partitioner/zoo/weights/fashion_vgg.pt

clean:
	rm -rf $(VENV) out *.egg-info .pytest_cache
