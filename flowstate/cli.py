"""The `flowstate` command: inspect flows in the store and steer running forwarders.

Subcommands live in `cli_flows` (flows get/ls/count), `cli_explain` (explain) and `cli_ops`
(backends, stats, reload). Errors end the command with one line on stderr and a non-zero exit
code: 2 for bad input, 1 when something could not be reached or found; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from flowstate import __version__, cli_bgp, cli_explain, cli_flows, cli_ops
from flowstate.cli_common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandFailed, Parser
from flowstate.control_client import ControlError, ControlUnavailable
from flowstate.errors import FlowstateError, StoreUnavailable, UsageError

#: Exit code of an unexpected error (a bug): EX_SOFTWARE.
EXIT_BUG = 70

EPILOG = """\
cluster: --seeds HOST:PORT,... or $FLOWSTATE_REDIS_SEEDS; password from --password-file or
$FLOWSTATE_REDIS_PASSWORD (or the --config file's). forwarder: --socket PATH
(default /run/flowstate/forwarder.sock). Every command takes --json.
exit codes: 0 ok, 1 failed (unreachable, not found), 2 bad input."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="flowstate",
        description="Inspect flowstate flows in the Redis Cluster and steer running forwarders.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"flowstate {__version__}")
    p.add_argument("--json", action="store_true", help="machine-readable output (any command)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    cli_flows.add_parsers(sub)
    cli_explain.add_parser(sub)
    cli_ops.add_parsers(sub)
    cli_bgp.add_parsers(sub)
    return p


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.run
    try:
        return asyncio.run(run(args))
    except UsageError as exc:
        return _fail(f"error: {_one_line(exc)}", EXIT_USAGE)
    except ControlUnavailable as exc:
        return _fail(f"forwarder unreachable: {_one_line(exc)}", EXIT_FAILED)
    except ControlError as exc:
        return _fail(f"forwarder: {_one_line(exc)}", EXIT_FAILED)
    except StoreUnavailable as exc:
        return _fail(f"cluster unreachable: {_one_line(exc)}", EXIT_FAILED)
    except (CommandFailed, FlowstateError) as exc:
        return _fail(_one_line(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        # Ctrl-C is how `stats --watch` ends.
        return EXIT_OK if getattr(args, "watch", None) is not None else 130
    except BrokenPipeError:
        # `flowstate flows ls | head`: the reader left; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if os.environ.get("FLOWSTATE_DEBUG"):
            raise
        if _is_redis_error(exc):
            return _fail(f"Redis: {_one_line(exc)}", EXIT_FAILED)
        message = f"internal error: {type(exc).__name__}: {_one_line(exc)} "
        return _fail(message + "(FLOWSTATE_DEBUG=1 shows the traceback)", EXIT_BUG)


def _is_redis_error(exc: Exception) -> bool:
    from redis.exceptions import RedisClusterException, RedisError

    return isinstance(exc, RedisError | RedisClusterException)


def _fail(message: str, code: int) -> int:
    print(f"flowstate: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
