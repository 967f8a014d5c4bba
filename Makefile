# The one entry point for every check, used the same way on a laptop and by .ci/run:
#
#   make setup        .venv with the dev requirements (Python 3.12 preferred)
#   make test         lint, sanity, units, integration, molecule - in order, stops at the first failure
#   make build        collection tarball in .build/dist, installed and read back with ansible-doc
#
# Single targets: lint sanity units integration molecule build main. Extra arguments:
#   make sanity SANITY_ARGS='--test pep8'   make sanity SANITY_PYTHON=3.12
#   make units PYTEST_ARGS='-k placement -x'

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

VENV := .venv
VENV_BIN := $(abspath $(VENV))/bin
PY := $(VENV_BIN)/python
STAMP := $(VENV)/.requirements-installed

# ansible-core 2.20+ needs Python 3.12; pyenv's newest 3.12 first, then whatever is on PATH.
BOOTSTRAP_PYTHON ?= $(firstword \
    $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.12.*/bin/python3.12))) \
    $(shell command -v python3.12) \
    $(shell command -v python3))

# ansible-test only accepts a collection that sits at ansible_collections/<namespace>/<name>; it
# runs on a copy of the tree minus what .gitignore names (venvs, build and test output, caches).
COLLECTION_DIR := .build/ansible_collections/gpuvirt/kvm
DIST_DIR := .build/dist

# Empty: the multi-version tests (compile, import) run on every Python that ansible-test supports
# and finds - module_utils must work on the managed hosts' Python 3.9 too - and the rest on the
# venv's. `make sanity SANITY_PYTHON=3.12` checks one version only.
SANITY_PYTHON ?=
SANITY_ARGS ?=
# pyenv's shims answer only for its selected version, so put each installed version's bin on PATH.
empty :=
space := $(empty) $(empty)
SANITY_PATH := $(subst $(space),:,$(strip $(VENV_BIN) $(wildcard $(HOME)/.pyenv/versions/3.*/bin)))
PYTEST_ARGS ?=
# make integration INTEGRATION_TARGETS=gpu_topology runs one target.
INTEGRATION_TARGETS ?=
MAIN_ARGS ?=

# Recipes run the venv's tools (ansible-test, ansible-galaxy, ansible-doc) and scripts they start.
RUN := PATH="$(VENV_BIN):$$PATH"

LINT_PY_PATHS = $(wildcard plugins tests bench tools .ci)
SHELL_SCRIPTS = $(wildcard .ci/run tools/*.sh tests/integration/*.sh tests/lab/*.sh tests/ee/*.sh \
  tests/integration/targets/*/runme.sh tests/integration/targets/*/files/*.sh \
  tests/fixtures/fabric/fmpm tests/fixtures/fabric/jsoncpp/*.sh roles/kvm_host/files/gpuvirt-qemu-hook \
  roles/kvm_host/files/gpuvirt-fabric-redeclare roles/kvm_host/files/gpuvirt-vfio-bind \
  roles/kvm_host/files/gpuvirt-sriov)

.PHONY: help system-deps setup lint sanity units integration molecule test build main demo sync clean

help:
	@sed -n '1,/^$$/p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

setup: system-deps $(STAMP)

# Debian packages (libvirt, QEMU, the libvirt-python build deps); quiet when all are present.
system-deps:
	@bash tools/install-system-deps.sh

$(STAMP): requirements-dev.txt
	@test -n "$(BOOTSTRAP_PYTHON)" || { echo "setup: no python3.12 or python3 found on PATH" >&2; exit 1; }
	test -x $(PY) || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $@

lint: setup sync
	$(RUN) ruff check $(LINT_PY_PATHS)
	$(RUN) yamllint --strict .
	git ls-files -z '*.yml' '*.yaml' | xargs -0 $(PY) tools/lint-conditionals.py
	@command -v shellcheck >/dev/null || { \
	  echo "lint: shellcheck is missing; install it (apt-get install shellcheck) or run .ci/run" >&2; \
	  exit 1; }
	shellcheck $(SHELL_SCRIPTS)
	@# ansible-lint resolves gpuvirt.kvm.* in tasks (and checks their arguments) only when the
	@# collection sits in a collections path: the synced copy under .build is one.
	$(RUN) ANSIBLE_COLLECTIONS_PATH="$(abspath .build)" ansible-lint

# Copies the tree for ansible-test; files ignored by git never reach it, tests/output survives.
# The copy's git repository has no commits: ansible-test lists its files as untracked ones.
sync:
	@command -v rsync >/dev/null || { echo "sync: rsync is missing (apt-get install rsync)" >&2; exit 1; }
	mkdir -p $(COLLECTION_DIR)
	rsync -a --delete --exclude=/.git --exclude=/tests/output --filter=':- .gitignore' \
	  ./ $(COLLECTION_DIR)/
	@# ansible-test lists files with git from the nearest .git upwards; without one of its own the
	@# copy would belong to this repository, where .build/ is ignored, and every test would skip.
	test -d $(COLLECTION_DIR)/.git || git -C $(COLLECTION_DIR) init --quiet

sanity: setup sync
	$(PY) .ci/ansible_test_pip_standin.py >/dev/null
	cd $(COLLECTION_DIR) && PATH="$(SANITY_PATH):$$PATH" ansible-test sanity --venv --color no \
	  $(if $(SANITY_PYTHON),--python $(SANITY_PYTHON)) $(SANITY_ARGS)

units: setup
	$(RUN) python -m pytest $(PYTEST_ARGS)

# The integration suite drives a real libvirtd; tests/integration/run.sh owns how.
integration: setup sync
	$(RUN) bash tests/integration/run.sh $(INTEGRATION_TARGETS)

# Molecule scenarios of the roles (extensions/molecule/): create, converge, idempotence, verify,
# destroy. gpu_vms and guest_image run here on a fixture topology (a pretend DGX-2) with a private
# libvirtd; lab runs kvm_host, guest_image and gpu_vms on a fresh lab VM (delegated driver:
# tests/lab/lab.py up/down; ~20-25 min under TCG). MOLECULE_SCENARIOS='gpu_vms' runs one.
# extensions/molecule/default is empty on purpose: molecule loads a `default` scenario before
# every run and logs a CRITICAL "glob failed" line when there is none; it is never run here.
MOLECULE_SCENARIOS ?= gpu_vms guest_image lab
molecule: setup sync
	@for s in $(MOLECULE_SCENARIOS); do \
	  echo "molecule: scenario $$s"; \
	  $(RUN) ANSIBLE_COLLECTIONS_PATH="$(abspath .build)" molecule test -s "$$s" || exit 1; \
	done

test:
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory sanity
	$(MAKE) --no-print-directory units
	$(MAKE) --no-print-directory integration
	$(MAKE) --no-print-directory molecule

# Builds from the same git-filtered copy that sanity checks, installs the tarball into an empty
# collections path and renders every module's documentation from the installed copy.
build: setup sync
	rm -rf $(DIST_DIR) && mkdir -p $(DIST_DIR)
	cd $(COLLECTION_DIR) && $(RUN) ansible-galaxy collection build --force \
	  --output-path $(abspath $(DIST_DIR))
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	tarball=$$(ls $(DIST_DIR)/gpuvirt-kvm-*.tar.gz) && \
	$(RUN) ansible-galaxy collection install --offline --force -p "$$tmp" "$$tarball" && \
	modules=$$(cd "$$tmp/ansible_collections/gpuvirt/kvm" && \
	  ls plugins/modules/*.py 2>/dev/null | xargs -r -n1 basename | sed 's/\.py$$//' | grep -v '^__init__$$' || true) && \
	if [ -z "$$modules" ]; then \
	  echo "build: the tarball has no modules yet, no documentation to render"; \
	else \
	  for m in $$modules; do \
	    echo "build: ansible-doc gpuvirt.kvm.$$m"; \
	    $(RUN) ANSIBLE_COLLECTIONS_PATH="$$tmp" ANSIBLE_COLLECTIONS_SCAN_SYS_PATH=false \
	      ansible-doc --json -t module "gpuvirt.kvm.$$m" | \
	      $(PY) -c 'import json, sys; d = json.load(sys.stdin); sys.exit(0 if d else 1)' || \
	      { echo "build: ansible-doc could not render gpuvirt.kvm.$$m" >&2; exit 1; }; \
	  done; \
	fi && \
	$(RUN) bash tests/ee/check-ee.sh "$$tarball" "$$tmp"
	@echo "build: $$(ls $(DIST_DIR)/gpuvirt-kvm-*.tar.gz)"

# The README's main job: the lab up, converted to a KVM host, a day of GPU tenants on it.
main: setup sync
	$(RUN) bash tools/main-job.sh $(MAIN_ARGS)

# The offline demo: CPU-only tenants on this machine's libvirt, a DGX-2 day as a check-mode plan.
demo: setup sync
	$(RUN) bash tools/demo-job.sh $(MAIN_ARGS)

clean:
	rm -rf .build/ansible_collections $(DIST_DIR) .pytest_cache .ruff_cache .hypothesis

# The lab (tests/lab/README.md): a mini GPU server VM on this machine's libvirt (qemu:///system),
# reached over 127.0.0.1 only; the inventory is tests/lab/.state/inventory.ini. lab-up builds and
# caches the image (GPUVIRT_LAB_CACHE, default /var/cache/gpuvirt-lab) and is a no-op when the lab
# runs; lab-down removes the domain and its overlay, never the cached image.
#   make lab-up LAB_KERNEL_ARGS='intel_iommu=on iommu=pt'   also set kernel arguments (one reboot)
#   make lab-up LAB_IMAGE_EXTRA_PACKAGES='qemu-system-x86 libvirt-daemon-system'   pre-install
LAB_NAME ?= gpuvirt-lab
LAB_SSH_PORT ?= 2299
LAB_DOMAIN_TYPE ?= auto
LAB_MEMORY_MB ?= 2560
LAB_VCPUS ?= 2
LAB_KERNEL_ARGS ?=
LAB_IMAGE_EXTRA_PACKAGES ?=
LAB_PYTHON = $(if $(wildcard $(PY)),$(PY),python3)
LAB_ENV = LAB_NAME='$(LAB_NAME)' LAB_SSH_PORT='$(LAB_SSH_PORT)' LAB_DOMAIN_TYPE='$(LAB_DOMAIN_TYPE)' \
  LAB_MEMORY_MB='$(LAB_MEMORY_MB)' LAB_VCPUS='$(LAB_VCPUS)' LAB_KERNEL_ARGS='$(LAB_KERNEL_ARGS)' \
  LAB_IMAGE_EXTRA_PACKAGES='$(LAB_IMAGE_EXTRA_PACKAGES)'

.PHONY: lab-up lab-down lab-short lab-e2e lab-e2e-shared

# End-to-end runs on the lab over SSH (tests/e2e/). lab-short is CI's: discovery of the stand-ins,
# convert_host in check mode and the shared mode's refusals on a fresh lab (~10 min with the image
# build). lab-e2e is the full suite: lab_short.yml with the shared_nvswitch check run, convert_host (packages, IOMMU arguments, vfio-pci, a reboot), install_images,
# deploy_tenants with stand-ins passed through to nested guests (the four idempotency facts),
# maintain_host, nightly_reprovision, teardown_tenants and revert_host, then the same lab in its
# shared-NVSwitch profile (tests/e2e/shared.yml; ~90 min on 2 cores under TCG in all).
# lab-e2e-shared runs that second half alone: convert_host in shared_nvswitch mode with the
# stand-in Fabric Manager, tenants whose partitions the hook activates, virsh destroy / start,
# an FM restart answered by the redeclare unit, teardown and revert_host (a lab that make main
# converted skips the conversion).
LAB_INVENTORY = tests/lab/.state/$(if $(filter gpuvirt-lab,$(LAB_NAME)),,$(LAB_NAME)/)inventory.ini
LAB_PLAYBOOK = $(RUN) ANSIBLE_COLLECTIONS_PATH="$(abspath .build)" ANSIBLE_NOCOLOR=1 \
  ansible-playbook -i $(LAB_INVENTORY)
lab-short: setup sync lab-up
	$(LAB_PLAYBOOK) tests/e2e/lab_short.yml

lab-e2e: setup sync lab-up
	$(LAB_PLAYBOOK) tests/e2e/lab.yml

lab-e2e-shared: setup sync lab-up
	$(LAB_PLAYBOOK) tests/e2e/shared.yml

lab-up: setup
	$(LAB_ENV) $(LAB_PYTHON) tests/lab/lab.py up

lab-down:
	$(LAB_ENV) $(LAB_PYTHON) tests/lab/lab.py down
