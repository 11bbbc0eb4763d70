"""``peft_scale.registration``: the PEFT type ``SCALE`` and its registration (moved from ``test_model.py``)."""

from __future__ import annotations

import pytest
from peft.utils import PeftType

from peft_scale import ScaleConfig, register_scale


def test_registered_as_a_peft_type():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from peft_scale import ScaleModel

    assert PeftType("SCALE") is PeftType.SCALE and "SCALE" in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SCALE"] is ScaleConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SCALE"] is ScaleModel
    assert ScaleConfig(ffn_expansion=4).peft_type is PeftType.SCALE


def test_registering_twice_is_harmless():
    register_scale()
    register_scale()
    assert list(PeftType).count(PeftType.SCALE) == 1


def test_another_package_claiming_the_type_is_an_error(monkeypatch):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    class Impostor:
        pass

    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.SCALE, Impostor)
    with pytest.raises(RuntimeError, match="already registered to .*Impostor; two packages claim the same PEFT type"):
        register_scale()
