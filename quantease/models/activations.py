"""Where calibration hidden states live between block forwards: on the compute device, or offloaded to host memory.

A 70B model at 128 × 2048 calibration tokens carries 4 GiB of bf16 hidden states into every block and 4 GiB out of
it, twice that with the propagated target. When they do not fit on the device beside the block and its Σ, they are
kept in host memory (pinned, so a copy runs at full bus speed without staging) and each batch is copied to the
device only for the forward that reads it. Copies are exact, so a run gives the same checkpoint either way.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Activations"]


class Activations(Sequence):
    """One tensor per calibration batch ([batch, seqlen, hidden]); indexing returns the batch on `device`.

    offload=False keeps the batches on `device` itself. offload=True keeps host copies (pinned when the device is a
    GPU) and copies a batch to `device` each time it is read: the device holds at most the batch in use."""

    def __init__(self, device: torch.device | str, offload: bool = False):
        self.device = torch.device(device)
        self.offload = offload
        self._batches: list[torch.Tensor] = []

    def empty(self) -> "Activations":
        """A new store with the same placement and no batches."""
        return Activations(self.device, self.offload)

    @classmethod
    def of(cls, batches: list[torch.Tensor], device: torch.device | str, offload: bool = False) -> "Activations":
        store = cls(device, offload)
        for x in batches:
            store.append(x)
        return store

    def append(self, x: torch.Tensor) -> None:
        if not self.offload:
            self._batches.append(x.to(self.device))
            return
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=self.device.type == "cuda")
        self._batches.append(host.copy_(x.detach()))

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self._batches[i]
        # from pinned memory the copy is asynchronous; kernels on the same stream wait for it
        return x.to(self.device, non_blocking=True) if self.offload else x

    def host(self) -> list[torch.Tensor]:
        """Every batch in host memory (what the resume state writes)."""
        return [x if self.offload else x.cpu() for x in self._batches]

    @property
    def tokens(self) -> int:
        return sum(x.numel() // x.shape[-1] for x in self._batches)

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self._batches)
