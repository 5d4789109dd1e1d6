"""Deferred registration of ``ImageOnlyQwen3VLProcessor`` with transformers' ``AutoProcessor``.

Registering needs transformers (seconds to import). If it is already imported we register now;
otherwise a one-shot import hook registers right after ``transformers`` finishes importing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_done = False


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    from transformers import AutoProcessor, Qwen3VLConfig

    from bard_core.processor import ImageOnlyQwen3VLProcessor

    AutoProcessor.register(Qwen3VLConfig, ImageOnlyQwen3VLProcessor, exist_ok=True)


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``transformers`` so that registration runs once the module has executed.

    It stays on ``sys.meta_path`` until transformers really executes: availability checks such as
    ``importlib.util.find_spec("transformers")`` (lm-eval and others do them) only look the module up,
    and must not use the hook up.
    """

    _looking = False

    def find_spec(self, name, path, target=None):
        if name != "transformers" or self._looking:
            return None
        self._looking = True  # the lookup below consults sys.meta_path, us included
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._looking = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())
