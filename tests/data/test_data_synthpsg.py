"""SynthPSG: determinism, every relation true under its rule (independent checker), consistency."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from spade.data import synthpsg
from spade.data.synthpsg import (
    OV_SPLIT,
    PALETTE,
    PREDICATE_CLASSES,
    STUFF_CLASSES,
    THING_CLASSES,
    ensure_synthpsg,
    generate_image,
    generate_synthpsg,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_same_seed_same_bytes_and_different_seed_differs():
    a, pa, ra = generate_image(5, 11)
    b, pb, rb = generate_image(5, 11)
    c, pc, _ = generate_image(6, 11)
    assert a.tobytes() == b.tobytes() and pa.tobytes() == pb.tobytes() and ra == rb
    assert a.tobytes() != c.tobytes() and pa.tobytes() != pc.tobytes()


def test_dataset_files_are_deterministic(tmp_path):
    generate_synthpsg(str(tmp_path / "a"), 4, seed=1)
    generate_synthpsg(str(tmp_path / "b"), 4, seed=1)
    for rel in ["psg.json", "images/000003.png", "panoptic/000002.png", "ov_split.json"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def _decode(path):
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _check_relation(s, o, p, masks, segs, image, size):
    """Independent re-derivation of one predicate from the PNG masks (and image colour)."""
    name = PREDICATE_CLASSES[p]
    nthing = sum(1 for g in segs if g["isthing"])
    assert segs[s]["isthing"], "subjects are things"
    cen = [np.argwhere(m).mean(0)[::-1] for m in masks]  # (x, y)
    if name == "on":
        stuff = STUFF_CLASSES[segs[o]["category_id"] - len(THING_CLASSES)]
        ys, xs = np.nonzero(masks[s])
        row = ys.max()
        return (
            stuff in ("ground", "grass", "floor")
            and row + 1 < size
            and masks[o][row + 1, xs[ys == row]].mean() >= 0.5
        )
    assert segs[o]["isthing"] and s != o
    dx, dy = cen[s] - cen[o]
    dist = np.hypot(dx, dy)
    cheb = ndimage.distance_transform_cdt(~masks[o], metric="chessboard")
    touching = cheb[masks[s]].min() <= 3
    if name == "left of":
        return dx < -size / 16
    if name == "right of":
        return dx > size / 16
    if name == "above":
        return dy < -size / 16
    if name == "below":
        return dy > size / 16
    if name == "next to":
        return touching
    if name == "far from":
        return dist > size / 3
    if name == "in front of":
        return s > o and touching
    if name == "nearest to":
        others = sorted(np.hypot(*(cen[s] - cen[k])) for k in range(nthing) if k != s)
        return nthing >= 3 and np.isclose(dist, others[0]) and dist < 0.9 * others[1]
    if name == "same colour as":
        pal = np.array(list(PALETTE.values()), dtype=np.float64)
        col = [np.argmin(((image[m].mean(0) - pal) ** 2).sum(1)) for m in (masks[s], masks[o])]
        return col[0] == col[1]
    raise AssertionError(name)


def test_every_relation_true_and_segments_consistent(synth_root):
    with open(os.path.join(synth_root, "psg.json")) as f:
        psg = json.load(f)
    assert psg["thing_classes"] == THING_CLASSES and psg["predicate_classes"] == PREDICATE_CLASSES
    assert set(psg["test_image_ids"]) == {str(i) for i in range(30) if i % 10 >= 8}
    assert set(psg["val_image_ids"]) == {str(i) for i in range(30) if i % 10 == 7}
    counts = np.zeros(len(PREDICATE_CLASSES), int)
    for rec in psg["data"]:
        ids = _decode(os.path.join(synth_root, rec["pan_seg_file_name"]))
        image = np.asarray(Image.open(os.path.join(synth_root, rec["file_name"]))).astype(float)
        segs = rec["segments_info"]
        assert set(np.unique(ids)) - {0} == {g["id"] for g in segs}
        masks = [ids == g["id"] for g in segs]
        for g, m, ann in zip(segs, masks, rec["annotations"]):
            ys, xs = np.nonzero(m)
            assert g["area"] == m.sum()
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert ann["category_id"] == g["category_id"]
            assert g["isthing"] == (g["category_id"] < len(THING_CLASSES))
        things = [g for g in segs if g["isthing"]]
        assert 2 <= len(things) <= 8 and all(g["area"] >= synthpsg.MIN_THING_AREA for g in things)
        rels = [tuple(r) for r in rec["relations"]]
        assert len(rels) == len(set(rels)) and len(rels) <= 8
        for s, o, p in rels:
            assert _check_relation(s, o, p, masks, segs, image, rec["width"]), (
                rec["image_id"],
                s,
                o,
                p,
            )
            counts[p] += 1
    assert (counts > 0).sum() >= 9, counts  # nearly every predicate occurs even in 30 images


def test_panopticapi_reads_it_and_scores_gt_against_itself(synth_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from panopticapi.evaluation import pq_compute

    from spade.data.datasets.psg import register_psg

    register_psg(
        "test_synth_all", os.path.join(synth_root, "psg.json"), synth_root, synth_root, "all"
    )
    try:
        DatasetCatalog.get("test_synth_all")
        meta = MetadataCatalog.get("test_synth_all")
        res = pq_compute(meta.panoptic_json, meta.panoptic_json, synth_root, synth_root)
    finally:
        DatasetCatalog.remove("test_synth_all")
        MetadataCatalog.remove("test_synth_all")
    assert res["All"]["pq"] == pytest.approx(1.0) and res["Stuff"]["n"] > 0


def test_ensure_is_idempotent_and_refuses_foreign_folders(tmp_path):
    root = str(tmp_path / "ds")
    assert ensure_synthpsg(root, 3, seed=2, size=64) == root
    stamp = os.path.getmtime(os.path.join(root, "psg.json"))
    ensure_synthpsg(root, 3, seed=2, size=64)
    assert os.path.getmtime(os.path.join(root, "psg.json")) == stamp
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".synthpsg-")]
    with pytest.raises(ValueError, match="num_images"):
        ensure_synthpsg(root, 4, seed=2, size=64)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="no complete SynthPSG"):
        ensure_synthpsg(str(other), 3)


def test_bad_parameters_and_split_file():
    with pytest.raises(ValueError, match="size"):
        generate_image(0, 0, size=16)
    with pytest.raises(ValueError, match="num_images"):
        generate_synthpsg("/nonexistent-never-written", 0)
    with open(os.path.join(REPO, "configs", "synthetic", "synthpsg_ov_split.json")) as f:
        assert json.load(f) == OV_SPLIT
    assert set(OV_SPLIT["base_predicates"]) | set(OV_SPLIT["novel_predicates"]) == set(
        PREDICATE_CLASSES
    )
    assert not set(OV_SPLIT["base_objects"]) & set(OV_SPLIT["novel_objects"])


def test_checker_rejects_false_relations(synth_root):
    """The independent checker is not vacuous: flipping left/right or above/below fails it."""
    with open(os.path.join(synth_root, "psg.json")) as f:
        psg = json.load(f)
    swap = {0: 1, 1: 0, 2: 3, 3: 2}
    checked = 0
    for rec in psg["data"]:
        ids = _decode(os.path.join(synth_root, rec["pan_seg_file_name"]))
        image = np.asarray(Image.open(os.path.join(synth_root, rec["file_name"]))).astype(float)
        masks = [ids == g["id"] for g in rec["segments_info"]]
        for s, o, p in rec["relations"]:
            if p in swap:
                args = (masks, rec["segments_info"], image, rec["width"])
                assert not _check_relation(s, o, swap[p], *args)
                checked += 1
    assert checked > 10


def test_command_line(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_synthetic_psg", os.path.join(REPO, "datasets", "make_synthetic_psg.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = str(tmp_path / "cli")
    cli.main(["--out", out, "--num-images", "2", "--seed", "4", "--size", "64"])
    assert "SynthPSG ready" in capsys.readouterr().out
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["size"] == 64
    assert Image.open(os.path.join(out, "images", "000001.png")).size == (64, 64)
    cli.main(["--out", out, "--num-images", "3", "--seed", "4", "--size", "64", "--overwrite"])
    assert "wrote 3 images" in capsys.readouterr().out
