"""The artifact as a user meets it: it describes its input and predicts from raw images, and each
encoding gives back exactly the tensor it was given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lightning_modules.data import InMemoryDataModule
from lightning_modules.evaluation.artifact import decode_tensor, encode_tensor, load_artifact, save_deployable
from lightning_modules.models import build_model, model_recipe


@pytest.fixture(scope="module")
def digits() -> InMemoryDataModule:
    data = InMemoryDataModule("digits")
    data.setup()
    return data


def test_the_artifact_predicts_from_raw_pixels_as_the_model_does_from_its_normalised_input(
        tmp_path: Path, digits: InMemoryDataModule) -> None:
    net = OmegaConf.create({"_target_": "lightning_modules.models.LeNet5"})
    model = build_model(net, digits.shape).eval()
    save_deployable(model, tmp_path / "model.pt", model_recipe(net, digits.shape), digits.input_spec)
    artifact = load_artifact(tmp_path / "model.pt")
    raw, _ = digits.raw_test
    assert raw.max() == 16.0  # digits' own pixel scale, not [0, 1]
    with torch.no_grad():
        expected = torch.softmax(model(digits.split("test").tensors[0]), dim=1).numpy()
    assert np.array_equal(artifact.predict(raw), expected)
    assert artifact.input_spec.class_names == tuple(str(label) for label in range(10))
    assert artifact.predict(raw[0, 0]).shape == (1, 10)  # one (H, W) image
    with pytest.raises(ValueError, match=r"raw images of shape \(2, 1, 9, 9\); this model takes \(N, 1, 8, 8\)"):
        artifact.predict(np.zeros((2, 1, 9, 9)))


@pytest.mark.parametrize("tensor, encoding", [
    (torch.zeros(64, dtype=torch.int32), "constant"),                  # a symmetric scheme's bias zero points
    (torch.full((7, 3), 0.5), "constant"),
    (torch.arange(-3000, 3000, dtype=torch.int32), "packed"),          # int32 bias codes: 13 bits, not 32
    (torch.tensor([2**40, 0, 1, 5, 9, 11, 12, 13], dtype=torch.int64), "dense"),  # a range over 32 bits
    (torch.randint(-8, 8, (100,), dtype=torch.int8), "packed"),        # 4-bit codes
])
def test_each_encoding_gives_back_the_tensor_exactly(tensor: torch.Tensor, encoding: str) -> None:
    encoded = encode_tensor(tensor)
    assert encoded["encoding"] == encoding
    decoded = decode_tensor(encoded)
    assert decoded.dtype == tensor.dtype and torch.equal(decoded, tensor)
