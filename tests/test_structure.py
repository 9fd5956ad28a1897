"""The imports run one way: every module imports on its own, and compression/ reaches no pipeline module.

compression/ may import base.py, the shared layers.py and deployable_int8.py, data.py and torch; the
pipeline (evaluation/, tracking, experiment, sweep) imports compression/, never the other way round.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

PACKAGE = ROOT / "lightning_modules"
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py")
)
FORBIDDEN_IN_COMPRESSION = ("lightning_modules.evaluation", "lightning_modules.tracking",
                            "lightning_modules.experiment", "lightning_modules.sweep")


# One interpreter loads the heavy third-party packages once, then forks a child per module that
# imports that module first: a fresh interpreter as far as the workbench is concerned, in seconds
# instead of minutes (a process per module pays torch's import each time).
FIRST_IMPORTS = r"""
import importlib, json, os, sys, traceback
for name in ("torch", "torchvision", "pytorch_lightning", "hydra", "omegaconf", "mlflow", "numpy", "pandas",
             "scipy", "matplotlib", "seaborn", "onnx", "onnxruntime", "onnxscript"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
assert not any(name.startswith("lightning_modules") for name in sys.modules)
results = {}
for module in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            message = ""
        except BaseException:
            message = traceback.format_exc()[-3000:] or "failed"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        results[module] = pipe.read()
    os.waitpid(pid, 0)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def first_import_errors() -> dict[str, str]:
    result = subprocess.run([sys.executable, "-c", FIRST_IMPORTS, *MODULES], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_first_in_a_fresh_interpreter(module: str, first_import_errors: dict[str, str]) -> None:
    # an import cycle shows only when the module is the first of the workbench imported
    assert first_import_errors[module] == "", first_import_errors[module]


def _imported_modules(path: Path) -> list[str]:
    """Every module a file imports, at its top or inside a function."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "compression").glob("*.py")), ids=lambda p: p.name)
def test_compression_imports_no_pipeline_module(path: Path) -> None:
    wrong = sorted({name for name in _imported_modules(path)
                    if any(name == f or name.startswith(f"{f}.") for f in FORBIDDEN_IN_COMPRESSION)})
    assert not wrong, f"{path.name} imports {wrong}: compression/ must not reach the pipeline (receive it instead)"


def test_the_import_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from lightning_modules.evaluation.latency import measure_latency\n")
    assert "lightning_modules.evaluation.latency" in _imported_modules(sample)


# ----------------------------------------------------------------------------- the shared kit (compression/base.py)


def test_check_number_names_key_value_and_the_allowed_range() -> None:
    from lightning_modules.compression.base import check_number

    assert check_number("bits", 4, 1, 8, integer=True) == 4 and check_number("x", None, 0, optional=True) is None
    for value, kwargs, message in [
        (0, {"low": 1, "high": 8, "integer": True}, "bits=0 is not valid; allowed: an integer in 1..8"),
        (1.0, {"low": 0, "high": 1, "bounds": "[)", "noun": "a fraction"}, "bits=1.0 is not valid; allowed: a fraction in [0, 1)"),
        (True, {"low": 0}, "bits=True is not valid; allowed: a number >= 0"),
        (-1, {"low": 0, "integer": True, "optional": True}, "bits=-1 is not valid; allowed: an integer >= 0 or null"),
    ]:
        with pytest.raises(ValueError) as error:
            check_number("bits", value, **kwargs)
        assert str(error.value) == message


def test_every_family_reads_skip_layers_alike_first_last_and_unknown_names() -> None:
    from lightning_modules.compression.base import select_layers
    from lightning_modules.models import LeNet5

    targets, skipped = select_layers(LeNet5(1, 8, 10), ["first", "last"])
    assert skipped == {"features.0": "listed in skip_layers as 'first'", "classifier.5": "listed in skip_layers as 'last'"}
    assert [name for name, _ in targets] == ["features.3", "classifier.1", "classifier.3"]
    with pytest.raises(ValueError, match=r"skip_layers has unknown layers \['fc9'\]; allowed: first, last, features.0, "):
        select_layers(LeNet5(1, 8, 10), ["fc9"])


def test_quantization_skip_layers_takes_the_aliases_and_refuses_unknown_names() -> None:
    from lightning_modules.compression.quantization import PTQDynamic
    from lightning_modules.models import LeNet300

    callback = PTQDynamic(skip_layers=["last"])
    callback.finalize(LeNet300(1, 8, 10))
    assert callback.skipped["classifier.5"] == "listed in skip_layers as 'last'"
    with pytest.raises(ValueError, match=r"skip_layers has unknown layers \['fc9'\]"):
        PTQDynamic(skip_layers=["fc9"]).finalize(LeNet300(1, 8, 10))


def test_channel_pruning_takes_first_and_last_among_its_producer_layers() -> None:
    from lightning_modules.compression.pruning import ChannelPruning
    from lightning_modules.models import LeNet5

    callback = ChannelPruning(0.5, skip_layers=["first"])
    callback.analyse(LeNet5(1, 8, 10), torch.zeros(1, 1, 8, 8))
    assert "listed in skip_layers as 'first'" in callback.skipped.values()
