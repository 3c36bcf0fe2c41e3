"""Many processes (GPUs, nodes) on torch.distributed: data-parallel calibration, layer-parallel solving.

    torchrun --nproc-per-node N -m quantease quantize MODEL --out DIR ...     (srun ... torchrun ... across nodes)

Every rank runs the same block loop (pipeline.py) on its share of the calibration batches:

    whole batches of --batch-size windows, round-robin: rank r holds batches r, r + N, r + 2N, ...
    for each stage of a block:  each rank accumulates fp64 partial Σ (and Δ, Σ_d) and token counts over its batches
        -> all-reduce (sums and counts; a rank that routed no token to an expert adds zeros and count 0)
        -> each layer gets one owner rank (greedy bin-packing of its solve cost q·p², per stage)
        -> owners solve; every rank gathers the results and puts the same Ŵ into its copy of the block
    ->  each rank runs the quantized block on its batches to get the next block's inputs.

Determinism: a batch is computed exactly as in the one-process run (same windows in it, same weights), so each
batch's fp32 product xᵀx is bit-identical; the global fp64 sum differs from the one-process sum only in the order
the per-batch products are added (per rank, then across ranks), a relative change of ~1e-16, far below fp32's
ulp (1.2e-7 relative) that Σ is rounded to for the solvers. Codes are then identical unless an fp64 sum falls within
1e-16 of an fp32 rounding boundary (probability ~1e-9 per entry), which flips that entry's last fp32 bit.

World size 1 (no WORLD_SIZE in the environment) is a World that does nothing: no process group, the same code path.
A failed or killed rank makes the others fail at their next collective: gloo sees the closed connection at once,
and a hung peer ends the run after the timeout ($QUANTEASE_DIST_TIMEOUT seconds, default 1800); the message names
the rank, from the markers each rank leaves in the rendezvous store before every collective.
"""
from __future__ import annotations

import atexit
import io
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import DistributedError, QuantEaseError

__all__ = ["World", "assign_owners", "is_main_process", "TIMEOUT_ENV"]

TIMEOUT_ENV = "QUANTEASE_DIST_TIMEOUT"
_DEFAULT_TIMEOUT_S = 1800  # longer than any gap between collectives: one stage's largest solve on one rank
_KEY = "quantease"
T = TypeVar("T")


def is_main_process() -> bool:
    """True on rank 0 of a process group, and in a plain single process: who prints and writes."""
    return not dist.is_initialized() or dist.get_rank() == 0


def assign_owners(costs: dict[str, float], size: int) -> dict[str, int]:
    """Greedy bin-packing (longest processing time first): each unit, costliest first, goes to the rank with the
    least work so far (ties: the lower rank, then the earlier unit), so every rank computes the same assignment."""
    load = [0.0] * size
    owners = {}
    for name in sorted(costs, key=lambda n: -costs[n]):  # sorted() is stable: equal costs keep their order
        rank = min(range(size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, str(_DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise DistributedError(f"${TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


class World:
    """This process's place among the ranks of a run, and the collectives the pipeline needs."""

    def __init__(self, device: torch.device, rank: int = 0, size: int = 1, timeout_s: float = _DEFAULT_TIMEOUT_S):
        self.device, self.rank, self.size, self.timeout_s = device, rank, size, timeout_s
        self._seq = 0  # collectives entered so far: the same sequence on every rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> "World":
        """The world torchrun (or srun) described in RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT:
        joins the process group (nccl on CUDA, each rank on cuda:LOCAL_RANK; gloo on the CPU) unless one exists, and
        leaves it at exit. Without WORLD_SIZE (or with 1) a single process with no group."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1 and not dist.is_initialized():
            return cls(device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        timeout = _timeout_s()
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
            except (RuntimeError, ValueError) as e:
                where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
                raise DistributedError(f"rank {os.environ.get('RANK', '?')} of {size} could not join the process "
                                       f"group at {where}: {str(e).splitlines()[0]}") from None
            atexit.register(dist.destroy_process_group)
        return cls(device, dist.get_rank(), dist.get_world_size(), timeout)

    # ---- calibration data
    def shard(self, batches: Sequence[T]) -> list[T]:
        """This rank's whole batches, round-robin: batch b goes to rank b mod N."""
        return list(batches[self.rank::self.size])

    # ---- collectives
    def _collective(self, what: str, fn: Callable[[], T]) -> T:
        """Run one collective; a peer that died, failed or hung turns into one DistributedError naming it."""
        self._seq += 1
        try:
            self._store().set(f"{_KEY}/at/{self.rank}", f"{self._seq} {what}")
            return fn()
        except RuntimeError as e:  # DistBackendError, DistStoreError and gloo's errors are RuntimeErrors
            raise DistributedError(f"rank {self.rank}: {self._cause(what, e)}; stopping, the checkpoint is not "
                                   f"complete (rerun the same command to resume)") from None

    def _store(self) -> dist.Store:
        return dist.distributed_c10d._get_default_store()

    def _cause(self, what: str, error: RuntimeError) -> str:
        """Which rank broke the run: one that reported its own error, else one that never reached this collective."""
        try:
            store = self._store()
            peers = [r for r in range(self.size) if r != self.rank]
            for r in peers:
                if store.check([f"{_KEY}/failed/{r}"]):
                    return f"rank {r} failed: {store.get(f'{_KEY}/failed/{r}').decode()}"
            for r in peers:
                seq, _, at = store.get(f"{_KEY}/at/{r}").decode().partition(" ") \
                    if store.check([f"{_KEY}/at/{r}"]) else ("0", "", "the start")
                if int(seq) < self._seq:
                    return (f"rank {r} did not reach {what} (it was last at {at}): it was killed, crashed or hung "
                            f"past the {self.timeout_s:g} s timeout (${TIMEOUT_ENV})")
        except RuntimeError:
            return (f"{what} failed and the rendezvous store (hosted by rank 0 or torchrun) is unreachable: rank 0 "
                    f"or its launcher died")
        return f"{what} failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"

    def report_failure(self, error: BaseException) -> None:
        """Leave this rank's error in the store, so that the others name it when their next collective fails."""
        if self.size == 1 or isinstance(error, DistributedError):
            return
        text = str(error) if isinstance(error, QuantEaseError) else f"{type(error).__name__}: {error}"
        try:
            self._store().set(f"{_KEY}/failed/{self.rank}", text.splitlines()[0] if text else type(error).__name__)
        except RuntimeError:
            pass  # the store is gone too; the others report this rank as unreachable instead

    def barrier(self, what: str) -> None:
        if self.size > 1:
            self._collective(what, lambda: dist.barrier())

    def all_reduce(self, tensors: list[torch.Tensor], what: str) -> None:
        """Sum each tensor over the ranks, in place."""
        if self.size == 1:
            return
        for t in tensors:
            self._collective(what, lambda t=t: dist.all_reduce(t))

    def broadcast(self, obj: Any, what: str) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        self._collective(what, lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def all_gather(self, obj: Any, what: str, device: torch.device | None = None) -> list[Any]:
        """Every rank's `obj`, by rank. Tensors inside travel as torch.save bytes and arrive on `device` (default
        this rank's), not on the device they were saved from (another rank's GPU)."""
        if self.size == 1:
            return [obj]
        buf = io.BytesIO()
        torch.save(obj, buf)
        out: list[Any] = [None] * self.size
        self._collective(what, lambda: dist.all_gather_object(out, buf.getvalue()))
        return [torch.load(io.BytesIO(b), map_location=device or self.device, weights_only=False) for b in out]

    def decide(self, what: str, fn: Callable[[], T]) -> T:
        """Rank 0 runs `fn` (what touches shared files: checks, creating or clearing the output folder) and every
        rank gets its result, or raises its QuantEaseError."""
        if self.size == 1:
            return fn()
        outcome: tuple[bool, Any] | None = None
        if self.is_main:
            try:
                outcome = (True, fn())
            except QuantEaseError as e:
                outcome = (False, e)
        ok, value = self.broadcast(outcome, what)
        if not ok:
            raise value
        return value
