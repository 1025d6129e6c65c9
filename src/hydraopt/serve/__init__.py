"""The OpenAI-compatible HTTP server over :mod:`hydraopt.runtime` (``hydraopt serve``)."""

from hydraopt.serve.app import create_app
from hydraopt.serve.batcher import Batcher, Job

__all__ = ["Batcher", "Job", "create_app"]
