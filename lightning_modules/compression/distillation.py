"""Knowledge distillation: a student learns from a teacher's outputs, as Lightning callbacks.

    KnowledgeDistillation  Hinton et al. (2015): soft targets at temperature T, the KL divergence
                           scaled by T^2, mixed with the cross-entropy on labels by `alpha`
    FeatureDistillation    FitNets (Romero et al. 2015): a student layer, through a small learned
                           adapter, regresses a teacher layer's features (plus the logit loss)

The teacher is found by the pipeline (a baseline of another model from the store, an MLflow URI
or a file) and handed over with `attach_teacher`; it runs in eval mode without gradients.
Teacher and student must see the same picture ("consistent teaching", Beyer et al. 2022), so the
teacher's logits are computed once before training: per training image when the data is not
augmented, or per (image, view) for a few fixed augmented views of each image when it is
(Shen & Xing 2021); each epoch then shows every image in one of its stored views, and an epoch
costs about what the student alone costs. The logits are kept in the process and, with
`cache_dir`, in a file named by the content hash of teacher, images and views, so later
processes of a sweep skip the teacher's pass. `teacher_logits=online` runs the teacher on every
batch's fresh augmentation instead. FeatureDistillation caches the hint layer's features with the
logits the same way (in the process only, half precision) while they fit in `feature_cache_mb`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.compression.base import (
    CompressionCallback,
    check_choice,
    check_int,
    check_number,
)
from lightning_modules.data import FixedViews, InMemoryDataModule
from lightning_modules.layers import weighted_layers

log = logging.getLogger(__name__)

TEACHER_LOGITS = ("auto", "cache", "online")
HINTS = ("fitnets", "attention")
# Layer rules a hint layer may be given as instead of a module name, resolved per model, so that a
# shipped default works for every architecture (a name like `features.5` exists in LeNet-5 only).
LAYER_RULES = ("penultimate", "last_conv")

# The teacher's logits over a training split, kept for the process and keyed by the content of the
# teacher's weights, the images and the views: the runs of a sweep that share them (seeds, methods)
# pay the teacher's pass once. A few entries at most: each is (views x train images x classes) floats.
LOGIT_CACHE: dict[str, torch.Tensor] = {}
LOGIT_CACHE_ENTRIES = 4
# The same for feature hints: (logits, features of the teacher's hint layer), keyed also by the layer.
# Features are large (resnet20's last stage over 3,500 images x 8 views: 175 MB): two entries at most.
FEATURE_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
FEATURE_CACHE_ENTRIES = 2

# ----------------------------------------------------------------------------- the math


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, times T^2 so its gradients keep their
    size as T changes (Hinton et al. 2015, section 2)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets' hint: mean squared error between adapted student and teacher features."""
    return F.mse_loss(student_features, teacher_features)


def attention_map(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zagoruyko & Komodakis (2017): where a layer looks. The channel mean of the squared
    activations, pooled to `size`, flattened and scaled to unit length per image."""
    energy = F.adaptive_avg_pool2d(features.pow(2).mean(dim=1, keepdim=True), size)
    return F.normalize(energy.flatten(1), dim=1)


def attention_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the two unit-length attention maps, at the coarser of the two sizes;
    needs no adapter, since channel counts do not enter."""
    size = tuple(min(s, t) for s, t in zip(student_features.shape[2:], teacher_features.shape[2:]))
    difference = attention_map(student_features, size) - attention_map(teacher_features, size)
    return difference.pow(2).sum(dim=1).mean()


# ----------------------------------------------------------------------------- callbacks


class KnowledgeDistillation(CompressionCallback):
    """Logit distillation. Loss = (1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher || student).

    Args:
        temperature: softening temperature T > 0 (Hinton used 2-20; 4 is common on MNIST/CIFAR).
        alpha: weight of the soft-target loss in [0, 1]; 0 trains on labels alone.
        teacher_logits: `cache` (computed once: per training image, or per image and view when the
            data is augmented), `online` (the teacher runs on every batch), or `auto` (cache where
            the data module supports it, else online).
        views: fixed augmented views per training image whose logits are cached when the data is
            augmented (>= 1); more views show the student more variety and cost more teacher passes.
        cache_dir: folder where cached logits are also stored as files, so separate processes share
            them; None keeps them in this process only.
    """

    name = "kd"
    requires_teacher = True

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, teacher_logits: str = "auto",
                 views: int = 8, cache_dir: str | None = None) -> None:
        self.temperature = float(check_number("temperature", temperature, 0, bounds="(]"))
        self.alpha = float(check_number("alpha", alpha, 0, 1, noun="a weight"))
        self.teacher_logits = check_choice("teacher_logits", teacher_logits, TEACHER_LOGITS)
        self.views = check_int("views", views, minimum=1)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.teacher: nn.Module | None = None
        self.cached_logits: torch.Tensor | None = None  # (views, train images, classes)
        self.teacher_pass_s = 0.0  # the one-off cost of the cache (0 when found in a cache)

    def attach_teacher(self, teacher: nn.Module) -> None:
        self.teacher = teacher.eval().requires_grad_(False)

    # -- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.teacher_on(pl_module.device)
        pl_module.hard_loss_weight = 1.0 - self.alpha
        pl_module.loss_terms.append(self.loss)
        if self.use_cache(trainer.datamodule):
            self.prepare_cache(trainer.datamodule, pl_module.device)

    def teacher_on(self, device: torch.device) -> nn.Module:
        if self.teacher is None:
            raise RuntimeError(f"{type(self).__name__} has no teacher: the pipeline attaches one before fit")
        return self.teacher.to(device)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the strategy has moved the student to its device by now: the teacher follows
        self.teacher.to(pl_module.device)
        if self.cached_logits is not None:
            self.cached_logits = self.cached_logits.to(pl_module.device)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.loss in pl_module.loss_terms:
            pl_module.loss_terms.remove(self.loss)
        if isinstance(trainer.datamodule, InMemoryDataModule):
            trainer.datamodule.return_indices = False
            trainer.datamodule.fixed_views = None
        self.cached_logits = None

    # -- the worker
    def use_cache(self, data: Any) -> bool:
        can_index = isinstance(data, InMemoryDataModule)
        if self.teacher_logits == "cache" and not can_index:
            raise ValueError(f"teacher_logits='cache' needs an InMemoryDataModule (got {type(data).__name__}): "
                             "the cache is indexed by training image")
        return can_index and self.teacher_logits != "online"

    def prepare_cache(self, data: InMemoryDataModule, device: torch.device) -> None:
        """Logits for every training image (and view); the batches then carry image and view numbers."""
        images = data.split("train").tensors[0]
        views = FixedViews(data.augment, self.views, len(images)) if data.augment is not None else None
        started = time.perf_counter()
        self.cached_logits, computed = cached_teacher_outputs(self.teacher, images, views, device, self.cache_dir)
        self.teacher_pass_s = time.perf_counter() - started if computed else 0.0
        data.return_indices = True
        data.fixed_views = views

    def teacher_logits_for(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.cached_logits is not None and len(batch) > 2:
            indices = batch[2].to(self.cached_logits.device)
            views = batch[3].to(indices.device) if len(batch) > 3 else torch.zeros_like(indices)
            return self.cached_logits[views, indices]
        with torch.no_grad():
            return self.teacher(batch[0])

    def loss(self, batch: tuple[torch.Tensor, ...], logits: torch.Tensor) -> torch.Tensor:
        return self.alpha * soft_target_loss(logits, self.teacher_logits_for(batch), self.temperature)

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        teacher_params = sum(p.numel() for p in self.teacher.parameters()) if self.teacher is not None else 0
        return [{"teacher": type(self.teacher).__name__, "teacher_params": teacher_params,
                 "student_params": sum(p.numel() for p in model.parameters()),
                 "temperature": self.temperature, "alpha": self.alpha,
                 "teacher_logits": self.teacher_logits, "views": self.views,
                 "teacher_pass_s": round(self.teacher_pass_s, 3)}]

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "alpha": self.alpha, "views": self.views}


class FeatureDistillation(KnowledgeDistillation):
    """Feature hints plus logit distillation.

    A forward hook captures `student_layer`'s output and `teacher_layer`'s output. With
    `hint=fitnets` a 1x1 convolution (or a linear map for flat features) adapts the student's
    channels to the teacher's, pooled to the teacher's spatial size; the adapter trains with the
    student and is not part of the deployed model. With `hint=attention` the two layers' spatial
    attention maps are matched (Zagoruyko & Komodakis 2017): no adapter, no extra parameters.

    Args:
        student_layer, teacher_layer: a qualified module name (e.g. `features.3`, `stages.5`) or a
            rule resolved per model: `penultimate` (the last feature map before the classifier, not
            counting a global pooling; an MLP's last hidden layer) or `last_conv` (the last Conv2d).
        beta: weight of the hint loss (>= 0).
        hint: `fitnets` or `attention` (both layers must give (N, C, H, W) feature maps).
        feature_cache_mb: with `teacher_logits=auto`, the teacher's hint features are cached with its
            logits (per training image and view, half precision, in this process) when they take at
            most this many MB; larger ones make the teacher run online. `cache` caches whatever the size.
        (and KnowledgeDistillation's arguments; the feature cache is not written to `cache_dir`)
    """

    name = "kd_feature"

    def __init__(self, student_layer: str = "penultimate", teacher_layer: str = "penultimate", beta: float = 1.0, temperature: float = 4.0,
                 alpha: float = 0.9, hint: str = "fitnets", teacher_logits: str = "auto", views: int = 8,
                 feature_cache_mb: float = 512.0) -> None:
        super().__init__(temperature=temperature, alpha=alpha, teacher_logits=teacher_logits, views=views)
        self.feature_cache_mb = float(check_number("feature_cache_mb", feature_cache_mb, 0))
        self.cached_features: torch.Tensor | None = None  # (views, train images, *the hint layer's output shape)
        self.features_cached = False  # whether this fit used the cache (for the summary, after teardown)
        check_number("beta", beta, 0)
        self.hint = check_choice("hint", hint, HINTS)
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.student_module_name = student_layer  # the module the rule resolves to, set at setup
        self.teacher_module_name = teacher_layer
        self.beta = float(beta)
        self.captured: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        self.adapter: nn.Module | None = None

    def check_model(self, model: nn.Module, example: torch.Tensor, teacher: nn.Module | None = None) -> None:
        """Both layers exist (rules resolved on these models) and, for attention hints, give feature maps."""
        outputs = {"student": layer_output(model, resolve_layer(model, self.student_layer, example, "student_layer"),
                                           example)}
        if teacher is not None:
            outputs["teacher"] = layer_output(teacher, resolve_layer(teacher, self.teacher_layer, example,
                                                                     "teacher_layer"), example)
        if self.hint == "attention":
            check_feature_maps(outputs, self.student_layer, self.teacher_layer)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # the layers first: the cache the logit loss's setup prepares holds the teacher layer's features
        sample = trainer.datamodule.split("train").tensors[0][:2].to(pl_module.device)
        self.teacher_on(pl_module.device)
        self.student_module_name = resolve_layer(pl_module.model, self.student_layer, sample, "student_layer")
        self.teacher_module_name = resolve_layer(self.teacher, self.teacher_layer, sample, "teacher_layer")
        student_module = _named(pl_module.model, self.student_module_name, "student_layer")
        teacher_module = _named(self.teacher, self.teacher_module_name, "teacher_layer")
        self.handles = [student_module.register_forward_hook(self._capture("student")),
                        teacher_module.register_forward_hook(self._capture("teacher"))]
        with torch.no_grad():
            was_training = pl_module.model.training
            pl_module.model.eval()
            pl_module.model(sample)
            self.teacher(sample)
            pl_module.model.train(was_training)
        super().setup(trainer, pl_module, stage)
        if self.hint == "attention":
            check_feature_maps(self.captured, self.student_layer, self.teacher_layer)
            return
        # registered on the task, not the model: the optimizer trains it, the artifact leaves it out
        pl_module.hint_adapter = make_adapter(self.captured["student"], self.captured["teacher"])
        self.adapter = pl_module.hint_adapter

    def prepare_cache(self, data: InMemoryDataModule, device: torch.device) -> None:
        """Logits and hint features for every training image (and view), when they fit in feature_cache_mb."""
        images = data.split("train").tensors[0]
        views = FixedViews(data.augment, self.views, len(images)) if data.augment is not None else None
        megabytes = (views.count if views else 1) * len(images) * self.captured["teacher"][0].numel() * 2 / 2**20
        if self.teacher_logits == "auto" and megabytes > self.feature_cache_mb:
            log.info("kd_feature: the teacher's %s features over %d images x %d views would take %.0f MB "
                     "(feature_cache_mb=%g): the teacher runs online", self.teacher_module_name, len(images),
                     views.count if views else 1, megabytes, self.feature_cache_mb)
            return
        started = time.perf_counter()
        (self.cached_logits, self.cached_features), computed = cached_teacher_features(
            self.teacher, self.teacher_module_name, images, views, device)
        self.teacher_pass_s = time.perf_counter() - started if computed else 0.0
        self.features_cached = True
        data.return_indices = True
        data.fixed_views = views

    def teacher_features_for(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The teacher layer's output for the batch: cached, or captured as the teacher just ran on it."""
        if self.cached_features is not None and len(batch) > 2:
            indices = batch[2].cpu()
            views = batch[3].cpu() if len(batch) > 3 else torch.zeros_like(indices)
            return self.cached_features[views, indices].to(batch[0].device, torch.float32)
        return self.captured["teacher"].detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.cached_features = None
        super().teardown(trainer, pl_module, stage)

    def _capture(self, role: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self.captured[role] = output
        return hook

    def loss(self, batch: tuple[torch.Tensor, ...], logits: torch.Tensor) -> torch.Tensor:
        # the student's forward already ran (its features are captured); the teacher runs now, unless cached
        student_features = self.captured["student"]
        logit_loss = super().loss(batch, logits)
        teacher_features = self.teacher_features_for(batch)
        if self.hint == "attention":
            return logit_loss + self.beta * attention_loss(student_features, teacher_features)
        return logit_loss + self.beta * hint_loss(self.adapter(student_features), teacher_features)

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        rows = super().summary(model)
        rows[0].update({"student_layer": self.student_layer, "teacher_layer": self.teacher_layer, "beta": self.beta,
                        "hint": self.hint, "features_cached": self.features_cached,
                        "student_module": getattr(self, "student_module_name", self.student_layer),
                        "teacher_module": getattr(self, "teacher_module_name", self.teacher_layer)})
        return rows


def make_adapter(student: torch.Tensor, teacher: torch.Tensor) -> nn.Module:
    """Maps student features onto the teacher's shape: 1x1 conv + pooling, or a linear map."""
    if student.dim() == 4 and teacher.dim() == 4:
        return nn.Sequential(nn.Conv2d(student.shape[1], teacher.shape[1], kernel_size=1, bias=False),
                             nn.AdaptiveAvgPool2d(teacher.shape[2:]))
    return nn.Sequential(nn.Flatten(), nn.Linear(student[0].numel(), teacher[0].numel()),
                         nn.Unflatten(1, tuple(teacher.shape[1:])))


@torch.no_grad()
def layer_output(model: nn.Module, name: str, example: torch.Tensor) -> torch.Tensor:
    """What module `name` of `model` outputs for `example` (eval mode; the model's mode is restored)."""
    captured: list[torch.Tensor] = []
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, i, output: captured.append(output))
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        handle.remove()
        model.train(was_training)
    return captured[-1]


def check_feature_maps(captured: dict[str, torch.Tensor], student_layer: str, teacher_layer: str) -> None:
    """Attention maps need (N, C, H, W) outputs on both sides (those captured)."""
    for role, layer in (("student", student_layer), ("teacher", teacher_layer)):
        if role in captured and captured[role].dim() != 4:
            raise ValueError(f"{role}_layer={layer!r} gives {tuple(captured[role].shape[1:])} features; "
                             "allowed with hint=attention: a layer with (channels, height, width) feature maps")


def resolve_layer(model: nn.Module, layer: str, example: torch.Tensor, key: str) -> str:
    """The qualified module name `layer` means in `model`: a rule of LAYER_RULES resolved on this
    model (`example`: an input batch), or a module name, checked.

    Raises:
        ValueError: naming the key, the value and the model's layers (or the rule that finds none).
    """
    if layer == "last_conv":
        convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
        if not convs:
            raise ValueError(f"{key}='last_conv' is not valid: {type(model).__name__} has no Conv2d layer; allowed: "
                             f"{', '.join(n for n, _ in model.named_modules() if n)}, or a rule: penultimate")
        return convs[-1]
    if layer == "penultimate":
        return penultimate_layer(model, example)
    _named(model, layer, key)
    return layer


@torch.no_grad()
def penultimate_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The module whose output is the model's last feature map before its classifier: the last
    (N, C, H, W) output produced before the final weighted layer runs, not counting a global pooling
    (a map squeezed to 1x1); for a model without feature maps (an MLP), its last hidden output.
    Where several nested modules give the same tensor, the outermost one (it finishes last) is named.
    """
    final = list(weighted_layers(model))[-1][1]
    names = {id(module): name for name, module in model.named_modules() if name}
    outputs: list[tuple[str, torch.Tensor, bool]] = []  # (name, output, is a feature map)
    done = False

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal done
        if done or not isinstance(output, torch.Tensor) or id(module) not in names:
            done = done or module is final
            return
        if module is final:
            done = True
            return
        source = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        pooled_to_point = output.dim() == 4 and output.shape[2:] == (1, 1) and (
            source is None or source.dim() != 4 or source.shape[2:] != (1, 1))
        outputs.append((names[id(module)], output, output.dim() == 4 and not pooled_to_point))

    handles = [module.register_forward_hook(record) for module in model.modules() if module is not model]
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    maps = [(name, output) for name, output, is_map in outputs if is_map]
    candidates = maps or [(name, output) for name, output, _ in outputs]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no layer before its last weighted layer: name the hint layer")
    last = candidates[-1][1]
    return [name for name, output in candidates if output is last][-1]


def _named(model: nn.Module, name: str, key: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"{key}={name!r} is not a layer of {type(model).__name__}; "
                         f"allowed: {', '.join(n for n in modules if n)}, or a rule: {', '.join(LAYER_RULES)}")
    return modules[name]


def view_outputs(teacher: nn.Module, images: torch.Tensor, views: FixedViews | None, device: torch.device) -> torch.Tensor:
    """(views, images, classes): the teacher's logits for each fixed view of every image (one
    "view" of the images themselves when there are none), on the CPU."""
    return view_outputs_and_features(teacher, None, images, views, device)[0]


@torch.no_grad()
def view_outputs_and_features(teacher: nn.Module, layer: str | None, images: torch.Tensor, views: FixedViews | None,
                              device: torch.device, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's logits (views, images, classes) and, with `layer`, that module's outputs on the same
    pictures in half precision (views, images, *its output shape); on the CPU. A layer's output is read
    once the forward has finished, as the online loss reads it (an in-place ReLU after the layer has
    acted on it by then)."""
    teacher.eval()
    captured: list[torch.Tensor] = []
    handle = dict(teacher.named_modules())[layer].register_forward_hook(
        lambda m, i, output: captured.append(output)) if layer is not None else None
    count = views.count if views is not None else 1
    logits, features = [], []
    indices = torch.arange(len(images))
    try:
        for view in range(count):
            pictures = views.apply(images, indices, torch.full_like(indices, view)) if views is not None else images
            for start in range(0, len(images), batch_size):
                logits.append(teacher(pictures[start : start + batch_size].to(device)).cpu())
                if captured:
                    features.append(captured.pop().half().cpu())
    finally:
        if handle is not None:
            handle.remove()
    stacked = torch.cat(features).view(count, len(images), *features[0].shape[1:]) if features else None
    return torch.cat(logits).view(count, len(images), -1), stacked


def cached_teacher_features(teacher: nn.Module, layer: str, images: torch.Tensor, views: FixedViews | None,
                            device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """`view_outputs_and_features`, computed once per (teacher weights, layer, images, views) in this
    process. Returns (logits, features) and whether the teacher ran."""
    key = f"{content_key(teacher, images, views)}:{layer}"
    computed = key not in FEATURE_CACHE
    if computed:
        while len(FEATURE_CACHE) >= FEATURE_CACHE_ENTRIES:
            FEATURE_CACHE.pop(next(iter(FEATURE_CACHE)))  # the oldest entry
        FEATURE_CACHE[key] = view_outputs_and_features(teacher, layer, images, views, device)
    return FEATURE_CACHE[key], computed


def content_key(teacher: nn.Module, images: torch.Tensor, views: FixedViews | None) -> str:
    digest = hashlib.sha256()
    view_params = [views.params] if views is not None else []
    for tensor in [*teacher.state_dict().values(), images, *view_params]:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if views is not None:
        digest.update(views.augment.encode())
    return digest.hexdigest()


def cached_teacher_outputs(teacher: nn.Module, images: torch.Tensor, views: FixedViews | None, device: torch.device,
                           cache_dir: Path | None = None) -> tuple[torch.Tensor, bool]:
    """`view_outputs`, computed once per (teacher weights, images, views): kept in this process and,
    with `cache_dir`, in a file named by that content. Returns the logits and whether the teacher ran."""
    key = content_key(teacher, images, views)
    computed = False
    if key not in LOGIT_CACHE:
        logits = load_logits(cache_dir, key)
        if logits is None:
            logits, computed = view_outputs(teacher, images, views, device).cpu(), True
            save_logits(cache_dir, key, logits)
        while len(LOGIT_CACHE) >= LOGIT_CACHE_ENTRIES:
            LOGIT_CACHE.pop(next(iter(LOGIT_CACHE)))  # the oldest entry
        LOGIT_CACHE[key] = logits
    return LOGIT_CACHE[key], computed


def load_logits(cache_dir: Path | None, key: str) -> torch.Tensor | None:
    path = cache_dir / f"{key}.pt" if cache_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        logits = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as error:  # damaged: recomputed, never trusted
        log.warning("teacher logits in %s unreadable (%s): computing them again", path, error)
        return None
    log.info("teacher logits read from %s", path)
    return logits


def save_logits(cache_dir: Path | None, key: str, logits: torch.Tensor) -> None:
    if cache_dir is None:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    # written beside, then renamed: a concurrent job reads either no file or a whole one
    handle, scratch = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    os.close(handle)
    os.chmod(scratch, 0o644)  # mkstemp's 0600 would hide it from the other users of a shared store
    torch.save(logits, scratch)
    os.replace(scratch, cache_dir / f"{key}.pt")
