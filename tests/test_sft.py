"""AST under TRL: SparseSFTTrainer on a tiny Llama and a small conversational prompt-completion dataset."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_tokenizer, make_tiny_model
from datasets import Dataset
from transformers import TrainerCallback

from peft_sparse import SparseSFTConfig, SparseSFTTrainer
from peft_sparse.sparsity import follows_nm
from peft_sparse.training import kl_distill_sum
from peft_sparse.training.losses import shifted_token_mask

CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
QUESTIONS = ["What is a loop?", "Name a prime.", "Why sort a list?", "What does a compiler do?"]
ANSWERS = ["A loop repeats a block of code.", "Seven is a prime.", "Sorted lists are searched fast.",
           "It translates source code into machine code."]


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def conversations(n: int = 16) -> Dataset:
    rows = [{"prompt": [{"role": "user", "content": QUESTIONS[i % 4]}],
             "completion": [{"role": "assistant", "content": ANSWERS[i % 4]}]} for i in range(n)]
    return Dataset.from_list(rows)


class NMEveryStep(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        for layer in self.trainer.sparse_layers.values():
            assert (layer.sparse_mask.reshape(-1, 4).sum(-1) == 2).all()
            assert follows_nm(layer.weight * layer.sparse_mask, 2, 4)
        self.steps += 1


def sft_trainer(tmp_path, tokenizer, teacher=None, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                    mask_update_interval=2, srste_decay=1e-2, logging_steps=1, report_to="none", save_strategy="no",
                    use_cpu=True, bf16=False, seed=0, completion_only_loss=True, max_length=64,
                    dataloader_num_workers=0)
    checker = NMEveryStep()
    trainer = SparseSFTTrainer(model=make_tiny_model("llama", vocab_size=len(tokenizer)),
                               args=SparseSFTConfig(**{**settings, **overrides}), train_dataset=conversations(),
                               processing_class=tokenizer, teacher=teacher, callbacks=[checker])
    checker.trainer = trainer
    return trainer, checker


def test_sft_with_teacher_keeps_masks_nm_logs_flips_and_finalizes(tmp_path, chat_tokenizer):
    teacher = make_tiny_model("llama", vocab_size=len(chat_tokenizer), seed=1)
    trainer, checker = sft_trainer(tmp_path, chat_tokenizer, teacher=copy.deepcopy(teacher), max_steps=5)
    trainer.train()
    assert checker.steps == 5
    flips = [row for row in trainer.state.log_history if "flip_rate" in row]
    assert [row["step"] for row in flips] == [3, 5] and any(row["flip_rate"] > 0 for row in flips)
    assert all("mean_token_accuracy" in row for row in flips)  # TRL's own metrics still reach the log
    trainer.finalize(str(tmp_path / "final"))
    assert all(follows_nm(m.weight, 2, 4) for n, m in trainer.model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n)


def test_sft_kl_covers_the_completion_tokens_only(tmp_path, chat_tokenizer):
    teacher = make_tiny_model("llama", vocab_size=len(chat_tokenizer), seed=1).eval()
    trainer, _ = sft_trainer(tmp_path, chat_tokenizer, teacher=teacher, distill_alpha=2.0, distill_temperature=2.0)
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"]
    scored = shifted_token_mask(labels)
    assert 0 < scored.sum() < batch["attention_mask"][:, 1:].sum()  # prompts are not scored
    model = trainer.model.eval()
    with torch.no_grad():
        with_kl = trainer.compute_loss(model, dict(batch)).item()
        trainer.teacher = None
        ce_only = trainer.compute_loss(model, dict(batch)).item()
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        student_logits, teacher_logits = model(**inputs).logits, teacher(**inputs).logits
    expected = kl_distill_sum(student_logits[:, :-1][scored], teacher_logits[:, :-1][scored], 2.0) / scored.sum()
    assert with_kl - ce_only == pytest.approx(2.0 * expected.item(), rel=1e-4)
