# One entry point for developers and CI. `make demo` and `make test` work on a fresh Debian machine (root).
PYTHON3   ?= python3
PYTHON36  ?= /root/.pyenv/versions/3.6.15/bin/python3.6
VENV      := .venv
VENV36    := .venv36
DEB_PACKAGES := rpm rpmlint python3-packaging prometheus systemd qemu-utils libvhdi-utils python3-libvhdi busybox-static

.PHONY: all deps venv test test36 test311 check-compat demo bench rpm clean

all: test

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.stamp $(VENV36)/.stamp

$(VENV)/.stamp: setup.cfg setup.py requirements-test.txt requirements-dev.txt
	rm -rf $(VENV)
	$(PYTHON3) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e . -r requirements-test.txt -r requirements-dev.txt
	touch $@

$(VENV36)/.stamp: setup.cfg setup.py requirements-test.txt
	rm -rf $(VENV36)
	$(PYTHON36) -m venv $(VENV36)
	$(VENV36)/bin/pip install -q 'pip==21.3.1'
	$(VENV36)/bin/pip install -q -e . -r requirements-test.txt
	touch $@

check-compat: venv
	$(PYTHON36) -m compileall -q xcoalesce_agent tests benchmarks
	$(VENV)/bin/vermin -t=3.6- --violations --eval-annotations --no-tips -q xcoalesce_agent tests benchmarks
	$(VENV)/bin/ruff check -q --select E,F,W,B --line-length 120 xcoalesce_agent tests benchmarks

test36: deps venv
	$(VENV36)/bin/python -m pytest -q tests

test311: deps venv
	$(VENV)/bin/python -m pytest -q tests

test: deps venv check-compat test36 test311

demo: $(VENV)/.stamp
	$(VENV)/bin/python -m tests.dom0sim demo

bench: deps venv
	$(VENV36)/bin/python -m benchmarks

rpm: deps venv
	packaging/build-rpm

clean:
	rm -rf $(VENV) $(VENV36) build dist *.egg-info
