"""Make SCALE a PEFT method: a ``PeftType`` member and ``register_peft_method``.

PEFT 0.21's ``register_peft_method`` only accepts names that are already members of the ``PeftType``
enum, and PEFT has no plugin discovery. So a third-party method has to add its enum member itself.
``peft_scale.peft_type`` adds that member; this module checks the PEFT version it was written against, so
that a future change fails loudly instead of half-registering, and registers the config and tuner classes.
"""

from __future__ import annotations

import peft
from packaging.version import Version
from peft.utils import register_peft_method

from .config import ScaleConfig
from .model import ScaleModel
from .peft_type import SCALE_TYPE_NAME, add_peft_type_member

MIN_PEFT_VERSION = Version("0.21.0")


def _check_peft_version() -> None:
    if Version(peft.__version__) < MIN_PEFT_VERSION:
        raise ImportError(
            f"peft_scale needs peft>={MIN_PEFT_VERSION}, found peft {peft.__version__}. "
            f"Upgrade with `pip install -U 'peft>={MIN_PEFT_VERSION}'`."
        )


def register_scale() -> None:
    """Register SCALE with PEFT once per process; calling it again is harmless."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

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
