#!/usr/bin/env bash
# The test suite (Falkon-dependent tests skip with a reason when Falkon is not installed).
source "$(dirname "$0")/_env.sh"
exec .venv/bin/python -m pytest -q "$@"
