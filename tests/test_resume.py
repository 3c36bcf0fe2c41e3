"""Never lose a run: kill -9 a real quantization at several points, rerun, and get the uninterrupted run's bytes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaConfig

from conftest import save_tiny_model


@pytest.fixture(scope="module")
def four_block_llama(tokenizer_dir, tmp_path_factory) -> Path:
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=4, vocab_size=vocab, max_position_embeddings=256)
    return save_tiny_model(config, tokenizer_dir, tmp_path_factory.mktemp("llama4"))


def quantize(model: Path, out: Path, calib: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "QUANTEASE_FAULT": fault or ""}
    cmd = [sys.executable, "-m", "quantease.cli", "quantize", str(model), "--out", str(out), "--calib", str(calib),
           "--nsamples", "6", "--seqlen", "48", "--batch-size", "4", "--bits", "3", "--group-size", "32",
           "--quiet", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def checkpoint_files(folder: Path) -> dict[str, bytes]:
    """Every file of the checkpoint; run.json (this run's timings) is a log, not part of it."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "run.json"}


@pytest.fixture(scope="module")
def reference(four_block_llama, calib_file, tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("runs")
    out = root / "q"
    assert quantize(four_block_llama, out, calib_file).returncode == 0
    files = checkpoint_files(out)
    shutil.rmtree(out)
    return out, files


@pytest.mark.parametrize("fault", [
    "block:0",  # between blocks, right after block 0's state was saved
    "block:2",
    "write:model-block-00001.safetensors",  # in the middle of writing a shard: written, not yet renamed
    "resume-inputs",  # after block 0's shard, while saving the next block's inputs
    "write:quantease.json",  # while finalizing
    "write:manifest.json",
])
def test_killed_run_resumes_to_identical_files(fault, four_block_llama, calib_file, reference):
    out, expected = reference
    try:
        killed = quantize(four_block_llama, out, calib_file, fault=fault)
        assert killed.returncode == -9, killed.stderr
        assert not (out / "manifest.json").exists()
        with pytest.raises(Exception, match="not a complete"):
            from quantease.api import load

            load(out)
        resumed = quantize(four_block_llama, out, calib_file)
        assert resumed.returncode == 0, resumed.stderr
        assert checkpoint_files(out) == expected
        assert not (out / ".resume").exists()
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_changed_settings_refuse_to_mix_runs(four_block_llama, calib_file, reference):
    out, expected = reference
    try:
        assert quantize(four_block_llama, out, calib_file, fault="block:1").returncode == -9
        mixed = quantize(four_block_llama, out, calib_file, "--seed", "1")
        assert mixed.returncode == 6
        assert "different calibration data and settings; pass --restart" in mixed.stderr
        assert quantize(four_block_llama, out, calib_file, "--seed", "1", "--restart").returncode == 0
        assert checkpoint_files(out) != expected  # a different seed is a different checkpoint
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_propagated_target_resumes_with_the_original_model_inputs(four_block_llama, calib_file, tmp_path):
    """The resume state carries the original model's hidden states too: a killed run resumes to the same bytes."""
    target = ("--target", "propagated", "--alpha", "0.5")
    out = tmp_path / "q"
    assert quantize(four_block_llama, out, calib_file, *target).returncode == 0
    whole = checkpoint_files(out)
    shutil.rmtree(out)
    assert quantize(four_block_llama, out, calib_file, *target, fault="block:1").returncode == -9
    mixed = quantize(four_block_llama, out, calib_file, "--target", "layer")  # the layer objective is another run
    assert mixed.returncode == 6 and "different settings" in mixed.stderr
    assert quantize(four_block_llama, out, calib_file, *target).returncode == 0
    assert checkpoint_files(out) == whole


def test_same_inputs_give_identical_bytes(four_block_llama, calib_file, reference):
    out, expected = reference
    try:
        assert quantize(four_block_llama, out, calib_file).returncode == 0
        assert checkpoint_files(out) == expected
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_not_enough_disk_and_nan_weights(four_block_llama, calib_file, tokenizer_dir, tmp_path, monkeypatch):
    from quantease.api import QuantConfig
    from quantease.api import quantize as api_quantize
    from quantease.errors import NumericalError, ResourceError

    config = dict(model=str(four_block_llama), calib=str(calib_file), nsamples=2, seqlen=32, device="cpu")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ResourceError, match="not enough disk space"):
        api_quantize(QuantConfig(out=str(tmp_path / "disk"), **config), progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "disk" / "manifest.json").exists()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(four_block_llama)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "nan")
    with pytest.raises(NumericalError, match="mlp.up_proj has NaN/Inf"):
        api_quantize(QuantConfig(out=str(tmp_path / "nanq"), **{**config, "model": str(tmp_path / "nan")}), progress=False)
    assert not (tmp_path / "nanq" / "manifest.json").exists()


def test_thinned_resume_state_resumes_to_identical_files(four_block_llama, calib_file, reference):
    """--resume-every 2 writes the state after blocks 1 and 3 only: killed after block 2, the rerun redoes block 2
    from the state after block 1 and ends with the uninterrupted (every-block) run's bytes."""
    out, expected = reference
    try:
        assert quantize(four_block_llama, out, calib_file, "--resume-every", "2", fault="block:2").returncode == -9
        assert json.loads((out / ".resume" / "state.json").read_text())["next_block"] == 2
        assert [p.name for p in (out / ".resume").glob("inputs-*")] == ["inputs-00002.safetensors"]
        assert quantize(four_block_llama, out, calib_file, "--resume-every", "2").returncode == 0
        assert checkpoint_files(out) == expected
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_resume_state_is_written_in_the_forward_dtype(four_block_llama, calib_file, tmp_path):
    out = tmp_path / "q"
    assert quantize(four_block_llama, out, calib_file, "--dtype", "bfloat16").returncode == 0
    whole = checkpoint_files(out)
    shutil.rmtree(out)
    assert quantize(four_block_llama, out, calib_file, "--dtype", "bfloat16", fault="block:0").returncode == -9
    path = out / ".resume" / "inputs-00001.safetensors"
    with safe_open(path, "pt") as f:
        batches = [f.get_tensor(k) for k in f.keys()]
    assert {x.dtype for x in batches} == {torch.bfloat16}
    # nsamples x seqlen x hidden, 2 bytes each, for the quantized and (the default target) the original model
    assert sum(x.numel() for x in batches) == 2 * 6 * 48 * 64
    mixed = quantize(four_block_llama, out, calib_file)  # float32 forwards are another run
    assert mixed.returncode == 6 and "different settings" in mixed.stderr
    assert quantize(four_block_llama, out, calib_file, "--dtype", "bfloat16").returncode == 0
    assert checkpoint_files(out) == whole
