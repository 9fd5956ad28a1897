"""Validation of a composed config, before any work starts.

Every check raises `ConfigError` naming the key, the bad value and what is allowed. Run for each
job of a sweep before the first one starts (sweep.py), and again at the start of each run.
"""

from __future__ import annotations

import json
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra.utils
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_modules.compression.base import CompressionCallback, Timer, check_choice, check_number
from lightning_modules.compression.clustering import WeightClustering
from lightning_modules.compression.distillation import KnowledgeDistillation
from lightning_modules.compression.lowrank import LowRankDecomposition
from lightning_modules.compression.pruning import ChannelPruning, LightningReference, MaskedPruning, NMPruning
from lightning_modules.compression.quantization import PTQDynamic, StaticQuantization
from lightning_modules.contract import sqlite_path
from lightning_modules.data import AUGMENTATIONS, DATASETS, DataShape
from lightning_modules.evaluation.artifact import NotAnArtifact, load_deployable
from lightning_modules.evaluation.runtime import RUNTIMES
from lightning_modules.layers import WEIGHTED_LAYERS
from lightning_modules.models import build_model
from lightning_modules.tracking import Store, download_uri

DEVICES = ("cpu", "cuda")
STUDENT_INITS = ("baseline", "scratch")
URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "file:/")
# The input each bundled dataset gives a model, so a model can be built and checked from its config
# before any data is read (a dataset not listed here is loaded to learn its shape).
DATA_SHAPES = {
    "mnist5k": DataShape(1, 28, 10), "digits": DataShape(1, 8, 10), "mnist": DataShape(1, 28, 10),
    "fashion_mnist": DataShape(1, 28, 10), "cifar10": DataShape(3, 32, 10),
}
# Images in each bundled dataset's training pool, and whether its test split is carved from that pool
# (mnist5k and digits have no test set of their own), so split sizes are checked before any data is read.
DATA_POOLS = {"mnist5k": (5000, True), "digits": (1797, True), "mnist": (60000, False),
              "fashion_mnist": (60000, False), "cifar10": (50000, False)}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the allowed values."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not valid; allowed: {allowed}")


def validate(cfg: DictConfig) -> None:
    """Check the whole config; raises ConfigError on the first bad value."""
    check_number("seed", cfg.seed, 0, integer=True, error=ConfigError)
    _validate_hardware(cfg.hardware)
    check_choice("data.name", cfg.data.name, DATASETS, error=ConfigError)
    check_number("data.batch_size", cfg.data.batch_size, 1, integer=True, error=ConfigError)
    _validate_data(cfg.data)
    _validate_recipe("baseline", cfg.baseline, minimum_epochs=1)
    _validate_target("model.net._target_", cfg.model.net._target_)
    _validate_method(cfg.method, cfg.paths.root)
    _validate_tracking(cfg.tracking)
    _validate_run_checks(cfg)
    _validate_model_and_layers(cfg)


def _validate_data(data: DictConfig) -> None:
    """Split sizes (a count of images, or a fraction of the pool) that leave every split some images."""
    check_number("data.eval_batch_size", data.get("eval_batch_size", 1), 1, integer=True, error=ConfigError)
    check_number("data.split_seed", data.get("split_seed", 0), 0, integer=True, error=ConfigError)
    augment = data.get("augment")
    if augment is not None and augment not in AUGMENTATIONS:
        _fail("data.augment", augment, f"null, {', '.join(AUGMENTATIONS)}")
    pool, carves_test = DATA_POOLS.get(data.name, (None, True))
    left = pool  # images not given to a split yet (None: not known before the data is read)
    for key in ("test_size", "val_size") if carves_test else ("val_size",):
        size = data.get(key)
        if left is None:
            allowed = "a count of images >= 1, or a fraction in (0, 1)"
        else:
            after = " after the test split" if left != pool else ""
            allowed = (f"a count of images in 1..{left - 1}, or a fraction in (0, 1) (the {data.name} pool holds "
                       f"{left} images{after})")
        fraction = isinstance(size, float)
        check_number(f"data.{key}", size, *((0, 1) if fraction else (1, None)), bounds="()" if fraction else "[]",
                     integer=not fraction, error=ConfigError, allowed=allowed)
        if left is not None:
            count = round(size * left) if fraction else size
            if not 1 <= count < left:
                _fail(f"data.{key}", size, allowed)
            left -= count


def _validate_run_checks(cfg: DictConfig) -> None:
    margin = OmegaConf.select(cfg, "run_checks.chance_margin", default=None)
    check_number("run_checks.chance_margin", margin, 0, optional=True, error=ConfigError,
                 allowed="points above chance >= 0, or null (no collapse check)")


def _validate_model_and_layers(cfg: DictConfig) -> None:
    """Build the model from its config for the data's input (cheap: no data read), check that no
    setting leaves a layer without channels, and check every layer name the method's callbacks give
    against this model (and its teacher's; a layer rule may run them once on a zero input)."""
    net = cfg.model.net
    width = net.get("width_multiplier")
    check_number("model.net.width_multiplier", width, 0, bounds="(]", optional=True, error=ConfigError,
                 allowed="a number > 0 (1.0: the published widths; 0.5 halves every layer)")
    shape = data_shape(cfg)
    example = torch.zeros(1, shape.in_channels, shape.image_size, shape.image_size)
    model = _build_checked("model.net", net, shape, example)
    callbacks = build_callbacks(cfg.method)
    teacher = None
    if any(callback.requires_teacher for callback in callbacks):
        _check_teacher_file(cfg, shape, example)
        teacher = _config_teacher(cfg, shape, example)
    for slot, callback in zip(_callback_slots(cfg.method), callbacks):
        try:
            callback.check_model(model, example, teacher)
        except ValueError as error:
            raise ConfigError(f"method.callbacks.{slot}: {error} (model={cfg.model.name}"
                              f"{f', teacher={cfg.method.teacher.model}' if teacher is not None else ''})") from error


def data_shape(cfg: DictConfig) -> DataShape:
    if cfg.data.name in DATA_SHAPES:
        return DATA_SHAPES[cfg.data.name]
    return hydra.utils.instantiate(cfg.data).shape


# Models built for validation, by (config, input shape): a sweep validates every job before the
# first starts, and most jobs share a model; they are at most run in eval mode on zeros, never changed.
_CHECKED_MODELS: dict[str, nn.Module] = {}


def _build_checked(key: str, net: DictConfig, shape: DataShape, example: torch.Tensor) -> nn.Module:
    identity = json.dumps([OmegaConf.to_container(net, resolve=True), vars(shape)], sort_keys=True, default=str)
    if identity not in _CHECKED_MODELS:
        if len(_CHECKED_MODELS) >= 8:
            _CHECKED_MODELS.pop(next(iter(_CHECKED_MODELS)))
        _CHECKED_MODELS[identity] = _build(key, net, shape, example)
    return _CHECKED_MODELS[identity]


def _build(key: str, net: DictConfig, shape: DataShape, example: torch.Tensor) -> nn.Module:
    settings = {k: v for k, v in OmegaConf.to_container(net, resolve=True).items() if k != "_target_"}
    try:
        model = build_model(net, shape).eval()
    except Exception as error:
        cause = error.__cause__ or error  # instantiate wraps the constructor's error
        raise ConfigError(f"{key} ({net._target_} with {settings}) cannot be built for {shape.in_channels}x"
                          f"{shape.image_size}x{shape.image_size} inputs: {cause}") from error
    for name, layer in model.named_modules():
        if isinstance(layer, WEIGHTED_LAYERS) and 0 in layer.weight.shape[:2]:
            raise ConfigError(f"{key} settings {settings} leave layer {name!r} ({layer}) with 0 channels; allowed: "
                              "values that leave every layer at least one channel (e.g. width_multiplier > 0, "
                              "hidden sizes >= 1)")
    return model  # not run here: a method whose layer rules need a forward pass runs it (distillation)


def _config_teacher(cfg: DictConfig, shape: DataShape, example: torch.Tensor) -> nn.Module | None:
    """The teacher's architecture when the config names it (method.teacher.model, no uri or file)."""
    spec = cfg.method.teacher
    if spec.get("uri") is not None or spec.get("checkpoint") is not None:
        return None  # known when its file is read; its layer names are checked then
    return _build_checked("method.teacher.model", model_config(spec.model, cfg.paths.root).net, shape, example)


def read_teacher_file(path: Path, net_cfg: DictConfig, shape: DataShape, data_name: str = "the data") -> nn.Module:
    """A workbench artifact (model.pt), or else a Lightning checkpoint / state dict of `net_cfg`'s model."""
    try:
        return load_deployable(path)
    except NotAnArtifact:  # weights for the architecture in method.teacher.model
        try:  # tensors and plain containers only: nothing in the file runs when it is read
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(f"{path}: refused, it holds objects other than tensors and plain containers "
                             f"(a state dict or a Lightning checkpoint of tensors is allowed): {error}") from error
        state = payload.get("state_dict", payload)
        state = {key.removeprefix("model."): value for key, value in state.items()}
        model = build_model(net_cfg, shape)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            head = [name for name, value in model.state_dict().items() if value.dim() >= 2][-1]  # the classifier
            if head in state and state[head].shape[0] != shape.num_classes:
                raise ValueError(f"{path}: the teacher predicts {state[head].shape[0]} classes ({head}), "
                                 f"data={data_name} has {shape.num_classes}") from error
            raise
        return model.eval()


def _check_teacher_file(cfg: DictConfig, shape: DataShape, example: torch.Tensor) -> None:
    """A teacher given as a file or an MLflow URI is read now, before any run opens: a file that
    cannot be read, a run that does not exist, or a teacher that predicts other classes than the data's
    is refused with its key."""
    spec = cfg.method.teacher
    key, value = ("method.teacher.checkpoint", spec.checkpoint) if spec.get("checkpoint") is not None else \
        ("method.teacher.uri", spec.get("uri"))
    if value is None:
        return
    net = model_config(spec.model, cfg.paths.root).net
    with tempfile.TemporaryDirectory(prefix="workbench-teacher-") as folder:
        try:
            path = Path(value) if key.endswith("checkpoint") else _download_teacher(cfg.tracking, value, Path(folder))
            teacher = read_teacher_file(path, net, shape, cfg.data.name)
            with torch.no_grad():
                classes = teacher(example).shape[-1]
        except ConfigError:
            raise
        except Exception as error:
            where = " (runs:/<run id>/model/model.pt of a run in the store, models:/<name>/<version>)" \
                if key.endswith("uri") else ""
            raise ConfigError(f"{key}={value!r} cannot be used as the teacher ({type(error).__name__}: {error}); allowed: "
                              f"a workbench model.pt, or a state dict / Lightning checkpoint of method.teacher.model="
                              f"{spec.model} for {cfg.data.name}{where}") from error
    if classes != shape.num_classes:
        raise ConfigError(f"{key}={value!r}: the teacher predicts {classes} classes, data={cfg.data.name} has "
                          f"{shape.num_classes}; allowed: a teacher trained on {cfg.data.name}'s {shape.num_classes} classes")


def _download_teacher(tracking: DictConfig, uri: str, folder: Path) -> Path:
    store = Store.from_config(tracking)
    database = sqlite_path(store.uri)
    if database is not None and not database.is_file():  # never create a store to look into it
        raise ConfigError(f"method.teacher.uri={uri!r} names a run, but the store {store.uri} does not exist; allowed: "
                          "an MLflow URI of a model in the store the run logs to (runs:/..., models:/...)")
    return download_uri(store, uri, folder)


def _callback_slots(method: DictConfig) -> list[str]:
    return [slot for slot, entry in (method.get("callbacks") or {}).items() if entry is not None]


def _validate_tracking(tracking: DictConfig) -> None:
    wait = tracking.get("baseline_wait_s", 0)
    check_number("tracking.baseline_wait_s", wait, 0, noun="a number of seconds", error=ConfigError)
    if not isinstance(tracking.get("experiment"), str) or not tracking.experiment:
        _fail("tracking.experiment", tracking.get("experiment"), "a non-empty MLflow experiment name")
    if not isinstance(tracking.get("log_model", True), bool):
        _fail("tracking.log_model", tracking.log_model, "true, false")


def _validate_hardware(hardware: DictConfig) -> None:
    check_choice("hardware.device", hardware.device, DEVICES, error=ConfigError)
    check_choice("hardware.runtime", hardware.runtime, RUNTIMES, error=ConfigError)
    if hardware.device not in RUNTIMES[hardware.runtime].devices:
        runs_there = [name for name, runtime in RUNTIMES.items() if hardware.device in runtime.devices]
        raise ConfigError(f"hardware.runtime={hardware.runtime!r} cannot run on hardware.device={hardware.device!r} "
                          f"(hardware={hardware.name}); allowed: hardware.device in "
                          f"{', '.join(RUNTIMES[hardware.runtime].devices)} for this runtime, or hardware.runtime in "
                          f"{', '.join(runs_there)} on {hardware.device}")
    if hardware.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"hardware={hardware.name} needs a CUDA GPU, but torch.cuda.is_available() is False on this "
            f"machine (torch {torch.__version__}); choose hardware=cpu or hardware=cpu_1t"
        )
    check_number("hardware.threads", hardware.threads, 1, integer=True, optional=True, error=ConfigError)
    check_number("hardware.train_threads", hardware.get("train_threads"), 1, integer=True, optional=True,
                 error=ConfigError)
    if not isinstance(hardware.get("export_onnx", True), bool):
        _fail("hardware.export_onnx", hardware.export_onnx, "true, false")
    compile_mode = hardware.get("compile", False)
    if not (isinstance(compile_mode, bool) or compile_mode == "auto"):
        _fail("hardware.compile", compile_mode, "false, true, auto")
    sizes = hardware.latency.batch_sizes
    if not OmegaConf.is_list(sizes) or len(sizes) == 0:
        _fail("hardware.latency.batch_sizes", sizes, "a non-empty list of integers >= 1, e.g. [1, 32]")
    for i, size in enumerate(sizes):
        check_number(f"hardware.latency.batch_sizes[{i}]", size, 1, integer=True, error=ConfigError)
    check_number("hardware.latency.warmup", hardware.latency.warmup, 0, integer=True, error=ConfigError)
    check_number("hardware.latency.repeats", hardware.latency.repeats, 1, integer=True, error=ConfigError)
    check_number("hardware.latency.min_time_s", hardware.latency.get("min_time_s", 0.0), 0, error=ConfigError,
                 noun="a number of seconds")
    check_number("hardware.latency.noisy_speedup_error", hardware.latency.get("noisy_speedup_error", 0.1), 0,
                 error=ConfigError, allowed="a fraction of the speedup >= 0 (e.g. 0.1)")
    check_number("hardware.latency.retries", hardware.latency.get("retries", 0), 0, integer=True, error=ConfigError)
    check_number("hardware.latency.retry_wait_s", hardware.latency.get("retry_wait_s", 0.0), 0, error=ConfigError,
                 noun="a number of seconds")
    if not isinstance(hardware.latency.get("exclusive", True), bool):
        _fail("hardware.latency.exclusive", hardware.latency.exclusive, "true or false")


def _validate_recipe(key: str, recipe: DictConfig, minimum_epochs: int) -> None:
    check_number(f"{key}.epochs", recipe.get("epochs"), minimum_epochs, integer=True, error=ConfigError)
    if recipe.get("optimizer") is None:
        raise ConfigError(f"{key}={OmegaConf.to_container(recipe)} has no optimizer; allowed: a whole recipe, e.g. "
                          f"+fine_tune@{key}=<a file of conf/fine_tune/> (then {key}.epochs=N), or {key}=null "
                          "where the method trains nothing")
    _validate_target(f"{key}.optimizer._target_", recipe.optimizer._target_)
    if recipe.get("scheduler") is not None:
        _validate_target(f"{key}.scheduler._target_", recipe.scheduler._target_)


def _validate_method(method: DictConfig, root: str) -> None:
    if not isinstance(method.get("name"), str):
        _fail("method.name", method.get("name"), "a string naming the method (it tags the run)")
    if method.get("fine_tune") is not None:
        _validate_recipe("method.fine_tune", method.fine_tune, minimum_epochs=0)
    check_choice("method.student_init", method.get("student_init", "baseline"), STUDENT_INITS, error=ConfigError)
    callbacks = build_callbacks(method)  # constructors validate their own arguments
    validate_composition(method, callbacks)
    epochs = method.fine_tune.get("epochs") if method.get("fine_tune") is not None else None
    if isinstance(epochs, int):  # each schedule fits in the fine-tuning (else it failed after the baseline trained)
        for slot, callback in zip(_callback_slots(method), callbacks):
            try:
                callback.check_epochs(epochs)
            except ValueError as error:
                raise ConfigError(f"method.callbacks.{slot}: {error}") from error
    if any(callback.requires_teacher for callback in callbacks):
        _validate_teacher(method.get("teacher"), root)


# ----------------------------------------------------------------------------- composition
# A method is an ordered list of compression callbacks active in one Trainer.fit (a hybrid: agp_qat
# is AGP then QAT); `finalize` runs in that order. What each callback does to the model is its stage:
STAGES: tuple[tuple[str, tuple[type, ...]], ...] = (  # the first class that matches names the stage
    ("quantize", (StaticQuantization, PTQDynamic)),  # converts to int8 (static: wraps the layers when fit starts)
    ("cluster", (WeightClustering,)),                # shares each layer's weights among 2**bits values
    ("factor", (LowRankDecomposition,)),             # replaces layers by chains of smaller ones when fit starts
    ("channel", (ChannelPruning,)),                  # removes whole channels
    ("nm", (NMPruning,)),                            # N:M semi-structured masks, float 2:4 layers at finalize
    ("prune", (MaskedPruning, LightningReference)),  # unstructured masks
    ("distill", (KnowledgeDistillation,)),           # a loss only: composes with anything, anywhere
)
WEIGHT_STAGES = ("cluster", "factor", "channel", "nm", "prune")  # stages that change float weights or shapes


def stage_of(callback: CompressionCallback) -> str:
    for stage, classes in STAGES:
        if isinstance(callback, classes):
            return stage
    return "other"  # a callback the rules do not know: nothing is refused for it


def _wraps_for_qat(callback: CompressionCallback) -> bool:
    return getattr(callback, "train_with_fake_quant", False)


def _names_layers(callback: CompressionCallback) -> bool:
    named = [*getattr(callback, "skip_layers", ()), *(getattr(callback, "layer_sparsity", None) or {})]
    return any(name not in ("first", "last") for name in named)


@dataclass(frozen=True)
class CompositionRule:
    """`earlier` listed before `later` cannot work (when `applies` to the pair): `why`, and what to do."""

    earlier: str
    later: str
    why: str
    allowed: str
    applies: Callable[[CompressionCallback, CompressionCallback], bool] = lambda earlier, later: True


# The one table of combinations that cannot work; tests/test_composition.py has a case for each row.
COMPOSITION_RULES: tuple[CompositionRule, ...] = (
    CompositionRule("quantize", "quantize", "two quantizers: the second would quantize layers already converted to int8",
                    "one quantizer per method"),
    *(CompositionRule("quantize", stage, f"{stage} after an int8 conversion: no float weights are left to change",
                      f"the {stage} stage listed before the quantizer") for stage in WEIGHT_STAGES),
    CompositionRule("cluster", "quantize", "int8 after clustering re-rounds the shared values per channel: the codes no "
                    "longer share 2**bits values", "clustering alone (its codebook is already the narrow storage), or the "
                    "quantizer alone"),
    *(CompositionRule("cluster", stage, f"{stage} after clustering moves weights off the shared values",
                      f"clustering as the last stage that changes weights") for stage in ("factor", "channel", "nm", "prune")),
    CompositionRule("prune", "factor", "factoring a pruned layer makes dense factors: the zeros are lost",
                    "factoring before pruning, or either alone"),
    CompositionRule("nm", "factor", "factoring an N:M-pruned layer makes dense factors: the pattern is lost",
                    "factoring before pruning, or either alone"),
    CompositionRule("prune", "prune", "two unstructured pruners: each would set its own mask on the same weights",
                    "one pruner (AGP's schedule covers gradual pruning)"),
    CompositionRule("nm", "prune", "two unstructured pruners: each would set its own mask on the same weights",
                    "one pruner"),
    CompositionRule("prune", "nm", "two unstructured pruners: each would set its own mask on the same weights",
                    "one pruner"),
    CompositionRule("nm", "quantize", "N:M's 2:4 layers run on float semi-structured kernels: an int8 conversion after "
                    "them has no 2:4 int8 kernel and drops the pattern", "N:M alone, or unstructured pruning (agp_qat)"),
    CompositionRule("channel", "quantize", "a static quantizer wraps the layers before channel pruning slices them, so "
                    "the channels could not be removed from the int8 model", "remove_at=setup on the channel stage "
                    "(the channels are sliced before the quantizer wraps the smaller layers; conf/method/channel_qat.yaml)",
                    lambda channel, quantizer: isinstance(quantizer, StaticQuantization) and channel.remove_at != "setup"),
    CompositionRule("factor", "quantize", "a gradual factoring steps the ranks down during training, after QAT has "
                    "wrapped the factors", "gradual_epochs=0 on the factor stage (one cut when fitting starts)",
                    lambda factor, quantizer: _wraps_for_qat(quantizer) and getattr(factor, "gradual_epochs", 0) > 0),
    CompositionRule("prune", "quantize", "QAT wraps every layer (<name>.layer) when fitting starts, so the layer names "
                    "the pruner's skip_layers/layer_sparsity give are not found when it cuts",
                    "first/last only in skip_layers, no layer_sparsity, or the quantizer's own skip_layers",
                    lambda pruner, quantizer: _wraps_for_qat(quantizer) and _names_layers(pruner)),
)


def validate_composition(method: DictConfig, callbacks: list[CompressionCallback]) -> None:
    """Refuse an order of callbacks that cannot work (COMPOSITION_RULES), naming both and the rule."""
    slots = _callback_slots(method)
    staged = [(slot, callback, stage_of(callback)) for slot, callback in zip(slots, callbacks)]
    for i, (slot_a, first, stage_a) in enumerate(staged):
        for slot_b, second, stage_b in staged[i + 1:]:
            for rule in COMPOSITION_RULES:
                if (rule.earlier, rule.later) == (stage_a, stage_b) and rule.applies(first, second):
                    raise ConfigError(
                        f"method={method.get('name')}: method.callbacks.{slot_a} ({type(first).__name__}, {stage_a}) "
                        f"then method.callbacks.{slot_b} ({type(second).__name__}, {stage_b}) cannot work: {rule.why}; "
                        f"allowed: {rule.allowed}")


def model_config(name: str, root: str | Path) -> DictConfig:
    """conf/model/<name>.yaml, e.g. a teacher's architecture named in method.teacher.model."""
    path = Path(root) / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        _fail("method.teacher.model", name, ", ".join(options))
    return OmegaConf.load(path)


def _validate_teacher(teacher: DictConfig | None, root: str) -> None:
    if teacher is None or teacher.get("model") is None:
        raise ConfigError("method.teacher.model is missing: a method that learns from a teacher needs "
                          "method.teacher.model (a name from conf/model/, e.g. resnet20), and optionally "
                          "method.teacher.uri (runs:/..., models:/...) or method.teacher.checkpoint (a file)")
    _validate_target("method.teacher.model: net._target_", model_config(teacher.model, root).net._target_)
    checkpoint = teacher.get("checkpoint")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ConfigError(f"method.teacher.checkpoint={checkpoint!r} is not a file")
    # null: the run's own seed
    check_number("method.teacher.seed", teacher.get("seed"), 0, integer=True, optional=True, error=ConfigError)
    uri = teacher.get("uri")
    if uri is not None and not str(uri).startswith(URI_SCHEMES):
        _fail("method.teacher.uri", uri, f"an MLflow URI starting with {', '.join(URI_SCHEMES)}")


def _validate_target(key: str, target: Any) -> None:
    try:
        hydra.utils.get_object(target)
    except Exception as error:
        raise ConfigError(f"{key}={target!r} cannot be imported ({error})") from error


def build_callbacks(method: DictConfig, timer: Timer | None = None) -> list[CompressionCallback]:
    """Instantiate the method's compression callbacks in the order the config lists them, each
    given `timer` (what min_speedup times with; the pipeline passes evaluation's LatencyTimer)."""
    callbacks = []
    for slot, entry in (method.get("callbacks") or {}).items():
        key = f"method.callbacks.{slot}"
        if entry is None:
            continue  # a slot switched off with `~method.callbacks.x` or `method.callbacks.x=null`
        if "_target_" not in entry:
            raise ConfigError(f"{key} has no _target_; every compression entry names its callback class")
        try:
            callback = hydra.utils.instantiate(entry)
        except Exception as error:
            # instantiate wraps the constructor's ValueError; surface the constructor's own words
            cause = error.__cause__ or error
            raise ConfigError(f"{key}: {cause}") from error
        if not isinstance(callback, CompressionCallback):
            raise ConfigError(f"{key}._target_={entry._target_!r} is a {type(callback).__name__}, not a CompressionCallback")
        callbacks.append(callback.attach_timer(timer) if timer is not None else callback)
    return callbacks
