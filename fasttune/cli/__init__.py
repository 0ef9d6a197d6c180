"""The ``fasttune`` command: a whole fine-tuning pipeline from one YAML recipe, on the library's public API.

    fasttune train recipe.yaml [--lora.r 32 --train.max_steps 5] [--resume [RUN]] [--quiet]
    fasttune train --recipe quickstart          (a bundled recipe: fasttune/recipes/quickstart.yaml)
    fasttune validate recipe.yaml               every problem at once, before anything loads
    fasttune recipe --example                   a commented recipe with every field (--fields: the docs table)
    fasttune estimate recipe.yaml               peak memory and tokens/s, from the model config alone
    fasttune export RUN|ADAPTER --gguf q4_k_m,q8_0 --ollama [--merged]
    fasttune chat RUN|MODEL                     streaming chat on stdin; /exit quits
    fasttune quickstart | fasttune port NOTEBOOK

docs/cli.md describes each command and every recipe field.
"""

from __future__ import annotations

import argparse
import sys

from fasttune.config import ConfigError

COMMANDS = ("train", "validate", "recipe", "estimate", "export", "chat", "quickstart", "port")


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


def _parser() -> argparse.ArgumentParser:
    from .recipe import overrides_help

    parser = argparse.ArgumentParser(prog="fasttune", description="fast, memory-light fine-tuning",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    over = "recipe fields can be overridden on the command line:\n" + overrides_help()
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train", help="run a recipe: train, export, report", epilog=over, formatter_class=raw)
    p.add_argument("recipe_file", nargs="?", help="the recipe YAML file")
    p.add_argument("--recipe", dest="bundled", metavar="NAME", help="a bundled recipe by name (quickstart)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN",
                   help="continue from the last checkpoint of RUN (default: run.output_dir or the newest run folder "
                        "of this recipe's name)")
    p.add_argument("--quiet", action="store_true", help="plain log lines instead of progress bars")
    for name, text in (("validate", "check a recipe and report every problem"),
                       ("estimate", "predict peak memory and tokens/s from the model config")):
        q = sub.add_parser(name, help=text, epilog=over, formatter_class=raw)
        q.add_argument("recipe_file", nargs="?", help="the recipe YAML file")
        q.add_argument("--recipe", dest="bundled", metavar="NAME", help="a bundled recipe by name (quickstart)")
    q = sub.add_parser("recipe", help="print a commented example recipe or the field table")
    group = q.add_mutually_exclusive_group(required=True)
    group.add_argument("--example", action="store_true", help="every field with its default, help and allowed values")
    group.add_argument("--fields", action="store_true", help="the markdown field table (as in docs/cli.md)")
    from .chat import add_arguments as chat_arguments
    from .export import add_arguments as export_arguments

    export_arguments(sub.add_parser("export", help="export a run or adapter folder: adapter, merged, GGUF, Ollama"))
    chat_arguments(sub.add_parser("chat", help="chat with a run or model folder (stdin, streaming; /exit quits)"))
    sub.add_parser("quickstart", help="teach SmolLM2-135M-Instruct a fact table end to end, offline "
                   "(python -m fasttune.quickstart; --tiny: a tiny random model)", add_help=False)
    sub.add_parser("port", help="rewrite an Unsloth notebook's imports for fasttune", add_help=False)
    return parser


def _recipe_path(args: argparse.Namespace) -> str | None:
    from .recipe import bundled_recipe

    if args.bundled and args.recipe_file:
        raise ConfigError(f"give a recipe file ({args.recipe_file!r}) or --recipe {args.bundled!r}, not both")
    return str(bundled_recipe(args.bundled)) if args.bundled else args.recipe_file


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.command == "recipe":
        from .recipe import example_recipe, field_table

        print(example_recipe() if args.example else field_table())
        return 0
    if args.command == "validate":
        from .recipe import load_recipe

        load_recipe(_recipe_path(args), overrides)
        print(f"{_recipe_path(args) or 'the default recipe'}: valid")
        return 0
    if args.command == "estimate":
        from .estimate import estimate_command

        return estimate_command(_recipe_path(args), overrides)
    if args.command == "train":
        from .train import train_command

        return train_command(_recipe_path(args), overrides, args.resume, args.quiet)
    if args.command == "export":
        from .export import export_command

        return export_command(args)
    from .chat import chat_command

    return chat_command(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["port"]:  # before the top-level parser, so `fasttune port -h` shows port's own help
        from fasttune.port import main as port

        return port(argv[1:])
    if argv[:1] == ["quickstart"]:
        from fasttune.quickstart.__main__ import main as quickstart

        return quickstart(argv[1:])
    rest, overrides = split_overrides(argv)
    args = _parser().parse_args(rest)
    if overrides and args.command not in ("train", "validate", "estimate"):
        raise SystemExit(f"fasttune {args.command}: recipe overrides ({overrides[0]}) only apply to train, validate "
                         "and estimate")
    try:
        return _run(args, overrides)
    except ConfigError as error:  # RecipeError included: every problem, field by field
        print(f"fasttune {args.command}: {error}", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "main"]
