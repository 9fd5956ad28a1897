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
