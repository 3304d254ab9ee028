"""Entry point of `flowstate-forwarder`."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowstate-forwarder",
        description="Per-POP anycast forwarder: pins flows in Redis Cluster, tunnels to backends.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--check-config", metavar="FILE", help="validate a config file and exit")
    return p


def check_config(path: str) -> int:
    """`--check-config`: validate, print a summary (exit 0) or the error, no traceback (exit 1)."""
    from flowstate.errors import ConfigError
    from forwarder.config import load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"flowstate-forwarder: config error: {exc.field}: {exc.reason}", file=sys.stderr)
        return 1
    print(f"flowstate-forwarder: config OK: {config.summary()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check_config:
        return check_config(args.check_config)
    if not args.config and not args.check_config:
        build_parser().print_usage(sys.stderr)
        return 2
    print("flowstate-forwarder: the data path is not built yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
