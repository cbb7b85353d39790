"""SPADE meta-architecture: backbone -> pixel decoder -> masked-attention decoder -> classes, masks
(-> relation head).

Shape shorthand: B batch, Q object queries, C query width, K classes (+1 no-object), P predicates,
D CLIP embedding dim, H x W padded image, h x w mask-feature map (stride 4 or 8).
"""

import inspect
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import Tensor, nn

from ..criterion import SetCriterion
from ..open_vocab import TextEmbeddingBank, geometric_fusion, mask_pool, square_context_boxes
from ..relation import relation_inference
from ..relation.pairs import mask_boxes
from ..transformer_decoder import MaskedAttentionDecoder
from .builders import build_spade_parts
from .panoptic_inference import panoptic_inference
from .vocabulary import Vocabulary

__all__ = ["SPADE"]


@META_ARCH_REGISTRY.register()
class SPADE(nn.Module):
    """Panoptic scene graph model.

    Training: ``forward(batched_inputs)`` returns a dict of losses (panoptic losses scaled by
    lambda_mask, plus the relation head's losses when it exists). Inference: one dict per image,
    ``{"panoptic_seg": (seg int32 [H, W], segments_info)}`` at the original size, plus
    ``"relations"`` with a relation head (docs/INTERFACES.md).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        pixel_decoder: nn.Module,
        transformer_decoder: MaskedAttentionDecoder,
        classifier: nn.Module,
        criterion: SetCriterion,
        train_vocabulary: Vocabulary,
        test_vocabulary: Vocabulary,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int,
        mask_loss_weight: float,
        fusion_alpha: float,
        fusion_beta: float,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        reassign_dropped: bool = False,
        max_relations: int = 100,
        predicates_per_pair: int = 1,
        relation_head: Optional[nn.Module] = None,
        mask_shape_embed: Optional[nn.Module] = None,
        text_bank: Optional[TextEmbeddingBank] = None,
        predicate_text_bank: Optional[TextEmbeddingBank] = None,
        use_clip_branch: bool = False,
        clip_crop_scale: float = 0.0,
        relation_clip_branch: bool = False,
        pairs_from_kept_segments: bool = True,
    ):
        """
        Args:
            backbone: any detectron2 backbone; its outputs feed the pixel decoder.
            pixel_decoder: ``forward_features(features) -> (mask_features, 3 multi-scale maps)``.
            transformer_decoder: class-agnostic decoder of query embeddings and masks per layer.
            classifier: ``ClosedSetClassifier`` or ``OpenVocabClassifier``.
            criterion: matcher + set losses (weighted).
            train_vocabulary / test_vocabulary: vocabularies used in training / at inference.
            pixel_mean, pixel_std: input normalisation (per channel, in the input format).
            size_divisibility: images are padded to a multiple of this.
            mask_loss_weight: lambda_mask, scales every panoptic loss.
            fusion_alpha / fusion_beta: alpha / beta, geometric fusion weights of seen / novel
                classes (OPEN_VOCAB.FUSION_ALPHA / _BETA).
            object_mask_threshold, overlap_threshold: panoptic inference thresholds.
            reassign_dropped: repeat the panoptic merge without the queries it dropped
                (:func:`panoptic_inference`).
            max_relations: ranked triplets kept per image.
            predicates_per_pair: triplet rows per segment pair, its best predicates (>= 1; see
                :func:`spade.modeling.relation.relation_inference`).
            relation_head: optional head called as docs/INTERFACES.md says.
            mask_shape_embed: optional ``MaskShapeEmbedding``: ``(mask_logits [B, Q, h, w]) ->
                [B, Q, C]`` added to each decoder layer's queries before they are classified
                (the relation head still gets the decoder's own query features).
            text_bank / predicate_text_bank: ``TextEmbeddingBank`` of class / predicate prompts
                (open vocabulary only).
            use_clip_branch: fuse the CLIP mask-pooled class probabilities at inference.
            clip_crop_scale: > 0: the CLIP branch also classifies a square crop of this many
                times each query's mask box (OPEN_VOCAB.CLIP_CROP_SCALE; things), see
                :meth:`class_probabilities`.
            relation_clip_branch: hand the CLIP dense features to the relation head at inference.
            pairs_from_kept_segments: at inference the relation head selects its top-M query
                pairs among pairs of two different kept panoptic segments only (False: among all
                query pairs, and pairs of dropped queries are discarded afterwards).
        """
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.classifier = classifier
        self.mask_shape_embed = mask_shape_embed
        self.criterion = criterion
        self.relation_head = relation_head
        self.text_bank, self.predicate_text_bank = text_bank, predicate_text_bank
        if getattr(classifier, "open_vocab", False) and text_bank is None:
            raise ValueError("SPADE: an open-vocabulary classifier needs a text bank")
        self.train_vocabulary = train_vocabulary
        self.test_vocabulary = train_vocabulary
        self.set_vocabulary(
            test_vocabulary.class_names,
            test_vocabulary.predicate_names,
            is_thing=test_vocabulary.is_thing,
            novel_classes=test_vocabulary.novel_classes,
        )
        self._fit_text_whitening()
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.size_divisibility = size_divisibility
        self.mask_loss_weight = mask_loss_weight
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.reassign_dropped = bool(reassign_dropped)
        self.max_relations = max_relations
        if predicates_per_pair < 1:
            raise ValueError(
                f"MODEL.SPADE.TEST.PREDICATES_PER_PAIR={predicates_per_pair}: must be >= 1"
            )
        self.predicates_per_pair = int(predicates_per_pair)
        has_clip = callable(getattr(backbone, "clip_dense_features", None))
        self.use_clip_branch = use_clip_branch and has_clip and text_bank is not None
        self.relation_clip_branch = relation_clip_branch and has_clip and relation_head is not None
        self.clip_crop_scale = float(clip_crop_scale)
        if self.use_clip_branch and self.clip_crop_scale > 0:
            if not callable(getattr(backbone, "clip_crop_embeddings", None)):
                raise ValueError(
                    "MODEL.SPADE.OPEN_VOCAB.CLIP_CROP_SCALE > 0 needs a backbone with "
                    "clip_crop_embeddings (the diffusion backbone)"
                )
        self.fusion_alpha, self.fusion_beta = fusion_alpha, fusion_beta
        # a plug-in relation head without a ``pair_mask`` argument keeps the older contract:
        # its pairs of dropped queries are discarded by relation_inference
        self.pairs_from_kept_segments = bool(pairs_from_kept_segments) and (
            relation_head is not None
            and "pair_mask" in inspect.signature(relation_head.forward).parameters
        )

    @classmethod
    def from_config(cls, cfg):
        return build_spade_parts(cfg)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ vocabulary
    def _fit_text_whitening(self) -> None:
        """Fit the cosine classifiers' text whitening (OPEN_VOCAB / RELATION.TEXT_WHITENING), when
        on, on the *training* vocabulary's text; inference vocabularies go through the same map."""
        whitening = getattr(getattr(self.classifier, "cosine", None), "whitening", None)
        if whitening is not None:
            whitening.fit(self.text_bank.get(list(self.train_vocabulary.class_names)))
        predicates = getattr(self.relation_head, "predicates", None)
        whitening = getattr(getattr(predicates, "cosine", None), "whitening", None)
        if whitening is not None:
            names = list(self.train_vocabulary.predicate_names)
            if self.predicate_text_bank is None or len(names) < 2:
                raise ValueError(
                    "MODEL.SPADE.RELATION.TEXT_WHITENING needs the text of at least 2 training "
                    f"predicates (training vocabulary has {len(names)})"
                )
            whitening.fit(self.predicate_text_bank.get(names))

    def set_vocabulary(
        self,
        class_names: Sequence[str],
        predicate_names: Optional[Sequence[str]] = None,
        *,
        is_thing: Optional[Sequence[bool]] = None,
        novel_classes: Optional[Sequence[bool]] = None,
    ) -> None:
        """Replace the inference vocabulary (open vocabulary: any names; closed set: same count).

        ``is_thing`` defaults to the flag of the same name in the current vocabularies (else thing);
        ``novel_classes`` defaults to "not among the training classes".
        """
        known = dict(zip(self.train_vocabulary.class_names, self.train_vocabulary.is_thing))
        known.update(zip(self.test_vocabulary.class_names, self.test_vocabulary.is_thing))
        names = tuple(class_names)
        if (
            not getattr(self.classifier, "open_vocab", False)
            and len(names) != self.classifier.num_classes
        ):
            raise ValueError(
                "SPADE.set_vocabulary: the closed-set classifier has "
                f"{self.classifier.num_classes} "
                f"classes, got {len(names)} names"
            )
        flags = (
            tuple(is_thing) if is_thing is not None else tuple(known.get(n, True) for n in names)
        )
        seen = set(self.train_vocabulary.class_names)
        novel = (
            tuple(novel_classes)
            if novel_classes is not None
            else tuple(n not in seen for n in names)
        )
        preds = (
            tuple(predicate_names)
            if predicate_names is not None
            else self.test_vocabulary.predicate_names
        )
        self.test_vocabulary = Vocabulary(names, flags, preds, novel)

    @property
    def vocabulary(self) -> Vocabulary:
        """The vocabulary in use: the training one in training mode, else the inference one."""
        return self.train_vocabulary if self.training else self.test_vocabulary

    def class_text_embeddings(self) -> Optional[Tensor]:
        """[K, D] text embeddings of the current vocabulary's classes (None when closed set)."""
        if self.text_bank is None:
            return None
        return self.text_bank.get(list(self.vocabulary.class_names)).to(self.device)

    def predicate_text_embeddings(self) -> Optional[Tensor]:
        """[P, D] text embeddings of the current vocabulary's predicates (None when closed set)."""
        if self.predicate_text_bank is None or not self.vocabulary.predicate_names:
            return None
        return self.predicate_text_bank.get(list(self.vocabulary.predicate_names)).to(self.device)

    # ------------------------------------------------------------------ steps
    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise and pad the images: ImageList with tensor [B, 3, H, W]."""
        images = []
        for x in batched_inputs:
            if "image" not in x:
                raise KeyError(
                    f"SPADE: input {x.get('image_id', x.get('file_name', '?'))} has no 'image'"
                )
            images.append((x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std)
        return ImageList.from_tensors(images, self.size_divisibility)

    def predict(self, images: ImageList) -> Dict:
        """Run backbone, pixel decoder, decoder and classifier.

        Returns {"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w], "query_features":
        [B, Q, C], "aux_outputs": list of {"pred_logits", "pred_masks"} of earlier layers,
        "features": backbone maps + "mask_features"}.
        """
        features = self.backbone(images.tensor)
        mask_features, multi_scale = self.pixel_decoder.forward_features(features)
        decoded = self.transformer_decoder(multi_scale, mask_features)
        text = self.class_text_embeddings()
        queries = decoded["query_features"]
        if self.mask_shape_embed is not None:  # each layer's queries with their own masks' shape
            queries = [q + self.mask_shape_embed(m) for q, m in zip(queries, decoded["pred_masks"])]
        logits = [self.classifier(q, text) for q in queries]
        return {
            "pred_logits": logits[-1],
            "pred_masks": decoded["pred_masks"][-1],
            "query_features": decoded["query_features"][-1],
            "aux_outputs": [
                {"pred_logits": lg, "pred_masks": m}
                for lg, m in zip(logits[:-1], decoded["pred_masks"][:-1])
            ],
            "features": {**features, "mask_features": mask_features},
        }

    def prepare_targets(
        self, batched_inputs: List[Dict], images: ImageList
    ) -> List[Dict[str, Tensor]]:
        """Per image {"labels": long [N], "masks": bool [N, H, W] padded, "gt_relations" [R, 3],
        "void": bool [H, W]} (void: the image's pixels, padding excluded, that no target covers)."""
        height, width = images.tensor.shape[-2:]
        num_classes = len(self.train_vocabulary.class_names)
        targets = []
        for i, x in enumerate(batched_inputs):
            name = x.get("image_id", x.get("file_name", "?"))
            if "instances" not in x:
                raise KeyError(f"SPADE: training input {name} has no 'instances'")
            inst = x["instances"].to(self.device)
            labels = self._to_train_ids(inst.gt_classes.long(), "class", name)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                raise ValueError(
                    f"SPADE: image {name}: gt_classes {labels.tolist()} outside [0, {num_classes})"
                )
            gt_masks = inst.gt_masks
            gt_masks = gt_masks.tensor if hasattr(gt_masks, "tensor") else gt_masks
            masks = torch.zeros((len(labels), height, width), dtype=torch.bool, device=self.device)
            masks[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks.bool()
            relations = x.get("gt_relations", torch.zeros((0, 3), dtype=torch.long)).to(self.device)
            if len(relations):
                predicates = self._to_train_ids(relations[:, 2].long(), "predicate", name)
                relations = torch.cat([relations[:, :2], predicates[:, None]], dim=1)
            void = torch.zeros((height, width), dtype=torch.bool, device=self.device)
            h, w = images.image_sizes[i]
            void[:h, :w] = ~masks[:, :h, :w].any(0)
            targets.append(
                {"labels": labels, "masks": masks, "gt_relations": relations, "void": void}
            )
        return targets

    def _to_train_ids(self, ids: Tensor, kind: str, image: str) -> Tensor:
        """Dataset class / predicate ids -> training-vocabulary indices (identity without an
        open-vocabulary split); a novel id in a training target is an error, never a silent loss."""
        lut = self.train_vocabulary.label_lookup(kind)
        if lut is None or ids.numel() == 0:
            return ids
        table = torch.tensor(lut, dtype=torch.long, device=ids.device)
        bad = (ids < 0) | (ids >= len(lut))
        mapped = torch.where(bad, torch.full_like(ids, -1), table[ids.clamp(0, len(lut) - 1)])
        if bool((mapped < 0).any()):
            raise ValueError(
                f"SPADE: image {image}: training {kind} ids "
                f"{sorted(set(ids[mapped < 0].tolist()))} are not in the training vocabulary "
                "(novel names must be filtered from training data)"
            )
        return mapped

    def forward(self, batched_inputs: List[Dict]):
        """Losses (training) or per-image results (inference); see the class docstring."""
        images = self.preprocess_image(batched_inputs)
        outputs = self.predict(images)
        if not self.training:
            return self.inference(batched_inputs, images, outputs)
        targets = self.prepare_targets(batched_inputs, images)
        outputs["aux_outputs"] = outputs["aux_outputs"][: self.criterion.num_aux_outputs]
        panoptic_losses, matches = self.criterion(outputs, targets)
        losses = {k: v * self.mask_loss_weight for k, v in panoptic_losses.items()}
        if self.relation_head is not None:
            relation_losses = self.relation_head(
                query_features=outputs["query_features"],
                mask_logits=outputs["pred_masks"],
                class_probs=outputs["pred_logits"].softmax(-1),
                features=outputs["features"],
                clip_features=None,
                predicate_text=self.predicate_text_embeddings(),
                targets=targets,
                matches=matches,
            )
            overlap = set(relation_losses) & set(losses)
            if overlap:
                raise ValueError(f"SPADE: relation head loss names {sorted(overlap)} clash")
            losses.update(relation_losses)
        return losses

    # ------------------------------------------------------------------ inference
    def class_probabilities(
        self, outputs: Dict, clip_features: Optional[Tensor], images: Optional[Tensor] = None
    ) -> Tensor:
        """[B, Q, K+1] class probabilities; with the CLIP branch, the object part is the geometric
        fusion P = P_diff^alpha * P_clip^(1-alpha) (beta for novel classes), renormalised to the
        query's object probability 1 - p(no-object). ``clip_features``: [B, D, h', w'] or None.

        P_clip comes from the dense CLIP features pooled under the query's mask; with
        ``clip_crop_scale`` > 0 also from CLIP's embedding of a square crop around the mask's box
        (``images``, the normalised batch [B, 3, H, W], is then required), and the query's P_clip
        is ``w * P_crop + (1 - w) * P_pooled`` with ``w`` the diffusion branch's share of thing
        classes in its object probability."""
        probs = outputs["pred_logits"].softmax(-1)
        if clip_features is None or self.text_bank is None:
            return probs
        pooled = F.normalize(mask_pool(clip_features, outputs["pred_masks"].sigmoid()), dim=-1)
        text = F.normalize(self.class_text_embeddings().to(pooled.dtype), dim=-1)
        p_clip = (self.clip_logit_scale() * pooled @ text.T).softmax(-1)  # [B, Q, K]
        if self.clip_crop_scale > 0:
            if images is None:
                raise ValueError("class_probabilities: the CLIP crop branch needs `images`")
            p_crop = self.clip_crop_probabilities(images, outputs["pred_masks"], text)
            is_thing = torch.tensor(self.vocabulary.is_thing, device=probs.device)
            objects = probs[..., :-1]
            w = (objects * is_thing).sum(-1) / objects.sum(-1).clamp(min=1e-12)  # [B, Q]
            p_clip = w[..., None] * p_crop + (1 - w[..., None]) * p_clip
        novel = torch.tensor(self.vocabulary.novel_classes, dtype=torch.bool, device=probs.device)
        return geometric_fusion(probs, p_clip, self.fusion_alpha, self.fusion_beta, novel)

    def clip_crop_probabilities(self, images: Tensor, mask_logits: Tensor, text: Tensor) -> Tensor:
        """P_crop [B, Q, K]: CLIP's class probabilities of a square crop around each query's mask
        box (side ``clip_crop_scale`` x its longer side; the whole image for an empty mask).
        images [B, 3, H, W] (normalised, padded), mask_logits [B, Q, h, w], text [K, D] unit."""
        H, W = images.shape[-2:]
        # boxes from the masks at the image's resolution: at the mask resolution (stride 4) a
        # box edge is off by up to a cell, which moves the crop's framing that CLIP depends on
        fine = F.interpolate(mask_logits, size=(H, W), mode="bilinear", align_corners=False)
        boxes = mask_boxes(fine > 0)  # [B, Q, 4] in [0, 1]
        boxes = boxes * torch.tensor([W, H, W, H], device=boxes.device, dtype=boxes.dtype)
        boxes = square_context_boxes(boxes, self.clip_crop_scale, H, W)
        crops = F.normalize(self.backbone.clip_crop_embeddings(images, boxes), dim=-1)
        return (self.clip_logit_scale() * crops @ text.to(crops.dtype).T).softmax(-1)

    def clip_logit_scale(self) -> float:
        """Temperature of the CLIP branch: the CLIP model's own logit scale (100 if it has none)."""
        clip = getattr(self.backbone, "clip", None)
        scale = getattr(getattr(clip, "model", None), "logit_scale", None)
        return float(scale.exp()) if isinstance(scale, Tensor) else 100.0

    def panoptic_inference(self, class_probs: Tensor, mask_logits: Tensor):
        """One image: class_probs [Q, K+1], mask_logits [Q, H, W] -> (seg int32 [H, W],
        segments_info, query_to_segment long [Q]) with the model's thresholds and vocabulary."""
        return panoptic_inference(
            class_probs,
            mask_logits,
            self.vocabulary.is_thing,
            object_mask_threshold=self.object_mask_threshold,
            overlap_threshold=self.overlap_threshold,
            reassign_dropped=self.reassign_dropped,
        )

    def inference(self, batched_inputs: List[Dict], images: ImageList, outputs: Dict) -> List[Dict]:
        """Per image: panoptic segmentation at the original size (+ relations with a relation
        head)."""
        clip_features = None
        if self.use_clip_branch or self.relation_clip_branch:
            with torch.no_grad():
                clip_features = self.backbone.clip_dense_features(images.tensor)  # [B, D, h', w']
        class_probs = self.class_probabilities(
            outputs, clip_features if self.use_clip_branch else None, images.tensor
        )
        padded = images.tensor.shape[-2:]
        results, kept = [], []
        for i, x in enumerate(batched_inputs):
            image_size = images.image_sizes[i]
            height, width = x.get("height", image_size[0]), x.get("width", image_size[1])
            masks = F.interpolate(
                outputs["pred_masks"][i : i + 1], size=padded, mode="bilinear", align_corners=False
            )[0]
            masks = sem_seg_postprocess(masks, image_size, height, width)  # [Q, height, width]
            seg, segments_info, query_to_segment = self.panoptic_inference(class_probs[i], masks)
            results.append({"panoptic_seg": (seg, segments_info)})
            kept.append(query_to_segment)
        if self.relation_head is not None:
            pair_mask = None
            if self.pairs_from_kept_segments:
                seg = torch.stack(kept).to(class_probs.device)  # [B, Q]
                pair_mask = (seg[:, :, None] > 0) & (seg[:, None, :] > 0)
                pair_mask &= seg[:, :, None] != seg[:, None, :]
            extra = {} if pair_mask is None else {"pair_mask": pair_mask}
            relation_preds = self.relation_head(
                query_features=outputs["query_features"],
                mask_logits=outputs["pred_masks"],
                class_probs=class_probs,
                features=outputs["features"],
                clip_features=clip_features if self.relation_clip_branch else None,
                predicate_text=self.predicate_text_embeddings(),
                targets=None,
                matches=None,
                **extra,
            )
            for i, result in enumerate(results):
                result["relations"] = relation_inference(
                    relation_preds[i], kept[i], self.max_relations, self.predicates_per_pair
                )
        return results
