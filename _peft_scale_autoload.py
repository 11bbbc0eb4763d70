"""Register SCALE with PEFT as soon as ``peft`` is imported, so saved SCALE adapters load without
``import peft_scale`` (PEFT has no plugin discovery of its own).

The peft-scale wheel installs ``peft_scale_autoload.pth``, which imports this module at interpreter start.
It uses only the standard library and does nothing until ``peft`` itself is imported; then it imports
``peft_scale``, whose import registers the method. Set ``PEFT_SCALE_NO_AUTOLOAD=1`` to switch it off.
"""

import importlib.abc
import importlib.machinery
import os
import sys
import warnings

_PEFT = "peft"


class _RegisterScaleAfterPeft(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _PEFT:
            return None
        sys.meta_path.remove(self)  # one shot: from here on, imports go their usual way
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_module_then_register(module):
            exec_module(module)
            try:
                import peft_scale  # noqa: F401  (its import registers SCALE)
            except Exception as error:  # never break `import peft` because of this hook
                warnings.warn(f"peft-scale could not register SCALE with PEFT: {error!r}", stacklevel=2)

        spec.loader.exec_module = exec_module_then_register
        return spec


def install() -> None:
    if os.environ.get("PEFT_SCALE_NO_AUTOLOAD") or _PEFT in sys.modules:
        return
    if not any(isinstance(finder, _RegisterScaleAfterPeft) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterScaleAfterPeft())


install()
