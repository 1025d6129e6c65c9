"""The storage dtypes a bundle may be written in (by name, as ``bundle.json`` records them)."""

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
