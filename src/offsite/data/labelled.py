"""Labelled data for classifiers: texts or images, one class label each.

Formats (`read_data` dispatches here):
- jsonl lines `{"text": "...", "label": L}` or `{"image": "path", "label": L}` (a relative image path is
  relative to the jsonl file); L is a label name (string) or an index (integer).
- An image folder: `DIR/<label>/*.png|jpg|jpeg` (e.g. `--data photos/train`); the label names are the
  subfolder names.
- The IDX format of MNIST-style datasets: `*-images-idx3-ubyte[.gz]`, with `*-labels-idx1-ubyte[.gz]` beside it.

Label names are sorted (integer labels keep their order), so the same data always gives the same
indices. Images are decoded only when a batch needs them (`load_image`), and a file that is not an
image gets a one-line error naming it.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np

from offsite.data.types import LabelledData, LabelledExample
from offsite.errors import OffsiteError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IDX_IMAGES = "-images-idx3-ubyte"


def labelled_records(records: list[tuple[dict, str]], path: Path) -> LabelledData:
    """LabelledData from parsed jsonl records (record, "file:line"), all with a "label"."""
    modality = "image" if "image" in records[0][0] else "text"
    raw: list[tuple[Any, Any]] = []
    for record, where in records:
        field = "image" if modality == "image" else "text"
        if field not in record:
            raise OffsiteError(f"{where}: expected a '{field}' field like the first labelled line; use one kind "
                               "of line per file")
        value, label = record[field], record["label"]
        if not isinstance(value, str) or not value.strip():
            raise OffsiteError(f"{where}: field '{field}' must be a non-empty string")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, int) and label < 0):
            raise OffsiteError(f"{where}: field 'label' must be a label name or an index (0 or more), got {label!r}")
        if modality == "image":
            value = str((path.parent / value) if not Path(value).is_absolute() else Path(value))
        raw.append((value, label))
    if len({type(label) for _, label in raw}) > 1:
        raise OffsiteError(f"{path}: labels mix names and indices; use one or the other")
    return _indexed(raw, modality, str(path))


def read_image_folder(root: Path, flag: str) -> LabelledData:
    """`root/<label>/*.png|jpg`: one subfolder per label."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    raw = [(str(image), folder.name) for folder in folders
           for image in sorted(folder.iterdir()) if image.suffix.lower() in IMAGE_SUFFIXES]
    if not raw:
        raise OffsiteError(f"{flag} {root}: no images found; an image folder holds one subfolder per label with "
                           f"{', '.join(IMAGE_SUFFIXES)} files in it")
    return _indexed(raw, "image", str(root))


def read_idx(images: Path, flag: str) -> LabelledData:
    """An IDX image file and its labels file (same name with `-labels-idx1-ubyte`)."""
    labels_path = images.with_name(images.name.replace(IDX_IMAGES, "-labels-idx1-ubyte").replace("idx3", "idx1"))
    if not labels_path.is_file():
        raise OffsiteError(f"{flag} {images}: its labels file {labels_path.name} is missing beside it")
    pixels, labels = _idx_array(images, 3, flag), _idx_array(labels_path, 1, flag)
    if len(pixels) != len(labels):
        raise OffsiteError(f"{flag} {images}: {len(pixels)} images but {labels_path.name} has {len(labels)} labels")
    return _indexed([(image, int(label)) for image, label in zip(pixels, labels)], "image", str(images))


def labelled_lines(data: LabelledData, jsonl: Path) -> list[dict[str, Any]]:
    """The jsonl lines of `data` ({"text"|"image", "label": name}); images held in memory (IDX pixels) are
    written as PNG files in a folder beside `jsonl` (`NAME.images/`), which the lines name relatively."""
    field = "image" if data.modality == "image" else "text"
    folder = jsonl.with_name(jsonl.stem + ".images")
    lines = []
    for number, example in enumerate(data.examples):
        value = example.input
        if isinstance(value, np.ndarray):
            from PIL import Image  # noqa: PLC0415 - only image tasks need it

            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(value).save(folder / f"{number:06d}.png")  # lossless: the same pixels read back
            value = f"{folder.name}/{number:06d}.png"
        lines.append({field: value, "label": data.labels[example.label]})
    return lines


def load_image(source: Any):
    """A PIL RGB image from a path or an IDX array; a file that is not an image gets a one-line error."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - only image tasks need it

    if isinstance(source, np.ndarray):
        return Image.fromarray(source).convert("RGB")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise OffsiteError(f"{source}: not a readable image ({error.__class__.__name__}); fix or remove the file"
                           ) from None


def _indexed(raw: list[tuple[Any, Any]], modality: str, source: str) -> LabelledData:
    names = sorted({label for _, label in raw})
    index = {name: i for i, name in enumerate(names)}
    return LabelledData([LabelledExample(value, index[label]) for value, label in raw],
                        tuple(str(name) for name in names), modality, source)


def _idx_array(path: Path, dimensions: int, flag: str) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
        zero, kind, count = struct.unpack(">HBB", data[:4])
        if zero != 0 or kind != 0x08 or count != dimensions:
            raise ValueError(f"header says type {kind:#x} with {count} dimensions")
        shape = struct.unpack(f">{count}I", data[4: 4 + 4 * count])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * count)
        return array.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as error:
        raise OffsiteError(f"{flag} {path}: not an IDX file of unsigned bytes with {dimensions} dimension(s) "
                           f"({error})") from None
