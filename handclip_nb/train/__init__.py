"""Training: one loop and one checkpoint format shared by every stage, one module per stage."""
from .loop import FitResult, TrainLoop, clone_state
from .schedulers import warmup_cosine, warmup_multistep

__all__ = ["FitResult", "TrainLoop", "clone_state", "warmup_cosine", "warmup_multistep"]
