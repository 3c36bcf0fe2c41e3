"""Resumable runs: after every block the output folder holds enough to continue from the next one.

DIR/.resume/settings.json      the settings, so that a refused rerun can name the ones it changed
DIR/.resume/fingerprint.json   what the run is made of: model files, calibration tokens, settings (hashes)
DIR/.resume/state.json         the next block to quantize and the per-layer records so far (written last per block)
DIR/.resume/inputs-K.safetensors  block K's calibration inputs (exact, in the forward dtype; with the propagated
                               target also the original model's); only the one state.json names is kept
DIR/.resume/rank-R/inputs-K.safetensors  the same, per rank, in a run of several processes (distributed.py): each
                               rank saves its own batches, and state.json (rank 0's) records the world size, which
                               a rerun must match

A rerun with the same fingerprint continues after the last block whose state was written; every file is replaced
atomically, so a kill at any instant leaves either the old or the new state. The state is written after every
block, or after every N-th with --resume-every N (a rerun then redoes up to N - 1 blocks, and rewrites their shards
with the same bytes): for a 70B model at 128 × 2048 tokens each state is 4 GiB in bf16 (8 GiB with the propagated
target), which --resume-every 8 cuts from 320 GiB written over 80 blocks to 40 GiB. The other arguments block 0 receives
(masks, rotary tables) are recomputed from the embeddings, which is cheap and exact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["Fingerprint", "model_fingerprint", "ResumeState", "fault_point"]

RESUME_DIR = ".resume"


def fault_point(name: str) -> None:
    """Testing hook: QUANTEASE_FAULT=name kills this process with SIGKILL here, like a preempted job."""
    if os.environ.get("QUANTEASE_FAULT") == name:
        os.kill(os.getpid(), 9)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_fingerprint(folder: Path) -> str:
    """config.json plus each safetensors file's name, size and header (tensor names, dtypes, offsets): cheap even for
    hundreds of GB, and it changes whenever the weights file is replaced by a different one."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h.update(f.name.encode() + str(f.stat().st_size).encode() + fh.read(n))
    for f in sorted(folder.glob("*.bin")):  # pickle checkpoints (opt-in) have no cheap header: name and size
        h.update(f.name.encode() + str(f.stat().st_size).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    model: str
    calibration: str
    settings: str

    @classmethod
    def of(cls, model_folder: Path, calibration_sha: str, settings: dict[str, Any]) -> "Fingerprint":
        return cls(model_fingerprint(model_folder), calibration_sha, _sha(json.dumps(settings, sort_keys=True).encode()))

    def differences(self, other: "Fingerprint") -> list[str]:
        names = {"model": "model files", "calibration": "calibration data", "settings": "settings"}
        return [names[k] for k, v in asdict(self).items() if getattr(other, k) != v]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class ResumeState:
    """The resume state of one output folder, as seen by one rank (`world`: a distributed.World; None = one
    process)."""

    def __init__(self, out: Path, world: Any = None):
        self.dir = Path(out) / RESUME_DIR
        self.world = world
        size = 1 if world is None else world.size
        self.inputs_dir = self.dir if size == 1 else self.dir / f"rank-{world.rank}"

    def exists(self) -> bool:
        return (self.dir / "fingerprint.json").exists()

    def fingerprint(self) -> Fingerprint:
        return Fingerprint(**json.loads((self.dir / "fingerprint.json").read_text()))

    def start(self, fp: Fingerprint, settings: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.dir / "settings.json", settings)  # before the fingerprint, which marks the state as started
        _write_json(self.dir / "fingerprint.json", asdict(fp))

    def settings(self) -> dict[str, Any] | None:
        """The settings the partial run was started with (None for a run started before they were saved)."""
        path = self.dir / "settings.json"
        return json.loads(path.read_text()) if path.exists() else None

    def world_size(self) -> int | None:
        """How many processes wrote the saved state (None: no block finished yet, so any number may start)."""
        path = self.dir / "state.json"
        return json.loads(path.read_text()).get("world_size", 1) if path.exists() else None

    def load(self) -> tuple[int, dict[str, Any], dict[str, Any], list[torch.Tensor], list[torch.Tensor] | None] | None:
        """(next block, layer records, run log, its input batches, the original model's input batches or None), or
        None if no block was completed."""
        path = self.dir / "state.json"
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        tensors = load_file(self._inputs(state["next_block"]), backend="pread")  # plain memory, not a mapped file
        batches = [tensors[f"batch{i:05d}"] for i in range(sum(k.startswith("batch") for k in tensors))]
        refs = [tensors[f"ref{i:05d}"] for i in range(len(batches))] if "ref00000" in tensors else None
        return state["next_block"], state["layers"], state["run"], batches, refs

    def _inputs(self, block: int) -> Path:
        return self.inputs_dir / f"inputs-{block:05d}.safetensors"

    def _barrier(self, what: str) -> None:
        if self.world is not None:
            self.world.barrier(what)

    def save(self, next_block: int, layers: dict[str, Any], run: dict[str, Any], inputs: list[torch.Tensor],
             reference: list[torch.Tensor] | None = None) -> int:
        """Write the state that continues at `next_block`; returns the bytes of its inputs file. With several ranks
        every rank writes its inputs, then rank 0 the state that points at them, and only then does any rank delete
        its older inputs."""
        path = self._inputs(next_block)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tensors = {f"batch{i:05d}": x.detach().cpu().contiguous() for i, x in enumerate(inputs)}
        tensors.update({f"ref{i:05d}": x.detach().cpu().contiguous() for i, x in enumerate(reference or [])})
        save_file(tensors, str(tmp))
        written = tmp.stat().st_size
        fault_point("resume-inputs")
        os.replace(tmp, path)
        # the inputs exist before the state that points at them; older inputs go only after the state moved on
        self._barrier(f"saving the inputs of block {next_block}")
        if self.world is None or self.world.is_main:
            state = {"next_block": next_block, "layers": layers, "run": run}
            if self.world is not None and self.world.size > 1:
                state["world_size"] = self.world.size
            _write_json(self.dir / "state.json", state)
        self._barrier(f"saving the state of block {next_block}")
        for old in self.inputs_dir.glob("inputs-*.safetensors"):
            if old != path:
                old.unlink()
        return written

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
