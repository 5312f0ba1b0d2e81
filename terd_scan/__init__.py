"""terd-scan: TERD backdoor scanning for diffusion models."""

import os

# Refuse remote code in diffusers before it is imported anywhere (read at import time),
# and make every torch.load a weights-only load, whatever a caller passes.
os.environ.setdefault("DIFFUSERS_DISABLE_REMOTE_CODE", "1")
os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"

__version__ = "0.1.0"
TOOL_NAME = "terd-scan"
