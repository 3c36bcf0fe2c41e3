"""Token windows: random calibration samples and the non-overlapping perplexity windows, with a BOS where the
model expects one.

BOS modes (`--bos`), resolved against the tokenizer by `resolve_bos`:

- every: each window is BOS + (seqlen - 1) text tokens, as a model trained with a BOS at position 0 (its attention
  sink) sees its inputs;
- first: one BOS before the whole text, then windows cut from that stream (the GPTQ paper's protocol: only the first
  window starts with BOS);
- never: no BOS; windows of seqlen text tokens;
- auto: every when the tokenizer adds a BOS on its own, never otherwise.

The text itself is always tokenized without special tokens, so no BOS ever lands inside a window. A tokenizer that
adds no BOS of its own gives, under auto, exactly the windows the code gave before --bos existed.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..errors import DataError, UsageError

__all__ = ["BOS_MODES", "TokenStream", "adds_bos", "auto_bos", "legacy_bos", "resolve_bos", "tokenize", "calibration_windows", "eval_windows",
           "fingerprint"]

BOS_MODES = ("auto", "every", "first", "never")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS in front of a text by itself (default special tokens), judged by what it
    does rather than by a config flag, whose name and meaning vary between tokenizer classes."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a").input_ids
    return bool(with_special) and with_special[0] == bos and tokenizer("a", add_special_tokens=False).input_ids[:1] != [bos]


def auto_bos(adds: bool) -> str:
    """What auto resolves to for a tokenizer that does (not) add a BOS on its own."""
    return "every" if adds else "never"


def legacy_bos(adds: bool) -> str:
    """The mode of the code before --bos existed (the text tokenized once with the tokenizer's own special tokens):
    results saved then were made with it."""
    return "first" if adds else "never"


def resolve_bos(tokenizer, mode: str) -> str:
    """The mode actually used: every, first or never. every/first need a BOS token; a tokenizer without one is an
    error rather than a silent fallback, since the asked-for protocol cannot be met."""
    if mode not in BOS_MODES:
        raise UsageError(f"bos must be one of {', '.join(BOS_MODES)}, got {mode!r}")
    if mode == "auto":
        return auto_bos(adds_bos(tokenizer))
    if mode != "never" and tokenizer.bos_token_id is None:
        raise UsageError(f"--bos {mode} needs a BOS token, but this tokenizer has none (no bos_token): "
                         f"use --bos auto or never")
    return mode


@dataclass(frozen=True)
class TokenStream:
    """A tokenized text and where its windows get a BOS."""

    ids: torch.Tensor  # [n] int64: the text tokens, after one BOS under "first"
    bos: str  # the resolved mode: every, first or never
    bos_id: int | None
    adds_bos: bool  # the tokenizer adds a BOS on its own (what auto went by)

    def span(self, seqlen: int) -> int:
        """Stream tokens per window: under every the BOS takes one of the seqlen positions."""
        return seqlen - 1 if self.bos == "every" else seqlen

    def window(self, start: int, seqlen: int) -> torch.Tensor:
        """The window [seqlen] whose stream tokens begin at `start`."""
        body = self.ids[start : start + self.span(seqlen)]
        return torch.cat([body.new_tensor([self.bos_id]), body]) if self.bos == "every" else body


def tokenize(tokenizer, text: str, bos: str = "auto") -> TokenStream:
    """The whole text tokenized once without special tokens (plus one leading BOS under "first")."""
    mode = resolve_bos(tokenizer, bos)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]  # [n]
    if mode == "first":
        ids = torch.cat([ids.new_tensor([tokenizer.bos_token_id]), ids])
    return TokenStream(ids, mode, tokenizer.bos_token_id, adds_bos(tokenizer))


def _check_seqlen(stream: TokenStream, seqlen: int) -> None:
    if stream.span(seqlen) < 1:
        raise UsageError(f"windows of {seqlen} token(s) with --bos every hold no text: use a seqlen of at least 2")


def calibration_windows(stream: TokenStream, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random offsets of the stream (GPTQ's protocol; the offsets depend only
    on the seed and the stream's length): [nsamples, seqlen]."""
    _check_seqlen(stream, seqlen)
    span, n = stream.span(seqlen), stream.ids.numel()
    need = nsamples * span
    if n < need:
        per = "seqlen" if span == seqlen else "(seqlen - 1 after each window's BOS)"
        raise DataError(
            f"calibration text has {n} tokens but nsamples x {per} = {nsamples} x {span} = {need} are needed: "
            f"lower --nsamples/--seqlen or give more text"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - span + 1, (nsamples,), generator=gen)
    return torch.stack([stream.window(s, seqlen) for s in starts.tolist()])


def eval_windows(stream: TokenStream, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, seqlen] (the tail shorter than one window is dropped); under every
    each holds the next seqlen - 1 text tokens after its BOS."""
    _check_seqlen(stream, seqlen)
    span = stream.span(seqlen)
    n = stream.ids.numel() // span
    if n == 0:
        what = f"one window of {seqlen}" if span == seqlen else f"the {span} text tokens of one window after its BOS"
        raise DataError(f"evaluation text has {stream.ids.numel()} tokens, fewer than {what}")
    if limit is not None:
        n = min(n, limit)
    return torch.stack([stream.window(k * span, seqlen) for k in range(n)])


def fingerprint(tensor: torch.Tensor) -> str:
    """sha256 of a token tensor: identifies exactly which calibration data a checkpoint was made from."""
    return hashlib.sha256(tensor.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
