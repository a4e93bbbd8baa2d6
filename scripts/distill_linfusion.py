"""LinFusion distillation: `python scripts/distill_linfusion.py --help` (the same as
`python -m linfusion_ops.linfusion.distill`; launch with
`accelerate launch scripts/distill_linfusion.py ...` for several GPUs)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from linfusion_ops.linfusion.distill import cli  # noqa: E402

if __name__ == "__main__":
    cli()
