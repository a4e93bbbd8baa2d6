"""LongAlign preference fine-tuning (LoRA): `python scripts/finetune_longalign.py --help` (the same
as `python -m linfusion_ops.longalign.finetune`; launch with
`accelerate launch scripts/finetune_longalign.py ...` for several GPUs)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from linfusion_ops.longalign.finetune import cli  # noqa: E402

if __name__ == "__main__":
    cli()
