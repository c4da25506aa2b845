"""SparseTrainer: Adaptive Sparse Training (AST) as a Trainer callback plus a distillation term.

The sparse work is split along transformers' extension points, so the same lines serve ``Trainer`` and TRL's
``SFTTrainer`` (:mod:`peft_sparse.training.sft`):

* :class:`SparseScheduleCallback` runs once per optimizer step (``on_step_begin``, before the first micro-batch):
  every ``mask_update_interval`` steps it flags the masked layers to recompute their N:M magnitude masks inside their
  next forward (the only place a sharded weight is whole), and it hands the annealed SR-STE decay ``λ(t)`` to
  :class:`SparseAdamW` (placements ``"step"`` / ``"update"``) or to the layers' straight-through backward
  (``"gradient"``, divided by the micro-batch count so accumulation and DDP averaging leave ``λ`` unchanged). After
  a mask update it asks for a log line with the flip rates (paper section 3.3).
* :class:`SparseTrainingMixin` puts the ``α·T²·KL(teacher‖student)`` term into ``compute_loss`` (normalised like the
  CE term), writes the sparse state next to every saved model (``save_model``), reads it back on resume, and
  :meth:`~SparseTrainingMixin.finalize` hard-prunes to the final masks when the user asks for it.

Checkpoints hold the dense weights (plain ``save_pretrained``) plus ``sparse_state.safetensors``: flat keys
``"{module}.mask"`` and ``"{module}.initial_mask"`` (bool), and with SLoRB the trainable base parameters under their
own names. The schedule step is the Trainer's ``global_step``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os

import safetensors.torch
import torch
from peft import PeftModel
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.trainer_utils import get_last_checkpoint

from ..config import SparsityConfig
from ..errors import InputNotFoundError, SparseConfigError, SparseStateError
from ..export.formats import detach_quantizer, save_pretrained
from ..modeling import out_in, select_sparse_modules
from ..quantization.kernels import refuse_kernels
from ..sparsity import nm_violations
from .config import SparseArgumentsMixin
from .layers import attach_sparse_layers, finalize_sparse_layers, mask_state_dict
from .losses import ce_kl_distill_sum, chunked_kl_distill_sum, scored_rows
from .optim import OPTIMIZER_PLACEMENTS, SparseAdamW
from .schedule import resolve_ramp_steps, srste_lambda

logger = logging.getLogger(__name__)

SPARSE_STATE_NAME = "sparse_state.safetensors"
MASK_SUFFIXES = (".mask", ".initial_mask")


class SparseScheduleCallback(TrainerCallback):
    """The per-optimizer-step AST schedule of a :class:`SparseTrainingMixin` trainer (mask updates, λ(t), flips)."""

    def __init__(self, trainer: SparseTrainingMixin):
        self.trainer = trainer
        self.pending_metrics: dict[str, float] = {}
        self._updating = False

    def on_step_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        decay = trainer.current_srste_decay()
        steps = trainer.current_gradient_accumulation_steps
        in_backward = 0.0 if trainer.optimizer_applies_decay else decay / steps
        self._updating = not args.frozen_mask and state.global_step > 0 and (
            state.global_step % args.mask_update_interval == 0
        )
        for layer in trainer.sparse_layers.values():
            layer.sparse_decay = in_backward
            layer.sparse_update_pending = self._updating
        if trainer.optimizer_applies_decay:
            for group in trainer.optimizer.param_groups:
                group["srste_decay"] = decay

    def on_step_end(self, args, state, control, **kwargs):
        if self._updating:  # the masks were recomputed in this step's first forward
            self.pending_metrics = self.trainer.flip_metrics()
            control.should_log = True  # merged into this step's log line by SparseTrainingMixin.log
            self._updating = False


class SparseTrainingMixin:
    """Everything sparse about a trainer; mix it in before a ``transformers.Trainer`` subclass.

    Args:
        model: the student (a plain transformers model, dense or pruned by :func:`peft_sparse.prune`); its Linear
            layers selected by ``args.targets`` / ``args.ignore`` (by default the decoder blocks' linears, as
            :func:`peft_sparse.prune` selects them) train dense behind a ``W ⊙ m`` forward.
            With ``args.slorb_k`` (AST-Boosted) the trainer wraps it in a SLoRB :class:`peft.PeftModel` whose
            adapters are mean-initialised from the initial masks and train jointly with the dense weights.
        args: arguments with the sparse fields (:class:`~peft_sparse.SparseTrainingArguments`,
            :class:`~peft_sparse.SparseSFTConfig`).
        teacher: frozen dense teacher (a model or a path) for the KL term; kept in eval mode on the student's device,
            never trained and never saved.
        **kwargs: the other arguments of the trainer class.
    """

    def __init__(self, model: nn.Module | None = None, args: SparseArgumentsMixin | None = None, *,
                 teacher: nn.Module | str | None = None, **kwargs):
        _check_inputs(type(self).__name__, model, args, teacher, kwargs)
        refuse_kernels(model, type(self).__name__)
        detach_quantizer(model)  # a packed-loaded model trains as a plain one; finalize saves it packed again
        self.teacher = _prepare_teacher(teacher, model, args)
        self.sparse_layers = _attach_sparse_layers(model, args, self.teacher)
        if args.slorb_k is not None:  # before zeroing: the mean init reads the pruned weights
            model = _add_slorb(model, self.sparse_layers, args)
        if args.frozen_mask:
            _zero_pruned(self.sparse_layers)
        super().__init__(model=model, args=args, **kwargs)
        _warn_if_fsdp_ignored(self)
        self.sparse_schedule = SparseScheduleCallback(self)
        self.add_callback(self.sparse_schedule)

    # ---- optimizer and schedule ----

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_applies_decay:
            masks = {layer.weight: layer.mask_values for layer in self.sparse_layers.values()}
            kwargs = dict(lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                          eps=self.args.adam_epsilon, masks=masks, placement=self.args.srste_placement)
            if self.args.optim not in ("adamw_torch", "adamw_torch_fused"):
                logger.warning("srste_placement=%r uses SparseAdamW instead of optim=%r.", self.args.srste_placement,
                               self.args.optim)
            self.optimizer_cls_and_kwargs = (SparseAdamW, kwargs)
        return super().create_optimizer(model)

    @property
    def optimizer_applies_decay(self) -> bool:
        """The decay is applied by :class:`SparseAdamW` (else in the backward, or not at all)."""
        return self.args.srste_placement in OPTIMIZER_PLACEMENTS and not self.args.frozen_mask

    def current_srste_decay(self) -> float:
        """Annealed SR-STE decay λ at the current optimizer step (0 for frozen-mask training)."""
        if self.args.frozen_mask:
            return 0.0
        ramp = resolve_ramp_steps(self.args.srste_ramp_steps, self.state.max_steps)
        return srste_lambda(self.state.global_step, self.args.srste_decay, ramp)

    def flip_metrics(self) -> dict[str, float]:
        """Flip rate and initial flip rate of the last mask update (fraction of all masked weights that changed)."""
        total = sum(layer.sparse_mask.numel() for layer in self.sparse_layers.values())
        flips = sum(layer.sparse_flips[0] for layer in self.sparse_layers.values())
        initial = sum(layer.sparse_flips[1] for layer in self.sparse_layers.values())
        return {"flip_rate": flips / total, "initial_flip_rate": initial / total,
                "srste_decay": self.current_srste_decay()}

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        logs.update(self.sparse_schedule.pending_metrics)
        self.sparse_schedule.pending_metrics = {}
        super().log(logs, *args, **kwargs)

    # ---- loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None or self.args.distill_alpha == 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.get("labels")
        if labels is None:
            raise SparseConfigError("Distillation needs `labels` in the batch to know which positions are scored.")
        teacher_logits = self._teacher_logits(inputs)
        student = _language_model(self.accelerator.unwrap_model(model))
        fused = self.label_smoother is None and self.compute_loss_func is None
        with _fused_loss(student, teacher_logits, self.args, fused) as used, _capture_student(student) as captured:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if used:  # the model's own loss was CE + α·KL, normalised like the CE
            return result
        loss = result[0] if return_outputs else result
        rows = scored_rows(labels)
        kl = self._distill_sum(student, captured, teacher_logits, rows)
        loss = loss + self.args.distill_alpha * kl * self._kl_scale(rows.numel(), num_items_in_batch)
        return (loss, result[1]) if return_outputs else loss

    def _teacher_logits(self, inputs: dict) -> torch.Tensor:
        with torch.inference_mode():
            return self.teacher(**{k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}).logits

    def _distill_sum(self, student: nn.Module, captured: dict, teacher_logits: torch.Tensor, rows) -> torch.Tensor:
        """The summed KL over ``rows`` when the model's own loss did not include it (:func:`_fused_loss`).

        From the student's full logits when its forward built them; TRL's fused LM head never builds them, so then
        the scored rows of the captured hidden states are projected through the student's output layer once more.
        """
        temperature = self.args.distill_temperature
        logits, hidden = captured.get("logits"), captured["hidden"]
        if logits is not None and logits.shape[:-1] == hidden.shape[:-1]:
            return chunked_kl_distill_sum(logits, teacher_logits, temperature, rows)
        selected = hidden.flatten(0, -2).index_select(0, rows)
        student_logits = student.get_output_embeddings()(selected)
        teacher_rows = teacher_logits.flatten(0, -2).index_select(0, rows.to(teacher_logits.device))
        return chunked_kl_distill_sum(student_logits, teacher_rows.to(student_logits.device), temperature)

    def _ce_sums_over_batch(self, num_items_in_batch) -> bool:
        """Whether the CE term is a sum divided by ``num_items_in_batch`` (else a per-micro-batch mean)."""
        return self.model_accepts_loss_kwargs and num_items_in_batch is not None

    def _kl_scale(self, scored: int, num_items_in_batch) -> float | torch.Tensor:
        """Normalise the KL sum exactly like the trainer's ``compute_loss`` normalised the CE term.

        A CE summed over ``num_items_in_batch`` (all micro-batches, all devices when ``average_tokens_across_devices``)
        is multiplied back by the process count to undo DDP's gradient averaging; a per-micro-batch mean is divided
        by the accumulation steps in ``training_step``, for both terms alike.
        """
        if not self._ce_sums_over_batch(num_items_in_batch):
            return 1.0 / max(scored, 1)
        scale = 1.0 / num_items_in_batch
        if self.args.average_tokens_across_devices:
            scale = scale * (self.accelerator.num_processes // self.get_tp_size())
        return scale

    # ---- checkpoints ----

    def sparse_state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors: ``"{module}.mask"``, ``"{module}.initial_mask"`` and (SLoRB) the trainable base parameters."""
        state = {key: mask.detach().cpu().contiguous() for key, mask in mask_state_dict(self.sparse_layers).items()}
        for name, param in self._base_parameters():
            state[name] = param.detach().cpu().contiguous()
        return state

    def load_sparse_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`sparse_state_dict`; refuses a state written for other layers before changing anything."""
        base = dict(self._base_parameters())
        expected = {f"{name}{suffix}" for name in self.sparse_layers for suffix in MASK_SUFFIXES} | set(base)
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            example = (missing or unexpected)[0]
            raise SparseStateError(
                f"The sparse state does not match this trainer's sparse layers ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, e.g. {example!r}): resume with the same model, targets/ignore and "
                "slorb_k as the run that wrote it."
            )
        with torch.no_grad():
            for name, layer in self.sparse_layers.items():
                layer.sparse_mask.copy_(state[f"{name}.mask"])
                layer.initial_mask.copy_(state[f"{name}.initial_mask"])
            for name, param in base.items():
                param.copy_(state[name])

    def _base_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable non-adapter parameters of a PeftModel student (nothing for a plain model: its save has them)."""
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PeftModel):
            return []
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad and "slorb_" not in n]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as the trainer does, plus the sparse state: every checkpoint (and its Hub push) carries the masks."""
        super().save_model(output_dir, _internal_call)
        if self.sparse_layers and self.args.should_save:
            path = os.path.join(output_dir or self.args.output_dir, SPARSE_STATE_NAME)
            safetensors.torch.save_file(self.sparse_state_dict(), path, metadata={"format": "pt"})

    def load_sparse_state(self, checkpoint: str | os.PathLike) -> None:
        """Read ``sparse_state.safetensors`` from a checkpoint directory written by :meth:`save_model`."""
        path = os.path.join(checkpoint, SPARSE_STATE_NAME)
        if not os.path.isfile(path):
            raise InputNotFoundError(
                f"{path} is missing: {checkpoint} was not saved by a sparse trainer (or was finalized), so its masks "
                "are unknown."
            )
        self.load_sparse_state_dict(safetensors.torch.load_file(path))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train`` that also restores the masks on resume and with ``load_best_model_at_end``.

        Training never finalizes: the trainer can train again (or resume) afterwards; call :meth:`finalize` to
        hard-prune when done.
        """
        if not self.sparse_layers:
            raise SparseStateError("This trainer was finalized (hard-pruned); build a new one to train again.")
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise InputNotFoundError(f"No checkpoint to resume from in {self.args.output_dir}.")
        if resume_from_checkpoint:
            self.load_sparse_state(resume_from_checkpoint)
        output = super().train(resume_from_checkpoint or None, *args, **kwargs)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self.load_sparse_state(self.state.best_model_checkpoint)  # the Trainer restored that step's weights
        return output

    # ---- export ----

    def finalize(self, output_dir: str | None = None, save_format: str = "dense") -> None:
        """Hard-prune every sparse layer to its current mask and restore plain modules; save if ``output_dir``.

        This ends sparse training (the trainer refuses to train afterwards). The weights are then exactly N:M in
        ordinary transformers modules, so the saved checkpoint loads without peft_sparse. With SLoRB (AST-Boosted)
        ``output_dir`` gets the N:M base model and ``output_dir/slorb`` the adapter
        (``PeftModel.from_pretrained(base, output_dir + "/slorb")`` after ``import peft_sparse``).
        ``save_format`` is a ``peft_sparse.export.FORMATS`` name: ``"dense"`` (exact zeros) or ``"packed"``.
        """
        finalize_sparse_layers(self.model_wrapped, self.sparse_layers, self.args.sparsity_pattern)
        self.sparse_layers = {}
        if output_dir is None:
            return
        model = self.accelerator.unwrap_model(self.model)
        base = copy.deepcopy(model).unload() if isinstance(model, PeftModel) else model
        save_pretrained(base, output_dir, save_format, config=self.sparsity_config)  # atomic: replaces output_dir
        self.model_card(save_format).save(os.path.join(output_dir, "README.md"))
        if isinstance(model, PeftModel):
            model.save_pretrained(os.path.join(output_dir, "slorb"))

    @property
    def sparsity_config(self) -> SparsityConfig:
        """The structure this run trains to, as the config its checkpoints carry (method ``"sparse_trainer"``)."""
        pattern = self.args.sparsity_pattern
        shape = {"pattern": self.args.pattern} if pattern.is_nm else {"sparsity": pattern.sparsity}
        return SparsityConfig.from_dict({**shape, "method": "sparse_trainer", "targets": self.args.targets,
                                         "ignore": list(self.args.ignore)})

    def model_card(self, save_format: str = "dense", tags: list[str] | None = None):
        """The peft_sparse ``ModelCard`` of this run (sparsity block, per-layer sparsity, how to load)."""
        from ..export.card import model_card

        model = self.accelerator.unwrap_model(self.model)
        model = model.get_base_model() if isinstance(model, PeftModel) else model
        config = self.sparsity_config
        config.modules = list(select_sparse_modules(model, config.targets, config.ignore))
        return model_card(model, config, save_format, tags=["sparse-retraining", *(tags or [])])

    def create_model_card(self, tags: str | list[str] | None = None, **kwargs) -> None:
        """Replace transformers' generic card, so ``trainer.push_to_hub()`` uploads the peft_sparse one."""
        os.makedirs(self.args.output_dir, exist_ok=True)
        tags = [tags] if isinstance(tags, str) else tags
        self.model_card(tags=tags).save(os.path.join(self.args.output_dir, "README.md"))


class SparseTrainer(SparseTrainingMixin, Trainer):
    """Retrain a dense (or one-shot pruned) model into an N:M sparse one (AST-Naive; AST-Boosted with SLoRB).

    ``transformers.Trainer`` plus :class:`SparseScheduleCallback` and the KL term; arguments as in
    :class:`SparseTrainingMixin`, with :class:`~peft_sparse.SparseTrainingArguments`.
    """


def _language_model(model: nn.Module) -> nn.Module:
    """The transformers model itself, inside a possible PeftModel."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


@contextlib.contextmanager
def _fused_loss(model: nn.Module, teacher_logits: torch.Tensor, args, enabled: bool):
    """Swap the model's causal-LM cross-entropy for the fused ``CE + α·T²·KL`` (:func:`ce_kl_distill_sum`) during
    one forward; yields a list that is non-empty once the fused loss ran.

    The fused loss divides by exactly what transformers' ``ForCausalLMLoss`` divides by (``num_items_in_batch``, or
    the scored token count), so the KL term is normalised like the CE under accumulation and DDP, and the trainer's
    own scaling of the returned loss applies to both. Only the stock causal-LM loss is swapped; a model with another
    loss, label smoothing or a ``compute_loss_func`` keeps it and gets the KL added afterwards.
    """
    used: list[bool] = []
    causal_lm = LOSS_MAPPING["ForCausalLM"]
    if not enabled or getattr(model, "loss_function", None) is not causal_lm:
        yield used
        return

    def loss_function(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                      **kwargs):
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        total = ce_kl_distill_sum(logits, teacher_logits.to(logits.device), shift_labels, args.distill_temperature,
                                  args.distill_alpha, ignore_index)
        used.append(True)
        if num_items_in_batch is None:  # a mean over the scored tokens (0, not NaN, when there are none)
            return total / max(int((shift_labels != ignore_index).sum()), 1)
        return total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch)
                        else num_items_in_batch)

    previous = vars(model).get("_loss_function")  # set only if someone assigned the stock loss explicitly
    model.loss_function = loss_function
    try:
        yield used
    finally:
        if previous is None:
            del model._loss_function
        else:
            model.loss_function = previous


@contextlib.contextmanager
def _capture_student(model: nn.Module):
    """Record the backbone's last hidden states and the output layer's logits during one forward."""
    captured: dict[str, torch.Tensor] = {}

    def keep_hidden(module, args, output):
        captured["hidden"] = output[0]

    def keep_logits(module, args, output):
        captured["logits"] = output

    handles = [model.base_model.register_forward_hook(keep_hidden),
               model.get_output_embeddings().register_forward_hook(keep_logits)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _prepare_teacher(teacher: nn.Module | str | None, student: nn.Module, args) -> nn.Module | None:
    """The frozen teacher on the training device, in ``args.teacher_dtype`` (a converted copy: the caller's model
    keeps its dtype)."""
    if teacher is None:
        return None
    dtype = getattr(torch, args.teacher_dtype) if args.teacher_dtype else None
    if isinstance(teacher, (str, os.PathLike)):
        teacher = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype or student.dtype)
    elif dtype is not None and teacher.dtype != dtype:
        teacher = copy.deepcopy(teacher).to(dtype)
    return teacher.requires_grad_(False).eval().to(args.device)


def _attach_sparse_layers(model: nn.Module, args: SparseArgumentsMixin, teacher) -> dict[str, nn.Module]:
    """Swap the targets to masked layers with their initial masks (magnitude, or the given pruned structure)."""
    pattern = args.sparsity_pattern
    if args.mask_init == "pruned":
        _check_pruned(model, pattern, args.targets, args.ignore)
    layers = attach_sparse_layers(model, pattern, args.targets, args.ignore, not args.frozen_mask)
    if args.pruned_values == "teacher":
        _restore_pruned_values(layers, teacher)
    frozen = [name for name, layer in layers.items() if not layer.weight.requires_grad]
    if frozen:
        logger.warning("%d sparse layers have frozen weights (e.g. %s); they will not train.", len(frozen), frozen[0])
    return layers


@torch.no_grad()
def _zero_pruned(layers: dict[str, nn.Module]) -> None:
    """Frozen-mask baseline: pruned weights start (and, with masked gradients, stay) at zero."""
    for layer in layers.values():
        layer.weight.mul_(layer.sparse_mask)


def _add_slorb(model: nn.Module, layers: dict[str, nn.Module], args: SparseArgumentsMixin) -> PeftModel:
    """AST-Boosted: SLoRB on every sparse layer, mean-initialised from its initial mask, trained with the model."""
    from ..tuners import SLoRBConfig, get_slorb_model

    config = SLoRBConfig(k=args.slorb_k, init=args.slorb_init, pattern=None, prune_base=False, trainable_base=True,
                         trainable_projection=args.slorb_trainable_projection, target_modules=list(layers))
    trainable = [p for p in model.parameters() if p.requires_grad]
    boosted = get_slorb_model(model, config, masks={name: layer.sparse_mask for name, layer in layers.items()})
    for param in trainable:  # peft froze everything but the adapters and the base linears; AST trains norms too
        param.requires_grad_(True)
    return boosted


def _warn_if_fsdp_ignored(trainer: Trainer) -> None:
    """Say once that FSDP was asked for but is not running: accelerate and Trainer enable it only on accelerators
    and otherwise fall back without a word, to DDP (``--fsdp`` under torchrun) or to independent processes that each
    train their own copy (``accelerate launch --use_fsdp``)."""
    from_env = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")
    if not (trainer.args.fsdp or from_env) or trainer.is_fsdp_enabled or trainer.args.process_index != 0:
        return
    distributed = trainer.accelerator.distributed_type.value
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    running = "plain DDP" if distributed != "NO" else (
        f"{ranks} independent processes, each training its own copy" if ranks > 1 else "one process")
    logger.warning(
        "FSDP was requested, but accelerate and transformers' Trainer run FSDP on GPUs only: this run is %s "
        "(%s). Sharded training on CPU works at the torch level (torch.distributed.fsdp.fully_shard); on GPUs use "
        "the accelerate FSDP2 config in the README.", running, distributed)


def _check_inputs(trainer: str, model, args, teacher, kwargs) -> None:
    """Reject bad combinations before the Trainer does any setup work."""
    if not isinstance(args, SparseArgumentsMixin):
        raise TypeError(f"{trainer} needs arguments with the sparse fields (SparseTrainingArguments or "
                        f"SparseSFTConfig), got {type(args).__name__}.")
    if not isinstance(model, nn.Module):
        raise SparseConfigError(f"{trainer} needs a loaded model (model_init and model names are not supported).")
    if teacher is not None and teacher is model:
        raise SparseConfigError("The teacher must be a separate frozen copy of the dense model, not the student.")
    if args.pruned_values == "teacher" and teacher is None:
        raise SparseConfigError("pruned_values='teacher' copies pruned weights from the teacher; pass teacher=.")
    optimizer = kwargs.get("optimizers", (None, None))[0]
    if optimizer is not None and args.srste_placement in OPTIMIZER_PLACEMENTS and not args.frozen_mask:
        raise SparseConfigError(
            f"srste_placement={args.srste_placement!r} needs {trainer} to build its SparseAdamW; drop "
            "`optimizers=` or use srste_placement='gradient' (decay added to the gradient) with your own optimizer."
        )
    if kwargs.get("peft_config") is not None:
        raise SparseConfigError(f"{trainer} does not take peft_config: AST-Boosted's SLoRB comes from `slorb_k`.")


def _check_pruned(model: nn.Module, pattern, targets, ignore) -> None:
    if not pattern.is_nm:
        return
    for name, module in select_sparse_modules(model, targets, ignore).items():
        bad = nm_violations(out_in(module), pattern.n, pattern.m)
        if bad:
            raise SparseConfigError(
                f"mask_init='pruned' but {name} is not {pattern} sparse ({bad} groups too dense): prune the model "
                "first with peft_sparse.prune(...) or use mask_init='magnitude'."
            )


@torch.no_grad()
def _restore_pruned_values(layers: dict[str, nn.Module], teacher: nn.Module) -> None:
    """Copy the teacher's dense values into the pruned entries, so a flipped-back weight resumes its dense value."""
    teacher_params = dict(teacher.named_parameters())
    for name, layer in layers.items():
        key = f"{name}.weight"  # layers are attached before SLoRB wraps the model: plain module names
        if key not in teacher_params or teacher_params[key].shape != layer.weight.shape:
            raise SparseConfigError(
                f"The teacher has no weight matching {name!r}; it must share the student's architecture."
            )
        source = teacher_params[key].to(layer.weight.device, layer.weight.dtype)
        layer.weight.copy_(torch.where(layer.sparse_mask, layer.weight, source))
