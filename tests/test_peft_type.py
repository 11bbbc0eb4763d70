"""``peft_scale.peft_type``: the name ``SCALE`` and the helper that adds a member to PEFT's ``PeftType`` enum
(its registration with PEFT: ``test_registration.py``)."""

from __future__ import annotations

from conftest import run_in_fresh_process
from peft.utils import PeftType

from peft_scale.peft_type import SCALE_TYPE_NAME, add_peft_type_member


def test_the_scale_member_is_returned_as_it_is():
    assert SCALE_TYPE_NAME == "SCALE"
    assert add_peft_type_member(SCALE_TYPE_NAME) is PeftType.SCALE
    assert list(PeftType).count(PeftType.SCALE) == 1


def test_a_new_member_behaves_like_a_class_body_member():
    """In a fresh process, so that this process's ``PeftType`` keeps PEFT's members and SCALE only."""
    out = run_in_fresh_process(
        """
import json
from peft.utils import PeftType
from peft_scale.peft_type import add_peft_type_member

before = len(PeftType)
member = add_peft_type_member("NEW_METHOD")
assert add_peft_type_member("NEW_METHOD") is member  # idempotent
assert isinstance(member, PeftType) and isinstance(member, str)
assert member is PeftType.NEW_METHOD is PeftType["NEW_METHOD"] is PeftType("NEW_METHOD")
assert (member.name, member.value, member == "NEW_METHOD") == ("NEW_METHOD", "NEW_METHOD", True)
assert len(PeftType) == before + 1 and list(PeftType)[-1] is member
print(json.dumps({"type": member}))
"""
    )
    assert out.strip() == '{"type": "NEW_METHOD"}'
