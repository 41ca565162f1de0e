"""README and docs stay true: the docs build offline without warnings, and every command they
show runs (with small settings where the documented one is a long experiment).

Each distinct command is one test, in the order of the docs (``fit`` before ``evaluate``), in one
working folder. ``convrfm`` commands run in this process through ``falkon_convrfm.cli.main`` (the
``python -m falkon_convrfm.cli`` program itself is tested in test_cli.py); scripts run as
subprocesses; a full-size experiment whose small run is documented as well only has its arguments
parsed (PARSE_ONLY). Both tests are marked slow (``pytest -m "not slow"`` leaves them out)."""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from falkon_convrfm.cli import main as convrfm

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10_train.npz"
# Installation commands are exercised by CI itself (scripts/test.sh builds the environment).
NOT_RUN = ("pip ", "FORCE_ONLY_CPU", "bash scripts/", "git ", "rm ")
NEEDS_CIFAR = ("cifar10_", "cnfa_check")  # examples that read the shared CIFAR-10 file by default
# Full-size experiments whose small run is documented too (`--small`): only their arguments are parsed.
PARSE_ONLY = ("python examples/cifar10_convrfm.py --n-train 10000",)
SMALL = {  # appended options override the documented sizes (argparse keeps the last value); first match only
    "--model deep --preset": ["--n-train", "300", "--depth", "2", "--width", "16", "--rank", "32",
                              "--agop-samples", "100", "--iterations", "1"],
    "examples/cifar10_deep_features.py": ["--n", "300", "--n-val", "100", "--agop-samples", "50"],
    "convrfm fit --dataset npz --data ../shared/data/cifar10_train.npz --preset": [
        "--n-train", "300", "--atoms", "64", "--agop-samples", "100", "--iterations", "1"],
    "examples/quickstart.py": ["--n", "100", "--iterations", "1"],
    "examples/cifar10_convrfm.py": ["--n-train", "200", "--n-val", "100", "--centres", "100",
                                    "--agop-samples", "100", "--iterations", "1", "--skip-identity"],
    "examples/svhn_convrfm.py": ["--n-train", "150", "--n-val", "50", "--centres", "60", "--agop-samples", "60",
                                 "--iterations", "1"],
    "examples/cifar10_deep.py": ["--n-train", "200", "--n-val", "100", "--centres", "100",
                                 "--agop-samples", "100", "--depths", "1", "2", "--width", "8"],
    "examples/cnfa_check.py": ["--n-train", "200", "--n-agop", "40"],
    "benchmarks/kernel_throughput.py": ["--n", "100", "--kernels", "laplace", "--gemm-size", "512"],
    "convrfm fit": ["--n-train", "150", "--centres", "100", "--agop-samples", "100", "--iterations", "1"],
    "--rows": [],  # a row range of a small file: run as documented (--n would clash with --rows)
    "convrfm evaluate": ["--n", "200"],
    "convrfm predict": ["--n", "200"],
}


def documented_commands():
    """{command: first doc showing it} for every line of every ```bash block (continuation lines
    joined) that is run here; a command shown in several docs runs once."""
    commands = {}
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                command = line.split(" # ")[0].strip()
                if command and not command.startswith("#") and not command.startswith(NOT_RUN):
                    commands.setdefault(command, doc.name)
    return commands


COMMANDS = documented_commands()


def write_svhn(path: Path, n: int = 200):
    rng = np.random.default_rng(0)
    scipy.io.savemat(path, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                            "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})


def as_argv(command: str, svhn: Path) -> list:
    key = next((key for key in SMALL if key in command), None)
    command = command.replace("/path/to/train_32x32.mat", str(svhn)).replace("../shared/", f"{ROOT.parent}/shared/")
    argv = shlex.split(command)
    if key and "--full" not in command:
        argv += SMALL[key]
    if argv[0] == "python":
        argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
    return argv


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for all commands (``evaluate`` reads what ``fit`` wrote), with a small SVHN file."""
    path = tmp_path_factory.mktemp("docs")
    write_svhn(path / "train_32x32.mat")
    return path


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 10 and any(c.startswith("convrfm fit") for c in COMMANDS)


@pytest.mark.slow
def test_docs_build_offline_without_warnings(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS), ids=[c[:70] for c in COMMANDS])
def test_documented_command_runs(command, workdir, monkeypatch, capsys):
    doc = COMMANDS[command]
    reads_cifar = "shared/data/cifar10" in command or (any(name in command for name in NEEDS_CIFAR)
                                                       and "--data" not in command)
    if reads_cifar and not CIFAR.exists():
        pytest.skip(f"{CIFAR} (the shared CIFAR-10 file) is not beside this checkout")
    if command.startswith(PARSE_ONLY):
        script, *args = shlex.split(command)[1:]
        spec = importlib.util.spec_from_file_location("documented_script", ROOT / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        parsed = vars(module.parse(args))
        for option, value in zip(args[::2], args[1::2]):
            assert str(parsed[option.lstrip("-").replace("-", "_")]) == value, (doc, command, option)
        return
    argv = as_argv(command, workdir / "train_32x32.mat")
    if argv[0] == "convrfm":
        monkeypatch.chdir(workdir)
        try:
            code = convrfm(argv[1:]) or 0
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        assert code == 0, f"{doc}: `{command}` failed:\n{out[-2000:]}\n{err[-3000:]}"
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{doc}: `{command}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
