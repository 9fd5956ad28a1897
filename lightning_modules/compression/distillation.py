"""Knowledge distillation: a student learns from a teacher's outputs, as Lightning callbacks.

    KnowledgeDistillation  Hinton et al. (2015): soft targets at temperature T, the KL divergence
                           scaled by T^2, mixed with the cross-entropy on labels by `alpha`
    FeatureDistillation    FitNets (Romero et al. 2015): a student layer, through a small learned
                           adapter, regresses a teacher layer's features (plus the logit loss)

The teacher is found by the pipeline (a baseline of another model from the store, an MLflow URI
or a file) and handed over with `attach_teacher`; it runs in eval mode without gradients. Its
logits are computed once for the whole training split when the training images are not
augmented (then an epoch costs little more than the student alone), else on every batch, since
teacher and student must see the same augmented view.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.compression.base import CompressionCallback
from lightning_modules.data import InMemoryDataModule

log = logging.getLogger(__name__)

TEACHER_LOGITS = ("auto", "cache", "online")

# The teacher's logits over a training split, kept for the process and keyed by the content of the
# teacher's weights and of the images: the runs of a sweep that share both (seeds, methods) pay the
# teacher's pass once. A few entries at most: each is (train images x classes) floats.
LOGIT_CACHE: dict[str, torch.Tensor] = {}
LOGIT_CACHE_ENTRIES = 4

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


# ----------------------------------------------------------------------------- callbacks


class KnowledgeDistillation(CompressionCallback):
    """Logit distillation. Loss = (1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher || student).

    Args:
        temperature: softening temperature T > 0 (Hinton used 2-20; 4 is common on MNIST/CIFAR).
        alpha: weight of the soft-target loss in [0, 1]; 0 trains on labels alone.
        teacher_logits: `cache` (once per training image; needs unaugmented data), `online`
            (every batch), or `auto` (cache unless the data module augments).
    """

    name = "kd"
    requires_teacher = True

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, teacher_logits: str = "auto") -> None:
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is not valid; allowed: a number > 0")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} is not valid; allowed: a weight in [0, 1]")
        if teacher_logits not in TEACHER_LOGITS:
            raise ValueError(f"teacher_logits={teacher_logits!r} is not valid; allowed: {', '.join(TEACHER_LOGITS)}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.teacher_logits = teacher_logits
        self.teacher: nn.Module | None = None
        self.cached_logits: torch.Tensor | None = None

    def attach_teacher(self, teacher: nn.Module) -> None:
        self.teacher = teacher.eval().requires_grad_(False)

    # -- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.teacher is None:
            raise RuntimeError(f"{type(self).__name__} has no teacher: the pipeline attaches one before fit")
        data = trainer.datamodule
        self.teacher.to(pl_module.device)
        pl_module.hard_loss_weight = 1.0 - self.alpha
        pl_module.loss_terms.append(self.loss)
        if self.use_cache(data):
            data.return_indices = True
            self.cached_logits = cached_teacher_outputs(self.teacher, data.split("train").tensors[0], pl_module.device)

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
        self.cached_logits = None

    # -- the worker
    def use_cache(self, data: Any) -> bool:
        augmented = getattr(data, "augment", None) is not None
        if self.teacher_logits == "cache" and augmented:
            raise ValueError("teacher_logits='cache' needs unaugmented training data (data.augment=null): "
                             "the teacher must see the same augmented view as the student")
        can_index = isinstance(data, InMemoryDataModule)
        return can_index and (self.teacher_logits == "cache" or (self.teacher_logits == "auto" and not augmented))

    def teacher_logits_for(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.cached_logits is not None and len(batch) > 2:
            return self.cached_logits[batch[2].to(self.cached_logits.device)]
        with torch.no_grad():
            return self.teacher(batch[0])

    def loss(self, batch: tuple[torch.Tensor, ...], logits: torch.Tensor) -> torch.Tensor:
        return self.alpha * soft_target_loss(logits, self.teacher_logits_for(batch), self.temperature)

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        teacher_params = sum(p.numel() for p in self.teacher.parameters()) if self.teacher is not None else 0
        return [{"teacher": type(self.teacher).__name__, "teacher_params": teacher_params,
                 "student_params": sum(p.numel() for p in model.parameters()),
                 "temperature": self.temperature, "alpha": self.alpha,
                 "teacher_logits": "cached" if self.teacher_logits != "online" else "online"}]

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "alpha": self.alpha}


class FeatureDistillation(KnowledgeDistillation):
    """FitNets-style hints plus logit distillation.

    A forward hook captures `student_layer`'s output and `teacher_layer`'s output; a 1x1
    convolution (or a linear map for flat features) adapts the student's channels to the
    teacher's, pooled to the teacher's spatial size. The adapter trains with the student and is
    not part of the deployed model.

    Args:
        student_layer, teacher_layer: qualified module names (e.g. `features.3`, `stages.5`).
        beta: weight of the hint loss (>= 0).
        (and KnowledgeDistillation's arguments; features need the teacher online)
    """

    name = "kd_feature"

    def __init__(self, student_layer: str, teacher_layer: str, beta: float = 1.0, temperature: float = 4.0,
                 alpha: float = 0.9) -> None:
        super().__init__(temperature=temperature, alpha=alpha, teacher_logits="online")
        if not beta >= 0:
            raise ValueError(f"beta={beta!r} is not valid; allowed: a number >= 0")
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.beta = float(beta)
        self.captured: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        self.adapter: nn.Module | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        student_module = _named(pl_module.model, self.student_layer, "student_layer")
        teacher_module = _named(self.teacher, self.teacher_layer, "teacher_layer")
        self.handles = [student_module.register_forward_hook(self._capture("student")),
                        teacher_module.register_forward_hook(self._capture("teacher"))]
        sample = trainer.datamodule.split("train").tensors[0][:2].to(pl_module.device)
        with torch.no_grad():
            was_training = pl_module.model.training
            pl_module.model.eval()
            pl_module.model(sample)
            self.teacher(sample)
            pl_module.model.train(was_training)
        # registered on the task, not the model: the optimizer trains it, the artifact leaves it out
        pl_module.hint_adapter = make_adapter(self.captured["student"], self.captured["teacher"])
        self.adapter = pl_module.hint_adapter

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        super().teardown(trainer, pl_module, stage)

    def _capture(self, role: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self.captured[role] = output
        return hook

    def loss(self, batch: tuple[torch.Tensor, ...], logits: torch.Tensor) -> torch.Tensor:
        # the student's forward already ran (its features are captured); the teacher runs now
        student_features = self.captured["student"]
        logit_loss = super().loss(batch, logits)
        teacher_features = self.captured["teacher"]
        return logit_loss + self.beta * hint_loss(self.adapter(student_features), teacher_features.detach())

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        rows = super().summary(model)
        rows[0].update({"student_layer": self.student_layer, "teacher_layer": self.teacher_layer, "beta": self.beta})
        return rows


def make_adapter(student: torch.Tensor, teacher: torch.Tensor) -> nn.Module:
    """Maps student features onto the teacher's shape: 1x1 conv + pooling, or a linear map."""
    if student.dim() == 4 and teacher.dim() == 4:
        return nn.Sequential(nn.Conv2d(student.shape[1], teacher.shape[1], kernel_size=1, bias=False),
                             nn.AdaptiveAvgPool2d(teacher.shape[2:]))
    return nn.Sequential(nn.Flatten(), nn.Linear(student[0].numel(), teacher[0].numel()),
                         nn.Unflatten(1, tuple(teacher.shape[1:])))


def _named(model: nn.Module, name: str, key: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"{key}={name!r} is not a layer of {type(model).__name__}; "
                         f"allowed: {', '.join(n for n in modules if n)}")
    return modules[name]


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 1000) -> torch.Tensor:
    """The teacher's logits for every image, in order (the cache)."""
    teacher.eval()
    return torch.cat([teacher(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)])


def content_key(teacher: nn.Module, images: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in [*teacher.state_dict().values(), images]:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cached_teacher_outputs(teacher: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`teacher_outputs`, computed once per (teacher weights, images) in this process."""
    key = content_key(teacher, images)
    if key not in LOGIT_CACHE:
        while len(LOGIT_CACHE) >= LOGIT_CACHE_ENTRIES:
            LOGIT_CACHE.pop(next(iter(LOGIT_CACHE)))  # the oldest entry
        LOGIT_CACHE[key] = teacher_outputs(teacher, images, device).cpu()
    else:
        log.info("teacher logits found in this process's cache")
    return LOGIT_CACHE[key]
