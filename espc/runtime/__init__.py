"""Runtime: the Llama-family model; workers, the driver and the KV pool arrive with the runtime issue."""

from espc.runtime.model import Llama, build_model
from espc.runtime.weights import load_model

__all__ = ["Llama", "build_model", "load_model"]
