"""Make SCALE a PEFT method: a ``PeftType`` member and ``register_peft_method``.

PEFT 0.21's ``register_peft_method`` only accepts names that are already members of the ``PeftType``
enum, and PEFT has no plugin discovery. So a third-party method has to add its enum member itself.
Enum members cannot be added through a public API before Python 3.13 (``_add_member_``); the helper
below writes the same private tables that ``enum`` fills when a class is created, and checks the
versions it was written against so that a future change fails loudly instead of half-registering.
"""

from __future__ import annotations

import sys

import peft
from packaging.version import Version
from peft.utils import PeftType, register_peft_method

SCALE_TYPE_NAME = "SCALE"
MIN_PEFT_VERSION = Version("0.21.0")


def _check_peft_version() -> None:
    if Version(peft.__version__) < MIN_PEFT_VERSION:
        raise ImportError(
            f"peft_scale needs peft>={MIN_PEFT_VERSION}, found peft {peft.__version__}. "
            f"Upgrade with `pip install -U 'peft>={MIN_PEFT_VERSION}'`."
        )


def add_peft_type_member(name: str) -> PeftType:
    """Add ``name`` to the ``PeftType`` string enum (idempotent) and return the member."""
    if name in PeftType.__members__:
        return PeftType[name]
    if sys.version_info >= (3, 13):
        # Python 3.13 has a (private but stable) hook for exactly this.
        member = str.__new__(PeftType, name)
        member._name_ = name
        member._value_ = name
        PeftType._add_member_(name, member)
        PeftType._value2member_map_[name] = member
        return member
    # Python 3.10-3.12: fill the tables that EnumType.__new__ fills for a class-body member.
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses to assign members
    PeftType._member_map_[name] = member
    PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    return member


def register_scale() -> None:
    """Register SCALE with PEFT once per process; calling it again is harmless."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .config import ScaleConfig
    from .model import ScaleModel

    _check_peft_version()
    peft_type = add_peft_type_member(SCALE_TYPE_NAME)
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is not None and (registered.__module__, registered.__qualname__) == (
        ScaleConfig.__module__,
        ScaleConfig.__qualname__,
    ):
        return  # already registered in this process (also after a module reload)
    if registered is not None:
        raise RuntimeError(
            f"PEFT type {SCALE_TYPE_NAME!r} is already registered to {registered.__module__}.{registered.__name__}; "
            "two packages claim the same PEFT type. Uninstall one of them."
        )
    register_peft_method(name=SCALE_TYPE_NAME.lower(), config_cls=ScaleConfig, model_cls=ScaleModel)
