"""End to end: the SPADE model with the RGT relation head overfits two SynthPSG images, and the
real PSG evaluator scores R@50 well above the chance level of the same segmentation with random
predicates."""

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

import spade.modeling.backbone  # noqa: F401  (registers the diffusion backbone)
import spade.modeling.meta_arch  # noqa: F401  (registers META_ARCH "SPADE")
from spade.config import add_spade_config
from spade.data.dataset_mapper import SPADEDatasetMapper
from spade.data.datasets.synthetic import register_synthpsg
from spade.data.synthpsg import generate_synthpsg
from spade.evaluation.psg_evaluation import PSGEvaluator

PREFIX = "relation_overfit"
ITERATIONS = 150


def _cfg(config_file):
    cfg = get_cfg()
    add_spade_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = (f"{PREFIX}_train",)
    cfg.DATASETS.TEST = (f"{PREFIX}_train",)
    cfg.INPUT.IMAGE_SIZE, cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE = 64, 1.0, 1.0
    cfg.INPUT.RANDOM_FLIP = "none"
    s = cfg.MODEL.SPADE
    s.DIFFUSION.OUT_CHANNELS, s.IMPLICIT_TEXT.HIDDEN_DIM = 32, 32
    p = s.PIXEL_DECODER
    p.CONVS_DIM, p.MASK_DIM, p.ENCODER_LAYERS, p.NHEADS, p.DIM_FEEDFORWARD = 32, 32, 1, 4, 64
    m = s.MASK_HEAD
    m.NUM_OBJECT_QUERIES, m.HIDDEN_DIM, m.NHEADS, m.DIM_FEEDFORWARD = 16, 32, 4, 64
    m.DEC_LAYERS, m.TRAIN_NUM_POINTS = 3, 256
    r = s.RELATION
    r.HIDDEN_DIM, r.NHEADS, r.DIM_FEEDFORWARD, r.NUM_PAIRS, r.GRAPH_RESOLUTION = 32, 4, 64, 48, 16
    # the random TINY CLIP knows nothing worth fusing, for classes or predicates
    s.OPEN_VOCAB.USE_CLIP_BRANCH = r.USE_CLIP_BRANCH = False
    s.TEST.OBJECT_MASK_THRESHOLD = 0.5
    return cfg


def _random_predicates(outputs, num_predicates, seed):
    """The same outputs with each triplet's predicate replaced by a uniformly random one."""
    gen = torch.Generator().manual_seed(seed)
    shuffled = []
    for out in outputs:
        rel = out["relations"]
        predicates = torch.randint(num_predicates, (len(rel["triplets"]),), generator=gen)
        triplets = rel["triplets"].clone()
        triplets[:, 2] = predicates
        one_hot = torch.nn.functional.one_hot(predicates, num_predicates).float()
        shuffled.append(
            {**out, "relations": {**rel, "triplets": triplets, "predicate_scores": one_hot}}
        )
    return shuffled


def _recall_at_50(dataset, inputs, outputs):
    evaluator = PSGEvaluator(dataset, distributed=False, panoptic=False, protocol="multi")
    evaluator.reset()
    for inp, out in zip(inputs, outputs):
        evaluator.process([inp], [out])
    return evaluator.evaluate()["psg"]["R@50_strict"]


def test_relation_head_overfits_synthpsg_through_the_evaluator(tmp_path, request):
    root = str(tmp_path / "synthpsg")
    generate_synthpsg(root, 12, seed=0, size=64)
    register_synthpsg(root, prefix=PREFIX)
    dataset = f"{PREFIX}_train"
    cfg = _cfg(str(request.config.rootpath / "configs" / "Base-SPADE.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg)
    dicts = [d for d in DatasetCatalog.get(dataset) if len(d["relations"]) >= 4][:2]
    assert len(dicts) == 2
    train_mapper = SPADEDatasetMapper(cfg, is_train=True)
    batch = [train_mapper(dict(d)) for d in dicts]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    model.train()
    first = None
    for _ in range(ITERATIONS):
        losses = model(batch)
        assert "loss_rel" in losses and "loss_rqc" in losses
        first = first or {k: float(v.detach()) for k, v in losses.items()}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert float(losses["loss_rel"].detach()) < 0.5 * first["loss_rel"]

    model.eval()
    test_mapper = SPADEDatasetMapper(cfg, is_train=False)
    inputs = [test_mapper(dict(d)) for d in dicts]
    with torch.no_grad():
        outputs = [model([inp])[0] for inp in inputs]
    for out in outputs:
        rel = out["relations"]
        assert (
            rel["triplets"].shape[1] == 3
            and len(rel["triplets"]) <= cfg.MODEL.SPADE.TEST.MAX_RELATIONS
        )
        keys = [tuple(t) for t in rel["triplets"][:, :2].tolist()]
        assert len(keys) == len(set(keys))  # one row per (subject segment, object segment)
    recall = _recall_at_50(dataset, inputs, outputs)
    num_predicates = len(MetadataCatalog.get(dataset).predicate_classes)
    chance = np.mean(
        [
            _recall_at_50(dataset, inputs, _random_predicates(outputs, num_predicates, s))
            for s in range(3)
        ]
    )
    print(f"R@50 {recall:.1f} (random predicates: {chance:.1f})")
    assert recall >= 30.0 and recall >= chance + 20.0, (recall, chance)
