"""The kagent agent: workspace, feed follower, watch loop with monitors and probe-guarded commits, and the CLI.

Data flow: feed (agent.feed) -> validation + fact index (dedup, supersede, order) -> batches (agent.loop) ->
editor compute -> predicted interference -> apply -> monitors + probes -> commit or rollback/bisect -> ledger.
"""
