"""Runtime: workers, the driver and `Engine`, launchers, profiler and server. The model with
its weights is what a runtime user builds first, so its entry points are public here too:
`Llama` and `build_model` (random or meta weights, from `espc.model.llama`) and `load_model`
(a Hugging Face checkpoint)."""

from espc.model.llama import Llama, build_model
from espc.runtime.weights import load_model

__all__ = ["Llama", "build_model", "load_model"]
