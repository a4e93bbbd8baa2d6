"""The LongAlign fine-tuning loop (linfusion_ops.longalign.finetune), offline on tiny random
models: a run resumed mid-epoch, at an epoch end and with gradient accumulation ends with bitwise
the uninterrupted run's LoRA, optimizer and scheduler state; a resume with another seed is
refused; a bad prompt file fails in one line before any model loads."""

import json
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from tests.helpers.tiny_models import tiny_clip_model, tiny_sd_pipeline  # noqa: E402

from linfusion_ops.longalign import finetune, preference  # noqa: E402

PROMPTS = ["a red cat. a dog sits.", "a house", "big sky. old tree. warm light.", "a boat"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(pipeline folder, preference model folder, prompt file) of a tiny SD 1.5 run."""
    root = tmp_path_factory.mktemp("finetune")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tiny_sd_pipeline(root / "tok")
    pipe.save_pretrained(root / "pipe")
    tiny_clip_model().save_pretrained(root / "clip")
    pipe.tokenizer.save_pretrained(root / "clip")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return root / "pipe", root / "clip", prompts


def arguments(models, out, steps, *extra, prompts=None):
    pipe, clip, prompt_file = models
    # LCM (random noise at every step), a random 12 px crop of the 16 px images and LoRA dropout
    # 0.1: every kind of draw the loop makes.
    return [
        "--pretrained_model", str(pipe), "--preference_model", str(clip),
        "--prompts", str(prompts or prompt_file), "--output_dir", str(out), "--mode", "lcm",
        "--max_tokens", "24", "--lora_rank", "4", "--lora_dropout", "0.1", "--crop_size", "12",
        "--batch_size", "2", "--max_train_steps", str(steps), "--warmup_steps", "0",
        "--learning_rate", "1e-3", "--checkpointing_steps", "1", "--save_steps", "100", *extra,
    ]


def run(*args, **kwargs):
    """finetune.main in this process; accelerate keeps one process-wide state, reset for each run."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finetune.main(arguments(*args, **kwargs))


def training_state(folder):
    return torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)


def assert_states_equal(a, b, path="state"):
    """Nested dicts / lists of tensors and numbers, bitwise equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), (
            f"{path}: max abs difference {(a.double() - b.double()).abs().max().item():.3g}"
        )
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_states_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


class Batches:
    """Records the prompts and initial latents of every micro-batch the loop samples."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = preference.RewardSampler.sample

        def sample(sampler, *args, **kwargs):
            images, steps = original(sampler, *args, **kwargs)
            self.calls.append((images.detach().clone(), steps))
            return images, steps

        monkeypatch.setattr(preference.RewardSampler, "sample", sample)


# 4 prompts, batch 2: two micro-batches per epoch. With accumulation 1, step 1 is mid-epoch and
# step 2 an epoch end; with accumulation 2 an optimizer step is a whole epoch.
@pytest.mark.parametrize(
    "accumulation, total, resume_at",
    [(1, 3, 1), (1, 3, 2), (2, 2, 1)],
    ids=["mid_epoch", "epoch_boundary", "accumulation2"],
)
def test_resume_is_bitwise_equal_to_uninterrupted_run(models, tmp_path, monkeypatch, accumulation, total, resume_at):
    extra = ("--gradient_accumulation_steps", str(accumulation))
    batches = Batches(monkeypatch)
    straight = tmp_path / "straight"
    run(models, straight, total, "--seed", "3", *extra)
    straight_calls = list(batches.calls)

    resumed = tmp_path / "resumed"
    run(models, resumed, resume_at, "--seed", "3", *extra)
    batches.calls.clear()
    # Without --seed the checkpoint's seed (3) is used.
    run(models, resumed, total, "--resume", *extra)
    assert len(straight_calls) == total * accumulation
    assert len(batches.calls) == (total - resume_at) * accumulation
    # The resumed run sampled the uninterrupted run's last images (same prompts, noise and
    # gradient steps).
    for (a, steps_a), (b, steps_b) in zip(straight_calls[resume_at * accumulation:], batches.calls):
        assert steps_a == steps_b and torch.equal(a, b)

    final = f"checkpoint-{total}"
    expected, got = training_state(straight / final), training_state(resumed / final)
    assert expected["optimizer"]["state"], "the optimizer never stepped"
    assert_states_equal(expected, got)
    assert json.loads((resumed / final / "seed.json").read_text()) == {"seed": 3}
    first = training_state(straight / f"checkpoint-{resume_at}")["lora"]
    assert any(not torch.equal(first[k], v) for k, v in expected["lora"].items()), "the LoRA did not train"


def test_resume_with_another_seed_is_refused_before_models_load(models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(models, out, 1, "--seed", "3")

    def no_models(name):
        raise AssertionError("a model was loaded before the seed was checked")

    monkeypatch.setattr(finetune, "load_pipeline", no_models)
    with pytest.raises(ValueError, match="--seed 4 differs from the seed 3") as caught:
        run(models, out, 2, "--seed", "4", "--resume")
    assert "\n" not in str(caught.value)


def test_bad_prompt_files_fail_in_one_line_before_models_load(models, tmp_path, monkeypatch):
    def no_models(name):
        raise AssertionError("a model was loaded before the prompts were checked")

    monkeypatch.setattr(finetune, "load_pipeline", no_models)
    cases = {
        "missing.txt": (None, "cannot read"),
        "empty.txt": ("\n  \n", "holds no prompts"),
        "binary.txt": (b"\xff\xfe\xfa prompt", "cannot read"),
        "bad.jsonl": ('{"prompt": "a cat"}\n{not json\n', "line 2 is not JSON"),
        "no_field.jsonl": ('{"text": "a cat"}\n', "line 1: a JSONL record needs a 'prompt' or 'caption' string"),
        "list.jsonl": ('["a cat"]\n', "line 1: a JSONL record needs"),
        "number.jsonl": ('{"prompt": 3}\n', "line 1: a JSONL record needs"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        out = tmp_path / f"out_{path.stem}"
        with pytest.raises(ValueError, match=message) as caught:
            run(models, out, 1, prompts=path)
        assert "\n" not in str(caught.value) and str(caught.value).startswith("--prompts: "), name
        assert not out.exists(), name
    # The command line prints it as one line, without a traceback.
    with pytest.raises(SystemExit) as exited:
        finetune.cli(arguments(models, tmp_path / "out_cli", 1, prompts=tmp_path / "empty.txt"))
    assert str(exited.value.code).startswith("error: --prompts: ") and "\n" not in str(exited.value.code)
