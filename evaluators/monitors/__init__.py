"""Monitors: what a batch did to the weights and the entity memory besides its facts, read around every batch.

Each returns flat `dict[str, float]` metric rows (names below) that the ledger stores with the batch:
    norm_ratio.L{l}   ||W_t|| / ||W_0||          norm_drift.L{l}  ||W_t - W_0|| / ||W_0||       (`norms`)
    delta_ratio.L{l}  ||Delta|| / ||W||          delta_ratio      max over layers (the flash signal)
    flash             1.0 when delta_ratio is a robust outlier (median + k * MAD) over earlier batches (`trend`)
    buildup           least-squares slope of the mean norm drift per batch over the history (the trend)
    within_* prior_*  superposition statistics of the batch's keys (`superposition`)
    interference      max over layers of ||Delta K|| / ||W K|| on probe keys and earlier edits' keys (`interference`)
    memory_*          the memory tier's slots: count, norm, firing on held-out text, collisions (`memory_tier`)
The agent calls these and compares them with its thresholds; it measures nothing itself.
"""
