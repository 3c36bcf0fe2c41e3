"""Perplexity with the standard protocol: the text joined and tokenized once, cut into non-overlapping windows of
`seqlen` tokens, each window scored independently; ppl = exp(total NLL / number of predicted tokens), where every
window predicts its tokens 2..seqlen."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.sources import load_text
from ..data.windows import eval_windows, tokenize

__all__ = ["PerplexityResult", "perplexity", "perplexity_on"]


@dataclass
class PerplexityResult:
    dataset: str
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens scored
    windows: int
    seqlen: int
    limit: int | None = None  # the window cap asked for (None: the whole text)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, device: torch.device, progress: bool = False,
               desc: str = "ppl") -> tuple[float, int]:
    """Sum of NLL over every predicted token of every window [n, seqlen], and the count of predicted tokens."""
    total, count = 0.0, 0
    for ids in tqdm(windows, desc=desc, unit="window", disable=not progress, leave=False):
        ids = ids[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # [seqlen-1, vocab]
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total, count


def perplexity_on(model: torch.nn.Module, tokenizer, dataset: str, seqlen: int, limit: int | None,
                  device: torch.device, progress: bool = False) -> PerplexityResult:
    windows = eval_windows(tokenize(tokenizer, load_text(dataset, "eval")), seqlen, limit)
    total, count = perplexity(model, windows, device, progress, desc=f"ppl {dataset}")
    nll = total / count
    return PerplexityResult(dataset, math.exp(nll), nll, count, windows.shape[0], seqlen, limit)
