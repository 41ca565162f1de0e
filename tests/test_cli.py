"""The ``convrfm`` command line: end to end on digits, and every user error as one line on stderr
with exit status 2 (no traceback)."""
import argparse
import errno
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import falkon_convrfm.cli as cli
from falkon_convrfm import HAS_FALKON, ConvRFM, FeatureLayer, load_model
from falkon_convrfm.presets import PRESETS
from falkon_convrfm.cli import build_parser, main

FIT = ["fit", "--dataset", "digits", "--n-train", "400", "--iterations", "1", "--centres", "300",
       "--agop-samples", "300", "--penalty", "1e-5", "--solver", "exact", "--quiet"]
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "falkon_convrfm.cli", *args], capture_output=True, text=True,
                          check=True).stdout


def call(argv, capsys):
    """(exit status, stdout, stderr) of ``convrfm argv`` run in this process."""
    try:
        code = main([str(a) for a in argv]) or 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny data files, a fitted ConvRFM (on digits) and a fitted one-layer DeepConvRFM (whose
    final ConvRFM has no metric update, on an npz training file with an npz validation file)."""
    d = tmp_path_factory.mktemp("cli")
    digits = load_digits()
    X = (digits.images * 16).astype(np.uint8)  # (n, 8, 8) grey, uint8 in [0, 255]
    Xtr, Xte, ytr, yte = train_test_split(X, digits.target, test_size=0.3, stratify=digits.target, random_state=0)
    np.savez(d / "train.npz", images=Xtr[:300], labels=ytr[:300])
    np.savez(d / "val.npz", images=Xte[:150, :, :, None], labels=yte[:150], classes=np.array(DIGIT_NAMES))
    np.savez(d / "val16.npz", images=np.zeros((20, 16, 16), np.uint8), labels=np.arange(20) % 10)
    np.savez(d / "ambiguous.npz", images=np.zeros((4, 3, 6, 3), np.uint8), labels=np.arange(4))
    np.savez(d / "unknown_labels.npz", images=Xte[:20], labels=np.full(20, 12))
    (d / "not.npz").write_text("not an npz file")
    (d / "config.json").write_text(json.dumps({"iterations": 1}))
    (d / "list.json").write_text("[1, 2]")
    (d / "unknown.json").write_text(json.dumps({"no_such_parameter": 1}))
    (d / "bad_value.json").write_text(json.dumps({"iterations": "many"}))
    (d / "layers_text.json").write_text(json.dumps({"layers": "three"}))
    (d / "bad_layers.json").write_text(json.dumps({"layers": [{"widht": 4}]}))
    (d / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (d / "typo.json").write_text(json.dumps({"iteratons": 1}))
    (d / "centres.json").write_text(json.dumps({"n_centres": 0}))
    np.savez(d / "pixel.npz", images=np.random.default_rng(0).random((20, 1, 1)), labels=np.arange(20) % 2)
    (d / "folder.npz").mkdir()
    (d / "a_file").write_text("")
    for name in ("old.npy", "old.json"):  # earlier outputs
        (d / name).write_text("old")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few images: a small validation split
        ConvRFM(iterations=0, solver="exact", progress=False, random_state=0).fit(
            np.random.default_rng(0).random((30, 1, 10, 10)), np.arange(30) % 2).save(d / "other.pt")
    (d / "deep_layers.json").write_text(json.dumps({"layers": [{"patch_size": 3, "n_atoms": 8, "pool": [2, 1]},
                                                               {"patch_size": 2, "n_atoms": 8, "rank": 16, "pool": None}]}))
    conv, deep, features = d / "conv", d / "deep", d / "deep_features"
    for argv in (FIT + ["--out-dir", conv],
                 ["fit", "--model", "deep", "--config", d / "deep_layers.json", "--iterations", "1", "--n-train", "300",
                  "--agop-samples", "100", "--quiet", "--out-dir", features],
                 ["fit", "--model", "deep-conv", "--dataset", "npz", "--data", d / "train.npz", "--val-data", d / "val.npz",
          "--depth", "1", "--width", "4", "--iterations", "0", "--centres", "100", "--agop-samples", "100",
                  "--n-train", "100",  # its pictures and messages are tested, not its accuracy
                  "--solver", "exact", "--quiet", "--out-dir", deep]):
        main([str(a) for a in argv])
    model = (conv / "model.pt").read_bytes()
    (d / "truncated.pt").write_bytes(model[: len(model) // 2])
    return {"dir": d, "conv": conv / "model.pt", "deep": deep / "model.pt", "features": features / "model.pt"}


# ---------------------------------------------------------------------------- user errors
# (argv with {dir}, {conv}, {deep} placeholders, a phrase the one-line message must contain)
USER_ERRORS = [
    # option values, rejected by the parser before any work
    (["fit", "--sigma", "abc"], "sigma must be a positive finite number or 'median', got 'abc'"),
    (["fit", "--sigma", "-1"], "sigma must be a positive"),
    (["fit", "--centres", "0"], "argument --centres"),
    (["fit", "--centres", "many"], "argument --centres: value must be an integer >= 1, got 'many'"),
    (["fit", "--iterations", "-1"], "integer >= 0"),
    (["fit", "--penalty", "-1"], "argument --penalty"),
    (["fit", "--penalty", "nan"], "positive finite number"),
    (["fit", "--patch-size", "x"], "argument --patch-size"),
    (["fit", "--depth", "0"], "argument --depth"),
    (["fit", "--max-memory-gb", "0"], "argument --max-memory-gb"),
    (["fit", "--dc-weight", "heavy"], "argument --dc-weight: expected a number >= 0, 'auto' or 'none', got 'heavy'"),
    (["fit", "--pool-window", "0"], "argument --pool-window"),
    (["fit", "--pool-window", "2"], "--pool-window must be odd"),
    (["fit", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["fit", "--kernel", "cosine"], "argument --kernel"),
    (["fit", "--layout", "nhwc"], "argument --layout"),
    (["fit", "--preprocess", "whiten"], "argument --preprocess"),
    (["fit", "--seed", "-3"], "argument --seed"),
    (["fit", "--device", "tpu"], "argument --device"),
    (["info", "--verbose"], "unrecognized arguments: --verbose"),
    (["fit", "--no-such-option"], "unrecognized arguments"),
    ([], "required: COMMAND"),
    (["predict", "--model", "{conv}", "--n", "-5"], "argument --n: value must be an integer >= 1, got -5"),
    (["predict", "--n", "5"], "required: --model"),
    (["predict", "--model", "{conv}", "--rows", "5"], "argument --rows: expected START:STOP"),
    (["predict", "--model", "{conv}", "--rows", "a:b"], "argument --rows: expected START:STOP"),
    (["evaluate", "--model", "{conv}", "--rows", "9:3"], "argument --rows: STOP must be greater than START, got '9:3'"),
    (["evaluate", "--model", "{conv}", "--rows=-1:"], "argument --rows: row numbers count from 0"),
    (["evaluate", "--model", "{conv}", "--rows", "500:600"],
     "--rows 500:600 is out of range: digits test split has 540 images (rows 0:540)"),
    (["predict", "--model", "{conv}", "--rows", "600:"], "--rows 600: is out of range"),
    (["predict", "--model", "{conv}", "--rows", "0:5", "--n", "5"], "--n and --rows both choose the images"),
    (["plan", "--n", "100", "--pool-window", "2"], "argument --pool-window: --pool-window must be odd"),
    (["plan", "--n", "100", "--solver", "cg"], "argument --solver"),
    (["evaluate", "--model", "{conv}", "--split", "validation"], "argument --split"),
    (["plan", "--n", "0"], "argument --n: value must be an integer >= 1, got 0"),
    (["plan", "--n", "100", "--centres", "-1"], "argument --centres"),
    (["plan", "--n", "100", "--image-shape", "3", "32"], "expected 3 arguments"),
    (["plan"], "required: --n"),
    (["plan", "--n", "100", "--patch-size", "40"], "--patch-size 40 is larger than the padded image"),
    (["filters", "--model", "{conv}", "--k", "0"], "argument --k"),
    (["filters", "--model", "{conv}", "--iteration", "-1"], "argument --iteration: value must be an integer >= 0"),
    # files and folders, checked before any work
    (["fit", "--out-dir", "{dir}/a_file"], "is a file, not a folder"),
    (["fit", "--out-dir", "{dir}/a_file/run"], "is a file, not a folder"),
    (["fit", "--checkpoint-dir", "{dir}/a_file/ckpt", "--out-dir", "{dir}/never"], "--checkpoint-dir"),
    (["fit", "--config", "{dir}/missing.json"], "--config {dir}/missing.json: no such file"),
    (["fit", "--config", "{conv}"], "--config {conv}: not a JSON file"),
    (["fit", "--config", "{dir}/binary.bin"], "--config {dir}/binary.bin: not a JSON file"),
    (["fit", "--config", "{dir}/list.json"], "expected a JSON object"),
    (["fit", "--config", "{dir}/unknown.json"], "unknown ConvRFM parameter 'no_such_parameter'; valid: image_shape, patch_size"),
    (["fit", "--config", "{dir}/bad_value.json"], "iterations must be an integer >= 0, got 'many'"),
    (["fit", "--model", "deep", "--config", "{dir}/layers_text.json"], "'layers' must be a list"),
    (["fit", "--model", "deep-conv", "--config", "{dir}/bad_layers.json"], "unknown LayerSpec parameter 'widht'; did you mean 'width'?"),
    (["fit", "--model", "deep", "--config", "{dir}/bad_layers.json"], "unknown FeatureLayer parameter 'widht'"),
    (["predict", "--model", "{dir}/missing.pt"], "--model {dir}/missing.pt: no such file"),
    (["predict", "--model", "{dir}"], "is a folder, not a file"),
    (["predict", "--model", "{dir}/config.json"], "{dir}/config.json is not a falkon_convrfm model file"),
    (["predict", "--model", "{dir}/binary.bin"], "{dir}/binary.bin is not a falkon_convrfm model file"),
    (["predict", "--model", "{conv}", "--out", "{dir}/pred.txt"], "unsupported file type '.txt'; use .npy or .csv"),
    (["predict", "--model", "{conv}", "--out", "{dir}/pred"], "unsupported file type '(no suffix)'"),
    (["predict", "--model", "{conv}", "--out", "{dir}/no_folder/pred.npy"], "folder {dir}/no_folder does not exist"),
    (["predict", "--model", "{conv}", "--out", "{dir}/a_file/pred.npy"], "{dir}/a_file is a file, not a folder"),
    (["evaluate", "--model", "{conv}", "--out", "{dir}/eval.csv"], "use .json"),
    (["filters", "--model", "{conv}", "--out", "{dir}/filters.txt"], "use .png or .pdf or .svg"),
    (["filters", "--model", "{conv}", "--locations", "{dir}/no_folder/l.png"], "does not exist"),
    # earlier outputs, replaced only with --overwrite
    (["fit", "--out-dir", "{dir}/conv"], "--out-dir {dir}/conv holds an earlier run (model.pt, history.json, "
     "curves.png, filters.png): add --overwrite to replace it, or use a new --out-dir"),
    (["predict", "--model", "{conv}", "--out", "{dir}/old.npy"],
     "--out {dir}/old.npy already exists: add --overwrite to replace it, or choose another file"),
    (["evaluate", "--model", "{conv}", "--out", "{dir}/old.json"], "--out {dir}/old.json already exists"),
    (["filters", "--model", "{conv}", "--out", "{dir}/conv/filters.png"], "--out {dir}/conv/filters.png already exists"),
    (["filters", "--model", "{conv}", "--out", "{dir}/f.png", "--locations", "{dir}/conv/curves.png"],
     "--locations {dir}/conv/curves.png already exists"),
    # data
    (["fit", "--dataset", "cifar10"], "--data PATH is required for --dataset cifar10"),
    (["fit", "--dataset", "cifar10", "--data", "{dir}/no_cifar"], "not found"),
    (["fit", "--dataset", "digits", "--data", "{dir}/train.npz"], "--data is not used with --dataset digits"),
    (["fit", "--dataset", "npz", "--data", "{dir}/train.npz", "--split", "test"], "--split does not apply"),
    (["fit", "--layout", "hwc"], "--layout applies to npz files, not to --dataset digits"),
    (["fit", "--dataset", "npz", "--data", "{dir}/ambiguous.npz"], "cannot tell the channel axis"),
    (["fit", "--dataset", "npz", "--data", "{dir}/not.npz"], "{dir}/not.npz: not a valid npz file (ValueError: not an "
                                                             ".npz archive (a zip of .npy arrays, as numpy.savez writes)"),
    (["fit", "--dataset", "npz", "--data", "{dir}/folder.npz"], "{dir}/folder.npz: not a valid npz file "
                                                                "(IsADirectoryError: a folder, not a file)"),
    (["predict", "--model", "{dir}/truncated.pt"], "{dir}/truncated.pt is not a falkon_convrfm model file (not a zip "
                                                   "archive as torch.save writes: a truncated or damaged file"),
    (["predict", "--model", "{dir}/train.npz"], "{dir}/train.npz is not a falkon_convrfm model file (a zip archive of "
                                                "other files (an .npz of arrays?)"),
    (["fit", "--config", "{dir}/typo.json"], "--config {dir}/typo.json: unknown ConvRFM parameter 'iteratons'; "
                                             "did you mean 'iterations'?"),
    (["fit", "--config", "{dir}/centres.json"], "--config {dir}/centres.json: n_centres must be an integer >= 1, got 0"),
    (["fit", "--seed", "-1"], "argument --seed: --seed must be an integer >= 0, got -1"),
    (["fit", "--dataset", "npz", "--data", "{dir}/pixel.npz"],
     "--patch-size 3 is larger than the padded image (1×1 for image shape (1, 1, 1), --padding 0)"),
    (["fit", "--dataset", "npz", "--data", "{dir}/missing.npz"], "{dir}/missing.npz"),
    (["fit", "--val-data", "{dir}/missing.npz"], "--val-data {dir}/missing.npz: no such file"),
    (["fit", "--val-data", "{dir}/val.npz", "--val-fraction", "0.3"], "--val-fraction does not apply with --val-data"),
    (["fit", "--width", "8"], "--depth and --width describe the layers of --model deep"),
    (["fit", "--model", "deep-conv", "--depth", "2", "--config", "{dir}/bad_layers.json"], "both describe the layers"),
    (["fit", "--model", "deep", "--depth", "2", "--config", "{dir}/bad_layers.json"], "both describe the layers"),
    (["fit", "--model", "deep-conv", "--rank", "8"], "--rank sets the metric rank of the layers of --model deep"),
    (["fit", "--model", "deep", "--rank", "0"], "rank must be an integer >= 1"),
    (["fit", "--model", "deep", "--pooling", "3,2"], "pooling must be an integer >= 1"),
    (["fit", "--model", "deep", "--centres", "10"], "--centres does not apply to --model deep"),
    (["fit", "--model", "deep", "--metric", "dc"], "metric"),
    (["fit", "--n-train", "5000"], "--n-train 5000: digits train split has only 1257 images"),
    (["predict", "--model", "{conv}", "--n", "5000", "--out", "{dir}/p.npy"], "digits test split has only 540 images"),
    (["evaluate", "--model", "{conv}", "--dataset", "npz", "--data", "{dir}/unknown_labels.npz"],
     "labels [12] of the data are not among the model's classes"),
    # estimator parameters and data the estimator refuses before it computes
    (["fit", "--dc-weight", "-1"], "--dc-weight must be a number"),
    (["fit", "--val-fraction", "1.5"], "--val-fraction must be a number in [0, 1)"),
    (["fit", "--patch-size", "20"], "patch"),
    (["fit", "--val-data", "{dir}/val16.npz"],
     "--val-data {dir}/val16.npz has images of shape (1, 16, 16) but --dataset digits has images of shape (1, 8, 8)"),
    (["fit", "--n-train", "100", "--val-fraction", "0.001"], "--val-fraction 0.001 gives 0 validation items"),
    (["evaluate", "--model", "{dir}/other.pt"], "--dataset is required: --model {dir}/other.pt was fitted on images "
                                                "of shape (1, 10, 10), not on the built-in digits"),
    (["predict", "--model", "{dir}/other.pt", "--out", "{dir}/p.npy"], "--dataset is required"),
    (["evaluate", "--model", "{dir}/other.pt", "--dataset", "npz", "--data", "{dir}/val16.npz"],
     "--data {dir}/val16.npz has images of shape (1, 16, 16) but the model was fitted on images of shape (1, 10, 10)"),
    (["evaluate", "--model", "{conv}", "--dataset", "npz", "--data", "{dir}/val16.npz"], "(1, 16, 16)"),
    # what a fitted model does not have
    (["filters", "--model", "{conv}", "--iteration", "7"], "--iteration 7 is out of range: ConvRFM has iteration 0..1"),
    (["filters", "--model", "{conv}", "--k", "10"], "k must be in 1..9"),
    (["filters", "--model", "{conv}", "--layer", "0"], "--layer applies to deep models"),
    (["filters", "--model", "{deep}", "--layer", "2"], "--layer 2 is out of range: this DeepConvRFM has layers 0..1"),
    (["filters", "--model", "{deep}", "--layer", "0", "--iteration", "5"], "only the kept M is stored"),
    (["filters", "--model", "{deep}", "--locations", "{dir}/l.png"], "computed no AGOP"),
    (["filters", "--model", "{features}", "--layer", "2"], "--layer 2 is out of range: this DeepPatchFeatureRFM has layers 0..1"),
    (["filters", "--model", "{features}", "--locations", "{dir}/l.png"], "--model deep keep no per-location AGOP share"),
]
if not HAS_FALKON:
    USER_ERRORS.append((["fit", "--solver", "falkon"], "falkon"))
if not torch.cuda.is_available():
    USER_ERRORS.append((["fit", "--device", "cuda"], "--device cuda was requested but CUDA is not available"))


@pytest.mark.parametrize("argv, phrase", USER_ERRORS, ids=[" ".join(a)[:60] for a, _ in USER_ERRORS])
def test_user_error_is_one_line_with_exit_status_2(files, capsys, argv, phrase):
    fill = {"dir": files["dir"], "conv": files["conv"], "deep": files["deep"], "features": files["features"]}
    argv = [a.format(**fill) for a in argv]
    if argv and argv[0] == "fit" and "--out-dir" not in argv:
        argv += ["--out-dir", f"{files['dir']}/never/run", "--quiet"] + ([] if "--solver" in argv or "deep" in argv
                                                                         else ["--solver", "exact"])  # deep: no solver
    code, out, err = call(argv, capsys)
    assert code == 2, (argv, out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("convrfm"), err
    assert phrase.format(**fill) in err, err
    assert not (files["dir"] / "never").exists()  # a failed fit leaves no folder behind


def test_debug_shows_the_traceback(files):
    with pytest.raises(ValueError, match="--layer applies to deep models"):
        main(["filters", "--model", str(files["conv"]), "--layer", "0", "--out", str(files["dir"] / "f.png"),
              "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", "predict", "--model", str(files["dir"] / "missing.pt")])


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.ConvRFM, "fit", interrupted)
    code, _, err = call(FIT + ["--out-dir", tmp_path / "run"], capsys)
    assert code == 130 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "before the first iteration was checkpointed: rerunning the same command starts over" in err
    assert "resume" not in err  # nothing to resume from
    assert not (tmp_path / "run").exists()  # nothing was checkpointed: no empty folder stays

    def interrupted_after_a_checkpoint(self, *args, **kwargs):
        Path(self.checkpoint_dir).mkdir(parents=True)
        (Path(self.checkpoint_dir) / "convrfm_checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.ConvRFM, "fit", interrupted_after_a_checkpoint)
    code, _, err = call(FIT + ["--out-dir", tmp_path / "run"], capsys)
    assert code == 130 and len(err.strip().splitlines()) == 1
    assert "rerun the same command" in err and "resume" in err and str(tmp_path / "run" / "checkpoint") in err


def test_failed_fit_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    def failing(self, *args, **kwargs):
        raise ValueError("the solver failed")

    monkeypatch.setattr(cli.ConvRFM, "fit", failing)
    code, _, err = call(FIT + ["--out-dir", tmp_path / "a" / "b"], capsys)
    assert code == 2 and err.strip() == "convrfm: error: the solver failed"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- files kept
def no_temporary_files(folder) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_an_earlier_run_is_replaced_only_with_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_text("an earlier model")
    code, _, err = call(FIT + ["--iterations", "0", "--out-dir", run], capsys)
    assert code == 2 and "holds an earlier run (model.pt): add --overwrite" in err
    assert (run / "model.pt").read_text() == "an earlier model" and list(run.iterdir()) == [run / "model.pt"]
    code, out, _ = call(FIT + ["--iterations", "0", "--out-dir", run, "--overwrite"], capsys)
    assert code == 0 and "wrote" in out and cli.load_model(run / "model.pt").best_iteration_ == 0
    assert no_temporary_files(run)


def test_predictions_replace_a_file_only_with_overwrite(files, tmp_path, capsys):
    path = tmp_path / "p.csv"
    path.write_text("old")
    argv = ["predict", "--model", files["conv"], "--n", "3", "--out", path]
    assert call(argv, capsys)[0] == 2 and path.read_text() == "old"
    assert call(argv + ["--overwrite"], capsys)[0] == 0 and np.loadtxt(path, delimiter=",", skiprows=1).shape == (3, 2)


def test_checkpoint_of_another_fit_is_refused_in_the_options_words(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    fit = FIT + ["--iterations", "0", "--checkpoint-dir", ckpt]
    assert call(fit + ["--out-dir", tmp_path / "a"], capsys)[0] == 0
    saved = {p: p.read_bytes() for p in ckpt.iterdir()}
    code, _, err = call(fit + ["--penalty", "1e-3", "--out-dir", tmp_path / "b"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.strip() == (f"convrfm: error: --checkpoint-dir {ckpt}: {ckpt / 'convrfm_checkpoint.pt'} is the "
                           "checkpoint of another fit (made with other parameters: --penalty 1e-05 there, 0.001 "
                           f"now); use a new --checkpoint-dir, or remove the folder {ckpt} to start over")
    assert {p: p.read_bytes() for p in ckpt.iterdir()} == saved and not (tmp_path / "b").exists()
    # the default checkpoint, OUT_DIR/checkpoint, is named by --out-dir
    default = FIT + ["--iterations", "0", "--out-dir", tmp_path / "a", "--overwrite"]
    assert call(default + ["--checkpoint-dir", tmp_path / "a" / "checkpoint"], capsys)[0] == 0
    code, _, err = call(default + ["--penalty", "1e-3"], capsys)
    assert code == 2 and f"--out-dir {tmp_path / 'a'}: " in err and "use a new --out-dir" in err
    # an option left out is 'not given', not Python's None
    code, _, err = call(fit[:-2] + ["--seed", "3", "--checkpoint-dir", tmp_path / "s", "--out-dir", tmp_path / "c"],
                        capsys)
    assert code == 0 and (tmp_path / "s").exists()
    code, _, err = call(fit[:-2] + ["--checkpoint-dir", tmp_path / "s", "--out-dir", tmp_path / "d"], capsys)
    assert code == 2 and "--seed 3 there, not given now" in err and "None" not in err, err


@pytest.mark.parametrize("command, name, what", [
    (["predict", "--n", "3"], "p.npy", "predictions file"),
    (["predict", "--n", "3"], "p.csv", "predictions file"),
    (["evaluate", "--n", "3"], "e.json", "evaluation report"),
    (["filters"], "f.png", "figure"),
    (["filters"], "f.pdf", "figure"),
])
def test_full_disk_is_one_line_naming_the_file(files, tmp_path, capsys, failing_writes, command, name, what):
    path = tmp_path / name
    path.write_bytes(b"old")
    failing_writes(OSError(errno.ENOSPC, "No space left on device"), room=1)
    code, _, err = call(command + ["--model", files["conv"], "--out", path, "--overwrite"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (f"convrfm: error: cannot write the {what} {path}: No space left on device "
                           "(the earlier file is unchanged)")
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


def test_full_disk_during_fit_names_the_checkpoint_and_leaves_nothing(tmp_path, capsys, failing_writes):
    failing_writes(OSError(errno.ENOSPC, "No space left on device"))
    code, _, err = call(FIT + ["--iterations", "0", "--out-dir", tmp_path / "run"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"convrfm: error: cannot write the checkpoint {tmp_path}/run/checkpoint/"
                                            "convrfm_checkpoint.pt: No space left on device (nothing was written)")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_a_write_names_the_file_and_leaves_no_temporary_file(files, tmp_path, capsys, failing_writes):
    failing_writes(KeyboardInterrupt())
    path = tmp_path / "p.npy"
    code, _, err = call(["predict", "--model", files["conv"], "--n", "3", "--out", path], capsys)
    assert code == 130 and err.strip() == f"convrfm: interrupted while writing the predictions file {path} " \
                                          "(nothing was written)"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- what works
def test_fit_predict_evaluate_filters(files, tmp_path, capsys):
    out = files["conv"].parent
    for name in ("model.pt", "history.json", "curves.png", "filters.png"):
        assert (out / name).stat().st_size > 0
    assert not (out / "checkpoint").exists()  # the default checkpoint is removed after a successful fit
    history = json.loads((out / "history.json").read_text())["history"]
    assert len(history) == 2 and "val_accuracy" in history[0]

    preds = tmp_path / "preds.npy"
    main(["predict", "--model", str(files["conv"]), "--dataset", "digits", "--n", "100", "--out", str(preds)])
    assert np.load(preds).shape == (100,)

    report = tmp_path / "eval.json"
    main(["evaluate", "--model", str(files["conv"]), "--dataset", "digits", "--out", str(report)])
    figures = json.loads(report.read_text())
    assert figures["accuracy"] > 0.9
    assert np.asarray(figures["confusion"]).sum() == 540

    capsys.readouterr()
    main(["filters", "--model", str(files["conv"]), "--out", str(tmp_path / "f.png"),
          "--locations", str(tmp_path / "loc.png")])
    assert (tmp_path / "f.png").stat().st_size > 0 and (tmp_path / "loc.png").stat().st_size > 0
    assert "M of iteration" in capsys.readouterr().out


def test_predictions_go_to_exactly_the_named_file(files, tmp_path, capsys):
    for name in ("pred.csv", "pred.npy", "PRED.NPY"):
        code, out, _ = call(["predict", "--model", files["conv"], "--n", "7", "--out", tmp_path / name], capsys)
        assert code == 0 and f"wrote 7 predictions for digits test split to {tmp_path / name}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PRED.NPY", "pred.csv", "pred.npy"]
    assert (tmp_path / "pred.csv").read_text().splitlines()[0] == "row,label"
    csv = np.loadtxt(tmp_path / "pred.csv", dtype=np.int64, delimiter=",", skiprows=1)
    assert csv.shape == (7, 2) and np.array_equal(csv[:, 0], np.arange(7))
    assert np.array_equal(csv[:, 1], np.load(tmp_path / "pred.npy"))


def test_rows_select_a_range_of_the_file(files, tmp_path, capsys):
    """--rows START:STOP scores rows START..STOP-1; the CSV's row column counts in the file."""
    code, out, _ = call(["predict", "--model", files["conv"], "--rows", "100:110", "--out", tmp_path / "r.csv"], capsys)
    assert code == 0 and "wrote 10 predictions for digits test split, rows 100:110" in out
    call(["predict", "--model", files["conv"], "--n", "110", "--out", tmp_path / "n.npy"], capsys)
    rows = np.loadtxt(tmp_path / "r.csv", dtype=np.int64, delimiter=",", skiprows=1)
    assert np.array_equal(rows[:, 0], np.arange(100, 110))
    assert np.array_equal(rows[:, 1], np.load(tmp_path / "n.npy")[100:])
    code, out, _ = call(["evaluate", "--model", files["conv"], "--rows", "500:", "--out", tmp_path / "e.json"], capsys)
    assert code == 0 and out.startswith("digits test split, rows 500:540: 40 images")
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["rows"] == [500, 540] and np.asarray(report["confusion"]).sum() == 40


def test_scoring_training_rows_warns_once(files, capsys):
    """The conv model was fitted on the first 400 rows of the digits training split."""
    code, out, err = call(["evaluate", "--model", files["conv"], "--split", "train", "--rows", "350:450"], capsys)
    assert code == 0 and err.count("warning:") == 1
    assert "warning: 50 of the 100 images scored were in the data this model was fitted on" in err
    code, out, err = call(["evaluate", "--model", files["conv"], "--split", "train", "--rows", "400:500"], capsys)
    assert code == 0 and "fitted on" not in err


def test_plan_uses_the_solver_fit_chooses(monkeypatch, capsys):
    """plan resolves --solver with the function fit uses; its memory is this machine's."""
    import falkon_convrfm.rfm as rfm
    from falkon_convrfm.memory import machine_memory
    from falkon_convrfm.solvers import choose_solver

    used = []
    fit_kernel_machine = rfm.fit_kernel_machine
    monkeypatch.setattr(rfm, "fit_kernel_machine", lambda *a, **k: used.append(a[5]) or fit_kernel_machine(*a, **k))
    X, y = load_digits(return_X_y=True)
    for solver in ("auto", "exact", "nystrom"):
        code, text, _ = call(["plan", "--n", "100", "--image-shape", "1", "8", "8", "--solver", solver], capsys)
        planned = choose_solver(solver, "cpu")
        assert code == 0 and text.startswith(f"memory plan: n = 100, centres = 100, float32, solver {planned}\n")
        ConvRFM(solver=solver, iterations=0, n_centres=50, progress=False, random_state=0).fit(X[:60].reshape(-1, 8, 8), y[:60])
        assert used[-1] == planned
    free = machine_memory("cpu")[0] / 2**30
    assert f"GiB of {free:.1f} GiB available CPU memory" in text or "physical CPU memory" in text


def test_plan_sizes_the_pooling_window_and_exact_solver(capsys):
    def blocks(*options):
        code, text, _ = call(["plan", "--n", "2000", "--device-memory-gb", "80", "--solver", "exact", *options], capsys)
        assert code == 0
        return float(text.split("kernel blocks")[1].split()[0])

    assert blocks("--pool-window", "3") > blocks()
    code, text, _ = call(["plan", "--n", "2000", "--solver", "exact", "--device-memory-gb", "80"], capsys)
    assert "centres = 2000" in text and "Cholesky factor" in text and "every training image is a centre" in text


def test_evaluate_names_its_data_and_the_class_names(files, capsys):
    code, out, _ = call(["evaluate", "--model", files["deep"], "--dataset", "npz", "--data", files["dir"] / "val.npz"],
                        capsys)
    assert code == 0
    assert out.startswith(f"{files['dir'] / 'val.npz'}: 150 images, accuracy") and "npz test" not in out
    assert "3 three" in out and "9 nine" in out


def test_val_data_and_deep_model_pictures(files, capsys):
    out = files["deep"].parent
    saved = json.loads((out / "history.json").read_text())
    assert saved["validation"] == f"validation file {files['dir'] / 'val.npz'}"
    assert saved["data"] == str(files["dir"] / "train.npz")
    for layer, name in (("0", "layer 0 (feature map)"), ("1", "layer 1 (final ConvRFM)")):
        code, text, _ = call(["filters", "--model", files["deep"], "--layer", layer, "--k", "4",
                              "--out", out / f"layer{layer}.png"], capsys)
        assert code == 0 and f"{name}: M of iteration" in text


def test_quiet_keeps_the_result_line(files, tmp_path, capsys):
    code, out, err = call(FIT + ["--iterations", "0", "--out-dir", tmp_path / "q"], capsys)
    assert code == 0 and "fitted on 400 images of digits train split" in out and "kept iteration 0" in out
    assert "ConvRFM" not in err  # no progress bar


def test_pictures_say_which_iterate_they_show():
    from falkon_convrfm.viz import describe_iterate, filter_image, plot_history

    validated = [{"iteration": t, "train_accuracy": 0.9, "val_accuracy": v} for t, v in enumerate([0.5, 0.7, 0.6])]
    assert describe_iterate(validated, 1) == "M of iteration 1 (best on validation)"
    assert describe_iterate(validated, 1, 0) == "M of iteration 0 (fixed; not the kept iterate 1)"
    unvalidated = [{"iteration": 0}, {"iteration": 1}]
    assert describe_iterate(unvalidated, 1) == "M of iteration 1 (the last, no validation data)"
    fig = plot_history(validated, best_iteration=1)
    assert "kept: iteration 1" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    grid, options = filter_image(torch.randn(16, 3, 3))  # 16 channels: 4 × 4 tiles of 3 × 3, 1-pixel gaps
    assert grid.shape == (15, 15) and np.isfinite(grid).sum() == 16 * 9 and options["vmin"] == -options["vmax"]


def test_every_option_shows_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in {"": parser, **subparsers}.items():
        for action in sub._actions:
            if action.option_strings and action.help != argparse.SUPPRESS and action.dest != "help":
                text = sub.formatter_class(sub.prog)._get_help_string(action) or ""
                assert "default" in text or action.required, (name, action.option_strings)


def test_defaults_are_the_estimators(tmp_path):
    args = build_parser().parse_args(["fit", "--out-dir", str(tmp_path)])
    model = cli.build_model(args, {})  # options not given: the estimator's own defaults
    for param in cli.SHARED_PARAMS + cli.CONV_PARAMS:
        assert getattr(model, param) == cli.conv_default(param), param
    assert args.width is None and args.depth is None  # each deep model's own layers
    deep_conv = cli.build_model(build_parser().parse_args(["fit", "--model", "deep-conv", "--out-dir", str(tmp_path)]), {})
    assert [s.width for s in deep_conv.layers] == [cli.param_default(cli.LayerSpec, "width")]
    deep = cli.build_model(build_parser().parse_args(["fit", "--model", "deep", "--out-dir", str(tmp_path)]), {})
    assert deep.layers == list(cli.param_default(cli.DeepPatchFeatureRFM, "layers"))
    for param in cli.SHARED_PARAMS:  # the deep model gets the same shared options
        assert cli.param_default(cli.DeepConvRFM, param) == cli.conv_default(param), param


def test_help_for_every_command(capsys):
    for command in ("fit", "predict", "evaluate", "filters", "plan", "info"):
        code, out, _ = call([command, "--help"], capsys)
        assert code == 0 and "usage" in out


@pytest.mark.slow  # a fresh interpreter imports torch, Falkon and scikit-learn
def test_info_as_a_program():
    assert "Falkon" in run("info")  # `python -m falkon_convrfm.cli` as a program


def test_info_and_plan(capsys):
    code, text, _ = call(["info"], capsys)
    assert code == 0 and "Falkon" in text
    code, text, _ = call(["plan", "--n", "50000", "--centres", "10000", "--device-memory-gb", "80"], capsys)
    assert code == 0 and "largest centre count" in text and "K_nm" in text


def test_missing_data_path_is_a_clear_error(capsys):
    code, _, err = call(["fit", "--dataset", "cifar10", "--out-dir", "/tmp/never"], capsys)
    assert code == 2 and "--data PATH is required" in err


def test_parser_rejects_unknown_dataset():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--dataset", "imagenet"])


# ---------------------------------------------------------------------------- the user's words
def test_messages_use_the_options_that_set_the_parameters():
    words = cli.user_words(build_parser().parse_args(["fit", "--dataset", "npz", "--data", "a.npz",
                                                      "--val-data", "v.npz"]))
    for text, expected in [
        ("validation_fraction=0.1 leaves 6 of the 60 images", "--val-fraction 0.1 leaves 6 of the 60 images"),
        ("sigma='median' cannot be used by the exact solver", "--sigma median cannot be used by the exact solver"),
        ("n_centres=10 is ignored; raise max_memory.", "--centres 10 is ignored; raise --max-memory-gb."),
        ("X_val has 3 images but X has 4", "--val-data v.npz has 3 images but --data a.npz has 4"),
        ("the kernel and the penalty (not the stride)", "the kernel and the penalty (not the stride)"),
    ]:
        assert cli.in_user_words(text, words) == expected


def test_a_budget_too_small_names_max_memory_gb(files, tmp_path, capsys):
    code, out, err = call(["fit", "--n-train", "100", "--iterations", "0", "--max-memory-gb", "1e-9", "--quiet",
                           "--solver", "exact", "--out-dir", tmp_path / "run"], capsys)
    error = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and "Traceback" not in err and len(error) == 1, err
    assert "--max-memory-gb" in error[0] and "max_cpu_mem" not in error[0] and "max_memory" not in error[0]


def test_fit_warns_in_option_words_and_prints_the_seed_that_repeats_it(tmp_path, capsys):
    argv = ["fit", "--n-train", "100", "--iterations", "1", "--stride", "9", "--solver", "exact", "--quiet"]
    code, out, err = call(argv + ["--out-dir", tmp_path / "a"], capsys)
    assert code == 0
    assert "convrfm: warning: --patch-size 3, --stride 9 leave 1 patch location on the 8×8 images" in err
    assert "convrfm: warning: --val-fraction 0.1 leaves 10 of the 100 images for validation" in err
    seed = load_model(tmp_path / "a" / "model.pt").seed_
    assert f"with --seed {seed} " in out
    code, again, _ = call(argv + ["--seed", seed, "--out-dir", tmp_path / "b"], capsys)
    history = [json.loads((tmp_path / run / "history.json").read_text())["history"] for run in "ab"]
    assert code == 0 and [r["val_accuracy"] for r in history[0]] == [r["val_accuracy"] for r in history[1]]
    result = [text.splitlines()[0].split(";", 1)[1] for text in (out, again)]
    assert result[0] == result[1]  # the same validation and kept iteration


def test_small_grey_images_of_a_file_are_read_as_the_file_gives_them(tmp_path, capsys):
    """(n, 4, 4) grey images load as (n, 1, 4, 4), whose layout alone is ambiguous: fit reads them
    as the loader gives them, and the saved model still reads arrays as the API does."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "grey4.npz", images=rng.random((40, 4, 4)), labels=np.arange(40) % 2)
    data = ["--dataset", "npz", "--data", tmp_path / "grey4.npz"]
    code, out, err = call(["fit", *data, "--patch-size", "2", "--iterations", "0", "--solver", "exact", "--quiet",
                           "--out-dir", tmp_path / "run"], capsys)
    assert code == 0, err
    model = load_model(tmp_path / "run" / "model.pt")
    assert model.image_shape_ == (1, 4, 4) and model.channels_last == "auto"
    code, out, err = call(["evaluate", "--model", tmp_path / "run" / "model.pt", *data, "--quiet"], capsys)
    assert code == 0 and "40 images, accuracy" in out, err


def test_deep_feature_model_evaluates_and_draws_each_layer(files, capsys):
    """--model deep (DeepPatchFeatureRFM): evaluate scores it, filters draws each layer's metric."""
    code, out, _ = call(["evaluate", "--model", files["features"], "--dataset", "digits"], capsys)
    assert code == 0 and "accuracy" in out
    assert float(out.split("accuracy ")[1].split()[0]) > 0.5
    saved = json.loads((files["features"].parent / "history.json").read_text())
    assert [len(layer) for layer in saved["history"]] == [2, 2]
    for layer, channels in (("0", 1), ("1", 8)):
        target = files["features"].parent / f"layer{layer}.png"
        code, text, _ = call(["filters", "--model", files["features"], "--layer", layer, "--k", "3", "--out", target],
                             capsys)
        assert code == 0 and f"layer {layer}: M of iteration" in text and target.exists()


def test_deep_model_layers_from_options_and_preset(tmp_path):
    def build(*options):
        return cli.build_model(build_parser().parse_args(["fit", "--model", "deep", "--out-dir", str(tmp_path), *options]), {})

    layers = build("--depth", "3", "--width", "32", "--rank", "64", "--iterations", "0").layers
    assert [(s.n_atoms, s.rank, s.iterations) for s in layers] == [(32, 64, 0)] * 3 and layers[-1].pool is None
    preset = build("--preset", "cifar10", "--iterations", "0")
    assert preset.layers == [FeatureLayer(**{**s, "iterations": 0}) for s in PRESETS["cifar10"]["deep"]["cpu"]["layers"]]
    assert build("--preset", "cifar10", "--pooling", "3").pooling == 3
