# Two entry points that work on a fresh machine: `make serve` and `make test`.
# Both build the virtualenv from the locks first: requirements.lock (what the server
# runs on) and requirements-test.lock (that, plus the test tools), exact versions that
# CI tested. `make lock` re-resolves both to the newest versions pyproject.toml allows.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_TOOLS := pip-tools==7.7.0
COMPILE := $(VENV)-lock/bin/pip-compile -q --upgrade --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links --no-header

.PHONY: serve test venv lock clean

venv: $(STAMP)

$(STAMP): requirements-test.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-test.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/unmask serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Re-resolve both locks, then `make clean test` to test against what they now pin.
lock:
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install -q $(PIP_TOOLS)
	$(COMPILE) -o requirements.lock pyproject.toml lock.in
	$(COMPILE) --extra test -c requirements.lock -o requirements-test.lock pyproject.toml lock.in
	sed -i 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' requirements.lock requirements-test.lock

clean:
	rm -rf $(VENV) $(VENV)-lock build *.egg-info
