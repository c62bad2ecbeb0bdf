"""Run several tiny `train()` jobs in one process of a torchrun group (the test of every method under DDP).

`python -m torch.distributed.run --nproc-per-node 2 tests/training/dist_methods.py SPEC.json`: SPEC holds
{"runs": [[out folder, [CLI-style overrides...]], ...]}, each a complete `load_run_config(None, overrides)`.
This script makes the process group itself, so every run also checks that `train()` uses a group its caller
made and leaves it alone; one launch pays the imports once for all the runs.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from lorafit.training.config import load_run_config  # noqa: E402
from lorafit.training.recipe import train  # noqa: E402


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo")
    for _, overrides in spec["runs"]:
        train(load_run_config(None, overrides), log=lambda message: None)
        assert dist.is_initialized()  # the caller's group outlives the run
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
