"""SPADEDatasetMapper: masks, boxes and relations stay consistent through resize, crop and flip."""

import os

import numpy as np
import pytest
import torch
from data_helpers import PREDICATES, id_png, standard_record, write_dataset
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from PIL import Image
from scipy import ndimage

from spade.config import add_spade_config
from spade.data.dataset_mapper import SPADEDatasetMapper, build_dataset_mapper, flip_permutation
from spade.data.datasets import load_psg_json

COLOURS = {0: (255, 0, 0), 1: (0, 0, 255), 2: (0, 255, 0)}  # class -> colour in the test image
LEFT, RIGHT, ON = 0, 1, 2


class FixedCrop(T.Augmentation):
    """Deterministic crop used to cut segments away."""

    def __init__(self, x0, y0, w, h):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        return T.CropTransform(self.x0, self.y0, self.w, self.h)


@pytest.fixture
def record(tmp_path):
    rec = standard_record("1", [[0, 1, LEFT], [1, 0, RIGHT], [0, 2, ON]], ids=(5, 700, 70000))
    path = write_dataset(str(tmp_path), [rec], test_ids=[])
    return load_psg_json(path, str(tmp_path), str(tmp_path), "all")[0]


def _mapper(augs, is_train=True, **kw):
    perm = flip_permutation(PREDICATES, [("left of", "right of")])
    return SPADEDatasetMapper(
        is_train=is_train,
        augmentations=augs,
        image_format="RGB",
        flip_perm=perm,
        min_keep_area=kw.pop("min_keep_area", 16),
        **kw,
    )


def _check_consistent(out):
    """Masks partition the image; each mask's interior has its class colour; boxes are tight;
    left/right relations hold between the masks they point at."""
    inst, rels = out["instances"], out["gt_relations"]
    masks = inst.gt_masks
    assert masks.dtype == torch.bool and masks.shape[1:] == out["image"].shape[1:]
    assert int(masks.sum(0).max()) <= 1
    image = out["image"].permute(1, 2, 0).numpy()
    for m, c, box in zip(masks.numpy(), inst.gt_classes.tolist(), inst.gt_boxes.tensor.tolist()):
        core = ndimage.binary_erosion(m, iterations=2)
        assert (image[core] == COLOURS[c]).all()
        ys, xs = np.nonzero(m)
        assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert rels.dtype == torch.long and rels.shape[1] == 3
    assert (rels[:, :2] < len(inst)).all() if len(rels) else True
    for s, o, p in rels.tolist():
        xs_s, xs_o = np.nonzero(masks[s].numpy())[1], np.nonzero(masks[o].numpy())[1]
        if p == LEFT:
            assert xs_s.max() < xs_o.min()
        if p == RIGHT:
            assert xs_s.min() > xs_o.max()


def test_flip_swaps_masks_and_predicates(record):
    out = _mapper([T.RandomFlip(prob=1.0)])(record)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [0, 1, 2]
    assert inst.gt_boxes.tensor.tolist() == [[16, 0, 24, 8], [0, 0, 8, 8], [0, 8, 24, 16]]
    assert out["gt_relations"].tolist() == [[0, 1, RIGHT], [1, 0, LEFT], [0, 2, ON]]
    assert (out["height"], out["width"], out["image_id"]) == (16, 24, "1")
    _check_consistent(out)


def test_crop_drops_cut_away_segment_and_remaps_relations(record):
    augs = [T.Resize((32, 48)), FixedCrop(0, 0, 24, 32), T.RandomFlip(prob=1.0)]
    out = _mapper(augs)(record)
    inst = out["instances"]
    assert out["image"].shape == (3, 32, 24)
    assert inst.gt_classes.tolist() == [0, 2]  # the dog (x >= 32 after resize) is cut away
    assert inst.gt_masks.sum((1, 2)).tolist() == [16 * 16, 16 * 24]
    assert out["gt_relations"].tolist() == [[0, 1, ON]]
    _check_consistent(out)


def test_min_keep_area_drops_small_remnants(record):
    # the crop keeps 2 columns x 8 rows of the dog: 16 pixels, kept at threshold 16, not at 17
    augs = [FixedCrop(0, 0, 18, 16)]
    assert _mapper(augs, min_keep_area=16)(record)["instances"].gt_classes.tolist() == [0, 1, 2]
    out = _mapper(augs, min_keep_area=17)(record)
    assert out["instances"].gt_classes.tolist() == [0, 2]
    assert out["gt_relations"].tolist() == [[0, 1, ON]]


def test_random_large_scale_jitter_from_config(record):
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.INPUT.IMAGE_SIZE, cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE = 32, 0.5, 2.0
    cfg.INPUT.FORMAT = "RGB"
    cfg.DATASETS.TRAIN = ()
    mapper = build_dataset_mapper(cfg, is_train=True)
    mapper.flip_perm = torch.tensor(flip_permutation(PREDICATES, [("left of", "right of")]))
    sizes, cat_dog_predicates = set(), set()
    for seed in range(12):
        np.random.seed(seed)
        out = mapper(record)
        sizes.add(tuple(out["image"].shape[1:]))
        assert max(out["image"].shape[1:]) <= 32
        classes = out["instances"].gt_classes.tolist()
        for s, o, p in out["gt_relations"].tolist():
            if (classes[s], classes[o]) == (0, 1):
                cat_dog_predicates.add(p)
        _check_consistent(out)
    assert cat_dog_predicates == {LEFT, RIGHT}  # unflipped and flipped samples both occurred
    assert len(sizes) > 3


def test_test_mode_fits_image_size_and_keeps_everything(record):
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.INPUT.IMAGE_SIZE, cfg.INPUT.FORMAT = 32, "RGB"
    out = build_dataset_mapper(cfg, is_train=False)(record)
    assert out["image"].shape == (3, 21, 32)  # 16 x 24 scaled by 4/3, aspect kept
    assert out["instances"].gt_classes.tolist() == [0, 1, 2]
    assert out["gt_relations"].tolist() == [[0, 1, LEFT], [1, 0, RIGHT], [0, 2, ON]]
    _check_consistent(out)


def test_empty_ground_truth(record):
    ids = np.zeros((16, 24), dtype=np.int64)
    Image.fromarray(id_png(ids)).save(record["pan_seg_file_name"])
    empty = dict(record, segments_info=[], relations=[])
    for is_train in (True, False):
        out = _mapper([T.RandomFlip(prob=1.0)], is_train=is_train)(empty)
        assert len(out["instances"]) == 0 and out["instances"].gt_masks.shape == (0, 16, 24)
        assert out["gt_relations"].shape == (0, 3)


def test_segment_missing_from_png_and_size_mismatch(record):
    bad = dict(
        record,
        segments_info=record["segments_info"]
        + [{"id": 999, "category_id": 0, "iscrowd": 0, "isthing": True, "area": 1}],
    )
    with pytest.raises(ValueError, match=r"pan/1.png \(image_id 1\).*\[999\] do not occur"):
        _mapper([])(bad)
    Image.fromarray(id_png(np.zeros((8, 24), dtype=np.int64))).save(record["pan_seg_file_name"])
    with pytest.raises(ValueError, match="pan/1.png .*image_id 1"):
        _mapper([])(record)


def test_corrupt_image_policy(record):
    with open(record["file_name"], "wb") as f:
        f.write(b"not an image")
    before = SPADEDatasetMapper.skipped_images
    assert _mapper([])(record) is None
    assert SPADEDatasetMapper.skipped_images == before + 1
    with pytest.raises(OSError, match="cannot read image .*img/1.png"):
        _mapper([], corrupt_image_policy="fatal")(record)
    with pytest.raises(OSError, match="img/1.png"):
        _mapper([], is_train=False)(record)  # evaluation never skips
    os.remove(record["file_name"])
    with pytest.raises(OSError, match="img/1.png"):
        _mapper([], corrupt_image_policy="fatal")(record)


def test_box_only_dicts_get_box_masks(record):
    vg = dict(
        record,
        pan_seg_file_name=None,
        segments_info=[
            {
                "id": 1,
                "category_id": 0,
                "iscrowd": 0,
                "isthing": True,
                "area": 48,
                "bbox": [2, 1, 10, 7],
            },
            {
                "id": 2,
                "category_id": 1,
                "iscrowd": 0,
                "isthing": True,
                "area": 64,
                "bbox": [6, 3, 14, 11],
            },
        ],
        relations=[[0, 1, LEFT]],
    )
    out = _mapper([T.RandomFlip(prob=1.0)])(vg)
    masks = out["instances"].gt_masks
    assert out["instances"].gt_boxes.tensor.tolist() == [[14, 1, 22, 7], [10, 3, 18, 11]]
    assert masks.sum((1, 2)).tolist() == [48, 64] and (masks[0] & masks[1]).any()  # may overlap
    assert out["gt_relations"].tolist() == [[0, 1, RIGHT]]


def test_bad_configuration():
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.INPUT.DATASET_MAPPER_NAME = "nope"
    with pytest.raises(KeyError, match="nope"):
        build_dataset_mapper(cfg, is_train=True)
    cfg.INPUT.DATASET_MAPPER_NAME, cfg.DATASETS.TRAIN = "spade_psg", ("never_registered",)
    with pytest.raises(KeyError, match="never_registered"):
        build_dataset_mapper(cfg, is_train=True)
    with pytest.raises(ValueError, match="CORRUPT_IMAGE_POLICY"):
        _mapper([], corrupt_image_policy="ignore")
    with pytest.raises(ValueError, match="unknown predicate"):
        flip_permutation(PREDICATES, [("left of", "west of")])


def test_augmentation_slots_bound_the_versions_of_an_image(record):
    augs = [T.ResizeScale(0.5, 1.5, 16, 24), T.FixedSizeCrop((16, 16), pad=False)]
    augs.append(T.RandomFlip())

    def versions(mapper, n=40):
        np.random.seed(0)
        return {out["image"].numpy().tobytes() for out in (mapper(record) for _ in range(n))}

    slotted = _mapper(augs, augmentation_slots=2, slot_seed=3)
    assert len(versions(slotted)) <= 2  # at most one version per slot
    assert versions(slotted) == versions(_mapper(augs, augmentation_slots=2, slot_seed=3))
    assert len(versions(_mapper(augs))) > 2  # without slots: fresh every time
    out = slotted(record)
    _check_consistent(out)
    # the global random state moves by the slot draw only, as if the augmentations drew nothing
    np.random.seed(1)
    slotted(record)
    after = np.random.rand()
    np.random.seed(1)
    np.random.randint(2)
    assert after == np.random.rand()
    # test mode ignores slots; a negative count is an error naming the key
    assert _mapper(augs, is_train=False, augmentation_slots=2).augmentation_slots == 0
    with pytest.raises(ValueError, match="AUGMENTATION_SLOTS"):
        _mapper(augs, augmentation_slots=-1)
