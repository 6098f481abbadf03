"""entruth-lite: EnTruth (template memorization as evidence of training on your data), small and tested."""

from .core.models import load_finetuned, load_pipeline, pick_device

__version__ = "0.1.0"
__all__ = ["load_finetuned", "load_pipeline", "pick_device", "__version__"]
