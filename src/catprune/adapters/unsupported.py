"""Why a diffusers transformer class has no adapter: the reasons ``apply_cat_pruning`` gives when it refuses
one, and that the support matrix (``docs/models.md``, written by ``catprune models``) lists.

Data only. A class named here keeps its reason until an adapter is registered for it (a registered adapter
wins); a class not named gets the reason its kind implies (:func:`unsupported_reason`).
"""

from __future__ import annotations

MATRIX = "docs/models.md"
"""Where the support matrix of every transformer class in the installed diffusers lives."""

NOT_IMAGE_TOKENS = "not a diffusion transformer over a grid of image tokens"

REASONS: dict[str, str] = {
    # Other modalities: no image-token grid for CAT's spatial clusters.
    "AceStepTransformer1DModel": "music (a 1-D sequence): " + NOT_IMAGE_TOKENS,
    "MiniMaxMusic3Transformer1DModel": "music (a 1-D sequence): " + NOT_IMAGE_TOKENS,
    "MiniMaxMusic3RVQDepthDecoder": "a music codec decoder: " + NOT_IMAGE_TOKENS,
    "StableAudioDiTModel": "audio (a 1-D sequence): " + NOT_IMAGE_TOKENS,
    "StableAudio3DiTModel": "audio (a 1-D sequence): " + NOT_IMAGE_TOKENS,
    "LongCatAudioDiTTransformer": "audio (a 1-D sequence): " + NOT_IMAGE_TOKENS,
    "T5FilmDecoder": "spectrogram decoder of a music pipeline: " + NOT_IMAGE_TOKENS,
    "RFD4ProteinaTransformer": "protein structures: " + NOT_IMAGE_TOKENS,
    "PriorTransformer": "a prior over CLIP image embeddings (no image tokens): " + NOT_IMAGE_TOKENS,
    # Building blocks of UNet pipelines.
    "Transformer2DModel": "a block inside UNet pipelines (and the legacy DiT/PixArt class): not a model",
    "DualTransformer2DModel": "a block inside UNet pipelines (Versatile Diffusion): not a whole model",
    "TransformerTemporalModel": "temporal layers inside video UNets: not a whole model",
}
"""Reasons by class name, where the class's kind does not say it."""


def unsupported_reason(class_name: str) -> str:
    """Why CAT pruning has no adapter for the diffusers transformer class ``class_name``."""
    if class_name in REASONS:
        return REASONS[class_name]
    if "3D" in class_name or "Video" in class_name:
        return (
            "video or 3-D latents (frames x height x width): selection handles such grids, but no adapter "
            "exists yet (not examined)"
        )
    return "no adapter yet (not examined; docs/adding-a-model.md says how to add one)"
