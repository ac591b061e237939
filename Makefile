# The README's commands. Each target sets up its own virtual environment.
PYTHON ?= python3
TORCH ?= torch==2.13.0
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: demo ui test test-current test-webui browser tcmalloc bench clean

# Current releases: the command line and the engine.
.venv/.ok: requirements/current.txt requirements/test.txt
	$(PYTHON) -m venv .venv
	.venv/bin/pip install $(PIP_FLAGS) $(TORCH)
	.venv/bin/pip install $(PIP_FLAGS) -r requirements/current.txt -r requirements/test.txt
	# Only the CLIP BPE vocabulary file is used from open_clip; --no-deps keeps torchvision out.
	.venv/bin/pip install $(PIP_FLAGS) --no-deps open-clip-torch==3.3.0
	touch $@

# The WebUI's pinned stack (A1111 1.10.1), so the engine is tested where the extension runs.
.venv-webui/.ok: requirements/webui.txt requirements/test-webui.txt
	$(PYTHON) -m venv .venv-webui
	.venv-webui/bin/pip install $(PIP_FLAGS) $(TORCH)
	.venv-webui/bin/pip install $(PIP_FLAGS) -r requirements/webui.txt -r requirements/test-webui.txt
	.venv-webui/bin/pip install $(PIP_FLAGS) --no-deps open-clip-torch==2.20.0
	touch $@

demo: .venv/.ok
	.venv/bin/python -m lib_lora_train demo --out demo_out

# The standalone page: the same tab as in the WebUI, on the embedded tiny model, at http://127.0.0.1:7861
ui: .venv-webui/.ok
	.venv-webui/bin/python -m lib_lora_train ui --host 127.0.0.1 --port 7861

# The two stacks run side by side: the suite runs torch on one thread (tests/conftest.py), so on a 2-core machine
# this halves the wall time. Each stack's output is printed in one piece when it ends (--output-sync).
test: browser tcmalloc
	$(MAKE) --no-print-directory -j2 --output-sync=target test-current test-webui

# The real-browser test drives Debian's chromium (never a downloaded browser build). Installed when missing and
# when apt-get can (root); without it that one test is skipped with the reason.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; }; }; } || \
	  echo "chromium/chromedriver not installed: the browser test will be skipped"

# tcmalloc, which A1111's webui.sh preloads on Linux: the heap test checks that a finished run's memory is handed
# back under it too. Installed when missing and when apt-get can (root); without it that test is skipped.
tcmalloc:
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q libtcmalloc-minimal4 >/dev/null; }; }; } || \
	  echo "libtcmalloc-minimal4 not installed: the tcmalloc heap test will be skipped"

test-current: .venv/.ok
	.venv/bin/python -m pytest -q tests

test-webui: .venv-webui/.ok
	.venv-webui/bin/python -m pytest -q tests

bench: .venv/.ok
	.venv/bin/python bench/train_step.py

clean:
	rm -rf .venv .venv-webui demo_out
