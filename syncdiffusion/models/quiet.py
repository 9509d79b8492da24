"""Loading without diffusers' and transformers' progress bars: from a local folder, or a LoRA
into networks already loaded, loading is quick, and per-file bars would only clutter the logs;
and a LoRA's loading without the reports that say nothing to a user."""

from __future__ import annotations

import warnings
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


@contextmanager
def no_adapter_reports() -> Iterator[None]:
    """Progress bars off, and the two notices a second LoRA's loading gives: transformers' load
    report (the first adapter's weights "MISSING" from the second's file) and peft's warning
    that a model holds several adapters, which is what two LoRAs are."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with no_progress_bars(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
