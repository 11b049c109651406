# scratchpath: every developer and CI command lives here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?=
OUT    ?= demo_output

.PHONY: venv demo test test-container lint format bench clean pretrain-cpu cpu-stores compare-cpu \
	lock gpu-check gpu-wheels

# The virtualenv is (re)built whenever pyproject.toml or the lock changes.
# constraints.txt is the lock: the exact versions of every package the tests ran with.
$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

## make demo [DATA=path/to/slides]: synthetic (or your) slides -> store -> pretrain -> export -> eval
demo: venv
	$(BIN)/scratchpath demo --out $(OUT) $(if $(DATA),--slides $(DATA),)

## make pretrain-cpu [SHARED=../shared/data]: real H&E tiles -> stores -> recipes/cpu_pretrain.yaml
## (<= 20 min on 2 CPU cores) -> runs/cpu_pretrain/export -> EBHI-Seg eval (5 case-grouped splits,
## random init the mean of 6 twins)
SHARED ?= ../shared/data
CPU_STORES := runs/cpu_stores
# glibc hands every buffer over 32 MB (most activations of a batch) back to the kernel and
# page-faults it in again on the next step; keeping them in the heap made a CPU step 1.3-1.5x
# faster (benchmarks/bench_cpu_step.py).
CPU_MALLOC := MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736
# The pretraining pool (unlabelled) and the evaluation sets (labelled, never pretrained on:
# EBHI-Seg by case, LC25000 lung by original tile).
cpu-stores: venv
	$(BIN)/scratchpath import-tiles $(SHARED)/tiles/deeptexture_examples_unlabeled_256/unlabeled \
	    --no-labels --out $(CPU_STORES)/deeptexture
	$(BIN)/scratchpath import-tiles $(SHARED)/tiles/oral_oscc_224_unique --no-labels \
	    --out $(CPU_STORES)/oral
	$(BIN)/scratchpath import-tiles $(SHARED)/tiles/consep_patches_256 --no-labels \
	    --out $(CPU_STORES)/consep
	$(BIN)/scratchpath ingest $(SHARED)/slides/CMU-1-Small-Region.svs \
	    $(SHARED)/slides/TCGA-CR-7395-01A-01-TS1.svs --mpp 0.5 --assume-mpp 0.5 --no-progress \
	    --out $(CPU_STORES)/slides
	$(BIN)/scratchpath import-tiles $(SHARED)/tiles/ebhi_seg_colorectal_224 \
	    --labels $(SHARED)/tiles/ebhi_seg_colorectal_224/labels.csv --group-column case_id \
	    --out $(CPU_STORES)/ebhi
	$(BIN)/scratchpath import-tiles $(SHARED)/tiles/lc25000_lung_224 \
	    --labels $(SHARED)/tiles/lc25000_lung_224/labels.csv --group-column lc25000clean_group_id \
	    --out $(CPU_STORES)/lc25000_labelled

pretrain-cpu: cpu-stores
	rm -rf runs/cpu_pretrain/checkpoints
	$(CPU_MALLOC) $(BIN)/scratchpath fit --config recipes/cpu_pretrain.yaml
	$(BIN)/scratchpath export runs/cpu_pretrain/checkpoints/last.ckpt --out runs/cpu_pretrain/export \
	    --overwrite
	$(BIN)/scratchpath eval --model runs/cpu_pretrain/export --data $(CPU_STORES)/ebhi \
	    --split 0.4 --repeats 5 --random-seeds 6 --out runs/cpu_pretrain/eval_ebhi

## make compare-cpu [INIT=weights file or export folder]: the pair of docs/from_scratch_or_not.md.
## recipes/cpu_pretrain.yaml from scratch (make pretrain-cpu) and the same recipe, same steps,
## started from INIT (default: the from-scratch export itself, a stand-in for natural-image
## weights, which cannot be downloaded here), compared with random-init twins and colour
## histograms on EBHI-Seg and LC25000 lung (runs/compare_cpu/report).
INIT ?= runs/cpu_pretrain/export
compare-cpu: pretrain-cpu
	rm -rf runs/compare_cpu/continued/checkpoints
	$(CPU_MALLOC) $(BIN)/scratchpath fit --config recipes/cpu_pretrain.yaml \
	    --model.init_args.init $(INIT) --trainer.default_root_dir runs/compare_cpu/continued
	$(BIN)/scratchpath export runs/compare_cpu/continued/checkpoints/last.ckpt \
	    --out runs/compare_cpu/continued/export --overwrite
	$(BIN)/scratchpath compare --data ebhi=$(CPU_STORES)/ebhi lung=$(CPU_STORES)/lc25000_labelled \
	    --model scratch=runs/cpu_pretrain/export continued=runs/compare_cpu/continued/export \
	    random=random:runs/cpu_pretrain/export histogram histogram:rgb \
	    --reference scratch --random-seeds 6 --split 0.4 --repeats 5 --out runs/compare_cpu/report

## make test: the whole test suite (what CI runs)
test: venv
	$(BIN)/python -m pytest -q tests

## make test-container: build docker/Dockerfile on a local Debian base and run the image
## (tests/test_container.py; root, a running Docker engine, ~15 GB of disk; CI runs it after make test)
test-container: venv
	SCRATCHPATH_CONTAINER_TESTS=1 $(BIN)/python -m pytest -q tests/test_container.py

## make gpu-check [PYTHON=python3]: on one CUDA GPU, the CUDA tier (pytest -m cuda) and the GPU
## benchmarks in <= 8 min -> one table + runs/gpu_check.json. No virtualenv: any python3 holding
## torch, with src/ on the path (the lent GPU machine: README "The GPU check").
GPU_CHECK_OUT ?= runs/gpu_check.json
gpu-check:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

## make gpu-wheels [PYTHON=...]: the cp312 wheels (.whl/) and real tiles (.gpu-data/) that
## gpu-check needs on a machine without a package registry (both git-ignored)
gpu-wheels:
	PYTHON=$(PYTHON) bash scripts/gpu_wheels.sh

lint: venv
	$(BIN)/ruff check src tests benchmarks docker
	$(BIN)/ruff format --check src tests benchmarks docker

format: venv
	$(BIN)/ruff format src tests benchmarks docker
	$(BIN)/ruff check --fix src tests benchmarks docker

bench: venv
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

## make lock: rewrite constraints.txt from the venv (after a deliberate upgrade; then run make test)
lock: venv
	{ sed -n '1,/^# --- pins/p' constraints.txt; \
	  $(BIN)/python -m pip freeze --exclude-editable --all | grep -v -E '^(pip|setuptools|wheel)=='; \
	} > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
