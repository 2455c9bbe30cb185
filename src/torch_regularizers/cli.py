"""Command line: ``python -m torch_regularizers {demo,bench,inspect}`` (also ``torch-regularizers``).

* ``demo`` — train a small MLP on scikit-learn's digits with several regularizers and
  compare accuracy, exact zeros and time (see :mod:`torch_regularizers.demo`).
* ``bench`` — the speed benchmark (``torch_regularizers.bench``); arguments are passed on.
* ``inspect MODULE:FACTORY [--config reg.yaml]`` — build the model, print the
  regularizer summary (which parameter gets which rule, what is left out), no training.

User errors (bad module path, factory, config, device) exit with code 2 and a
one-line message on stderr, never a traceback. Notes go to stderr, results (tables) to
stdout; a stdout closed early (``| head``) ends the command quietly with exit code 0.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["CLIError", "load_config", "load_factory", "main"]

PROG = "torch-regularizers"


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split())


def _exc(e: BaseException) -> str:
    return _one_line(f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------- inspect


def _import_target(module: str) -> Any:
    """Import a dotted module path, or a ``.py`` file path, and return the module."""
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise CLIError(f"no such file: {module}")
        name = "_tr_inspect_" + path.stem.replace("-", "_")
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise CLIError(f"cannot import {module}: not a Python file")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        # like `python file.py`: the file's folder is importable (its sibling modules)
        sys.path.insert(0, str(path.resolve().parent))
        try:
            spec.loader.exec_module(mod)
        except SystemExit as e:
            raise CLIError(f"importing {module} called sys.exit({e.code})") from None
        except BaseException as e:
            sys.modules.pop(name, None)
            raise CLIError(f"importing {module} failed: {_exc(e)}") from None
        return mod
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the current folder is importable
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise CLIError(f"no module named {module!r} (is it installed, or run from its folder?)") from None
        raise CLIError(f"importing {module} failed: {_exc(e)}") from None
    except SystemExit as e:
        raise CLIError(f"importing {module} called sys.exit({e.code})") from None
    except BaseException as e:
        raise CLIError(f"importing {module} failed: {_exc(e)}") from None


def load_factory(target: str):
    """``"pkg.mod:make_model"`` or ``"path/file.py:make_model"`` → the model it builds.

    The attribute may be a callable taking no arguments (a function or a class) or an
    ``nn.Module`` instance. Dotted attributes (``mod:Outer.build``) are followed.
    """
    from torch import nn

    module, sep, attr = target.rpartition(":")
    if not sep or not module or not attr:
        raise CLIError(f"expected MODULE:FACTORY (e.g. mypkg.models:make_model), got {target!r}")
    mod = _import_target(module)
    obj: Any = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CLIError(f"{module} has no attribute {attr!r}") from None
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise CLIError(f"{target} is a {type(obj).__name__}, not a callable model factory")
    try:
        model = obj()
    except SystemExit as e:
        raise CLIError(f"{target}() called sys.exit({e.code})") from None
    except BaseException as e:
        raise CLIError(f"calling {target}() failed: {_exc(e)}") from None
    if not isinstance(model, nn.Module):
        raise CLIError(f"{target}() returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def load_config(path: str) -> Any:
    """Read a regularizer config file (``config.load_config``), errors as one-line CLIErrors."""
    from .config import load_config as _load

    try:
        cfg = _load(path)
    except ValueError as e:  # the loader's own messages name the file and the place in it
        msg = str(e)
        msg = msg[len(f"{path}: "):] if msg.startswith(f"{path}: ") else msg
        raise CLIError(f"cannot read config {path}: {msg}") from None
    except (OSError, UnicodeDecodeError, ImportError, RecursionError) as e:
        raise CLIError(f"cannot read config {path}: {_exc(e)}") from None
    if cfg is None:
        raise CLIError(f"config {path} is empty")
    return cfg


def cmd_inspect(args: argparse.Namespace) -> int:
    """``inspect``: build the model and the regularizer, print ``reg.summary()``."""
    import torch_regularizers as tr

    model = load_factory(args.target)
    if args.config is not None:
        cfg = load_config(args.config)
        try:
            reg = tr.Regularizer.from_config(model, cfg)
        except Exception as e:  # a config is user input: any failure is reported, not raised
            raise CLIError(f"config {args.config}: {_exc(e)}") from None
    else:
        try:
            reg = tr.Regularizer(model, [tr.L2(1e-4)])
        except ValueError as e:
            raise CLIError(f"default rule tr.L2(1e-4) on weights: {_exc(e)}") from None
        # a note, not output: stderr, so that stdout is the table alone
        print("(no --config: showing the default tr.L2(1e-4) on tr.select.weights)", file=sys.stderr)
    print(reg.summary())
    return 0


# --------------------------------------------------------------------------- bench / demo


def cmd_bench(argv: Sequence[str]) -> int:
    """``bench``: hand ``argv`` to ``torch_regularizers.bench.main`` (imported only now)."""
    try:
        from torch_regularizers import bench
    except ImportError as e:
        raise CLIError(f"the benchmark is not available in this installation ({_exc(e)})") from None
    rc = bench.main(list(argv))
    return int(rc or 0)


def cmd_demo(args: argparse.Namespace) -> int:
    """``demo``: see :mod:`torch_regularizers.demo`."""
    from torch_regularizers import demo

    try:
        return demo.main(args)
    except demo.DemoError as e:
        raise CLIError(str(e)) from None


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands ``demo``, ``bench``, ``inspect``)."""
    p = _Parser(
        prog=PROG,
        description="Declared, inspectable regularization for torch.optim optimizers.",
    )
    from torch_regularizers import __version__

    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{demo,bench,inspect}")
    sub.required = True

    d = sub.add_parser(
        "demo",
        help="compare regularizers on a small MLP (scikit-learn digits): table + PNG",
        description="Train one MLP per method on scikit-learn's digits and compare test "
        "accuracy, exact-zero weights, removed hidden units and time; writes a PNG.",
    )
    from torch_regularizers.demo import add_arguments

    add_arguments(d)

    sub.add_parser(
        "bench",
        help="speed benchmark against the one-pass floor (arguments passed to it)",
        add_help=False,
    )

    i = sub.add_parser(
        "inspect",
        help="print the regularizer summary of a config on a model, without training",
        description="Build MODEL with MODULE:FACTORY and print which parameter gets which rule.",
    )
    i.add_argument(
        "target",
        metavar="MODULE:FACTORY",
        help="a dotted module path or a .py file, and a function/class returning an nn.Module "
        "(e.g. mypkg.models:make_model or examples/train_loop.py:make_model)",
    )
    i.add_argument(
        "--config",
        metavar="FILE",
        help="regularizer config, YAML or JSON (tr.Regularizer.from_config); "
        "default: tr.L2(1e-4) on tr.select.weights",
    )
    return p


def _stdout_closed() -> int:
    """The reader of stdout went away (``... | head -3``): stop quietly, like other CLIs.

    What is still buffered for stdout cannot be written; stdout is pointed at ``os.devnull`` so
    that the interpreter's final flush does not raise again. Exit 0: the reader asked for less.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m torch_regularizers`` and the ``torch-regularizers`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            rc = cmd_bench(argv[1:])
        else:
            args = build_parser().parse_args(argv)
            rc = cmd_inspect(args) if args.command == "inspect" else cmd_demo(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return rc
    except BrokenPipeError:
        return _stdout_closed()
    except CLIError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
