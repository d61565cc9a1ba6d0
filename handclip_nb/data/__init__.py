"""Data: readers (11k, HD, custom), protocol manifests, synthetic hands (and whether a dataset
root is synthetic: `provenance`), the one image opener (`image_files`: EXIF orientation, HEIC),
transforms, sampler.

Names are imported lazily (PEP 562) so that ``python -m handclip_nb.data.synthetic`` and the
CSV readers do not pay for importing torch and CLIP.
"""
from importlib import import_module

_EXPORTS = {
    "ImageListDataset": "datasets", "augmentation_seed": "datasets", "build_protocol": "datasets",
    "default_synthetic_root": "datasets", "ensure_synthetic": "datasets",
    "read_custom": "custom", "build_custom_protocol": "custom",
    "DataError": "handinfo", "HandImage": "handinfo", "read_handinfo": "handinfo",
    "read_hd": "handinfo",
    "Protocol": "protocols", "Split": "protocols", "build_11k_protocol": "protocols",
    "build_hd_protocol": "protocols", "build_aspect_protocol": "protocols",
    "build_fixed_split_protocol": "protocols", "verify_images": "protocols",
    "PKSampler": "sampler", "Draw": "sampler", "number_draws": "sampler",
    "AugmentConfig": "transforms", "LetterboxResize": "transforms",
    "build_transform": "transforms",
    "generate_dataset": "synthetic",
    "SYNTHETIC_PROVENANCE_FILE": "provenance", "synthetic_provenance": "provenance",
    "is_synthetic_dataset": "provenance",
    "DecodeCache": "images", "DecodeGeometry": "images", "ImageSource": "images",
    "decode_resized": "images", "image_source": "images",
    "open_image": "image_files", "HeifSupportMissing": "image_files",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
