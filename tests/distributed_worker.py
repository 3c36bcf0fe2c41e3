"""One rank of a test run (or the single process): quantize with the settings in argv[1] (JSON) and save every Σ the
pipeline observed to argv[2] (torch.save of {"block:layer": Σ}). Launched by tests/test_distributed.py."""
from __future__ import annotations

import json
import sys

import torch

from quantease.api import QuantConfig, quantize

if __name__ == "__main__":
    torch.set_num_threads(1)
    seen: dict[str, torch.Tensor] = {}
    quantize(QuantConfig.from_dict(json.loads(sys.argv[1])), progress=False,
             observe=lambda b, n, s: seen.__setitem__(f"{b}:{n}", s.cpu()))
    torch.save(seen, sys.argv[2])
