"""Reproducible randomness for the training loops (linfusion_ops.linfusion.distill,
linfusion_ops.longalign.finetune), so that a run resumed from a checkpoint makes exactly the
random draws of the uninterrupted run.

Every random draw of a micro-batch comes from `seed_step(seed, micro_step, rank, device)`: a
generator for the draws that take one and a reseed of the global torch RNGs for those that
cannot (dropout). Both are functions of (seed, micro-batch index, process index) alone, so
nothing that ran before the micro-batch (model loading, a checkpoint restore, a DataLoader
iterator drawing its base seed) changes them. A checkpoint stores the seed (`save_seed`), and a
resume with another one is refused (`resume_seed`). See docs/distillation.md and
docs/preference.md.
"""

import json
from pathlib import Path
from typing import Optional

import torch

from .optional import needs

with needs(__name__, "train"):  # a missing extra is a one-line MissingExtraError
    import numpy as np

SEED_FILE = "seed.json"
# Keys that separate the two streams of one micro-batch.
_GENERATOR_STREAM, _GLOBAL_STREAM = (), (1,)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixed from non-negative ints (numpy's SeedSequence): distinct key tuples
    give unrelated streams, unlike seed + key."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def seed_step(seed: int, micro_step: int, rank: int, device="cpu") -> torch.Generator:
    """Seed one micro-batch: reseeds the global torch RNGs (CPU and every accelerator; dropout
    draws from them) and returns a torch.Generator on `device` for the explicit draws (noise,
    timesteps, crops), both from (seed, micro_step, rank), non-negative ints, in different
    streams."""
    torch.manual_seed(derive_seed(seed, micro_step, rank, *_GLOBAL_STREAM))
    return torch.Generator(device=device).manual_seed(derive_seed(seed, micro_step, rank, *_GENERATOR_STREAM))


def save_seed(folder, seed: int) -> None:
    """Write the run's seed into the checkpoint folder (folder/seed.json)."""
    (Path(folder) / SEED_FILE).write_text(json.dumps({"seed": seed}))


def resume_seed(folder, seed: Optional[int], flag: str = "--seed") -> Optional[int]:
    """The seed to resume from checkpoint `folder` with: the stored one when `seed` is None, else
    `seed`, which must equal the stored one (ValueError, one line, naming `flag`, if not). None
    when neither is known (a checkpoint written without a seed file and no `seed`)."""
    path = Path(folder) / SEED_FILE
    if not path.exists():
        return seed
    try:
        stored = json.loads(path.read_text())["seed"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read the seed of checkpoint {folder} from {path}: {error}") from None
    if seed is not None and seed != stored:
        raise ValueError(
            f"{flag} {seed} differs from the seed {stored} that checkpoint {folder} was trained with; "
            f"resume with {flag} {stored} (or without {flag}) to continue the same run"
        )
    return stored
