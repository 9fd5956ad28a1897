"""Nothing the workbench loads runs code from the file: every entry point refuses a malicious pickle
(one whose unpickling would write a marker file) with an error naming the file, and the marker never
appears; a damaged artifact, or one whose description names something it may not build, is refused
with a clear error too."""

from __future__ import annotations

import json
import pickletools
import struct
import zipfile
import zlib
from pathlib import Path

import mlflow
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lightning_modules.analysis import load_run_models
from lightning_modules.architecture import ModelRecipe
from lightning_modules.data import InMemoryDataModule
from lightning_modules.evaluation.artifact import (
    FORMAT, MAGIC, ArtifactError, NotAnArtifact, load_artifact, read_header, save_deployable,
)
from lightning_modules.experiment import load_teacher_file
from lightning_modules.models import LeNet5
from tests.conftest import FAST, all_runs, run_train


class WritesMarker:
    """Unpickling this calls exec, which writes `marker`: what a hostile teammate's file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def malicious_artifact(path: Path, marker: Path) -> Path:
    """A file shaped like the workbench's old pickled artifact, carrying the payload as its skeleton."""
    torch.save({"format": "compression-workbench/deployable-v1", "skeleton": WritesMarker(marker), "state": {}}, path)
    return path


def test_the_malicious_file_really_calls_exec_when_unpickled(tmp_path: Path) -> None:
    # the check the other tests rely on: this file does what it claims when trusted. Read, never run:
    # its pickle program pushes builtins.exec and calls it (REDUCE) with the code that writes the marker
    marker = tmp_path / "marker"
    with zipfile.ZipFile(malicious_artifact(tmp_path / "evil.pt", marker)) as archive:
        program = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(program)]
    names = [name for name, _ in ops]
    called = names.index("GLOBAL")
    assert ops[called][1] in ("__builtin__ exec", "builtins exec")  # protocol 2 names builtins the Python 2 way
    assert ops[called + 2] == ("BINUNICODE", f"open({str(marker)!r}, 'w').write('code ran')")
    assert "REDUCE" in names[called:]  # exec(that code) when unpickled
    assert not marker.exists()


def test_loading_a_malicious_file_is_refused_naming_it(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = malicious_artifact(tmp_path / "model.pt", marker)
    with pytest.raises(NotAnArtifact, match=rf"{path}.*not a workbench artifact.*pickle.*never loaded"):
        load_artifact(path)
    assert not marker.exists()


def test_a_malicious_teacher_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = malicious_artifact(tmp_path / "teacher.pt", marker)
    net = OmegaConf.create({"_target_": "lightning_modules.models.LeNet5"})
    data = InMemoryDataModule("digits")
    with pytest.raises(ValueError, match=rf"{path}: refused, it holds objects other than tensors"):
        load_teacher_file(path, net, data)
    assert not marker.exists()


@pytest.mark.slow
def test_a_poisoned_store_runs_no_code_through_baselines_teachers_or_notebooks(tmp_path: Path, store_uri: str) -> None:
    """A teammate with write access to the shared store replaces a baseline's model.pt with a pickle:
    the runs that reuse that baseline, a distillation naming it as teacher, and the notebooks'
    loader all refuse it; nothing it carries runs."""
    fast = [*FAST, "model=lenet300", "hardware=cpu"]
    trained = run_train([*fast, "method=baseline"], tmp_path / "a")
    assert trained.returncode == 0, trained.stderr[-3000:]
    (baseline,) = all_runs(store_uri)
    stored = Path(mlflow.MlflowClient(store_uri).download_artifacts(baseline.info.run_id, "model/model.pt",
                                                                     str(tmp_path / "download")))
    artifact_dir = Path(baseline.info.artifact_uri.removeprefix("file://"))
    marker = tmp_path / "marker"
    malicious_artifact(artifact_dir / "model" / "model.pt", marker)
    assert stored.read_bytes()[:len(MAGIC)] == MAGIC  # what was there: a workbench artifact

    reuse = run_train([*fast, "method=magnitude", "method.fine_tune.epochs=1"], tmp_path / "b")
    assert reuse.returncode != 0
    assert "model.pt is not a workbench artifact" in reuse.stderr
    teacher_uri = f"runs:/{baseline.info.run_id}/model/model.pt"
    # a lenet5 student (its own baseline is trained here) taught by the poisoned lenet300 run
    taught = run_train([*FAST, "model=lenet5", "hardware=cpu", "method=kd", f"++method.teacher.uri={teacher_uri}"],
                       tmp_path / "c")
    assert taught.returncode != 0
    assert "refused, it holds objects other than tensors" in taught.stderr  # when validated: no kd run opens
    with pytest.raises(NotAnArtifact, match="model.pt is not a workbench artifact"):
        load_run_models(baseline.info.run_id, store_uri)
    assert not marker.exists()
    failed = [run for run in all_runs(store_uri) if run.info.status == "FAILED"]
    assert {run.data.tags["method"] for run in failed} == {"magnitude"}


# ----------------------------------------------------------------------------- damaged files


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    save_deployable(LeNet5(1, 8, 10), path, ModelRecipe("lightning_modules.models.LeNet5",
                                                        {"in_channels": 1, "image_size": 8, "num_classes": 10}))
    return path


def test_a_truncated_artifact_is_a_clear_error(saved: Path) -> None:
    content = saved.read_bytes()
    saved.write_bytes(content[:-100])
    with pytest.raises(ArtifactError, match=rf"{saved}: damaged or truncated workbench artifact: its tensors take"):
        load_artifact(saved)
    saved.write_bytes(content[:20])
    with pytest.raises(ArtifactError, match=rf"{saved}: damaged or truncated workbench artifact, its header"):
        load_artifact(saved)


def test_a_flipped_byte_is_caught_by_the_checksum(saved: Path) -> None:
    content = bytearray(saved.read_bytes())
    content[-10] ^= 0xFF
    saved.write_bytes(bytes(content))
    with pytest.raises(ArtifactError, match="CRC-32"):
        load_artifact(saved)


def test_an_empty_or_foreign_file_is_not_an_artifact(tmp_path: Path) -> None:
    for content in (b"", b"hello, world", b"\x89PNG\r\n\x1a\n"):
        path = tmp_path / "model.pt"
        path.write_bytes(content)
        with pytest.raises(NotAnArtifact, match="unknown format"):
            load_artifact(path)


# ----------------------------------------------------------------------------- descriptions that may not be built


def write_artifact(path: Path, header: dict) -> Path:
    """A well-formed container around a hand-written header (no tensors)."""
    header = {"format": FORMAT, "input": None, "tensors": [], "data_bytes": 0, "data_crc32": 0, **header}
    packed = zlib.compress(json.dumps(header).encode())
    path.write_bytes(MAGIC + struct.pack("<I", len(packed)) + packed)
    return path


@pytest.mark.parametrize("header, message", [
    ({"recipe": {"target": "os.system", "kwargs": {"dict": {"command": "touch /tmp/x"}}}, "changes": []},
     r"model target .os.system. is not an nn.Module class or a workbench model builder .*: refused"),
    ({"recipe": {"target": "lightning_modules.models.LeNet5",
                 "kwargs": {"dict": {"in_channels": {"dict": {"_target_": "os.getcwd"}}}}}, "changes": []},
     r"model.net.in_channels holds a nested _target_"),
    ({"recipe": None, "changes": [{"path": "", "kind": "replaced", "module": {"class": "subprocess.Popen"}}]},
     r"module class 'subprocess.Popen' is outside the trusted packages"),
    ({"recipe": None, "changes": [{"path": "", "kind": "replaced",
                                   "module": {"class": "lightning_modules.evaluation.artifact.ArtifactError"}}]},
     r"is not an nn.Module class: refused"),
    ({"recipe": None, "changes": [{"path": "", "kind": "graph", "module": {"class": "torch.nn.modules.module.Module"},
                                   "graph": [{"name": "x", "op": "placeholder", "target": "x", "args": [],
                                              "kwargs": {"dict": {}}},
                                             {"name": "run", "op": "call_function", "target": "builtins.exec",
                                              "args": ["print('hi')"], "kwargs": {"dict": {}}}]}]},
     r"graph node run calls 'builtins.exec', which is not in architecture.SAFE_FUNCTIONS: refused"),
    ({"recipe": None, "changes": [{"path": "", "kind": "graph", "module": {"class": "torch.nn.modules.module.Module"},
                                   "graph": [{"name": "x", "op": "placeholder", "target": "x", "args": [],
                                              "kwargs": {"dict": {}}},
                                             {"name": "save", "op": "call_method", "target": "__reduce_ex__",
                                              "args": [{"node": "x"}, 2], "kwargs": {"dict": {}}}]}]},
     r"graph node save calls the tensor method '__reduce_ex__': refused"),
])
def test_a_description_naming_anything_but_modules_and_safe_functions_is_refused(
        tmp_path: Path, header: dict, message: str) -> None:
    path = write_artifact(tmp_path / "model.pt", header)
    with pytest.raises(ArtifactError, match=rf"{path}: .*{message}"):
        load_artifact(path)


def test_the_header_is_readable_json_saying_how_the_model_was_built_and_changed(tmp_path: Path) -> None:
    model = LeNet5(1, 8, 10)
    model.features[3] = nn.Conv2d(6, 8, 5, padding=2)  # as if channel pruning had kept 8 of 16 channels
    model.classifier[1] = nn.Linear(32, 120)
    recipe = ModelRecipe("lightning_modules.models.LeNet5", {"in_channels": 1, "image_size": 8, "num_classes": 10})
    save_deployable(model, tmp_path / "model.pt", recipe)
    header, _ = read_header(tmp_path / "model.pt")
    assert header["recipe"]["target"] == "lightning_modules.models.LeNet5"
    assert [(change["path"], change["kind"]) for change in header["changes"]] == [
        ("features.3", "resized"), ("classifier.1", "resized")]
    inputs = torch.randn(2, 1, 8, 8)
    assert torch.equal(load_artifact(tmp_path / "model.pt").model(inputs), model.eval()(inputs))
