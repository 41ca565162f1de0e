"""README and docs stay true: the docs build offline without warnings, and every command they
show runs (with small settings where the documented one is a long experiment)."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.io
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10_train.npz"
# Installation commands are exercised by CI itself (scripts/test.sh builds the environment).
NOT_RUN = ("pip ", "FORCE_ONLY_CPU", "bash scripts/", "git ", "rm ")
NEEDS_CIFAR = ("cifar10_", "cnfa_check")  # examples that read the shared CIFAR-10 file by default
SMALL = {  # appended options override the documented sizes (argparse keeps the last value)
    "examples/quickstart.py": ["--iterations", "1"],
    "examples/cifar10_convrfm.py": ["--n-train", "300", "--n-val", "100", "--centres", "100",
                                    "--agop-samples", "100", "--iterations", "1", "--skip-identity"],
    "examples/svhn_convrfm.py": ["--n-train", "150", "--n-val", "50", "--centres", "60", "--agop-samples", "60",
                                 "--iterations", "1"],
    "examples/cifar10_deep.py": ["--n-train", "300", "--n-val", "100", "--centres", "100",
                                 "--agop-samples", "100", "--depths", "1", "2", "--width", "8"],
    "examples/cnfa_check.py": ["--n-train", "300", "--n-agop", "40"],
    "benchmarks/kernel_throughput.py": ["--n", "100", "--kernels", "laplace"],
    "convrfm fit": ["--n-train", "300", "--centres", "200", "--agop-samples", "200"],
}


def documented_commands():
    """(file, command) for every line of every ```bash block, continuation lines joined."""
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                command = line.split(" # ")[0].strip()
                if command and not command.startswith("#"):
                    yield doc.name, command


def write_svhn(path: Path, n: int = 200):
    rng = np.random.default_rng(0)
    scipy.io.savemat(path, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                            "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})


def as_argv(command: str, svhn: Path) -> list:
    argv = shlex.split(command.replace("/path/to/train_32x32.mat", str(svhn)))
    for key, extra in SMALL.items():
        if key in command and "--full" not in command:
            argv += extra
    if argv[0] == "convrfm":
        argv = [sys.executable, "-m", "falkon_convrfm.cli", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
    return argv


def test_docs_build_offline_without_warnings(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr


def test_every_documented_command_runs(tmp_path):
    svhn = tmp_path / "train_32x32.mat"
    write_svhn(svhn)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ran = 0
    for doc, command in documented_commands():
        if command.startswith(NOT_RUN):
            continue
        if any(name in command for name in NEEDS_CIFAR) and not CIFAR.exists() and "--data" not in command:
            continue  # the shared CIFAR file is not beside this checkout
        result = subprocess.run(as_argv(command, svhn), cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{doc}: `{command}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        ran += 1
    assert ran >= 10
