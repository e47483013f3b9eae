"""Fine-tune entry point: ``torchrun --nproc-per-node N scripts/finetune.py --config run.json``.

The same as ``python -m d9d.finetune`` and the ``d9d-finetune`` console script; see ``docs/finetune.md``.
"""

import sys

from d9d.finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
