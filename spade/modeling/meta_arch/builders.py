"""Builds the parts of the SPADE meta-architecture from a config (``SPADE.from_config``)."""

from typing import Any, Dict

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_backbone

from ..backbone import build_clip
from ..criterion import SetCriterion
from ..matcher import HungarianMatcher
from ..open_vocab import CosineClassifier, build_text_banks
from ..pixel_decoder import build_pixel_decoder
from ..relation import build_relation_head
from ..transformer_decoder import MaskedAttentionDecoder
from .query_classifier import ClosedSetClassifier, MaskShapeEmbedding, OpenVocabClassifier
from .vocabulary import base_vocabulary, vocabulary_from_metadata

__all__ = ["build_spade_parts", "build_criterion", "build_vocabularies"]


def build_criterion(cfg: CfgNode) -> SetCriterion:
    """Hungarian matcher + set criterion with the weights of ``MODEL.SPADE.MASK_HEAD``."""
    m = cfg.MODEL.SPADE.MASK_HEAD
    matcher = HungarianMatcher(
        cost_class=m.CLASS_WEIGHT,
        cost_mask=m.MASK_WEIGHT,
        cost_dice=m.DICE_WEIGHT,
        num_points=m.TRAIN_NUM_POINTS,
    )
    return SetCriterion(
        matcher=matcher,
        class_weight=m.CLASS_WEIGHT,
        mask_weight=m.MASK_WEIGHT,
        dice_weight=m.DICE_WEIGHT,
        no_object_weight=m.NO_OBJECT_WEIGHT,
        void_query_share=m.VOID_QUERY_SHARE,
        num_points=m.TRAIN_NUM_POINTS,
        oversample_ratio=m.OVERSAMPLE_RATIO,
        importance_sample_ratio=m.IMPORTANCE_SAMPLE_RATIO,
        num_aux_outputs=m.DEC_LAYERS if m.DEEP_SUPERVISION else 0,
    )


def build_vocabularies(cfg: CfgNode):
    """(train, test) vocabularies: DATASETS.TRAIN[0]'s classes (only its base classes and
    predicates when it has an open-vocabulary split and the classifier is open-vocabulary); at
    test, OPEN_VOCAB.CLASS_NAMES / PREDICATE_NAMES when given, else DATASETS.TEST[0]'s (else the
    training dataset's)."""
    if not cfg.DATASETS.TRAIN:
        raise ValueError(
            "SPADE: DATASETS.TRAIN is empty; the training vocabulary comes from its metadata"
        )
    train_name = cfg.DATASETS.TRAIN[0]
    train = vocabulary_from_metadata(train_name)
    if cfg.MODEL.SPADE.MASK_HEAD.OPEN_VOCAB:  # novel names stay out of every training loss
        train = base_vocabulary(train, MetadataCatalog.get(train_name).get("ov_split", None))
    test_name = train_name
    if cfg.DATASETS.TEST and MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", None):
        test_name = cfg.DATASETS.TEST[0]
    ov = cfg.MODEL.SPADE.OPEN_VOCAB
    test = vocabulary_from_metadata(
        test_name,
        list(ov.CLASS_NAMES),
        list(ov.PREDICATE_NAMES),
        seen_class_names=train.class_names,
    )
    return train, test


def build_spade_parts(cfg: CfgNode) -> Dict[str, Any]:
    """Keyword arguments of ``SPADE.__init__`` built from ``cfg``."""
    s = cfg.MODEL.SPADE
    backbone = build_backbone(cfg)
    pixel_decoder = build_pixel_decoder(cfg, backbone.output_shape())
    transformer_decoder = MaskedAttentionDecoder(
        cfg, in_channels=s.PIXEL_DECODER.CONVS_DIM, mask_dim=s.PIXEL_DECODER.MASK_DIM
    )
    train_vocab, test_vocab = build_vocabularies(cfg)
    parts: Dict[str, Any] = {}
    if s.MASK_HEAD.OPEN_VOCAB:
        clip = getattr(backbone, "clip", None) or build_clip(cfg)
        parts["text_bank"], parts["predicate_text_bank"] = build_text_banks(cfg, clip)
        classifier = OpenVocabClassifier(
            s.MASK_HEAD.HIDDEN_DIM,
            clip.embed_dim,
            CosineClassifier(
                clip.embed_dim, s.OPEN_VOCAB.LOGIT_SCALE_INIT, s.OPEN_VOCAB.TEXT_WHITENING
            ),
        )
        parts["use_clip_branch"] = s.OPEN_VOCAB.USE_CLIP_BRANCH
        parts["clip_crop_scale"] = s.OPEN_VOCAB.CLIP_CROP_SCALE
    else:
        classifier = ClosedSetClassifier(s.MASK_HEAD.HIDDEN_DIM, len(train_vocab.class_names))
    if s.MASK_HEAD.SHAPE_EMBED_SIZE > 0:
        parts["mask_shape_embed"] = MaskShapeEmbedding(
            s.MASK_HEAD.HIDDEN_DIM, s.MASK_HEAD.SHAPE_EMBED_SIZE
        )
    relation_head = None
    if s.RELATION.ENABLED:
        relation_head = build_relation_head(cfg)
    return {
        "backbone": backbone,
        "pixel_decoder": pixel_decoder,
        "transformer_decoder": transformer_decoder,
        "classifier": classifier,
        "criterion": build_criterion(cfg),
        "train_vocabulary": train_vocab,
        "test_vocabulary": test_vocab,
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": list(cfg.MODEL.PIXEL_STD),
        "size_divisibility": max(s.SIZE_DIVISIBILITY, backbone.size_divisibility),
        "mask_loss_weight": s.MASK_HEAD.PANOPTIC_LOSS_WEIGHT,
        "object_mask_threshold": s.TEST.OBJECT_MASK_THRESHOLD,
        "overlap_threshold": s.TEST.OVERLAP_THRESHOLD,
        "reassign_dropped": s.TEST.REASSIGN_DROPPED,
        "max_relations": s.TEST.MAX_RELATIONS,
        "predicates_per_pair": s.TEST.PREDICATES_PER_PAIR,
        "relation_head": relation_head,
        "relation_clip_branch": s.RELATION.ENABLED and s.RELATION.USE_CLIP_BRANCH,
        "pairs_from_kept_segments": s.TEST.PAIRS_FROM_KEPT_SEGMENTS,
        "fusion_alpha": s.OPEN_VOCAB.FUSION_ALPHA,
        "fusion_beta": s.OPEN_VOCAB.FUSION_BETA,
        **parts,
    }
