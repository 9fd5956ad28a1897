"""A run's model as MLflow models: a pyfunc that takes raw pixels and returns class probabilities,
and, where the model exports, the ONNX flavour of the same function.

Loading either runs no code from the store. The pyfunc is MLflow's `loader_module` kind: its MLmodel
names this module (`_load_pyfunc` below, part of the installed workbench) and its data is the
workbench artifact `model.pt`, which `load_artifact` rebuilds from plain data (no pickle, no
cloudpickled PythonModel, no model-from-code file). The ONNX model is a graph, read by ONNX Runtime.

Both take what a user has: images as the dataset gives them, float32 (N, channels, size, size),
pixels in 0..pixel_max (the artifact's InputSpec), and return (N, classes) probabilities. The pyfunc
normalises with the artifact's InputSpec; the ONNX graph carries the same normalisation as its first
nodes and a softmax as its last (the run's model/model.onnx itself takes normalised input, as the
runtimes measure it).

    log_run_models(store_uri, run_id, model_dir, input_spec, example)   what track() calls
    _load_pyfunc(data_path)                                           what mlflow.pyfunc.load_model calls
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lightning_modules.contract import MLFLOW_MODEL_NAME, MODEL_FILE, ONNX_FILE, ONNX_MODEL_NAME
from lightning_modules.data import InputSpec
from lightning_modules.evaluation.artifact import Artifact, load_artifact
from lightning_modules.evaluation.runtime import with_batchnorm_folded
from lightning_modules.signals import signals_held

log = logging.getLogger(__name__)

PACKAGE = "compression-workbench"  # the distribution that holds this loader module
PIXELS, PROBABILITIES = "pixels", "probabilities"  # the ONNX model's input and output names
# what the logged model needs installed: pinned to this process's versions, listed explicitly so
# that MLflow does not infer them (inference loads the model in a subprocess: seconds per run)
REQUIREMENTS = ("torch", "numpy", "mlflow", "onnx", "onnxruntime", PACKAGE)


# ----------------------------------------------------------------------------- the pyfunc


class RawImageClassifier:
    """What `mlflow.pyfunc.load_model` returns for a workbench model: raw images in, probabilities out.

    The model runs as the workbench's `torch` runtime runs it (eager, each BatchNorm that follows a
    convolution folded into it), so on hardware=cpu its predictions are the ones the run scored.
    """

    def __init__(self, artifact: Artifact) -> None:
        if artifact.input_spec is None:
            raise ValueError("the artifact carries no input description: it cannot take raw images")
        self.artifact = Artifact(with_batchnorm_folded(artifact.model.eval()), artifact.input_spec)

    @property
    def input_spec(self) -> InputSpec:
        return self.artifact.input_spec

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """(N, classes) float32 probabilities for raw images: an array (N, C, H, W) or (N, H, W), the
        signature's {pixels: array} (what MLflow hands over after checking a named tensor input), or
        rows of flattened images."""
        if isinstance(model_input, dict):
            if set(model_input) != {PIXELS}:
                raise ValueError(f"input tensors {sorted(model_input)}; this model takes one, {PIXELS!r}")
            model_input = model_input[PIXELS]
        images = np.asarray(model_input, dtype=np.float32)
        spec = self.input_spec
        if images.ndim == 2:  # rows of flattened pixels
            images = images.reshape(-1, spec.channels, spec.image_size, spec.image_size)
        return self.artifact.predict(images).astype(np.float32)


def _load_pyfunc(data_path: str) -> RawImageClassifier:
    """MLflow's loader hook: `data_path` is the model's copy of the workbench artifact (model.pt)."""
    path = Path(data_path)
    if path.is_dir():
        path = path / MODEL_FILE
    return RawImageClassifier(load_artifact(path))


# ----------------------------------------------------------------------------- signature and metadata


def signature(spec: InputSpec, num_classes: int):
    """Tensor signature: raw float32 pixels (-1, C, H, W) in, float32 probabilities (-1, classes) out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    pixels = TensorSpec(np.dtype(np.float32), (-1, spec.channels, spec.image_size, spec.image_size), PIXELS)
    probabilities = TensorSpec(np.dtype(np.float32), (-1, num_classes), PROBABILITIES)
    return ModelSignature(inputs=Schema([pixels]), outputs=Schema([probabilities]))


def model_metadata(spec: InputSpec) -> dict[str, Any]:
    """What a user reads in the MLmodel file: the input's layout and range, the classes in output order."""
    return {"input": {**spec.to_json(), "pixels": f"raw, 0..{spec.pixel_max:g}, float32"},
            "output": "class probabilities, one column per class in class_names order",
            "class_names": list(spec.class_names)}


def pip_requirements() -> list[str]:
    """This process's versions of what loading the model needs (the workbench: its loader module)."""
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pinned.append(name)
    return pinned


# ----------------------------------------------------------------------------- the ONNX graph on raw pixels


def raw_pixel_graph(onnx_path: Path, spec: InputSpec):
    """The ONNX model of `onnx_path` (normalised input `input`, output `logits`) behind the InputSpec's
    normalisation and followed by a softmax: input `pixels` raw, output `probabilities`. The
    normalisation is the same float32 operations as InputSpec.normalise, in the same order."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    (inner_input,), (inner_output,) = graph.input, graph.output
    per_channel = (spec.channels, 1, 1)  # broadcast over (N, C, H, W) as normalise's (1, C, 1, 1)
    constants = {"pixel_max": np.asarray(spec.pixel_max, dtype=np.float32),
                 "pixel_mean": np.asarray(spec.mean, dtype=np.float32).reshape(per_channel),
                 "pixel_std": np.asarray(spec.std, dtype=np.float32).reshape(per_channel)}
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    head = [helper.make_node("Div", [PIXELS, "pixel_max"], ["pixels_scaled"]),
            helper.make_node("Sub", ["pixels_scaled", "pixel_mean"], ["pixels_centred"]),
            helper.make_node("Div", ["pixels_centred", "pixel_std"], [inner_input.name])]
    tail = helper.make_node("Softmax", [inner_output.name], [PROBABILITIES], axis=1)
    nodes = [*head, *graph.node, tail]
    del graph.node[:]
    graph.node.extend(nodes)
    pixels = helper.make_tensor_value_info(PIXELS, TensorProto.FLOAT,
                                           ["batch", spec.channels, spec.image_size, spec.image_size])
    probabilities = helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", None])
    del graph.input[:]
    graph.input.append(pixels)
    del graph.output[:]
    graph.output.append(probabilities)
    onnx.checker.check_model(model)
    return model


# ----------------------------------------------------------------------------- logging


@contextlib.contextmanager
def using_store(uri: str) -> Iterator[None]:
    """MLflow resolves `models:/` URIs and logs models through the process's tracking URI; the workbench
    names its store: set for the block, then restored."""
    # MLflow's own set-and-restore: it puts back an unset URI as unset (get_tracking_uri() would pin
    # the environment's value of the moment for the rest of the process)
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


def log_run_models(store_uri: str, experiment_id: str, run_id: str, model_dir: Path, spec: InputSpec,
                   num_classes: int, example: np.ndarray, tags: dict[str, str] | None = None) -> dict[str, str]:
    """Log the run's MLflow models from its model folder: MLFLOW_MODEL_NAME (the pyfunc on model.pt)
    and, when model.onnx is there, ONNX_MODEL_NAME; each is the run's output and carries `tags`
    (what the run is: data, model, method, ...). Returns their model ids by name.

    `example` is a few raw images of the test split, the input example stored with each model.
    Each logged model is created in the run's experiment first and handed to MLflow's logging by id
    with the run's id: MLflow's own lookup would take the process's active experiment and run (the
    workbench opens no active run).
    """
    import mlflow.onnx
    import mlflow.pyfunc
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store_uri)
    common = {"signature": signature(spec, num_classes), "input_example": np.asarray(example, dtype=np.float32),
              "pip_requirements": pip_requirements(), "metadata": model_metadata(spec)}
    flavours = {MLFLOW_MODEL_NAME: (mlflow.pyfunc, {"loader_module": __name__,
                                                    "data_path": str(model_dir / MODEL_FILE)})}
    if (model_dir / ONNX_FILE).is_file():
        flavours[ONNX_MODEL_NAME] = (mlflow.onnx, {"onnx_model": raw_pixel_graph(model_dir / ONNX_FILE, spec),
                                                   "save_as_external_data": False,
                                                   "onnx_execution_providers": ["CPUExecutionProvider"]})
    model_ids = {}
    # held: a SIGTERM raised inside MLflow's write of a logged model would leave the SQLite store locked
    with using_store(store_uri), signals_held():
        for name, (flavour, arguments) in flavours.items():
            created = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, tags=tags)
            # what <flavour>.log_model(name=...) does inside an active run, for this run: the model
            # is the run's output, the MLmodel names the run, the run's metrics are linked to it
            Model.log(None, flavour, name=name, run_id=run_id, model_id=created.model_id, **arguments, **common)
            model_ids[name] = created.model_id
    return model_ids


def to_probabilities(prediction: Any) -> np.ndarray:
    """A logged model's prediction as an (N, classes) array: the pyfunc's array, or the ONNX
    flavour's {probabilities: array} (a dict for array input, a DataFrame for a DataFrame)."""
    if isinstance(prediction, dict):
        prediction = prediction[PROBABILITIES]
    return np.asarray(prediction)


def predicted_classes(model_uri: str, raw_images: np.ndarray) -> np.ndarray:
    """The class each raw image gets from the MLflow model at `model_uri` (models:/<id>, runs:/...)."""
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(model_uri)
    return to_probabilities(model.predict(np.asarray(raw_images, dtype=np.float32))).argmax(axis=1)
