"""`python -m agent` runs the kagent CLI (used by schedulers when the console script is not on PATH)."""
from agent.cli import cli

cli()
