"""The Llama-family model (`espc.model.llama`): small native PyTorch, below the backend and
the runtime, which both build it — the lowering calls its modules, the workers load its
weights. This package file imports nothing, so that importing the package pulls in no torch."""
