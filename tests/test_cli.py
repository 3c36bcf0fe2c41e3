"""The command line: end to end on a tiny model, and one-line errors with distinct exit codes on bad input."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from quantease.cli import main
from quantease.errors import CheckpointError, ModelNotFound, UnsupportedModel, UsageError

from conftest import save_tiny_model


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_quantize_then_eval(tiny_llama, calib_file, tmp_path):
    out = tmp_path / "q"
    res = run("quantize", str(tiny_llama), "--out", str(out), "--bits", "4", "--group-size", "32", "--calib",
              str(calib_file), "--nsamples", "4", "--seqlen", "64", "--quiet", "--ppl", str(calib_file), "--ppl-seqlen",
              "64", "--ppl-limit", "3")
    assert res.exit_code == 0, res.output
    assert "bits/weight" in res.output and "perplexity" in res.output
    info = json.loads((out / "quantease.json").read_text())
    assert info["config"]["bits"] == 4 and info["config"]["group_size"] == 32
    assert info["calibration"]["nsamples"] == 4 and len(info["calibration"]["tokens_sha256"]) == 64
    # codes + fp16 scale and packed zero per 32 weights: 4 + (16 + 4) / 32 bits
    assert info["summary"]["bits_per_weight"] == pytest.approx(4 + 20 / 32)
    assert all(0 <= layer["rel_error"] < 0.1 for layer in info["layers"].values())

    json_out = tmp_path / "ppl.json"
    res = run("eval", str(out), "--ppl", str(calib_file), "--seqlen", "64", "--limit", "2", "--quiet", "--json",
              str(json_out))
    assert res.exit_code == 0, res.output
    result = json.loads(json_out.read_text())[str(out)][0]
    assert result["windows"] == 2 and result["tokens"] == 2 * 63 and result["ppl"] > 1
    saved = json.loads((out / "eval.json").read_text())["perplexity"]
    assert any(v["ppl"] == result["ppl"] for v in saved.values())


def test_quantize_compare_adds_baselines_at_the_same_settings(tiny_llama, calib_file, tmp_path):
    out = tmp_path / "q"
    res = run("quantize", str(tiny_llama), "--out", str(out), "--bits", "3", "--compare", "rtn,gptq", "--calib",
              str(calib_file), "--nsamples", "4", "--seqlen", "64", "--quiet", "--ppl", str(calib_file),
              "--ppl-seqlen", "64", "--ppl-limit", "2")
    assert res.exit_code == 0, res.output
    infos = {m: json.loads((tmp_path / f"q-{m}" / "quantease.json").read_text()) for m in ("rtn", "gptq")}
    infos["quantease"] = json.loads((out / "quantease.json").read_text())
    for method, info in infos.items():
        assert info["config"]["method"] == method and info["config"]["bits"] == 3
        assert info["calibration"]["tokens_sha256"] == infos["quantease"]["calibration"]["tokens_sha256"]
    table = res.output[res.output.index("model "):].splitlines()
    rows = [line.split()[0] for line in table[1:5]]
    assert rows == [str(tiny_llama), f"{out}-rtn", f"{out}-gptq", str(out)]
    # the coordinate descent never ends above the error of its GPTQ start, which RTN's is above
    err = {m: info["summary"]["mean_rel_error"] for m, info in infos.items()}
    assert err["quantease"] <= err["gptq"] < err["rtn"]


def _bad(args: list[str], error: type, message: str, out=None):
    res = run(*args)
    assert res.exit_code == error.exit_code, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert "Traceback" not in res.output
    if out is not None:
        assert not (out / "manifest.json").exists()


def test_bad_inputs_exit_with_one_line(tiny_llama, calib_file, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    common = ["--out", str(out), "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "32", "--quiet"]
    _bad(["quantize", str(tmp_path / "missing"), *common], ModelNotFound, "neither a local folder", out)
    _bad(["quantize", str(tiny_llama), *common, "--bits", "9"], UsageError, "bits must be in 2..8", out)
    _bad(["quantize", str(tiny_llama), *common, "--group-size", "48"], UsageError, "does not divide", out)
    _bad(["quantize", str(tiny_llama), *common, "--method", "nope"], UsageError, "available: ", out)
    _bad(["quantize", str(tiny_llama), *common, "-o", "nosuch=2"], UsageError, "unknown option", out)
    _bad(["quantize", str(tiny_llama), *common, "--compare", "rtn,nope"], UsageError, "available: ", out)
    assert not (tmp_path / "out-rtn").exists()  # every baseline is checked before any is made
    _bad(["quantize", str(tiny_llama), *common[:-5], "--nsamples", "1000", "--seqlen", "2048"], type(
        "DataError", (), {"exit_code": 5}), "tokens but nsamples x seqlen", out)

    from transformers import GPTJConfig

    gptj = save_tiny_model(GPTJConfig(n_embd=32, n_layer=1, n_head=2, rotary_dim=8, vocab_size=300), tokenizer_dir,
                           tmp_path / "gptj")
    _bad(["quantize", str(gptj), *common], UnsupportedModel, "unsupported architecture 'gptj'; supported: bloom,", out)

    pickle_only = tmp_path / "pickle"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text("{}")
    (pickle_only / "pytorch_model.bin").write_bytes(b"")
    _bad(["quantize", str(pickle_only), *common], ModelNotFound, "opt in with --allow-pickle", out)

    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text('{"model_type": "my_llm", "auto_map": {"AutoConfig": "x.MyConfig"}}')
    (custom / "model.safetensors").write_bytes(b"")
    _bad(["quantize", str(custom), *common], UnsupportedModel, "ships its own modeling code (my_llm)", out)


def test_pickle_weights_only_when_opted_in(tiny_llama, calib_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import shutil

    import torch

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict(), pickled / "pytorch_model.bin")
    shutil.copy(tiny_llama / "config.json", pickled)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(pickled)
    assert not list(pickled.glob("*.safetensors")) and list(pickled.glob("*.bin"))
    common = ["--calib", str(calib_file), "--nsamples", "2", "--seqlen", "32", "--quiet"]
    res = run("quantize", str(pickled), "--out", str(tmp_path / "p"), "--allow-pickle", *common)
    assert res.exit_code == 0, res.output
    assert run("quantize", str(tiny_llama), "--out", str(tmp_path / "s"), *common).exit_code == 0
    for shard in (tmp_path / "s").glob("model-*.safetensors"):  # the same weights give the same checkpoint
        assert (tmp_path / "p" / shard.name).read_bytes() == shard.read_bytes()


def test_existing_output_needs_overwrite_and_incomplete_is_refused(tiny_llama, calib_file, tmp_path):
    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama), "--out", str(out), "--calib", str(calib_file), "--nsamples", "2",
            "--seqlen", "32", "--quiet"]
    assert run(*args).exit_code == 0
    before = (out / "manifest.json").stat().st_mtime_ns
    again = run(*args)  # the same run again: nothing to do
    assert again.exit_code == 0 and "already complete" in again.output
    assert (out / "manifest.json").stat().st_mtime_ns == before
    _bad([*args, "--bits", "3"], CheckpointError, "different settings; pass --overwrite")
    assert run(*args, "--bits", "3", "--overwrite").exit_code == 0
    (out / "manifest.json").unlink()
    _bad(["eval", str(out), "--ppl", str(calib_file), "--seqlen", "32"], CheckpointError, "not a complete")


def test_help_shows_examples():
    res = run("quantize", "--help")
    assert res.exit_code == 0 and "Examples:" in res.output and "--group-size" in res.output


def test_inspect_verifies_the_manifest(tiny_llama, calib_file, tmp_path):
    out = tmp_path / "q"
    assert run("quantize", str(tiny_llama), "--out", str(out), "--calib", str(calib_file), "--nsamples", "2",
               "--seqlen", "32", "--bits", "3", "--group-size", "32", "--quiet").exit_code == 0
    res = run("inspect", str(out))
    assert res.exit_code == 0, res.output
    assert "every file intact" in res.output and "3 bits, group 32" in res.output
    assert "model.layers.1.mlp.down_proj" in res.output and "bits/weight" in res.output
    shard = out / "model-block-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor's data
    shard.write_bytes(bytes(data))
    res = run("inspect", str(out))
    assert res.exit_code == CheckpointError.exit_code
    assert "model-block-00001.safetensors: checksum differs" in res.output
