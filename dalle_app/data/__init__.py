"""The procedural world the embedded model is trained on: captioned 64x64 scenes of flat shapes.

``sample`` / ``batch`` draw training, validation or test ("heldout") scenes; ``heldout_prompts``
gives evaluation prompts of the test or validation split, built only from combinations training
never shows (see ``world`` for the splits).
"""

from dalle_app.data.dataset import Batch, Prompt, Sample, Split, Target, batch, heldout_prompts, render_prompt, sample
from dalle_app.data.world import (
    COLORS,
    HELDOUT_PAIRS,
    IMAGE_SIZE,
    RELATIONS,
    SHAPES,
    SIZES,
    VALIDATION_PAIRS,
    ObjectSpec,
    canonical_triple,
    heldout_triples,
    is_heldout_pair,
    is_heldout_scene,
    is_heldout_triple,
    is_validation_pair,
    is_validation_triple,
    triple_split,
    validation_triples,
)

__all__ = [
    "Batch",
    "COLORS",
    "HELDOUT_PAIRS",
    "IMAGE_SIZE",
    "ObjectSpec",
    "Prompt",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Sample",
    "Split",
    "Target",
    "VALIDATION_PAIRS",
    "batch",
    "canonical_triple",
    "heldout_prompts",
    "heldout_triples",
    "is_heldout_pair",
    "is_heldout_scene",
    "is_heldout_triple",
    "is_validation_pair",
    "is_validation_triple",
    "render_prompt",
    "sample",
    "triple_split",
    "validation_triples",
]
