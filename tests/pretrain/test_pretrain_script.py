"""tools/pretrain_gpu.sh (stage 0 on a lent GPU) runs end to end on a miniature of its configs:
CLIP and its region fine-tune, VAE and its decoder fine-tune, UNet and its token grounding, each
exported where it belongs."""

import os
import subprocess
import sys

from pretrain_helpers import TINY_OPTS

from spade.utils.manifest import read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_script_runs_every_stage_on_a_miniature(tmp_path):
    models, runs, logs = tmp_path / "models", tmp_path / "runs", tmp_path / "logs"
    extra = TINY_OPTS + [
        "PRETRAIN.CORPUS.ROOT", str(tmp_path / "corpus"),
        "SOLVER.MAX_ITER", "2",
        "MODEL.DEVICE", "cpu",
        "PRETRAIN.NUM_WORKERS", "0",
        "PRETRAIN.MAX_WALL_SECONDS", "0.0",
    ]  # fmt: skip
    env = dict(
        os.environ,
        PY=sys.executable,
        MODELS=str(models),
        RUNS=str(runs),
        EXTRA_OPTS=" ".join(v.replace(" ", "") for v in extra),  # the script splits on spaces
    )
    proc = subprocess.run(
        ["bash", "tools/pretrain_gpu.sh", str(logs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = "\n".join(
        open(logs / f).read()[-2000:] for f in sorted(os.listdir(logs)) if f.endswith(".log")
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr + tail
    clip = read_manifest(str(models / "synthpsg-tiny-clip"))
    # the CLIP folder holds the region fine-tune, continued from the first run's weights
    assert clip["iterations"] == 2 and "REGION_WEIGHT: 1.0" in clip["config"]
    assert "TRAIN_TEXT: false" in clip["config"]
    assert (runs / "clip" / "model_final.safetensors").is_file()
    assert (runs / "clip_region" / "model_final.safetensors").is_file()
    vae = read_manifest(str(models / "synthpsg-tiny-sd" / "vae"))
    assert vae["iterations"] == 2 and "TRAIN_ENCODER: false" in vae["config"]  # the fine-tune
    assert (runs / "vae_decoder" / "model_final.safetensors").is_file()
    unet = read_manifest(str(models / "synthpsg-tiny-sd" / "unet"))
    # the UNet folder holds the condensed chain's last run (the pixel loss at 10x over noun
    # phrases, from the first grounding run's last checkpoint, itself from the UNet run's), and
    # its manifest lists the three runs
    assert unet["iterations"] == 2 and "GROUNDING_PIXEL_WEIGHT: 0.5" in unet["config"]
    assert "GROUNDING_PIXEL_PHRASE: true" in unet["config"]
    assert "TEACHER_FORM_SHARE: 0.5" in unet["config"]
    before = runs / "unet_grounded_condensed" / "model_final.safetensors"
    assert "WEIGHTS: " + str(before) in unet["config"]
    chain = ("unet", "unet_grounded_condensed", "unet_grounded_condensed2")
    assert [r["output_dir"] for r in unet["training_runs"]] == [str(runs / r) for r in chain]
    assert unet["samples_seen"] == 3 * 2 * 4  # 2 iterations x the miniature's batch of 4
    for run in chain:
        assert (runs / run / "model_final.safetensors").is_file(), run
        assert not (runs / run / "latents.npy").exists(), run  # the chain shares one cache
        assert not (runs / run / "segments.npy").exists(), run  # and one of segments
    assert (runs / "unet_latents.npy").is_file() and "unet_latents.npy" in unet["config"]
    assert (runs / "unet_segments.npy").is_file() and "unet_segments.npy" in unet["config"]
    assert {f"{run}.log" for run in chain} <= set(os.listdir(logs))
