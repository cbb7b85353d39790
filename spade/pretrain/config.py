"""Config of stage 0: pretraining the miniature foundation models (tiny CLIP, VAE, UNet).

:func:`add_pretrain_config` adds one ``PRETRAIN`` node to detectron2's config (SOLVER, OUTPUT_DIR,
SEED and MODEL.DEVICE keep their detectron2 meaning). ``PRETRAIN.TASK`` picks the model a run
trains; each task exports its model in the format of the real one it stands in for.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_pretrain_config"]


def add_pretrain_config(cfg: CN) -> None:
    """Add the ``PRETRAIN`` node (every key commented) to ``cfg`` in place."""
    cfg.PRETRAIN = CN()
    p = cfg.PRETRAIN
    p.TASK = "clip"  # "clip", "vae" or "unet": the model this run trains
    p.EXPORT_DIR = ""  # folder the trained model is exported to (its standard format)
    p.NUM_WORKERS = 0  # processes making CLIP batches and building the corpus (0 = this one)
    p.MAX_WALL_SECONDS = 0.0  # end training after this many seconds of it (0 = at MAX_ITER)
    # torch.compile the trained network in place before training (the UNet task only): "off",
    # "on", or "auto" = on the CPU where inductor's C++ compiler builds a test kernel, else off
    # (CUDA: not measured). Same model within bf16 rounding; the first step compiles (1-4 min,
    # cached after)
    p.COMPILE = "off"

    # ------------------------------------------------------------ caption corpus ("web data")
    p.CORPUS = CN()
    p.CORPUS.ROOT = "datasets/caption_corpus_s0"  # where the rendered corpus is cached
    p.CORPUS.SEED = 0  # corpus seed; renders with generator seed 1,000,000 + SEED
    p.CORPUS.NUM_IMAGES = 24000  # images in the corpus
    p.CORPUS.IMAGE_SIZE = 128  # side of a corpus image (SynthPSG's default)
    p.CORPUS.SHARD_SIZE = 2000  # images per cached shard (a build resumes shard by shard)
    p.CORPUS.NUM_THINGS = [1, 8]  # inclusive range of things per corpus image
    p.CORPUS.SYNONYM_PROB = 0.15  # probability of a synonym for each name in a caption
    p.CORPUS.HELD_OUT = 200  # images after NUM_IMAGES rendered for held-out evaluation only

    # ------------------------------------------------------------ tiny CLIP (open_clip format)
    p.CLIP = CN()
    p.CLIP.NAME = "SynthPSG-Tiny-CLIP"  # in the manifest; SPADE configs give it as CLIP.MODEL_NAME
    p.CLIP.EMBED_DIM = 64  # joint image-text embedding dim
    p.CLIP.IMAGE_SIZE = 96  # vision input side
    p.CLIP.PATCH_SIZE = 8  # vision patch side (IMAGE_SIZE / PATCH_SIZE tokens a side)
    p.CLIP.VISION_WIDTH = 96  # vision transformer width
    p.CLIP.VISION_LAYERS = 4  # vision transformer layers
    p.CLIP.VISION_POOL = "avg"  # "avg": the image embedding is the mean of the dense features
    p.CLIP.TEXT_WIDTH = 64  # text transformer width (= the UNet's cross_attention_dim)
    p.CLIP.TEXT_LAYERS = 4  # text transformer layers
    p.CLIP.HEAD_WIDTH = 32  # width of one attention head in both towers
    p.CLIP.CROP_PROB = 0.4  # share of samples that are a crop around one thing + its caption
    p.CLIP.HARD_NEGATIVES = 0  # per crop: captions naming another shape, ranked below the true one
    # weight of the region loss: every segment of a whole image, mask-pooled from the dense
    # features (as stage 2 pools them), is classified among all class names (0 = off)
    p.CLIP.REGION_WEIGHT = 0.0
    # False freezes the text tower (a fine-tune of a CLIP whose text tower already conditions a
    # trained UNet: its hidden states, and so the UNet, stay valid)
    p.CLIP.TRAIN_TEXT = True

    # ------------------------------------------------------------ tiny VAE (AutoencoderKL)
    p.VAE = CN()
    p.VAE.BLOCK_OUT_CHANNELS = [32, 64, 64]  # channels per level (len - 1 downsamples: /4)
    p.VAE.LAYERS_PER_BLOCK = 1  # resnet layers per block
    p.VAE.LATENT_CHANNELS = 4  # latent channels (SD's 4)
    p.VAE.CROP_SIZE = 64  # training crop side (the VAE is fully convolutional)
    p.VAE.KL_WEIGHT = 1e-6  # weight of the KL term (SD's autoencoder uses 1e-6)
    p.VAE.L2_WEIGHT = 1.0  # weight of the squared-error term beside the L1 term
    # False trains the decoder only: the latents (and a UNet trained on them) stay as they are
    p.VAE.TRAIN_ENCODER = True

    # ------------------------------------------------------------ tiny UNet (UNet2DConditionModel)
    p.UNET = CN()
    p.UNET.BLOCK_OUT_CHANNELS = [64, 128, 128]  # channels per level
    p.UNET.CROSS_ATTENTION_LEVELS = [True, True, False]  # levels with cross-attention blocks
    p.UNET.ONLY_CROSS_ATTENTION_LEVELS = [True, False, False]
    # ^ levels whose self-attention is replaced by a second cross-attention (CPU cost at 32 x 32)
    p.UNET.LAYERS_PER_BLOCK = 1  # resnet (+ transformer) layers per block
    p.UNET.ATTENTION_HEAD_DIM = 32
    # ^ diffusers' ``attention_head_dim``, which UNet2DConditionModel uses as the NUMBER of heads
    #   per layer (as SD 1.5's config does: 8 heads); 32 heads on 64-128 channels are 2-4 channels
    #   each (what the shipped UNet has, see MODEL_ZOO.md). HEAD_CHANNELS overrides it.
    p.UNET.HEAD_CHANNELS = 0  # > 0: heads of this many channels at every level (channels / it)
    p.UNET.CLIP = ""  # the pretrained tiny CLIP (open_clip folder): its text tower conditions
    p.UNET.VAE = ""  # the pretrained diffusers folder holding vae/
    p.UNET.NUM_IMAGES = 0  # train on the first N corpus images (0 = all; each VAE-encoded once)
    p.UNET.CAPTION_DROPOUT = 0.1  # share of empty captions (classifier-free guidance)
    p.UNET.GROUNDING_WEIGHT = 0.0
    # ^ > 0: adds this times the token grounding loss (spade/pretrain/grounding.py, TokenCompose's):
    #   each caption noun's cross-attention is pulled onto its class's corpus segments
    p.UNET.GROUNDING_PIXEL_WEIGHT = 0.0
    # ^ > 0: adds this times TokenCompose's pixel loss (grounding.py): per pixel, a noun's attention
    #   probability against its class mask (BCE), which also says where the noun's peak belongs
    p.UNET.GROUNDING_PIXEL_PHRASE = False
    # ^ True: the pixel loss reads the whole noun phrase ("small red circle": size and colour
    #   words summed with the noun), so it leaves the split of the attention between the words
    #   of a phrase free; the token loss always reads the noun alone
    p.UNET.TEACHER_FORM_SHARE = 0.0
    # ^ share of captions drawn in the stage-1 teacher form "[subject] is [predicate] [object]"
    #   (the corpus's "bare" kind; its own mix has 20 %); 0 = the corpus's mix
    p.UNET.LATENT_CACHE = ""  # cache of the corpus's VAE latents ("" = OUTPUT_DIR/latents.npy)
    p.UNET.FILL_LATENT_CACHE = True
    # ^ encode the images the latent cache lacks in a pass of their own before training (batched,
    #   with progress; the same latents); False encodes each batch's new images in its data step
    p.UNET.SEGMENT_CACHE = ""
    # ^ cache of the corpus's segment label maps, which the grounding losses read, rendered once
    #   per image instead of once per batch ("" = OUTPUT_DIR/segments.npy)

    # ------------------------------------------------------------ gates (measured on synthpsg_val)
    p.GATES = CN()
    p.GATES.DATA_ROOT = "datasets/synthpsg"  # SynthPSG folder whose val split the gates use
    p.GATES.DATA_NUM_IMAGES = 600  # its size (generated when missing, as the SPADE configs do)
    p.GATES.DATA_SEED = 0  # its seed
    p.GATES.NUM_IMAGES = 0  # val images used (0 = all 60; tests use fewer)
    p.GATES.NUM_TRIPLETS = 240  # triplets of the UNet pointing game (>= 200)
    p.GATES.COMPARISON_TRIPLETS = 80  # triplets of each comparison teacher (DDIM, noise, random)
    p.GATES.WORD_MAP_IMAGES = 30  # val images of the word-map probe (~160 things; 0 = all)
    p.GATES.CALIBRATION_CONFIG = "configs/calibration/SynthPSG-Tiny.yaml"
    # ^ stage-1 config whose teacher settings (steps, map resolution...) the pointing game uses
    p.GATES.RETRIEVAL_CAPTIONS = 100  # held-out corpus captions of the retrieval gate
