"""The ``fasttune`` command: a whole fine-tuning pipeline from one YAML recipe, on the library's public API.

    fasttune train recipe.yaml [--lora.r 32 --train.max_steps 5] [--resume [RUN]] [--quiet]
    fasttune train --recipe quickstart          (a bundled recipe: fasttune/recipes/quickstart.yaml)
    fasttune validate recipe.yaml               every problem at once, before anything loads
    fasttune recipe --example                   a commented recipe with every field (--fields: the docs table)
    fasttune estimate recipe.yaml               the run's peak memory, from the model config alone
    fasttune export RUN|ADAPTER --gguf q4_k_m,q8_0 --ollama [--merged]
    fasttune chat RUN|MODEL                     streaming chat on stdin; /exit quits
    fasttune studio [--port N] [--host H] [--runs DIR]   the local web app (prints its URL)
    fasttune quickstart | fasttune port NOTEBOOK

docs/cli.md describes each command and every recipe field.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from fasttune.config import ConfigError


@dataclass(frozen=True)
class Command:
    """One subcommand: the table below is the only place a subcommand is named.

    ``arguments`` adds its options to its parser (None: none); ``run(args, overrides)`` runs it. ``overrides``: it
    takes ``--section.field VALUE`` recipe overrides. ``own_argv``: its whole argv goes to ``run_argv`` before the
    top-level parser (so ``fasttune port -h`` shows the command's own help).
    """

    name: str
    help: str
    run: Callable[[argparse.Namespace, list[str]], int] | None = None
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    overrides: bool = False
    own_argv: Callable[[list[str]], int] | None = None


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(other arguments, ``--section.field VALUE`` overrides)."""
    from .recipe import SECTIONS

    rest, overrides = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and token[2:].split(".")[0] in SECTIONS and "." in token:
            overrides.append(token)
            if "=" not in token and i + 1 < len(argv):
                overrides.append(argv[i + 1])
                i += 1
        else:
            rest.append(token)
        i += 1
    return rest, overrides


def _recipe_path(args: argparse.Namespace) -> str | None:
    from .recipe import bundled_recipe

    if args.bundled and args.recipe_file:
        raise ConfigError(f"give a recipe file ({args.recipe_file!r}) or --recipe {args.bundled!r}, not both")
    return str(bundled_recipe(args.bundled)) if args.bundled else args.recipe_file


# -- each command's arguments and run function ----------------------------------------------------------------------
def _recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe_file", nargs="?", help="the recipe YAML file")
    p.add_argument("--recipe", dest="bundled", metavar="NAME", help="a bundled recipe by name (quickstart)")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    _recipe_arguments(p)
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN",
                   help="continue from the last checkpoint of RUN (default: run.output_dir or the newest run folder "
                        "of this recipe's name)")
    p.add_argument("--quiet", action="store_true", help="plain log lines instead of progress bars")


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .train import train_command

    return train_command(_recipe_path(args), overrides, args.resume, args.quiet)


def _validate(args: argparse.Namespace, overrides: list[str]) -> int:
    from .recipe import load_recipe

    load_recipe(_recipe_path(args), overrides)
    print(f"{_recipe_path(args) or 'the default recipe'}: valid")
    return 0


def _recipe_table_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--example", action="store_true", help="every field with its default, help and allowed values")
    group.add_argument("--fields", action="store_true", help="the markdown field table (as in docs/cli.md)")


def _recipe(args: argparse.Namespace, overrides: list[str]) -> int:
    from .recipe import example_recipe, field_table

    print(example_recipe() if args.example else field_table())
    return 0


def _estimate(args: argparse.Namespace, overrides: list[str]) -> int:
    from .estimate import estimate_command

    return estimate_command(_recipe_path(args), overrides)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    from .export import add_arguments

    add_arguments(p)


def _export(args: argparse.Namespace, overrides: list[str]) -> int:
    from .export import export_command

    return export_command(args)


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    from .chat import add_arguments

    add_arguments(p)


def _chat(args: argparse.Namespace, overrides: list[str]) -> int:
    from .chat import chat_command

    return chat_command(args)


def _studio_arguments(p: argparse.ArgumentParser) -> None:
    from .studio import add_arguments

    add_arguments(p)


def _studio(args: argparse.Namespace, overrides: list[str]) -> int:
    from .studio import studio_command

    return studio_command(args)


def _quickstart(argv: list[str]) -> int:
    from fasttune.quickstart.__main__ import main as quickstart

    return quickstart(argv)


def _port(argv: list[str]) -> int:
    from fasttune.port import main as port

    return port(argv)


COMMAND_TABLE: tuple[Command, ...] = (
    Command("train", "run a recipe: train, export, report", _train, _train_arguments, overrides=True),
    Command("validate", "check a recipe and report every problem", _validate, _recipe_arguments, overrides=True),
    Command("recipe", "print a commented example recipe or the field table", _recipe, _recipe_table_arguments),
    Command("estimate", "predict the run's peak memory from the model config", _estimate, _recipe_arguments,
            overrides=True),
    Command("export", "export a run or adapter folder: adapter, merged, GGUF, Ollama", _export, _export_arguments),
    Command("chat", "chat with a run or model folder (stdin, streaming; /exit quits)", _chat, _chat_arguments),
    Command("studio", "serve the local web app: data preview, training, live charts, chat, export",
            _studio, _studio_arguments),
    Command("quickstart", "teach SmolLM2-135M-Instruct a fact table end to end, offline (python -m "
            "fasttune.quickstart; --tiny: a tiny random model)", own_argv=_quickstart),
    Command("port", "rewrite an Unsloth notebook's imports for fasttune", own_argv=_port),
)
COMMANDS: tuple[str, ...] = tuple(c.name for c in COMMAND_TABLE)
_BY_NAME: dict[str, Command] = {c.name: c for c in COMMAND_TABLE}


def _parser() -> argparse.ArgumentParser:
    from .recipe import overrides_help

    parser = argparse.ArgumentParser(prog="fasttune", description="fast, memory-light fine-tuning",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    over = "recipe fields can be overridden on the command line:\n" + overrides_help()
    for command in COMMAND_TABLE:
        extra = dict(epilog=over, formatter_class=argparse.RawDescriptionHelpFormatter) if command.overrides else {}
        p = sub.add_parser(command.name, help=command.help, add_help=command.own_argv is None, **extra)
        if command.arguments is not None:
            command.arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own = _BY_NAME.get(argv[0]) if argv else None
    if own is not None and own.own_argv is not None:  # before the top-level parser: the command's own -h
        return own.own_argv(argv[1:])
    rest, overrides = split_overrides(argv)
    args = _parser().parse_args(rest)
    command = _BY_NAME[args.command]
    if overrides and not command.overrides:
        takes = ", ".join(c.name for c in COMMAND_TABLE if c.overrides)
        raise SystemExit(f"fasttune {args.command}: recipe overrides ({overrides[0]}) only apply to {takes}")
    try:
        return command.run(args, overrides)
    except ConfigError as error:  # RecipeError included: every problem, field by field
        print(f"fasttune {args.command}: {error}", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "COMMAND_TABLE", "Command", "main"]
