"""Models used only by tests (importable by train.py since it runs from the repository root)."""

import torch
from torch import nn


class FailingNet(nn.Module):
    """Builds fine, so validation passes, and fails at its first forward pass: a run-time failure."""

    def __init__(self, num_classes: int = 10, width_multiplier: float = 1.0) -> None:
        super().__init__()
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("FailingNet refuses to run")


class OutOfMemoryNet(FailingNet):
    """Runs out of (GPU) memory at its first forward pass, as a model too large for its device does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (OutOfMemoryNet)")


class ShapeRecorder(nn.Module):
    """Accepts only some of the shape arguments, to test that build_model passes just those."""

    def __init__(self, num_classes: int, hidden: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class PreemptedNet(nn.Module):
    """A LeNet-300-100 whose job dies while WORKBENCH_TEST_PREEMPT is set: a preempted or crashed job.

    Resuming the sweep once the variable is gone must rerun only the jobs like this one.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__()
        from lightning_modules.models import LeNet300

        self.net = LeNet300(**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os

        if os.environ.get("WORKBENCH_TEST_PREEMPT"):
            raise RuntimeError("PreemptedNet: the job was preempted")
        return self.net(x)


class NotExportableNet(nn.Module):
    """A LeNet-300-100 that trains and runs, but adds 0 x a Bessel function of its input, an op
    the ONNX exporter has no translation for: it has no ONNX file (the run says why in a tag, and
    finishes)."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        from lightning_modules.models import LeNet300

        self.net = LeNet300(**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + 0.0 * torch.special.i0e(x))
