"""The Python API that the CLI and batch jobs share: quantize, load, evaluate."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .checkpoint.reload import is_quantized_checkpoint, load_quantized
from .config import QuantConfig
from .data.windows import BOS_MODES, resolve_bos
from .errors import UsageError
from .eval.perplexity import PerplexityResult, perplexity_on
from .eval.zeroshot import LoadedTasks, ZeroShotSettings, evaluate_tasks, load_tasks, result_key
from .data.sources import load_text
from .distributed import is_main_process
from .models.builtin import BUILTIN_MODELS, cache_dir
from .models.reader import resolve_model_path
from .pipeline import check_model, open_model, quantize
from .plan import Plan, check_disk, make_plan
from .resources import resolve_device

__all__ = ["QuantConfig", "ZeroShotSettings", "Plan", "quantize", "plan", "load", "load_tokenizer", "check_bos",
           "is_main_process",
           "evaluate", "evaluate_perplexity", "evaluate_zeroshot", "results_path", "stored_results"]


def plan(config: QuantConfig) -> Plan:
    """The memory and disk plan of quantizing with `config`, from config.json and the safetensors headers (and the
    calibration text's length, which sizes its tokenization): no weight is read. `plan.problem` says what does not fit and which option fixes it (None when all fits); disk is
    checked where config.out goes (the current folder when it has none). A CUDA device this machine lacks is
    planned for without a fit check of its memory."""
    _, device, lazy = open_model(config, planning=True)
    check_model(lazy, config)
    result = make_plan(lazy, config, device, len(load_text(config.calib, "calib")))
    short = check_disk(result, config.out or ".")
    result.problem = result.problem or short
    return result


def load(model: str | Path, packed: bool = False, device: str = "cpu") -> tuple[torch.nn.Module, Any, dict | None]:
    """(model, tokenizer, quantease info or None) for a quantease checkpoint, a built-in name or an HF folder.

    A checkpoint's linears are dequantized once (nn.Linear of Ŵ); `packed=True` keeps the codes packed in memory
    (QuantLinear, dequantized on every forward: slower, but the weights take bits/32 of the memory)."""
    if is_quantized_checkpoint(model):
        net, info = load_quantized(Path(model), dense=not packed)
    else:
        net = AutoModelForCausalLM.from_pretrained(resolve_model_path(str(model)), dtype=torch.float32).eval()
        info = None
    return net.to(resolve_device(device)), load_tokenizer(model), info


def load_tokenizer(model: str | Path) -> Any:
    """The tokenizer of a quantease checkpoint, a built-in name or an HF folder (cheap: no weights are read)."""
    return AutoTokenizer.from_pretrained(model if is_quantized_checkpoint(model) else resolve_model_path(str(model)))


def check_bos(model: str | Path, bos: str) -> str:
    """The BOS mode `bos` resolves to for `model`'s tokenizer (every, first or never); a mode the tokenizer cannot
    meet is an error naming the model, raised before any weights load."""
    if bos not in BOS_MODES:
        raise UsageError(f"bos must be one of {', '.join(BOS_MODES)}, got {bos!r}")
    try:
        return resolve_bos(load_tokenizer(model), bos)
    except UsageError as e:
        raise UsageError(f"{model}: {e}") from None


def evaluate_perplexity(
    model: str | Path, datasets: list[str], seqlen: int = 2048, limit: int | None = None, device: str = "auto",
    packed: bool = False, progress: bool = True, save: bool = True, bos: str = "auto",
) -> list[PerplexityResult]:
    """Perplexity of `model` on each dataset with the BOS mode `bos` (auto, every, first, never; see
    data/windows.py); the results are also saved in `results_path(model)`."""
    check_bos(model, bos)  # before the model loads
    net, tokenizer, _ = load(model, packed=packed, device=device)
    dev = next(net.parameters()).device
    results = [perplexity_on(net, tokenizer, d, seqlen, limit, dev, progress, bos) for d in datasets]
    if save:
        _save_eval(results_path(model), "perplexity", {_ppl_key(r): r.to_dict() for r in results})
    return results


def _ppl_key(r: PerplexityResult) -> str:
    """The protocol is in the key; the BOS mode is named unless it is the one used before --bos existed, so results
    saved then keep their keys and no two BOS modes share one."""
    return f"{r.dataset}:seqlen={r.seqlen}:windows={r.windows}" + ("" if r.legacy else f":bos={r.bos}")


def evaluate_zeroshot(
    model: str | Path, tasks: list[str], limit: int | None = None, num_fewshot: int = 0, batch_size: int = 1,
    device: str = "auto", tasks_dir: str | Path | None = None, save: bool = True, packed: bool = False,
    bos: str = "auto",
) -> dict[str, dict]:
    """lm-eval accuracy of `model` on each task: {task: {metric: value, "protocol": {...}, "seconds": s}}.

    `limit` caps the documents per task; `bos` says whether each request starts with BOS (see
    zeroshot.lm_tokenizer). The results are also saved in `results_path(model)` under "zeroshot", keyed by task,
    few-shot count and limit (and the BOS mode where it is not the tokenizer's own). Task names and data are
    checked before the model loads.
    """
    settings = ZeroShotSettings(tuple(tasks), limit, num_fewshot, batch_size, str(tasks_dir) if tasks_dir else None,
                                bos)
    return _zeroshot(model, settings, load_tasks(settings), device, packed, save)


def _zeroshot(model: str | Path, settings: ZeroShotSettings, loaded: LoadedTasks, device: str, packed: bool,
              save: bool) -> dict[str, dict]:
    check_bos(model, settings.bos)
    net, tokenizer, _ = load(model, packed=packed, device=device)
    results = evaluate_tasks(net, tokenizer, loaded, settings)
    if save:
        _save_eval(results_path(model), "zeroshot", {result_key(t, r["protocol"]): r for t, r in results.items()})
    return results


def evaluate(
    model: str | Path, datasets: list[str], zeroshot: ZeroShotSettings | None = None, seqlen: int = 2048,
    limit: int | None = None, device: str = "auto", packed: bool = False, progress: bool = True, save: bool = True,
    bos: str = "auto",
) -> dict[str, dict]:
    """Perplexity on `datasets` (BOS mode `bos`) and the lm-eval tasks of `zeroshot` (its own `bos`), in eval.json's
    layout: {"perplexity": {key: result}, "zeroshot": {key: result}}, each key naming the protocol. The tasks are
    loaded before anything runs."""
    loaded = load_tasks(zeroshot) if zeroshot else None
    out: dict[str, dict] = {}
    if datasets:
        ppl = evaluate_perplexity(model, datasets, seqlen, limit, device, packed, progress, save, bos)
        out["perplexity"] = {_ppl_key(r): r.to_dict() for r in ppl}
    if zeroshot and loaded:
        acc = _zeroshot(model, zeroshot, loaded, device, packed, save)
        out["zeroshot"] = {result_key(t, r["protocol"]): r for t, r in acc.items()}
    return out


def results_path(model: str | Path) -> Path:
    """Where the evaluation results of `model` are kept: DIR/eval.json for a quantease checkpoint; for a built-in
    name or another folder, a file under the cache (a folder's name plus a hash of its absolute path)."""
    if is_quantized_checkpoint(model):
        return Path(model) / "eval.json"
    if str(model) in BUILTIN_MODELS:
        return cache_dir() / "eval" / f"{model}.json"
    path = Path(model).resolve()
    return cache_dir() / "eval" / f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:10]}.json"


def stored_results(model: str | Path) -> dict:
    """The saved results of `model`: {"perplexity": {key: result}, "zeroshot": {key: result}} (either may be absent)."""
    path = results_path(model)
    return json.loads(path.read_text()) if path.exists() else {}


def _save_eval(path: Path, section: str, entries: dict[str, dict]) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault(section, {}).update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
