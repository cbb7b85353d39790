"""Each stage-0 task trains, resumes, exports its standard format and loads through the loaders
the SD-1.5 / ViT-L-14 configs use; bad weight folders are clear errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from pretrain_helpers import make_args, tiny_cfg

from spade.config import add_spade_config
from spade.modeling.backbone.loading import build_clip, build_diffusion_parts, encode_text_tokens
from spade.pretrain import add_pretrain_config, run_pretraining, setup_pretrain_cfg
from spade.utils.manifest import read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = {
    t: os.path.join(ROOT, "configs", "pretrain", f"{t}_tiny.yaml") for t in ("clip", "vae", "unet")
}


def _spade_cfg(root, clip_name="SynthPSG-Tiny-CLIP"):
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.MODEL.SPADE.PRESET = "PRETRAINED"
    cfg.MODEL.SPADE.DIFFUSION.PRETRAINED = str(root / "sd")
    cfg.MODEL.SPADE.CLIP.MODEL_NAME = clip_name
    cfg.MODEL.SPADE.CLIP.PRETRAINED = str(root / "clip")
    return cfg


@pytest.fixture(scope="module")
def trained(stage0_root):
    for task in ("clip", "vae", "unet"):
        cfg, args = tiny_cfg(CFG[task], stage0_root, task, max_iter=2)
        run_pretraining(cfg, args)
    return stage0_root


def _pretrain_cfg(name: str):
    cfg = get_cfg()
    add_pretrain_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "pretrain", name))
    return cfg


def test_setup_logs_spade_messages_to_the_output_folder(tmp_path):
    """The export and gate messages (spade.* loggers) reach OUTPUT_DIR/log.txt and the console,
    as detectron2's own do: the gates are printed by the run, not only stored in the manifest."""
    import logging

    out = tmp_path / "out"
    args = make_args(CFG["vae"], ["OUTPUT_DIR", str(out), "SEED", "0"])
    setup_pretrain_cfg(args, do_default_setup=True)
    logging.getLogger("spade.pretrain.run").info("gates of %s: 27.45 dB", "folder-x")
    for handler in logging.getLogger("spade").handlers:
        handler.flush()
    log = (out / "log.txt").read_text()
    assert "spade.pretrain.run INFO: gates of folder-x: 27.45 dB" in log
    assert (out / "config.yaml").is_file()  # detectron2's default_setup ran too


def test_every_config_merges():
    folder = os.path.join(ROOT, "configs", "pretrain")
    names = [n for n in os.listdir(folder) if n.endswith(".yaml") and n != "Base-Pretrain.yaml"]
    names += [os.path.join("gpu", n) for n in os.listdir(os.path.join(folder, "gpu"))]
    assert len(names) >= 10
    for name in names:
        assert _pretrain_cfg(name).PRETRAIN.TASK in ("clip", "vae", "unet"), name


UNET_CHAINS = {  # PRETRAIN_UNET_RUNS: the shipped UNet's chain (default), the one before it
    "condensed": ["unet_tiny_grounded_condensed", "unet_tiny_grounded_condensed2"],
    "five": ["unet_tiny_grounded", "unet_tiny_grounded2", "unet_tiny_grounded3",
             "unet_tiny_grounded4", "unet_tiny_grounded5"],
}  # fmt: skip


def _make_pretrain_runs(*make_args):
    """`make -n pretrain` (prints the recipe without running it): {config name: its command}."""
    import subprocess

    out = subprocess.run(
        ["make", "-n", "pretrain", *make_args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    parts = out.split("--config-file configs/pretrain/")[1:]
    return {part.split()[0]: part.split("&&")[0] for part in parts}


def test_continuation_configs_start_from_the_run_they_continue():
    """`make pretrain` chains these runs: each continuation loads the last checkpoint of the run
    before it, and writes its own folder (a resumed chain never mixes two runs' checkpoints)."""
    chain = {"clip_tiny_region.yaml": "clip_tiny.yaml", "vae_tiny_decoder.yaml": "vae_tiny.yaml"}
    for runs in UNET_CHAINS.values():
        names = [f"{n}.yaml" for n in ["unet_tiny"] + runs]
        chain.update(zip(names[1:], names[:-1]))
    outputs = set()
    for name, before in chain.items():
        cfg, prev = _pretrain_cfg(name), _pretrain_cfg(before)
        assert cfg.MODEL.WEIGHTS == f"{prev.OUTPUT_DIR}/model_final.safetensors", name
        assert cfg.OUTPUT_DIR != prev.OUTPUT_DIR and cfg.OUTPUT_DIR not in outputs, name
        assert cfg.PRETRAIN.EXPORT_DIR == prev.PRETRAIN.EXPORT_DIR, name  # exports over it
        if cfg.PRETRAIN.TASK == "unet":  # the chain encodes and renders the corpus once
            assert cfg.PRETRAIN.UNET.LATENT_CACHE == "output/pretrain/unet_latents.npy", name
            assert cfg.PRETRAIN.UNET.SEGMENT_CACHE == "output/pretrain/unet_segments.npy", name
        outputs.add(cfg.OUTPUT_DIR)
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    assert "PRETRAIN_MID := $(if $(filter all,$(PRETRAIN_GATES)),,--skip-gates)" in makefile


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize("chain", sorted(UNET_CHAINS))
def test_make_pretrain_runs_the_unet_chain_in_order(chain):
    """The shipped UNet's condensed chain by default, the five runs of the one before with
    PRETRAIN_UNET_RUNS; gates only on each model's final export (the runs a later run continues
    skip theirs)."""
    opts = [] if chain == "condensed" else ["PRETRAIN_UNET_RUNS=" + " ".join(UNET_CHAINS[chain])]
    runs = _make_pretrain_runs(*opts)
    unet = [n for n in runs if n.startswith("unet_tiny")]
    assert unet == [f"{n}.yaml" for n in ["unet_tiny"] + UNET_CHAINS[chain]]
    assert list(runs)[:4] == ["clip_tiny.yaml", "clip_tiny_region.yaml", "vae_tiny.yaml",
                              "vae_tiny_decoder.yaml"]  # fmt: skip
    last = {"clip_tiny_region.yaml", "vae_tiny_decoder.yaml", unet[-1]}
    for name, command in runs.items():
        assert ("--skip-gates" in command) == (name not in last), name
        assert "--resume" in command and "SOLVER.AMP.ENABLED True" in command, name


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_pretrain_passes_unet_opts_to_the_first_unet_run_only():
    """`make pretrain PRETRAIN_UNET_OPTS=...` (the shorter chain of MODEL_ZOO.md) changes the
    UNet's first run and no other."""
    runs = _make_pretrain_runs("PRETRAIN_UNET_OPTS=SOLVER.MAX_ITER 1500")
    assert "SOLVER.MAX_ITER 1500" in runs["unet_tiny.yaml"]
    assert "--skip-gates" in runs["unet_tiny.yaml"]
    others = [n for n in runs if n != "unet_tiny.yaml"]
    assert len(others) == 6 and not any("MAX_ITER" in runs[n] for n in others), others


def test_exports_have_the_real_formats_and_manifests(trained):
    clip_dir, sd = trained / "clip", trained / "sd"
    assert sorted(os.listdir(clip_dir)) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "spade_manifest.json",
    ]
    for sub in ("vae", "unet"):
        assert {"config.json", "diffusion_pytorch_model.safetensors"} <= set(os.listdir(sd / sub))
    assert json.load(open(sd / "scheduler" / "scheduler_config.json"))["beta_schedule"] == (
        "scaled_linear"
    )
    index = json.load(open(sd / "model_index.json"))
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    manifest = read_manifest(str(sd / "unet"))
    assert manifest["iterations"] == 2 and manifest["task"] == "unet"
    assert manifest["corpus"]["generator_seed"] == 1_000_000
    assert read_manifest(str(clip_dir))["model_name"] == "SynthPSG-Tiny-CLIP"


def test_exports_load_through_the_standard_loaders(trained):
    cfg = _spade_cfg(trained)
    clip = build_clip(cfg)
    diffusion = build_diffusion_parts(cfg)
    states = encode_text_tokens(clip, ["a red circle is left of a blue square"])
    assert states.shape == (1, 77, 32) and diffusion.unet.config.cross_attention_dim == 32
    vae_manifest = read_manifest(str(trained / "sd" / "vae"))
    assert diffusion.latent_scale == pytest.approx(vae_manifest["latent_scale"])
    assert diffusion.latent_scale != pytest.approx(1.0)
    latent = torch.zeros(1, 4, 16, 16)
    t = torch.tensor([10])
    assert diffusion.unet(latent, t, encoder_hidden_states=states).sample.shape == latent.shape


def test_unet_exported_to_another_folder_gets_its_vae(trained, tmp_path):
    """EXPORT_DIR other than the VAE's folder: the export copies the VAE it was trained on, so
    the folder loads as a complete SD folder; an existing vae/ there is kept."""
    import filecmp

    out = tmp_path / "sd_experiment"
    extra = ["PRETRAIN.EXPORT_DIR", str(out), "OUTPUT_DIR", str(tmp_path / "out_unet")]
    cfg, args = tiny_cfg(CFG["unet"], trained, "unet", max_iter=1, extra=extra)
    run_pretraining(cfg, args)
    vae_files = sorted(os.listdir(trained / "sd" / "vae"))
    assert sorted(os.listdir(out / "vae")) == vae_files
    for name in vae_files:
        assert filecmp.cmp(out / "vae" / name, trained / "sd" / "vae" / name, shallow=False)
    spade_cfg = _spade_cfg(trained)
    spade_cfg.MODEL.SPADE.DIFFUSION.PRETRAINED = str(out)
    diffusion = build_diffusion_parts(spade_cfg)
    assert read_manifest(str(out / "unet"))["iterations"] == 1
    assert diffusion.latent_scale == pytest.approx(
        read_manifest(str(trained / "sd" / "vae"))["latent_scale"]
    )
    marker = out / "vae" / "kept.txt"
    marker.write_text("x")
    run_pretraining(cfg, args)  # a second export keeps the vae/ already there
    assert marker.read_text() == "x"


def test_unet_takes_the_latent_channels_of_its_vae(trained, tmp_path):
    """A VAE with 16 latent channels (the lever MODEL_ZOO.md measured for the PSNR gate): the UNet
    pretrained on it is built with 16 in/out channels and the folder loads as an SD folder."""
    sd16 = tmp_path / "sd16"
    vae_extra = ["PRETRAIN.VAE.LATENT_CHANNELS", "16", "PRETRAIN.EXPORT_DIR", str(sd16)]
    vae_extra += ["OUTPUT_DIR", str(tmp_path / "out_vae16")]
    run_pretraining(*tiny_cfg(CFG["vae"], trained, "vae", max_iter=1, extra=vae_extra))
    unet_extra = ["PRETRAIN.UNET.VAE", str(sd16), "PRETRAIN.EXPORT_DIR", str(sd16)]
    unet_extra += ["OUTPUT_DIR", str(tmp_path / "out_unet16")]
    run_pretraining(*tiny_cfg(CFG["unet"], trained, "unet", max_iter=1, extra=unet_extra))
    cfg = _spade_cfg(trained)
    cfg.MODEL.SPADE.DIFFUSION.PRETRAINED = str(sd16)
    diffusion = build_diffusion_parts(cfg)
    assert diffusion.vae.config.latent_channels == 16
    assert diffusion.unet.config.in_channels == diffusion.unet.config.out_channels == 16
    latent = diffusion.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latent.shape == (1, 16, 32, 32)
    states = encode_text_tokens(build_clip(cfg), ["a red circle"])
    out = diffusion.unet(latent, torch.tensor([10]), encoder_hidden_states=states).sample
    assert out.shape == latent.shape


def test_unet_run_fills_its_latent_cache_before_training(trained, tmp_path):
    """PRETRAIN.UNET.FILL_LATENT_CACHE: a pass of its own encodes the first NUM_IMAGES corpus images
    before the first step; off, only the images of the steps run (one step of 4) are encoded."""
    for fill, num_images, want in (("True", 0, 24), ("True", 10, 10), ("False", 0, 4)):
        out = tmp_path / f"out_{fill}_{num_images}"
        extra = [
            "PRETRAIN.UNET.FILL_LATENT_CACHE",
            fill,
            "PRETRAIN.UNET.NUM_IMAGES",
            str(num_images),
        ]
        extra += ["OUTPUT_DIR", str(out), "PRETRAIN.EXPORT_DIR", str(tmp_path / f"sd_{fill}")]
        run_pretraining(*tiny_cfg(CFG["unet"], trained, "unet", max_iter=1, extra=extra))
        done = np.load(out / "latents.npy.done")
        assert done.shape == (24,) and int(done.sum()) == want, (fill, num_images)
        if num_images:
            assert done[:num_images].all()


def test_a_continuation_manifest_lists_the_whole_chain(trained, tmp_path, caplog):
    """A run that starts from the weights of the run whose export it replaces (the `make pretrain`
    chain) lists every run in its manifest, with the samples seen summed; a run from scratch into
    the same folder is a chain of one; an unreadable old manifest is a warning, not a lost
    export."""
    sd = tmp_path / "sd_chain"
    runs = {"a": ("", 1), "b": (str(tmp_path / "a" / "model_final.safetensors"), 2)}
    for name, (weights, iters) in runs.items():
        extra = ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / name)]
        extra += ["PRETRAIN.EXPORT_DIR", str(sd)]
        run_pretraining(*tiny_cfg(CFG["unet"], trained, "unet", max_iter=iters, extra=extra))
    manifest = read_manifest(str(sd / "unet"))
    chain = manifest["training_runs"]
    assert [r["output_dir"] for r in chain] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert [r["weights_from"] for r in chain] == ["", runs["b"][0]]
    assert [r["iterations"] for r in chain] == [1, 2] and manifest["iterations"] == 2
    assert manifest["samples_seen"] == (1 + 2) * 4  # SOLVER.IMS_PER_BATCH 4 in both
    walls = [r["wall_time_s"] for r in chain]
    assert manifest["chain_wall_time_s"] == pytest.approx(sum(walls), abs=0.1)
    assert chain[1]["wall_time_s"] == manifest["wall_time_s"] and all(w > 0 for w in walls)

    (sd / "unet" / "spade_manifest.json").write_text("{not json")
    extra = ["OUTPUT_DIR", str(tmp_path / "c"), "PRETRAIN.EXPORT_DIR", str(sd)]
    extra += ["MODEL.WEIGHTS", str(tmp_path / "b" / "model_final.safetensors")]
    with caplog.at_level("WARNING", logger="spade.pretrain.run"):
        run_pretraining(*tiny_cfg(CFG["unet"], trained, "unet", max_iter=1, extra=extra))
    assert "not a readable JSON manifest" in caplog.text
    manifest = read_manifest(str(sd / "unet"))
    assert manifest["iterations"] == 1 and "training_runs" not in manifest


def test_chain_training_runs_by_hand():
    """The previous export's run is continued only when MODEL.WEIGHTS lies in its OUTPUT_DIR; a
    manifest that already lists a chain is extended."""
    from spade.pretrain.tasks import chain_training_runs

    def info(out, weights, iters, wall):
        config = f"MODEL:\n  WEIGHTS: {weights}\nOUTPUT_DIR: {out}\n"
        return {"config": config, "iterations": iters, "batch_size": 32, "wall_time_s": wall}

    one = info("runs/one", "", 3000, 100.0)
    two = info("runs/two", "runs/one/model_final.safetensors", 1000, 50.0)
    chained = chain_training_runs(two, dict(one, files={}), "runs/one/model_final.safetensors")
    assert [r["output_dir"] for r in chained["training_runs"]] == ["runs/one", "runs/two"]
    assert chained["samples_seen"] == 4000 * 32 and chained["chain_wall_time_s"] == 150.0
    three = info("runs/three", "runs/two/model_0000499.safetensors", 800, 25.5)
    again = chain_training_runs(three, chained, "runs/two/model_0000499.safetensors")
    assert [r["iterations"] for r in again["training_runs"]] == [3000, 1000, 800]
    assert again["samples_seen"] == 4800 * 32 and again["chain_wall_time_s"] == 175.5
    # not a continuation of that export: from scratch, from elsewhere, or no export before
    for weights in ("", "elsewhere/model_final.safetensors", "runs/one_b/model_final.safetensors"):
        assert chain_training_runs(two, one, weights) is two
    assert chain_training_runs(two, None, "runs/one/model_final.safetensors") is two
    assert chain_training_runs(two, {"config": ": : :"}, "x/model_final.safetensors") is two


def test_resume_continues_from_the_last_checkpoint(trained):
    cfg, args = tiny_cfg(CFG["vae"], trained, "vae", max_iter=3, resume=True)
    run_pretraining(cfg, args)
    manifest = read_manifest(str(trained / "sd" / "vae"))
    assert manifest["iterations"] == 3
    log = [json.loads(line) for line in open(trained / "out_vae" / "metrics.json")]
    assert [row["iteration"] for row in log if "total_loss" in row][-1] == 2


def test_amp_on_the_cpu_trains_in_bf16_resumes_and_keeps_fp32_checkpoints(trained, tmp_path):
    from detectron2.engine import SimpleTrainer
    from safetensors import safe_open

    from spade.engine import LossGuard
    from spade.pretrain.engine import PretrainTrainer
    from spade.pretrain.tasks import training_info

    def trainer_for(max_iter):
        extra = ["SOLVER.AMP.ENABLED", "True", "OUTPUT_DIR", str(tmp_path / "out")]
        cfg, _ = tiny_cfg(CFG["vae"], trained, "vae", max_iter=max_iter, extra=extra)
        return cfg, PretrainTrainer(cfg)

    cfg, trainer = trainer_for(2)
    assert type(trainer._trainer) is SimpleTrainer  # detectron2's AMPTrainer needs CUDA
    assert isinstance(trainer.model, LossGuard) and trainer.model.autocast_dtype == torch.bfloat16
    vae = trainer.unwrapped_model()
    dtypes = []
    vae.vae.encoder.conv_in.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert dtypes == [torch.bfloat16, torch.bfloat16] and trainer.iter == 2
    assert training_info(cfg, trainer)["precision"] == "bf16 autocast"

    def weights(path):
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k).dtype for k in f.keys()}

    ours, fp32_run = (
        weights(tmp_path / "out" / "model_final.safetensors"),
        weights(trained / "out_vae" / "model_final.safetensors"),
    )
    assert ours == fp32_run and set(ours.values()) == {torch.float32}
    _, resumed = trainer_for(3)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    assert resumed.iter == 3


def test_clip_name_mismatch_is_an_error(trained):
    with pytest.raises(ValueError, match="MODEL.SPADE.CLIP.MODEL_NAME='Other'.*records"):
        build_clip(_spade_cfg(trained, clip_name="Other"))
    with pytest.raises(ValueError, match="is an open_clip model whose config differs"):
        build_clip(_spade_cfg(trained, clip_name="ViT-L-14"))


def test_corrupt_or_missing_weights_are_errors_naming_file_and_key(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained / "sd", copy / "sd")
    shutil.copytree(trained / "clip", copy / "clip")
    weights = copy / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"MODEL.SPADE.DIFFUSION.PRETRAINED: .*unet.*corrupt"):
        build_diffusion_parts(_spade_cfg(copy))
    os.remove(copy / "clip" / "open_clip_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"MODEL.SPADE.CLIP.PRETRAINED: .*missing"):
        build_clip(_spade_cfg(copy))
    os.remove(copy / "clip" / "open_clip_config.json")
    with pytest.raises(FileNotFoundError, match="without open_clip_config.json"):
        build_clip(_spade_cfg(copy))


def test_teacher_text_is_padded_with_the_end_of_text_token_as_sd():
    cfg = get_cfg()
    add_spade_config(cfg)  # the random TINY CLIP: only the tokenizer matters here
    from spade.modeling.backbone.loading import sd_tokenize

    clip = build_clip(cfg)
    tokens = sd_tokenize(clip, ["circle is left of square"])[0]
    assert tokens[0] == 49406  # start of text
    words = clip.tokenizer.encode("circle is left of square")
    assert tokens[1 : 1 + len(words)].tolist() == words
    assert (tokens[1 + len(words) :] == 49407).all()  # end of text, then its padding


def test_shipped_model_paths_resolve_from_any_working_directory(tmp_path, monkeypatch):
    from spade.modeling.backbone.loading import resolve_weights_path

    monkeypatch.chdir(tmp_path)
    assert resolve_weights_path("models/synthpsg-tiny-sd") == os.path.join(
        ROOT, "models", "synthpsg-tiny-sd"
    )
    assert (
        resolve_weights_path("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    )
    assert resolve_weights_path("") == ""


def test_name_separation_by_hand():
    """Names whose embeddings coincide are found; the template mean is taken before comparing."""
    import torch.nn.functional as F

    from spade.pretrain.gates_clip import name_separation

    table = {
        "a x.": [1.0, 0.0, 0.0],
        "the x": [1.0, 0.0, 0.0],
        "a y.": [0.0, 1.0, 0.0],
        "the y": [0.0, 0.0, 1.0],  # y's mean: (0, 1, 1) / sqrt 2
        "a z.": [0.6, 0.8, 0.0],
        "the z": [0.6, 0.8, 0.0],
    }
    encode = lambda texts: F.normalize(torch.tensor([table[t] for t in texts]), dim=-1)
    out = name_separation(encode, ["x", "y", "z"], ["a {}.", "the {}"])
    # cos(x, z) = 0.6, cos(y, z) = 0.8 / sqrt 2 = 0.566, cos(x, y) = 0
    assert out["clip/name_max_cosine"] == pytest.approx(0.6, abs=1e-4)
    assert out["clip/name_closest_pair"] == ["x", "z"]


def test_naming_by_class_by_hand():
    """Hits, count and the most frequent wrong name per class; a tie goes to the first given."""
    from spade.pretrain.gates_clip import naming_by_class

    named = {
        "star": ["star", "star", "ring"],
        "diamond": ["hexagon", "square", "hexagon", "diamond"],
        "hexagon": ["circle", "diamond", "diamond", "circle"],
        "floor": ["floor"],
    }
    assert naming_by_class(named) == {
        "diamond": [1, 4, "hexagon"],
        "floor": [1, 1, None],
        "hexagon": [0, 4, "circle"],
        "star": [2, 3, "ring"],
    }
    assert list(naming_by_class(named)) == ["diamond", "floor", "hexagon", "star"]
    assert naming_by_class({}) == {}


def test_token_state_neighbours_by_hand():
    """Each name's tokens are averaged, the mean over names is removed, and a thing whose nearest
    name is stuff is counted. Things a, b (b has two tokens), stuff s, t; every token's state is
    its own vector at any position, so both slots agree. Word vectors: a (1, 0.2), b = mean of
    (-1, 0.4) and (-1, 0) = (-1, 0.2), s (1, -0.2), t (-1, -0.2): their mean is 0, and
    cos(a, s) = cos(b, t) = 0.96 / 1.04, cos(a, b) = -0.96 / 1.04, cos(a, t) = -1."""
    from spade.pretrain.gates_clip import token_state_neighbours

    ids = {"a": [1], "b": [2, 3], "s": [4], "t": [5], "circle": [6], "is": [7], "left": [8]}
    ids["of"] = [9]
    vec = {1: (1.0, 0.2), 2: (-1.0, 0.4), 3: (-1.0, 0.0), 4: (1.0, -0.2), 5: (-1.0, -0.2)}

    def encode_ids(text):
        return [i for w in text.split() for i in ids[w]]

    def encode_states(prompts):
        rows = [[(0.0, 0.0)] + [vec.get(i, (0.0, 0.0)) for i in encode_ids(p)] for p in prompts]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [(0.0, 0.0)] * (width - len(r)) for r in rows])

    out = token_state_neighbours(encode_states, encode_ids, ["a", "b", "s", "t"], num_things=2)
    near = out["clip/token_neighbours"]
    assert set(near) == {"subject", "object"} and near["subject"] == near["object"]
    assert near["subject"]["a"] == ["s", pytest.approx(0.96 / 1.04, abs=1e-4)]
    assert near["subject"]["b"] == ["t", pytest.approx(0.96 / 1.04, abs=1e-4)]
    assert near["subject"]["s"][0] == "a" and near["subject"]["t"][0] == "b"
    assert out["clip/token_things_nearest_stuff"] == {"subject": 2, "object": 2}
    # b moved to (1, 0.3) = mean of (1, 0.6) and (1, 0), s to (-1, 0), t to (-1, -0.5): the mean is
    # 0 and a, b are each other's nearest, cos = 1.06 / (sqrt 1.04 sqrt 1.09) = 0.99560
    vec.update({2: (1.0, 0.6), 3: (1.0, 0.0), 4: (-1.0, 0.0), 5: (-1.0, -0.5)})
    out = token_state_neighbours(encode_states, encode_ids, ["a", "b", "s", "t"], num_things=2)
    assert out["clip/token_neighbours"]["object"]["a"] == ["b", pytest.approx(0.9956, abs=1e-4)]
    assert out["clip/token_things_nearest_stuff"] == {"subject": 0, "object": 0}
