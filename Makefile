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

.PHONY: demo test setup clean-demo
setup: $(STAMP)

$(STAMP): requirements.txt $(RASTER_SOURCES)
	@echo "== setting up $(VENV) (first time: installs torch from the local wheel cache, a few minutes)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps $(addprefix -e ./,$(RASTERIZERS))
	$(PY) -c "import diff_gaussian_rasterization as r; print('rasterizer:', 'CUDA' if r.cuda_available() else 'PyTorch (CPU path)')"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	@echo "== [0/6] synthetic sequence -> $(SEQ) (ground truth in $(SEQ)/gt, benchmark in data/grounding)"
	$(PY) synthetic_sequence.py --out $(SEQ) --benchmark data/grounding
	@echo "== [1/6] Dynamic 3D Gaussians -> output/$(EXP)/synthetic/params.npz"
	$(PY) train_d3dgs.py -s $(SEQ) -e $(EXP) --demo
	@echo "== [2/6] render the reconstruction -> results/$(EXP)/synthetic/"
	$(PY) visualize_d3dgs.py -s $(SEQ) -e $(EXP) --demo
	@echo "== [3/6] video-language features, encoder '$(ENCODER)' -> $(SEQ)/interpolators/$(ENCODER)/"
	@if [ "$(ENCODER)" = color ]; then echo "   (no ViCLIP checkpoint at $(VICLIP_CKPT): using the deterministic colour encoder of the tests; see README to get ViCLIP)"; fi
	$(PY) extract_features.py -s $(SEQ) --encoder $(ENCODER) --viclip-ckpt $(VICLIP_CKPT)
	@echo "== [4/6] autoencoder 768 -> 128 -> $(SEQ)/ae/best_ckpt.pth"
	$(PY) train_autoencoder.py -s $(SEQ) --encoder $(ENCODER) --demo
	@echo "== [5/6] 4-LEGS features on the Gaussians -> output/$(EXP)/synthetic/legs/"
	$(PY) train_4legs.py -s $(SEQ) -e $(EXP) --encoder $(ENCODER) --demo
	@echo "== [6/6] prompts -> results/$(EXP)/synthetic/<prompt>/"
	$(PY) visualize_4legs.py -s $(SEQ) -e $(EXP) --encoder $(ENCODER) --viclip-ckpt $(VICLIP_CKPT) --cams orbit -p "a red ball flying in the air" -p "a blue box sliding on the floor"
	$(PY) evaluate_grounding.py -s $(SEQ) -e $(EXP) --encoder $(ENCODER) --viclip-ckpt $(VICLIP_CKPT) --benchmark data/grounding/synthetic
	@echo "== demo done: videos under results/$(EXP)/synthetic/, checkpoints under output/$(EXP)/synthetic/"

clean-demo:
	rm -rf $(SEQ) data/grounding output/$(EXP) results/$(EXP)
