#!/usr/bin/env bash
# The main job: ConvRFM vs the fixed kernel on scikit-learn's 8×8 digits (no download needed).
source "$(dirname "$0")/_env.sh"
exec .venv/bin/python examples/quickstart.py "$@"
