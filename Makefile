# Two commands: `make demo` (whole pipeline on the bundled synthetic sequence) and `make test`.
# Each sets up .venv on its own the first time (torch pinned, rasterizers built with CUDA only
# where a CUDA toolkit and a GPU exist, else pure PyTorch).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RASTERIZERS := diff-gaussian-rasterization-w-depth diff-gaussian-rasterization-w-depth-feat
RASTER_SOURCES := $(shell find -L $(RASTERIZERS) -name setup.py -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.cpp' 2>/dev/null)

VICLIP_CKPT ?= data/checkpoints/ViClip-InternVid-10M-FLT.pth
ENCODER ?= $(if $(wildcard $(VICLIP_CKPT)),viclip,color)
SEQ := data/synthetic
EXP := demo

.PHONY: demo test run setup clean-demo demo-reconstruction demo-videos demo-features demo-autoencoder demo-lifting \
	demo-lifting-0 demo-lifting-1 \
	demo-prompts demo-grounding
setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml $(RASTER_SOURCES)
	@echo "== setting up $(VENV) (first time: installs torch from the local wheel cache, a few minutes)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps $(addprefix -e ./,$(RASTERIZERS))
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	$(PY) -c "import diff_gaussian_rasterization as r; print('rasterizer:', 'CUDA' if r.cuda_available() else 'PyTorch (CPU path)')"
	touch $@

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q tests

# The whole pipeline on your own sequence, resumable, with per-stage time and disk at the end (run_all.sh):
#   make run SEQ=data/basketball EXP=exp1 PROMPT="a man throwing the ball"
run: $(STAMP)
	bash run_all.sh -s $(SEQ) -e $(EXP) --encoder $(ENCODER) --viclip-ckpt $(VICLIP_CKPT) --python $(PY) \
		$(if $(PROMPT),-p "$(PROMPT)")

# The demo's stages that do not depend on each other run side by side, one torch thread each: on 2
# cores shared with other jobs, torch's two threads wait for each other whenever a job takes one of
# the cores (an autoencoder epoch of the demo: 7 s with one thread, 144 s with two; docs/performance.md).
# Reconstruction (stages 1, 2) and features (stages 3, 4) are independent; stage 5 needs 1 and 4,
# the prompts (6) and the grounding scores need 5. Each stage's output is printed when it ends.
demo: $(STAMP)
	@echo "== [0/6] synthetic sequence -> $(SEQ) (ground truth in $(SEQ)/gt, benchmark in data/grounding)"
	$(PY) synthetic_sequence.py --out $(SEQ) --benchmark data/grounding
	@OMP_NUM_THREADS=1 $(MAKE) --no-print-directory -j2 --output-sync=target demo-videos demo-prompts demo-grounding
	@echo "== demo done: videos under results/$(EXP)/synthetic/, checkpoints under output/$(EXP)/synthetic/"
	@echo "== look around and ask your own prompts: $(PY) viewer.py -s $(SEQ) -e $(EXP) --encoder $(ENCODER) --viclip-ckpt $(VICLIP_CKPT) --cams orbit, then open http://localhost:8080"

demo-reconstruction:
	@echo "== [1/6] Dynamic 3D Gaussians -> output/$(EXP)/synthetic/params.npz"
	$(PY) train_d3dgs.py -s $(SEQ) -e $(EXP) --demo

demo-videos: demo-reconstruction
	@echo "== [2/6] render the reconstruction -> results/$(EXP)/synthetic/"
	$(PY) visualize_d3dgs.py -s $(SEQ) -e $(EXP) --demo

demo-features:
	@echo "== [3/6] video-language features, encoder '$(ENCODER)' -> $(SEQ)/interpolators/$(ENCODER)/"
	@if [ "$(ENCODER)" = color ]; then echo "   (no ViCLIP checkpoint at $(VICLIP_CKPT): using the deterministic colour encoder of the tests; see README to get ViCLIP)"; fi
	$(PY) extract_features.py -s $(SEQ) --encoder $(ENCODER) --viclip-ckpt $(VICLIP_CKPT)

demo-autoencoder: demo-features
	@echo "== [4/6] autoencoder 768 -> 128 -> $(SEQ)/ae/best_ckpt.pth"
	$(PY) train_autoencoder.py -s $(SEQ) --encoder $(ENCODER) --demo

# Stage 5 as two processes, each a contiguous half of the timesteps (as two torchrun ranks split
# them), one core each: the second half starts cold at its first timestep.
demo-lifting: demo-lifting-0 demo-lifting-1

demo-lifting-0 demo-lifting-1: demo-lifting-%: demo-reconstruction demo-autoencoder
	@echo "== [5/6] 4-LEGS features on the Gaussians, half $* of the timesteps -> output/$(EXP)/synthetic/legs/"
	RANK=$* WORLD_SIZE=2 $(PY) train_4legs.py -s $(SEQ) -e $(EXP) --encoder $(ENCODER) --demo

demo-prompts: demo-lifting
	@echo "== [6/6] prompts -> results/$(EXP)/synthetic/<prompt>/"
	$(PY) visualize_4legs.py -s $(SEQ) -e $(EXP) --encoder $(ENCODER) --viclip-ckpt $(VICLIP_CKPT) --cams orbit -p "a red ball flying in the air" -p "a blue box sliding on the floor"

demo-grounding: demo-lifting
	@echo "== grounding scores on the synthetic benchmark -> results/$(EXP)/synthetic/grounding.json"
	$(PY) evaluate_grounding.py -s $(SEQ) -e $(EXP) --encoder $(ENCODER) --viclip-ckpt $(VICLIP_CKPT) --benchmark data/grounding/synthetic

clean-demo:
	rm -rf $(SEQ) data/grounding output/$(EXP) results/$(EXP)
