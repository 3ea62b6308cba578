"""Edit memory: the fact record, the FAISS fact memory (dedup, supersede), order planning, the
SQLite edit ledger with exact rollback, and export of the edited model.

Data flow: feed lines -> `record.parse_line` -> `index.FactMemory.add` (dedup / supersede,
stored pending in the ledger) -> `planner.plan` (the watch loop) -> editor -> `ledger.Ledger.commit`.
"""
