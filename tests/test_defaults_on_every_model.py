"""Every method's shipped config is valid on every shipped model and data set: the layer names its
defaults give resolve on that model, before any run opens (issue 12: a default that names a layer
only LeNet-5 has failed on resnet20 after its training had started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_modules.config import validate
from tests.conftest import CONF, compose_config

METHODS = sorted(path.stem for path in (Path(CONF) / "method").glob("*.yaml"))
MODELS = sorted(path.stem for path in (Path(CONF) / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_shipped_method_config_validates_on_every_model(method: str, model: str) -> None:
    validate(compose_config(["data=digits", f"model={model}", f"method={method}"]))
