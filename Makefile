# HipAtlas developer entry points. `make demo` and `make test` work on a fresh Debian machine:
# they create .venv, install the project with its dev extras and the system packages that
# headless Qt + VTK rendering needs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Defined before SYSTEM_PACKAGES, which := expands at once (defined after it, they were empty there
# and never installed). The installer builds: strip and objdump (PyInstaller, the runtime flavour's
# VTK stripping), zstd and xz (packaging/build_report.py estimate).
PACKAGING_PACKAGES := binutils zstd xz-utils
# A real PACS for the DICOM networking tests and `make pacs-demo` (started on localhost ports by them).
PACS_PACKAGES := orthanc
# Debian packages for offscreen VTK (EGL / OSMesa), Qt's xcb plugin under Xvfb, and poppler-utils
# (pdftoppm, pdftotext) with which the report test renders and reads the PDF pages.
SYSTEM_PACKAGES := xvfb xauth libgl1-mesa-dri libglx-mesa0 libegl1 libegl-mesa0 libosmesa6 \
	libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 \
	libxcb-render-util0 libxcb-randr0 libxcb-shape0 libxkbcommon-x11-0 libdbus-1-3 libfontconfig1 \
	poppler-utils $(PACS_PACKAGES) $(PACKAGING_PACKAGES)
PYTEST_ARGS ?=

.PHONY: install system-packages demo pacs-demo test test-slow test-all bench lint clean package package-runtime model

install: system-packages $(STAMP)

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "Installing system packages:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,fast-input]"
	touch $(STAMP)

# With a display: the workstation window on the demo case. Headless (no DISPLAY): register the
# demo case on the command line (prints the measurements), then run the window under Xvfb,
# register there too and save a screenshot of it.
DEMO_OUT ?= work/demo
demo: install
	@if [ -n "$$DISPLAY$$WAYLAND_DISPLAY" ]; then \
		$(VENV)/bin/hipatlas gui --demo; \
	else \
		echo "No display: registering the demo case headless into $(DEMO_OUT)/register"; \
		$(VENV)/bin/hipatlas register resources/demo --out $(DEMO_OUT)/register --overwrite --quiet && \
		echo "Opening the workstation under Xvfb; screenshot: $(DEMO_OUT)/hipatlas-demo.png" && \
		xvfb-run -a -s "-screen 0 1600x1000x24" $(VENV)/bin/hipatlas gui --demo \
			--screenshot $(DEMO_OUT)/hipatlas-demo.png --quit-after-register; \
	fi

# The hospital round trip against a real Orthanc on localhost ports (docs/hospital-it.md): load the
# demo and a simulated case as DICOM DX studies, retrieve, register, store SR + PDF + overlays + STL back.
pacs-demo: install
	$(PY) tools/pacs_demo.py --out work/pacs-demo

package: install
	packaging/build_linux.sh

# The TensorFlow-free installer (hipatlas-runtime: registration with ONNX Runtime, no training);
# builds in its own venv (build/venv-runtime), not .venv.
package-runtime: system-packages
	HIPATLAS_FLAVOUR=runtime packaging/build_linux.sh

# Regenerate the shipped model from nothing (data sets, both training stages, selection, export,
# card, held-out check): hours on a 2-core CPU; resumable: run it again to continue.
MODEL_RECIPE ?= resources/models/$(shell cat resources/models/DEFAULT)/model_card.json
MODEL_WORK ?= runs/recipe-$(shell cat resources/models/DEFAULT)
model: install
	$(VENV)/bin/hipatlas train --recipe $(MODEL_RECIPE) --out $(MODEL_WORK)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

lint: install
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
