"""The ``tt`` command: what is installed, and what a saved folder holds."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tt_core import manifest, serialization, storage
from tt_core.plugins import get_plugin_manager


def _plugins(_: argparse.Namespace) -> int:
    manager = get_plugin_manager()
    for method in sorted(manager.methods.values(), key=lambda m: m.name):
        print(f"{method.name:<20} plugin {method.plugin:<20} config {method.config_class.__qualname__}")
    for name, error in manager.failures:
        print(f"FAILED {name}: {error}")
    return 1 if manager.failures else 0


def _inspect(args: argparse.Namespace) -> int:
    root = Path(args.path)
    try:
        found, saved = storage.read_all(root)
        for name, adapter in saved.items():
            config = serialization.read_config(adapter)
            marker = "*" if name in found.active else " "
            print(f"{marker} {name:<20} {config.method:<20} {json.dumps(config.to_dict(), sort_keys=True)}")
    except (OSError, ValueError) as error:
        print(f"tt inspect: {error}", file=sys.stderr)
        return 2
    print(f"active stack: {found.active}; files verified against {manifest.FILENAME}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tt", description="tt-adapters: token-embedding adapters")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("plugins", help="list installed adapter methods and broken plugins").set_defaults(
        run=_plugins
    )
    inspect = commands.add_parser("inspect", help="list and verify the adapters saved in a folder")
    inspect.add_argument("path")
    inspect.set_defaults(run=_inspect)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
