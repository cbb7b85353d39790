"""SPADE's additions to detectron2's yacs config.

One CN node per component; every key carries a one-line comment, naming the paper's symbol where
there is one. Call :func:`add_spade_config` on a fresh ``get_cfg()`` before merging a SPADE YAML.
"""

from detectron2.config import CfgNode as CN


def add_spade_config(cfg: CN) -> None:
    """Add every SPADE key (data, model, calibration, solver extras) to ``cfg`` in place."""
    _add_data_config(cfg)
    _add_model_config(cfg)
    _add_calibration_config(cfg)
    _add_solver_config(cfg)
    _add_evaluation_config(cfg)


def _add_data_config(cfg: CN) -> None:
    # ---------------------------------------------------------------- input / augmentation
    cfg.INPUT.DATASET_MAPPER_NAME = "spade_psg"  # mapper used by build_train_loader
    cfg.INPUT.IMAGE_SIZE = 512  # side of the square training crop (large-scale jitter target)
    cfg.INPUT.MIN_SCALE = 0.5  # large-scale jitter: smallest resize factor of IMAGE_SIZE
    cfg.INPUT.MAX_SCALE = 1.5  # large-scale jitter: largest resize factor of IMAGE_SIZE
    # > 0: each training image is augmented in one of this many fixed ways (drawn per use; the
    # same slot gives the same pixels), so that DIFFUSION.FEATURE_CACHE can reuse its features;
    # 0 = a fresh random augmentation every time
    cfg.INPUT.AUGMENTATION_SLOTS = 0
    cfg.INPUT.RANDOM_FLIP = "horizontal"  # "none" or "horizontal" (swaps predicates by flip map)
    cfg.INPUT.CROP.MIN_KEEP_AREA = 16  # a segment with fewer visible pixels after a crop is dropped
    cfg.INPUT.SIZE_DIVISIBILITY = -1  # pad to this; -1 = the backbone's size_divisibility
    cfg.INPUT.CORRUPT_IMAGE_POLICY = "skip"  # unreadable image: "skip" (logged, counted) or "fatal"

    # ---------------------------------------------------------------- datasets
    cfg.DATASETS.SYNTHPSG = CN()
    cfg.DATASETS.SYNTHPSG.ROOT = "datasets/synthpsg"  # where the generated SynthPSG lives
    cfg.DATASETS.SYNTHPSG.NUM_IMAGES = 600  # images generated when ROOT is empty
    cfg.DATASETS.SYNTHPSG.SEED = 0  # generator seed
    cfg.DATASETS.SYNTHPSG.IMAGE_SIZE = 128  # side of a SynthPSG image
    # your own PSG-format dataset, registered by the entry points before training (datasets/README)
    cfg.DATASETS.CUSTOM = CN()
    cfg.DATASETS.CUSTOM.NAME = ""  # "" = none; else registers NAME_train, NAME_val, NAME_test
    cfg.DATASETS.CUSTOM.JSON_FILE = ""  # its psg.json (thing / stuff / predicate lists inside)
    cfg.DATASETS.CUSTOM.IMAGE_ROOT = ""  # root of the json's `file_name` entries
    cfg.DATASETS.CUSTOM.PANOPTIC_ROOT = ""  # root of the json's `pan_seg_file_name` entries
    cfg.DATASETS.CUSTOM.OV_SPLIT = ""  # optional base/novel split json: also NAME_{split}_ov


def _add_model_config(cfg: CN) -> None:
    cfg.MODEL.SPADE = CN()
    s = cfg.MODEL.SPADE
    s.PRESET = "TINY"  # "TINY" (small random models from configs) or "PRETRAINED" (load weights)
    s.SIZE_DIVISIBILITY = 32  # input padding multiple for the whole model
    s.ALLOW_PARTIAL_CHECKPOINT = False  # opt-in: load a MODEL.WEIGHTS lacking model keys (random)
    s.ALLOW_UNTRAINED = False  # opt-in: --eval-only / demo / predictor without MODEL.WEIGHTS

    # ------------------------------------------------------------ diffusion UNet / VAE / scheduler
    s.DIFFUSION = CN()
    s.DIFFUSION.PRETRAINED = ""  # diffusers-format directory or hub id (SD 1.5); "" = TINY preset
    s.DIFFUSION.DTYPE = "float32"  # dtype of the frozen diffusion parts ("float16" on GPU)
    s.DIFFUSION.TIMESTEP = 0  # t of the single feature-extraction UNet pass (0 = clean latent)
    s.DIFFUSION.NOISE_SEED = 0  # seed of the fixed noise added at TIMESTEP (deterministic)
    s.DIFFUSION.FEATURE_BLOCKS = ["up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3"]
    # ^ decoder blocks whose outputs become multi-scale features (named, not indexed)
    s.DIFFUSION.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # backbone output names
    s.DIFFUSION.OUT_CHANNELS = 256  # channels of every projected output feature
    s.DIFFUSION.TRAIN_BACKBONE_PROJ = True  # the light projection convs train in stage 2
    s.DIFFUSION.CALIBRATED_WEIGHTS = ""  # stage-1 output (LoRA + adapter safetensors) to load
    # ^ "" at --eval-only / demo: taken from the provenance record of MODEL.WEIGHTS
    s.DIFFUSION.TRAIN_LORA = False  # stage 2 also trains LoRA (grad through the UNet pass)
    s.DIFFUSION.TRAIN_ADAPTER = False  # stage 2 also trains the implicit-text MLP adapter
    # > 0: in training, keep the captured UNet outputs of up to this many images and reuse them
    # when the same augmented image returns (with INPUT.AUGMENTATION_SLOTS); needs TRAIN_LORA and
    # TRAIN_ADAPTER False. 0 = off
    s.DIFFUSION.FEATURE_CACHE = 0
    # TINY preset shapes
    s.DIFFUSION.TINY = CN()
    s.DIFFUSION.TINY.BLOCK_OUT_CHANNELS = [32, 64, 64, 64]  # UNet channels per resolution
    s.DIFFUSION.TINY.LAYERS_PER_BLOCK = 1  # resnet layers per UNet block
    s.DIFFUSION.TINY.ATTENTION_HEAD_DIM = 8  # UNet attention head dim
    s.DIFFUSION.TINY.CROSS_ATTENTION_DIM = 32  # must equal the TINY CLIP text width
    s.DIFFUSION.TINY.VAE_BLOCK_OUT_CHANNELS = [16, 32, 32, 32]  # VAE channels (3 downsamples: /8)
    s.DIFFUSION.TINY.LATENT_CHANNELS = 4  # VAE latent channels
    s.DIFFUSION.TINY.SEED = 0  # seed of the random TINY weights

    # ------------------------------------------------------------ CLIP (open_clip)
    s.CLIP = CN()
    s.CLIP.MODEL_NAME = "TINY"  # open_clip model name (e.g. "ViT-L-14"); "TINY" = 2-layer model
    s.CLIP.PRETRAINED = ""  # checkpoint path (or open_clip tag when a network exists)
    s.CLIP.TINY = CN()
    s.CLIP.TINY.EMBED_DIM = 32  # joint embedding dim of the TINY CLIP
    s.CLIP.TINY.WIDTH = 32  # width of the TINY vision and text towers
    s.CLIP.TINY.LAYERS = 2  # layers of each TINY tower
    s.CLIP.TINY.IMAGE_SIZE = 64  # TINY vision input size
    s.CLIP.TINY.PATCH_SIZE = 8  # TINY vision patch size
    s.CLIP.TINY.SEED = 0  # seed of the random TINY weights

    # ------------------------------------------------------------ implicit text encoder
    s.IMPLICIT_TEXT = CN()
    s.IMPLICIT_TEXT.NUM_TOKENS = 8  # K: tokens produced for the UNet's cross-attention
    s.IMPLICIT_TEXT.HIDDEN_DIM = 256  # hidden size of the MLP adapter
    s.IMPLICIT_TEXT.SEED = 0  # seed of the adapter's random init

    # ------------------------------------------------------------ LoRA on cross-attention
    s.LORA = CN()
    s.LORA.ENABLED = True  # LoRA on attn2 (False = ablation: stage 1 fine-tunes the whole UNet)
    s.LORA.RANK = 4  # r: rank of delta W = B x D
    s.LORA.ALPHA = 4  # LoRA scaling numerator (scale = LORA.ALPHA / r); not the fusion alpha
    s.LORA.TARGET_MODULES = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    s.LORA.INIT_WEIGHTS = True  # peft's init (B = 0); False gives a non-zero random init (tests)
    s.LORA.MERGE_FOR_INFERENCE = False  # merge LoRA into the UNet weights at inference
    s.LORA.SEED = 0  # seed of the random LoRA init when INIT_WEIGHTS is False

    # ------------------------------------------------------------ open vocabulary
    s.OPEN_VOCAB = CN()
    s.OPEN_VOCAB.TEMPLATES = ["a photo of a {}.", "a {} in the scene.", "there is a {}."]
    # ^ prompt templates ensembled for class names
    s.OPEN_VOCAB.PREDICATE_TEMPLATES = [
        "{}",
        "something {} something.",
        "a photo of a thing {} another thing.",
    ]
    # ^ prompt templates ensembled for predicate names
    s.OPEN_VOCAB.FUSION_ALPHA = 0.34  # alpha: P = P_diff^alpha * P_clip^(1-alpha), base classes
    s.OPEN_VOCAB.FUSION_BETA = 0.34  # beta: the same exponent for novel classes
    s.OPEN_VOCAB.USE_CLIP_BRANCH = True  # fuse the CLIP mask-pooled branch at inference
    s.OPEN_VOCAB.LOGIT_SCALE_INIT = 2.659  # log of the cosine classifier's initial temperature
    # whiten the class text embeddings the cosine classifier compares queries with (fitted on the
    # training vocabulary; spade.modeling.open_vocab.TextWhitening); 0 = off, (0, 1] = shrinkage
    # toward the identity (1 = centring only). The CLIP branch always uses the raw embeddings.
    s.OPEN_VOCAB.TEXT_WHITENING = 0.0
    # CLIP branch regions: 0 = the paper's dense CLIP features pooled under each query's mask;
    # > 0 = also a square crop of side CLIP_CROP_SCALE x the longer side of the mask's box,
    # encoded by CLIP's image tower (as region classifiers of open-vocabulary detection do),
    # scoring things; the query's P_clip mixes crop and mask pooling by its diffusion-branch
    # thing probability (stuff stays mask-pooled).
    s.OPEN_VOCAB.CLIP_CROP_SCALE = 0.0
    s.OPEN_VOCAB.CLASS_NAMES = []  # override the dataset's class names at inference ([] = dataset)
    s.OPEN_VOCAB.PREDICATE_NAMES = []  # override the dataset's predicate names at inference

    # ------------------------------------------------------------ pixel decoder
    s.PIXEL_DECODER = CN()
    s.PIXEL_DECODER.NAME = "MSDeformAttnPixelDecoder"  # in SPADE_PIXEL_DECODER_REGISTRY
    s.PIXEL_DECODER.CONVS_DIM = 256  # channels of the FPN path
    s.PIXEL_DECODER.MASK_DIM = 256  # channels of the mask-feature map
    s.PIXEL_DECODER.IN_FEATURES = ["res2", "res3", "res4", "res5"]  # backbone features used
    s.PIXEL_DECODER.DEFORMABLE_IN_FEATURES = ["res3", "res4", "res5"]  # scales of the encoder
    s.PIXEL_DECODER.COMMON_STRIDE = 4  # stride of the mask-feature map (4 or 8)
    s.PIXEL_DECODER.ENCODER_LAYERS = 6  # deformable-attention encoder layers
    s.PIXEL_DECODER.NHEADS = 8  # attention heads
    s.PIXEL_DECODER.NPOINTS = 4  # sampling points per head per level
    s.PIXEL_DECODER.DIM_FEEDFORWARD = 1024  # encoder FFN width
    s.PIXEL_DECODER.DROPOUT = 0.0  # encoder dropout
    s.PIXEL_DECODER.NORM = "GN"  # norm of the FPN convs

    # ------------------------------------------------------------ transformer decoder
    s.MASK_HEAD = CN()
    s.MASK_HEAD.NUM_OBJECT_QUERIES = 100  # learnable object queries
    s.MASK_HEAD.HIDDEN_DIM = 256  # query width
    s.MASK_HEAD.NHEADS = 8  # attention heads
    s.MASK_HEAD.DIM_FEEDFORWARD = 2048  # FFN width
    s.MASK_HEAD.DEC_LAYERS = 9  # decoder layers (round-robin over scales)
    s.MASK_HEAD.PRE_NORM = False  # pre-norm transformer layers
    s.MASK_HEAD.ENFORCE_INPUT_PROJ = False  # always project features to HIDDEN_DIM
    s.MASK_HEAD.DEEP_SUPERVISION = True  # losses on every decoder layer
    s.MASK_HEAD.NO_OBJECT_WEIGHT = 0.1  # cross-entropy weight of the no-object class
    s.MASK_HEAD.VOID_QUERY_SHARE = 0.0
    # ^ > 0: an unmatched query with at least this share of its predicted mask on unlabelled pixels
    #   (void, or the segments an open-vocabulary split removes: its novel objects) is left out of
    #   the class loss instead of being taught "no object"; 0 = Mask2Former's loss
    s.MASK_HEAD.CLASS_WEIGHT = 2.0  # class loss and matching-cost weight
    s.MASK_HEAD.MASK_WEIGHT = 5.0  # BCE mask loss and cost weight
    s.MASK_HEAD.DICE_WEIGHT = 5.0  # dice loss and cost weight
    s.MASK_HEAD.TRAIN_NUM_POINTS = 12544  # points sampled per mask for matching and losses
    s.MASK_HEAD.OVERSAMPLE_RATIO = 3.0  # importance sampling: oversampling ratio
    s.MASK_HEAD.IMPORTANCE_SAMPLE_RATIO = 0.75  # importance sampling: share of uncertain points
    s.MASK_HEAD.PANOPTIC_LOSS_WEIGHT = 1.0  # lambda_mask: scales the panoptic losses in L
    s.MASK_HEAD.OPEN_VOCAB = True  # classify queries against CLIP text embeddings (cosine)
    # > 0: before a query is classified, add an embedding of its own predicted mask's shape
    # (the mask inside its box resampled to SIZE x SIZE; MaskShapeEmbedding); 0 = off
    s.MASK_HEAD.SHAPE_EMBED_SIZE = 0

    # ------------------------------------------------------------ panoptic inference
    s.TEST = CN()
    s.TEST.OBJECT_MASK_THRESHOLD = 0.8  # minimum query score kept in panoptic inference
    s.TEST.OVERLAP_THRESHOLD = 0.8  # minimum visible share of a query's mask
    # repeat the panoptic merge without the queries the overlap rule dropped, so that their pixels
    # go to the next-best kept query instead of staying void (False = Mask2Former's single pass)
    s.TEST.REASSIGN_DROPPED = False
    s.TEST.MAX_RELATIONS = 100  # ranked triplets returned per image
    # rows per (subject, object) segment pair, its best predicates: 1 = one predicate per pair
    # (the fair "single" protocol); k > 1 = up to k rows with different predicates, as the
    # benchmark's protocol allows ("multiple MPO"; the evaluator reports "single" beside)
    s.TEST.PREDICATES_PER_PAIR = 1
    # the relation head's top-M pairs are chosen among pairs of two different kept panoptic
    # segments (False: among all query pairs; pairs of dropped queries are discarded after)
    s.TEST.PAIRS_FROM_KEPT_SEGMENTS = True

    # ------------------------------------------------------------ relation head (RGT)
    s.RELATION = CN()
    s.RELATION.ENABLED = True  # build the relation head (False: panoptic model only)
    s.RELATION.NAME = "RGTRelationHead"  # in SPADE_RELATION_HEAD_REGISTRY
    s.RELATION.HIDDEN_DIM = 256  # width of relation features
    s.RELATION.NHEADS = 8  # attention heads of RGT_g
    s.RELATION.RGT_LAYERS = 2  # stacked RGT_g layers
    s.RELATION.GCN_LAYERS = 1  # RGT_l GCN layers
    s.RELATION.GRAPH_MODE = "fixed"  # "fixed" (paper thresholds) or "knn" (adaptive)
    s.RELATION.ETA = 0.65  # eta: cosine threshold of the spatial-semantic graph
    s.RELATION.ADJACENCY_DISTANCE = 2  # masks within this many pixels (at graph resolution) touch
    s.RELATION.GRAPH_RESOLUTION = 32  # side of the downsampled masks for adjacency
    s.RELATION.KNN = 4  # k of the adaptive k-nearest-neighbour graph
    s.RELATION.NUM_PAIRS = 128  # M: candidate (subject, object) pairs per image
    s.RELATION.PAIR_CHUNK = 1024  # pairs scored per chunk (bounds memory for large Q)
    s.RELATION.USE_NEIGHBOUR_ATTENTION = True  # ablation: RGT_g over neighbours P+
    s.RELATION.USE_NON_NEIGHBOUR_ATTENTION = True  # ablation: RGT_g over non-neighbours P-
    s.RELATION.USE_LOCAL_GCN = True  # ablation: RGT_l
    s.RELATION.USE_RQC_LOSS = True  # ablation: auxiliary relation-query construction loss
    s.RELATION.USE_CLIP_BRANCH = True  # ablation: CLIP joint-mask pooled predicate branch
    s.RELATION.BASELINE_PAIR_MLP = False  # plain pair-MLP baseline without graph reasoning
    s.RELATION.REL_WEIGHT = 1.0  # weight of L_rel in L
    s.RELATION.RQC_WEIGHT = 0.6  # lambda_rqc: weight of the relation-query construction loss
    s.RELATION.NO_RELATION_WEIGHT = 0.1  # cross-entropy weight of the no-relation class
    s.RELATION.DIM_FEEDFORWARD = 1024  # MLP width of RGT_g layers and of the pair MLP
    s.RELATION.POOL_FEATURE = "mask_features"  # map in `features` pooled under the joint mask
    s.RELATION.TEXT_DIM = 0  # D of predicate text embeddings; 0 = the CLIP model's embed dim
    s.RELATION.NUM_PREDICATES = 0  # closed-set predicate classes (no text); 0 = DATASETS.TRAIN[0]'s
    # predicate fusion exponents (P = P_diff^a * P_clip^(1-a)); -1 = OPEN_VOCAB.FUSION_ALPHA /
    # _BETA. Apart from the object ones they isolate the predicate branches (ablations: 1 =
    # diffusion/RGT branch only, 0 = CLIP joint-mask branch only) with object scoring unchanged.
    s.RELATION.FUSION_ALPHA = -1.0
    s.RELATION.FUSION_BETA = -1.0
    s.RELATION.CLIP_TEMPERATURE = 100.0  # logit scale of the CLIP joint-mask predicate branch
    # the same whitening for the predicate text of the relation head's cosine classifier
    s.RELATION.TEXT_WHITENING = 0.0
    # train L_rel also on every ordered pair of matched queries (ground-truth objects without a
    # relation are "no relation" rows), besides the top-M selected pairs and the ground-truth
    # pairs: without them, pairs the selection never picks in training (e.g. stuff-stuff) reach
    # inference with no negative example
    s.RELATION.TRAIN_MATCHED_PAIRS = False


def _add_calibration_config(cfg: CN) -> None:
    cfg.CALIBRATION = CN()
    c = cfg.CALIBRATION
    c.ENABLED = True  # False = ablation "no calibration": see the comment below
    # ^ stage 2 then runs the pretrained UNet without LoRA, conditioned on the K implicit tokens
    #   of the seeded, untrained MLP adapter (CLIP image features through a random MLP);
    #   DIFFUSION.CALIBRATED_WEIGHTS must be empty and DIFFUSION.TRAIN_LORA False
    c.INVERSION = "belm"  # "belm" (exact) or "ddim" (ablation) inversion
    c.SAMPLER = "belm"  # "belm" (O-BELM) or "ddim" deterministic sampling of the teacher
    c.NOISE = "inversion"  # "inversion" or "random" (ablation: random noise instead of inversion)
    c.NUM_INFERENCE_STEPS = 10  # inversion / sampling steps
    c.GUIDANCE_SCALE = 1.0  # classifier-free guidance of the teacher (1 = none)
    c.CAPTURE_TIMESTEPS = []  # sampling states i in 1..N (N = noisiest) averaged ([] = all)
    c.MAP_RESOLUTION = 16  # side of the aggregated attention maps
    c.PROMPT_TEMPLATE = "{subject} is {predicate} {object}"  # teacher prompt per triplet
    c.MAX_TRIPLETS_PER_IMAGE = 8  # ground-truth triplets used per image
    c.LAMBDA = 1.0  # lambda of L_cal
    c.STUDENT_MAPS = "prompt_tokens"  # A_i' from "prompt_tokens" or "implicit_tokens" (model.py)
    c.CACHE_DIR = ""  # teacher-map cache ("" = OUTPUT_DIR/teacher_maps)
    c.IMAGE_SIZE = 256  # images are resized to this square side for stage 1
    c.EVAL_PERIOD = 0  # held-out L_cal every N iterations (0 = only at the end)
    c.EVAL_DATASET = ""  # dataset of the held-out L_cal ("" = DATASETS.TEST[0])
    c.NUM_VIS_IMAGES = 2  # images whose teacher/student maps are drawn to PNG
    c.MAP_NORMALIZATION = "max"  # per-map normalisation of A_i and A_i': "max", "sum" or "none"
    c.LOG_PERIOD = 20  # iterations between console / metrics.json / TensorBoard writes
    c.MAX_TRAIN_IMAGES = 0  # calibrate on the first N training images with relations (0 = all)
    c.MAX_EVAL_IMAGES = 0  # held-out images for the L_cal evaluation (0 = all)


def _add_solver_config(cfg: CN) -> None:
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # "ADAMW" or "SGD"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1  # LR multiplier of trainable backbone parts
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0  # weight decay of embeddings (queries, background)
    cfg.SOLVER.NONFINITE_LOSS = "raise"  # a NaN/inf loss: "raise" (names the term) or "skip"


def _add_evaluation_config(cfg: CN) -> None:
    cfg.TEST.PSG_EVAL = CN()
    cfg.TEST.PSG_EVAL.PROTOCOL = "both"  # "multi" (benchmark MPO), "single" (fair) or "both"
    cfg.TEST.PSG_EVAL.IOU_THRESHOLD = 0.5  # subject and object mask (box for VG) IoU to match
    cfg.TEST.PSG_EVAL.RECALL_KS = [20, 50, 100]  # K of R@K / mR@K
    cfg.TEST.PSG_EVAL.PANOPTIC = True  # also compute PQ / SQ / RQ (masks only)


# Keys whose value must be one of a fixed set (checked by validate_spade_config).
_CHOICES = {
    "INPUT.RANDOM_FLIP": ("none", "horizontal"),
    "INPUT.CORRUPT_IMAGE_POLICY": ("skip", "fatal"),
    "INPUT.FORMAT": ("RGB", "BGR"),
    "MODEL.SPADE.PRESET": ("TINY", "PRETRAINED"),
    "MODEL.SPADE.DIFFUSION.DTYPE": ("float32", "float16", "bfloat16"),
    "MODEL.SPADE.RELATION.GRAPH_MODE": ("fixed", "knn"),
    "CALIBRATION.INVERSION": ("belm", "ddim"),
    "CALIBRATION.SAMPLER": ("belm", "ddim"),
    "CALIBRATION.NOISE": ("inversion", "random"),
    "CALIBRATION.MAP_NORMALIZATION": ("max", "sum", "none"),
    "CALIBRATION.STUDENT_MAPS": ("prompt_tokens", "implicit_tokens"),
    "SOLVER.OPTIMIZER": ("ADAMW", "SGD"),
    "SOLVER.NONFINITE_LOSS": ("raise", "skip"),
    "TEST.PSG_EVAL.PROTOCOL": ("multi", "single", "both"),
}
# Keys whose value must lie in a range: (low, high, low inclusive).
_RANGES = {
    "MODEL.SPADE.OPEN_VOCAB.FUSION_ALPHA": (0.0, 1.0),
    "MODEL.SPADE.OPEN_VOCAB.FUSION_BETA": (0.0, 1.0),
    "MODEL.SPADE.MASK_HEAD.VOID_QUERY_SHARE": (0.0, 1.0),
    "MODEL.SPADE.RELATION.ETA": (-1.0, 1.0),
    "MODEL.SPADE.OPEN_VOCAB.TEXT_WHITENING": (0.0, 1.0),
    "MODEL.SPADE.OPEN_VOCAB.CLIP_CROP_SCALE": (0.0, None),
    "MODEL.SPADE.RELATION.TEXT_WHITENING": (0.0, 1.0),
    "TEST.PSG_EVAL.IOU_THRESHOLD": (0.0, 1.0),
    "SOLVER.IMS_PER_BATCH": (1, None),
    "SOLVER.MAX_ITER": (0, None),
    "SOLVER.BASE_LR": (0.0, None),
    "MODEL.SPADE.LORA.RANK": (1, None),
    "MODEL.SPADE.IMPLICIT_TEXT.NUM_TOKENS": (1, None),
    "MODEL.SPADE.MASK_HEAD.NUM_OBJECT_QUERIES": (1, None),
    "MODEL.SPADE.MASK_HEAD.SHAPE_EMBED_SIZE": (0, None),
    "MODEL.SPADE.DIFFUSION.FEATURE_CACHE": (0, None),
    "INPUT.AUGMENTATION_SLOTS": (0, None),
    "MODEL.SPADE.TEST.PREDICATES_PER_PAIR": (1, None),
    "INPUT.IMAGE_SIZE": (1, None),
}


def _get(cfg: CN, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate_spade_config(cfg: CN) -> None:
    """Check the enumerated and ranged keys; a bad value is a ValueError naming the key, the
    value and what is allowed."""
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ValueError(f"{key} = {value!r} is not one of {list(allowed)}")
    for key in ("MODEL.SPADE.RELATION.FUSION_ALPHA", "MODEL.SPADE.RELATION.FUSION_BETA"):
        value = _get(cfg, key)
        if value != -1.0 and not 0.0 <= value <= 1.0:
            raise ValueError(f"{key} = {value!r} must be in [0, 1], or -1 (OPEN_VOCAB's value)")
    for key, (low, high) in _RANGES.items():
        value = _get(cfg, key)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"{key} = {value!r} must be {bounds}")
