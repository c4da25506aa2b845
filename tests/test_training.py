"""SparseTrainer / AST tests on tiny random Llama models (CPU, seconds)."""

from __future__ import annotations

import concurrent.futures
import copy
import json
import shutil
import types

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainerCallback
from transformers.pytorch_utils import Conv1D

from peft_sparse import SparseTrainer, SparseTrainingArguments
from peft_sparse.errors import SparseStateError
from peft_sparse.sparsity import SparsityPattern, follows_nm, nm_mask
from peft_sparse.training import (
    MaskedWeight,
    SparseAdamW,
    TokenWindowDataset,
    attach_sparse_layers,
    ce_kl_distill_sum,
    chunked_kl_distill_sum,
    kl_distill_sum,
    srste_lambda,
)
from peft_sparse.training.layers import SparseConv1D, SparseLinear, magnitude_mask
from peft_sparse.training.losses import scored_rows, shifted_token_mask
from peft_sparse.training.plot import flip_series, plot_flip_rates

PATTERN = SparsityPattern.parse("2:4")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


class TokenDataset(TokenWindowDataset):
    def __init__(self, n: int = 32, seqlen: int = 16, seed: int = 0):
        super().__init__(torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed)))
        self.ids = self.windows


def make_args(tmp_path, **overrides) -> SparseTrainingArguments:
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
                    mask_update_interval=2, srste_decay=1e-2, srste_ramp_steps=3, logging_steps=1, report_to="none",
                    save_strategy="no", use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0)
    return SparseTrainingArguments(**{**defaults, **overrides})


# ---- pure pieces ----


def test_annealing_schedule_values():
    assert [srste_lambda(t, 2e-4, 4) for t in range(7)] == pytest.approx([0, 5e-5, 1e-4, 1.5e-4, 2e-4, 2e-4, 2e-4])
    assert [srste_lambda(t, 2e-4, 0) for t in (0, 5)] == [2e-4, 2e-4]


@pytest.mark.parametrize(
    "bad",
    [dict(pattern="2:x"), dict(mask_update_interval=0), dict(srste_decay=-1.0),
     dict(srste_placement="adam"), dict(mask_init="wanda"), dict(distill_temperature=0.0),
     dict(pruned_values="teacher"), dict(teacher_dtype="int8")],
)
def test_bad_arguments_fail_early(tmp_path, bad):
    with pytest.raises(ValueError):
        make_args(tmp_path, **bad)


def test_masked_weight_gradients():
    weight = torch.randn(3, 8, requires_grad=True)
    mask = nm_mask(weight.detach().abs(), 2, 4).float()
    upstream = torch.randn(3, 8)
    MaskedWeight.apply(weight, mask, 0.0, True).backward(upstream)
    assert torch.equal(weight.grad, upstream)  # straight through, also to pruned weights
    weight.grad = None
    MaskedWeight.apply(weight, mask, 0.0, False).backward(upstream)
    assert torch.equal(weight.grad, upstream * mask)  # frozen mask: pruned weights get nothing
    weight.grad = None
    MaskedWeight.apply(weight, mask, 0.5, True).backward(torch.zeros(3, 8))
    assert torch.equal(weight.grad, 0.5 * weight.detach() * (1 - mask))  # decay on pruned weights only


def adamw_reference(w, grads, mask, lam, placement, lr=0.1, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    """The two optimizer placements written out plainly, one element-wise formula per line."""
    u, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        d = lam * w * ~mask
        w = w * (1 - lr * wd)
        if placement == "step":  # paper 3.2 literally: (1-b1)(g + d) in the numerator, u of g alone, v of g + d
            numerator = b1 * u + (1 - b1) * (g + d)
            v = b2 * v + (1 - b2) * (g + d) ** 2
            u = b1 * u + (1 - b1) * g
        else:  # the authors' adamw.py: update = u + d with weight 1, v of the update
            u = b1 * u + (1 - b1) * g
            numerator = u + d
            v = b2 * v + (1 - b2) * numerator**2
        w = w - lr * (numerator / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return w


@pytest.mark.parametrize("placement", ["step", "update"])
@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_sparse_adamw_matches_reference_and_adamw(lam, placement):
    torch.manual_seed(0)
    w0 = torch.randn(4, 8)
    mask = nm_mask(w0.abs(), 2, 4)
    grads = [torch.randn(4, 8) for _ in range(3)]
    param, free = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt = SparseAdamW([param, free], masks={param: lambda: mask}, placement=placement, lr=0.1, weight_decay=0.01,
                      srste_decay=lam)
    for g in grads:
        param.grad, free.grad = g.clone(), g.clone()
        opt.step()
    torch.testing.assert_close(param.detach(), adamw_reference(w0, grads, mask, lam, placement, wd=0.01))
    plain = nn.Parameter(w0.clone())
    torch_opt = torch.optim.AdamW([plain], lr=0.1, weight_decay=0.01)
    for g in grads:
        plain.grad = g.clone()
        torch_opt.step()
    torch.testing.assert_close(free.detach(), plain.detach())  # a parameter without a mask is plain AdamW
    if lam == 0.0 and placement == "step":
        plain = nn.Parameter(w0.clone())
        torch_opt = torch.optim.AdamW([plain], lr=0.1, weight_decay=0.01)
        for g in grads:
            plain.grad = g.clone()
            torch_opt.step()
        torch.testing.assert_close(param.detach(), plain.detach())


@pytest.mark.parametrize("placement", ["step", "update"])
def test_optimizer_decay_shrinks_only_pruned_weights(placement):
    w0 = torch.randn(4, 8).sign() * (0.5 + torch.rand(4, 8))  # |w| >= 0.5: "update"'s first step is 10 lr
    mask = nm_mask(w0.abs(), 2, 4)
    param = nn.Parameter(w0.clone())
    opt = SparseAdamW([param], masks={param: lambda: mask}, placement=placement, lr=0.01, srste_decay=1e-3)
    param.grad = torch.zeros_like(w0)
    opt.step()
    after = param.detach()
    assert torch.equal(after[mask], w0[mask])
    assert (after[~mask].abs() < w0[~mask].abs()).all() and (after[~mask].sign() == w0[~mask].sign()).all()


def test_kl_matches_slow_reference_and_vanishes_for_equal_logits():
    torch.manual_seed(0)
    student, teacher, temperature = torch.randn(5, 11), torch.randn(5, 11), 2.0
    expected = 0.0
    for s_row, t_row in zip(student, teacher):
        p = torch.softmax(t_row / temperature, -1)
        q = torch.softmax(s_row / temperature, -1)
        expected += float((p * (p.log() - q.log())).sum())
    assert float(kl_distill_sum(student, teacher, temperature)) == pytest.approx(expected * temperature**2, rel=1e-5)
    assert float(kl_distill_sum(teacher, teacher, temperature)) == pytest.approx(0.0, abs=1e-5)
    labels = torch.tensor([[1, 2, -100, 3]])
    assert shifted_token_mask(labels).tolist() == [[True, False, True]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kl_equals_the_reference_on_scored_rows_in_value_and_gradient(dtype):
    torch.manual_seed(0)
    student = torch.randn(3, 9, 40, dtype=dtype, requires_grad=True)
    with torch.inference_mode():  # as the trainer computes the teacher
        teacher = torch.randn(3, 9, 40, dtype=dtype)
    labels = torch.randint(0, 40, (3, 9))
    labels[0, :5] = -100  # a prompt
    labels[2] = -100  # nothing scored in this row
    valid = shifted_token_mask(labels)
    reference = kl_distill_sum(student[:, :-1][valid], teacher.clone()[:, :-1][valid], 2.0)
    (expected_grad,) = torch.autograd.grad(reference, student)
    chunked = chunked_kl_distill_sum(student, teacher, 2.0, scored_rows(labels), chunk_tokens=4)
    (grad,) = torch.autograd.grad(chunked, student)
    torch.testing.assert_close(chunked, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert grad.dtype == dtype and not grad[2].any() and not grad[0, :4].any()  # unscored rows get nothing
    assert chunked_kl_distill_sum(student, teacher, 2.0, torch.empty(0, dtype=torch.long)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ce_kl_equals_cross_entropy_plus_kl_in_value_and_gradient(dtype):
    torch.manual_seed(1)
    student = torch.randn(3, 9, 40, dtype=dtype, requires_grad=True)
    with torch.inference_mode():
        teacher = torch.randn(3, 9, 40, dtype=dtype)
    targets = torch.randint(0, 40, (3, 9))
    targets[0, :5] = -100
    targets[2] = -100
    valid = targets != -100
    reference = (torch.nn.functional.cross_entropy(student[valid].float(), targets[valid], reduction="sum")
                 + 2.0 * kl_distill_sum(student[valid], teacher.clone()[valid], 3.0))
    (expected_grad,) = torch.autograd.grad(reference, student)
    fused = ce_kl_distill_sum(student, teacher, targets, temperature=3.0, alpha=2.0, chunk_tokens=4)
    (grad,) = torch.autograd.grad(fused, student)
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, **({} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)))
    assert grad.dtype == dtype and not grad[2].any() and not grad[0, :5].any()
    assert ce_kl_distill_sum(student, teacher, torch.full((3, 9), -100), 2.0, 2.0).item() == 0.0


@pytest.mark.parametrize("num_items", [None, 37])
def test_trainer_loss_is_the_models_cross_entropy_plus_the_normalised_kl(tmp_path, monkeypatch, num_items):
    """The fused loss (swapped into the model for one forward) against the model's own CE plus the KL reference."""
    import peft_sparse.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "chunked_kl_distill_sum", None)  # the separate-KL path must not run
    teacher, student = tiny_llama(seed=1), tiny_llama()
    labels = TokenDataset().ids[:4].clone()
    labels[0, :6] = -100
    batch = {"input_ids": TokenDataset().ids[:4], "labels": labels}
    trainer = SparseTrainer(model=student, args=make_args(tmp_path, distill_alpha=2.0, distill_temperature=2.0),
                            teacher=teacher)
    reference_model = copy.deepcopy(trainer.model)
    outputs = reference_model(**batch, **({} if num_items is None else {"num_items_in_batch": num_items}))
    scored = shifted_token_mask(labels)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"]).logits
    kl = kl_distill_sum(outputs.logits[:, :-1][scored], teacher_logits[:, :-1][scored], 2.0)
    expected = outputs.loss + 2.0 * kl / (num_items or int(scored.sum()))
    expected.backward()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    pairs = list(zip(trainer.model.named_parameters(), reference_model.parameters()))
    assert [p.grad is None for (_, p), _ in pairs] == [o.grad is None for _, o in pairs]
    assert sum(p.grad is not None for (_, p), _ in pairs) > 10
    for (name, param), other in pairs:
        if param.grad is not None:
            torch.testing.assert_close(param.grad, other.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert "_loss_function" not in vars(trainer.model)  # the swap lasts one forward


def test_conv1d_masks_group_along_inputs():
    conv = Conv1D(6, 8)  # weight [in=8, out=6]
    layers = attach_sparse_layers(nn.ModuleDict({"c": conv}), PATTERN, targets=["c"])
    assert isinstance(layers["c"], SparseConv1D)
    assert follows_nm((conv.weight * conv.sparse_mask).t(), 2, 4)
    x = torch.randn(2, 3, 8)
    expected = x @ (conv.weight * conv.sparse_mask) + conv.bias
    torch.testing.assert_close(conv(x), expected)


# ---- trainer ----


class StepRecorder(TrainerCallback):
    """Checks N:M exactness of every masked layer after every optimizer step."""

    def __init__(self, trainer_ref: list):
        self.trainer_ref, self.masks = trainer_ref, []

    def on_step_end(self, args, state, control, **kwargs):
        layers = self.trainer_ref[0].sparse_layers
        for layer in layers.values():
            assert (layer.sparse_mask.reshape(-1, 4).sum(-1) == 2).all()
            assert follows_nm(layer.weight * layer.sparse_mask, 2, 4)
        self.masks.append({name: layer.sparse_mask.clone() for name, layer in layers.items()})


def train_tiny(tmp_path, teacher=None, **overrides):
    model = tiny_llama()
    ref: list = []
    recorder = StepRecorder(ref)
    trainer = SparseTrainer(model=model, args=make_args(tmp_path, **overrides), train_dataset=TokenDataset(),
                            teacher=teacher, callbacks=[recorder])
    ref.append(trainer)
    return trainer, recorder


@pytest.mark.parametrize("placement", ["step", "update", "gradient"])
def test_dynamic_masks_stay_nm_flip_and_finalize_to_plain_model(tmp_path, placement):
    trainer, recorder = train_tiny(tmp_path, srste_placement=placement)
    assert all(isinstance(layer, SparseLinear) for layer in trainer.sparse_layers.values())
    trainer.train()
    assert len(recorder.masks) == 6
    flips = [row for row in trainer.state.log_history if "flip_rate" in row]
    assert [row["step"] for row in flips] == [3, 5]  # masks recomputed after 2 and 4 updates, logged with the step
    assert any(row["flip_rate"] > 0 for row in flips)  # lr 1e-2 moves weights across the boundary
    changed = [not torch.equal(recorder.masks[0][k], recorder.masks[-1][k]) for k in recorder.masks[0]]
    assert any(changed)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        sparse_logits = trainer.model(x).logits
    trainer.finalize(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for name, module in reloaded.named_modules():
        if isinstance(module, nn.Linear) and "lm_head" not in name:
            assert follows_nm(module.weight, 2, 4), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, sparse_logits)


def test_frozen_mask_trains_kept_weights_only(tmp_path):
    trainer, recorder = train_tiny(tmp_path, frozen_mask=True)
    initial = {name: layer.sparse_mask.clone() for name, layer in trainer.sparse_layers.items()}
    before = {name: layer.weight.detach().clone() for name, layer in trainer.sparse_layers.items()}
    trainer.train()
    for name, layer in trainer.sparse_layers.items():
        assert torch.equal(layer.sparse_mask, initial[name])
        assert (layer.weight[~layer.sparse_mask] == 0).all()
        assert not torch.equal(layer.weight[layer.sparse_mask], before[name][layer.sparse_mask])
    assert not any("flip_rate" in row for row in trainer.state.log_history)


def test_pruned_init_keeps_given_mask_and_can_restore_teacher_values(tmp_path):
    dense = tiny_llama()
    pruned, keeps = copy.deepcopy(dense), {}
    with torch.no_grad():
        for name, module in pruned.named_modules():
            if isinstance(module, nn.Linear) and module is not pruned.lm_head:
                keeps[name] = nm_mask(torch.rand_like(module.weight), 2, 4)  # not the magnitude mask, like SparseGPT
                module.weight.mul_(keeps[name])
    args = make_args(tmp_path, mask_init="pruned", pruned_values="teacher")
    trainer = SparseTrainer(model=pruned, args=args, train_dataset=TokenDataset(), teacher=dense)
    dense_params = dict(dense.named_parameters())
    assert set(trainer.sparse_layers) == set(keeps)
    for name, layer in trainer.sparse_layers.items():
        assert torch.equal(layer.sparse_mask, keeps[name])
        torch.testing.assert_close(layer.weight, dense_params[f"{name}.weight"])
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        SparseTrainer(model=tiny_llama(), args=make_args(tmp_path, mask_init="pruned"), train_dataset=TokenDataset())


def test_distillation_term_is_zero_when_student_equals_teacher(tmp_path):
    student = tiny_llama()
    with torch.no_grad():
        for module in student.modules():
            if isinstance(module, nn.Linear) and module is not student.lm_head:
                module.weight.mul_(magnitude_mask(module, PATTERN))
    teacher = copy.deepcopy(student)
    batch = {"input_ids": TokenDataset().ids[:4], "labels": TokenDataset().ids[:4]}
    losses = []
    for alpha in (0.0, 2.0):
        trainer = SparseTrainer(model=copy.deepcopy(student), args=make_args(tmp_path, distill_alpha=alpha),
                                teacher=teacher)
        losses.append(trainer.compute_loss(trainer.model, dict(batch)).item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert trainer.teacher.training is False and not any(p.requires_grad for p in teacher.parameters())
    trainer.teacher = tiny_llama(seed=1).eval()
    assert trainer.compute_loss(trainer.model, dict(batch)).item() > losses[0] + 1e-3


def test_teacher_dtype_runs_a_converted_copy_and_keeps_the_loss_close(tmp_path):
    teacher = tiny_llama(seed=1)
    batch = {"input_ids": TokenDataset().ids[:4], "labels": TokenDataset().ids[:4]}
    losses = {}
    for dtype in (None, "bfloat16"):
        trainer = SparseTrainer(model=tiny_llama(), args=make_args(tmp_path, teacher_dtype=dtype), teacher=teacher)
        losses[dtype] = trainer.compute_loss(trainer.model, dict(batch))
        losses[dtype].backward()
    assert trainer.teacher.dtype == torch.bfloat16 and teacher.dtype == torch.float32  # the caller's model untouched
    assert losses["bfloat16"].item() != losses[None].item()
    assert losses["bfloat16"].item() == pytest.approx(losses[None].item(), rel=1e-2)


def test_resume_matches_uninterrupted_run(tmp_path):
    common = dict(save_strategy="steps", save_steps=3)
    full, _ = train_tiny(tmp_path / "full", **common)
    full.train()
    first, _ = train_tiny(tmp_path / "resumed", **common)
    first.add_callback(_StopAt(3))
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert (checkpoint / "sparse_state.safetensors").exists() and not list(checkpoint.glob("sparse_state.pt"))
    resumed, _ = train_tiny(tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    _resumed_matches(full, resumed)
    trained = full.sparse_layers["model.layers.0.mlp.up_proj"].weight
    assert not torch.equal(trained, tiny_llama().model.layers[0].mlp.up_proj.weight)


def test_train_keeps_the_trainer_trainable_and_finalize_ends_it(tmp_path):
    trainer, recorder = train_tiny(tmp_path, max_steps=2)
    trainer.train()
    assert all(isinstance(layer, SparseLinear) for layer in trainer.sparse_layers.values())
    trainer.train()  # a second run on the same (still sparse-training) model
    assert len(recorder.masks) == 4
    trainer.finalize()
    with pytest.raises(SparseStateError, match="finalized"):
        trainer.train()


def _resumed_matches(full, resumed):
    assert resumed.state.global_step == full.state.global_step
    for name, layer in full.sparse_layers.items():
        other = resumed.sparse_layers[name]
        assert torch.equal(layer.sparse_mask, other.sparse_mask)
        assert torch.equal(layer.initial_mask, other.initial_mask)
        torch.testing.assert_close(layer.weight, other.weight)


class _LocalHub:
    """Stands in for the Hub: ``upload_folder`` copies the folder at the moment the Trainer pushes it."""

    def __init__(self, root):
        self.root = root

    def create_repo(self, name, **kwargs):
        return types.SimpleNamespace(repo_id=f"local/{name}")

    def upload_folder(self, folder_path, path_in_repo=None, **kwargs):
        shutil.copytree(folder_path, self.root / (path_in_repo or "."), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("checkpoint-*"))
        done = concurrent.futures.Future()
        done.set_result(None)
        return done


def test_resume_from_a_checkpoint_pushed_to_the_hub(tmp_path, monkeypatch):
    import transformers.trainer

    hub = _LocalHub(tmp_path / "hub")
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    common = dict(save_strategy="steps", save_steps=3)
    full, _ = train_tiny(tmp_path / "full", **common)
    full.train()
    first, _ = train_tiny(tmp_path / "run", push_to_hub=True, hub_strategy="checkpoint", save_total_limit=1, **common)
    first.add_callback(_StopAt(3))
    first.train()
    pushed = tmp_path / "hub" / "last-checkpoint"
    assert (pushed / "sparse_state.safetensors").is_file()
    resumed, _ = train_tiny(tmp_path / "elsewhere", **common)
    resumed.train(resume_from_checkpoint=str(pushed))
    _resumed_matches(full, resumed)


def test_load_best_model_at_end_restores_the_masks_of_the_best_step(tmp_path):
    ref: list = []
    recorder = StepRecorder(ref)
    args = make_args(tmp_path, mask_update_interval=1, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                     save_steps=2, load_best_model_at_end=True, metric_for_best_model="loss")
    trainer = SparseTrainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(), eval_dataset=TokenDataset(4),
                            callbacks=[recorder])
    ref.append(trainer)
    eval_losses = {2: 1.0, 4: 0.5, 6: 2.0}  # step 4 is best; masks change every step, so step 6's differ

    def evaluate(*args, **kwargs):
        metrics = {"eval_loss": eval_losses[trainer.state.global_step]}
        trainer.log(metrics)
        return metrics

    trainer.evaluate = evaluate
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    best = {name: layer.sparse_mask.clone() for name, layer in trainer.sparse_layers.items()}
    assert all(torch.equal(best[name], recorder.masks[3][name]) for name in best)
    assert any(not torch.equal(best[name], recorder.masks[5][name]) for name in best)


def test_a_checkpoint_of_other_layers_is_refused(tmp_path):
    trainer, _ = train_tiny(tmp_path)
    state = trainer.sparse_state_dict()
    state.pop("model.layers.0.mlp.up_proj.mask")
    with pytest.raises(SparseStateError, match="1 missing, 0 unexpected"):
        trainer.load_sparse_state_dict(state)
    with pytest.raises(FileNotFoundError, match="sparse_state.safetensors is missing"):
        trainer.load_sparse_state(tmp_path)


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_flip_series_reads_trainer_state(tmp_path):
    state = {"log_history": [{"loss": 1.0, "step": 1}, {"flip_rate": 0.1, "initial_flip_rate": 0.1, "step": 10},
                             {"flip_rate": 0.05, "initial_flip_rate": 0.12, "step": 20}]}
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps(state))
    from peft_sparse.training.plot import _load_history

    assert flip_series(_load_history(path), "initial_flip_rate") == ([10, 20], [0.1, 0.12])
    pytest.importorskip("matplotlib")
    plot_flip_rates({"run": path}, tmp_path / "flips.png")
    assert (tmp_path / "flips.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ast_boosted_trains_slorb_jointly_and_exports_base_plus_adapter(tmp_path):
    from peft import PeftModel

    trainer, recorder = train_tiny(tmp_path, slorb_k=16, max_steps=4)
    model = trainer.model
    assert isinstance(model, PeftModel)
    assert model.base_model.model.model.norm.weight.requires_grad  # trained jointly like in AST-Naive
    S0 = {n: p.detach().clone() for n, p in model.named_parameters() if "slorb_S" in n}
    layer = trainer.sparse_layers["model.layers.0.mlp.down_proj"]
    expected_S = layer.weight.detach().masked_fill(layer.sparse_mask, 0).unflatten(-1, (-1, 16)).mean(-1)
    torch.testing.assert_close(S0["base_model.model.model.layers.0.mlp.down_proj.slorb_S.default"], expected_S)
    w0 = layer.weight.detach().clone()
    trainer.train()
    assert len(recorder.masks) == 4
    assert all(not torch.equal(p, S0[n]) for n, p in model.named_parameters() if "slorb_S" in n)
    assert not torch.equal(layer.weight, w0)  # dense base trains jointly
    state = trainer.sparse_state_dict()
    assert state["model.layers.0.mlp.down_proj.mask"].dtype == torch.bool
    assert torch.equal(state["base_model.model.model.layers.0.mlp.down_proj.base_layer.weight"], layer.weight)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        logits = model(x).logits
    trainer.finalize(str(tmp_path / "boosted"))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "boosted")
    assert follows_nm(base.model.layers[0].mlp.down_proj.weight, 2, 4)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "boosted" / "slorb")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, logits)


def test_frozen_mask_slorb_mean_init_reads_the_pruned_weights_before_they_are_zeroed(tmp_path):
    dense = tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    weight = dict(dense.named_modules())[name].weight.detach().clone()
    keep = nm_mask(weight.abs(), 2, 4)
    trainer = SparseTrainer(model=dense, args=make_args(tmp_path, frozen_mask=True, slorb_k=16),
                            train_dataset=TokenDataset())
    S = dict(trainer.model.named_parameters())[f"base_model.model.{name}.slorb_S.default"]
    expected = weight.masked_fill(keep, 0).unflatten(-1, (-1, 16)).mean(-1)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(S.detach(), expected)
    layer = trainer.sparse_layers[name]
    assert (layer.weight[~keep] == 0).all() and torch.equal(layer.weight[keep], weight[keep])


def test_ast_boosted_can_train_the_slorb_projection(tmp_path):
    trainer, _ = train_tiny(tmp_path, slorb_k=16, slorb_trainable_projection=True, max_steps=2)
    projections = {n: p for n, p in trainer.model.named_parameters() if "slorb_X" in n}
    assert projections and all(p.requires_grad for p in projections.values())
    before = {n: p.detach().clone() for n, p in projections.items()}
    assert all(torch.equal(p, torch.eye(p.shape[0]).repeat_interleave(16, dim=1)) for p in before.values())  # ones
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in projections.items())
