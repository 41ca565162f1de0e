"""Train-fitted preprocessing (standardisation, ZCA, state dicts) and the train/validation split."""
import io

import numpy as np
import pytest
import torch

from falkon_convrfm.inputs import train_val_split
from falkon_convrfm.preprocessing import Preprocessor, zca_whitening


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


def test_train_val_split_without_validation():
    for empty in (0, 0.0, np.int64(0)):
        train, val = train_val_split(7, empty, random_state=0, labels=np.arange(7) % 2)
        assert torch.equal(train, torch.arange(7)) and train.dtype == torch.int64
        assert val.dtype == torch.int64 and val.numel() == 0


def test_train_val_split_random_state_and_labels():
    train, val = train_val_split(50, 0.3, random_state=4)
    again = train_val_split(50, 0.3, random_state=np.random.default_rng(4))
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert torch.equal(val, val.sort().values) and torch.equal(train, train.sort().values)
    rng = np.random.default_rng(0)  # a Generator is advanced: two draws differ
    assert not torch.equal(train_val_split(50, 10, rng)[1], train_val_split(50, 10, rng)[1])
    labels = torch.tensor([0] * 30 + [1] * 20)
    _, val = train_val_split(50, 10, random_state=0, labels=labels)
    assert labels[val].bincount().tolist() == [6, 4]
    _, val = train_val_split(6, 2, random_state=0, labels=np.array(["a", "b", "a", "b", "a", "b"]))
    assert len(val) == 2 and len({i % 2 for i in val.tolist()}) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=10, val_size=True), "val_size must be an int or a fraction"),
        (dict(n=10, val_size=-1), "between 1 and n - 1"),
        (dict(n=10, val_size=0.01), r"val_size=0.01 gives 0 validation items"),
        (dict(n=10, val_size=float("nan")), "fraction"),
        (dict(n=0, val_size=0), "n must be an integer >= 1"),
        (dict(n=10, val_size=2, random_state=-1), "random_state must be an integer >= 0"),
        (dict(n=10, val_size=2, random_state=1.5), "random_state"),
        (dict(n=10, val_size=2, random_state=np.random.RandomState(0)), "random_state"),
        (dict(n=10, val_size=2, labels=[0, 1]), "labels must have n = 10 entries"),
    ],
)
def test_train_val_split_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_val_split(**kwargs)


def test_zca_whitening_mean_and_symmetric_matrix():
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(300, 6)) * [1, 2, 3, 4, 5, 6] + 1.5)
    mean, W = zca_whitening(x, eps=1e-10, rows_per_chunk=7)  # chunking does not change the result
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(W, W.T)
    torch.testing.assert_close(W @ W, torch.cov(x.T, correction=0).inverse())  # W² = C⁻¹ as ε → 0


@pytest.mark.parametrize(
    "settings", [dict(), dict(standardize=False), dict(zca=True, zca_eps=0.5), dict(standardize=False, zca=True)]
)
def test_preprocessor_state_dict_is_plain_data_for_weights_only_load(settings, tmp_path):
    rng = np.random.default_rng(3)
    train, test = rng.integers(0, 256, (40, 2, 3, 3), dtype=np.uint8), rng.normal(size=(5, 2, 3, 3))
    for pre in (Preprocessor(**settings), Preprocessor(**settings).fit(train)):
        state = pre.state_dict()
        assert all(v is None or isinstance(v, (bool, float, list, torch.Tensor)) for v in state.values())
        torch.save(state, tmp_path / "pre.pt")
        restored = Preprocessor.from_state_dict(torch.load(tmp_path / "pre.pt", weights_only=True))
        assert restored.state_dict().keys() == state.keys() and restored.shape == pre.shape
        if pre.shape is not None:
            assert torch.equal(restored.transform(test), pre.transform(test))


def test_preprocessor_state_dict_checked():
    state = Preprocessor(zca=True).fit(np.random.default_rng(0).normal(size=(20, 1, 2, 2))).state_dict()
    with pytest.raises(ValueError, match=r"'zca_matrix' must be a float tensor of shape \(4, 4\), got \(3, 3\)"):
        Preprocessor.from_state_dict({**state, "zca_matrix": torch.eye(3)})
    with pytest.raises(ValueError, match="'mean' must be a float tensor of shape \\(1,\\), got list"):
        Preprocessor.from_state_dict({**state, "mean": [0.0]})
    with pytest.raises(ValueError, match=r"'shape' must be None or \[c, H, W\]"):
        Preprocessor.from_state_dict({**state, "shape": [1, 2]})
    with pytest.raises(ValueError, match=r"must be bools, got \{'zca': 'False'\}"):
        Preprocessor.from_state_dict({**state, "zca": "False"})
    with pytest.raises(ValueError, match="zca_eps must be a positive finite number"):
        Preprocessor.from_state_dict({**state, "zca_eps": -1.0})
