"""One parameter schema for every notebook.

Each notebook has a tagged ``parameters`` cell that assigns plain Python values (papermill
overrides them with ``-p name value`` or ``-f params/file.yaml``).  The next cell calls
:func:`resolve_params`, which picks the known names out of the notebook namespace, coerces
and validates them against :data:`SCHEMA`, fills the derived values (image size, device,
output folder) and returns a :class:`Params` mapping that is written to ``params.yaml``.

Validation is strict and early: an unknown backbone, a wrong type or a negative epoch count
stops the run before anything is written, with a message that names the parameter, the value
received and what would be valid.
"""
from __future__ import annotations

import ast
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import yaml

from .backbone_specs import BACKBONES, get_backbone_spec
from .constants import ASPECTS, DATASETS

__all__ = [
    "ParamError",
    "ParamSpec",
    "SCHEMA",
    "STAGES",
    "Params",
    "resolve_params",
    "params_from_namespace",
    "stage_values",
    "section_overrides",
    "papermill_given_names",
    "load_params_file",
    "set_twice",
    "ASPECTS",
    "NOT_RESULTS",
    "EVALUATION_PARAMETERS",
    "run_identity",
    "EXIF_ORIENTATIONS",
    "exif_orientation_for",
    "held_out_fraction",
    "holds_out_val_images",
]

#: Stages (one notebook each).  ``common`` parameters apply to all of them.
STAGES = ("pretrain", "stage0", "stage1", "stage2", "stage3", "handid", "evaluation",
          "attention", "search")

GALLERY_MODES = ("aspect", "all")
RESIZE_MODES = ("pad", "squash")
AP_MODES = ("standard", "mbanet_trapezoid")

#: Model-selection policies of the training stages (parameter ``selection``).
SELECTION_POLICIES = ("last", "best", "retrain", "best_accuracy")

#: Stages that train (their schema adds the optimisation parameters).
TRAINING = ("pretrain", "stage1", "stage2", "stage3", "handid")

#: Stages that read images of a dataset through the decoded-image pipeline (``data/images.py``).
IMAGE_STAGES = ("stage0", "stage1", "stage2", "stage3", "handid", "evaluation", "attention",
                "search")

#: ``exif_orientation`` values: ``auto`` resolves to one of the other two
#: (:func:`exif_orientation_for`; ``data/image_files.py`` applies them).
EXIF_ORIENTATIONS = ("auto", "exif", "ignore")

#: ``amp_dtype`` values (``device.AMP_DTYPES``; a test keeps the two equal).
AMP_DTYPE_NAMES = ("float16", "bfloat16")

#: Stages that build a CLIP backbone from their own parameters (pretraining builds its own
#: model; the attention notebook rebuilds its stage-3 run from that run's parameters; the search
#: notebook builds its zero-shot ``backbone`` when it has no ``run_dir``).
BACKBONE_STAGES = ("stage0", "stage1", "stage2", "stage3", "handid", "evaluation", "search")

#: Values of the CLIP-ReID reference options (the code that reads them lives in ``losses``,
#: ``models.heads`` and ``train.schedulers``; a test keeps these tuples equal to theirs).
TEXT_LOGIT_FORMS = ("cosine", "raw")
#: CLIP-HandID's pseudo-token in the prompt (``models.handid.TOKEN_MODES``; a test keeps them
#: equal): ``whole`` = the paper's, ``mean`` = the released code's scalar broadcast.
HANDID_TOKEN_MODES = ("whole", "mean")
#: CLIP-HandID's BNNeck heads (``models.handid.HEAD_MODES``; the same test keeps them equal).
HANDID_HEAD_MODES = ("two", "projected")
TRIPLET_FEATURE_SETS = ("two", "clipreid")
LR_SCHEDULES = ("workbench", "clipreid")


class ParamError(ValueError):
    """A parameter value that cannot be used; the message names the parameter and the fix."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: str  # "str" | "int" | "float" | "bool" | "size" | "path" | "intlist" | "pathlist" | "rgb"
    #            | "textlist"
    default: Any
    help: str
    #: valid values: a tuple, or a callable returning one when they live in a registry that
    #: may grow at run time (``backbone``: every registered backbone is valid)
    choices: tuple | Callable[[], tuple] | None = None
    optional: bool = False  # None is an accepted value
    minimum: float | None = None
    stages: tuple = ("common",)
    #: a stage's own default where it differs from ``default`` (e.g. ``epochs``: 0 for
    #: zero-shot, 30 for stage 2); the notebooks' parameters cells repeat exactly these values
    #: (tests/test_notebook_params.py checks it)
    stage_defaults: Mapping[str, Any] | None = None

    def default_for(self, stage: str) -> Any:
        """The default of this parameter in ``stage``."""
        return (self.stage_defaults or {}).get(stage, self.default)


def _spec(name, kind, default, help, **kw) -> ParamSpec:
    return ParamSpec(name=name, kind=kind, default=default, help=help, **kw)


#: The schema.  Keep the help texts short: they are printed in error messages and the README.
SCHEMA: dict[str, ParamSpec] = {
    s.name: s
    for s in [
        # --- data -------------------------------------------------------------------------
        _spec("dataset", "str", "11k", "dataset layout to read", choices=DATASETS),
        _spec("data_root", "path", None,
              "dataset folder (11k: contains Hands/ and HandInfo.csv; HD: contains "
              "'Original Images/'; custom: one folder per person or a labels.csv, see "
              "docs/protocols.md); None = the embedded synthetic hands (11k, HD), generated on "
              "first use",
              optional=True),
        _spec("aspect", "str", "dorsal_r",
              "hand aspect of the queries (11k; custom: the aspect folder/column to query, or "
              "the word the prompts use for a dataset without aspects); HD is dorsal",
              choices=ASPECTS),
        _spec("gallery_mode", "str", "all",
              "11k gallery: 'aspect' = this aspect's test identities; 'all' = the four aspects' "
              "galleries merged (MBA-Net's protocol)", choices=GALLERY_MODES),
        _spec("num_splits", "int", 10,
              "Monte-Carlo query/gallery splits of the test identities (a custom labels.csv "
              "naming query and gallery images fixes one split)", minimum=1),
        _spec("split_seed", "int", 0,
              "seed of the protocol's random choices (test splits, val images, selection "
              "identities); independent of `seed`, so runs sharing it share splits.json",
              minimum=0),
        _spec("val_fraction", "float", 0.2,
              "fraction of TRAINING identities held out for model selection (selection 'best' "
              "and 'retrain', and the val report of stage 0; 'last' holds none out)",
              minimum=0.0),
        _spec("synthetic_subjects", "int", 60, "people in the embedded synthetic dataset",
              minimum=4),
        _spec("synthetic_images", "int", 6,
              "images per person and aspect in the embedded synthetic dataset", minimum=3),
        _spec("synthetic_difficulty", "float", 0.5, "difficulty knob of the synthetic hands",
              minimum=0.0),
        _spec("synthetic_photo_size", "size", None,
              "[height, width] of the embedded synthetic photos; None = 120 x 160 (small, "
              "fast); [1200, 1600] = the real 11k JPEG size, to exercise full-size decoding",
              optional=True),
        _spec("synthetic_seed", "int", 0,
              "seed of the embedded synthetic dataset (fixed, so runs with different `seed` "
              "compare on the same people)", minimum=0),
        # --- model ------------------------------------------------------------------------
        _spec("backbone", "str", "handclip-mini",
              "CLIP backbone (handclip-mini: small CLIP pretrained on captioned synthetic hands, "
              "shipped; tiny-vit/tiny-rn: untrained, for fast tests)",
              choices=lambda: tuple(BACKBONES)),
        _spec("weights", "path", None,
              "local CLIP checkpoint (.pt); None = clip's cache (~/.cache/clip) or download_root",
              optional=True),
        _spec("download_root", "path", None,
              "folder holding CLIP .pt files, and where a download goes; None = ~/.cache/clip",
              optional=True),
        _spec("download", "bool", True,
              "download OpenAI's CLIP checkpoint on first use when download_root and "
              "~/.cache/clip lack it (SHA-256 checked, as clip.load); False = local files only "
              "(HANDCLIP_OFFLINE=1 in the environment turns downloads off for every run)"),
        _spec("image_size", "size", None,
              "input size [height, width] (or one int for square); None = the backbone's "
              "4:3 default", optional=True),
        _spec("resize_mode", "str", "pad",
              "'pad' keeps the hand's aspect ratio (letterbox); 'squash' stretches",
              choices=RESIZE_MODES),
        # CLIP-ReID reference options of the backbone (docs/methods.md); they shape the network
        # and its input, so every stage that builds or rebuilds one takes them
        _spec("rn_last_stride", "int", 2,
              "stride of a ResNet's last stage: 2 = CLIP's; 1 = CLIP-ReID's (twice the grid, "
              "image sizes multiples of 16); ViTs: 2", choices=(1, 2), stages=BACKBONE_STAGES),
        _spec("pixel_mean", "rgb", None,
              "input normalisation mean [R, G, B]; None = the backbone's own (CLIP's); "
              "CLIP-ReID: [0.5, 0.5, 0.5] (ViT), [0.485, 0.456, 0.406] (RN50)",
              optional=True, stages=BACKBONE_STAGES),
        _spec("pixel_std", "rgb", None,
              "input normalisation std [R, G, B]; None = the backbone's own (CLIP's); "
              "CLIP-ReID: [0.5, 0.5, 0.5] (ViT), [0.229, 0.224, 0.225] (RN50)",
              optional=True, stages=BACKBONE_STAGES),
        # --- optimisation / run -----------------------------------------------------------
        _spec("batch_size", "int", 64,
              "batch size (CLIP-HandID trains on plain batches of it: 20 by default there)",
              minimum=1, stage_defaults={"handid": 20}),
        _spec("epochs", "int", 0, "training epochs (0 for zero-shot)", minimum=0,
              stage_defaults={"pretrain": 30, "stage1": 30, "stage2": 30, "stage3": 60,
                              "handid": 30}),
        # the training stages' defaults suit the small embedded models (handclip-mini and the
        # tiny ones); params/<backbone>-*.yaml hold the reference settings for real CLIP
        _spec("lr", "float", 3.5e-4, "learning rate", minimum=0.0,
              stage_defaults={"pretrain": 1e-3, "stage1": 1e-2, "stage2": 3e-4, "stage3": 3e-4,
                              "handid": 3e-4}),
        _spec("seed", "int", 0,
              "seed for every random number generator of training (the splits use split_seed)",
              minimum=0),
        _spec("deterministic", "bool", True,
              "deterministic GPU kernels (cuDNN's deterministic algorithms, no autotuning): a "
              "re-run on the same GPU and software repeats every bit, at a cost in speed "
              "(cuDNN's fastest convolutions are excluded; most felt by the ResNet towers). "
              "False lets cuDNN benchmark and pick the fastest kernel per shape: runs differ in "
              "the last bits, as a re-run on another GPU does. No effect on a CPU"),
        _spec("device", "str", "auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'"),
        _spec("num_workers", "int", None,
              "data-loader worker processes; None = from the machine (CUDA: every core but "
              "one, at most 8; CPU: 0 up to 4 cores, then a quarter of them)",
              optional=True, minimum=0),
        _spec("decode_cache", "bool", True,
              "decode and resize each image once into outputs/.decode_cache/ (uint8 at the "
              "input size, shared by epochs, stages, runs and processes); identical pixels "
              "to decoding every time", stages=IMAGE_STAGES),
        # 20 GB holds the full 11k Hands (2.1 GB at 224x288) in about nine input geometries,
        # yet stops a cache shared by many jobs from growing without end (a dataset copied to
        # each job's scratch leaves ~2 GB of entries no later job can read)
        _spec("decode_cache_max_gb", "float", 20.0,
              "size cap of outputs/.decode_cache/ in GB (10^9 bytes, all geometries): a run "
              "above it deletes the least recently used entries, not its own, down to 90%; "
              "None = no cap; 20 holds the full 11k set (2.1 GB at 224x288) nine times",
              optional=True, minimum=0.0,
              stages=IMAGE_STAGES),
        _spec("reduced_jpeg_decode", "bool", True,
              "decode JPEGs at 1/2-1/8 scale (DCT scaling) when at least 2x the input size "
              "remains, before the bicubic resize: several times faster on full-size photos, "
              "pixels 0.17 grey levels from a full decode on average (docs/methods.md); False = "
              "decode every pixel, as CLIP-ReID", stages=IMAGE_STAGES),
        _spec("exif_orientation", "str", "auto",
              "the EXIF orientation tag of a photo: 'exif' turns it upright as the phone "
              "showed it; 'ignore' reads the pixels as stored, as MBA-Net's and CLIP-ReID's "
              "loaders do; 'auto' = exif for dataset custom and the search notebook (your own "
              "photos), ignore for 11k and hd (numbers comparable with the literature's); "
              "params.yaml records the resolved value", choices=EXIF_ORIENTATIONS,
              stages=IMAGE_STAGES),
        _spec("tf32", "bool", True,
              "TF32 matrix products and convolutions on Ampere+ GPUs (no effect on CPU)"),
        _spec("channels_last", "bool", True,
              "ResNet image towers in channels-last memory format on CUDA (faster convolutions "
              "with AMP; no effect on ViTs or on CPU)", stages=BACKBONE_STAGES),
        _spec("output_dir", "path", None,
              "run folder; None = outputs/<stage>-<dataset>-<aspect>-<backbone>-seed<seed>",
              optional=True),
        # --- evaluation -------------------------------------------------------------------
        _spec("flip_tta", "bool", False,
              "average features of the image and its mirror (off: a mirrored right hand "
              "looks like a left hand)"),
        _spec("max_rank", "int", 50, "length of the CMC curve", minimum=1),
        _spec("ap_mode", "str", "standard",
              "the AP model selection ranks epochs by: 'standard' (mAP) or MBA-Net's "
              "trapezoid AP 'mbanet_trapezoid' (mAP_mbanet); every metrics.json and table "
              "records both either way", choices=AP_MODES),
        _spec("feature_cache", "bool", True, "cache extracted features on disk"),
        _spec("open_set_far", "float", 0.01,
              "FAR of the open-set threshold, a fraction in (0, 1]: the stages calibrate it on "
              "training identities only (stored in metrics.json for the search notebook); the "
              "search notebook on calibration_dir's people", minimum=0.0,
              stages=("stage0", "stage2", "stage3", "handid", "evaluation", "search")),
        _spec("show_k", "int", 5, "gallery images shown per query in retrieval grids", minimum=1),
        # --- presentation -----------------------------------------------------------------
        _spec("interactive", "bool", False,
              "ipywidgets views (a person is present); False renders static figures"),
        # --- training (stages 1-3) ----------------------------------------------------------
        _spec("weight_decay", "float", 1e-4, "Adam weight decay", minimum=0.0,
              stages=TRAINING, stage_defaults={"pretrain": 0.1}),
        _spec("warmup_epochs", "int", 2,
              "linear warmup epochs (from warmup_factor x lr; stage 1: from warmup_lr_init)",
              minimum=0, stages=TRAINING),
        _spec("lr_schedule", "str", "workbench",
              "epoch convention of the schedule: 'workbench' (epoch 1 trains at the warmup "
              "start, milestones after m epochs, stage-1 cosine after the warmup) or "
              "'clipreid' (CLIP-ReID's: epoch e trains at the value at e, cosine on the "
              "absolute epoch)", choices=LR_SCHEDULES,
              stages=("stage1", "stage2", "stage3", "handid")),
        _spec("eval_every", "int", 1, "validate on the model-selection split every N epochs",
              minimum=1, stages=TRAINING, stage_defaults={"pretrain": 2}),
        _spec("resume", "bool", False,
              "continue an interrupted run from output_dir/checkpoints/last.pt",
              stages=TRAINING),
        _spec("checkpoint_every", "int", 0,
              "write checkpoints/last.pt every N epochs (0 = not by epoch count). last.pt is "
              "also written at the end of training, every checkpoint_minutes, and when the job "
              "is told to stop (SIGUSR2, submitit's pre-emption/time-limit signal, or SIGTERM): "
              "a requeued job resumes at the step it stopped", minimum=0, stages=TRAINING),
        _spec("checkpoint_minutes", "float", 10.0,
              "write checkpoints/last.pt when this many minutes passed since the last write, "
              "checked after every step (0 = not by time); bounds the work a crash without "
              "warning (a node failure, an out-of-memory kill) can lose", minimum=0.0,
              stages=TRAINING),
        _spec("amp", "bool", True,
              "mixed precision on CUDA (never on CPU): the autocast of training and of every "
              "feature the run encodes (validation, test, the evaluation and search notebooks "
              "that load the run); False = fp32", stages=(*TRAINING, "stage0")),
        _spec("amp_dtype", "str", "float16",
              "mixed-precision type on CUDA: 'float16' with a gradient scaler (CLIP-ReID's) or "
              "'bfloat16' (Ampere/Hopper; fp32's range, no scaler)", choices=AMP_DTYPE_NAMES,
              stages=(*TRAINING, "stage0")),
        _spec("compile", "bool", False,
              "torch.compile the model for training (opt-in: minutes of compilation first, "
              "then faster steps on a GPU)", stages=("stage2", "stage3", "handid")),
        # --- pretraining of handclip-mini (CLIP image-text contrastive) ------------------------
        _spec("pretrain_people", "int", 400,
              "synthetic people in the captioned pretraining set (disjoint from every evaluated "
              "dataset)", minimum=8, stages=("pretrain",)),
        _spec("pretrain_images", "int", 3, "pretraining photos per person and aspect", minimum=1,
              stages=("pretrain",)),
        _spec("pretrain_heldout", "int", 60,
              "further people (same population, never trained on) for retrieval and probes",
              minimum=4, stages=("pretrain",)),
        _spec("pretrain_seed", "int", 104729,
              "population seed of the pretraining people (not used by any evaluated dataset)",
              minimum=0, stages=("pretrain",)),
        _spec("pretrain_accessory_rate", "float", 0.3,
              "share of pretraining photos with a ring, bracelet or watch", minimum=0.0,
              stages=("pretrain",)),
        _spec("caption_dropout", "float", 0.3,
              "chance of dropping each attribute phrase of a caption in training", minimum=0.0,
              stages=("pretrain",)),
        _spec("vision_arch", "str", "rn",
              "image tower: 'rn' (CLIP's ModifiedResNet; learns faster from little data) or "
              "'vit' (ViT-16)", choices=("rn", "vit"), stages=("pretrain",)),
        _spec("vision_width", "int", 16,
              "image tower width (rn: stem width, pool on 32 x width channels; vit: width, "
              "heads = width // 64)", minimum=8, stages=("pretrain",)),
        _spec("vision_layers", "int", 1, "rn: blocks in each of the 4 stages; vit: layers",
              minimum=1, stages=("pretrain",)),
        _spec("text_width", "int", 128, "text transformer width (heads = width // 64)",
              minimum=64, stages=("pretrain",)),
        _spec("text_layers", "int", 3, "text transformer layers", minimum=1,
              stages=("pretrain",)),
        _spec("embed_dim", "int", 128, "joint image-text embedding dimension", minimum=8,
              stages=("pretrain",)),
        _spec("export_weights", "path", None,
              "write the trained model here as fp16 weights + model card (e.g. "
              "handclip_nb/models/weights/handclip_mini.pt); None = only the run folder",
              optional=True, stages=("pretrain",)),
        _spec("probe_k", "int", 10, "k of the attribute probes' precision@k", minimum=1,
              stages=("pretrain", "stage0")),
        # --- stage 1: prompt learning --------------------------------------------------------
        _spec("n_ctx", "int", 4, "learnable context tokens per identity", minimum=1,
              stages=("stage1",)),
        _spec("center_features", "bool", True,
              "subtract the mean training image feature before the image-text losses; "
              "needed where image features are nearly collinear (random-init models); "
              "CLIP-ReID does not", stages=("stage1",)),
        _spec("prompt_template", "str", "A photo of a {ctx} {aspect} hand.",
              "prompt with {ctx} (the learnable words) and {aspect}", stages=("stage1",)),
        _spec("warmup_lr_init", "float", None,
              "absolute lr the warmup starts from; None = 0.1 x lr (CLIP-ReID: 1e-5)",
              optional=True, minimum=0.0, stages=("stage1",)),
        _spec("lr_min", "float", None,
              "absolute lr the cosine ends at; None = 0.01 x lr (CLIP-ReID: 1e-6)",
              optional=True, minimum=0.0, stages=("stage1",)),
        _spec("text_logits", "str", "cosine",
              "image-text logits of the stage-1 SupCon and stage-2 image-to-text CE: 'cosine' "
              "= L2-normalised features x CLIP's logit scale; 'raw' = CLIP-ReID's raw dot "
              "products (temperature 1; CLIP-HandID's SupCon too)", choices=TEXT_LOGIT_FORMS,
              stages=("stage1", "stage2", "handid")),
        # --- stage 2: image fine-tuning ------------------------------------------------------
        _spec("stage1_dir", "path", None, "the stage-1 run's output_dir (its prompts)",
              optional=True, stages=("stage2",)),
        _spec("classifier", "str", "linear", "ID classifier on the BNNeck",
              choices=("linear", "arcface"), stages=("stage2", "stage3", "handid")),
        _spec("id_weight", "float", 0.25, "weight of the ID (label-smoothed CE) loss",
              minimum=0.0, stages=("stage2", "stage3", "handid"), stage_defaults={"handid": 1.0}),
        _spec("triplet_weight", "float", 1.0, "weight of the batch-hard triplet loss",
              minimum=0.0, stages=("stage2", "stage3")),
        _spec("i2t_weight", "float", 1.0, "weight of the image-to-text CE loss", minimum=0.0,
              stages=("stage2",)),
        _spec("i2t_label_smoothing", "float", 0.0,
              "label smoothing epsilon of the image-to-text CE (CLIP-ReID: 0.1)", minimum=0.0,
              stages=("stage2",)),
        _spec("triplet_features", "str", "two",
              "features under the triplet loss: 'two' = both branches' pre-BN features; "
              "'clipreid' = also the one a stage earlier (ViT 11th-layer CLS, RN pooled "
              "layer 3), as CLIP-ReID", choices=TRIPLET_FEATURE_SETS,
              stages=("stage2", "stage3")),
        _spec("warmup_factor", "float", 0.1,
              "the warmup starts at warmup_factor x lr (CLIP-ReID: 0.1 ViT, 0.01 RN50)",
              minimum=0.0, stages=("stage2", "stage3", "handid")),
        _spec("bias_lr_factor", "float", 1.0,
              "lr multiplier of bias parameters (CLIP-ReID: 2)", minimum=0.0,
              stages=("stage2",)),
        _spec("weight_decay_bias", "float", None,
              "weight decay of bias parameters; None = weight_decay (CLIP-ReID sets it equal)",
              optional=True, minimum=0.0, stages=("stage2",)),
        _spec("horizontal_flip", "float", 0.0,
              "probability of a horizontal flip in training (CLIP-ReID: 0.5; off by default: "
              "a mirrored right hand is a left hand)", minimum=0.0, stages=("stage2", "stage3", "handid")),
        _spec("center_weight", "float", 0.0, "weight of the center loss (0 = off)",
              minimum=0.0, stages=("stage2", "stage3")),
        _spec("triplet_margin", "float", 0.3, "triplet margin", minimum=0.0,
              stages=("stage2", "stage3")),
        _spec("label_smoothing", "float", 0.1, "label smoothing epsilon of the ID loss",
              minimum=0.0, stages=("stage2", "stage3", "handid")),
        _spec("p_ids", "int", 8, "identities per P x K batch", minimum=2,
              stages=("stage2", "stage3")),
        _spec("k_images", "int", 4, "images per identity in a P x K batch", minimum=2,
              stages=("stage2", "stage3")),
        _spec("milestones", "intlist", [24], "epochs where lr is multiplied by gamma",
              stages=("stage2", "stage3", "handid"), stage_defaults={"stage3": [48], "handid": [24]}),
        _spec("gamma", "float", 0.1, "lr factor at each milestone", minimum=0.0,
              stages=("stage2", "stage3", "handid")),
        _spec("grad_clip", "float", 5.0, "max gradient norm (0 = no clipping)", minimum=0.0,
              stages=("stage2", "stage3", "handid")),
        # --- CLIP-HandID (notebooks/stage_handid.ipynb) ----------------------------------------
        _spec("handid_inversion_grad", "bool", True,
              "CLIP-HandID: the inversion MLP learns from the SupCon loss (the paper's method); "
              "false = its released code's: the prompt is encoded under no_grad, so the MLP "
              "never receives a gradient", stages=("handid",)),
        _spec("handid_token", "str", "whole",
              "CLIP-HandID: what replaces 'sks' in 'A photo of a sks hand': 'whole' = the "
              "pseudo-token (the paper's); 'mean' = its released code's mean of the token, one "
              "scalar broadcast over the embedding", choices=HANDID_TOKEN_MODES,
              stages=("handid",)),
        _spec("handid_heads", "str", "two",
              "CLIP-HandID's BNNeck heads: 'two' = one on the encoder's CLS / pooled feature "
              "and one on the projected feature, ID loss on both, the two BN outputs ranked "
              "(its code); 'projected' = the projected feature's alone (an ablation)",
              choices=HANDID_HEAD_MODES, stages=("handid",)),
        _spec("handid_supcon_weight", "float", 1.0,
              "CLIP-HandID: weight of the image-to-text + text-to-image SupCon loss (1 in its "
              "code)", minimum=0.0, stages=("handid",)),
        _spec("train_resize", "size", None,
              "training images resized (by resize_mode) to this [height, width], then randomly "
              "cropped to image_size (CLIP-HandID: 256 x 256 -> 224 x 224); None = resized to "
              "image_size, then padded by 10 and cropped (CLIP-ReID's)", optional=True,
              stages=("handid",)),
        # --- stage 3: PromptSG -------------------------------------------------------------
        _spec("init_from", "path", None,
              "a stage-2 run's output_dir to warm-start the image encoder from (optional)",
              optional=True, stages=("stage3",)),
        _spec("supcon_weight", "float", 0.1,
              "weight of the symmetric image-text SupCon loss (PromptSG: 0.5; smaller by default "
              "for the small embedded text encoders)",
              minimum=0.0, stages=("stage3",)),
        _spec("lr_new", "float", 3e-3,
              "learning rate of the new modules (inversion, cross-attention, head; CLIP-HandID: "
              "10 x lr)", minimum=0.0, stages=("stage3", "handid")),
        _spec("prompt_mode", "str", "simplified",
              "inference prompt: 'simplified' (one fixed prompt) or 'composed' (each image's S*)",
              choices=("simplified", "composed"), stages=("stage3", "attention")),
        _spec("stage3_dir", "path", None, "the stage-3 run to visualise", optional=True,
              stages=("attention",)),
        _spec("attention_queries", "int", 4, "queries shown with their heatmaps", minimum=1,
              stages=("attention",)),
        _spec("random_erasing", "float", 0.0, "probability of random erasing in training (CLIP-ReID: 0.5; off by default because it "
              "hides the small cues of the synthetic hands)",
              minimum=0.0, stages=("stage2", "stage3", "handid")),
        _spec("color_jitter", "float", 0.0,
              "brightness/contrast/saturation jitter; off by default because it changes the "
              "skin tone, an identity cue",
              minimum=0.0, stages=("stage2", "stage3", "handid")),
        _spec("patience", "int", 0, "early stopping after N epochs without val gain (0 = off)",
              minimum=0, stages=("stage2", "stage3", "handid")),
        _spec("selection", "str", "last",
              "model selection: 'last' = train on every training identity with the fixed "
              "schedule and keep the last epoch (the literature's); 'best' = hold out "
              "val_fraction of the training identities and keep the epoch with the best held-out "
              "mAP; 'retrain' = choose the number of epochs that way, then retrain on every "
              "training identity for that many (stage 1 takes the policy of the stage 2 it "
              "feeds); 'best_accuracy' (CLIP-HandID's, handid only) = hold out one image of every "
              "training identity and keep the epoch with the best classification accuracy on "
              "them, a tie going to the later epoch", choices=SELECTION_POLICIES,
              stages=("stage1", "stage2", "stage3", "handid")),
        # --- evaluation across runs (notebooks/evaluation.ipynb) -----------------------------
        # The common data parameters (dataset, aspect, gallery_mode, data_root, num_splits,
        # split_seed) give the TEST protocol; each run's own params.yaml says what it was
        # trained on.
        _spec("runs", "pathlist", None,
              "run folders to evaluate (stage0/stage2/stage3 output_dir), e.g. "
              "[outputs/stage2-11k-dorsal_r-tiny-vit-seed0]; None or [] = the zero-shot "
              "`backbone` plus this protocol's default stage-2/3 folders that have finished",
              optional=True, stages=("evaluation",)),
        _spec("rerank", "bool", False,
              "k-reciprocal re-ranking of the test distances (Zhong et al., CVPR 2017)",
              stages=("evaluation",)),
        _spec("rerank_k1", "int", 20, "re-ranking: k-reciprocal neighbourhood size",
              minimum=1, stages=("evaluation",)),
        _spec("rerank_k2", "int", 6, "re-ranking: local query expansion size (1 = off)",
              minimum=1, stages=("evaluation",)),
        _spec("rerank_lambda", "float", 0.3,
              "re-ranking: weight of the original distance, in [0, 1]", minimum=0.0,
              stages=("evaluation",)),
        _spec("tsne", "bool", True, "t-SNE figure of each run's test embeddings",
              stages=("evaluation",)),
        _spec("tsne_ids", "int", 12, "identities shown in the t-SNE figures", minimum=2,
              stages=("evaluation",)),
        _spec("failure_queries", "int", 6,
              "rank-1 failures shown per run in the retrieval grids (0 = none)", minimum=0,
              stages=("evaluation",)),
        # --- end of evaluation parameters --------------------------------------------------
        # --- search: rank your own gallery for query photos or texts (notebooks/search.ipynb)
        _spec("run_dir", "path", None,
              "a finished stage-0/2/3 run folder whose model ranks the gallery; None = the "
              "zero-shot `backbone`", optional=True, stages=("search",)),
        _spec("gallery_dir", "path", None,
              "folder of gallery images; person subfolders optional (<gallery>/<person>/...: "
              "the folder name is the person label)", optional=True, stages=("search",)),
        _spec("query", "path", None,
              "a query image, or a folder of query images (person subfolders optional, as in "
              "gallery_dir); None = text queries only", optional=True, stages=("search",)),
        _spec("query_text", "textlist", None,
              "a text query or a list of them, e.g. \"a photo of the dorsal side of a left hand "
              "with red nail polish\" (CLIP's joint image-text space); None = image queries only",
              optional=True, stages=("search",)),
        _spec("top_k", "int", 5, "gallery images ranked, shown and written per query",
              minimum=1, stages=("search",)),
        _spec("threshold", "float", None,
              "open-set threshold (cosine distance; a gallery image at or below it is accepted "
              "as the query's person); None = "
              "calibrated on calibration_dir when set, else the run's calibrated one "
              "(metrics.json open_set), none for a zero-shot backbone",
              optional=True, minimum=0.0, stages=("search",)),
        _spec("calibration_dir", "path", None,
              "people no model of yours trained on, to calibrate the open-set threshold at "
              "open_set_far and measure its FAR on (one folder per person, or a labels.csv with "
              "image,person[,split query/gallery]; none of them among the gallery or query "
              "images); None = the run's threshold, calibrated on its training identities",
              optional=True, stages=("search",)),
    ]
}


def _choices(spec: ParamSpec) -> tuple | None:
    return spec.choices() if callable(spec.choices) else spec.choices


def _fail(spec: ParamSpec, value: Any, why: str) -> ParamError:
    choices = _choices(spec)
    valid = f" Valid values: {', '.join(map(str, choices))}." if choices else ""
    return ParamError(
        f"parameter {spec.name!r}: {why} (got {value!r} of type {type(value).__name__}).{valid} "
        f"Meaning: {spec.help}. Fix it in the parameters cell, with papermill "
        f"`-p {spec.name} <value>`, or in the params YAML file."
    )


def _coerce(spec: ParamSpec, value: Any) -> Any:
    """Coerce a papermill/YAML value to the spec's type, or raise ParamError."""
    if value is None:
        if spec.optional:
            return None
        raise _fail(spec, value, "a value is required")
    kind = spec.kind
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in {"true", "false", "yes", "no"}:
            return value.strip().lower() in {"true", "yes"}
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _fail(spec, value, "expected true or false")
    if kind == "int":
        if isinstance(value, bool):
            raise _fail(spec, value, "expected an integer")
        if isinstance(value, int):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        elif isinstance(value, str):
            try:
                out = int(value.strip())
            except ValueError:
                raise _fail(spec, value, "expected an integer") from None
        else:
            raise _fail(spec, value, "expected an integer")
    elif kind == "float":
        if isinstance(value, bool):
            raise _fail(spec, value, "expected a number")
        if isinstance(value, (int, float)):
            try:
                out = float(value)
            except OverflowError:  # an int beyond float's range
                raise _fail(spec, value, "expected a finite number") from None
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise _fail(spec, value, "expected a number") from None
        else:
            raise _fail(spec, value, "expected a number")
        if not math.isfinite(out):
            raise _fail(spec, value, "expected a finite number")
    elif kind in ("str", "path"):
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str):
            raise _fail(spec, value, "expected a string")
        out = value.strip() if kind == "str" else value
        if kind == "path" and out.strip() == "":
            raise _fail(spec, value, "expected a non-empty path (use None for the default)")
        if kind == "path":
            out = os.path.expanduser(out)
    elif kind == "size":
        out = _coerce_size(spec, value)
    elif kind == "intlist":
        out = _coerce_intlist(spec, value)
    elif kind == "pathlist":
        out = _coerce_pathlist(spec, value)
    elif kind == "rgb":
        out = _coerce_rgb(spec, value)
    elif kind == "textlist":
        out = _coerce_textlist(spec, value)
    else:  # pragma: no cover - schema error
        raise AssertionError(f"unknown kind {kind}")
    if spec.choices is not None and out not in _choices(spec):
        raise _fail(spec, value, "unknown value")
    if spec.minimum is not None and isinstance(out, (int, float)) and out < spec.minimum:
        raise _fail(spec, value, f"must be >= {spec.minimum}")
    return out


def _coerce_rgb(spec: ParamSpec, value: Any) -> list[float]:
    """Three finite numbers (R, G, B), e.g. a normalisation mean; ``-p`` gives a string."""
    hint = "expected three numbers [R, G, B] like [0.5, 0.5, 0.5]"
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise _fail(spec, value, hint) from None
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value):
        raise _fail(spec, value, hint)
    out = [float(v) for v in value]
    if spec.name == "pixel_std" and min(out) <= 0:
        raise _fail(spec, value, "every std must be > 0")
    return out


def _coerce_textlist(spec: ParamSpec, value: Any) -> list[str] | None:
    """One text or a list of texts, kept as a list (``-p query_text "a hand"`` gives a string;
    ``-p query_text "[a hand, a palm]"`` a YAML list in a string); [] = none (None)."""
    hint = ('expected a text like "a photo of a left hand" or a list of texts like '
            '["a left hand", "a palm"]')
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise _fail(spec, value, hint) from None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _fail(spec, value, hint)
    out = []
    for entry in value:
        if not isinstance(entry, str) or not entry.strip():
            raise _fail(spec, value, f"{hint}; entry {entry!r} is not a non-empty text")
        out.append(" ".join(entry.split()))
    return out or None


def _coerce_pathlist(spec: ParamSpec, value: Any) -> list[str]:
    """A list of paths: a YAML/Python list, or one path (papermill ``-p runs a/b`` gives a
    string; ``-p runs "[a, b]"`` a YAML list in a string)."""
    hint = "expected a list of folders like [outputs/run-a, outputs/run-b] (or one folder)"
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise _fail(spec, value, hint) from None
    if isinstance(value, (str, Path)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _fail(spec, value, hint)
    out = []
    for entry in value:
        if isinstance(entry, Path):
            entry = str(entry)
        if not isinstance(entry, str) or not entry.strip():
            raise _fail(spec, value, f"{hint}; entry {entry!r} is not a non-empty path")
        out.append(os.path.expanduser(entry.strip()))
    twice = sorted({p for p in out if out.count(p) > 1})
    if twice:
        raise _fail(spec, value, f"{', '.join(twice)} listed more than once")
    return out


def _coerce_intlist(spec: ParamSpec, value: Any) -> list[int]:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise _fail(spec, value, "expected a list of integers like [30, 50]") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise _fail(spec, value, "expected a list of non-negative integers like [30, 50]")
    return sorted(int(v) for v in value)


def _coerce_size(spec: ParamSpec, value: Any) -> list[int]:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise _fail(spec, value, "expected [height, width] or one integer") from None
    if isinstance(value, bool):
        raise _fail(spec, value, "expected [height, width] or one integer")
    if isinstance(value, int):
        value = [value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail(spec, value, "expected [height, width] or one integer")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise _fail(spec, value, "height and width must be positive integers")
        out.append(int(v))
    return out


class Params(dict):
    """Resolved parameters: a plain dict (YAML-serialisable) with attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"no parameter {name!r}; known: {', '.join(sorted(self))}"
            ) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(dict(self), sort_keys=True)


def _applies(spec: ParamSpec, stage: str) -> bool:
    return "common" in spec.stages or stage in spec.stages


def default_output_dir(p: Mapping[str, Any], stage: str) -> str:
    if stage == "pretrain":  # no evaluated dataset: the run is named by what it trains
        return os.path.join("outputs", f"pretrain-{p['backbone']}-seed{p['seed']}")
    if stage == "search":  # named by the gallery and the model that ranks it
        gallery = Path(os.path.normpath(p["gallery_dir"] or "gallery")).name or "gallery"
        model = (Path(os.path.normpath(p["run_dir"])).name if p.get("run_dir") else None) \
            or p["backbone"]
        return os.path.join("outputs", f"search-{gallery}-{model}")
    aspect = "dorsal" if p["dataset"] == "hd" else p["aspect"]
    dataset = p["dataset"]
    if dataset == "custom" and p.get("data_root"):  # two custom datasets must not share runs
        dataset = f"custom_{Path(p['data_root']).name}"
    return os.path.join(
        "outputs", f"{stage}-{dataset}-{aspect}-{p['backbone']}-seed{p['seed']}"
    )


def resolve_params(values: Mapping[str, Any] | None = None, stage: str = "stage0", *,
                   explicit: Collection[str] = (), **overrides: Any) -> Params:
    """Validate ``values`` (+ ``overrides``) against the schema and fill derived values.

    ``values`` may hold per-stage sections (:func:`stage_values`): this stage's section wins
    over a common value, except for the names in ``explicit`` and the keyword ``overrides``
    (values the user named: papermill ``-p``, a grid axis), which win over every section.
    Names not in the schema raise ParamError (a typo must not silently fall back to the default).
    """
    if stage not in STAGES:
        raise ParamError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    given = stage_values({**(values or {}), **overrides}, stage,
                         explicit=set(explicit) | set(overrides))
    unknown = sorted((k for k in given if k not in SCHEMA), key=str)  # YAML keys may be ints
    if unknown:
        raise ParamError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for {stage}; "
            f"known parameters: {', '.join(sorted(k for k, s in SCHEMA.items() if _applies(s, stage)))}"
        )
    out = Params()
    for name, spec in SCHEMA.items():
        if not _applies(spec, stage):
            continue
        out[name] = _coerce(spec, given.get(name, spec.default_for(stage)))

    if out["image_size"] is None:
        # the registry entry's default: the one place input sizes are defined
        out["image_size"] = list(get_backbone_spec(out["backbone"]).default_image_size)
    if out.get("rn_last_stride", 2) != 2 and get_backbone_spec(out["backbone"]).is_vit:
        raise _fail(SCHEMA["rn_last_stride"], out["rn_last_stride"],
                    f"{out['backbone']} is a ViT; only ResNets have a last stride to change")
    if out.get("rerank_lambda", 0.0) > 1.0:
        raise _fail(SCHEMA["rerank_lambda"], out["rerank_lambda"], "must be <= 1")
    if out["dataset"] == "custom" and out["data_root"] is None and stage not in ("pretrain",
                                                                                 "search"):
        raise _fail(SCHEMA["data_root"], None, "dataset 'custom' reads your own folder: set "
                    "data_root to it (one folder per person, or a labels.csv)")
    if out.get("decode_cache_max_gb") is not None and out["decode_cache_max_gb"] <= 0:
        raise _fail(SCHEMA["decode_cache_max_gb"], out["decode_cache_max_gb"],
                    "must be > 0 (None = no cap; decode_cache: false = no cache)")
    if "open_set_far" in out and not 0.0 < out["open_set_far"] <= 1.0:
        raise _fail(SCHEMA["open_set_far"], out["open_set_far"],
                    "must be a fraction in (0, 1], e.g. 0.01 for FAR 1 %")
    if out.get("selection") == "best_accuracy" and stage != "handid":
        raise _fail(SCHEMA["selection"], "best_accuracy",
                    f"'best_accuracy' is CLIP-HandID's policy (stage handid), not {stage}'s: "
                    f"use 'best' to choose epochs by held-out mAP here")
    if out["val_fraction"] >= 1.0:
        raise _fail(SCHEMA["val_fraction"], out["val_fraction"], "must be < 1")
    if "exif_orientation" in out:  # params.yaml records the policy the run really used
        out["exif_orientation"] = exif_orientation_for(out["exif_orientation"], out["dataset"],
                                                       stage)
    dev = out["device"]
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise _fail(SCHEMA["device"], dev, "expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if out["output_dir"] is None:
        out["output_dir"] = default_output_dir(out, stage)
    if stage == "attention" and out["stage3_dir"] is None:
        out["stage3_dir"] = default_output_dir(out, "stage3")
    if stage == "stage2" and out["stage1_dir"] is None:
        # the stage-1 run with the same data, backbone and seed (its default folder)
        out["stage1_dir"] = default_output_dir(out, "stage1")
    out["stage"] = stage
    return out


def exif_orientation_for(value: str, dataset: str | None, stage: str | None) -> str:
    """The concrete EXIF orientation policy (``exif`` or ``ignore``) of an ``exif_orientation``
    value: ``auto`` is ``exif`` for the user's own photos (``dataset: custom``, and every search,
    whose gallery and queries are the user's) and ``ignore`` for 11k and HD, whose published
    numbers come from loaders that read the pixels as stored (docs/protocols.md)."""
    if value != "auto":
        return value
    return "exif" if dataset == "custom" or stage == "search" else "ignore"


#: Parameters that never change a run's numbers (where it writes, when it checkpoints (a
#: resumed run continues bit-exactly), how many loader workers,
#: caches, whether a missing checkpoint may be downloaded (a file has one SHA-256), widgets, links to other run folders, whose own identity counts instead); they are
#: left out of a run's identity (:func:`run_identity`).
NOT_RESULTS = frozenset({"output_dir", "resume", "checkpoint_every", "checkpoint_minutes",
                         "num_workers", "decode_cache", "download",
                         "decode_cache_max_gb", "feature_cache",
                         "interactive", "show_k", "stage1_dir", "init_from", "stage3_dir",
                         "runs", "run_dir"})

#: Parameters a zero-shot stage reads although they never reach its numbers (it trains
#: nothing): two zero-shot runs that differ only here are one run.
_ZERO_SHOT_UNUSED = frozenset({"lr", "epochs"})

#: The parameters that define what a run is tested on and with which starting model: the
#: protocol (data, aspect, gallery, splits), the backbone and its input. A trained run's gain
#: over zero-shot compares it with the zero-shot run that agrees on every one of these.
EVALUATION_PARAMETERS = ("dataset", "data_root", "aspect", "gallery_mode", "num_splits",
                         "split_seed", "synthetic_subjects", "synthetic_images",
                         "synthetic_difficulty", "synthetic_photo_size", "synthetic_seed",
                         "backbone", "weights", "image_size", "resize_mode", "rn_last_stride",
                         "pixel_mean", "pixel_std", "reduced_jpeg_decode", "exif_orientation",
                         "flip_tta")


def run_identity(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """What a resolved run (``resolve_params``'s output, or a run folder's ``params.yaml``)
    depends on: every parameter that can change its numbers. A zero-shot run of a pretrained
    backbone does not depend on ``seed`` (it only initialises untrained backbones), nor on
    the optimisation settings it never uses."""
    stage = resolved.get("stage")
    out = {k: v for k, v in resolved.items() if k not in NOT_RESULTS}
    if stage == "stage0":
        for name in _ZERO_SHOT_UNUSED:
            out.pop(name, None)
        spec = get_backbone_spec(resolved["backbone"]) if resolved.get("backbone") in BACKBONES \
            else None
        if resolved.get("weights") or (spec is not None and (spec.openai_name or
                                                             spec.weights_file)):
            out.pop("seed", None)
    return out


def held_out_fraction(params: Mapping[str, Any]) -> float:
    """The fraction of training identities a run's protocol holds out for model selection.

    None under ``selection='last'`` (every training identity is fitted, as in the literature)
    and in stage 1 under ``'retrain'`` (its prompts must cover every identity stage 2 retrains
    on); ``val_fraction`` otherwise, including the stages without the parameter (stage 0
    reports its zero-shot ranking on the held-out identities as ``val``).
    """
    policy = params.get("selection")
    if policy in ("last", "best_accuracy") or (policy == "retrain"
                                               and params.get("stage") == "stage1"):
        return 0.0
    return float(params["val_fraction"])


def holds_out_val_images(params: Mapping[str, Any]) -> bool:
    """Whether a run's protocol takes every training identity's val image out of training:
    ``selection='best_accuracy'`` (CLIP-HandID's policy) validates on them, so they must not
    be trained on; every other policy keeps them in the fit set."""
    return params.get("selection") == "best_accuracy"


def _check_sections(values: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    sections = {k: v for k, v in values.items() if k in STAGES and v is not None}
    for name, section in sections.items():
        if not isinstance(section, Mapping):
            raise ParamError(f"parameter section {name!r} must be a mapping of name: value, "
                             f"got {section!r}")
        bad = sorted((k for k in section if k not in SCHEMA), key=str)
        if bad:
            raise ParamError(f"unknown parameter(s) {bad} in section {name!r}")
    return sections


def stage_values(values: Mapping[str, Any], stage: str,
                 explicit: Collection[str] = ()) -> dict[str, Any]:
    """The flat values one stage runs with, before coercion.

    A parameter file may hold per-stage sections (``stage1: {epochs: 120, lr: 3.5e-4}``) so
    one file describes a whole pipeline. The running stage's section wins over the common
    values, except for the names in ``explicit``: values the user named (papermill ``-p``, a
    grid axis or the grid's ``params``), which a section of the file they point at never
    overrides. Every section's names are checked; the other stages' sections are dropped.
    """
    sections = _check_sections(values)
    out = {k: v for k, v in values.items() if k not in STAGES}
    out.update({k: v for k, v in sections.get(stage, {}).items() if k not in explicit})
    return out


def section_overrides(values: Mapping[str, Any], stage: str,
                      explicit: Collection[str]) -> list[str]:
    """One line per explicit value that beat a different value of ``stage``'s section (what a
    notebook prints, so a user who relied on the old rule sees which value the run uses)."""
    section = _check_sections(values).get(stage, {})
    return [f"{name} = {values[name]!r} (given explicitly) wins over section {stage}'s "
            f"{name}: {section[name]!r}"
            for name in section if name in explicit and name in values
            and values[name] != section[name]]


#: The comment atop the cell papermill injects (``papermill.parameterize``'s default).
PAPERMILL_COMMENT = "# Parameters"


def papermill_given_names(history: Sequence[str] | None) -> frozenset[str]:
    """The names papermill assigned in this kernel: the top-level assignments of its injected
    cell (found in IPython's input history, ``In``), that is the ``-p`` values and the common
    values of ``-f`` files (a stage section is one name). papermill merges ``-f`` and ``-p``
    into one cell, so a ``-p`` value can only be told from a file's section by its place: a
    file sets each name once (:func:`load_params_file`), so an injected top-level name that a
    section also sets was given with ``-p``."""
    if not history:
        return frozenset()
    injected = [cell for cell in history
                if isinstance(cell, str) and cell.startswith(PAPERMILL_COMMENT + "\n")]
    if not injected:
        return frozenset()
    try:
        tree = ast.parse(injected[-1])  # a re-run notebook executes its latest injection
    except SyntaxError:
        return frozenset()
    return frozenset(t.id for node in tree.body if isinstance(node, ast.Assign)
                     for t in node.targets if isinstance(t, ast.Name))


def params_from_namespace(namespace: Mapping[str, Any], stage: str) -> Params:
    """Pick the schema's names out of a notebook's globals() and resolve them.

    Only names in the schema (and the stage sections) are taken, so the notebook's imports and
    helpers are ignored. A value papermill injected (``-p``) wins over the stage's section of
    a ``-f`` file; each such win is printed.
    """
    picked = {k: v for k, v in namespace.items()
              if (k in SCHEMA or (k in STAGES and isinstance(v, Mapping))) and not k.startswith("_")}
    explicit = papermill_given_names(namespace.get("In")) - set(STAGES)
    for line in section_overrides(picked, stage, explicit):
        print(line)
    return resolve_params(picked, stage=stage, explicit=explicit)


def load_params_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a papermill ``-f`` YAML file and validate its names (not the derived values)."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"parameter file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamError(f"parameter file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ParamError(f"parameter file {path} must hold a mapping of name: value")
    unknown = sorted((k for k in data if k not in SCHEMA and k not in STAGES), key=str)
    if unknown:
        raise ParamError(f"parameter file {path}: unknown parameter(s) {unknown}")
    empty = [stage for stage in STAGES if stage in data and data[stage] is None]
    if empty:  # a notebook declares its sections None; a file's section holds values
        raise ParamError(f"parameter file {path}: section {empty[0]!r} must be a mapping")
    try:
        twice = set_twice(data)  # checks every section's form and names first
    except ParamError as exc:
        raise ParamError(f"parameter file {path}: {exc}") from None
    if twice:
        raise ParamError(f"parameter file {path}: {twice[0]}")
    return data


def set_twice(values: Mapping[str, Any]) -> list[str]:
    """Names a parameter file sets both at its top level and in a stage section, as
    messages. papermill merges ``-p`` over the file's top level, so such a top-level value could
    not be told from a ``-p`` one: a file sets each name once for each stage."""
    out = []
    for stage, section in _check_sections(values).items():
        for name in section:
            if name in values:
                out.append(f"{name!r} is set at the top level ({values[name]!r}) and in section "
                           f"{stage!r} ({section[name]!r}); set it once for each stage: move the "
                           f"top-level value into the sections of the other stages that need it")
    return out
