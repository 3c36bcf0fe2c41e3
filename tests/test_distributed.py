"""Many processes on torch.distributed (gloo on the CPU, 2 ranks): the same codes as one process, a killed rank
stops every rank with a message naming it, a rerun resumes, and a partial run refuses another world size.

Ranks are separate processes started the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), each on one thread, so a fault can be injected into one rank only; one test goes through torchrun
itself. Every launch has a hard deadline: a hung collective kills the processes and fails the test, never CI."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaConfig, MixtralConfig

from conftest import save_tiny_model, tiny_config
from quantease.distributed import World, assign_owners

DEADLINE_S = 240
WORKER = Path(__file__).with_name("distributed_worker.py")
SETTINGS = dict(nsamples=6, seqlen=48, calib_batch_size=2, bits=3, group_size=32, device="cpu")  # 3 batches


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, argv: list[str], faults: dict[int, str] | None = None) -> list[tuple[int, str]]:
    """Run `python argv` as n ranks (n = 1: a plain process, no distributed environment); (exit code, stderr) per
    rank. QUANTEASE_FAULT is set for the ranks in `faults` only."""
    port, procs = _port(), []
    for rank in range(n):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "QUANTEASE_FAULT": (faults or {}).get(rank, "")}
        if n > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), QUANTEASE_DIST_TIMEOUT="120")
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + DEADLINE_S
    try:
        return [(p.wait(timeout=max(1.0, deadline - time.monotonic())), p.stderr.read()) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank hung past {DEADLINE_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stderr.close()


def run_worker(n: int, model: Path, out: Path, calib: Path, **extra) -> dict[str, torch.Tensor]:
    """Quantize with n ranks; every Σ rank 0 observed."""
    config = json.dumps({**SETTINGS, **extra, "model": str(model), "out": str(out), "calib": str(calib)})
    sigmas = out.parent / f"{out.name}-sigmas.pt"
    for code, err in launch(n, [str(WORKER), config, str(sigmas)]):
        assert code == 0, err
    return torch.load(sigmas)


def cli(out: Path, model: Path, calib: Path) -> list[str]:
    return ["-m", "quantease", "quantize", str(model), "--out", str(out), "--calib", str(calib), "--nsamples", "6",
            "--seqlen", "48", "--batch-size", "2", "--bits", "3", "--group-size", "32", "--quiet"]


def shards(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of every shard (codes packed in qweight/qzeros, fp16 scales)."""
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        with safe_open(f, "pt") as h:
            out[f.name] = {k: h.get_tensor(k) for k in h.keys()}
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Identical tensors (codes, grids, unquantized tensors) and identical per-layer records (losses, histories,
    notes such as RTN fallbacks); the folders' names differ, so quantease.json is compared without them."""
    sa, sb = shards(a), shards(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].keys() == sb[name].keys()
        for k in sa[name]:
            assert torch.equal(sa[name][k], sb[name][k]), k
    ia, ib = (json.loads((f / "quantease.json").read_text()) for f in (a, b))
    assert ia["layers"] == ib["layers"] and ia["summary"] == ib["summary"] and ia["fingerprint"] == ib["fingerprint"]


def assert_close_sigmas(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> None:
    """Σ from two ranks equals the one-process Σ to 1e-6 of its scale: the fp64 sums differ only in the order the
    same per-batch fp32 products are added (relative ~1e-16), and each is then rounded to fp32 (ulp 6e-8)."""
    assert one.keys() == two.keys() and one
    for k in one:
        assert float((one[k] - two[k]).abs().max()) <= 1e-6 * float(one[k].abs().max()), k


@pytest.fixture(scope="module")
def models(tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    root = tmp_path_factory.mktemp("dist-models")
    moe = MixtralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=1,
                        max_position_embeddings=256)
    four = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=4, vocab_size=vocab, max_position_embeddings=256)
    configs = {"llama": tiny_config("llama", vocab), "opt": tiny_config("opt", vocab), "mixtral": moe, "llama4": four}
    return {name: save_tiny_model(c, tokenizer_dir, root / name) for name, c in configs.items()}


@pytest.mark.parametrize("family,extra", [
    ("llama", {}),
    ("opt", {"target": "propagated", "alpha": 0.5}),  # Δ and Σ_d are reduced too
    ("mixtral", {"method": "gptq"}),
    ("llama", {"grid": "gguf:q4_1", "bits": 4}),  # llama.cpp's grid: float offsets, travelling in the records
])
def test_two_ranks_give_the_codes_of_one_process(family, extra, models, calib_file, tmp_path):
    """Mixtral routes each token to one of 4 experts: rank 1 holds one batch (96 tokens), so on its own it would see
    fewer tokens than an expert's 64 inputs for at least two experts; the records (RTN fallback notes included)
    match the one-process run only if every rank decides with the global count."""
    one = run_worker(1, models[family], tmp_path / "one", calib_file, **extra)
    two = run_worker(2, models[family], tmp_path / "two", calib_file, **extra)
    assert_close_sigmas(one, two)
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["world_size"] == 2 and all(len(b["ranks"]) == 2 for b in run["blocks"])
    assert not any(p.name.startswith("rank-") for p in (tmp_path / "two").rglob("*"))  # resume state cleared


def test_killed_rank_stops_every_rank_and_a_rerun_resumes(models, calib_file, tmp_path):
    model = models["llama4"]
    for code, err in launch(1, cli(tmp_path / "ref", model, calib_file)):
        assert code == 0, err
    out = tmp_path / "q"
    (r0, e0), (r1, _) = launch(2, cli(out, model, calib_file), faults={1: "block:1"})
    assert r1 == -9  # killed after its state for block 2 was saved
    assert r0 == 10 and "rank 1 did not reach" in e0 and "checkpoint is not complete" in e0, e0
    assert e0.strip().splitlines()[-1].startswith("error: rank 0: rank 1")  # one line, no traceback
    assert not (out / "manifest.json").exists()
    state = json.loads((out / ".resume" / "state.json").read_text())
    assert state["next_block"] == 2 and state["world_size"] == 2
    for code, err in launch(2, cli(out, model, calib_file)):
        assert code == 0, err
    assert_same_checkpoint(tmp_path / "ref", out)
    assert json.loads((out / "run.json").read_text())["resumed_at"] == [2]


def test_partial_run_refuses_another_world_size(models, calib_file, tmp_path):
    out = tmp_path / "q"
    launch(2, cli(out, models["llama4"], calib_file), faults={0: "block:0"})
    assert not (out / "manifest.json").exists() and (out / ".resume" / "rank-1").is_dir()
    [(code, err)] = launch(1, cli(out, models["llama4"], calib_file))
    assert code == 6 and "made by 2 process(es), this is 1" in err and "--restart" in err, err


def test_torchrun_launches_the_cli(models, calib_file, tmp_path):
    """`torchrun --nproc-per-node 2 -m quantease quantize ...` (torchrun's own rendezvous and environment)."""
    for code, err in launch(1, cli(tmp_path / "one", models["llama"], calib_file)):
        assert code == 0, err
    port = _port()
    [(code, err)] = launch(1, ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                               "--master-port", str(port), *cli(tmp_path / "two", models["llama"], calib_file)])
    assert code == 0, err
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")


def test_owners_balance_solve_cost():
    costs = {"q": 576 * 576.0**2, "k": 192 * 576.0**2, "v": 192 * 576.0**2, "gate": 9.0, "up": 9.0}
    owners = assign_owners(costs, 2)
    assert owners == {"q": 0, "k": 1, "v": 1, "gate": 1, "up": 1}  # loads: 576 vs 384, then + 9 + 9 (× 576²)
    assert assign_owners(costs, 1) == dict.fromkeys(costs, 0)
    assert set(assign_owners(costs, 8).values()) == set(range(5))  # more ranks than units: one unit each


def test_one_process_has_no_process_group():
    """World size 1 is a no-op: batches all stay, collectives return their input, nothing is initialized."""
    world = World.from_env(torch.device("cpu"))
    assert (world.rank, world.size, world.is_main) == (0, 1, True)
    assert world.shard(list(range(5))) == list(range(5)) and world.all_gather("x", "test") == ["x"]
    assert not torch.distributed.is_initialized()
    shard = [World(torch.device("cpu"), r, 3).shard(list(range(7))) for r in range(3)]
    assert shard == [[0, 3, 6], [1, 4], [2, 5]]


def _sweep_file(tmp_path: Path, model: Path, calib: Path) -> Path:
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "base": {"model": str(model), "calib": str(calib), **SETTINGS, "method": "gptq"},
        "grid": {"bits": [3]}, "eval": {"ppl": [str(calib)], "seqlen": 48, "limit": 2}}))
    return path


def test_sweep_runs_each_job_on_two_processes(models, calib_file, tmp_path):
    """`quantease sweep --nproc-per-node 2` runs each job through torchrun; rank 0 evaluates and records it."""
    sweep = _sweep_file(tmp_path, models["llama"], calib_file)
    [(code, err)] = launch(1, ["-m", "quantease", "sweep", str(sweep), "--out", str(tmp_path / "runs"),
                               "--nproc-per-node", "2", "--quiet"])
    assert code == 0, err
    job = tmp_path / "runs" / "000-bits-3"
    assert json.loads((job / "run.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "runs" / "sweep-status" / "000-bits-3.json").read_text())["ok"]
    assert len(json.loads((job / "eval.json").read_text())["perplexity"]) == 1
    run_worker(1, models["llama"], tmp_path / "one", calib_file, method="gptq")
    assert_same_checkpoint(tmp_path / "one", job)


def test_sbatch_script_runs_torchrun_under_srun(models, calib_file, tmp_path):
    """The array script of a 2-process sweep, run with stand-ins for srun (runs its command) and scontrol (names
    this host), as one node's task; the 2-node script differs only in --nnodes."""
    sweep = _sweep_file(tmp_path, models["llama"], calib_file)
    out = tmp_path / "runs"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    for nodes in ("2", "1"):
        [(code, err)] = launch(1, ["-m", "quantease", "sweep", str(sweep), "--out", str(out), "--print-jobs",
                                   "--nproc-per-node", "2", "--nnodes", nodes])
        assert code == 0, err
        script = (out / "sweep.sbatch").read_text()
        assert f"#SBATCH --nodes={nodes}" in script and "#SBATCH --gpus-per-node=2" in script
        assert f"torch.distributed.run --nnodes {nodes} --nproc-per-node 2 --rdzv-backend c10d" in script
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "0",
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost", "QUANTEASE_RDZV_PORT": str(_port()),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(out / "sweep.sbatch")], env=env, capture_output=True, text=True,
                          timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "000-bits-3" / "run.json").read_text())["world_size"] == 2
