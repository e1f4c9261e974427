"""``start(config)``: load a configuration and run it as inetd's one connection, one
process, or pre-forked workers.  Shared by stunnel's command line (``tunnel.cli``) and the
click commands (``tunnel.commands``)."""

from __future__ import annotations

from tunnel.config import Config
from tunnel.errors import CONFIG_FAILURE
from tunnel.logs import log
from tunnel.server import Server
from tunnel.workers import Supervisor


def start(config: Config) -> int:
    """Load ``config`` and run it: inetd's one connection, one process, or pre-forked workers."""
    code = config.load()
    if code:
        return code
    assert config.settings is not None
    if config.settings.inetd:
        return Server(config).run_inetd()
    try:
        workers = config.worker_count()
    except ValueError as exc:
        log.ui(3, str(exc))
        log.ui(3, "Configuration failed")
        return CONFIG_FAILURE
    server = Server(config, workers=workers)
    if workers == 1:
        return server.run()
    return server.prepare() or Supervisor(server, workers).run()
