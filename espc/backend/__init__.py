"""Backend: torch.library ops, attention kernels, plan -> per-rank FX lowering and passes."""
