"""Perplexity against a slow, obviously-correct per-token reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from peft_sparse.data import embedded_text
from peft_sparse.evaluation import perplexity, token_windows

TEXT = embedded_text("heldout")[:6_000]


def reference_ppl(model, tokenizer, text, seqlen, max_windows=None):
    """Sum -log p(token | prefix) over every window position by hand, then exp(mean)."""
    ids = tokenizer(text).input_ids
    count = len(ids) // seqlen if max_windows is None else min(len(ids) // seqlen, max_windows)
    nll, predicted = 0.0, 0
    with torch.no_grad():
        for w in range(count):
            window = torch.tensor([ids[w * seqlen : (w + 1) * seqlen]])
            logprobs = torch.log_softmax(model(window).logits[0].double(), dim=-1)
            for position in range(seqlen - 1):
                nll -= logprobs[position, window[0, position + 1]].item()
                predicted += 1
    return math.exp(nll / predicted), count, predicted


@pytest.fixture
def tiny_lm(tiny_model_factory, tiny_tokenizer):
    return tiny_model_factory("llama", vocab_size=len(tiny_tokenizer))


def test_matches_token_by_token_reference(tiny_lm, tiny_tokenizer):
    result = perplexity(tiny_lm, tiny_tokenizer, TEXT, seqlen=64, max_windows=5, progress=False)
    ppl, windows, predicted = reference_ppl(tiny_lm, tiny_tokenizer, TEXT, 64, max_windows=5)
    assert (result.windows, result.tokens, result.seqlen) == (windows, predicted, 64) == (5, 5 * 63, 64)
    assert result.ppl == pytest.approx(ppl, rel=1e-5)
    assert result.nll == pytest.approx(math.log(ppl), rel=1e-5)
    assert result.tokens_per_s > 0 and set(result.to_dict()) >= {"ppl", "nll", "tokens", "windows", "seconds"}


def test_windows_are_consecutive_and_drop_the_remainder(tiny_tokenizer):
    ids = tiny_tokenizer(TEXT).input_ids
    windows = token_windows(tiny_tokenizer, TEXT, 100)
    assert windows.shape == (len(ids) // 100, 100)
    assert windows.flatten().tolist() == ids[: windows.numel()]
    assert token_windows(tiny_tokenizer, TEXT, 100, max_windows=3).shape == (3, 100)


def test_batching_and_sources_agree(tmp_path, tiny_lm, tiny_tokenizer):
    base = perplexity(tiny_lm, tiny_tokenizer, TEXT, seqlen=48, max_windows=6, progress=False)
    batched = perplexity(tiny_lm, tiny_tokenizer, TEXT, seqlen=48, max_windows=6, batch_size=4, progress=False)
    assert batched.ppl == pytest.approx(base.ppl, rel=1e-5)
    text_file = tmp_path / "eval.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    assert perplexity(tiny_lm, tiny_tokenizer, str(text_file), 48, 6, progress=False).ppl == pytest.approx(base.ppl)
    parts = TEXT.split("\n\n")
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in parts), encoding="utf-8")
    assert perplexity(tiny_lm, tiny_tokenizer, str(jsonl), 48, 6, progress=False).ppl == pytest.approx(base.ppl)


def test_embedded_name_uses_the_heldout_text(tiny_lm, tiny_tokenizer):
    by_name = perplexity(tiny_lm, tiny_tokenizer, "embedded", seqlen=64, max_windows=2, progress=False)
    by_text = perplexity(tiny_lm, tiny_tokenizer, embedded_text("heldout"), seqlen=64, max_windows=2, progress=False)
    assert by_name.ppl == by_text.ppl


def test_benchmark_protocol_file(shared_data, tiny_lm, tiny_tokenizer):
    wiki = shared_data / "wikitext-2-raw" / "wiki.test.raw"
    result = perplexity(tiny_lm, tiny_tokenizer, str(wiki), seqlen=512, max_windows=2, progress=False)
    head = wiki.read_text(encoding="utf-8")[:20_000]  # enough bytes for two windows of the byte-level tokenizer
    ppl, _, _ = reference_ppl(tiny_lm, tiny_tokenizer, head, 512, max_windows=2)
    assert result.windows == 2 and result.ppl == pytest.approx(ppl, rel=1e-5)


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "match"),
    [
        (TEXT, {"seqlen": 1}, ValueError, "seqlen must be an integer >= 2"),
        (TEXT, {"max_windows": 0}, ValueError, "max_windows"),
        (TEXT, {"batch_size": 0}, ValueError, "batch_size"),
        ("a few words only", {"seqlen": 64}, ValueError, "fewer than one window"),
        ("missing/eval.txt", {}, FileNotFoundError, "does not exist"),
    ],
)
def test_bad_input(tiny_lm, tiny_tokenizer, data, kwargs, error, match):
    with pytest.raises(error, match=match):
        perplexity(tiny_lm, tiny_tokenizer, data, **{"seqlen": 64, "progress": False, **kwargs})
