"""The fact store: the fact record, the FAISS fact index (dedup, supersede), order planning, the
SQLite edit ledger with exact rollback, and export of the edited model.

Data flow: feed lines -> `record.parse_line` -> `index.FactIndex.add` (dedup / supersede,
stored pending in the ledger) -> `planner.plan` (the watch loop) -> editor -> `ledger.Ledger.commit`.
"""
