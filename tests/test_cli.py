"""The ``convrfm`` command line end to end on digits, in a temporary directory."""
import json
import subprocess
import sys

import numpy as np
import pytest

from falkon_convrfm.cli import build_parser, confusion_matrix, main


def run(*args):
    return subprocess.run([sys.executable, "-m", "falkon_convrfm.cli", *args], capture_output=True, text=True,
                          check=True).stdout


def test_fit_predict_evaluate_filters(tmp_path):
    out = tmp_path / "run"
    main(["fit", "--dataset", "digits", "--n-train", "400", "--iterations", "1", "--centres", "300",
          "--agop-samples", "300", "--penalty", "1e-5", "--solver", "exact", "--quiet", "--out-dir", str(out)])
    for name in ("model.pt", "history.json", "curves.png", "filters.png"):
        assert (out / name).stat().st_size > 0
    history = json.loads((out / "history.json").read_text())["history"]
    assert len(history) == 2 and "val_accuracy" in history[0]

    preds = tmp_path / "preds.npy"
    main(["predict", "--model", str(out / "model.pt"), "--dataset", "digits", "--n", "100", "--out", str(preds)])
    assert np.load(preds).shape == (100,)

    report = tmp_path / "eval.json"
    main(["evaluate", "--model", str(out / "model.pt"), "--dataset", "digits", "--out", str(report)])
    figures = json.loads(report.read_text())
    assert figures["accuracy"] > 0.9
    assert np.asarray(figures["confusion"]).sum() == 540

    main(["filters", "--model", str(out / "model.pt"), "--out", str(tmp_path / "f.png"),
          "--locations", str(tmp_path / "loc.png")])
    assert (tmp_path / "f.png").stat().st_size > 0 and (tmp_path / "loc.png").stat().st_size > 0


def test_help_for_every_command():
    for command in ("fit", "predict", "evaluate", "filters", "plan", "info"):
        assert "usage" in run(command, "--help")


def test_info_and_plan():
    assert "Falkon" in run("info")
    text = run("plan", "--n", "50000", "--centres", "10000", "--device-memory-gb", "80")
    assert "largest centre count" in text and "K_nm" in text


def test_confusion_matrix():
    C = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), [0, 1, 2])
    assert C.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_missing_data_path_is_a_clear_error():
    with pytest.raises(SystemExit, match="--data PATH is required"):
        main(["fit", "--dataset", "cifar10", "--out-dir", "/tmp/never"])


def test_parser_rejects_unknown_dataset():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--dataset", "imagenet"])


def test_memory_plan_phases_and_largest_centre_count():
    from falkon_convrfm.planning import plan_memory

    plan = plan_memory(10_000, (3, 32, 32), 3, centres=2000, device_memory=64 * 2**30)
    assert plan["phases"]["K_nm (stored)"] == 10_000 * 2000 * 4
    assert plan["fits"] and plan["max_centres"] >= 2000
    tight = plan_memory(10_000, (3, 32, 32), 3, centres=2000, device_memory=plan["peak"] - 1)
    assert not tight["fits"] and tight["max_centres"] < 2000
    assert plan_memory(10_000, (3, 32, 32), 3, centres=tight["max_centres"],
                       device_memory=plan["peak"] - 1)["fits"]
