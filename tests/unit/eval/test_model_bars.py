"""load_base_model keeps transformers' loading bars out of logs, and restores their settings."""

from __future__ import annotations

import io

from transformers import modeling_gguf_pytorch_utils as gguf_utils
from transformers.utils import logging as hf_logging

from hydraopt.eval.model import _bars_only_on_a_terminal


def test_loading_bars_are_off_in_a_log_and_restored_after() -> None:
    original = gguf_utils.tqdm
    assert hf_logging.is_progress_bar_enabled()
    with _bars_only_on_a_terminal():  # pytest captures stderr: not a terminal
        assert not hf_logging.is_progress_bar_enabled()
        log = io.StringIO()
        for _ in gguf_utils.tqdm(range(3), desc="Converting", file=log):
            pass
        assert log.getvalue() == ""
    assert gguf_utils.tqdm is original and hf_logging.is_progress_bar_enabled()
