"""Locate-then-edit model editors: ENCORE, MEMIT and AlphaEdit on one shared core.

Data flow: keys (module inputs at the subject's last token) -> target values (optimised
residual vectors) -> closed-form solve per layer -> low-rank deltas (U V^T) that the
ledger stores and the model applies or reverts exactly.
"""
