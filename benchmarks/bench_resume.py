"""What resuming costs the training loops (linfusion_ops.linfusion.distill and
linfusion_ops.longalign.finetune): per checkpoint, the size of each file and the save time; per
micro-batch, linfusion_ops.seeding.seed_step (the seeding that makes a resume bitwise equal to
the uninterrupted run). Tiny random models on CPU (tests.helpers.tiny_models), so the weight and
optimizer files are those of a tiny LinFusion / LoRA (they grow with the model); the seed file
and the RNG states do not depend on the model.

    python -m benchmarks.bench_resume [--json benchmarks/results/resume_cpu.json]
"""

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import git_commit
from linfusion_ops.seeding import save_seed, seed_step
from tests.helpers.tiny_models import tiny_clip_model, tiny_sd_pipeline, write_captioned_images


def files(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def median_us(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def distill_checkpoints(root, steps):
    """Sizes and save times (accelerate's save_state with the script's hooks) of the
    distillation script's checkpoints."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from linfusion_ops.linfusion import distill

    pipe = tiny_sd_pipeline(root / "tok")
    pipe.save_pretrained(root / "pipe")
    write_captioned_images(root / "images", captions="txt")
    seconds = []
    original = Accelerator.save_state

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        result = original(self, *args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return result

    Accelerator.save_state = timed
    try:
        AcceleratorState._reset_state(reset_partial_state=True)
        distill.main([
            "--pretrained_model_name_or_path", str(root / "pipe"), "--train_data_dir", str(root / "images"),
            "--output_dir", str(root / "distill"), "--train_batch_size", "2", "--seed", "0",
            "--max_train_steps", str(steps), "--checkpointing_steps", "1",
        ])
    finally:
        Accelerator.save_state = original
    return {"files": files(root / "distill" / f"checkpoint-{steps}"), "save_ms": [round(s * 1e3, 2) for s in seconds]}


def finetune_checkpoint(root, steps):
    """File sizes of the LongAlign fine-tuning script's checkpoint."""
    from accelerate.state import AcceleratorState

    from linfusion_ops.longalign import finetune

    tiny_clip_model().save_pretrained(root / "clip")
    tiny_sd_pipeline(root / "tok2").tokenizer.save_pretrained(root / "clip")
    (root / "prompts.txt").write_text("a red cat\na house\n")
    AcceleratorState._reset_state(reset_partial_state=True)
    finetune.main([
        "--pretrained_model", str(root / "pipe"), "--preference_model", str(root / "clip"),
        "--prompts", str(root / "prompts.txt"), "--output_dir", str(root / "finetune"), "--mode", "lcm",
        "--max_tokens", "24", "--lora_rank", "4", "--batch_size", "2", "--crop_size", "0",
        "--max_train_steps", str(steps), "--warmup_steps", "0", "--checkpointing_steps", "1",
    ])
    return {"files": files(root / "finetune" / f"checkpoint-{steps}")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"commit": git_commit(), "torch": torch.__version__, "python": platform.python_version(), "threads": 1}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = Path(tmp)
        result["distill"] = distill_checkpoints(root, args.steps)
        result["finetune"] = finetune_checkpoint(root, args.steps)
        (root / "seed").mkdir()
        result["save_seed_us"] = round(median_us(lambda: save_seed(root / "seed", 2**62 + 1), args.repeat), 1)
    result["seed_step_us"] = round(median_us(lambda: seed_step(0, 12345, 1), args.repeat), 1)
    for loop in ("distill", "finetune"):
        sizes = result[loop]["files"]
        print(f"{loop} checkpoint: {sum(sizes.values())} bytes in {len(sizes)} files")
        for name, size in sizes.items():
            print(f"  {size:>10}  {name}")
    print(f"distill save_state per checkpoint (ms): {result['distill']['save_ms']}")
    print(f"save_seed: {result['save_seed_us']} us; seed_step per micro-batch: {result['seed_step_us']} us (median of {args.repeat})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
