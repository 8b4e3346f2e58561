"""`lorakit train --nproc N ...`: start `python -m lorakit train ...` as N ranks under torchrun.

`main` runs torchrun's agent in the calling process (also as `python -m lorakit.train.launch N train ...`).
torchrun's own command line would read our flags as abbreviations of its own (`--r` is ambiguous
there), so its options are parsed alone and our arguments are handed to the ranks untouched.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    nproc, lorakit_argv = argv[0], argv[1:]
    # Share the cores among the ranks (torchrun would set 1 thread each, with a warning).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(nproc))))
    # --standalone: a rendezvous on a free local port, so several jobs can share a machine.
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "lorakit"])
    args.training_script_args = lorakit_argv
    try:
        run(args)
    except ChildFailedError:
        return 1  # the failing rank has printed its error; torchrun has stopped the others
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
