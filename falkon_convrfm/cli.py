"""``convrfm``: fit, predict, evaluate, draw filters, plan memory, show backends.

A user error (a bad option value, a missing, unreadable or wrong file, an output that cannot be
written, a memory budget too small) ends the command with one line on stderr, ``convrfm: error:
...``, and exit status 2; ``--debug`` shows the traceback instead. Errors and warnings of the
estimators are shown in the command line's words (:func:`in_user_words`): a parameter as the
option that sets it, the data as the option that named it. Output paths are checked before any
work is done: an existing output (a file, or an earlier run in ``--out-dir``) is replaced only with
``--overwrite``. Every file is written atomically (:func:`~falkon_convrfm.persistence.atomic_file`):
a failed write (disk full, no permission) leaves no partial file and names the file. Ctrl-C exits
with status 130; ``fit`` then says that rerunning it resumes from its checkpoint.
The estimator options take their defaults from the estimators' signatures.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import csv
import difflib
import inspect
import io
import json
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .deep import LAYER_PARAMS, DeepConvRFM, LayerSpec
from .deep_features import DEEP_FEATURE_PARAMS, DeepPatchFeatureRFM, FeatureLayer, layer_ladder
from .deep_features import LAYER_PARAMS as FEATURE_LAYER_PARAMS
from .estimator import SHARED_PARAMS as SHARED_TABLE
from .feature_rfm import PATCH_FEATURE_PARAMS, PatchFeatureRFM
from .params import Integer, OneOf, Positive, option_type, param_default
from .persistence import CheckpointMismatch, atomic_file, check_folder
from .presets import PRESETS, preset_models, preset_params
from .rfm import CONVRFM_PARAMS, ConvRFM

PROG = "convrfm"
BUILTIN_DATASETS = ("digits", "local-signal")  # no --data
FILE_DATASETS = ("npz", "folder")  # --data is the split's file or folder itself
DATASETS = (*BUILTIN_DATASETS, "cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", *FILE_DATASETS)
PREDICTION_SUFFIXES = (".npy", ".csv")
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)  # FileNotFoundError is an OSError
CHECKPOINT_SUBDIR = "checkpoint"
RUN_FILES = ("model.pt", "history.json", "curves.png", "filters.png")  # what fit writes in --out-dir


def _on_command_line(params: dict) -> tuple:
    """The names of the parameters of ``params`` that an option of the same name (dest) sets."""
    return tuple(name for name, p in params.items() if p.option)


# Estimator parameters the CLI sets from options of the same name (dest): those both models share
# and those of the ConvRFM (or of a deep model's final ConvRFM) alone, with their rules, help and
# defaults (the estimators' own).
SHARED_PARAMS = _on_command_line(SHARED_TABLE)
CONV_PARAMS = _on_command_line(CONVRFM_PARAMS)
# Every estimator option once, by parameter name (the last table that declares it gives its rule:
# --pooling and --metric read as PatchFeatureRFM's, DeepPatchFeatureRFM checks its narrower rules).
ESTIMATOR_OPTIONS = {name: table[name] for table in (DEEP_FEATURE_PARAMS, PATCH_FEATURE_PARAMS, CONVRFM_PARAMS,
                                                     SHARED_TABLE) for name in _on_command_line(table)}
MODELS = {"conv": ConvRFM, "deep": DeepPatchFeatureRFM, "deep-conv": DeepConvRFM, "features": PatchFeatureRFM}
# The options that describe the layers of a deep model (not estimator parameters of their own).
LAYER_OPTIONS = {"depth": "--depth", "width": LAYER_PARAMS["width"].option, "rank": FEATURE_LAYER_PARAMS["rank"].option}
# The options that set estimator parameters, by parameter name (for the estimators' messages).
PARAM_OPTIONS = {**{name: p.option for name, p in ESTIMATOR_OPTIONS.items()}, "width": LAYER_PARAMS["width"].option,
                 "max_memory": "--max-memory-gb", "checkpoint_dir": "--checkpoint-dir"}
DATA_NAMES = ("X", "y", "X_val", "y_val")  # the estimators' names of the data
DIGITS_SHAPE = (1, 8, 8)  # the image shape of the built-in digits


def conv_default(name: str):
    return param_default(ConvRFM, name)


def _integer(minimum: int):
    """The argparse ``type`` of a command's own integer option (≥ ``minimum``)."""
    return option_type("value", Integer(minimum))


POSITIVE = option_type("value", Positive())


def _add_param(p, param, default, **overrides) -> None:
    """The option of an estimator parameter: its rule reads and checks the text, the estimator's
    default, its help (and the choices of a parameter with choices as its metavar)."""
    metavar = param.metavar
    if metavar is None and isinstance(param.rule, OneOf):
        metavar = "{" + ",".join(param.rule.cli_choices()) + "}"
    kwargs = dict(dest=param.name, type=option_type(param.name, param.rule), default=default, metavar=metavar,
                  help=param.help)
    p.add_argument(param.option, **{**kwargs, **overrides})


def _defaults_text(name: str) -> str:
    """'(default: …)' of an estimator option: the default of each model that has the parameter."""
    defaults = {}
    for model, cls in MODELS.items():
        if name in inspect.signature(cls).parameters and model != "deep-conv":  # deep-conv: conv's defaults
            defaults.setdefault(repr(param_default(cls, name)), []).append(model)
    if len(defaults) == 1:
        (value, models), = defaults.items()
        only = {"conv": "conv and deep-conv", "features": "features", "deep": "deep"}
        return f"(default: {value}{'' if len(models) > 1 else '; --model ' + only[models[0]] + ' only'})"
    return "(default: " + "; ".join(f"{' and '.join(m)} {v}" for v, m in defaults.items()) + ")"


def given_options(args) -> dict:
    """The estimator options the command line gave (they have no argparse default)."""
    return {name: value for name, value in vars(args).items() if name in ESTIMATOR_OPTIONS}


# ---------------------------------------------------------------------------- parser classes
class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (``convrfm fit: error: ...``), exit status 2."""

    def error(self, message):
        text = in_user_words(_one_line(message), PARAM_OPTIONS)
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; options defaulting to None say in their own
    words what that means."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _one_line(error) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def user_words(args) -> dict:
    """The command line's words for the names in the estimators' messages: each parameter's option
    (:data:`PARAM_OPTIONS`) and, for a command that reads data, X / y / X_val / y_val as the
    options that named the data."""
    words = {**PARAM_OPTIONS, "image_shape": "image shape"}
    dataset = getattr(args, "dataset", None)
    if dataset is not None:
        data = f"--data {args.data}" if args.data else f"--dataset {dataset}"
        words.update(X=data, y=f"the labels of {data}")
    if getattr(args, "val_data", None):
        words.update(X_val=f"--val-data {args.val_data}", y_val=f"the labels of --val-data {args.val_data}")
    return words


def in_user_words(text: str, words: dict) -> str:
    """``text`` with the names of ``words`` in their words: ``name=value`` → ``word value``; a bare
    name only when it cannot be an ordinary word (it has an underscore, or names the data)."""
    def replace(match):
        name, value = match.group(1), match.group(2)
        if value is not None:
            return f"{words[name]} {value.strip(chr(39))}"
        return words[name] if "_" in name or name in DATA_NAMES else name

    names = "|".join(map(re.escape, sorted(words, key=len, reverse=True)))
    return re.sub(rf"(?<![\w.-])({names})(?!\w)(?:=('[^']*'|\([^)]*\)|[^\s,;:)]+))?", replace, text)


def memory_advice(args) -> str:
    """What to do after a MemoryError: raise a --max-memory-gb that was given, else use less."""
    given = getattr(args, "max_memory_gb", None)
    if given is not None:
        return f"--max-memory-gb {given:g} is too small for this fit: raise it"
    return "use fewer images or --centres, or --max-memory-gb to bound the memory a step uses"


# ---------------------------------------------------------------------------- files and folders
def _existing_file(path, option: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{option} {path}: no such file")
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder, not a file")
    return path


def check_output_dir(path, option: str) -> Path:
    """``path`` if it is a writable folder or can be created as one (nothing is created)."""
    path = Path(path)
    check_folder(path, f"{option} {path}")
    return path


def check_earlier_run(out: Path, overwrite: bool) -> None:
    """FileExistsError when ``out`` holds files of an earlier ``fit`` and ``overwrite`` is off."""
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier and not overwrite:
        raise FileExistsError(f"--out-dir {out} holds an earlier run ({', '.join(earlier)}): add --overwrite to "
                              "replace it, or use a new --out-dir")


def check_output_file(path, option: str, suffixes, overwrite: bool) -> Path:
    """``path`` if it has one of ``suffixes``, can be written in an existing folder, and does not
    exist yet or ``overwrite`` is on."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{option} {path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
                         f"use {' or '.join(suffixes)}")
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder, not a file")
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{option} {path}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise FileNotFoundError(f"{option} {path}: folder {folder} does not exist")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{option} {path} already exists: add --overwrite to replace it, or choose another file")
    check_folder(folder, f"{option} {path}")
    return path


def _missing_folders(path: Path) -> list:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


@contextlib.contextmanager
def _no_empty_folders_left(*paths):
    """On any exception (Ctrl-C too), remove the folders among ``paths`` (and their new
    ancestors) that did not exist before and are still empty."""
    created = [p for path in paths for p in _missing_folders(Path(path))]
    try:
        yield
    except BaseException:
        for folder in sorted(set(created), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty, or already gone
                folder.rmdir()
        raise


# ---------------------------------------------------------------------------- data
def load_data(dataset: str, path, split: str | None, layout: str | None, default_split: str):
    """(:class:`~falkon_convrfm.datasets.ImageDataset`, a description naming what was loaded)."""
    from .datasets import ImageDataset, load_dataset, load_npz

    if layout is not None and dataset != "npz":
        raise ValueError(f"--layout applies to npz files, not to --dataset {dataset}")
    if dataset in FILE_DATASETS and split is not None:
        raise ValueError(f"--split does not apply to --dataset {dataset}: --data names the split's "
                         f"{'file' if dataset == 'npz' else 'folder'} itself")
    split = split or default_split
    if dataset in BUILTIN_DATASETS:
        if path is not None:
            raise ValueError(f"--data is not used with --dataset {dataset} (the data is built in)")
        images, labels = _builtin(dataset, split)
        return ImageDataset(images, labels), f"{dataset} {split} split"
    if path is None:
        raise ValueError(f"--data PATH is required for --dataset {dataset}")
    if dataset == "npz":
        return load_npz(path, layout=layout or "auto"), str(path)
    if dataset == "folder":
        return load_dataset(dataset, path), str(path)
    return load_dataset(dataset, path, split=split), f"{dataset} {split} split ({path})"


def _builtin(dataset: str, split: str):
    """scikit-learn's 8×8 digits (70 / 30 stratified split) or the synthetic local-signal task."""
    if dataset == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        X = (d.images / 16.0).astype(np.float32)[:, None]
        parts = train_test_split(X, d.target, test_size=0.3, stratify=d.target, random_state=0)
        X, y = (parts[0], parts[2]) if split == "train" else (parts[1], parts[3])
        return torch.from_numpy(X), torch.from_numpy(y)
    from .datasets import make_local_signal

    return make_local_signal(2000, random_state=0 if split == "train" else 1)


def _first(data, n: int | None, option: str, name: str):
    """The first ``n`` images and labels (all when n is None)."""
    if n is None:
        return data.images, data.labels
    if n > len(data.labels):
        raise ValueError(f"{option} {n}: {name} has only {len(data.labels)} images")
    return data.images[:n], data.labels[:n]


def row_range(text: str) -> tuple:
    """The argparse ``type`` of ``--rows START:STOP``: (start, stop), either None when left out."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP (row numbers, e.g. 45000:50000 or 45000:), "
                                         f"got {text!r}") from None
    if (start is not None and start < 0) or (stop is not None and stop < 0):
        raise argparse.ArgumentTypeError(f"row numbers count from 0, got {text!r}")
    if start is not None and stop is not None and stop <= start:
        raise argparse.ArgumentTypeError(f"STOP must be greater than START, got {text!r}")
    return start, stop


def selected_rows(data, args, name: str):
    """(images, labels, index of the first one in the file) chosen by ``--n`` or ``--rows``."""
    if args.rows is None:
        return (*_first(data, args.n, "--n", name), 0)
    if args.n is not None:
        raise ValueError("--n and --rows both choose the images: use one (--n N is --rows 0:N)")
    count, typed = len(data.labels), ":".join("" if v is None else str(v) for v in args.rows)
    start, stop = args.rows[0] or 0, count if args.rows[1] is None else args.rows[1]
    if stop > count or start >= stop:
        raise ValueError(f"--rows {typed} is out of range: {name} has {count} images (rows 0:{count})")
    return data.images[start:stop], data.labels[start:stop], start


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


# ---------------------------------------------------------------------------- model files
def load_model(path):
    """Any model written by ``convrfm fit`` (read with ``weights_only=True``: nothing in the file runs)."""
    from .models import load_model as load

    return load(_existing_file(path, "--model"))


def iteration_of(metric, requested: int | None) -> int:
    """``requested`` (default: the kept iterate) if ``metric`` has its M, else ValueError."""
    if requested is None:
        return metric.best
    if requested not in metric.metrics:
        its = sorted(metric.metrics)
        valid = f"{its[0]}..{its[-1]}" if len(its) > 1 else f"{its[0]} (only the kept M is stored)"
        raise ValueError(f"--iteration {requested} is out of range: {metric.name} has iteration {valid}")
    return requested


def title(metric, iteration: int) -> str:
    from .viz import describe_iterate

    return f"{metric.name}: {describe_iterate(metric.history, metric.best, iteration)}"


def learned_metric(model, layer: int | None):
    """The :class:`~falkon_convrfm.estimator.LearnedMetric` of a model (``layer`` None) or of a deep
    model's layer (default: the last: deep-conv's final ConvRFM, deep's last feature layer)."""
    if not isinstance(model, (DeepConvRFM, DeepPatchFeatureRFM)):
        if layer is not None:
            raise ValueError(f"--layer applies to deep models; this model is a {type(model).__name__}")
        return model.learned_metric()
    try:
        return model.learned_metric(layer)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None


def _saved(fig) -> None:
    """Release a figure that has been written to its file."""
    import matplotlib.pyplot as plt

    plt.close(fig)


def draw_filters(metric, iteration: int | None, k: int, path) -> None:
    from .viz import plot_filters

    iteration = iteration_of(metric, iteration)
    _saved(plot_filters(metric.metrics[iteration], metric.image_shape, metric.patch_size, k=k, path=path,
                        title=title(metric, iteration)))


# ---------------------------------------------------------------------------- commands
def cmd_info(args):
    from . import __version__
    from ._compat import FALKON_IMPORT_ERROR, HAS_FALKON, falkon_cuda_status
    from .ops import backend_report, keops_importable

    print(f"falkon-convrfm {__version__}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads")
    print(f"Falkon: {'available' if HAS_FALKON else 'not installed (' + FALKON_IMPORT_ERROR + ')'}")
    if HAS_FALKON:
        print(f"Falkon CUDA extension: {falkon_cuda_status()[1]}")
    print(f"KeOps: {'importable' if keops_importable() else 'not importable'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"CUDA device {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB")
    else:
        print("CUDA: no device")
    print("kernel backend chosen by backend='auto':")
    for line in backend_report():
        print(f"  {line}")


def read_config(path) -> dict:
    """The JSON object of estimator parameters in ``path``, or ValueError naming the file."""
    path = _existing_file(path, "--config")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"--config {path}: not a JSON file ({_one_line(exc)})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: expected a JSON object of estimator parameters, "
                         f"got a {type(config).__name__}")
    return config


class ConfigError(ValueError):
    """A bad --config parameter: its message names parameters as the file does (not as options)."""


def _known(params: dict, cls, where: str) -> dict:
    """``params`` if ``cls`` has each of them and each value passes its rule, else ConfigError
    naming the file, the parameter (with the closest valid name for a misspelt one) and the value."""
    valid = [name for name in inspect.signature(cls).parameters if name != "self"]
    for name, value in params.items():
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(valid)}"
            raise ConfigError(f"{where}: unknown {cls.__name__} parameter {name!r}; {hint}")
        rule = getattr(cls, "_PARAMS", {}).get(name)
        try:
            if rule is not None:
                rule.rule.check(name, value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {_one_line(exc)}") from None
    return params


def _applicable(given: dict, cls, model: str) -> dict:
    """``given`` if ``cls`` has every parameter in it, else ValueError naming the first option it lacks."""
    for name in given:
        if name not in inspect.signature(cls).parameters:
            users = [m for m, c in MODELS.items() if name in inspect.signature(c).parameters]
            raise ValueError(f"{ESTIMATOR_OPTIONS[name].option} does not apply to --model {model} "
                             f"(it sets a parameter of --model {' / '.join(users)})")
    return given


def model_name(args) -> str:
    """--model, by default the preset's first model with --preset, else 'conv'."""
    model = args.model or (preset_models(args.preset)[0] if args.preset else "conv")
    if args.preset:
        preset_params(args.preset, model=model)  # refuses a model the preset has no settings for
    return model


def build_model(args, config: dict):
    """The estimator the options and the --config parameters (which take precedence) describe;
    with --preset, the preset's parameters are the base that the options given override."""
    where = f"--config {args.config}"
    given, model = given_options(args), model_name(args)
    extras = dict(max_memory=None if args.max_memory_gb is None else args.max_memory_gb * 2**30,
                  checkpoint_dir=str(checkpoint_dir(args)), progress=not args.quiet,
                  channels_last=False)  # the loaders give (n, c, H, W): small images are not ambiguous
    layer_options = [option for name, option in LAYER_OPTIONS.items() if getattr(args, name) is not None]
    if args.rank is not None and model != "deep":
        raise ValueError("--rank sets the metric rank of the layers of --model deep")
    if layer_options and model in ("conv", "features"):
        raise ValueError("--depth and --width describe the layers of --model deep or deep-conv")
    if model == "features":
        base = preset_params(args.preset, given.get("device", "cpu"), model) if args.preset else {}
        given = _applicable(given, PatchFeatureRFM, model)
        return PatchFeatureRFM(**{**base, **given, **extras, **_known(config, PatchFeatureRFM, where)})
    if model == "deep":
        return deep_features_model(args, given, config, extras, layer_options)
    given = _applicable(given, ConvRFM, model)
    shared = {name: given.get(name, conv_default(name)) for name in SHARED_PARAMS}
    shared.update(extras)
    conv = {name: given.get(name, conv_default(name)) for name in CONV_PARAMS}
    if model == "conv":
        return ConvRFM(**{**shared, **conv, **_known(config, ConvRFM, where)})
    config = dict(_known(config, DeepConvRFM, where))
    width = param_default(LayerSpec, "width") if args.width is None else args.width
    layers = _config_layers(config, LayerSpec, where, layer_options)
    if layers is None:
        layers = [{"width": width}] * (args.depth or 1)
    final = _known(config.pop("final", {}), ConvRFM, f"{where}, 'final'")
    layers = [_layer(LayerSpec, spec, where) for spec in layers]
    return DeepConvRFM(layers=layers, final={**conv, **final}, **{**shared, **config})


def _config_layers(config: dict, cls, where: str, layer_options: list):
    """The --config 'layers' (popped from ``config``): a list of objects of ``cls`` fields, or None
    when the file has none; a ValueError when it is not such a list or the options describe the
    layers too."""
    if "layers" not in config:
        return None
    if layer_options:
        raise ValueError(f"{' / '.join(layer_options)} and the 'layers' of {where} both describe the layers: use one")
    layers = config.pop("layers")
    if not isinstance(layers, list) or not all(isinstance(s, dict) for s in layers):
        raise ValueError(f"{where}: 'layers' must be a list of objects of {cls.__name__} fields")
    return layers


def _layer(cls, fields: dict, where: str):
    """A layer spec (LayerSpec, FeatureLayer) of the --config ``fields``, or ConfigError naming the file."""
    try:
        return cls(**_known(fields, cls, f"{where}, 'layers'"))
    except (ValueError, TypeError) as exc:
        raise exc if isinstance(exc, ConfigError) else ConfigError(f"{where}, 'layers': {_one_line(exc)}") from None


def deep_features_model(args, given: dict, config: dict, extras: dict, layer_options: list) -> DeepPatchFeatureRFM:
    """--model deep: the layers of --config 'layers', else of --depth / --width / --rank (a
    :func:`~falkon_convrfm.deep_features.layer_ladder`), else the preset's or the estimator's;
    --iterations sets the metric updates of every layer."""
    where = f"--config {args.config}"
    base = preset_params(args.preset, given.get("device", "cpu"), "deep") if args.preset else {}
    given = dict(given)
    iterations = given.pop("iterations", None)
    config = dict(_known(config, DeepPatchFeatureRFM, where))
    layers = _config_layers(config, FeatureLayer, where, layer_options)
    if layers is not None:
        layers = [_layer(FeatureLayer, spec, where) for spec in layers]
    elif layer_options:
        ladder = {name: getattr(args, name) for name in LAYER_OPTIONS if getattr(args, name) is not None}
        layers = layer_ladder(**ladder)
    else:
        layers = [FeatureLayer(**s) if isinstance(s, dict) else s
                  for s in base.get("layers", param_default(DeepPatchFeatureRFM, "layers"))]
    if iterations is not None:
        layers = [dataclasses.replace(s, iterations=iterations) for s in layers]
    given = _applicable(given, DeepPatchFeatureRFM, "deep")
    return DeepPatchFeatureRFM(**{**base, **given, **extras, **config, "layers": layers})


def checkpoint_dir(args) -> Path:
    return Path(args.checkpoint_dir) if args.checkpoint_dir else Path(args.out_dir) / CHECKPOINT_SUBDIR


def refused_checkpoint(exc: CheckpointMismatch, args) -> str:
    """A checkpoint of another fit in the command's words: the option that names its folder and the
    options that differ."""
    option, folder = ("--checkpoint-dir", args.checkpoint_dir) if args.checkpoint_dir else ("--out-dir", args.out_dir)
    return exc.message(f"{option} {folder}", f"use a new {option}",
                       lambda name: ESTIMATOR_OPTIONS[name].option if name in ESTIMATOR_OPTIONS else name,
                       show=lambda value: "not given" if value is None else repr(value))


def cmd_fit(args):
    from .datasets import load_npz
    from .viz import plot_history

    config = read_config(args.config) if args.config else {}
    model = build_model(args, config)
    out, checkpoints = check_output_dir(args.out_dir, "--out-dir"), checkpoint_dir(args)
    check_earlier_run(out, args.overwrite)
    check_output_dir(checkpoints, "--checkpoint-dir")
    npz_layout = args.layout if args.dataset == "npz" else None
    if args.layout is not None and npz_layout is None and args.val_data is None:
        raise ValueError(f"--layout applies to npz files, not to --dataset {args.dataset}")
    train, name = load_data(args.dataset, args.data, args.split, npz_layout, "train")
    X, y = _first(train, args.n_train, "--n-train", name)
    fit_args, val_name = (X, y), f"{model.validation_fraction:g} of the training images"
    if args.val_data is not None:
        if "validation_fraction" in given_options(args):
            raise ValueError("--val-fraction does not apply with --val-data (the file is the validation set)")
        val = load_npz(_existing_file(args.val_data, "--val-data"), layout=args.layout or "auto")
        fit_args, val_name = (X, y, val.images, val.labels), f"validation file {args.val_data}"

    with _no_empty_folders_left(out, checkpoints):
        tic = time.perf_counter()
        try:
            model.fit(*fit_args)
        except CheckpointMismatch as exc:
            raise ValueError(refused_checkpoint(exc, args)) from None
        seconds = time.perf_counter() - tic
        model.set_params(channels_last=config.get("channels_last", "auto"))  # the saved model reads arrays as the API does
        out.mkdir(parents=True, exist_ok=True)
        model.save(out / "model.pt")
        with atomic_file(out / "history.json", "history") as f:
            f.write(json.dumps({"params": {k: repr(v) for k, v in model.get_params().items()}, "seconds": seconds,
                                "data": name, "validation": val_name, "history": model.history_},
                               indent=1, default=float).encode())
        metric = learned_metric(model, None)
        _saved(plot_history(metric.history, out / "curves.png", best_iteration=metric.best, title=metric.name))
        draw_filters(metric, None, min(8, metric.metrics[metric.best].shape[0]), out / "filters.png")
    if not args.checkpoint_dir:  # the default checkpoint has served its purpose: model.pt holds the result
        shutil.rmtree(checkpoints, ignore_errors=True)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in metric.validation_scores(metric.best).items()) or "no validation data"
    print(f"fitted on {len(y)} images of {name} in {seconds:.1f} s with --seed {model.seed_} (give it to repeat "
          f"this fit); validation: {val_name}; kept iteration {metric.best}: {scores}")
    print(f"wrote {out}/model.pt, history.json, curves.png, filters.png")


def save_predictions(pred: np.ndarray, path: Path, first_row: int = 0) -> None:
    """``.npy`` (numpy's format) or ``.csv`` (a header, then one line per image: its row in the
    input file, counted from 0, and its label or outputs), written to exactly ``path``."""
    with atomic_file(path, "predictions file") as f:
        if path.suffix.lower() == ".npy":
            np.save(f, pred, allow_pickle=False)
            return
        values = pred.reshape(len(pred), -1)
        header = ["label"] if pred.ndim == 1 else [f"output_{j}" for j in range(values.shape[1])]
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["row", *header])
        writer.writerows([first_row + i, *row] for i, row in enumerate(values.tolist()))
        f.write(text.getvalue().encode())


def model_dataset(args, model) -> str:
    """--dataset, by default the built-in digits for a model fitted on images of their shape;
    ValueError for another model, which was fitted on other data."""
    if args.dataset is not None:
        return args.dataset
    if tuple(model.image_shape_) != DIGITS_SHAPE:
        raise ValueError(f"--dataset is required: --model {args.model} was fitted on images of shape "
                         f"{tuple(model.image_shape_)}, not on the built-in digits {DIGITS_SHAPE}; name its data with "
                         "--dataset (and --data)")
    return "digits"


def _quiet(model, args):
    """``model`` with its progress bars off under ``--quiet``."""
    return model.set_params(progress=not args.quiet)


def cmd_predict(args):
    out = check_output_file(args.out, "--out", PREDICTION_SUFFIXES, args.overwrite)
    model = _quiet(load_model(args.model), args)
    args.dataset = model_dataset(args, model)
    data, name = load_data(args.dataset, args.data, args.split, args.layout, "test")
    X, _, first_row = selected_rows(data, args, name)
    pred = _numpy(model.predict(X))
    save_predictions(pred, out, first_row)
    print(f"wrote {len(pred)} predictions for {name}{_rows_text(first_row, len(pred))} to {out}")


def _rows_text(first_row: int, count: int) -> str:
    return f", rows {first_row}:{first_row + count}" if first_row else ""


def format_confusion(C: np.ndarray, classes, names=None) -> list:
    """Lines of the confusion matrix (rows: true class, columns: predicted class), rows named
    "label name" when ``names`` (indexed by integer label) are given."""
    def name(c):
        return f"{c} {names[c]}" if names and isinstance(c, int) and 0 <= c < len(names) else str(c)

    rows = [name(c) for c in classes]
    width, cell = max(len(r) for r in rows), max(5, *(len(str(c)) for c in classes))
    lines = [" " * width + " " + " ".join(f"{str(c):>{cell}}" for c in classes)]
    lines += [f"{r:<{width}} " + " ".join(f"{v:{cell}d}" for v in row) for r, row in zip(rows, C)]
    return lines


def cmd_evaluate(args):
    out = None if args.out is None else check_output_file(args.out, "--out", (".json",), args.overwrite)
    model = _quiet(load_model(args.model), args)
    if model.task_ != "classification":
        raise ValueError(f"--model {args.model} is a regression model; evaluate reports classification accuracy")
    args.dataset = model_dataset(args, model)
    data, name = load_data(args.dataset, args.data, args.split, args.layout, "test")
    X, y, first_row = selected_rows(data, args, name)
    scores, classes = model.evaluate(X, y), _numpy(model.classes_).tolist()
    print(f"{name}{_rows_text(first_row, len(y))}: {len(y)} images, accuracy {scores['accuracy']:.4f}")
    print("confusion matrix (rows: true class, columns: predicted class)")
    print("\n".join(format_confusion(scores["confusion"], classes, data.classes)))
    if out is not None:
        with atomic_file(out, "evaluation report") as f:
            f.write(json.dumps({"data": name, "rows": [first_row, first_row + len(y)], "accuracy": scores["accuracy"],
                                "classes": classes, "class_names": data.classes,
                                "confusion": scores["confusion"].tolist()}).encode())
        print(f"wrote {out}")


def _location_share(metric, iteration: int):
    try:
        return metric.location_share(iteration)
    except ValueError as exc:
        raise ValueError(f"--locations: {exc}") from None


def cmd_filters(args):
    from .viz import plot_location_map

    out = check_output_file(args.out, "--out", FIGURE_SUFFIXES, args.overwrite)
    locations = (None if args.locations is None
                 else check_output_file(args.locations, "--locations", FIGURE_SUFFIXES, args.overwrite))
    model = load_model(args.model)
    metric = learned_metric(model, args.layer)
    iteration = iteration_of(metric, args.iteration)
    if locations and isinstance(model, DeepPatchFeatureRFM):
        raise ValueError("--locations: the explicit feature layers of --model deep keep no per-location AGOP share "
                         "(their AGOP is summed over locations)")
    share, share_title = _location_share(metric, iteration) if locations else (None, None)
    draw_filters(metric, iteration, args.k, out)
    print(f"wrote {out}: {title(metric, iteration)}")
    if locations:
        _saved(plot_location_map(share, metric.image_shape, metric.patch_size, metric.stride, metric.padding,
                                 path=locations, title=share_title))
        print(f"wrote {locations}")


def cmd_plan(args):
    from ._compat import resolve_device
    from .memory import machine_memory
    from .planning import format_plan, plan_memory
    from .solvers import choose_solver

    device = resolve_device(args.device)
    solver = choose_solver(args.solver, device)  # as fit chooses it
    if args.device_memory_gb is None:
        memory, source = machine_memory(device)
    else:
        memory, source = args.device_memory_gb * 2**30, "(--device-memory-gb)"
    plan = plan_memory(args.n, tuple(args.image_shape), args.patch_size, args.stride, args.padding,
                       args.n_centres, dtype=args.dtype, device_memory=memory, n_outputs=args.outputs,
                       agop_samples=args.agop_samples, n_val=args.n_val, solver=solver, pool_window=args.pool_window,
                       block_budget=None if args.max_memory_gb is None else args.max_memory_gb * 2**30)
    print(format_plan(plan, source))


# ---------------------------------------------------------------------------- parser
def _add_data(p, default="digits", help="which data"):
    p.add_argument("--dataset", choices=DATASETS, default=default, help=help)
    p.add_argument("--data", help="dataset root (cifar10/100, svhn, mnist, fashion-mnist) or the split's file "
                   "(npz) / folder (folder) (default: none; digits and local-signal are built in)")
    p.add_argument("--split", choices=("train", "test"),
                   help="split of a named dataset (default: train for fit, test for predict and evaluate; "
                   "not used by npz / folder, whose --data is the split)")
    p.add_argument("--layout", choices=("auto", "chw", "hwc"),
                   help="channel axis of npz images: (N, C, H, W) or (N, H, W, C) (default: auto, detected)")


def _add_model_on_data(p):
    """The options of a command that runs a saved model on data; returns ``p``."""
    p.add_argument("--model", required=True, help="model.pt written by fit")
    _add_data(p, None, "which data (default: digits for a model fitted on 8×8 grey images; required for others)")
    p.add_argument("--n", type=_integer(1), help="first N images only (default: all)")
    p.add_argument("--rows", type=row_range, metavar="START:STOP",
                   help="only the images in rows START to STOP - 1 of the file, counted from 0; either may be left "
                   "out (e.g. 45000: for the rows after a fit's --n-train 45000) (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the result is still printed)")
    return p


def _add_overwrite(p, what: str):
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} (default: refuse, naming it)")


def _add_debug(p, default):
    p.add_argument("--debug", action="store_true", default=default,
                   help="show the Python traceback of an error (default: one line)")


def _add_estimator_options(p):
    p.add_argument("--model", choices=tuple(MODELS), help="conv: ConvRFM; deep: DeepPatchFeatureRFM (explicit feature "
                   "layers with pooling, a learned low-rank metric per layer, linear head); deep-conv: DeepConvRFM "
                   "(random convolutions drawn from each layer's M); features: PatchFeatureRFM (explicit pooled patch "
                   "features, linear head) (default: the preset's first model with --preset, else conv)")
    p.add_argument("--preset", choices=tuple(PRESETS), help="settings chosen on validation runs (docs/results.md) "
                   "for --model features or deep, per device; options given next to it override its values "
                   "(default: none)")
    p.add_argument("--config", help="JSON object of extra estimator parameters, taking precedence over the "
                   "options (deep: 'layers', a list of FeatureLayer fields; deep-conv: 'layers', a list of LayerSpec "
                   "fields, and 'final') (default: none)")
    for name, param in ESTIMATOR_OPTIONS.items():
        _add_param(p, param, argparse.SUPPRESS, help=f"{param.help} {_defaults_text(name)}")
    p.add_argument("--depth", type=_integer(1), help="deep / deep-conv: number of layers (default: deep 2, the preset's "
                   "layers with --preset; deep-conv 1)")
    _add_param(p, LAYER_PARAMS["width"], None,
               help=f"deep: atoms per layer; deep-conv: filters per layer (default: deep 256, deep-conv "
                    f"{param_default(LayerSpec, 'width')})")
    _add_param(p, FEATURE_LAYER_PARAMS["rank"], None,
               help="deep: rank of every layer's metric (full when R >= c·q²) (default: 256)")
    p.add_argument("--max-memory-gb", type=POSITIVE, metavar="GB",
                   help="memory budget for kernel blocks and AGOP chunks (default: none, the solver's own)")


def build_parser() -> argparse.ArgumentParser:
    kw = dict(formatter_class=_HelpFormatter)
    parser = _Parser(prog=PROG, description="Deep ConvRFM with Falkon: learned-metric convolutional kernels.", **kw)
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="train a model and write model.pt, history.json, curves.png, filters.png", **kw)
    _add_data(p)
    _add_estimator_options(p)
    p.add_argument("--val-data", dest="val_data", metavar="NPZ",
                   help="npz file of validation images and labels (default: none, a --val-fraction split)")
    p.add_argument("--n-train", dest="n_train", type=_integer(1), metavar="N",
                   help="use only the first N training images (default: all)")
    p.add_argument("--out-dir", dest="out_dir", default="convrfm_out", metavar="DIR",
                   help="folder for model.pt, history.json, curves.png, filters.png")
    p.add_argument("--checkpoint-dir", dest="checkpoint_dir", metavar="DIR",
                   help="checkpoint after every iteration; a rerun of the same command resumes from it "
                   f"(default: OUT_DIR/{CHECKPOINT_SUBDIR}, removed after a successful fit)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the result is still printed)")
    _add_overwrite(p, f"an earlier run in --out-dir ({', '.join(RUN_FILES)})")
    p.set_defaults(func=cmd_fit)

    p = _add_model_on_data(sub.add_parser("predict", help="predict labels with a saved model", **kw))
    p.add_argument("--out", default="predictions.npy", help="predictions file, .npy or .csv")
    _add_overwrite(p, "an existing --out file")
    p.set_defaults(func=cmd_predict)

    p = _add_model_on_data(sub.add_parser("evaluate", help="accuracy and confusion matrix of a saved model", **kw))
    p.add_argument("--out", help="also write the figures to this .json file (default: none)")
    _add_overwrite(p, "an existing --out file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("filters", help="draw the top eigenvectors of M (and the location map)", **kw)
    p.add_argument("--model", required=True, help="model.pt written by fit")
    p.add_argument("--layer", type=_integer(0),
                   help="deep models: which layer's M (default: the last, the final ConvRFM)")
    p.add_argument("--iteration", type=_integer(0), help="which iteration's M (default: the kept, best one)")
    p.add_argument("--k", type=_integer(1), default=8, help="number of eigenvectors")
    p.add_argument("--out", default="filters.png", help=f"figure file ({', '.join(FIGURE_SUFFIXES)})")
    p.add_argument("--locations", help="also draw the per-location AGOP share map to this file (default: none)")
    _add_overwrite(p, "existing --out / --locations files")
    p.set_defaults(func=cmd_filters)

    p = sub.add_parser("plan", help="memory of each phase of a ConvRFM fit (the solver fit would choose) and the "
                       "largest centre count that fits", **kw)
    p.add_argument("--n", type=_integer(1), required=True, help="training images")
    p.add_argument("--n-val", dest="n_val", type=_integer(0), default=0, metavar="N", help="validation images")
    p.add_argument("--image-shape", dest="image_shape", type=_integer(1), nargs=3, default=[3, 32, 32],
                   metavar=("C", "H", "W"), help="image shape")
    for name in ("patch_size", "stride", "padding", "n_centres"):
        _add_param(p, CONVRFM_PARAMS.get(name) or SHARED_TABLE[name], conv_default(name))
    p.add_argument("--outputs", type=_integer(1), default=10, help="classes (outputs of the predictor)")
    for name in ("agop_samples", "dtype", "pool_window", "solver", "device"):
        _add_param(p, CONVRFM_PARAMS.get(name) or SHARED_TABLE[name], conv_default(name))
    p.add_argument("--max-memory-gb", type=POSITIVE, metavar="GB",
                   help="fit's memory budget for kernel blocks and AGOP chunks (default: none, the solver's own)")
    p.add_argument("--device-memory-gb", dest="device_memory_gb", type=POSITIVE, metavar="GB",
                   help="memory to plan for (default: what this machine has free now: the --device's free memory "
                   "on cuda, the available RAM on cpu)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("info", help="available backends: Falkon, KeOps, CUDA devices", **kw)
    p.set_defaults(func=cmd_info)
    for p in sub.choices.values():
        _add_debug(p, argparse.SUPPRESS)  # `convrfm fit ... --debug` as well as `convrfm --debug fit ...`
    return parser


def _interrupted(args, exc: KeyboardInterrupt) -> str:
    """'convrfm: interrupted', with the file being written when it was (``exc`` names it), and for
    ``fit`` how to resume."""
    head = f"{PROG}: interrupted" + (f" {exc}" if str(exc) else "")
    if args.command != "fit":
        return head
    if not any(checkpoint_dir(args).glob("*_checkpoint.pt")):
        return f"{head} before the first iteration was checkpointed: rerunning the same command starts over"
    return (f"{head}; rerun the same command (same --out-dir {args.out_dir}) to resume from the last "
            f"finished iteration, checkpointed in {checkpoint_dir(args)}")


def main(argv=None):
    """Run ``convrfm`` with ``argv`` (default: the command line). User errors exit with status 2
    after one line on stderr, Ctrl-C with status 130."""
    args = build_parser().parse_args(argv)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{PROG}: warning: {in_user_words(_one_line(message), user_words(args))}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            args.func(args)
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        print(_interrupted(args, exc), file=sys.stderr)
        raise SystemExit(130) from None
    except MemoryError as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: out of memory ({_one_line(exc)}); {memory_advice(args)}", file=sys.stderr)
        raise SystemExit(2) from None
    except USER_ERRORS as exc:
        if args.debug:
            raise
        text = _one_line(exc) if isinstance(exc, ConfigError) else in_user_words(_one_line(exc), user_words(args))
        print(f"{PROG}: error: {text}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
