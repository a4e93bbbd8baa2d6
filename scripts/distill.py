"""LinFusion distillation script: `python scripts/distill.py --help` (the same as
`python -m linfusion_ops.distill`; launch with `accelerate launch scripts/distill.py ...` for
several GPUs)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from linfusion_ops.distill import main  # noqa: E402

if __name__ == "__main__":
    main()
