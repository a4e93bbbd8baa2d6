"""Sample generation of linfusion_ops.evaluation.generate on a tiny random SD pipeline: seeds,
captions, per-sample determinism, resume after a kill, two gloo processes, bad input."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from linfusion_ops.evaluation import cli
from linfusion_ops.evaluation.generate import (
    METADATA_FILE,
    RUN_FILE,
    generate,
    load_pipeline,
    parse_seeds,
    plan_samples,
    read_captions,
    sample_file,
)

CAPTIONS = ["a red cat", "two blue dogs", "green tree", "a house by the sea", "snow"]
SEEDS = range(100, 105)
CALL = dict(num_inference_steps=2, height=32, width=32, guidance_scale=7.5)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tests.helpers.tiny_models import tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("pipe")
    tiny_sd_pipeline(folder / "tok").save_pretrained(folder / "sd")
    return folder / "sd"


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    return load_pipeline(str(pipeline_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def reference_run(pipe, tmp_path_factory):
    """One uninterrupted single-process run of all samples, batch size 1."""
    out = tmp_path_factory.mktemp("reference")
    generate(pipe, plan_samples(CAPTIONS, SEEDS), str(out), progress=False, **CALL)
    return out


@pytest.fixture(scope="module")
def batched_run(pipe, tmp_path_factory):
    """The same run with batch size 2."""
    out = tmp_path_factory.mktemp("batched")
    result = generate(pipe, plan_samples(CAPTIONS, SEEDS), str(out), batch_size=2, progress=False, **CALL)
    assert result == {"generated": 5, "skipped": 0, "total": 5}
    return out


def png_bytes(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder)) if n.endswith(".png")}


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,2,5-7") == [1, 2, 5, 6, 7]
    assert len(parse_seeds("0-29999")) == 30000
    for bad in ["", "3-1", "-1", "a", "1,,2"]:
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_plan_and_caption_errors(tmp_path):
    (tmp_path / "c.txt").write_text("  a cat \n\n b dog\n")
    assert read_captions(tmp_path / "c.txt") == ["a cat", "b dog"]
    plan = plan_samples(["x", "y", "z"], [7, 8, 9, 10], num=2)
    assert [(s.index, s.seed, s.caption) for s in plan] == [(0, 7, "x"), (1, 8, "y")]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no captions"):
        read_captions(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="2 seeds for 3 samples"):
        plan_samples(["x", "y", "z"], [0, 1])
    with pytest.raises(ValueError, match="more samples than"):
        plan_samples(["x"], [0, 1], num=2)


def test_generate_writes_pngs_metadata_and_is_batch_invariant(reference_run, batched_run):
    records = [json.loads(line) for line in (reference_run / METADATA_FILE).read_text().splitlines()]
    assert [(r["index"], r["seed"], r["caption"], r["file"]) for r in records] == [
        (i, 100 + i, c, sample_file(i)) for i, c in enumerate(CAPTIONS)
    ]
    run = json.loads((reference_run / RUN_FILE).read_text())
    assert run["num_samples"] == 5 and run["height"] == 32 and run["num_inference_steps"] == 2
    # A sample's noise comes from its own seed: batching does not change it.
    from PIL import Image

    for name in png_bytes(reference_run):
        a = np.asarray(Image.open(reference_run / name), dtype=np.int16)
        b = np.asarray(Image.open(batched_run / name), dtype=np.int16)
        assert a.shape == (32, 32, 3) and a.std() > 0
        assert np.abs(a - b).max() <= 1  # batched convolutions may round one level apart


class Killed(Exception):
    pass


class KilledAfter:
    """The pipeline, dying (as a killed process would) at its call number `calls + 1`."""

    def __init__(self, pipe, calls):
        self.pipe, self.calls, self.prompts = pipe, calls, []

    def __call__(self, **kwargs):
        if len(self.prompts) == self.calls:
            raise Killed
        self.prompts.append(list(kwargs["prompt"]))
        return self.pipe(**kwargs)


def test_resume_after_kill_equals_uninterrupted_run(pipe, batched_run, tmp_path):
    plan = plan_samples(CAPTIONS, SEEDS)
    killed = KilledAfter(pipe, calls=2)
    with pytest.raises(Killed):
        generate(killed, plan, str(tmp_path), batch_size=2, progress=False, **CALL)
    assert sorted(png_bytes(tmp_path)) == [sample_file(i) for i in range(4)]
    assert not (tmp_path / METADATA_FILE).exists()  # the folder does not look complete
    # A PNG half-written when the process died stays under its hidden temporary name.
    (tmp_path / ".000004.png.tmp-12345").write_bytes(b"\x89PNG half")

    resumed = KilledAfter(pipe, calls=100)
    result = generate(resumed, plan, str(tmp_path), batch_size=2, progress=False, **CALL)
    assert result == {"generated": 1, "skipped": 4, "total": 5}
    assert resumed.prompts == [CAPTIONS[4:]]
    assert png_bytes(tmp_path) == png_bytes(batched_run)
    assert (tmp_path / METADATA_FILE).read_text() == (batched_run / METADATA_FILE).read_text()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_resume_with_other_settings_is_refused(pipe, reference_run):
    before = png_bytes(reference_run)
    with pytest.raises(ValueError, match="another run .*num_inference_steps"):
        generate(pipe, plan_samples(CAPTIONS, SEEDS), str(reference_run), progress=False,
                 **dict(CALL, num_inference_steps=3))
    assert png_bytes(reference_run) == before


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, pipeline_dir, outdir, log_dir):
    # What torchrun / accelerate launch set for every rank.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from linfusion_ops.evaluation.generate import distributed_setup

    rank_, world_, device = distributed_setup("cpu")
    assert (rank_, world_, device.type) == (rank, world, "cpu")
    assert torch.distributed.get_backend() == "gloo"
    recorder = KilledAfter(load_pipeline(pipeline_dir, dtype=torch.float32), calls=100)
    result = generate(recorder, plan_samples(CAPTIONS, SEEDS), outdir, rank=rank, world_size=world,
                      progress=False, **CALL)
    with open(os.path.join(log_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"result": result, "prompts": [p for call in recorder.prompts for p in call]}, f)
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_write_each_sample_once_and_equal_one_process(pipeline_dir, reference_run, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    mp.spawn(_rank_worker, args=(2, _free_port(), str(pipeline_dir), str(out), str(logs)), nprocs=2, join=True)
    ranks = [json.loads((logs / f"rank{r}.json").read_text()) for r in range(2)]
    prompts = [p for r in ranks for p in r["prompts"]]
    assert sorted(prompts) == sorted(CAPTIONS)  # every sample generated exactly once
    assert ranks[0]["prompts"] == CAPTIONS[0::2] and ranks[1]["prompts"] == CAPTIONS[1::2]
    assert [r["result"]["generated"] for r in ranks] == [3, 2]
    assert png_bytes(out) == png_bytes(reference_run)
    assert (out / METADATA_FILE).read_text() == (reference_run / METADATA_FILE).read_text()


def test_generate_cli_matches_library_and_rejects_bad_input(pipeline_dir, reference_run, tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    out = tmp_path / "cli"
    args = ["generate", "--pipeline", str(pipeline_dir), "--captions", str(captions), "--outdir", str(out),
            "--seeds", "100-104", "--steps", "2", "--resolution", "32", "--dtype", "fp32", "--device", "cpu",
            "--no-progress"]
    assert cli.main(args) == 0
    assert png_bytes(out) == png_bytes(reference_run)
    assert "5 samples" in capsys.readouterr().out

    (tmp_path / "empty.txt").write_text("")
    bad_inputs = [
        ["--captions", str(tmp_path / "empty.txt"), "--seeds", "0-4"],
        ["--captions", str(captions), "--seeds", "0-3"],
        ["--captions", str(captions), "--seeds", "0-9", "--call-kwargs", "[1]"],
    ]
    for extra in bad_inputs:
        target = tmp_path / "bad"
        code = cli.main(["generate", "--pipeline", str(pipeline_dir), "--outdir", str(target), "--no-progress"] + extra)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("linfusion_ops.evaluation generate: error:")
        assert not target.exists()


# ---------------------------------------------------------------------------------------------
# load_pipeline: LinFusion mounted, a LongAlign LoRA, the high-res pipeline


def one_sample(pipe, seed=3):
    """One 32 px sample of CAPTIONS[0] as an int16 array."""
    from PIL import Image

    image = pipe(prompt=[CAPTIONS[0]], generator=[torch.Generator("cpu").manual_seed(seed)], output_type="pil",
                 **CALL).images[0]
    assert isinstance(image, Image.Image)
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def linfusion_dir(pipe, tmp_path_factory):
    from tests.helpers.tiny_models import make_linfusion

    folder = tmp_path_factory.mktemp("linfusion") / "lf"
    make_linfusion(pipe.unet).save_pretrained(folder)
    return folder


def test_load_pipeline_mounts_a_linfusion_checkpoint(pipeline_dir, pipe, linfusion_dir):
    from diffusers import DiffusionPipeline

    from linfusion_ops.linfusion import LinFusion, has_linfusion

    mounted = load_pipeline(str(pipeline_dir), dtype=torch.float32, linfusion=str(linfusion_dir))
    assert has_linfusion(mounted.unet) and not has_linfusion(pipe.unet)
    by_hand = DiffusionPipeline.from_pretrained(str(pipeline_dir), torch_dtype=torch.float32)
    LinFusion.construct_for(by_hand, pretrained_model_name_or_path=str(linfusion_dir))
    by_hand.set_progress_bar_config(disable=True)
    sample = one_sample(mounted)
    np.testing.assert_array_equal(sample, one_sample(by_hand))
    assert np.abs(sample - one_sample(pipe)).max() > 0  # the linear attention changed the image


def test_load_pipeline_loads_a_longalign_lora_list(pipeline_dir, pipe, tmp_path):
    from diffusers import DiffusionPipeline

    from linfusion_ops.longalign.lora import add_longalign_lora, lora_to_longalign_list

    adapted = DiffusionPipeline.from_pretrained(str(pipeline_dir), torch_dtype=torch.float32)
    add_longalign_lora(adapted.unet, rank=2)
    torch.manual_seed(5)
    with torch.no_grad():  # the up weights start at zero: make the LoRA change the UNet
        for name, parameter in adapted.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    weights = lora_to_longalign_list(adapted.unet, dtype=None)
    torch.save(weights, tmp_path / "lora_vis.pt")

    loaded = load_pipeline(str(pipeline_dir), dtype=torch.float32, lora=str(tmp_path / "lora_vis.pt"))
    assert all(torch.equal(a, b) for a, b in zip(lora_to_longalign_list(loaded.unet, dtype=None), weights))
    adapted.set_progress_bar_config(disable=True)
    sample = one_sample(loaded)
    np.testing.assert_array_equal(sample, one_sample(adapted))
    assert np.abs(sample - one_sample(pipe)).max() > 0


def test_load_pipeline_highres_wraps_the_mounted_pipeline(pipeline_dir, linfusion_dir):
    from linfusion_ops.highres import LinFusionHighResPipeline
    from linfusion_ops.linfusion import has_linfusion

    highres = load_pipeline(str(pipeline_dir), dtype=torch.float32, linfusion=str(linfusion_dir), highres=True)
    assert isinstance(highres, LinFusionHighResPipeline) and has_linfusion(highres.unet)
    mounted = load_pipeline(str(pipeline_dir), dtype=torch.float32, linfusion=str(linfusion_dir))
    by_hand = LinFusionHighResPipeline.from_pipe(mounted)
    by_hand.set_progress_bar_config(disable=True)
    # 32 px is twice the tiny UNet's native 16 px: a base stage and a high-res stage.
    sample = one_sample(highres)
    np.testing.assert_array_equal(sample, one_sample(by_hand))
    assert np.abs(sample - one_sample(mounted)).max() > 0


def test_dataset_captions_from_a_local_folder_or_file(tmp_path, capsys):
    pytest.importorskip("datasets")
    from linfusion_ops.evaluation.generate import dataset_captions

    folder = tmp_path / "coco"
    folder.mkdir()
    rows = [{"caption": ["a cat on a mat", "a cat"], "id": 1}, {"caption": [" two dogs "], "id": 2}, {"caption": ["snow"], "id": 3}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert dataset_captions(str(folder), "caption") == ["a cat on a mat", "two dogs", "snow"]
    assert dataset_captions(str(folder), "caption", limit=2) == ["a cat on a mat", "two dogs"]
    (tmp_path / "prompts.csv").write_text("prompt,score\nred house,1\nblue sea,2\n")
    assert dataset_captions(str(tmp_path / "prompts.csv"), "prompt") == ["red house", "blue sea"]
    with pytest.raises(ValueError, match="has no column 'text'"):
        dataset_captions(str(folder), "text")
    (tmp_path / "prompts.txt").write_text("red house\n")
    with pytest.raises(ValueError, match="is a file but not"):
        dataset_captions(str(tmp_path / "prompts.txt"), "text")

    # The CLI reads them before any model loads; a bad column is one line (no progress bar of
    # datasets' with --no-progress, on a folder not yet in its cache) and writes nothing.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "captions.jsonl").write_text((folder / "captions.jsonl").read_text())
    capsys.readouterr()
    code = cli.main(["generate", "--pipeline", str(tmp_path / "no-pipeline"), "--outdir", str(tmp_path / "out"),
                     "--dataset", str(fresh), "--dataset-column", "text", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "has no column 'text'" in err
    assert not (tmp_path / "out").exists()


KILLED_RUN = """
import sys
from linfusion_ops.evaluation.generate import generate, plan_samples
from tests.helpers.tiny_models import NoisePipeline

captions = sys.argv[2].split("|")
generate(NoisePipeline(hang_at=3), plan_samples(captions, range(len(captions))), sys.argv[1], batch_size=2,
         height=16, width=16, progress=False)
"""


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    pytest.importorskip("diffusers")
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers.tiny_models import NoisePipeline

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(out), "|".join(CAPTIONS)], cwd=root, env=env)
    try:
        # Two batches of two are written, then the third call hangs until the kill.
        deadline = time.monotonic() + 300
        while len(png_bytes(out) if out.is_dir() else {}) < 4 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it was killed"
        assert len(png_bytes(out)) == 4
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert (out / RUN_FILE).is_file() and not (out / METADATA_FILE).exists()

    plan = plan_samples(CAPTIONS, range(len(CAPTIONS)))
    result = generate(NoisePipeline(), plan, str(out), batch_size=2, height=16, width=16, progress=False)
    assert result == {"generated": 1, "skipped": 4, "total": 5}
    whole = tmp_path / "whole"
    generate(NoisePipeline(), plan, str(whole), batch_size=2, height=16, width=16, progress=False)
    assert png_bytes(out) == png_bytes(whole) and len(png_bytes(whole)) == 5
    assert (out / METADATA_FILE).read_text() == (whole / METADATA_FILE).read_text()
