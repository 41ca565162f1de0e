"""Files below the estimators: persistence knows no estimator class, models.load_model all of them."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import falkon_convrfm
from falkon_convrfm.persistence import from_plain, plain_dataclass, to_plain


def package_imports(module: str) -> set:
    """The package modules ``module`` imports, at its top or inside functions."""
    tree = ast.parse((Path(falkon_convrfm.__file__).parent / f"{module}.py").read_text())
    return {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}


@pytest.mark.parametrize("module, allowed", [
    ("validation", set()),  # a leaf
    ("persistence", {"_compat", "preprocessing", "validation"}),
    ("estimator", {"_compat", "inputs", "params", "persistence", "preprocessing", "progress", "scoring", "solvers",
                   "validation"}),
    ("progress", set()),  # a leaf
])
def test_modules_import_only_downward(module, allowed):
    assert package_imports(module) <= allowed


def test_plain_round_trip():
    import dataclasses

    @plain_dataclass
    @dataclasses.dataclass
    class Spec:
        a: int = 1
        b: tuple = (1.5, None)

    value = {"x": np.arange(3), "t": torch.ones(2), "s": Spec(a=2), "k": [np.float32(0.5), "text"], 3: None}
    back = from_plain(to_plain(value))
    assert np.array_equal(back["x"], value["x"]) and back["x"].dtype == value["x"].dtype
    assert torch.equal(back["t"], value["t"]) and back["s"] == Spec(a=2) and back["k"] == [0.5, "text"]


def test_unknown_class_is_refused(tmp_path):
    from falkon_convrfm import load_model

    torch.save({"format": "falkon_convrfm", "class": "NoSuchRFM", "params": {}, "fitted": {}}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="unknown model class 'NoSuchRFM'"):
        load_model(tmp_path / "m.pt")
