"""Calibration sources and sampling: the windows must be exactly the ones the reference loaders draw."""

from __future__ import annotations

import json
import random

import pytest
import torch

from peft_sparse.data import embedded_documents, embedded_text, load_calibration


def reference_document_windows(docs, tokenizer, nsamples, seqlen, seed):
    """Independent re-statement of the reference C4 sampler (random document longer than seqlen, random offset)."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            enc = tokenizer(docs[i], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        out.append(enc.input_ids[:, i : i + seqlen])
    return torch.cat(out)


def reference_text_windows(text, tokenizer, nsamples, seqlen, seed):
    """Independent re-statement of the reference WikiText-2 sampler (one tokenization, random offsets)."""
    enc = tokenizer(text, return_tensors="pt")
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        out.append(enc.input_ids[:, i : i + seqlen])
    return torch.cat(out)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "url": "x"}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_embedded_split_is_every_fifth_sorted_document():
    from pydoc_data.topics import topics

    ordered = [topics[k] for k in sorted(topics)]
    heldout, calibration = embedded_documents("heldout"), embedded_documents("calibration")
    assert heldout == ordered[4::5]
    assert len(heldout) + len(calibration) == len(ordered) == len(embedded_documents("all"))
    assert not set(heldout) & set(calibration)
    assert embedded_text("heldout") == "\n\n".join(heldout)
    with pytest.raises(ValueError, match="Unknown embedded split"):
        embedded_documents("train")


def test_embedded_default_matches_reference_document_sampler(tiny_tokenizer):
    got = load_calibration(None, tiny_tokenizer, nsamples=6, seqlen=96, seed=3)
    want = reference_document_windows(embedded_documents("calibration"), tiny_tokenizer, 6, 96, 3)
    assert got.dtype == torch.long and got.shape == (6, 96)
    assert torch.equal(got, want)
    assert torch.equal(load_calibration("embedded", tiny_tokenizer, nsamples=6, seqlen=96, seed=3), want)
    assert not torch.equal(load_calibration(None, tiny_tokenizer, nsamples=6, seqlen=96, seed=4), want)


def test_jsonl_with_short_documents_matches_reference(tmp_path, tiny_tokenizer):
    docs = embedded_documents("calibration")[:5] + ["too short", "also short"] * 3
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    got = load_calibration(str(path), tiny_tokenizer, nsamples=7, seqlen=200, seed=11)
    assert torch.equal(got, reference_document_windows(docs, tiny_tokenizer, 7, 200, 11))


def test_text_file_matches_reference_text_sampler(tmp_path, tiny_tokenizer):
    text = embedded_text("calibration")[:30_000]
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    got = load_calibration(str(path), tiny_tokenizer, nsamples=9, seqlen=128, seed=5)
    assert torch.equal(got, reference_text_windows(text, tiny_tokenizer, 9, 128, 5))


def test_real_c4_and_wikitext_files_match_reference(shared_data, tiny_tokenizer):
    c4 = shared_data / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
    docs = [json.loads(line)["text"] for line in c4.read_text(encoding="utf-8").splitlines()]
    got = load_calibration(str(c4), tiny_tokenizer, nsamples=4, seqlen=512, seed=0)
    assert torch.equal(got, reference_document_windows(docs, tiny_tokenizer, 4, 512, 0))
    wiki = shared_data / "wikitext-2-raw" / "wiki.test.raw"
    got = load_calibration(str(wiki), tiny_tokenizer, nsamples=4, seqlen=512, seed=0)
    want = reference_text_windows(wiki.read_text(encoding="utf-8"), tiny_tokenizer, 4, 512, 0)
    assert torch.equal(got, want)


def test_sampling_leaves_global_random_state_alone(tiny_tokenizer):
    random.seed(123)
    expected = random.random()
    random.seed(123)
    load_calibration(None, tiny_tokenizer, nsamples=2, seqlen=32, seed=0)
    assert random.random() == expected


def test_no_long_enough_document_is_a_clear_error_not_a_hang(tmp_path, tiny_tokenizer):
    docs = ["short one", "a slightly longer document"]
    path = write_jsonl(tmp_path / "short.jsonl", docs)
    longest = max(len(tiny_tokenizer(d).input_ids) for d in docs)
    with pytest.raises(ValueError, match=f"longest has {longest}.*smaller seqlen"):
        load_calibration(str(path), tiny_tokenizer, nsamples=2, seqlen=64)


@pytest.mark.parametrize(
    ("name", "content", "error", "match"),
    [
        ("missing.txt", None, FileNotFoundError, "does not exist"),
        ("data.csv", "a,b\n", ValueError, "Unsupported file type"),
        ("bad.jsonl", '{"body": "x"}\n', ValueError, "'text' field"),
        ("tiny.txt", "just a few words", ValueError, "only .* tokens"),
    ],
)
def test_bad_local_sources(tmp_path, tiny_tokenizer, name, content, error, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=match):
        load_calibration(str(path), tiny_tokenizer, nsamples=2, seqlen=64)


@pytest.mark.parametrize("kwargs", [{"nsamples": 0}, {"seqlen": -1}, {"nsamples": 2.5}])
def test_bad_counts_fail_before_reading(tiny_tokenizer, kwargs):
    with pytest.raises(ValueError, match="positive integer"):
        load_calibration("does/not/exist.txt", tiny_tokenizer, **{"nsamples": 2, "seqlen": 8, **kwargs})


def test_hub_dataset_offline_suggests_local_file(monkeypatch, tiny_tokenizer):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="Offline\\? Pass a local file"):
        load_calibration("c4", tiny_tokenizer, nsamples=2, seqlen=8)
    with pytest.raises(ValueError, match="Unknown dataset 'pile'"):
        load_calibration("pile", tiny_tokenizer, nsamples=2, seqlen=8)
