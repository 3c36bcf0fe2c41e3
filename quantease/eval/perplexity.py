"""Perplexity with the standard protocol: the text joined and tokenized once, cut into non-overlapping windows of
`seqlen` tokens, each window scored independently; ppl = exp(total NLL / number of predicted tokens).

Every window [x_1..x_L] predicts x_2..x_L from its prefix, NLL = -sum_{t=2..L} log p(x_t | x_<t), so n windows
predict n (L - 1) tokens in every BOS mode (data/windows.py): under "every" x_1 is the BOS, never a target, and the
L - 1 text tokens after it are all predicted; under "never" (and for all but the first window under "first") the
window's first text token is context only."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.sources import load_text
from ..errors import UsageError
from ..data.windows import eval_windows, legacy_bos, tokenize

__all__ = ["PerplexityResult", "perplexity", "perplexity_on", "bos_protocol"]


@dataclass
class PerplexityResult:
    dataset: str
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens scored
    windows: int
    seqlen: int
    limit: int | None = None  # the window cap asked for (None: the whole text)
    bos: str = "never"  # BOS mode used: every, first or never (data/windows.py)
    adds_bos: bool = False  # the tokenizer adds a BOS on its own (what --bos auto went by)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def legacy(self) -> bool:
        """Whether this is the protocol of the code before --bos (one BOS before the whole text if the tokenizer
        adds one, else none): results under it keep their old keys in eval.json."""
        return self.bos == legacy_bos(self.adds_bos)


def bos_protocol(bos: str, seqlen: int) -> str:
    """The BOS part of the protocol line printed beside a perplexity."""
    return {"every": f"BOS + {seqlen - 1} text tokens per window", "first": "one BOS before the whole text (GPTQ)",
            "never": "no BOS"}[bos]


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
                  device: torch.device, progress: bool = False, bos: str = "auto") -> PerplexityResult:
    if seqlen < 2:
        raise UsageError(f"perplexity windows need at least 2 tokens (one predicted), got seqlen {seqlen}")
    stream = tokenize(tokenizer, load_text(dataset, "eval"), bos)
    windows = eval_windows(stream, seqlen, limit)
    total, count = perplexity(model, windows, device, progress, desc=f"ppl {dataset}")
    nll = total / count
    return PerplexityResult(dataset, math.exp(nll), nll, count, windows.shape[0], seqlen, limit, stream.bos,
                            stream.adds_bos)
