"""Zero-shot (or few-shot) accuracy through lm-eval on a model already in memory.

A name in LOCAL_TASKS runs from the offline copy that `tasks.prepare_tasks` builds; a name defined by a YAML in the
user's `tasks_dir` runs from there (it wins over ours); any other name is handed to lm-eval as a standard task, which
works when its data are already in the local Hugging Face cache. Tasks and their documents are loaded before the
model, so a wrong name or missing data fails fast. Each task gets its own `simple_evaluate` call so its time is
measured, and its metrics are returned beside the protocol that produced them.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..data.windows import BOS_MODES, adds_bos, auto_bos, resolve_bos
from ..errors import DataError, UsageError
from .tasks import LOCAL_TASKS, LocalTask, prepare_tasks, standard_tasks_dir, tasks_root

__all__ = ["ZeroShotSettings", "LoadedTasks", "load_tasks", "evaluate_tasks", "result_key", "lm_tokenizer"]

# Draws for the bootstrap stderr of non-mean metrics (LAMBADA perplexity): lm-eval's default of 100000 takes minutes
# on a CPU, and only the stderr depends on it.
_BOOTSTRAP_ITERS = 1000


@dataclass(frozen=True)
class ZeroShotSettings:
    tasks: tuple[str, ...]
    limit: int | None = None  # documents per task (the first ones of the split); None: all
    num_fewshot: int = 0
    batch_size: int = 1
    tasks_dir: str | None = None  # extra lm-eval task YAMLs
    bos: str = "auto"  # BOS before each request: auto, every, first (= every: each request is its own text), never

    def __post_init__(self) -> None:
        if not self.tasks:
            raise UsageError("no tasks given")
        if self.bos not in BOS_MODES:
            raise UsageError(f"bos must be one of {', '.join(BOS_MODES)}, got {self.bos!r}")
        for what, value, low in (("task limit", self.limit, 1), ("num_fewshot", self.num_fewshot, 0),
                                 ("batch size", self.batch_size, 1)):
            if value is not None and value < low:
                raise UsageError(f"{what} must be >= {low}, got {value}")
        if self.tasks_dir is not None and not Path(self.tasks_dir).is_dir():
            raise UsageError(f"--tasks-dir {self.tasks_dir} is not a folder of lm-eval task YAMLs")


@dataclass
class LoadedTasks:
    manager: Any  # lm_eval.tasks.TaskManager that indexed our copies, the user's folder and maybe lm-eval's own
    tasks: dict[str, Any]  # name -> lm_eval Task with its documents loaded


def result_key(task: str, protocol: dict) -> str:
    """Key of a result in eval.json: the settings that make two results comparable. The BOS mode is named only
    when it is not the tokenizer's own behaviour (what every result saved before --bos used)."""
    key = f"{task}:fewshot={protocol['num_fewshot']}:limit={protocol['limit'] or 'all'}"
    bos = protocol.get("bos")
    return key if bos is None or bos == auto_bos(protocol["adds_bos"]) else f"{key}:bos={bos}"


def lm_tokenizer(tokenizer: Any, bos: str) -> tuple[Any, bool | None, str]:
    """(tokenizer for HFLM, its add_bos_token, the mode used: every or never) for a BOS mode.

    lm-eval encodes each request (context + continuation, few-shot examples included) as one text: with
    add_bos_token=None with the tokenizer's default special tokens, with False without any. It never prepends a BOS
    itself, so "every" with a tokenizer that has a BOS but does not add it gets a copy that does; and since each
    request is a text of its own, "first" is "every". Under "never" a request with an empty context is still
    conditioned on lm-eval's prefix token (BOS, else EOS): there is nothing else to condition on.
    """
    mode = resolve_bos(tokenizer, bos)
    if mode == "never":
        return tokenizer, False, "never"
    if adds_bos(tokenizer):
        return tokenizer, None, "every"
    return _with_bos(tokenizer), None, "every"


def _with_bos(tokenizer: Any) -> Any:
    """A copy of the tokenizer that puts its BOS before every text it encodes with special tokens."""
    copy = deepcopy(tokenizer)
    copy.add_bos_token = True  # tokenizers-backed classes rebuild their post-processor from it, others read it
    if not adds_bos(copy):
        raise UsageError(f"--bos every: cannot make this {type(tokenizer).__name__} add its BOS for lm-eval; "
                         "use --bos auto or never")
    return copy


def load_tasks(settings: ZeroShotSettings) -> LoadedTasks:
    manager = _task_manager(settings.tasks, settings.tasks_dir)
    return LoadedTasks(manager, {name: _load(manager, name) for name in settings.tasks})


def evaluate_tasks(model: torch.nn.Module, tokenizer: Any, loaded: LoadedTasks,
                   settings: ZeroShotSettings) -> dict[str, dict]:
    """{task: {metric: value, ..., "higher_is_better": {...}, "protocol": {...}, "seconds": s}} for each task."""
    from lm_eval.models.huggingface import HFLM

    lm_tok, add_bos_token, bos = lm_tokenizer(tokenizer, settings.bos)
    lm = HFLM(pretrained=model, tokenizer=lm_tok, batch_size=settings.batch_size, add_bos_token=add_bos_token)
    bos_protocol = {"bos": bos, "adds_bos": adds_bos(tokenizer)}
    return {name: _run(lm, loaded.manager, task, settings, bos_protocol) for name, task in loaded.tasks.items()}


@contextlib.contextmanager
def _quiet_overrides() -> Iterator[None]:
    """Our YAMLs replace lm-eval's tasks of the same name on purpose; hide the index's warning about it."""
    log = logging.getLogger("lm_eval.tasks._index")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _task_manager(tasks: tuple[str, ...], tasks_dir: str | None):
    from lm_eval.tasks import TaskManager

    paths = [prepare_tasks([t for t in tasks if t in LOCAL_TASKS])] + ([Path(tasks_dir)] if tasks_dir else [])
    with _quiet_overrides():
        manager = TaskManager(include_path=paths, include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):  # standard names: index lm-eval's own tasks too (~10 s)
            manager = TaskManager(include_path=paths)
    return manager


def _load(manager, name: str):
    """The lm-eval Task for `name` with its documents; missing data become one clear line."""
    try:
        loaded = manager.load([name])
    except KeyError:
        raise UsageError(f"unknown task {name!r}: use one of {', '.join(LOCAL_TASKS)} (prepared offline), an lm-eval "
                         "task name, or a task defined in --tasks-dir") from None
    except OSError as e:  # datasets' offline and not-found errors
        raise DataError(f"task {name!r}: its data are not available locally and cannot be downloaded here "
                        f"({str(e).splitlines()[0]}); write a task YAML that reads local files and pass --tasks-dir"
                        ) from e
    if loaded.get("groups") or list(loaded["tasks"]) != [name]:
        raise UsageError(f"{name!r} is a group of tasks; name them instead: {', '.join(loaded['tasks'])}")
    return loaded["tasks"][name]


def _run(lm, manager, task, settings: ZeroShotSettings, bos_protocol: dict) -> dict:
    import lm_eval

    name = task.config.task
    task.set_config(key="num_fewshot", value=settings.num_fewshot)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints progress notes; stdout is for our results
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=settings.limit,
                                      log_samples=False, bootstrap_iters=_BOOTSTRAP_ITERS)
    seconds = time.perf_counter() - start
    metrics = _metrics(out["results"][name])
    hib = out["higher_is_better"][name]
    return {**metrics, "higher_is_better": {m: hib[m] for m in metrics if m in hib},
            "protocol": _protocol(task, manager, out, settings, lm.max_length) | bos_protocol,
            "seconds": round(seconds, 2)}


def _metrics(result: dict) -> dict[str, float]:
    """lm-eval's "acc,none" -> "acc"; other filters keep their suffix; "N/A" stderrs and the alias are dropped."""
    out = {}
    for key, value in result.items():
        metric, _, filt = key.partition(",")
        if filt and isinstance(value, (int, float)):
            out[metric if filt == "none" else key] = float(value)
    return out


def _protocol(task, manager, out: dict, settings: ZeroShotSettings, max_length: int) -> dict:
    import lm_eval

    name = task.config.task
    n = out["n-samples"][name]
    data, local = _origin(manager, name)
    fewshot_split = _fewshot_split(task) if settings.num_fewshot else None
    substitution = None
    if fewshot_split and local and local.standard_fewshot_split not in (None, *local.split_names):
        substitution = (f"few-shot examples from {fewshot_split}: the standard task takes them from "
                        f"{local.standard_fewshot_split}, which is not available offline")
    return {"task": name, "split": task.config.test_split if task.has_test_docs() else task.config.validation_split,
            "documents": n["effective"], "of": n["original"], "limit": settings.limit,
            "num_fewshot": settings.num_fewshot, "fewshot_split": fewshot_split, "max_length": max_length,
            "data": data, "substitution": substitution, "task_version": out["versions"][name],
            "lm_eval": lm_eval.__version__}


def _fewshot_split(task) -> str | None:
    """Where lm-eval draws few-shot examples: fewshot_split, else train, else validation, else test."""
    c = task.config
    return c.fewshot_split or c.training_split or c.validation_split or c.test_split


def _origin(manager, name: str) -> tuple[str, LocalTask | None]:
    """Where the task's documents come from, and its LocalTask when it is one of our offline copies."""
    path = Path(manager.task_index[name].yaml_path).resolve()
    if path.is_relative_to(tasks_root().resolve()):
        return f"offline copy of the standard task: {LOCAL_TASKS[name].source}", LOCAL_TASKS[name]
    if path.is_relative_to(standard_tasks_dir().resolve()):
        return f"lm-eval standard task {path.name}, data from the local Hugging Face cache", None
    return f"user task {path}", None
