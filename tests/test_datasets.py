"""Dataset loaders on small files written in each real format, preprocessing, synthetic data, splits."""
import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from falkon_convrfm.datasets import (
    FASHION_MNIST_CLASSES,
    ImageDataset,
    Preprocessor,
    load_cifar,
    load_dataset,
    load_image_folder,
    load_mnist,
    load_npz,
    load_svhn,
    make_local_signal,
    train_val_split,
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
    floats = rng.normal(size=(4, 3, 5, 3)).astype(np.float32)  # auto: CHW (the second axis is 3)
    np.savez(tmp_path / "f.npz", images=floats, labels=np.zeros(4, np.int64))
    assert load_npz(tmp_path / "f.npz").images.shape == (4, 3, 5, 3)
    explicit = load_npz(tmp_path / "f.npz", layout="hwc", dtype=torch.float64)
    assert explicit.images.dtype == torch.float64
    np.testing.assert_allclose(explicit.images.numpy(), floats.transpose(0, 3, 1, 2))  # floats are not rescaled


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="x.npz: missing key 'labels' \\(found: 'images'\\)"):
        load_npz(tmp_path / "x.npz")
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 5, 6, 7)), labels=[0, 1])
    with pytest.raises(ValueError, match="cannot tell the channel axis"):
        load_npz(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="layout"):
        load_npz(tmp_path / "x.npz", layout="nhwc")
    (tmp_path / "x.npz").write_bytes(b"PK not really a zip")
    with pytest.raises(ValueError, match="x.npz: not a valid npz file"):
        load_npz(tmp_path / "x.npz")


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


# ---------------------------------------------------------------------------- preprocessing
def test_standardize_per_channel_and_reuse_of_train_statistics():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (50, 3, 4, 4), dtype=np.uint8)
    pre = Preprocessor()
    out = pre.fit_transform(train)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-5, rtol=0)
    new = torch.rand(5, 3, 4, 4, dtype=torch.float64)  # floats are not rescaled, dtype kept
    x = train / 255.0
    mean, std = x.mean((0, 2, 3), keepdims=True), x.std((0, 2, 3), keepdims=True)
    expected = (new.numpy() - mean) / std
    np.testing.assert_allclose(pre.transform(new).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert Preprocessor(standardize=False).fit_transform(train).max() <= 1


def test_zca_whitens_train_covariance():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(32, 32))
    x = torch.from_numpy((rng.normal(size=(4000, 32)) @ mixing).reshape(-1, 2, 4, 4))
    out = Preprocessor(standardize=False, zca=True, zca_eps=1e-8).fit_transform(x).reshape(len(x), -1)
    centred = out - out.mean(0)
    torch.testing.assert_close(centred.T @ centred / len(x), torch.eye(32, dtype=torch.float64), atol=1e-5, rtol=0)
    damped = Preprocessor(zca=True, zca_eps=1.0).fit_transform(x).reshape(len(x), -1)
    assert torch.linalg.eigvalsh(damped.T.cov(correction=0)).max() < 1  # the ridge shrinks every direction


def test_preprocessor_state_dict_round_trip():
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(100, 2, 3, 3)), rng.normal(size=(7, 2, 3, 3))
    pre = Preprocessor(zca=True).fit(train)
    buffer = io.BytesIO()
    torch.save(pre.state_dict(), buffer)
    buffer.seek(0)
    restored = Preprocessor.from_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.transform(test), pre.transform(test))
    with pytest.raises(ValueError, match="lacks keys"):
        Preprocessor.from_state_dict({"scale": True})


def test_preprocessor_errors():
    with pytest.raises(RuntimeError, match="not fitted"):
        Preprocessor().transform(np.zeros((1, 1, 2, 2)))
    pre = Preprocessor().fit(np.ones((4, 1, 2, 2)))  # a constant channel is only centred
    assert pre.transform(np.ones((1, 1, 2, 2))).eq(0).all()
    with pytest.raises(ValueError, match="fitted on"):
        pre.transform(np.zeros((1, 1, 3, 3)))
    with pytest.raises(ValueError, match=r"\(n, c, H, W\)"):
        pre.fit(np.zeros((4, 2, 2)))
    with pytest.raises(ValueError, match="zca_eps"):
        Preprocessor(zca_eps=0)


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


# ---------------------------------------------------------------------------- splits
def test_train_val_split():
    train, val = train_val_split(100, 0.2, random_state=0)
    assert train.dtype == val.dtype == torch.int64 and len(val) == 20
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(100))
    assert torch.equal(val, train_val_split(100, 20, random_state=0)[1])
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    _, val = train_val_split(100, 10, random_state=1, labels=labels)
    assert np.bincount(labels[val.numpy()]).tolist() == [5, 3, 2]
    _, val = train_val_split(100, 7, random_state=1, labels=labels)
    assert len(val) == 7
    with pytest.raises(ValueError, match="between 1 and n - 1"):
        train_val_split(10, 10)
    with pytest.raises(ValueError, match="fraction"):
        train_val_split(10, 1.5)
