"""The `kagent serve` command: the edited model behind an OpenAI-compatible HTTP API (agent/serve.py).

The web stack is imported only when the command runs, so the other commands start as fast as before.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path

import click


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (another than loopback "
              "makes the server reachable from other machines)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="KAGENT_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every request [env: KAGENT_API_KEY]")
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True,
              help="Most new tokens a request may ask for (the chat default)")
@click.option("--max-prompt-tokens", type=click.IntRange(1), default=2048, show_default=True,
              help="Most prompt tokens (chat template applied; also capped by the model's positions)")
@click.option("--max-waiting", type=click.IntRange(0), default=16, show_default=True,
              help="Requests that may wait for the generator; more get 503")
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True,
              help="Waiting requests generated together at most")
@click.option("--queue-timeout", type=click.FloatRange(0, min_open=True), default=60.0, show_default=True,
              help="Seconds a request waits for the generator before 503")
@click.option("--poll", type=click.FloatRange(0.05), default=0.5, show_default=True,
              help="Seconds between looks at the ledger for new commits")
@click.option("--workspace", "-w", type=click.Path(path_type=Path), envvar="KAGENT_WORKSPACE",
              help="Workspace directory [default: $KAGENT_HOME/workspace]")
def serve(host: str, port: int, api_key: str | None, max_tokens: int, max_prompt_tokens: int, max_waiting: int,
          max_batch: int, queue_timeout: float, poll: float, workspace: Path | None) -> None:
    """Serve the edited model over an OpenAI-compatible API; commits of `watch` go live without a restart."""
    from agent.serve import ServeOptions, run_server
    from agent.served import ServedModel
    from agent.workspace import Workspace, default_root

    ws = Workspace.open(workspace or default_root())
    opts = ServeOptions(host=host, port=port, api_key=api_key or None, max_tokens=max_tokens,
                        max_prompt_tokens=max_prompt_tokens, max_waiting=max_waiting, max_batch=max_batch,
                        queue_timeout=queue_timeout, poll_s=poll)
    if not loopback(host) and opts.api_key is None:
        click.echo(f"warning: serving on {host} without --api-key: anyone who reaches this port can use the model",
                   err=True)
    served = ServedModel.open(ws, poll)
    try:
        info = served.describe()
        click.echo(f"serving {info['model']} ({info['dtype']}, {info['device']}) with committed batch "
                   f"{served.state.batch} at http://{host}:{port}/v1 (Ctrl-C stops)")
        run_server(served, opts)
    finally:
        served.close()
