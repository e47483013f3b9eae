"""``python -m d9d.finetune``: the fine-tune command line."""

import sys

from d9d.finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
