from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch

from lightning_modules.data import InMemoryDataModule


def _labels(data: InMemoryDataModule, split: str) -> np.ndarray:
    return data.split(split).tensors[1].numpy()


def test_digits_splits_are_stratified_and_cover_the_set() -> None:
    data = InMemoryDataModule("digits", val_size=0.1, test_size=0.3)
    sizes = {split: len(data.split(split)) for split in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == round(0.3 * 1797)
    test_share = np.bincount(_labels(data, "test"), minlength=10) / sizes["test"]
    train_share = np.bincount(_labels(data, "train"), minlength=10) / sizes["train"]
    assert np.abs(test_share - train_share).max() < 0.01
    assert data.shape.in_channels == 1 and data.shape.image_size == 8 and data.shape.num_classes == 10


def test_mnist5k_holds_out_1000_test_images_normalised_with_train_statistics() -> None:
    data = InMemoryDataModule("mnist5k", val_size=500, test_size=1000)
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [3500, 500, 1000]
    assert np.bincount(_labels(data, "test")).tolist() == [100] * 10
    train_images = data.split("train").tensors[0]
    assert abs(float(train_images.mean())) < 1e-3 and abs(float(train_images.std()) - 1) < 1e-2
    assert data.shape.image_size == 28


def test_the_split_does_not_depend_on_the_run_seed() -> None:
    torch.manual_seed(1)
    first = InMemoryDataModule("digits").split("test").tensors[0]
    torch.manual_seed(2)
    second = InMemoryDataModule("digits").split("test").tensors[0]
    assert torch.equal(first, second)


def test_unknown_dataset_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="data.name='svhn' is not a known dataset; allowed: mnist5k, digits"):
        InMemoryDataModule("svhn")


def test_offline_torchvision_download_says_where_to_put_the_files(tmp_path, monkeypatch) -> None:
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    data = InMemoryDataModule("mnist", root=tmp_path)
    with pytest.raises(RuntimeError, match=r"Could not load or download MNIST .*Offline, put .*MNIST/raw"):
        data.setup()
