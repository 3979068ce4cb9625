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
    import torch

    torch.set_num_threads(config.cpu_threads)
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
        server.run()  # returns after Ctrl-C once running requests are answered (or --drain-seconds)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after its graceful shutdown
        pass
    finally:
        pool.close(config.drain_seconds)  # the app's shutdown closed it already, unless uvicorn failed
    cut = pool.rows_left_at_close  # rows whose requests uvicorn cut when --drain-seconds ran out
    if cut:
        output.warn(
            f"stopped: {cut} rows were still running after --drain-seconds {config.drain_seconds:g} and were cut"
        )
    else:
        output.message("stopped: every running request was answered")
