"""Transfer datasets from local roots (never downloaded): torchvision's classes and ImageFolder.

A dataset is named on the command line as `NAME:ROOT` (`dtd:/data/dtd`, `imagefolder:/data/pets`). Each has
a fixed train pool (k shots are sampled from it) and a test split (always evaluated in full, unless the
user caps it with `max_per_class`, which is then recorded in every output):

| name          | torchvision class | train pool        | test   |
|---------------|-------------------|-------------------|--------|
| dtd           | DTD (partition 1) | train + val       | test   |
| fgvcaircraft  | FGVCAircraft      | trainval          | test   |
| stanfordcars  | StanfordCars      | train             | test   |
| cifar10       | CIFAR10           | train             | test   |
| cifar100      | CIFAR100          | train             | test   |
| flowers102    | Flowers102        | train + val       | test   |
| food101       | Food101           | train             | test   |
| oxfordiiitpet | OxfordIIITPet     | trainval          | test   |
| imagefolder   | ImageFolder       | DIR/train         | DIR/test, else DIR/val |

The train pool is the official train + val where the dataset has a val split: the linear probe chooses its
weight decay on a held-out part of the sampled shots, so an official val split has no other use here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision import datasets as tvd


class DatasetError(ValueError):
    """A dataset argument that cannot be loaded; the message names the argument and what was expected."""


@dataclass(frozen=True)
class Recipe:
    cls: type
    train: tuple[dict, ...]  # constructor kwargs of the split(s) forming the train pool
    test: dict
    layout: str  # what torchvision expects under ROOT (quoted in errors)


RECIPES: dict[str, Recipe] = {
    "dtd": Recipe(tvd.DTD, ({"split": "train"}, {"split": "val"}), {"split": "test"},
                  "ROOT/dtd/dtd/images/<class>/*.jpg and ROOT/dtd/dtd/labels/{train,val,test}1.txt "
                  "(lines '<class>/<file>.jpg')"),
    "fgvcaircraft": Recipe(tvd.FGVCAircraft, ({"split": "trainval"},), {"split": "test"},
                           "ROOT/fgvc-aircraft-2013b/data/images/*.jpg, ROOT/fgvc-aircraft-2013b/data/variants.txt "
                           "and ROOT/fgvc-aircraft-2013b/data/images_variant_{trainval,test}.txt"),
    "stanfordcars": Recipe(tvd.StanfordCars, ({"split": "train"},), {"split": "test"},
                           "ROOT/stanford_cars/devkit/{cars_meta.mat,cars_train_annos.mat}, "
                           "ROOT/stanford_cars/cars_test_annos_withlabels.mat and the image folders "
                           "ROOT/stanford_cars/{cars_train,cars_test}/"),
    "cifar10": Recipe(tvd.CIFAR10, ({"train": True},), {"train": False},
                      "ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} "
                      "(the python pickles, md5-checked)"),
    "cifar100": Recipe(tvd.CIFAR100, ({"train": True},), {"train": False},
                       "ROOT/cifar-100-python/{train,test,meta} (the python pickles, md5-checked)"),
    "flowers102": Recipe(tvd.Flowers102, ({"split": "train"}, {"split": "val"}), {"split": "test"},
                         "ROOT/flowers-102/jpg/image_NNNNN.jpg, ROOT/flowers-102/imagelabels.mat and "
                         "ROOT/flowers-102/setid.mat (md5-checked; reading them needs scipy)"),
    "food101": Recipe(tvd.Food101, ({"split": "train"},), {"split": "test"},
                      "ROOT/food-101/images/<class>/*.jpg and ROOT/food-101/meta/{train,test}.json"),
    "oxfordiiitpet": Recipe(tvd.OxfordIIITPet, ({"split": "trainval"},), {"split": "test"},
                            "ROOT/oxford-iiit-pet/images/*.jpg and "
                            "ROOT/oxford-iiit-pet/annotations/{trainval,test}.txt"),
}
IMAGEFOLDER_LAYOUT = "DIR/train/<class>/<image> and DIR/test/<class>/<image> (or DIR/val/...)"
DATASET_NAMES = (*RECIPES, "imagefolder")


@dataclass(frozen=True)
class DatasetArg:
    name: str
    root: Path

    @property
    def label(self) -> str:
        """Column name in tables: the dataset name, or the folder name for ImageFolder roots."""
        return self.root.name if self.name == "imagefolder" else self.name


def parse_dataset_arg(text: str) -> DatasetArg:
    name, sep, root = text.partition(":")
    name = name.strip().lower()
    if not sep or not root:
        raise DatasetError(f"dataset {text!r}: expected NAME:ROOT with NAME one of {', '.join(DATASET_NAMES)}")
    if name not in DATASET_NAMES:
        raise DatasetError(f"dataset {text!r}: unknown name {name!r}; valid: {', '.join(DATASET_NAMES)}")
    return DatasetArg(name, Path(root).expanduser())


@dataclass
class Split:
    """One split of a dataset with its labels known up front (k-shot sampling needs them before decoding)."""

    dataset: Dataset
    labels: np.ndarray  # [N] int64
    classes: list[str]


def _labels_of(ds: Dataset) -> np.ndarray:
    """Labels without decoding images: every torchvision class here keeps them in an attribute."""
    if isinstance(ds, ConcatDataset):
        return np.concatenate([_labels_of(d) for d in ds.datasets])
    for attr in ("targets", "_labels"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    if hasattr(ds, "_samples"):  # StanfordCars
        return np.asarray([label for _, label in ds._samples], dtype=np.int64)
    raise TypeError(f"cannot read labels of {type(ds).__name__} without decoding it")


def _construct(arg: DatasetArg, cls: type, kwargs: dict, transform: Callable | None) -> Dataset:
    try:
        return cls(str(arg.root), transform=transform, download=False, **kwargs)
    except (RuntimeError, OSError, ValueError, KeyError, IndexError, ImportError) as err:
        raise DatasetError(
            f"dataset {arg.name}:{arg.root}: torchvision.datasets.{cls.__name__}({kwargs}) could not load it "
            f"({type(err).__name__}: {err}). It expects {RECIPES[arg.name].layout}"
        ) from None


def _imagefolder(arg: DatasetArg, split: str, transform: Callable | None) -> Split:
    folder = arg.root / split
    if split == "test" and not folder.is_dir() and (arg.root / "val").is_dir():
        folder = arg.root / "val"
    if not folder.is_dir():
        raise DatasetError(f"dataset imagefolder:{arg.root}: no folder {folder}; expected {IMAGEFOLDER_LAYOUT}")
    try:
        ds = tvd.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, OSError) as err:
        raise DatasetError(f"dataset imagefolder:{arg.root}: {err}; expected {IMAGEFOLDER_LAYOUT}") from None
    return Split(ds, _labels_of(ds), list(ds.classes))


def load_split(arg: DatasetArg, split: str, transform: Callable | None = None) -> Split:
    """`split` is "train" (the train pool) or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if not arg.root.is_dir():
        expected = IMAGEFOLDER_LAYOUT if arg.name == "imagefolder" else RECIPES[arg.name].layout
        raise DatasetError(f"dataset {arg.name}:{arg.root}: root folder does not exist; expected {expected}")
    if arg.name == "imagefolder":
        return _imagefolder(arg, split, transform)
    recipe = RECIPES[arg.name]
    parts = [_construct(arg, recipe.cls, kw, transform) for kw in (recipe.train if split == "train" else (recipe.test,))]
    ds = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    classes = list(getattr(parts[0], "classes", []))
    labels = _labels_of(ds)
    if not classes:
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    return Split(ds, labels, classes)


def load_dataset(arg: DatasetArg, transform: Callable | None = None) -> tuple[Split, Split]:
    """Train pool and test split, checked: >= 2 classes, the same classes in both, no empty split."""
    train, test = load_split(arg, "train", transform), load_split(arg, "test", transform)
    where = f"dataset {arg.name}:{arg.root}"
    for split_name, s in (("train", train), ("test", test)):
        if len(s.labels) == 0:
            raise DatasetError(f"{where}: the {split_name} split has no images")
    if train.classes != test.classes:
        raise DatasetError(f"{where}: train and test have different classes "
                           f"({len(train.classes)} vs {len(test.classes)}: "
                           f"{sorted(set(train.classes) ^ set(test.classes))[:5]} ...)")
    present = np.unique(train.labels)
    if len(present) < 2:
        raise DatasetError(f"{where}: the train split has {len(present)} class(es) "
                           f"({[train.classes[i] for i in present]}); a classifier needs at least 2")
    return train, test


def cap_per_class(split: Split, max_per_class: int | None) -> Split:
    """The first `max_per_class` images of each class (in dataset order, so the same subset every run)."""
    if max_per_class is None:
        return split
    keep = np.sort(np.concatenate(
        [np.flatnonzero(split.labels == c)[:max_per_class] for c in np.unique(split.labels)]))
    return Split(Subset(split.dataset, keep.tolist()), split.labels[keep], split.classes)
