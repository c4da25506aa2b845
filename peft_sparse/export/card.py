"""Model cards for sparse checkpoints, built with ``huggingface_hub.ModelCard`` from the templates in ``model_cards/``
(``peft_sparse/model_cards`` is a link to it, so wheels ship the templates as package data).

The card's YAML carries ``base_model``, ``library_name``, ``pipeline_tag``, tags (``peft_sparse``, the pattern, the
method), ``datasets``, a ``model-index`` entry with the measured perplexity when given, and a ``sparsity`` block; the
text says how to load the checkpoint (``pip install peft_sparse`` + ``import peft_sparse``) and lists per-layer
sparsity measured on the weights themselves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from ..config import SparsityConfig
from ..data.sources import HUB_DATASETS
from ..modeling import out_in

if TYPE_CHECKING:
    from .formats import LinearSizes

TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "sparse_model.md"  # package data
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
_HUB_DATASET_IDS = {"c4": "allenai/c4", "wikitext2": "Salesforce/wikitext"}


@dataclass(frozen=True)
class Perplexity:
    """A measured perplexity for the card's model-index."""

    value: float
    dataset: str = "wikitext2"
    details: str = ""


def task_eval_results(result: dict[str, Any]) -> list[EvalResult]:
    """model-index entries (task, dataset, split, metric, value) from an lm-evaluation-harness result dict
    (``peft_sparse.evaluate``): one per task and metric, standard errors left out."""
    from ..evaluation.harness import task_metrics

    entries = []
    for task, metrics in task_metrics(result).items():
        config = result.get("configs", {}).get(task, {})
        meta = config.get("metadata") or {}
        shots = result.get("n-shot", {}).get(task, config.get("num_fewshot") or 0)
        dataset = meta.get("hub_dataset") or config.get("dataset_path") or task
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            entries.append(EvalResult(
                task_type="text-generation", task_name=task, dataset_type=dataset, dataset_name=task,
                dataset_config=config.get("dataset_name"), dataset_split=meta.get("split") or config.get("test_split")
                or config.get("validation_split"), metric_type=metric, metric_value=round(value, 4),
                metric_name=f"{metric} ({shots}-shot, lm-evaluation-harness)", source_name="lm-evaluation-harness",
                source_url=LM_EVAL_URL,
            ))
    return entries


def _per_layer(model: nn.Module, modules: list[str]) -> list[dict[str, Any]]:
    """Per layer kind (``q_proj``, ``mlp.c_fc``, ...): count, shape and measured fraction of zeros."""
    groups: OrderedDict[str, list[nn.Module]] = OrderedDict()
    for name in modules:
        kind = ".".join(part for part in name.split(".") if not part.isdigit()).split(".", 2)[-1]
        groups.setdefault(kind, []).append(model.get_submodule(name))
    rows = []
    for kind, layers in groups.items():
        zeros = sum(int((out_in(layer) == 0).sum()) for layer in layers)
        total = sum(out_in(layer).numel() for layer in layers)
        shapes = sorted({tuple(out_in(layer).shape) for layer in layers})
        rows.append({"name": kind, "count": len(layers), "shape": ", ".join(map(str, shapes)),
                     "sparsity": zeros / total})
    return rows


def model_card(model: nn.Module, config: SparsityConfig, format: str, *, base_model: str | None = None,
               library_name: str = "transformers", perplexity: Perplexity | None = None, calibration: str | None = None,
               extra_params: str | None = None, load_snippet: str | None = None, model_name: str | None = None,
               tags: list[str] | None = None, repo_id: str | None = None,
               task_results: dict[str, Any] | None = None, sizes: LinearSizes | None = None) -> ModelCard:
    """The card of a sparse ``model`` (its sparse layers named by ``config.modules``) saved in ``format``.

    ``load_snippet`` may name ``{repo}`` (``repo_id``, else the model name) and ``{base_model}``; ``base_model``
    defaults to the model's own Hub name (a local path is left out). ``task_results`` (lm-eval's result dict from
    ``peft_sparse.evaluate``) adds one model-index entry per task and metric; ``sizes`` (:func:`linear_sizes` of the
    saved directory) the measured bytes of the sparse linears, against fp32 and the information limit."""
    pattern = config.sparsity_pattern
    base_model = base_model or config.provenance.get("base_model") or getattr(model.config, "_name_or_path", None)
    base_model = base_model if base_model and not Path(base_model).exists() else None  # local paths mean nothing
    name = model_name or f"{(base_model or 'model').split('/')[-1]}-{str(pattern).replace(':', 'of')}-{config.method}"
    calibration = calibration or config.provenance.get("calibration")
    datasets = [_HUB_DATASET_IDS[calibration]] if calibration in HUB_DATASETS else None
    eval_results = task_eval_results(task_results) if task_results else []
    if perplexity is not None:
        eval_results += [EvalResult(task_type="text-generation", dataset_type=_HUB_DATASET_IDS.get(
            perplexity.dataset, perplexity.dataset), dataset_name=perplexity.dataset, metric_type="perplexity",
            metric_value=round(float(perplexity.value), 4), metric_name=f"perplexity {perplexity.details}".strip())]
    sparsity_block = {"pattern": str(pattern), "method": config.method, "format": format,
                      "format_version": config.format_version, "layers": len(config.modules or [])}
    if format == "packed":
        sparsity_block["codec"] = config.resolved_codec
    if config.method_options:
        sparsity_block["method_options"] = config.method_options
    quantized = group = ""
    if config.bits is not None:
        sparsity_block.update(bits=config.bits, group_size=config.group_size, symmetric=config.symmetric,
                              quantizer=config.resolved_quantizer)
        group = "per channel" if config.group_size == -1 else f"group size {config.group_size}"
        quantized = f", its kept values quantized to int{config.bits} ({group}) by {config.resolved_quantizer},"
    if sizes is not None:
        sparsity_block.update(linears_bytes=sizes.nbytes, fraction_of_fp32=round(sizes.fraction_of_fp32, 6),
                              ratio_to_information_limit=round(sizes.ratio_to_limit, 6))
    data = ModelCardData(
        base_model=base_model, library_name=library_name, pipeline_tag="text-generation",
        tags=["peft_sparse", "sparsity", f"sparsity:{pattern}" if pattern.is_nm else "sparsity:unstructured",
              config.method, *(tags or [])],
        datasets=datasets, model_name=name if eval_results else None, eval_results=eval_results or None,
        sparsity=sparsity_block,
    )
    snippet = (load_snippet or 'from transformers import AutoModelForCausalLM\n'
               'model = AutoModelForCausalLM.from_pretrained("{repo}")').format(
        repo=repo_id or name, base_model=base_model or "BASE_MODEL")
    return ModelCard.from_template(
        data, template_path=str(TEMPLATE), model_name=name, format=format, format_version=config.format_version,
        codec=config.resolved_codec, pattern=str(pattern), ratio=pattern.ratio, method=config.method,
        options=", ".join(f"{k}={v}" for k, v in sorted(config.method_options.items())),
        n_modules=len(config.modules or []), per_layer=_per_layer(model, config.modules or []),
        perplexity=perplexity, extra_params=extra_params, load_snippet=snippet, bits=config.bits, group=group,
        symmetric=config.symmetric, quantizer=config.resolved_quantizer if config.bits else None, sizes=sizes,
        task_lines=[
            f"{e.dataset_name} {e.metric_type} {e.metric_value:.4f}" for e in eval_results if e.source_name],
        summary=f"{base_model or 'A causal LM'} made {pattern} sparse with {config.method}{quantized} by peft_sparse.",
    )
