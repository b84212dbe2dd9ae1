"""Snapshot of rated answers in, PEFT LoRA adapter out: KTO with automatically balanced λ_D/λ_U."""
