# SPADE — two commands on a fresh machine:
#   make demo   installs what is missing, then runs the main job on SynthPSG
#   make test   installs what is missing, then runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.spade-installed
DEMO_OUT ?= output/demo
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo lint test bench clean pretrain ablations

install: $(STAMP)

# Re-runs only when the dependency files change; a second `make install` does nothing slow.
$(STAMP): setup.py requirements.txt tools/install_detectron2.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -r requirements.txt
	bash tools/install_detectron2.sh $(PY)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import spade, detectron2; print('spade + detectron2 import OK')"
	touch $(STAMP)

demo: install
	$(PY) tools/run_demo.py --output $(DEMO_OUT) $(DEMO_ARGS)

# Stage 0: reproduce every shipped foundation model (models/, see MODEL_ZOO.md) from scratch.
# On a CPU, CLIP and VAE train side by side (one core each), then the VAE's decoder fine-tune on
# both cores once CLIP is done, then the UNet on them and its token grounding continuations
# (PRETRAIN_UNET_RUNS: unet_tiny_grounded_condensed.yaml, then ..._condensed2.yaml); each run
# resumes where an interrupted one stopped (--resume). With a GPU, tools/pretrain_gpu.sh runs
# the configs under configs/pretrain/gpu/, each fitted into its PRETRAIN.MAX_WALL_SECONDS. On the
# CPU every run trains under bf16 autocast (PRETRAIN_CPU_OPTS; 1.3-2.5x faster per iteration on
# CPUs with AMX or AVX-512-BF16, benchmarks/bench_pretrain.py); PRETRAIN_CPU_OPTS= trains in
# fp32. The UNet runs also torch.compile the UNet where a C++ compiler is found
# (PRETRAIN.COMPILE auto in unet_tiny.yaml: 1.2-1.3x faster steps;
# PRETRAIN_CPU_OPTS="SOLVER.AMP.ENABLED True PRETRAIN.COMPILE off" trains them eager).
PRETRAIN_ARGS ?= --resume
PRETRAIN_CPU_OPTS ?= SOLVER.AMP.ENABLED True
PRETRAIN_NET := $(PY) projects/SPADE/pretrain_net.py
# Gates are measured on each model's final export only (clip_tiny_region, vae_tiny_decoder, the
# last of PRETRAIN_UNET_RUNS): a run that a later run of the chain continues exports into the same folder,
# and the later export replaces it and its gates. PRETRAIN_GATES=all measures them after every
# run too; `pretrain_net.py --config-file CFG --eval-only` measures an export's gates at any time.
PRETRAIN_GATES ?= final
# Options for the UNet's first run only (CPU): PRETRAIN_UNET_OPTS="SOLVER.MAX_ITER 1500" is the
# shorter chain of MODEL_ZOO.md ("Making the chain shorter": run 1 halved before the five runs of
# the UNet shipped until 2026-12-03; 191.5 min on a 2-core AMD EPYC, every UNet gate met, 10
# points of the demo's R@50 under that UNet's).
PRETRAIN_UNET_OPTS ?=
# The UNet's grounding runs after unet_tiny.yaml, in order, each continuing the one before (the
# last measures the gates): the condensed chain of the shipped UNet (1,000 + 800 iterations;
# the UNet's three runs 169.8 min on a 2-core AMD EPYC, MODEL_ZOO.md). The five runs of the UNet
# shipped before it (3,100 iterations, about 215 min there; 14 points more object pointing, 1.3
# more demo R@50): PRETRAIN_UNET_RUNS="unet_tiny_grounded unet_tiny_grounded2 unet_tiny_grounded3
# unet_tiny_grounded4 unet_tiny_grounded5".
PRETRAIN_UNET_RUNS ?= unet_tiny_grounded_condensed unet_tiny_grounded_condensed2
PRETRAIN_UNET_CONTINUED := $(filter-out $(lastword $(PRETRAIN_UNET_RUNS)),$(PRETRAIN_UNET_RUNS))
PRETRAIN_MID := $(if $(filter all,$(PRETRAIN_GATES)),,--skip-gates) $(PRETRAIN_ARGS) $(PRETRAIN_CPU_OPTS)
pretrain: install
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		PY=$(PY) bash tools/pretrain_gpu.sh output/pretrain_gpu; exit $$?; fi; \
	mkdir -p output; { OMP_NUM_THREADS=1 $(PRETRAIN_NET) --config-file configs/pretrain/clip_tiny.yaml \
		$(PRETRAIN_MID) && OMP_NUM_THREADS=1 $(PRETRAIN_NET) \
		--config-file configs/pretrain/clip_tiny_region.yaml $(PRETRAIN_ARGS) $(PRETRAIN_CPU_OPTS); } \
		> output/pretrain-clip.log 2>&1 & clip=$$!; \
	OMP_NUM_THREADS=1 $(PRETRAIN_NET) --config-file configs/pretrain/vae_tiny.yaml $(PRETRAIN_MID); \
	vae=$$?; wait $$clip || { echo "CLIP pretraining failed: see output/pretrain-clip.log"; exit 1; }; \
	test $$vae -eq 0 && $(PRETRAIN_NET) --config-file configs/pretrain/vae_tiny_decoder.yaml \
		$(PRETRAIN_ARGS) $(PRETRAIN_CPU_OPTS) && \
	$(PRETRAIN_NET) --config-file configs/pretrain/unet_tiny.yaml $(PRETRAIN_MID) $(PRETRAIN_UNET_OPTS) && \
	$(foreach c,$(PRETRAIN_UNET_CONTINUED),$(PRETRAIN_NET) --config-file configs/pretrain/$(c).yaml $(PRETRAIN_MID) && )\
	$(PRETRAIN_NET) --config-file configs/pretrain/$(lastword $(PRETRAIN_UNET_RUNS)).yaml $(PRETRAIN_ARGS) $(PRETRAIN_CPU_OPTS)

# The paper's ablations in miniature (docs/ABLATIONS.md): cached runs, so a second call only prints
# the table; ABLATION_ARGS=--quick for a smoke test, --only TABLE to run some tables.
ablations: install
	$(PY) tools/run_ablations.py $(ABLATION_ARGS)

# Formatter and linter (ruff.toml: 100 columns, pyflakes, pycodestyle, isort).
lint: install
	$(PY) -m ruff format --check . && $(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) output build *.egg-info
