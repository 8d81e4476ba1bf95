"""eetune: turn a pretrained decoder LLM into an early-exit LLM cheaply (EE-Tuning)."""

import logging as _logging

# torchao 0.15 warns on every import that its C++ kernels are skipped on torch 2.13; its
# pure-Python paths (all torchtune needs) work, so the warning is noise for our users.
_logging.getLogger("torchao").setLevel(_logging.ERROR)

__version__ = "0.1.0"
