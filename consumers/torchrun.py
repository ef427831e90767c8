"""``python -m consumers.torchrun [torchrun options] -m consumers.train ...``: torchrun that ends
quietly when it is signalled itself.

``scripts/launch.sh`` and ``scripts/slurm/edsam.sbatch`` start the trainer ranks through it.
When SLURM's ``scancel`` or a preemption sends SIGTERM to every process of a job, torchrun
passes it on to its ranks and waits for them (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``), and the
ranks finish their step and checkpoint; torchrun then raises ``SignalException``, which its
own entry point prints as a traceback, so the log of a cleanly stopped job shows a crash.
Here that exception ends the process with one line and status 128 + the signal; every other
outcome is torchrun's own (``torch.distributed.run.main``, the same argument parser).
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun_main


def main() -> None:
    try:
        torchrun_main()
    except SignalException as err:
        print(f"torchrun: stopped by {err.sigval.name}; its ranks had it too (a rank sent SIGTERM finishes its step "
              f"and checkpoints)", file=sys.stderr, flush=True)
        sys.exit(128 + int(err.sigval))


if __name__ == "__main__":
    main()
