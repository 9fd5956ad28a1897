"""Training that survives a kill: each epoch of a sweep job's training is checkpointed, and a relaunched
sweep goes on from the last one instead of training again from the first epoch.

A job's checkpoints live in its sweep folder, `checkpoints/<job>/` for its compression phase and
`checkpoints/baseline-<fingerprint>/` for a baseline it trains (a baseline belongs to every job that
needs it). Each holds Lightning's `last.ckpt` (the model, the optimizer and scheduler, the loops'
progress and every callback's `state_dict`: masks and schedules, quantization scales, low-rank plans)
and, beside the folder, `<folder>.attempt.json` (the run that wrote it; outside the folder, which Lightning
wants empty when a training starts). A relaunched job that finds them resumes from the epoch
after the last one saved; its run is tagged `resumed_from` with the killed attempt's run id and logs
`resumed_at_epoch`. The folder is removed when the run finishes, and when it is rejected (a collapsed
model, a NaN loss: its training led to no result, so a relaunch trains anew instead of evaluating the
same model again); a crash or a kill keeps it for the relaunch.

With a server store (or `tracking.checkpoints_in_store: true`) each checkpoint is also logged as the
run's artifact `checkpoints/last.ckpt`, so a job relaunched on another machine, without the sweep
folder, fetches the newest one its killed attempts left in the store.

Loading is safe: the checkpoint is read with `weights_only=True`, which rebuilds tensors, plain
containers and the few workbench classes of `safe_state_classes`, and calls nothing else.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_modules.tracking import RunRejected

log = logging.getLogger(__name__)

LAST = "last.ckpt"
ATTEMPT_FILE = "attempt.json"
RESUMED_AT_EPOCH = "resumed_at_epoch"  # metric of a run that went on from a checkpoint: the first epoch it trained


def safe_state_classes() -> list[type]:
    """The workbench classes a callback's `state_dict` holds (plain data): all weights_only may rebuild."""
    from lightning_modules.compression.channel_surgery import ChannelGroup
    from lightning_modules.compression.lowrank import LayerPlan
    from lightning_modules.compression.quantization import QuantScheme

    return [ChannelGroup, LayerPlan, QuantScheme]


STORE_FOLDER = "checkpoints"  # the run's artifact folder its checkpoint is mirrored into


class TrainingCheckpoints:
    """The checkpoint folder of one training phase of one job; with `store`, mirrored into the runs'
    artifacts, and `earlier_attempts` (run ids, newest first) tell whose checkpoint to fetch back."""

    def __init__(self, folder: Path, store: Any = None, earlier_attempts: Callable[[], list[str]] | None = None) -> None:
        self.folder = Path(folder)
        self.store = store
        self.earlier_attempts = earlier_attempts or (lambda: [])

    def fetch(self) -> None:
        """With no checkpoint here, the newest one a killed attempt logged into the store (another machine's)."""
        if self.store is None or self.last is not None:
            return
        for run_id in self.earlier_attempts():
            try:
                fetched = Path(self.store.client.download_artifacts(run_id, f"{STORE_FOLDER}/{LAST}", str(self.folder)))
            except Exception:  # this attempt left none (killed before its first epoch ended): an older one may have
                continue
            fetched.replace(self.folder / LAST)
            self.record_attempt(run_id)
            log.info("checkpoint of run %s fetched from the store", run_id)
            return

    @property
    def last(self) -> Path | None:
        """The checkpoint to resume from, when an earlier attempt left one."""
        path = self.folder / LAST
        return path if path.is_file() else None

    def callback(self, run_id: str) -> ModelCheckpoint:
        """Lightning's checkpointing: `last.ckpt` rewritten at the end of every training epoch (after the
        compression callbacks' own epoch-end work, as Lightning runs checkpointing last), and logged
        into run `run_id`'s artifacts when the store mirrors them."""
        # no metric to monitor: top-1 keeps the newest, under one name (Lightning writes save_last's file
        # only beside a checkpoint it saved anyway)
        options = dict(dirpath=self.folder, filename=LAST.removesuffix(".ckpt"), save_top_k=1, every_n_epochs=1,
                       save_on_train_epoch_end=True, enable_version_counter=False)
        if self.store is None:
            return ModelCheckpoint(**options)
        return MirroredCheckpoint(self.store, run_id, **options)

    @property
    def attempt_file(self) -> Path:
        return self.folder.parent / f"{self.folder.name}.{ATTEMPT_FILE}"

    def previous_attempt(self) -> str | None:
        """The run id of the attempt that wrote the checkpoint (the killed run this one goes on from)."""
        path = self.attempt_file
        return json.loads(path.read_text())["run_id"] if path.is_file() and self.last is not None else None

    def record_attempt(self, run_id: str) -> None:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.attempt_file.write_text(json.dumps({"run_id": run_id}))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.attempt_file.unlink(missing_ok=True)


@contextmanager
def removed_unless_resumable(checkpoints: TrainingCheckpoints | None) -> Iterator[None]:
    """Remove `checkpoints` when the phase inside ends, except when it ends by a crash or a kill: those
    are what a relaunch goes on from. A rejection (RunRejected) removes them too."""
    try:
        yield
    except RunRejected:
        if checkpoints is not None:
            checkpoints.remove()
        raise
    if checkpoints is not None:
        checkpoints.remove()


class MirroredCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also logs each new checkpoint into the run's artifacts."""

    def __init__(self, store: Any, run_id: str, **options: Any) -> None:
        super().__init__(**options)
        self.store, self.run_id = store, run_id

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        path = Path(self.dirpath) / LAST
        if path.is_file():
            self.store.client.log_artifact(self.run_id, str(path), STORE_FOLDER)


@contextmanager
def safe_loading() -> Iterator[None]:
    """torch.load with weights_only=True may rebuild the callbacks' state classes (plain data), nothing else."""
    with torch.serialization.safe_globals(safe_state_classes()):
        yield


class ResumeNote(pl.Callback):
    """Notes the epoch a resumed training starts at (Lightning has restored its loops by on_train_start).
    A checkpoint of the last epoch (killed while the model was measured) trains nothing: no start to note."""

    def __init__(self) -> None:
        self.epoch: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch = trainer.current_epoch
        log.info("training resumed from its checkpoint at epoch %d", self.epoch)

    def resumed_at(self, trainer: pl.Trainer) -> int:
        return self.epoch if self.epoch is not None else trainer.current_epoch


def register_missing_tensors(module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """What compression callbacks added to the model during training and a fresh model lacks, registered
    with the checkpoint's shapes so the strict load that follows fills them: buffers (pruning masks,
    cluster indices) and parameters created late (LSQ steps learned from the calibration, whose
    attribute a fresh model holds as None). Returns the names of those parameters, which had their own
    optimizer param groups. A key whose module does not exist is left for that load to report."""
    own = module.state_dict()
    late_parameters = []
    for key, value in state_dict.items():
        if key in own:
            continue
        owner_name, _, name = key.rpartition(".")
        try:
            owner = module.get_submodule(owner_name)
        except AttributeError:
            continue
        if not hasattr(owner, name):
            owner.register_buffer(name, torch.zeros_like(value))
        elif getattr(owner, name) is None:
            setattr(owner, name, torch.nn.Parameter(torch.zeros_like(value)))
            late_parameters.append(key)
    return late_parameters
