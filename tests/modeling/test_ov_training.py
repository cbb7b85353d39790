"""Open-vocabulary training: novel classes and predicates never reach a training loss."""

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from test_meta_arch import PREDICATES, STUFF, THINGS, make_input, tiny_cfg

from spade.modeling.meta_arch.vocabulary import Vocabulary, base_vocabulary

OV_DATASET = "spade_test_ov_training"
OV_SPLIT = {
    "base_objects": ["disc", "star", "sky", "grass"],
    "novel_objects": ["box"],
    "base_predicates": ["left of", "on"],
    "novel_predicates": ["above"],
}
MetadataCatalog.get(OV_DATASET).set(
    thing_classes=THINGS, stuff_classes=STUFF, predicate_classes=PREDICATES, ov_split=OV_SPLIT
)


def test_base_vocabulary_drops_novel_names_and_maps_dataset_ids():
    full = Vocabulary(tuple(THINGS + STUFF), (True,) * 3 + (False,) * 2, tuple(PREDICATES))
    base = base_vocabulary(full, OV_SPLIT)
    assert base.class_names == ("disc", "star", "sky", "grass")
    assert base.predicate_names == ("left of", "on")
    # dataset id -> training index: box (1) and above (1) are not in the training vocabulary
    assert base.label_lookup("class") == (0, -1, 1, 2, 3)
    assert base.label_lookup("predicate") == (0, -1, 1)
    assert base_vocabulary(full, None) is full and full.label_lookup("class") is None


def test_training_targets_use_base_ids_and_reject_novel_ones():
    cfg = tiny_cfg(backbone="diffusion", relation=True, open_vocab=True)
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = (OV_DATASET,)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.train_vocabulary.class_names == ("disc", "star", "sky", "grass")
    assert model.test_vocabulary.class_names == tuple(THINGS + STUFF)  # full at inference
    assert model.test_vocabulary.novel_classes == (False, True, False, False, False)

    gen = torch.Generator().manual_seed(0)
    x = make_input(gen, 3)
    x["instances"].gt_classes = torch.tensor([0, 2, 4])  # disc, star, grass (dataset ids)
    x["gt_relations"] = torch.tensor([[0, 1, 0], [1, 2, 2]])  # left of, on
    images = model.preprocess_image([x])
    target = model.prepare_targets([x], images)[0]
    assert target["labels"].tolist() == [0, 1, 3]
    assert target["gt_relations"].tolist() == [[0, 1, 0], [1, 2, 1]]
    # void: the image's pixels no target covers (a removed novel object's), never the padding
    h, w = images.image_sizes[0]
    covered = x["instances"].gt_masks.any(0)
    assert torch.equal(target["void"][:h, :w], ~covered)
    assert not target["void"][h:].any() and not target["void"][:, w:].any()
    assert (h, w) != tuple(images.tensor.shape[-2:])  # the input is padded, so this is checked
    model.train()
    losses = model([x])
    assert all(torch.isfinite(v) for v in losses.values())
    # MASK_HEAD.VOID_QUERY_SHARE reaches the criterion and a step still trains
    cfg.MODEL.SPADE.MASK_HEAD.VOID_QUERY_SHARE = 0.5
    torch.manual_seed(0)
    void_model = build_model(cfg).train()
    assert void_model.criterion.void_query_share == 0.5
    assert all(torch.isfinite(v) for v in void_model([x]).values())

    x["instances"].gt_classes = torch.tensor([0, 1, 4])  # "box" is novel
    with pytest.raises(ValueError, match=r"class ids \[1\]"):
        model.prepare_targets([x], images)
    x["instances"].gt_classes = torch.tensor([0, 2, 4])
    x["gt_relations"] = torch.tensor([[0, 1, 1]])  # "above" is novel
    with pytest.raises(ValueError, match=r"predicate ids \[1\]"):
        model.prepare_targets([x], images)
