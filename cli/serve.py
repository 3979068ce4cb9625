"""``atmoe-reg serve``: the catalog's compositions behind an OpenAI-compatible API (``atmoe.serve``).

Thin: the options come from ``ServeConfig``; the models named are loaded before the server
listens (a bad reference fails here, as one line); uvicorn runs the application until Ctrl-C,
which stops taking requests and lets running ones finish for ``--drain-seconds``.
"""

from __future__ import annotations

import click

from atmoe.cli import output
from atmoe.cli.app import get_registry, main
from atmoe.cli.options import dataclass_options, pop_config
from atmoe.errors import UsageError
from atmoe.serve.config import ServeConfig  # torch- and FastAPI-free: the options only


@main.command("serve")
@click.argument("refs", nargs=-1, metavar="[REF ...]")
@dataclass_options(ServeConfig)
@click.option(
    "--api-key",
    envvar="ATMOE_API_KEY",
    show_envvar=True,
    help="Require 'Authorization: Bearer KEY' on /v1 and /atmoe (default: no key).",
)
def serve(refs: tuple[str, ...], api_key: str | None, **options) -> None:
    """Serve compositions through the OpenAI API (REF: NAME[@VERSION][:ROUTER], loaded now; others on
    first use), with a read-only catalog page at /."""
    try:
        import uvicorn

        from atmoe.serve.app import create_app
        from atmoe.serve.pool import ModelPool
    except ImportError as error:
        raise UsageError(f"serve needs the serve extra: pip install 'atmoe-registry[serve]' ({error.name})") from None
    config = pop_config(ServeConfig, options, api_key=api_key)
    registry = get_registry()
    pool = ModelPool(registry, config)
    for served in pool.preload(list(refs)):
        output.message(f"loaded {served.key} ({served.lineage['base_model']})")
    app = create_app(pool, config)
    where = f"http://{config.host}:{config.port}"
    output.message(f"serving on {where} (catalog page {where}/, OpenAI API {where}/v1); Ctrl-C stops")
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=config.drain_seconds
        )
    )
    try:
        server.run()
    finally:
        pool.close(config.drain_seconds)
