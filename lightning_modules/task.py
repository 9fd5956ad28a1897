"""ClassificationTask: the LightningModule every phase trains (baseline, fine-tuning, QAT, KD)."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.checkpoints import register_missing_tensors
from lightning_modules.tracking import RunRejected

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
# A loss term gets the training batch (inputs, targets, and sample indices where the data module
# adds them) and the logits, and returns a scalar added to the loss; distillation plugs its
# teacher loss in here without subclassing the task.
LossTerm = Callable[[tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]


class ClassificationTask(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.loss_terms: list[LossTerm] = []
        self.hard_loss_weight = 1.0  # weight of the cross-entropy on labels (distillation lowers it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch[0], batch[1]
        logits = self(inputs)
        loss = self.hard_loss_weight * F.cross_entropy(logits, targets)
        for term in self.loss_terms:
            loss = loss + term(batch, logits)
        # stop at the first NaN/inf: every later step would train on garbage, and the run would
        # only end FAILED as collapsed after all its epochs
        if not torch.isfinite(loss):
            raise RunRejected(f"non-finite loss at epoch {self.current_epoch} step {self.global_step} "
                              f"(batch {batch_idx}: loss {loss.item()})")
        with torch.no_grad():
            self.epoch_sums += torch.stack([loss.detach() * len(targets), (logits.argmax(1) == targets).sum().float(),
                                            loss.new_tensor(float(len(targets)))])
        return loss

    def on_train_epoch_start(self) -> None:
        self.epoch_sums = torch.zeros(3, device=self.device)  # loss x images, correct, images: this epoch's so far

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # the epoch's train_loss and train_acc (means over its images), logged once, at its last batch:
        # two self.log calls a step cost ~0.9 ms, 6-8% of a step of these models on one core
        if batch_idx + 1 < self.trainer.num_training_batches:
            return
        loss_sum, correct, images = self.epoch_sums
        self.log("train_loss", loss_sum / images, prog_bar=True, on_step=False, on_epoch=True)
        self.log("train_acc", 100.0 * correct / images, on_step=False, on_epoch=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        logits = self(inputs)
        self.log("val_loss", F.cross_entropy(logits, targets), prog_bar=True)
        self.log("val_acc", 100.0 * (logits.argmax(1) == targets).float().mean(), prog_bar=True)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a resumed training: the masks, cluster indices and learned steps its callbacks had added exist
        # in the checkpoint, not yet in this fresh model; the strict load that follows fills them
        self.late_parameters = register_missing_tensors(self, checkpoint["state_dict"])

    def configure_optimizers(self):
        # all of the task's parameters: the model's and those a method trains beside it (adapters);
        # parameters a callback added once training had started (each in a param group of its own, as
        # the callback added it) get their groups back when a training resumes, so the saved
        # optimizer state matches group for group
        late = dict.fromkeys(getattr(self, "late_parameters", []))
        named = dict(self.named_parameters())
        optimizer = self.optimizer_factory([p for name, p in named.items() if name not in late])
        for name in late:
            optimizer.add_param_group({"params": [named[name]]})
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}
