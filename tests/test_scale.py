"""Scale features on CPU: bf16 block forwards, activation offload, the memory and disk plan, refusing what cannot fit."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaConfig

from quantease import plan as plan_module
from quantease.api import QuantConfig, load, plan, quantize
from quantease.checkpoint.native import decode_grid
from quantease.cli import main
from quantease.errors import ResourceError
from quantease.models.activations import Activations

from conftest import save_tiny_model

CAL = dict(nsamples=8, seqlen=64, calib_batch_size=3, device="cpu")


def checkpoint_files(folder: Path) -> dict[str, bytes]:
    """Every file of the checkpoint; run.json (this run's timings and peaks) is a log, not part of it."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "run.json"}


def layer_codes(out: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (codes [q, p], scales [q, G]) as stored."""
    info = json.loads((out / "quantease.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    result = {}
    for name, meta in info["layers"].items():
        with safe_open(out / index[f"{name}.qweight"], "pt") as f:
            tensors = {s: f.get_tensor(f"{name}.{s}") for s in ("qweight", "scales", "qzeros") if f"{name}.{s}" in index}
        codes, grid = decode_grid(tensors, meta)
        result[name] = (codes, grid.scale)
    return result


def test_bf16_forwards_give_the_fp32_codes_within_rounding(tiny_llama, calib_file, tmp_path):
    """bf16 activations carry a relative rounding error of 2^-9, which moves Σ and so each coordinate's real
    minimizer by a fraction of an 8-bit grid step: a code moves by one step where that minimizer sits near a rounding
    boundary, and by at most one more where such a move's error feedback reaches a later column. Few codes move
    (measured 4% on this model), the grids are identical (fitted on the checkpoint's fp32 weights in both runs, and
    not refitted: a refit fits them to Σ, which the forward dtype moves), and the bf16 run's logits are as close to
    the original's as an 8-bit quantization's must be. The layer objective: the propagated target's Δ is made of
    differences X_fp - X, on which bf16's rounding is relatively larger, so this bound is the layer objective's."""
    runs, models = {}, {}
    for dtype in ("float32", "bfloat16"):
        out = quantize(QuantConfig(model=str(tiny_llama), out=str(tmp_path / dtype), method="quantease", bits=8,
                                   method_options={"refit": 0}, target="layer", dtype=dtype, calib=str(calib_file),
                                   **CAL),
                       progress=False)
        runs[dtype], models[dtype] = layer_codes(out), load(out)[0]
        assert json.loads((out / "quantease.json").read_text())["model"]["forward_dtype"] == dtype
    moved = total = 0
    for name, (codes, scales) in runs["float32"].items():
        codes_bf16, scales_bf16 = runs["bfloat16"][name]
        assert torch.equal(scales, scales_bf16), name
        diff = (codes.long() - codes_bf16.long()).abs()
        assert int(diff.max()) <= 2, name
        moved, total = moved + int((diff > 0).sum()), total + diff.numel()
    assert moved / total < 0.1
    original = load(tiny_llama)[0]
    ids = torch.randint(0, original.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = original(input_ids=ids).logits
        got = models["bfloat16"](input_ids=ids).logits
    assert float((got - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm()) < 0.02


def test_activation_store_offloads_exact_copies():
    x = torch.randn(2, 5, 8)
    resident, offloaded = Activations("cpu"), Activations("cpu", offload=True)
    resident.append(x)
    offloaded.append(x)
    assert resident[0] is x  # resident: the tensor itself
    assert offloaded._batches[0].data_ptr() != x.data_ptr()  # offloaded: its own host copy
    assert torch.equal(offloaded[0], x) and offloaded.nbytes == resident.nbytes == x.numel() * 4
    assert [t.data_ptr() for t in offloaded.host()] == [offloaded._batches[0].data_ptr()]
    assert offloaded.empty().offload and len(offloaded.empty()) == 0


@pytest.mark.parametrize("target", ["layer", "propagated"])
def test_offloaded_and_resident_activations_give_identical_checkpoints(target, tiny_llama, calib_file, tmp_path):
    files = {}
    for offload in ("off", "on"):  # the same output folder, whose path quantease.json records
        out = quantize(QuantConfig(model=str(tiny_llama), out=str(tmp_path / "q"), bits=3, target=target,
                                   offload_activations=offload, calib=str(calib_file), **CAL), progress=False)
        files[offload] = checkpoint_files(out)
        assert json.loads((out / "run.json").read_text())["plan"]["offload"] == (offload == "on")
        shutil.rmtree(out)
    assert files["on"] == files["off"]


@pytest.fixture(scope="module")
def wide_block(tokenizer_dir, tmp_path_factory) -> Path:
    """One decoder block wide enough that its tensors, not the Python process, dominate the peak."""
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    config = LlamaConfig(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=4,
                         num_hidden_layers=1, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False)
    return save_tiny_model(config, tokenizer_dir, tmp_path_factory.mktemp("wide"))


def test_plan_predicts_the_measured_peak_memory(wide_block, calib_file, tmp_path):
    """The whole run in a fresh process; its peak RSS (block and capture phases, run.json) is within 25% of the plan.
    The plan's tensors (one batch of 32 × 512 tokens through a 2048-wide FFN, Σ accumulators, the block) are about
    600 MB beside the 0.45-0.6 GB process (the interpreter, torch, numba), so a plan off by half in them would fail. glibc is told to return freed
    blocks above 1 MB at once, as it does by itself for the > 32 MB tensors of real models: otherwise the heap keeps
    this model's 16-32 MB temporaries and RSS measures the allocator's cache."""
    out = tmp_path / "q"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "quantease.cli", "quantize", str(wide_block), "--out", str(out), "--calib",
           str(calib_file), "--nsamples", "32", "--seqlen", "512", "--batch-size", "32", "--quiet"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "run.json").read_text())
    predicted = run["plan"]["host_peak"]
    measured = max([run["capture_peak_rss"]] + [b["peak_rss"] for b in run["blocks"]])
    tensors = predicted["bytes"] - predicted["parts"]["process"]
    assert tensors > 0.5 * predicted["parts"]["process"], (tensors, predicted)  # about the tensors, not the interpreter
    assert measured == pytest.approx(predicted["bytes"], rel=0.25), (measured, predicted)


def test_plan_predicts_disk_and_block_forwards(tiny_llama, calib_file, tmp_path, monkeypatch):
    """Checkpoint size within 25% (the schema's exact bytes plus json and tokenizer files), the resume state to
    the header, and the block passes exactly: every call of a block's forward is counted."""
    for kind in ("layer", "propagated", "no-propagate"):
        config = QuantConfig(model=str(tiny_llama), out=str(tmp_path / kind), bits=3,
                             target="propagated" if kind == "propagated" else "layer",
                             propagate=kind != "no-propagate", calib=str(calib_file), **CAL)
        expected = plan(config)
        calls = []
        from quantease import pipeline

        real = pipeline.quantize_block

        def counting(block, *args, **kwargs):
            handle = torch.nn.modules.module.register_module_forward_pre_hook(
                lambda m, a: calls.append(1) if type(m) is type(block) else None)
            try:
                return real(block, *args, **kwargs)
            finally:
                handle.remove()

        monkeypatch.setattr(pipeline, "quantize_block", counting)
        out = quantize(config, progress=False)
        monkeypatch.undo()
        assert len(calls) == expected.block_forwards * expected.batches, kind
        size = sum(f.stat().st_size for f in out.iterdir() if f.name not in ("run.json", "manifest.json"))
        assert size == pytest.approx(expected.checkpoint_bytes, rel=0.25)
        run = json.loads((out / "run.json").read_text())
        header = run["blocks"][0]["resume_bytes"] - expected.resume_bytes
        assert 0 < header < 4096, kind  # the inputs' bytes exactly, plus the safetensors header


def test_impossible_plan_exits_with_the_option_that_fixes_it(tiny_llama, calib_file, tmp_path, monkeypatch):
    """RAM is set between what two settings need, so the plan must name the one that fits."""
    monkeypatch.setattr(plan_module, "rss", lambda: 400 * 2**20)  # the process, fixed so that the plans compare
    for free in ("host_available", "available_memory"):  # nothing fits: the plans of the leanest choice, no reuse
        monkeypatch.setattr(plan_module, free, lambda *device: 0)
    settings = dict(model=str(tiny_llama), calib=str(calib_file), seqlen=256, device="cpu")
    peak = {(b, n): plan(QuantConfig(**settings, nsamples=n, calib_batch_size=b)).host_peak.bytes
            for b, n in ((2, 64), (1, 64), (1, 32))}
    assert peak[(2, 64)] > peak[(1, 64)] > peak[(1, 32)]

    def ram(between: tuple[int, int]) -> None:  # free RAM that fits `between`'s smaller plan only
        room = int((peak[between[0]] + peak[between[1]]) / 2 / 0.92)
        monkeypatch.setattr(plan_module, "host_available", lambda: room)
        monkeypatch.setattr(plan_module, "available_memory", lambda device: room)

    args = [str(tiny_llama), "--calib", str(calib_file), "--nsamples", "64", "--seqlen", "256", "--batch-size", "8",
            "--device", "cpu"]
    ram(((2, 64), (1, 64)))
    res = CliRunner().invoke(main, ["plan", *args])
    assert res.exit_code == ResourceError.exit_code
    error = res.output.strip().splitlines()[-1]
    assert error.startswith("error: the run does not fit in host RAM") and error.endswith("use --batch-size 1")
    assert "Traceback" not in res.output
    out = tmp_path / "q"
    res = CliRunner().invoke(main, ["quantize", *args, "--out", str(out), "--quiet"])
    assert res.exit_code == ResourceError.exit_code and res.output.strip().endswith("use --batch-size 1")
    assert not out.exists()  # refused before anything was read or written
    ram(((1, 64), (1, 32)))  # not even one window per batch: fewer windows
    res = CliRunner().invoke(main, ["plan", *args])
    assert res.exit_code == ResourceError.exit_code
    assert res.output.strip().endswith("use --batch-size 1 --nsamples 32")


def test_a_plan_that_fits_only_with_fewer_reused_outputs_recomputes_them(tiny_llama, calib_file, tmp_path,
                                                                         monkeypatch):
    """RAM between what a run needs at one level of reuse and at the next lower one: the plan keeps the sub-modules'
    outputs but not the linears' (attention and MLP hold 4 h values per token; q/k/v's input and outputs, 2 h + 2 kv,
    are kept until attention has run to the end, then gate/up's, h + 2 I, until the MLP has), then none; each lower
    level computes more block forwards and writes the same checkpoint."""
    monkeypatch.setattr(plan_module, "rss", lambda: 400 * 2**20)
    settings = dict(model=str(tiny_llama), calib=str(calib_file), nsamples=64, seqlen=256, device="cpu",
                    target="layer")  # one set of hidden states (the propagated target doubles the cache)
    cfg = LlamaConfig.from_pretrained(tiny_llama)
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * getattr(cfg, "head_dim", h // cfg.num_attention_heads)
    tokens_fp32 = 64 * 256 * 4
    cache = {"layers": tokens_fp32 * (4 * h + max(2 * h + 2 * kv, h + 2 * i)), "modules": tokens_fp32 * 4 * h,
             "none": 0}
    roomy = plan(QuantConfig(**settings))
    assert roomy.reuse == "layers" and roomy.host_peak.parts["reused outputs"] == cache["layers"]

    def room(free: int) -> None:
        for name in ("host_available", "available_memory"):
            monkeypatch.setattr(plan_module, name, lambda *device: free)

    room(0)  # nothing fits: the leanest choice
    lean = plan(QuantConfig(**settings))
    assert lean.reuse == "none" and "reused outputs" not in {k for k, v in lean.host_peak.parts.items() if v}
    peaks = {level: roomy.host_peak.bytes - cache["layers"] + cache[level] for level in cache}
    assert peaks["none"] == lean.host_peak.bytes  # the cache is all that differs at the peak
    made = {}
    for level, above in (("layers", None), ("modules", "layers"), ("none", "modules")):
        room(int((peaks[level] + peaks[above]) / 2 / 0.92) if above else 2**50)
        chosen = plan(QuantConfig(**settings))
        assert chosen.reuse == level and chosen.host_peak.bytes == peaks[level]
        made[level] = quantize(QuantConfig(**settings, out=str(tmp_path / level), method="rtn"), progress=False)
    forwards = [json.loads((made[level] / "run.json").read_text())["block_forwards"] for level in cache]
    assert all(a < b < c for a, b, c in zip(*forwards)), forwards
    shards = sorted(p.name for p in made["layers"].glob("*.safetensors"))
    assert shards and all(len({(made[level] / n).read_bytes() for level in cache}) == 1 for n in shards)


def test_plan_command_prints_every_line(tiny_llama, calib_file):
    res = CliRunner().invoke(main, ["plan", str(tiny_llama), "--calib", str(calib_file), "--nsamples", "8",
                                    "--seqlen", "64", "--dtype", "bfloat16", "--device", "cpu", "--resume-every", "2"])
    assert res.exit_code == 0, res.output
    assert "bfloat16 forwards" in res.output
    for label in ("host (= device)", "disk", "block forwards"):
        assert label in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans for a GPU that this machine lacks")
def test_a_gpu_run_can_be_planned_without_a_gpu(tiny_llama, calib_file):
    """On a login node: the device's peak is printed (in the checkpoint's dtype, auto on CUDA), not checked."""
    res = CliRunner().invoke(main, ["plan", str(tiny_llama), "--calib", str(calib_file), "--nsamples", "8",
                                    "--seqlen", "64", "--device", "cuda"])
    assert res.exit_code == 0, res.output
    assert "on cuda, float32 forwards" in res.output and "(no such device here)" in res.output
    res = CliRunner().invoke(main, ["quantize", str(tiny_llama), "--out", "unused", "--device", "cuda"])
    assert res.exit_code == 2 and "no CUDA device" in res.output


needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_offload_on_cuda_lowers_the_peak_and_keeps_the_bytes(device, tiny_llama, calib_file, tmp_path):
    files, peaks = {}, {}
    for offload in ("off", "on"):
        out = quantize(QuantConfig(model=str(tiny_llama), out=str(tmp_path / "q"), bits=4, device=device,
                                   offload_activations=offload, calib=str(calib_file), nsamples=32, seqlen=128,
                                   calib_batch_size=4), progress=False)
        run = json.loads((out / "run.json").read_text())
        peaks[offload] = max(b["peak_device"] for b in run["blocks"])
        files[offload] = checkpoint_files(out)
        shutil.rmtree(out)
    assert files["on"] == files["off"]
    assert peaks["on"] < peaks["off"]


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_plan_predicts_the_measured_gpu_peak(device, wide_block, calib_file, tmp_path):
    """The device side of the plan against torch.cuda.max_memory_allocated, block and capture phases."""
    out = quantize(QuantConfig(model=str(wide_block), out=str(tmp_path / "q"), device=device, dtype="bfloat16",
                               calib=str(calib_file), nsamples=16, seqlen=512, calib_batch_size=16), progress=False)
    run = json.loads((out / "run.json").read_text())
    measured = max([run["capture_peak_device"]] + [b["peak_device"] for b in run["blocks"]])
    assert measured == pytest.approx(run["plan"]["device_peak"]["bytes"], rel=0.25)
