"""--bos: where calibration windows, perplexity windows and lm-eval requests get a BOS, per mode and per tokenizer.

Three tokenizers over one vocabulary: one that adds its BOS on its own (a TemplateProcessing post-processor, as the
Llama-3 and Gemma tokenizers do), one that has a BOS token but does not add it, and the shared test tokenizer that
has no BOS token at all.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from conftest import _ptb_sample, save_tiny_model, tiny_config
from quantease.cli import BOS_CHOICES, main
from quantease.data.windows import BOS_MODES, adds_bos, calibration_windows, eval_windows, fingerprint, tokenize
from quantease.errors import UsageError

SEQLEN = 32


def _train_tokenizer(post_processor: bool, path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_ptb_sample(100_000)], trainer)
    if post_processor:
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", bos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """The same tiny Llama weights with each tokenizer: 'adds' (adds BOS), 'has' (has one, does not add), 'none'."""
    root = tmp_path_factory.mktemp("bos")
    out = {}
    for name, post in (("adds", True), ("has", False)):
        tok = _train_tokenizer(post, root / f"tok-{name}")
        out[name] = save_tiny_model(tiny_config("llama", len(AutoTokenizer.from_pretrained(tok))), tok,
                                    root / f"llama-{name}")
    out["none"] = save_tiny_model(tiny_config("llama", len(AutoTokenizer.from_pretrained(tokenizer_dir))),
                                  tokenizer_dir, root / "llama-none")
    return out


@pytest.fixture(scope="module")
def toks(models) -> dict:
    return {name: AutoTokenizer.from_pretrained(path) for name, path in models.items()}


@pytest.fixture(scope="module")
def text(calib_file) -> str:
    return calib_file.read_text()


def test_the_tokenizers_are_what_the_tests_assume(toks):
    assert adds_bos(toks["adds"]) and toks["adds"].add_bos_token is False  # the config flag says otherwise
    assert not adds_bos(toks["has"]) and toks["has"].bos_token_id == toks["adds"].bos_token_id
    assert not adds_bos(toks["none"]) and toks["none"].bos_token_id is None


def test_windows_per_mode(toks, text):
    tok = toks["adds"]
    bos = tok.bos_token_id
    plain = torch.tensor(tok(text, add_special_tokens=False).input_ids)  # the text alone
    assert (plain == bos).sum() == 0
    for mode in ("auto", "every"):
        stream = tokenize(tok, text, mode)
        ev = eval_windows(stream, SEQLEN)
        assert stream.bos == "every" and (ev[:, 0] == bos).all() and (ev == bos).sum() == ev.shape[0]
        n = plain.numel() // (SEQLEN - 1)  # BOS + seqlen-1 consecutive text tokens per window
        assert ev.shape == (n, SEQLEN) and torch.equal(ev[:, 1:].reshape(-1), plain[: n * (SEQLEN - 1)])
        cal = calibration_windows(stream, 8, SEQLEN, seed=3)
        assert (cal[:, 0] == bos).all() and (cal == bos).sum() == 8
        starts = torch.randint(0, plain.numel() - (SEQLEN - 1) + 1, (8,), generator=torch.Generator().manual_seed(3))
        assert torch.equal(cal[:, 1:], torch.stack([plain[s : s + SEQLEN - 1] for s in starts.tolist()]))
        assert torch.equal(cal, calibration_windows(tokenize(tok, text, mode), 8, SEQLEN, seed=3))  # reproducible
    first = eval_windows(tokenize(tok, text, "first"), SEQLEN)
    assert (first == bos).sum() == 1 and first[0, 0] == bos
    assert torch.equal(first.reshape(-1)[1:], plain[: first.numel() - 1])
    never = eval_windows(tokenize(tok, text, "never"), SEQLEN)
    assert (never == bos).sum() == 0 and torch.equal(never.reshape(-1), plain[: never.numel()])
    # a tokenizer with a BOS it does not add: auto leaves it out, every and first put it in
    has = toks["has"]
    assert tokenize(has, text, "auto").bos == "never"
    assert (eval_windows(tokenize(has, text, "every"), SEQLEN)[:, 0] == bos).all()
    assert eval_windows(tokenize(has, text, "first"), SEQLEN)[0, 0] == bos


def test_a_tokenizer_without_bos(toks, text):
    assert tokenize(toks["none"], text, "auto").bos == "never"
    for mode in ("every", "first"):
        with pytest.raises(UsageError, match=f"--bos {mode} needs a BOS token, but this tokenizer has none"):
            tokenize(toks["none"], text, mode)
    with pytest.raises(UsageError, match="bos must be one of auto, every, first, never"):
        tokenize(toks["none"], text, "always")
    assert BOS_CHOICES == list(BOS_MODES)


def _direct_nll(model, windows: list[torch.Tensor]) -> float:
    """-sum log p(x_t | x_<t) over t = 2..L of each window, in fp64 from the model's logits."""
    total = 0.0
    with torch.no_grad():
        for ids in windows:
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), dim=-1)  # [L, vocab]
            total -= float(logp[:-1].gather(1, ids[1:, None]).sum())
    return total


@pytest.mark.parametrize("mode", ["auto", "every", "first", "never"])
def test_perplexity_equals_a_direct_computation(mode, models, toks, calib_file, text):
    from quantease.api import load
    from quantease.eval.perplexity import perplexity_on

    model, tok, _ = load(models["adds"])
    plain = tok(text, add_special_tokens=False).input_ids
    bos, n, L = tok.bos_token_id, 3, SEQLEN
    if mode in ("auto", "every"):  # BOS + the next L-1 text tokens
        windows = [[bos] + plain[k * (L - 1) : (k + 1) * (L - 1)] for k in range(n)]
    else:
        stream = ([bos] if mode == "first" else []) + plain
        windows = [stream[k * L : (k + 1) * L] for k in range(n)]
    r = perplexity_on(model, tok, str(calib_file), L, n, torch.device("cpu"), bos=mode)
    assert (r.bos, r.windows, r.tokens) == ("every" if mode == "auto" else mode, n, n * (L - 1))
    expected = _direct_nll(model, [torch.tensor(w) for w in windows])
    # fp32 logits, fp32 vs fp64 log-softmax: a few ulps of |logit| ~ 1e-6 relative per token
    assert r.nll * r.tokens == pytest.approx(expected, rel=1e-5)


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_eval_keys_and_protocol_line_per_mode(models, calib_file):
    from quantease.api import results_path

    model = str(models["adds"])
    lines = {}
    for mode in ("auto", "first", "never", "every"):
        res = run("eval", model, "--ppl", str(calib_file), "--seqlen", str(SEQLEN), "--limit", "2", "--bos", mode,
                  "--quiet")
        assert res.exit_code == 0, res.output
        lines[mode] = res.output.strip().splitlines()[-1]
    assert lines["auto"] == lines["every"] and f"BOS + {SEQLEN - 1} text tokens per window" in lines["auto"]
    assert "one BOS before the whole text (GPTQ)" in lines["first"] and "no BOS" in lines["never"]
    saved = json.loads(results_path(model).read_text())["perplexity"]
    base = f"{calib_file}:seqlen={SEQLEN}:windows=2"
    # first is what this tokenizer got before --bos existed, so it keeps the key that had no BOS mode in it
    assert {k: v["bos"] for k, v in saved.items()} == {base: "first", f"{base}:bos=every": "every",
                                                      f"{base}:bos=never": "never"}
    assert len({v["ppl"] for v in saved.values()}) == 3


def test_a_mode_the_tokenizer_cannot_meet_fails_before_any_work(models, calib_file, tmp_path):
    for args in (["eval", str(models["adds"]), str(models["none"]), "--ppl", str(calib_file), "--bos", "every"],
                 ["quantize", str(models["none"]), "--out", str(tmp_path / "q"), "--calib", str(calib_file),
                  "--bos", "first"],
                 ["quantize", str(models["none"]), "--out", str(tmp_path / "q"), "--calib", str(calib_file),
                  "--ppl", "ptb", "--ppl-bos", "every"]):
        res = run(*args)
        assert res.exit_code == UsageError.exit_code and res.output.count("\n") == 1, res.output
        assert res.output.startswith(f"error: {models['none']}: --bos") or res.output.startswith("error: --bos")
        assert "needs a BOS token, but this tokenizer has none" in res.output
    assert not (tmp_path / "q").exists()


def _quantize(model: Path, out: Path, calib: Path, *extra: str, fault: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "quantease.cli", "quantize", str(model), "--out", str(out), "--calib", str(calib),
           "--nsamples", "4", "--seqlen", str(SEQLEN), "--bits", "4", "--method", "rtn", "--quiet", *extra]
    return subprocess.run(cmd, env={**os.environ, "QUANTEASE_FAULT": fault}, capture_output=True, text=True,
                          timeout=300)


def test_a_run_with_another_bos_is_refused_naming_it(models, calib_file, tmp_path):
    out = tmp_path / "q"
    assert _quantize(models["adds"], out, calib_file, fault="block:0").returncode == -9
    mixed = _quantize(models["adds"], out, calib_file, "--bos", "first")
    assert mixed.returncode == 6
    assert "partial run made from different calibration data and settings" in mixed.stderr
    assert "(changed settings: bos auto -> first)" in mixed.stderr
    assert _quantize(models["adds"], out, calib_file).returncode == 0  # the same --bos resumes
    info = json.loads((out / "quantease.json").read_text())
    assert (info["config"]["bos"], info["calibration"]["bos"], info["calibration"]["tokenizer_adds_bos"]) == (
        "auto", "every", True)
    again = _quantize(models["adds"], out, calib_file, "--bos", "never")
    assert again.returncode == 6 and "complete checkpoint" in again.stderr
    assert "(changed settings: bos auto -> never)" in again.stderr
    res = run("inspect", str(out), "--no-layers")
    assert "BOS every (--bos auto)" in res.output


@pytest.mark.slow
def test_default_model_under_auto_is_what_it_was_before_bos(tmp_path):
    """SmolLM2's tokenizer adds no BOS: auto must give the windows, the calibration hash and the settings hash that
    the code before --bos gave, so its checkpoints, eval.json keys and published numbers stay valid."""
    from quantease.checkpoint.resume import _sha
    from quantease.config import QuantConfig
    from quantease.data.sources import load_text
    from quantease.models.builtin import resolve_builtin
    from quantease.pipeline import _settings

    tok = AutoTokenizer.from_pretrained(resolve_builtin("smollm2-135m"))
    assert not adds_bos(tok) and tok.bos_token is not None  # it has one (<|im_start|>) but does not add it
    calib = load_text("ptb", "calib")
    old = tok(calib, return_tensors="pt").input_ids[0]  # the old protocol: default special tokens, one stream
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, old.numel() - 512 + 1, (16,), generator=gen)
    old_windows = torch.stack([old[s : s + 512] for s in starts.tolist()])
    assert fingerprint(calibration_windows(tokenize(tok, calib), 16, 512, 0)) == fingerprint(old_windows)
    test = tok(load_text("ptb", "eval"), return_tensors="pt").input_ids[0]
    n = test.numel() // 2048
    assert torch.equal(eval_windows(tokenize(tok, load_text("ptb", "eval")), 2048), test[: n * 2048].reshape(n, 2048))
    # the settings hash of the README's W4 run, as the code before --bos computed it (main at 67a573f)
    config = QuantConfig(model="smollm2-135m", out=str(tmp_path), bits=4, nsamples=16, seqlen=512,
                         target="layer")  # the objective of that run (the default target was layer then)
    assert _sha(json.dumps(_settings(config, torch.float32), sort_keys=True).encode()) == SMOLLM2_W4_SETTINGS_SHA


SMOLLM2_W4_SETTINGS_SHA = "f8e446ef1f4b2fe000e1eecd96a217fda054d110c3ebeda396ee1506f1166c08"


def _sums_task(folder: Path) -> Path:
    """A tiny local lm-eval task (multiple choice, as every offline task we ship is)."""
    docs = [{"q": f"{a} plus {b} is", "choices": [f" {a + b}", f" {a + b + 1}"], "gold": 0}
            for a in range(3) for b in range(2)]
    (folder / "sums.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "sums.yaml").write_text(
        "task: sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'sums.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    return folder


def _lm_eval_inputs(model_dir: Path, bos: str, tasks_dir: Path, fewshot: int = 0) -> tuple[list[list[int]], dict]:
    """The token ids lm-eval's HFLM sends to the model (a forward pre-hook), and the result's protocol."""
    from quantease.api import load
    from quantease.eval.zeroshot import ZeroShotSettings, evaluate_tasks, load_tasks

    settings = ZeroShotSettings(("sums",), num_fewshot=fewshot, tasks_dir=str(tasks_dir), bos=bos)
    model, tok, _ = load(model_dir)
    seen: list[list[int]] = []

    def record(_module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        seen.extend(ids.tolist())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = evaluate_tasks(model, tok, load_tasks(settings), settings)["sums"]
    finally:
        handle.remove()
    return seen, result["protocol"]


@pytest.mark.parametrize("fewshot", [0, 2])
def test_lm_eval_requests_neither_double_nor_drop_bos(fewshot, models, toks, tmp_path):
    from quantease.eval.zeroshot import result_key

    tasks = _sums_task(tmp_path)
    bos = toks["adds"].bos_token_id
    rows = {(name, mode): _lm_eval_inputs(models[name], mode, tasks, fewshot)
            for name, mode in [("adds", "auto"), ("adds", "every"), ("adds", "first"), ("adds", "never"),
                               ("has", "auto"), ("has", "every")]}
    for (name, mode), (seen, protocol) in rows.items():
        with_bos = (name, mode) not in (("adds", "never"), ("has", "auto"))
        # batch size 1, so no padding; one row per document: its two choices are one token each, and the input is
        # context + continuation without its last token, so lm-eval scores both from one forward
        assert len(seen) == 6
        assert protocol["bos"] == ("every" if with_bos else "never") and protocol["adds_bos"] == (name == "adds")
        for ids in seen:  # exactly one BOS, at position 0; or none
            assert ids.count(bos) == int(with_bos) and (ids[0] == bos) == with_bos, (name, mode, ids)
    # the BOS is prepended and nothing else changes: the same requests as without it
    plain = sorted(map(tuple, rows["adds", "never"][0]))
    for key in (("adds", "auto"), ("adds", "every"), ("has", "every")):
        assert sorted(tuple(ids[1:]) for ids in rows[key][0]) == plain
    assert sorted(map(tuple, rows["has", "auto"][0])) == plain
    # keys: the tokenizer's own behaviour keeps the key results had before --bos; another mode is named
    assert result_key("sums", rows["adds", "auto"][1]).endswith(":limit=all")
    assert result_key("sums", rows["adds", "never"][1]).endswith(":limit=all:bos=never")
    assert result_key("sums", rows["has", "every"][1]).endswith(":limit=all:bos=every")


def test_comparison_rows_keep_bos_modes_apart():
    from quantease.eval.compare import compare

    def ppl(value: float, bos: str | None, adds: bool) -> dict:
        r = {"dataset": "wiki", "seqlen": 512, "windows": 8, "tokens": 4088, "ppl": value}
        return r | ({} if bos is None else {"bos": bos, "adds_bos": adds})

    cmp = compare({"no-bos-model": {"perplexity": {"a": ppl(20.0, "never", False), "b": ppl(21.0, "every", False)}},
                   "bos-model": {"perplexity": {"a": ppl(15.0, "every", True), "b": ppl(28.0, "first", True)}},
                   "saved-before": {"perplexity": {"a": ppl(19.0, None, False)}}})
    # each model under what auto gives its tokenizer (and results saved before --bos) share one row
    assert cmp.rows["ppl wiki (seqlen 512, 8 windows)"].values == {"no-bos-model": 20.0, "bos-model": 15.0,
                                                                    "saved-before": 19.0}
    assert cmp.rows["ppl wiki (seqlen 512, 8 windows, BOS every)"].values == {"no-bos-model": 21.0}
    assert cmp.rows["ppl wiki (seqlen 512, 8 windows, BOS first)"].values == {"bos-model": 28.0}


def test_sweep_evaluates_with_the_runs_bos_mode_once(models, calib_file, tmp_path, monkeypatch):
    import yaml

    import quantease.api as api
    from quantease.sweep import load_sweep, run_job

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": {"model": str(models["adds"]), "calib": str(calib_file), "nsamples": 2,
                                              "seqlen": SEQLEN, "method": "rtn"}, "grid": {"bos": ["first", "auto"]},
                                     "eval": {"ppl": [str(calib_file)], "seqlen": SEQLEN, "limit": 2}}))
    spec = load_sweep(sweep)
    for job in spec.jobs(tmp_path / "runs"):
        run_job(job, spec.eval, progress=False)
        saved = json.loads((Path(job.config.out) / "eval.json").read_text())["perplexity"]
        calibrated = json.loads((Path(job.config.out) / "quantease.json").read_text())["calibration"]["bos"]
        assert [r["bos"] for r in saved.values()] == [calibrated]  # eval defaults to the run's own mode
        calls = []
        monkeypatch.setattr(api, "evaluate_perplexity", lambda *a, **k: calls.append(a))
        run_job(job, spec.eval, progress=False)  # complete and evaluated under that mode: nothing to do
        monkeypatch.undo()
        assert calls == []
    bad = sweep.read_text().replace("limit: 2", "limit: 2\n  bos: sometimes")
    sweep.write_text(bad)
    with pytest.raises(UsageError, match="eval bos must be one of auto, every, first, never"):
        load_sweep(sweep)
