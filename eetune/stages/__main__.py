"""A worker torchrun started for a mesh run: `python -m eetune.stages <stage> <config.yaml>`.

The parent (`eetune.parallel.launch.relaunch`) resolved the config once and wrote it to a file,
so every worker runs the same stage with the same run_dir.
"""

from __future__ import annotations

import importlib
import sys

from omegaconf import OmegaConf

from eetune.config.schema import to_typed
from eetune.errors import EetuneError


def main(argv: list[str]) -> None:
    stage, path = argv
    module = importlib.import_module(f"eetune.stages.{stage}")
    try:
        module.run(to_typed(OmegaConf.load(path)))
    except EetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C, passed on by torchrun: the parent reports it
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
