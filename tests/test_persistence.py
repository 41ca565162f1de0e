"""Files below the estimators: persistence knows no estimator class, models.load_model all of them;
writes are atomic and a failure names the file; checkpoint folders are checked before any work."""
import ast
import errno
from pathlib import Path

import numpy as np
import pytest
import torch

import falkon_convrfm
import falkon_convrfm.persistence as persistence
from falkon_convrfm import ConvRFM
from falkon_convrfm.persistence import (CheckpointMismatch, CheckpointStore, atomic_file, atomic_save, from_plain,
                                        plain_dataclass, to_plain)


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


def test_a_damaged_or_foreign_file_is_named_as_such(tmp_path):
    from falkon_convrfm import load_model

    ConvRFM(iterations=0, solver="exact", n_centres=20, validation_fraction=0, progress=False).fit(
        np.random.default_rng(0).random((20, 1, 6, 6)), np.arange(20) % 2).save(tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])  # torch: OSError [Errno 22] Invalid argument
    (tmp_path / "text.pt").write_text("not a model\n")  # torch: IndexError: pop from empty list
    np.savez(tmp_path / "arrays.npz", images=np.zeros((2, 4, 4)))
    for name, reason in (("truncated.pt", "not a zip archive as torch.save writes: a truncated or damaged file"),
                         ("text.pt", "not a zip archive as torch.save writes"),
                         ("arrays.npz", r"a zip archive of other files \(an \.npz of arrays\?\)")):
        with pytest.raises(ValueError, match=rf"{name} is not a falkon_convrfm model file \({reason}"):
            load_model(tmp_path / name)
    assert load_model(tmp_path / "m.pt").image_shape_ == (1, 6, 6)


# ---------------------------------------------------------------------------- writes and folders
DISK_FULL = OSError(errno.ENOSPC, "No space left on device")


def no_temporary_files(folder) -> bool:
    return not [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


def test_atomic_file_replaces_the_file_only_when_complete(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with atomic_file(path, "report") as f:
        f.write(b"new")
        assert path.read_bytes() == b"old"  # not replaced while being written
    assert path.read_bytes() == b"new" and no_temporary_files(tmp_path)


@pytest.mark.parametrize("existed", [True, False])
def test_full_disk_leaves_no_temporary_file_and_the_old_file(tmp_path, failing_writes, existed):
    path = tmp_path / "model.pt"
    if existed:
        atomic_save({"w": torch.zeros(3)}, path)
    old = path.read_bytes() if existed else None
    failing_writes(DISK_FULL)
    with pytest.raises(OSError) as info:  # torch's RuntimeError ("unexpected pos ...") is reported as its cause
        atomic_save({"w": torch.randn(10_000)}, path)
    assert info.value.errno == errno.ENOSPC
    earlier = "the earlier file is unchanged" if existed else "nothing was written"
    assert str(info.value) == f"cannot write the model file {path}: No space left on device ({earlier})"
    assert no_temporary_files(tmp_path)
    assert (path.read_bytes() == old) if existed else not path.exists()


def test_ctrl_c_in_a_write_leaves_no_temporary_file(tmp_path, failing_writes):
    path = tmp_path / "report.json"
    path.write_bytes(b"{}")
    failing_writes(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt, match=f"while writing the report {path} \\(the earlier file is unchanged\\)"):
        with atomic_file(path, "report") as f:
            f.write(b"x" * 1000)
    assert path.read_bytes() == b"{}" and no_temporary_files(tmp_path)


def test_other_errors_pass_through_and_leave_no_temporary_file(tmp_path):
    with pytest.raises(TypeError, match="not plain"):
        with atomic_file(tmp_path / "f.bin", "report") as f:
            f.write(b"partial")
            raise TypeError("not plain")
    assert list(tmp_path.iterdir()) == []


def test_a_write_in_a_read_only_folder_names_the_file(tmp_path, read_only):
    (tmp_path / "ro").mkdir()
    folder = read_only(tmp_path / "ro")
    with pytest.raises(PermissionError, match=f"cannot write the model file {folder / 'm.pt'}: Permission denied"):
        atomic_save({"w": torch.zeros(2)}, folder / "m.pt")
    with pytest.raises(PermissionError, match=f"checkpoint_dir='{folder}/ck': cannot write in {folder}"):
        CheckpointStore(folder / "ck", "c.pt", {}).open()


@pytest.mark.parametrize("where", ["a_file", "a_file/below"])
def test_a_checkpoint_folder_that_cannot_be_made_is_refused_before_any_work(tmp_path, where, monkeypatch):
    (tmp_path / "a_file").write_text("")
    folder = tmp_path / where
    monkeypatch.setattr(ConvRFM, "_prepare", lambda *a, **k: pytest.fail("prepared data before the check"))
    with pytest.raises(NotADirectoryError, match=f"checkpoint_dir='{folder}': {tmp_path / 'a_file'} is a file, "
                       "not a folder"):
        ConvRFM(checkpoint_dir=folder).fit(np.zeros((10, 1, 8, 8)), np.arange(10) % 2)


def test_an_unwritable_checkpoint_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """What a read-only folder does where chmod cannot make one (as root): the probe write fails."""
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(persistence.tempfile, "TemporaryFile", denied)
    monkeypatch.setattr(ConvRFM, "_prepare", lambda *a, **k: pytest.fail("prepared data before the check"))
    with pytest.raises(PermissionError, match=f"checkpoint_dir='{tmp_path}/new': cannot write in {tmp_path} "
                       r"\(Permission denied\)"):
        ConvRFM(checkpoint_dir=str(tmp_path / "new")).fit(np.zeros((10, 1, 8, 8)), np.arange(10) % 2)


def test_missing_checkpoint_folders_are_made_by_the_first_save(tmp_path):
    store = CheckpointStore(tmp_path / "a" / "b", "c.pt", {"penalty": 1.0}).open()
    assert not (tmp_path / "a").exists()  # checking creates nothing
    store.save("fp", 3, {"x": torch.ones(2)})
    again = CheckpointStore(tmp_path / "a" / "b", "c.pt", {"penalty": 1.0}).open()
    assert again.seed == 3 and torch.equal(again.load("fp")["x"], torch.ones(2))


def test_checkpoint_of_another_fit_names_what_differs(tmp_path):
    CheckpointStore(tmp_path, "c.pt", {"penalty": 1.0, "stride": 1}).open().save("fp", 0, {})
    saved = (tmp_path / "c.pt").read_bytes()
    with pytest.raises(CheckpointMismatch) as info:
        CheckpointStore(tmp_path, "c.pt", {"penalty": 2.0, "stride": 1, "pool_window": 3}).open()
    assert info.value.changed == {"penalty": (1.0, 2.0), "pool_window": ("(unset)", 3)}
    assert str(info.value) == (f"checkpoint_dir={str(tmp_path)!r}: {tmp_path / 'c.pt'} is the checkpoint of another "
                               "fit (made with other parameters: penalty 1.0 there, 2.0 now, pool_window '(unset)' "
                               f"there, 3 now); use another checkpoint_dir, or remove the folder {tmp_path} to start over")
    store = CheckpointStore(tmp_path, "c.pt", {"penalty": 1.0, "stride": 1}).open()
    with pytest.raises(CheckpointMismatch, match="made with other data"):
        store.load("other")
    assert (tmp_path / "c.pt").read_bytes() == saved


def test_full_disk_during_a_fit_names_the_checkpoint(tmp_path, failing_writes):
    failing_writes(DISK_FULL)
    X, y = np.random.default_rng(0).random((20, 1, 8, 8)), np.arange(20) % 2
    model = ConvRFM(iterations=0, solver="exact", checkpoint_dir=tmp_path, random_state=0, progress=False)
    with pytest.raises(OSError, match=f"cannot write the checkpoint {tmp_path / 'convrfm_checkpoint.pt'}: "
                       "No space left on device"):
        model.fit(X, y)
    assert list(tmp_path.iterdir()) == []
