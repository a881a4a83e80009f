"""How a training folder's classes map onto a pretrained model's class ids.

A DiT trained on ImageNet-1k numbers its classes in the standard order of the 1,000 ILSVRC-2012
synsets (``n01440764`` = 0, tench, ... ``n15075141`` = 999, toilet tissue: the sorted WordNet ids, as
``torchvision.datasets.ImageFolder`` orders an ImageNet train folder). That list ships with this
package (``imagenet_synsets.txt``). A folder whose class folders are synsets, or names from the source
pipeline's ``id2label``, maps onto the source's ids; any other class set needs a new class embedding.
"""

from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Sequence

IMAGENET_NUM_CLASSES = 1000


@functools.lru_cache(maxsize=1)
def imagenet_synsets() -> List[str]:
    """The 1,000 ImageNet-1k WordNet ids in class-id order."""
    path = os.path.join(os.path.dirname(__file__), "imagenet_synsets.txt")
    with open(path, encoding="ascii") as handle:
        synsets = handle.read().split()
    if len(synsets) != IMAGENET_NUM_CLASSES:
        raise RuntimeError(f"{path} holds {len(synsets)} synsets, not {IMAGENET_NUM_CLASSES}; the install is damaged")
    return synsets


def label_names(id2label: Dict[int, str]) -> Dict[str, int]:
    """Every name of ``id2label`` (DiT writes synonyms as ``"tench, Tinca tinca"``), lower-cased, -> id.
    A name of several classes maps to one of them: check :func:`ambiguous_names` first."""
    return {name.strip().lower(): k for k, v in id2label.items() for name in str(v).split(",") if name.strip()}


def ambiguous_names(id2label: Dict[int, str], lower: bool = True) -> Dict[str, List[int]]:
    """The names of ``id2label`` that name more than one class (ImageNet's "crane" is 134, the bird, and
    517, the machine), -> their ids."""
    ids: Dict[str, List[int]] = {}
    for k, v in sorted(id2label.items()):
        for name in str(v).split(","):
            name = name.strip().lower() if lower else name.strip()
            if name and int(k) not in ids.setdefault(name, []):
                ids[name].append(int(k))
    return {name: found for name, found in ids.items() if len(found) > 1}


def describe_ids(ids: Sequence[int], id2label: Optional[Dict[int, str]] = None) -> str:
    """Class ids as a reader can tell them apart: with their ImageNet synset (1,000-class models) and names."""
    synsets = imagenet_synsets() if id2label is not None and len(id2label) == IMAGENET_NUM_CLASSES else None
    parts = []
    for i in ids:
        what = [synsets[i]] if synsets else []
        if id2label is not None and id2label.get(i):
            what.append(repr(id2label[i]))
        parts.append(f"{i} ({', '.join(what)})" if what else str(i))
    return "; ".join(parts)


def refuse_ambiguous(names: Sequence[str], id2label: Dict[int, str], what: str, lower: bool = True) -> None:
    """A ``ValueError`` for the first of ``names`` that names several classes of ``id2label``, listing them."""
    ambiguous = ambiguous_names(id2label, lower)
    for name in names:
        key = str(name).strip().lower() if lower else str(name).strip()
        if key in ambiguous:
            raise ValueError(f"{what} {name!r} names {len(ambiguous[key])} classes: "
                             f"{describe_ids(ambiguous[key], id2label)}; give the class id (or its synset) instead")


def map_classes(classes: Sequence[str], num_classes: int, id2label: Optional[Dict[int, str]] = None,
                source: str = "the model") -> Dict[int, int]:
    """``{data class index: model class id}`` for class folders ``classes`` and a model of
    ``num_classes`` classes named by ``id2label``.

    The folders map when they are (1) the model's own classes in order (the same names, or no names
    and the same count), (2) ImageNet synsets and the model has 1,000 classes, or (3) names (or
    synonyms) from ``id2label``, case aside. Anything else raises ``ValueError`` naming the folders
    that match nothing and the way out (``--class_embedding new``).
    """
    classes = [str(c) for c in classes]
    identity = {i: i for i in range(len(classes))}
    if id2label:
        if len(classes) == num_classes and all(classes[i] == id2label.get(i) for i in identity):
            return identity
    elif len(classes) == num_classes:
        return identity
    if num_classes == IMAGENET_NUM_CLASSES:
        index = {synset: i for i, synset in enumerate(imagenet_synsets())}
        if all(c in index for c in classes):
            return {i: index[c] for i, c in enumerate(classes)}
    if id2label:
        names = label_names(id2label)
        if all(c.strip().lower() in names for c in classes):
            refuse_ambiguous(classes, id2label, "the class folder")
            return {i: names[c.strip().lower()] for i, c in enumerate(classes)}
    unknown = [c for c in classes if c.strip().lower() not in label_names(id2label or {})
               and not (num_classes == IMAGENET_NUM_CLASSES and c in imagenet_synsets())]
    named = "ImageNet synsets (n01440764, ...)" if num_classes == IMAGENET_NUM_CLASSES else "its class names"
    raise ValueError(
        f"the data's {len(classes)} class folders do not map onto the {num_classes} classes of {source}: "
        f"{len(unknown)} folder(s) match none of {named}{' or its id2label names' if id2label else ''} "
        f"(e.g. {unknown[:5]}). Name the folders after the model's classes, or train a new class embedding "
        f"sized to the data with --class_embedding new (every other weight is kept)")


def mapped_id2label(id2label: Dict[int, str], classes: Sequence[str], mapping: Dict[int, int]) -> Dict[int, str]:
    """The source's ``id2label`` with each trained folder name added as a synonym of its class, so that
    the saved pipeline takes both the model's names and the folder names."""
    result = dict(id2label)
    for index, class_id in mapping.items():
        name = str(classes[index]).strip()
        present = [n.strip().lower() for n in result.get(class_id, "").split(",")]
        if name.lower() not in present:
            result[class_id] = f"{result[class_id]}, {name}" if result.get(class_id) else name
    return result


class MappedLabels:
    """A dataset whose labels (data class indices) come out as model class ids, ``class_ids[label]``."""

    def __init__(self, dataset, class_ids: Sequence[int]):
        self.dataset, self.class_ids = dataset, list(class_ids)
        self.classes = dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item, label = self.dataset[index]
        return item, self.class_ids[int(label)]
