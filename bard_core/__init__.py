"""bard_core: the science and the data transforms (torch, transformers, PIL, numpy; no engines).

Importing the package registers the image-only Qwen3-VL processor with ``AutoProcessor`` so that
``AutoProcessor.from_pretrained(dir)`` works on machines without torchvision. The registration runs
when transformers is (or becomes) imported, so ``import bard_core.config`` stays cheap.
"""

from bard_core._register import install as _install

_install()
