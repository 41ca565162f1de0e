# Sourced by demo.sh and test.sh: create ./.venv once and install the package into it.
# torch is pinned to the CPU build that pip finds locally on the reference machines; on other
# machines pick the torch build you want first (see docs/install.md), the rest follows.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import falkon_convrfm, pytest" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -c "import torch" >/dev/null 2>&1 || .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -e ".[test]"
fi
