# Two commands take a fresh machine (python3 + make) to a result: `make quickstart` and `make test`.
# CI (.ci/run) runs `make test` and nothing else, so the two cannot drift apart.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: quickstart test test-all test-newest ffmpeg clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

# FFmpeg's shared libraries, which the torchcodec video backend loads (its tests need them): installed
# with apt-get where this is root on Debian/Ubuntu; anywhere else `make test` stops here, naming the fix.
ffmpeg: $(STAMP)
	@$(PY) -c "import sys; from umt_distill.data.video_torchcodec import torchcodec_unavailable_reason as r; sys.exit(3 if r() else 0)"; \
	rc=$$?; [ $$rc = 0 ] && exit 0; [ $$rc = 3 ] || exit $$rc; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make: installing FFmpeg's shared libraries for torchcodec (apt-get install ffmpeg)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; \
	else \
	  echo "make: the torchcodec backend cannot load FFmpeg's shared libraries, and its tests need them." \
	       "Install FFmpeg 4-9 (Debian/Ubuntu: sudo apt-get install ffmpeg; macOS: brew install ffmpeg;" \
	       "conda: conda install ffmpeg), then run make test again." >&2; exit 2; \
	fi

quickstart: $(STAMP)
	$(VENV)/bin/umt-distill quickstart --output outputs/quickstart

test: $(STAMP) ffmpeg
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP) ffmpeg
	$(PY) -m pytest -q -m '' $(PYTEST_ARGS)

# The suite on the newest releases of the video and storage libraries, past pyproject's upper bounds
# (which name the newest releases the suite has passed on): how a new release gets tested on purpose.
NEWEST ?= av zarr webdataset numcodecs
test-newest:
	test -x $(VENV)-newest/bin/python || $(PYTHON) -m venv $(VENV)-newest
	$(VENV)-newest/bin/python -m pip install --quiet --upgrade pip
	$(VENV)-newest/bin/python -m pip install --quiet -e '.[dev,ray]'
	$(VENV)-newest/bin/python -m pip install --quiet --upgrade --no-deps $(NEWEST)
	$(VENV)-newest/bin/python -m pip list 2>/dev/null | grep -i -E "^($(subst $() ,|,$(NEWEST))) "
	$(MAKE) ffmpeg VENV=$(VENV)-newest STAMP=$(VENV)-newest/bin/python
	$(VENV)-newest/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VENV)-newest outputs build *.egg-info
