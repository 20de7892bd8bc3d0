"""What every service's ``__main__`` does: arguments, settings, logging, metrics server."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from shared.masking import install_log_masking
from shared.settings import ServiceSettings, dump_masked, load_or_exit

S = TypeVar("S", bound=ServiceSettings)


def parse_args(prog: str, description: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", "-c", type=Path, default=None,
                   help="YAML settings file (environment variables ES_<SECTION>__<KEY> override it)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the settings, print them (secrets masked) and exit")
    return p.parse_args(argv)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_masking()


def service_main(prog: str, description: str, settings_cls: type[S], run: Callable[[S], int],
                 argv: list[str] | None = None) -> int:
    args = parse_args(prog, description, argv)
    settings = load_or_exit(settings_cls, args.config)
    if args.check_config:
        print(json.dumps(dump_masked(settings), indent=2))
        print("config ok")
        return 0
    setup_logging(settings.log_level)
    # `kill -USR1 <pid>` prints every thread's stack: the first thing to look at when a worker hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    return run(settings)
