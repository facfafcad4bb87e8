"""Training losses in PyTorch: ALM (ALM_SPEC.md §5–§6), SFT (§7.2), hidden states (§7.1), GradMag (§7.3).

Functions of tensors: never import `alm.config`.
"""
