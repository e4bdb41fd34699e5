"""Reading training and evaluation data: plain text, or jsonl for language modelling and choice tasks.

Formats:
- `.txt`: one document of plain text (language modelling).
- `.jsonl`, one object per line, all lines of one kind:
  - `{"text": "..."}`: language modelling;
  - `{"context": "...", "choices": ["...", ...], "label": 0}`: a choice task. A choice is
    appended to the context verbatim, so it usually starts with a space (" sport");
  - `{"text": "...", "label": L}` or `{"image": "path", "label": L}`: labelled data for a
    classifier (see offsite.data.labelled, which also reads image folders and IDX files).
"""

from __future__ import annotations

import json
from pathlib import Path

from offsite.data import builtin
from offsite.data.labelled import IDX_IMAGES, labelled_lines, labelled_records, read_idx, read_image_folder
from offsite.data.types import ChoiceData, ChoiceExample, Data, LabelledData, TextData
from offsite.errors import OffsiteError
from offsite.files import atomic_file, read_text


def read_data(source: str | Path, flag: str = "--data", default_split: str = "train") -> Data:
    """Read a `.txt` or `.jsonl` file (see the module docstring), or a built-in dataset `NAME[:SPLIT]`."""
    path = Path(source)
    if not path.exists() and builtin.is_builtin(str(source)):
        return builtin.load_builtin(str(source), default_split)
    if path.is_dir():
        return read_image_folder(path, flag)
    if IDX_IMAGES in path.name and path.is_file():
        return read_idx(path, flag)
    if not path.is_file():
        raise OffsiteError(f"{flag} {source}: no such file; pass a .txt or .jsonl file or a built-in dataset "
                           f"({', '.join(builtin.BUILTIN)})")
    kind = path.suffix.lower()  # NOTES.TXT is a text file too
    if kind == ".txt":
        text = read_text(path, flag)
        if not text.strip():
            raise OffsiteError(f"{flag} {path} is empty")
        return TextData([text], str(path))
    if kind == ".jsonl":
        return _read_jsonl(path, flag)
    raise OffsiteError(f"{flag} {path}: unknown file type '{path.suffix}'; use .txt or .jsonl")


def _read_jsonl(path: Path, flag: str) -> Data:
    texts: list[str] = []
    examples: list[ChoiceExample] = []
    labelled: list[tuple[dict, str]] = []
    for number, line in enumerate(read_text(path, flag).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = _parse_line(line, where)
        if "label" in record and ("text" in record or "image" in record):
            labelled.append((record, where))
        elif "text" in record:
            texts.append(_text_record(record, where))
        else:
            examples.append(_choice_record(record, where))
        present = [name for name, found in (("text", texts), ("choice", examples), ("labelled", labelled)) if found]
        if len(present) > 1:
            raise OffsiteError(f"{where}: mixes {present[0]} lines with {present[1]} lines; use one kind per file")
    if labelled:
        return labelled_records(labelled, path)
    if texts:
        return TextData(texts, str(path))
    if examples:
        return ChoiceData(examples, str(path))
    raise OffsiteError(f"{flag} {path} holds no examples")


def _parse_line(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
        json.dumps(record, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\\ud800) is not text
    except json.JSONDecodeError as error:
        raise OffsiteError(f"{where}: invalid JSON ({error.msg}); each line must be one JSON object") from None
    except RecursionError:
        raise OffsiteError(f"{where}: the JSON nests too deeply; each line must be one flat JSON object") from None
    except UnicodeEncodeError:
        raise OffsiteError(f"{where}: a string holds a lone surrogate (e.g. \\ud800), which is not text; "
                           "fix or drop the line") from None
    if not isinstance(record, dict):
        raise OffsiteError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _text_record(record: dict, where: str) -> str:
    if not isinstance(record["text"], str):
        raise OffsiteError(f"{where}: field 'text' must be a string")
    return record["text"]


def _choice_record(record: dict, where: str) -> ChoiceExample:
    missing = [key for key in ("context", "choices", "label") if key not in record]
    if missing:
        raise OffsiteError(f"{where}: missing field(s) {missing}; a line is either "
                           '{"text": ...} or {"context": ..., "choices": [...], "label": int}')
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str) or not context.strip():
        raise OffsiteError(f"{where}: field 'context' must be a non-empty string (the text each choice continues)")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise OffsiteError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise OffsiteError(f"{where}: field 'label' must be an integer from 0 to {len(choices) - 1}, got {label!r}")
    return ChoiceExample(context, tuple(choices), label)


def read_text_corpus(source: str | Path, flag: str, purpose: str, default_split: str = "train") -> TextData:
    """`read_data` for a step that needs plain text; a choice dataset gets a one-line error naming `flag`."""
    corpus = read_data(source, flag, default_split)
    if not isinstance(corpus, TextData):
        raise OffsiteError(f"{flag} {source} is a choice dataset; {purpose} needs plain text")
    return corpus


def write_jsonl(data: Data, path: str | Path) -> Path:
    """Write data in the jsonl format `read_data` reads (temp name, then rename).

    Images held in memory (IDX pixels) are written as PNG files beside it (see `labelled_lines`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, ChoiceData):
        records = [{"context": e.context, "choices": list(e.choices), "label": e.label} for e in data.examples]
    elif isinstance(data, LabelledData):
        records = labelled_lines(data, path)
    else:
        records = [{"text": text} for text in data.texts]
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
