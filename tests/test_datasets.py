"""Dataset loaders on small files written in each real format, preprocessing, synthetic data, splits."""
import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from falkon_convrfm.datasets import (
    FASHION_MNIST_CLASSES,
    ImageDataset,
    load_cifar,
    load_dataset,
    load_image_folder,
    load_mnist,
    load_npz,
    load_svhn,
    make_local_signal,
)

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_train.npz"


def check_images(ds: ImageDataset, shape, dtype=torch.float32):
    assert isinstance(ds, ImageDataset)
    assert tuple(ds.images.shape) == shape and ds.images.dtype == dtype and ds.images.is_contiguous()
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (shape[0],)
    assert 0 <= ds.images.min() and ds.images.max() <= 1


# ---------------------------------------------------------------------------- CIFAR
def write_pickle(path: Path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar(root: Path, num_classes: int, n: int = 4, seed: int = 0) -> Path:
    """The distributed layout (bytes keys) with n images per batch; returns the batches folder."""
    rng = np.random.default_rng(seed)
    if num_classes == 10:
        folder, files, label_key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], b"labels"
        files.append("test_batch")
        meta = ("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072})
    else:
        folder, files, label_key = root / "cifar-100-python", ["train", "test"], b"fine_labels"
        meta = ("meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": []})
    folder.mkdir(parents=True)
    write_pickle(folder / meta[0], meta[1])
    for name in files:
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, num_classes, n).tolist(),
            b"filenames": [b"x.png"] * n,
        }
        if num_classes == 100:
            batch[b"coarse_labels"] = [0] * n
        write_pickle(folder / name, batch)
    return folder


def read_pickle(path: Path) -> dict:
    return pickle.loads(path.read_bytes(), encoding="bytes")


def test_cifar10_parent_and_batches_folder(tmp_path):
    folder = write_cifar(tmp_path, 10)
    ds = load_cifar(tmp_path)
    check_images(ds, (20, 3, 32, 32))
    first = read_pickle(folder / "data_batch_1")
    np.testing.assert_allclose(ds.images[:4].numpy() * 255, first[b"data"].reshape(4, 3, 32, 32), atol=1e-4)
    assert ds.labels[:4].tolist() == first[b"labels"]
    assert ds.classes == tuple(f"c{i}" for i in range(10))
    test = load_cifar(folder, train=False, dtype=torch.float64)
    check_images(test, (4, 3, 32, 32), torch.float64)
    assert test.labels.tolist() == read_pickle(folder / "test_batch")[b"labels"]


def test_cifar100(tmp_path):
    folder = write_cifar(tmp_path, 100)
    ds = load_cifar(tmp_path, train=False, num_classes=100)
    check_images(ds, (4, 3, 32, 32))
    assert ds.labels.tolist() == read_pickle(folder / "test")[b"fine_labels"]
    assert len(ds.classes) == 100 and ds.classes[7] == "f7"


def test_cifar_errors(tmp_path):
    folder = write_cifar(tmp_path, 10)
    with pytest.raises(ValueError, match="10 or 100"):
        load_cifar(tmp_path, num_classes=20)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar(tmp_path, num_classes=100)
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        load_cifar(tmp_path / "nowhere")
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar(tmp_path)
    write_pickle(folder / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(ValueError, match="data_batch_3: missing key 'labels'"):
        load_cifar(tmp_path)
    write_pickle(folder / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"\(N, 3072\) uint8"):
        load_cifar(tmp_path)
    write_pickle(folder / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(ValueError, match=r"labels must be \[0, 10\)"):
        load_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="data_batch_3: not a valid CIFAR pickle"):
        load_cifar(tmp_path)


def py2_pickle(obj) -> bytes:
    """``obj`` pickled as Python 2's cPickle (protocol 2) wrote the CIFAR batches: str as
    SHORT_BINSTRING / BINSTRING, arrays through numpy 1's ``numpy.core.multiarray._reconstruct``.
    Handles dicts, lists, ints, bytes and uint8 arrays."""

    def emit(o) -> bytes:
        if isinstance(o, dict):
            return b"}(" + b"".join(emit(k) + emit(v) for k, v in o.items()) + b"u"
        if isinstance(o, list):
            return b"](" + b"".join(emit(v) for v in o) + b"e"
        if isinstance(o, int):
            return b"J" + o.to_bytes(4, "little", signed=True)
        if isinstance(o, bytes):
            return (b"U" + bytes([len(o)]) if len(o) < 256 else b"T" + len(o).to_bytes(4, "little")) + o
        assert isinstance(o, np.ndarray) and o.dtype == np.uint8
        dtype = b"cnumpy\ndtype\n" + emit(b"u1") + emit(0) + emit(1) + b"\x87R(" + emit(3) + emit(b"|")
        dtype += b"NNN" + emit(-1) + emit(-1) + emit(0) + b"tb"
        shape = b"(" + b"".join(emit(d) for d in o.shape) + b"t"
        return (
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + emit(0) + b"\x85" + emit(b"b") + b"\x87R("
            + emit(1) + shape + dtype + b"\x89" + emit(o.tobytes()) + b"tb"
        )

    return b"\x80\x02" + emit(obj) + b"."


def test_cifar_python2_format(tmp_path):
    """Batches byte-for-byte in the distributed format (Python 2 pickles) load through the safe unpickler."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"class{i}".encode() for i in range(10)]
    meta = {b"num_cases_per_batch": 3, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [9, 0, 3],
        b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
        b"filenames": [b"a.png", b"b.png", b"c.png"],
    }
    (folder / "test_batch").write_bytes(py2_pickle(batch))
    assert read_pickle(folder / "test_batch")[b"labels"] == [9, 0, 3]  # the emitter writes valid pickles
    ds = load_cifar(tmp_path, train=False)
    check_images(ds, (3, 3, 32, 32))
    assert torch.equal(ds.images.mul(255).round().to(torch.uint8), torch.from_numpy(batch[b"data"]).view(3, 3, 32, 32))
    assert ds.labels.tolist() == [9, 0, 3] and ds.classes[9] == "class9"


class RunsShellCommand:
    """Unpickling this runs a shell command (what a crafted batch would do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("target", ["data_batch_1", "batches.meta"])
def test_cifar_malicious_pickle_does_not_run(tmp_path, protocol, target):
    folder = write_cifar(tmp_path / "data", 10)
    live, marker = tmp_path / "payload_is_live", tmp_path / "pwned"
    pickle.loads(pickle.dumps(RunsShellCommand(f"touch {live}"), protocol=protocol))  # plain pickle runs it
    assert live.exists()
    payload = {b"data": RunsShellCommand(f"touch {marker}"), b"labels": [0], b"label_names": []}
    (folder / target).write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(ValueError) as info:
        load_cifar(tmp_path / "data")
    message = str(info.value)
    assert not marker.exists()
    assert "\n" not in message and message.startswith(f"{folder / target}: not a valid CIFAR")
    assert f"refused global {os.system.__module__}.system" in message


def test_cifar_unpickler_admits_only_data(tmp_path):
    folder = write_cifar(tmp_path, 10)
    rot13 = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R."  # _codecs.encode('x', 'rot13')
    (folder / "data_batch_2").write_bytes(rot13)
    with pytest.raises(ValueError, match=r"data_batch_2: .*refused _codecs.encode\(str, 'rot13'\)"):
        load_cifar(tmp_path)
    write_pickle(folder / "data_batch_2", [1, 2])
    with pytest.raises(ValueError, match="data_batch_2: .*holds a list, expected a dict"):
        load_cifar(tmp_path)
    write_pickle(folder / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"cat", b"dog"]})
    with pytest.raises(ValueError, match="data_batch_2: labels must be integer class indices"):
        load_cifar(tmp_path)
    write_pickle(folder / "data_batch_2", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"e": b""})
    check_images(load_cifar(tmp_path), (17, 3, 32, 32))  # Python 3's protocol-2 bytes forms are admitted


# ---------------------------------------------------------------------------- SVHN
def write_svhn(path: Path, n: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.array([[10], [1], [2], [10], [9], [5]], dtype=np.uint8)[:n]
    savemat(path, {"X": X, "y": y})
    return X, y


def test_svhn_file_and_folder(tmp_path):
    X, y = write_svhn(tmp_path / "test_32x32.mat")
    ds = load_svhn(tmp_path / "test_32x32.mat")
    check_images(ds, (6, 3, 32, 32))
    assert ds.labels.tolist() == [0, 1, 2, 0, 9, 5]
    assert ds.classes == tuple("0123456789")
    np.testing.assert_allclose(ds.images[2, 1].numpy() * 255, X[:, :, 1, 2], atol=1e-4)
    assert torch.equal(load_svhn(tmp_path, split="test").images, ds.images)


def test_svhn_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_32x32.mat"):
        load_svhn(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_svhn(tmp_path, split="valid")
    savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(ValueError, match="missing key 'y'"):
        load_svhn(tmp_path)
    savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))})
    with pytest.raises(ValueError, match="expected 2 integer labels"):
        load_svhn(tmp_path)
    (tmp_path / "train_32x32.mat").write_bytes(b"garbage" * 20)
    with pytest.raises(ValueError, match="train_32x32.mat: not a valid MATLAB"):
        load_svhn(tmp_path)


def test_svhn_generated_file_in_the_exact_format(tmp_path):
    """X (32, 32, 3, n) uint8 and y (n, 1) uint8 in 1..10 (10 = digit 0), as in {split}_32x32.mat."""
    rng = np.random.default_rng(7)
    n = 40
    X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[:2, 0] = [10, 1]
    savemat(tmp_path / "extra_32x32.mat", {"X": X, "y": y})
    ds = load_dataset("svhn", tmp_path, split="extra")
    check_images(ds, (n, 3, 32, 32))
    assert torch.equal(ds.labels, torch.from_numpy(y[:, 0].astype(np.int64) % 10))
    assert ds.labels[:2].tolist() == [0, 1] and set(ds.labels.tolist()) <= set(range(10))
    pixels = ds.images.mul(255).round().to(torch.uint8)
    assert torch.equal(pixels, torch.from_numpy(X).permute(3, 2, 0, 1))  # (H, W, c, n) → (n, c, H, W)
    assert torch.equal(load_svhn(tmp_path / "extra_32x32.mat", dtype=torch.float64).images.float(), ds.images)


@pytest.mark.parametrize(
    "content, match",
    [
        ({"X": np.zeros((2, 32, 32, 3), np.uint8), "y": np.ones((2, 1))}, r"'X' must be an \(H, W, 3, N\) uint8"),
        ({"X": np.zeros((32, 32, 3, 2)), "y": np.ones((2, 1))}, r"'X' must be .* uint8 array, got float64"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [3]])}, r"labels must be \[1, 11\)"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[11], [3]])}, r"labels must be \[1, 11\)"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([["a"], ["b"]])}, "labels must be integer class"),
        ({"images": np.zeros((2, 3, 32, 32), np.uint8), "labels": np.ones(2)}, r"missing key 'X' \(found: 'images'"),
    ],
)
def test_svhn_wrong_format(tmp_path, content, match):
    savemat(tmp_path / "train_32x32.mat", content)
    with pytest.raises(ValueError, match=f"train_32x32.mat: {match}"):
        load_svhn(tmp_path)


# ---------------------------------------------------------------------------- MNIST
def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x0800 | array.ndim if magic is None else magic
    dims = np.array(array.shape, dtype=">u4").tobytes()
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, prefix: str = "train", n: int = 5, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in [(f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)]:
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_plain_folder(tmp_path, gz):
    images, labels = write_mnist(tmp_path, gz=gz)
    ds = load_mnist(tmp_path)
    check_images(ds, (5, 1, 28, 28))
    np.testing.assert_allclose(ds.images[:, 0].numpy() * 255, images, atol=1e-4)
    assert ds.labels.tolist() == labels.tolist() and ds.classes == tuple("0123456789")


def test_mnist_torchvision_layouts(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", prefix="t10k", gz=False, seed=1)
    _, fashion_labels = write_mnist(tmp_path / "FashionMNIST" / "raw", prefix="t10k", seed=2)
    check_images(load_mnist(tmp_path, train=False), (5, 1, 28, 28))
    fashion = load_dataset("fashion-mnist", tmp_path, split="test")
    assert fashion.labels.tolist() == fashion_labels.tolist() and fashion.classes == FASHION_MNIST_CLASSES
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path, train=True)


def test_mnist_errors(tmp_path):
    write_mnist(tmp_path, gz=False)
    images_file = tmp_path / "train-images-idx3-ubyte"
    good = images_file.read_bytes()
    images_file.write_bytes(good[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_mnist(tmp_path)
    images_file.write_bytes(good[:7])
    with pytest.raises(ValueError, match="truncated IDX header"):
        load_mnist(tmp_path)
    images_file.write_bytes(idx_bytes(np.zeros((5, 28, 28)), magic=2049))
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        load_mnist(tmp_path)
    images_file.write_bytes(good)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte.gz"):
        load_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5)))[:-12])
    with pytest.raises(ValueError, match="not a valid IDX file"):
        load_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4))))
    with pytest.raises(ValueError, match="expected 5 integer labels"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------------------- npz
def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(6) % 3
    np.savez(tmp_path / "hwc.npz", images=hwc, labels=labels, classes=np.array(["a", "b", "c"]))
    np.savez(tmp_path / "chw.npz", images=hwc.transpose(0, 3, 1, 2), labels=labels)
    np.savez(tmp_path / "grey.npz", images=hwc[..., 0], labels=labels)
    a, b = load_npz(tmp_path / "hwc.npz"), load_npz(tmp_path / "chw.npz")
    check_images(a, (6, 3, 8, 8))
    assert torch.equal(a.images, b.images) and a.labels.tolist() == labels.tolist()
    assert a.classes == ("a", "b", "c") and b.classes is None
    check_images(load_npz(tmp_path / "grey.npz"), (6, 1, 8, 8))
    floats = rng.normal(size=(4, 3, 5, 3)).astype(np.float32)  # auto: ambiguous (the estimators' rule)
    np.savez(tmp_path / "f.npz", images=floats, labels=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="cannot tell the channel axis"):
        load_npz(tmp_path / "f.npz")
    assert load_npz(tmp_path / "f.npz", layout="chw").images.shape == (4, 3, 5, 3)
    explicit = load_npz(tmp_path / "f.npz", layout="hwc", dtype=torch.float64)
    assert explicit.images.dtype == torch.float64
    np.testing.assert_allclose(explicit.images.numpy(), floats.transpose(0, 3, 1, 2))  # floats are not rescaled


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="x.npz: missing key 'labels' \\(found: 'images'\\)"):
        load_npz(tmp_path / "x.npz")
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4, 3)), labels=[0, 1])  # small: H, W <= 4
    with pytest.raises(ValueError, match="cannot tell the channel axis"):
        load_npz(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="layout"):
        load_npz(tmp_path / "x.npz", layout="nhwc")
    (tmp_path / "x.npz").write_bytes(b"PK not really a zip")
    with pytest.raises(ValueError, match="x.npz: not a valid npz file"):
        load_npz(tmp_path / "x.npz")


def test_npz_float_channels_last_detected(tmp_path):
    floats = np.random.default_rng(1).normal(size=(5, 32, 32, 3)).astype(np.float32)
    np.savez(tmp_path / "f.npz", images=floats, labels=np.arange(5) % 2, classes=np.array([b"cat", b"dog"]))
    ds = load_npz(tmp_path / "f.npz")
    assert ds.images.shape == (5, 3, 32, 32) and ds.classes == ("cat", "dog")
    np.testing.assert_array_equal(ds.images.numpy(), floats.transpose(0, 3, 1, 2))


@pytest.mark.parametrize(
    "arrays, match",
    [
        (
            dict(images=np.zeros((2, 3, 6, 3)), labels=[0, 1]),
            r"cannot tell the channel axis .* pass load_npz\(\.\.\., layout='hwc'\) .*--layout",
        ),
        (dict(images=np.zeros((2, 3, 5, 5)), labels=np.array(["cat", "dog"])), "labels must be integer class indices"),
        (dict(images=np.zeros((2, 3, 5, 5)), labels=[0, 2], classes=np.array(["a", "b"])), r"labels must be \[0, 2\)"),
        (dict(images=np.zeros((2, 3, 5, 5)), labels=[0, 1], classes=np.eye(2)), "'classes' must be a 1-d array"),
        (dict(images=np.zeros((2, 3, 5, 5), np.complex64), labels=[0, 1]), "images must hold integers or floats"),
        (dict(images=np.full((2, 3, 5, 5), "x"), labels=[0, 1]), "images must hold integers or floats"),
    ],
)
def test_npz_content_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "x.npz", **arrays)
    with pytest.raises(ValueError, match=f"x.npz: {match}") as info:
        load_npz(tmp_path / "x.npz")
    assert "\n" not in str(info.value)


def test_npz_foreign_files_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = np.empty(2, dtype=object)
    evil[:] = [RunsShellCommand(f"touch {marker}"), 0]
    np.savez(tmp_path / "evil.npz", images=evil, labels=[0, 1])  # an object array is stored pickled
    with pytest.raises(ValueError, match="evil.npz: not a valid npz file .*allow_pickle=False"):
        load_npz(tmp_path / "evil.npz")
    assert not marker.exists()
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 5, 5)))
    with pytest.raises(ValueError, match=r"a.npy: not a valid npz file .*single \.npy array"):
        load_npz(tmp_path / "a.npy")
    torch.save({"state": torch.zeros(3)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="model.pt: not a valid npz file .*torch.save file"):
        load_npz(tmp_path / "model.pt")
    (tmp_path / "text.npz").write_text("hello, not an archive\n")  # numpy alone reads it as pickled data
    with pytest.raises(ValueError, match=r"text.npz: not a valid npz file .*not an \.npz archive .*truncated or damaged"):
        load_npz(tmp_path / "text.npz")
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(ValueError, match="folder.npz: not a valid npz file .*a folder, not a file"):
        load_npz(tmp_path / "folder.npz")
    np.savez(tmp_path / "ok.npz", images=np.zeros((2, 3, 5, 5)), labels=[0, 1])
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        load_npz(tmp_path / "ok.npz", dtype=torch.int64)


@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="shared CIFAR-10 npz not present")
def test_shared_cifar10_npz():
    ds = load_dataset("npz", SHARED_CIFAR)
    check_images(ds, (50000, 3, 32, 32))
    assert ds.classes[0] == "airplane" and ds.labels.bincount().tolist() == [5000] * 10


# ---------------------------------------------------------------------------- image folder
def write_png(path: Path, array: np.ndarray):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_rgb_grey_resize(tmp_path):
    rng = np.random.default_rng(0)
    red = np.zeros((6, 5, 3), np.uint8)
    red[..., 0] = 255
    write_png(tmp_path / "rgb" / "b_cls" / "1.png", red)
    write_png(tmp_path / "rgb" / "a_cls" / "1.png", rng.integers(0, 256, (6, 5), dtype=np.uint8))
    (tmp_path / "rgb" / "a_cls" / "notes.txt").write_text("not an image")
    ds = load_image_folder(tmp_path / "rgb")
    check_images(ds, (2, 3, 6, 5))
    assert ds.classes == ("a_cls", "b_cls") and ds.labels.tolist() == [0, 1]
    assert ds.images[1, 0].eq(1).all() and ds.images[1, 1:].eq(0).all()
    for i in range(3):
        write_png(tmp_path / "grey" / str(i % 2) / f"{i}.png", rng.integers(0, 256, (7, 9), dtype=np.uint8))
    grey = load_dataset("folder", tmp_path / "grey", size=4)
    check_images(grey, (3, 1, 4, 4))
    assert grey.labels.tolist() == [0, 0, 1]
    write_png(tmp_path / "rgb" / "b_cls" / "2.png", red[:4])
    with pytest.raises(ValueError, match="2.png: size .* pass size="):
        load_image_folder(tmp_path / "rgb")
    check_images(load_image_folder(tmp_path / "rgb", size=(3, 2)), (3, 3, 3, 2))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "cls").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_image_folder(tmp_path)
    (tmp_path / "cls" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="broken.png: not a valid image file"):
        load_image_folder(tmp_path)
    write_png(tmp_path / "cls" / "broken.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="size must be"):
        load_image_folder(tmp_path, size=(1, 2, 3))


def test_load_dataset_dispatch(tmp_path):
    write_cifar(tmp_path, 10)
    check_images(load_dataset("CIFAR10", tmp_path, split="test"), (4, 3, 32, 32))
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_dataset("cifar10", tmp_path, split="val")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="dataset 'cifar10' takes the options dtype; got layout"):
        load_dataset("cifar10", tmp_path, layout="hwc")
    with pytest.raises(ValueError, match="unknown dataset None"):
        load_dataset(None, tmp_path)


# ---------------------------------------------------------------------------- synthetic task
def plus_and_cross(k: int = 5):
    plus = np.zeros((k, k))
    plus[k // 2] = plus[:, k // 2] = 1
    cross = np.maximum(np.eye(k), np.eye(k)[::-1])
    return plus, cross


def find_pattern(image: np.ndarray, k: int = 5) -> np.ndarray:
    """The k×k window of a noise-free image holding all its non-zero pixels."""
    rows, cols = np.nonzero(image)
    return image[rows.min() : rows.min() + k, cols.min() : cols.min() + k]


def test_local_signal_shapes_balance_and_determinism():
    X, y = make_local_signal(101, channels=3, random_state=0)
    assert X.shape == (101, 3, 16, 16) and X.dtype == torch.float32 and y.dtype == torch.int64
    assert sorted(y.bincount().tolist()) == [50, 51]
    X2, y2 = make_local_signal(101, channels=3, random_state=np.random.default_rng(0))
    assert torch.equal(X, X2) and torch.equal(y, y2)
    assert not torch.equal(X, make_local_signal(101, channels=3, random_state=1)[0])
    assert make_local_signal(4, image_size=9, dtype=torch.float64, random_state=0)[0].shape == (4, 1, 9, 9)


def test_local_signal_pattern_is_present():
    plus, cross = plus_and_cross()
    X, y = make_local_signal(40, noise=0.0, channels=2, random_state=3)
    for image, label in zip(X.numpy(), y.tolist()):
        assert np.array_equal(image[0], image[1]) and image.sum() == 2 * 9
        assert np.array_equal(find_pattern(image[0]), plus if label == 0 else cross)
    X, y = make_local_signal(40, noise=0.0, kind="present_vs_absent", random_state=3)
    assert X[y == 0].eq(0).all()
    assert all(np.array_equal(find_pattern(image[0]), plus) for image in X[y == 1].numpy())
    noisy, _ = make_local_signal(2000, noise=0.5, random_state=0)
    assert abs(noisy.std().item() - 0.5) < 0.05


def test_local_signal_errors():
    with pytest.raises(ValueError, match="kind"):
        make_local_signal(10, kind="circle")
    with pytest.raises(ValueError, match="odd pattern_size"):
        make_local_signal(10, pattern_size=4)


@pytest.mark.parametrize("shape, chw_shape", [((2, 5, 6, 7), (2, 5, 6, 7)), ((2, 8, 8, 3), (2, 3, 8, 8)),
                                              ((2, 3, 8, 8), (2, 3, 8, 8))])
def test_npz_layout_rule_is_the_estimators(tmp_path, shape, chw_shape):
    """npz files and the estimators read a 4-D shape the same way (one rule)."""
    from falkon_convrfm.inputs import channels_last_layout

    np.savez(tmp_path / "x.npz", images=np.zeros(shape, np.float32), labels=[0, 1])
    assert load_npz(tmp_path / "x.npz").images.shape == chw_shape
    assert channels_last_layout(shape) is (chw_shape != shape)
