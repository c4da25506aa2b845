"""Register out-of-tree PEFT methods with peft's closed ``PeftType`` enum.

peft 0.21 has no plugin entry point: ``register_peft_method`` refuses any name that is not already a member of
``PeftType``. We add the member in place (the enum stays a ``str`` enum whose name equals its value, so JSON round
trips through ``adapter_config.json`` find it) and then call peft's own ``register_peft_method``. This is the only
module that touches peft internals; it is pinned by ``peft>=0.21.2,<0.22`` in ``pyproject.toml``.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method


def add_peft_type(name: str) -> PeftType:
    """Add ``name`` (upper case, value == name) to ``PeftType`` if missing and return the member."""
    if name != name.upper() or not name.isidentifier():
        raise ValueError(f"PEFT type names are upper-case identifiers (got {name!r}); use {name.upper()!r}.")
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register_external_peft_method(name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Idempotently register a tuner under ``name`` (lower case, e.g. ``"spp"``) with peft."""
    peft_type = add_peft_type(name.upper())
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is model_cls:
        return
    if registered is not None:
        raise KeyError(f"PEFT type {peft_type.value} is already registered to {registered.__name__}.")
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
