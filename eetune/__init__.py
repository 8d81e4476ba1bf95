"""eetune: turn a pretrained decoder LLM into an early-exit LLM cheaply (EE-Tuning)."""

import logging as _logging
import warnings as _warnings

# torchao 0.15 warns on every import that its C++ kernels are skipped on torch 2.13; its
# pure-Python paths (all torchtune needs) work, so the warning is noise for our users.
_logging.getLogger("torchao").setLevel(_logging.ERROR)

# torchtune's RMSNorm upcasts activations but not its bf16 weight, so torch falls back from
# its fused kernel with a warning on the first bf16 call; the result is correct.
_warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")

__version__ = "0.1.0"
