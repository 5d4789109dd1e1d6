"""An image-only Qwen3-VL processor: the stock one with ``video_processor=None``.

The stock ``Qwen3VLProcessor`` loads a video processor, which needs torchvision; images never do.
Saved directories name this class in ``processor_config.json`` and ``import bard_core`` registers it.
"""

from __future__ import annotations

from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    # No `video_processor` parameter: ProcessorMixin derives the sub-processors it saves and loads
    # from this signature, so none is ever looked for.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)
