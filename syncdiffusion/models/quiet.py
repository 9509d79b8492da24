"""Loading without diffusers' and transformers' progress bars: from a local folder, or a LoRA
into networks already loaded, loading is quick, and per-file bars would only clutter the logs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """diffusers' and transformers' progress bars off for the duration, as they were after."""
    diffusers_bars = diffusers_logging.is_progress_bar_enabled()
    transformers_bars = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if diffusers_bars:
            diffusers_logging.enable_progress_bar()
        if transformers_bars:
            transformers_logging.enable_progress_bar()
