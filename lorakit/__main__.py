"""`python -m lorakit ...`: the `lorakit` command, also as torchrun starts it
(`torchrun ... -m lorakit train`)."""

import sys

from lorakit.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
