"""The PEFT type name of SCALE and the helper that adds it to PEFT's ``PeftType`` enum.

A leaf module (it imports nothing of the package), so that ``config`` can name its type without importing
``registration``, which imports ``model``, which imports ``config``.

PEFT 0.21's ``register_peft_method`` only accepts names that are already members of the ``PeftType`` enum, and
enum members cannot be added through a public API before Python 3.13 (``_add_member_``): the helper writes the
same private tables that ``enum`` fills when a class is created.
"""

from __future__ import annotations

import sys

from peft.utils import PeftType

SCALE_TYPE_NAME = "SCALE"


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
