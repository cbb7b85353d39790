"""Teacher maps, their cache, L_cal and the student."""

import os

import pytest
import torch
from calibration_helpers import tiny_calibration_cfg, write_image

from spade.calibration.builder import build_teacher_cache
from spade.calibration.model import CalibrationModel, calibration_loss
from spade.calibration.teacher import triplet_names

TRIPLETS = [("circle", "left of", "red square"), ("star", "above", "circle")]


def test_calibration_loss_hand_values():
    a = torch.zeros(1, 3, 2, 2)
    assert calibration_loss(a, a.clone()).item() == 0.0
    b = a.clone()
    b[0, 0, 0, 0], b[0, 2, 1, 1] = 1.0, -0.5
    # mean |a - b| = 1.5 / 12 = 0.125; lambda = 2
    assert calibration_loss(a, b, lam=2.0).item() == pytest.approx(0.25)
    empty = torch.zeros(0, 3, 2, 2, requires_grad=True)
    loss = calibration_loss(empty, empty)
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="differ in shape"):
        calibration_loss(a, torch.zeros(2, 3, 2, 2))


def test_triplet_names():
    record = {
        "image_id": "3",
        "file_name": "x.png",
        "segments_info": [{"category_id": 0}, {"category_id": 2}],
        "relations": [[0, 1, 1], [1, 0, 0]],
    }
    classes, preds = ["circle", "square", "sky"], ["left of", "above"]
    assert triplet_names(record, classes, preds, 1) == [("circle", "above", "sky")]
    assert triplet_names(dict(record, relations=[]), classes, preds, 4) == []
    with pytest.raises(ValueError, match="image 3"):
        triplet_names(dict(record, relations=[[0, 5, 0]]), classes, preds, 4)


@pytest.fixture(scope="module")
def model_and_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = tiny_calibration_cfg(str(tmp))
    cfg.MODEL.SPADE.LORA.INIT_WEIGHTS = False  # non-zero LoRA: the student differs from the teacher
    model = CalibrationModel(cfg)
    return model, build_teacher_cache(cfg, model), tmp


def test_teacher_cache_compute_load_corrupt_stale(model_and_cache):
    model, cache, tmp = model_and_cache
    record = {"file_name": write_image(str(tmp / "img.png")), "image_id": "img/1"}
    calls = []
    real = cache.generator

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, *a, **k):
            calls.append(1)
            return real(*a, **k)

    cache.generator = Counting()
    try:
        maps = cache.get(record, TRIPLETS)
        r = model.teacher.resolution
        assert maps.shape == (2, 3, r, r) and torch.isfinite(maps).all()
        assert torch.allclose(maps.flatten(-2).amax(-1), torch.ones(2, 3))  # "max" normalised
        path = cache.path("img/1")
        assert os.path.basename(path) == "img_1.safetensors" and os.path.isfile(path)
        assert torch.equal(cache.get(record, TRIPLETS), maps) and len(calls) == 1  # cached
        with open(path, "wb") as f:
            f.write(b"\x00garbage, not a safetensors file")
        again = cache.get(record, TRIPLETS)  # corrupt -> recomputed, deterministic
        assert len(calls) == 2 and torch.allclose(again, maps, atol=1e-6)
        assert torch.equal(cache.get(record, TRIPLETS), again) and len(calls) == 2
        other = cache.get(record, TRIPLETS[:1])  # other prompts -> stale key -> recomputed
        assert len(calls) == 3 and torch.allclose(other, maps[:1], atol=1e-5)
        assert cache.get(record, []).shape == (0, 3, r, r)
        assert cache.precompute([(record, TRIPLETS)] * 3, rank=1, world_size=2) == 1
    finally:
        cache.generator = real
    with pytest.raises(OSError, match="missing.png"):
        cache.get({"file_name": str(tmp / "missing.png"), "image_id": "9"}, TRIPLETS)


def test_teacher_ignores_lora_and_student_trains_only_lora_and_adapter(model_and_cache):
    model, cache, tmp = model_and_cache
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    teacher = model.teacher(image[0], TRIPLETS)
    # the teacher runs with LoRA disabled: removing the LoRA effect changes nothing
    lora = [p for n, p in model.unet.named_parameters() if "lora_B" in n]
    saved = [p.detach().clone() for p in lora]
    with torch.no_grad():
        for p in lora:
            p.zero_()
    assert torch.allclose(model.teacher(image[0], TRIPLETS), teacher, atol=1e-6)
    with torch.no_grad():
        for p, s in zip(lora, saved):
            p.copy_(s)
    batch = [
        {"image": image[0], "triplets": TRIPLETS, "teacher_maps": teacher, "image_id": "a"},
        {
            "image": image[0],
            "triplets": [],
            "teacher_maps": torch.zeros(0, 3, 8, 8),
            "image_id": "b",
        },
    ]
    loss = model(batch)["loss_cal"]
    assert loss.item() > 0
    model.zero_grad()
    loss.backward()
    with_grad = {
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert with_grad and all(
        ".lora_" in n or n.startswith("implicit_text.adapter") for n in with_grad
    )
    assert any(n.startswith("implicit_text.adapter") for n in with_grad)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or "adapter" in n}
    with pytest.raises(ValueError, match="image a"):
        model([dict(batch[0], teacher_maps=teacher[:1])])


def test_ablation_switches_random_noise_and_ddim(model_and_cache):
    model, _, _ = model_and_cache
    gen = model.teacher
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    base = gen(image, TRIPLETS)
    try:
        gen.noise = "random"
        rand_a, rand_b = gen(image, TRIPLETS, seed=1), gen(image, TRIPLETS, seed=2)
        assert torch.equal(gen(image, TRIPLETS, seed=1), rand_a)  # seeded
        assert not torch.allclose(rand_a, rand_b) and not torch.allclose(rand_a, base)
        gen.noise, gen.inversion, gen.sampler = "inversion", "ddim", "ddim"
        ddim = gen(image, TRIPLETS)
        assert ddim.shape == base.shape and not torch.allclose(ddim, base)
        gen.inversion, gen.sampler, gen.guidance_scale = "belm", "belm", 3.0
        guided = gen(image, TRIPLETS)  # classifier-free guidance: maps of the conditional pass
        assert torch.isfinite(guided).all() and not torch.allclose(guided, base)
    finally:
        gen.noise, gen.inversion, gen.sampler = "inversion", "belm", "belm"
        gen.guidance_scale = 1.0


def test_full_finetuning_ablation_trains_whole_unet(tmp_path):
    cfg = tiny_calibration_cfg(str(tmp_path))
    cfg.MODEL.SPADE.LORA.ENABLED = False
    model = CalibrationModel(cfg)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".lora_" in n for n in names)
    unet_names = {n for n in names if n.startswith("unet.")}
    assert unet_names == {f"unet.{n}" for n, _ in model.unet.named_parameters()}
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))
    teacher = model.teacher(image, TRIPLETS[:1])
    loss = model([{"image": image, "triplets": TRIPLETS[:1], "teacher_maps": teacher}])["loss_cal"]
    # the student (UNet + implicit tokens in the context) differs from the teacher (prompt only)
    assert loss.item() > 0
    gen = model.teacher
    with pytest.raises(ValueError, match="CALIBRATION.NOISE"):  # checked before anything is built
        type(gen)(
            unet=gen.unet,
            vae=gen.vae,
            latent_scale=1.0,
            scheduler=None,
            encode_text=gen.encode_text,
            encode_ids=gen.encode_ids,
            context_length=77,
            num_steps=3,
            noise="zeros",
        )
    with pytest.raises(ValueError, match="CAPTURE_TIMESTEPS"):
        type(gen)(
            unet=gen.unet,
            vae=gen.vae,
            latent_scale=1.0,
            scheduler=None,
            encode_text=gen.encode_text,
            encode_ids=gen.encode_ids,
            context_length=77,
            num_steps=3,
            capture_steps=[4],
        )


def test_teacher_prompts_use_the_text_classifiers_display_names(tmp_path):
    model = CalibrationModel(tiny_calibration_cfg(str(tmp_path)))
    triplet = ("floor-other-merged", "sitting_on", "wall-other-merged")
    assert model.teacher.prompts([triplet]) == ["floor is sitting on wall"]
    spans = model.teacher.spans([triplet])[0]
    encode = model.teacher.encode_ids
    assert len(spans["subject"]) == len(encode("floor"))
    assert len(spans["object"]) == len(encode("wall"))
    assert len(spans["predicate"]) == len(encode("sitting on"))


def test_student_maps_from_implicit_token_slots(tmp_path):
    cfg = tiny_calibration_cfg(str(tmp_path))
    cfg.MODEL.SPADE.LORA.INIT_WEIGHTS = False
    prompt_model = CalibrationModel(cfg)
    cfg.CALIBRATION.STUDENT_MAPS = "implicit_tokens"
    model = CalibrationModel(cfg)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    triplets = [TRIPLETS, TRIPLETS[:1]]
    maps = model.student_maps(images, triplets)
    r = model.teacher.resolution
    assert maps.shape == (3, 3, r, r) and torch.isfinite(maps).all()
    assert not torch.allclose(maps, prompt_model.student_maps(images, triplets))
    # the two triplets of image 0 share its slot maps but read them with other words
    assert not torch.allclose(maps[0], maps[1])
    maps.sum().backward()
    lora = [p.grad for n, p in model.unet.named_parameters() if ".lora_" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in lora)
    assert all(p.grad is not None for p in model.implicit_text.adapter.parameters())
    cfg.CALIBRATION.STUDENT_MAPS = "words"
    with pytest.raises(ValueError, match="CALIBRATION.STUDENT_MAPS = 'words'"):
        CalibrationModel(cfg)
