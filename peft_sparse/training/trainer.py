"""SparseTrainer: Adaptive Sparse Training (AST) as a thin :class:`transformers.Trainer` subclass.

Per optimizer step ``t`` (set up before the first micro-batch's forward):

* every ``mask_update_interval`` steps the masked layers recompute their N:M magnitude masks from the live dense
  weights inside their forward, and the flip rate / initial flip rate (paper section 3.3) are logged;
* the annealed SR-STE decay ``λ(t)`` is handed to :class:`SparseAdamW` (placements ``"step"`` and ``"update"``) or
  to the layers' straight-through backward (``"gradient"``, divided by the micro-batch count so gradient
  accumulation and DDP averaging leave ``λ`` unchanged);
* with a teacher, the loss is ``CE + α·T²·KL(teacher‖student)``, normalised like the CE term.

Checkpoints hold the dense weights (plain ``save_pretrained``) plus ``sparse_state.pt`` (current and initial masks);
the schedule step is the Trainer's ``global_step``. :meth:`SparseTrainer.finalize` hard-prunes to the final masks.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import SparsityConfig
from ..export.formats import detach_quantizer, save_pretrained
from ..modeling import out_in, select_sparse_modules
from ..sparsity import nm_violations
from .config import SparseTrainingArguments
from .layers import attach_sparse_layers, finalize_sparse_layers
from .losses import kl_distill_sum, shifted_token_mask
from .optim import OPTIMIZER_PLACEMENTS, SparseAdamW
from .schedule import resolve_ramp_steps, srste_lambda

logger = logging.getLogger(__name__)

SPARSE_STATE_NAME = "sparse_state.pt"


class SparseTrainer(Trainer):
    """Retrain a dense (or one-shot pruned) model into an N:M sparse one (AST-Naive; AST-Boosted with SLoRB).

    Args:
        model: the student (a plain transformers model, dense or pruned by :func:`peft_sparse.prune`); its Linear
            layers selected by ``args.targets`` / ``args.ignore`` (by default the decoder blocks' linears, as
            :func:`peft_sparse.prune` selects them) train dense behind a ``W ⊙ m`` forward.
            With ``args.slorb_k`` (AST-Boosted) the trainer wraps it in a SLoRB :class:`peft.PeftModel` whose
            adapters are mean-initialised from the initial masks and train jointly with the dense weights.
        args: :class:`SparseTrainingArguments`.
        teacher: frozen dense teacher (a model or a path) for the KL term; kept in eval mode on the student's device,
            never trained and never saved.
        **kwargs: the other :class:`~transformers.Trainer` arguments.
    """

    def __init__(self, model: nn.Module | None = None, args: SparseTrainingArguments | None = None, *,
                 teacher: nn.Module | str | None = None, **kwargs):
        _check_inputs(model, args, teacher, kwargs)
        detach_quantizer(model)  # a packed-loaded model trains as a plain one; finalize saves it packed again
        self.teacher = _prepare_teacher(teacher, model, args.device)
        self.sparse_layers = _attach_sparse_layers(model, args, self.teacher)
        if args.slorb_k is not None:  # before zeroing: the mean init reads the pruned weights
            model = _add_slorb(model, self.sparse_layers, args)
        if args.frozen_mask:
            _zero_pruned(self.sparse_layers)
        super().__init__(model=model, args=args, **kwargs)
        self._prepared_step = -1

    def create_optimizer(self, model=None):
        if self.optimizer is None and self._optimizer_decay:
            masks = {layer.weight: layer.mask_values for layer in self.sparse_layers.values()}
            kwargs = dict(lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                          eps=self.args.adam_epsilon, masks=masks, placement=self.args.srste_placement)
            if self.args.optim not in ("adamw_torch", "adamw_torch_fused"):
                logger.warning("srste_placement=%r uses SparseAdamW instead of optim=%r.", self.args.srste_placement,
                               self.args.optim)
            self.optimizer_cls_and_kwargs = (SparseAdamW, kwargs)
        return super().create_optimizer(model)

    @property
    def _optimizer_decay(self) -> bool:
        """The decay is applied by :class:`SparseAdamW` (else in the backward, or not at all)."""
        return self.args.srste_placement in OPTIMIZER_PLACEMENTS and not self.args.frozen_mask

    # ---- per-step sparse schedule ----

    def current_srste_decay(self) -> float:
        """Annealed SR-STE decay λ at the current optimizer step (0 for frozen-mask training)."""
        if self.args.frozen_mask:
            return 0.0
        ramp = resolve_ramp_steps(self.args.srste_ramp_steps, self.state.max_steps)
        return srste_lambda(self.state.global_step, self.args.srste_decay, ramp)

    def _begin_sparse_step(self) -> bool:
        """Set decay and mask-update flags once per optimizer step; True if this step recomputes masks."""
        step = self.state.global_step
        if step == self._prepared_step:
            return False
        self._prepared_step = step
        decay = self.current_srste_decay()
        in_backward = 0.0 if self._optimizer_decay else decay / self.current_gradient_accumulation_steps
        update = not self.args.frozen_mask and step > 0 and step % self.args.mask_update_interval == 0
        for layer in self.sparse_layers.values():
            layer.sparse_decay = in_backward
            layer.sparse_update_pending = update
        if self._optimizer_decay:
            for group in self.optimizer.param_groups:
                group["srste_decay"] = decay
        return update

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.sparse_layers:
            raise RuntimeError("This SparseTrainer was finalized (hard-pruned); build a new one to train again.")
        updated = self._begin_sparse_step()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if updated:
            self.log(self.flip_metrics())
        return loss

    def flip_metrics(self) -> dict[str, float]:
        """Flip rate and initial flip rate of the last mask update (fraction of all masked weights that changed)."""
        total = sum(layer.sparse_mask.numel() for layer in self.sparse_layers.values())
        flips = sum(layer.sparse_flips[0] for layer in self.sparse_layers.values())
        initial = sum(layer.sparse_flips[1] for layer in self.sparse_layers.values())
        return {"flip_rate": flips / total, "initial_flip_rate": initial / total,
                "srste_decay": self.current_srste_decay()}

    # ---- loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None or self.args.distill_alpha == 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("Distillation needs `labels` in the batch to know which positions are scored.")
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        with torch.no_grad():
            teacher_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
            teacher_logits = self.teacher(**teacher_inputs).logits
        valid = shifted_token_mask(labels)
        kl = kl_distill_sum(outputs.logits[:, :-1][valid], teacher_logits[:, :-1][valid], self.args.distill_temperature)
        loss = loss + self.args.distill_alpha * kl * self._kl_scale(valid, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _kl_scale(self, valid: torch.Tensor, num_items_in_batch) -> float | torch.Tensor:
        """Normalise the KL sum exactly like ``Trainer.compute_loss`` normalised the CE term.

        With loss kwargs the CE is a sum over ``num_items_in_batch`` (all micro-batches, all devices when
        ``average_tokens_across_devices``), multiplied back by the process count to undo DDP's gradient averaging;
        otherwise it is a per-micro-batch mean, which ``training_step`` then divides by the accumulation steps.
        """
        if not (self.model_accepts_loss_kwargs and num_items_in_batch is not None):
            return 1.0 / valid.sum().clamp(min=1)
        scale = 1.0 / num_items_in_batch
        if self.args.average_tokens_across_devices:
            scale = scale * (self.accelerator.num_processes // self.get_tp_size())
        return scale

    # ---- checkpoints and export ----

    def sparse_state_dict(self) -> dict:
        """Masks, plus (with SLoRB) the trainable base parameters a PEFT checkpoint does not hold."""
        state = {
            name: {"mask": layer.sparse_mask.cpu(), "initial_mask": layer.initial_mask.cpu()}
            for name, layer in self.sparse_layers.items()
        }
        return {"layers": state, "base_parameters": {name: p.detach().cpu() for name, p in self._base_parameters()}}

    def load_sparse_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.sparse_layers) - set(state["layers"]))
        if missing:
            raise ValueError(f"Sparse checkpoint lacks masks for {len(missing)} layers, e.g. {missing[0]!r}.")
        for name, layer in self.sparse_layers.items():
            layer.sparse_mask.copy_(state["layers"][name]["mask"])
            layer.initial_mask.copy_(state["layers"][name]["initial_mask"])
        with torch.no_grad():
            for name, param in self._base_parameters():
                param.copy_(state["base_parameters"][name])

    def _base_parameters(self):
        """Trainable non-adapter parameters of a PeftModel student (nothing for a plain model: its save has them)."""
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PeftModel):
            return []
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad and "slorb_" not in n]

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(self.sparse_state_dict(), os.path.join(folder, SPARSE_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, SPARSE_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: this checkpoint was not written by SparseTrainer.")
        self.load_sparse_state_dict(torch.load(path, map_location="cpu"))

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.args.finalize_at_end:
            self.finalize()
        return output

    def finalize(self, output_dir: str | None = None, save_format: str = "dense") -> None:
        """Hard-prune every sparse layer to its current mask and restore plain modules; save if ``output_dir``.

        Afterwards the weights are exactly N:M in ordinary transformers modules, so the saved checkpoint loads without
        peft_sparse. With SLoRB (AST-Boosted) ``output_dir`` gets the N:M base model and ``output_dir/slorb`` the
        adapter (``PeftModel.from_pretrained(base, output_dir + "/slorb")`` after ``import peft_sparse``).
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


def _prepare_teacher(teacher: nn.Module | str | None, student: nn.Module, device) -> nn.Module | None:
    if teacher is None:
        return None
    if isinstance(teacher, (str, os.PathLike)):
        teacher = AutoModelForCausalLM.from_pretrained(teacher, dtype=student.dtype)
    return teacher.requires_grad_(False).eval().to(device)


def _attach_sparse_layers(model: nn.Module, args: SparseTrainingArguments, teacher) -> dict[str, nn.Module]:
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


def _add_slorb(model: nn.Module, layers: dict[str, nn.Module], args: SparseTrainingArguments) -> PeftModel:
    """AST-Boosted: SLoRB on every sparse layer, mean-initialised from its initial mask, trained with the model."""
    from ..tuners import SLoRBConfig, get_slorb_model  # lazy: the tuners register themselves with peft

    config = SLoRBConfig(k=args.slorb_k, init=args.slorb_init, pattern=None, prune_base=False, trainable_base=True,
                         trainable_projection=args.slorb_trainable_projection, target_modules=list(layers))
    trainable = [p for p in model.parameters() if p.requires_grad]
    boosted = get_slorb_model(model, config, masks={name: layer.sparse_mask for name, layer in layers.items()})
    for param in trainable:  # peft froze everything but the adapters and the base linears; AST trains norms too
        param.requires_grad_(True)
    return boosted


def _check_inputs(model, args, teacher, kwargs) -> None:
    """Reject bad combinations before the Trainer does any setup work."""
    if not isinstance(args, SparseTrainingArguments):
        raise TypeError(f"SparseTrainer needs SparseTrainingArguments, got {type(args).__name__}.")
    if model is None:
        raise ValueError("SparseTrainer needs a model (model_init is not supported).")
    if teacher is not None and teacher is model:
        raise ValueError("The teacher must be a separate frozen copy of the dense model, not the student itself.")
    if args.pruned_values == "teacher" and teacher is None:
        raise ValueError("pruned_values='teacher' copies pruned weights from the teacher; pass teacher=.")
    optimizer = kwargs.get("optimizers", (None, None))[0]
    if optimizer is not None and args.srste_placement in OPTIMIZER_PLACEMENTS and not args.frozen_mask:
        raise ValueError(
            f"srste_placement={args.srste_placement!r} needs SparseTrainer to build its SparseAdamW; drop "
            "`optimizers=` or use srste_placement='gradient' (decay added to the gradient) with your own optimizer."
        )


def _check_pruned(model: nn.Module, pattern, targets, ignore) -> None:
    if not pattern.is_nm:
        return
    for name, module in select_sparse_modules(model, targets, ignore).items():
        bad = nm_violations(out_in(module), pattern.n, pattern.m)
        if bad:
            raise ValueError(
                f"mask_init='pruned' but {name} is not {pattern} sparse ({bad} groups too dense): prune the model "
                "first with peft_sparse.prune(...) or use mask_init='magnitude'."
            )


@torch.no_grad()
def _restore_pruned_values(layers: dict[str, nn.Module], teacher: nn.Module) -> None:
    """Copy the teacher's dense values into the pruned entries, so a flipped-back weight resumes its dense value."""
    teacher_params = dict(teacher.named_parameters())
    for name, layer in layers.items():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "") + ".weight"
        if key not in teacher_params or teacher_params[key].shape != layer.weight.shape:
            raise ValueError(f"The teacher has no weight matching {name!r}; it must share the student's architecture.")
        source = teacher_params[key].to(layer.weight.device, layer.weight.dtype)
        layer.weight.copy_(torch.where(layer.sparse_mask, layer.weight, source))
