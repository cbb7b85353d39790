"""Panoptic overlay, scene-graph drawing and triplet JSON on hand-made predictions."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from spade.utils.canvas import display_scale
from spade.utils.scene_graph_drawing import edge_labels, node_positions
from spade.utils.scene_graph_view import default_class_colors, prepare_scene_graph
from spade.utils.visualizer import SceneGraphVisualizer, draw_panoptic_overlay

CLASSES = ["square", "circle", "ground"]
PREDICATES = ["left of", "right of", "above"]
H, W = 96, 128


def _example():
    """A 96 x 128 image: a square (id 1), a circle (id 2), ground stuff (id 3), void elsewhere;
    4 triplets given out of score order."""
    image = np.zeros((H, W, 3), np.uint8)
    image[:] = (100, 150, 201)
    seg = np.zeros((H, W), np.int32)
    seg[50:, :] = 3
    seg[10:40, 10:40] = 1
    yy, xx = np.mgrid[:H, :W]
    seg[(yy - 30) ** 2 + (xx - 90) ** 2 < 15**2] = 2
    info = [
        {"id": 1, "category_id": 0, "isthing": True, "score": 0.9},
        {"id": 2, "category_id": 1, "isthing": True, "score": 0.8},
        {"id": 3, "category_id": 2, "isthing": False, "score": 0.7},
    ]
    relations = {
        "triplets": torch.tensor([[1, 3, 2], [1, 2, 0], [2, 3, 2], [2, 1, 1]]),
        "scores": torch.tensor([0.6, 0.9, 0.5, 0.8]),
        "predicate_scores": torch.tensor(
            [[0.1, 0.2, 0.6], [0.9, 0.05, 0.05], [0.2, 0.1, 0.5], [0.1, 0.8, 0.1]]
        ),
    }
    return image, {"panoptic_seg": (torch.from_numpy(seg), info), "relations": relations}


def test_display_scale():
    assert display_scale(96, 128, 384, 1600) == 4
    assert display_scale(512, 512, 384, 1600) == 1
    assert display_scale(100, 1000, 384, 1600) == 1  # 4x would make the long side 4000 > 1600


def test_prepare_resolves_names_geometry_and_ranks():
    image, pred = _example()
    view = prepare_scene_graph(pred, CLASSES, PREDICATES, image_shape=(H, W), image_name="ex.png")
    square = view.segment(1)
    assert (square.label, square.area, square.bbox) == ("square", 900, [10, 10, 40, 40])
    assert square.centroid == (24.5, 24.5)
    assert square.color == (0, 114, 189)  # detectron2 colormap entry 0 (0.000, 0.447, 0.741)
    assert view.segment(3).area == 46 * 128
    assert [t.score for t in view.triplets] == pytest.approx([0.9, 0.8, 0.6, 0.5])
    first = view.triplets[0]
    assert (first.rank, first.subject_id, first.predicate, first.object_id) == (1, 1, "left of", 2)
    assert first.top_predicates[0] == ("left of", pytest.approx(0.9))
    assert len(prepare_scene_graph(pred, CLASSES, PREDICATES, top_k=2).triplets) == 2
    kept = prepare_scene_graph(pred, CLASSES, PREDICATES, score_threshold=0.55).triplets
    assert [t.rank for t in kept] == [1, 2, 3]


def test_repeated_class_gets_numbered_labels_and_distinct_colours():
    seg = np.zeros((8, 8), np.int64)
    seg[:, :4], seg[:, 4:] = 5, 7
    info = [{"id": 5, "category_id": 1}, {"id": 7, "category_id": 1}]
    view = prepare_scene_graph({"panoptic_seg": (seg, info)}, CLASSES, PREDICATES)
    a, b = view.segments
    assert (a.label, b.label) == ("circle#1", "circle#2")
    assert a.color == default_class_colors(3)[1] and b.color != a.color
    assert not view.has_relations and view.triplets == []


def test_save_writes_three_files_with_right_sizes_colours_and_json(tmp_path):
    image, pred = _example()
    vis = SceneGraphVisualizer(CLASSES, PREDICATES)
    paths = vis.save(image, pred, str(tmp_path), "ex", image_name="ex.png")
    assert sorted(os.listdir(tmp_path)) == ["ex_graph.png", "ex_panoptic.png", "ex_triplets.json"]
    overlay = np.asarray(Image.open(paths["panoptic"]).convert("RGB"))
    assert overlay.shape == (96 * 4, 128 * 4 + 360, 3)
    # square pixel (row 13, col 13), far from its outline and its centred label:
    # round(0.5 * (100, 150, 201) + 0.5 * (0, 114, 189)) = (50, 132, 195)
    assert overlay[13 * 4 + 1, 13 * 4 + 2].tolist() == [50, 132, 195]
    # circle pixel (row 30, col 80): colour (217, 83, 25) -> (158.5, 116.5, 113) rounds to even
    assert overlay[30 * 4 + 2, 80 * 4 + 2].tolist() == [158, 116, 113]
    assert overlay[2 * 4, 60 * 4].tolist() == [100, 150, 201]  # void: the image untouched
    assert overlay[10 * 4, 20 * 4].tolist() == [0, 62, 103]  # outline: 0.55 x colour
    assert (overlay[:, 128 * 4 :] != 255).any()  # the triplet panel holds text

    graph = np.asarray(Image.open(paths["graph"]).convert("RGB"))
    assert graph.shape == (96 * 4, 128 * 4, 3)
    x, y = int((24.5 + 0.5) * 4), int((24.5 + 0.5) * 4)  # the square's node, at its centroid
    window = graph[y - 20 : y + 20, x - 30 : x + 30].reshape(-1, 3)
    assert (window == [0, 114, 189]).all(axis=1).sum() > 50

    data = json.loads(open(paths["json"]).read())
    assert (data["file_name"], data["height"], data["width"]) == ("ex.png", 96, 128)
    ids = {s["id"] for s in data["segments"]}
    assert ids == {1, 2, 3}
    assert all(t["subject_id"] in ids and t["object_id"] in ids for t in data["triplets"])
    assert [(t["subject"], t["predicate"], t["object"]) for t in data["triplets"]] == [
        ("square", "left of", "circle"),
        ("circle", "right of", "square"),
        ("square", "above", "ground"),
        ("circle", "above", "ground"),
    ]
    assert data["num_predicted_triplets"] == 4


@pytest.mark.parametrize("relations", [None, "empty"])
def test_empty_prediction_is_drawn_with_a_note(tmp_path, relations):
    image = np.full((40, 50, 3), 30, np.uint8)
    pred = {"panoptic_seg": (torch.zeros(40, 50, dtype=torch.int32), [])}
    if relations == "empty":
        pred["relations"] = {
            "triplets": torch.zeros(0, 3, dtype=torch.long),
            "scores": torch.zeros(0),
            "predicate_scores": torch.zeros(0, 3),
        }
    paths = SceneGraphVisualizer(CLASSES, PREDICATES).save(image, pred, str(tmp_path), "e")
    overlay = np.asarray(Image.open(paths["panoptic"]).convert("RGB"))
    assert overlay.shape == (40 * 10, 50 * 10 + 360, 3)
    assert overlay[5, 5].tolist() == [30, 30, 30]
    graph = np.asarray(Image.open(paths["graph"]).convert("RGB"))
    assert graph.shape == (400, 500, 3)
    assert (graph[190:210, 150:350] < 100).any()  # the note's dark text at the centre
    data = json.load(open(paths["json"]))
    assert data["segments"] == [] and data["triplets"] == []


def test_relations_without_segments_in_threshold_are_noted(tmp_path):
    image, pred = _example()
    view = SceneGraphVisualizer(CLASSES, PREDICATES).prepare(image, pred, score_threshold=0.95)
    assert view.triplets == [] and view.num_triplets == 4
    out = draw_panoptic_overlay(image, view, min_display_side=96)
    assert out.shape == (96, 128 + 360, 3)


def test_node_positions_push_coincident_centroids_apart():
    seg = np.zeros((64, 64), np.int64)
    seg[16:48, 16:48] = 1
    seg[28:36, 28:36] = 2  # a ring (1) around a square (2): same centroid
    info = [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 0}]
    view = prepare_scene_graph({"panoptic_seg": (seg, info)}, CLASSES, PREDICATES)
    assert view.segment(1).centroid == pytest.approx((31.5, 31.5))
    pos = node_positions(view, scale=4.0, min_dist=44.0)
    assert np.hypot(*(pos[1] - pos[2])) >= 44.0 - 1e-6
    again = node_positions(view, scale=4.0, min_dist=44.0)
    assert all(np.array_equal(pos[k], again[k]) for k in pos)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p["relations"].update(triplets=torch.tensor([[1, 9, 0]] * 4)), r"\[0\].*9"),
        (lambda p: p["relations"].update(triplets=torch.tensor([[1, 2, 7]] * 4)), "predicate 7"),
        (lambda p: p["relations"].update(scores=torch.zeros(3)), "3 rows"),
        (lambda p: p["panoptic_seg"][1][0].update(category_id=3), "category_id"),
        (lambda p: p["panoptic_seg"][1][1].update(id=1), "unique id"),
        (lambda p: p["panoptic_seg"][0].__setitem__((0, 0), 42), r"ids \[42\]"),
        (lambda p: p.pop("panoptic_seg"), "no 'panoptic_seg'"),
    ],
)
def test_bad_predictions_name_the_image_and_field(mutate, message):
    image, pred = _example()
    mutate(pred)
    with pytest.raises(ValueError, match=message) as err:
        prepare_scene_graph(pred, CLASSES, PREDICATES, image_name="dir/bad.png")
    assert "dir/bad.png" in str(err.value)


def test_image_size_mismatch_and_bad_vocabulary():
    image, pred = _example()
    with pytest.raises(ValueError, match=r"bad.png.*\(96, 128\).*\(50, 50\)"):
        prepare_scene_graph(pred, CLASSES, PREDICATES, image_shape=(50, 50), image_name="bad.png")
    with pytest.raises(ValueError, match="non-empty"):
        SceneGraphVisualizer([], PREDICATES)
    with pytest.raises(ValueError, match="image must be RGB"):
        vis = SceneGraphVisualizer(CLASSES, PREDICATES)
        draw_panoptic_overlay(image[:, :, :2], vis.prepare(image, pred))


def test_from_metadata_uses_dataset_colours():
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get("spade_test_visualizer_meta")
    meta.set(thing_classes=["square", "circle"], stuff_classes=["ground"],
             predicate_classes=PREDICATES, thing_colors=[(1, 2, 3), (4, 5, 6)],
             stuff_colors=[(7, 8, 9)])  # fmt: skip
    vis = SceneGraphVisualizer.from_metadata(meta)
    assert vis.class_names == CLASSES
    assert vis.class_colors == [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    with pytest.raises(ValueError, match="predicate_classes"):
        SceneGraphVisualizer.from_metadata(MetadataCatalog.get("spade_test_visualizer_empty"))


def test_drawing_is_deterministic_and_handles_self_relations(tmp_path):
    image, pred = _example()
    pred["relations"]["triplets"][2] = torch.tensor([2, 2, 0])  # a segment related to itself
    vis = SceneGraphVisualizer(CLASSES, PREDICATES)
    first = vis.save(image, pred, str(tmp_path / "a"), "ex")
    second = vis.save(image, pred, str(tmp_path / "b"), "ex")
    for key in ("panoptic", "graph", "json"):
        assert open(first[key], "rb").read() == open(second[key], "rb").read()
    triplets = json.load(open(first["json"]))["triplets"]
    assert ("circle", "left of", "circle") in [
        (t["subject"], t["predicate"], t["object"]) for t in triplets
    ]


def test_rows_of_one_pair_share_an_arrow_labelled_in_rank_order(tmp_path):
    image, pred = _example()
    rel = pred["relations"]
    # a second predicate row for square -> circle (rank 3 of 5), and a duplicate of the first
    rel["triplets"] = torch.cat([rel["triplets"], torch.tensor([[1, 2, 2], [1, 2, 0]])])
    rel["scores"] = torch.cat([rel["scores"], torch.tensor([0.7, 0.1])])
    rel["predicate_scores"] = torch.cat([rel["predicate_scores"], rel["predicate_scores"][:2]])
    view = prepare_scene_graph(pred, CLASSES, PREDICATES)
    assert [t.score for t in view.triplets] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    # ordered pairs in the order of their best triplet; the reverse direction is its own arrow
    assert edge_labels(view) == [
        (1, 2, "left of, above"),
        (2, 1, "right of"),
        (1, 3, "above"),
        (2, 3, "above"),
    ]
    paths = SceneGraphVisualizer(CLASSES, PREDICATES).save(image, pred, str(tmp_path), "ex")
    assert os.path.getsize(paths["graph"]) > 0
