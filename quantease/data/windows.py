"""Token windows: random calibration samples and the non-overlapping perplexity windows."""
from __future__ import annotations

import hashlib

import torch

from ..errors import DataError

__all__ = ["tokenize", "calibration_windows", "eval_windows", "fingerprint"]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text tokenized once (a leading BOS if the tokenizer adds one): [n] int64."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]  # default special tokens, as the GPTQ protocol
    return ids


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random offsets (GPTQ's protocol): [nsamples, seqlen]."""
    need = nsamples * seqlen
    if tokens.numel() < need:
        raise DataError(
            f"calibration text has {tokens.numel()} tokens but nsamples x seqlen = {nsamples} x {seqlen} = {need} "
            f"are needed: lower --nsamples/--seqlen or give more text"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, seqlen] (the tail shorter than seqlen is dropped)."""
    n = tokens.numel() // seqlen
    if n == 0:
        raise DataError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        n = min(n, limit)
    return tokens[: n * seqlen].reshape(n, seqlen)


def fingerprint(tensor: torch.Tensor) -> str:
    """sha256 of a token tensor: identifies exactly which calibration data a checkpoint was made from."""
    return hashlib.sha256(tensor.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
