"""catprune: CAT Pruning (cluster-aware token pruning) for diffusion transformers in diffusers.

from catprune import apply_cat_pruning
apply_cat_pruning(pipe)  # SD3 / SD3.5 / PixArt pipelines; remove_cat_pruning(pipe) undoes it
"""

from .config import CATPruningConfig
from .integration import apply_cat_pruning, remove_cat_pruning
from .pruning import GenerationStats, PruningState

__all__ = ["CATPruningConfig", "GenerationStats", "PruningState", "apply_cat_pruning", "remove_cat_pruning"]
__version__ = "0.1.0"
