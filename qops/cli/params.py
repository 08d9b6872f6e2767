"""Option values without pydantic, where the answer is plain.

Recent typer converts every option and argument value (a missing one too) with a
pydantic TypeAdapter, built the first time the parameter is processed. Importing
pydantic and building the adapters costs more than many commands themselves
(``qops status`` from a health check) and ~7 MB in every worker, which is started by
this command line. qops's parameters are plain: str, bool, int and float (some with
min/max), list[str]. ``install`` gives those parameters a converter that returns the obvious
result for a well-formed value -- the string itself, a decimal number within its
bounds, the list of strings -- and hands anything else (a malformed or out-of-range
number, another type) to typer's own converter, so every result and every error message
is typer's (tests/cli/test_fast_paths.py compares the two). A typer without this
machinery (older releases convert with click's types): nothing to do.

``typed`` hands typer a command function whose options are declared with
``qops.cli.options.Option`` (worker's and the global ones; see that module).
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Annotated, Any

from qops.cli.options import _NOT_PLAIN, Argument, Context, Option, plain_value

try:  # typer >= 0.2x
    from typer._coercion import RuntimeParam, TypeDescriptor, build_runtime_param
except ImportError:  # pragma: no cover - typer converting with click's types
    RuntimeParam = None  # type: ignore[assignment,misc]

def _plain_annotation(param: Any) -> Any:
    """str, bool, int, float or list (for list[str]) when ``param`` converts that plainly;
    None otherwise."""
    desc = getattr(param, "type_descriptor", None)
    if desc is None or getattr(param, "_runtime_param", 0) is not None:
        return None
    info = desc.parameter_info
    if desc.file_annotation is not None or desc.choices is not None or info.parser is not None \
            or info.clamp or getattr(info, "click_type", None) is not None:
        return None
    if desc.annotation == list[str] and param.nargs == -1 and not param.multiple:
        return list
    if desc.annotation in (str, bool, int, float) and param.nargs == 1 and not param.multiple:
        return desc.annotation
    return None


if RuntimeParam is not None:

    @dataclass(frozen=True)
    class PlainParam(RuntimeParam):
        """Plain values here; the rest to the converter typer would have built."""

        descriptor: TypeDescriptor
        kind: Any

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            info = self.parameter_info
            result = plain_value(self.kind, info.min, info.max, value)
            if result is not _NOT_PLAIN:
                return result
            param._runtime_param = typer_param = build_runtime_param(self.descriptor)
            return typer_param._coerce_value(value, param=param, ctx=ctx)


class _HelpNames:
    """What ``Command.get_help_option`` reads of a context: the help option's names."""

    def __init__(self, names: list[str]) -> None:
        self.help_option_names = names


def install(command: Any, help_names: list[str] | None = None) -> None:
    """Give the plain parameters of ``command`` and of its subcommands the plain
    converter; their help options too, which click makes on first use (with the names
    a context would inherit: ``help_names``, unless the command's settings say)."""
    if RuntimeParam is None:  # pragma: no cover
        return
    names = command.context_settings.get("help_option_names", help_names or ["--help"])
    help_option = command.get_help_option(_HelpNames(names))
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        kind = _plain_annotation(param)
        if kind is not None:
            desc = param.type_descriptor
            param._runtime_param = PlainParam(parameter_info=desc.parameter_info,
                                              annotation=desc.annotation, descriptor=desc,
                                              kind=kind)
    for sub in getattr(command, "commands", {}).values():
        install(sub, names)


def _typers(marker: Any) -> Any:
    """typer's parameter for an ``Option`` or ``Argument``; anything else as it is."""
    import typer

    if isinstance(marker, Argument):
        kwargs = dict(marker.kwargs)
        if "completion" in kwargs:
            from qops.cli import shell

            kwargs["autocompletion"] = getattr(shell, kwargs.pop("completion"))
        return typer.Argument(**kwargs)
    if isinstance(marker, Option):
        return typer.Option(*marker.decls, **marker.kwargs)
    return marker


class typed:  # noqa: N801 - used as a function: typed(worker)
    """``func`` as typer reads it: a ``ctx: Context`` parameter becomes a
    ``typer.Context`` and every ``Option`` (``Argument``) in an ``Annotated`` the
    ``typer.Option`` (``typer.Argument``) of the same arguments; the rest of the
    signature is left as it is. Worked out when typer first asks
    (``inspect.signature``), not when the command is registered: the root help screen
    registers every command and reads only its help."""

    def __init__(self, func: Any) -> None:
        self.func = func
        functools.update_wrapper(self, func, assigned=("__module__", "__name__",
                                                       "__qualname__", "__doc__"))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    @functools.cached_property
    def __signature__(self) -> inspect.Signature:
        import typer

        signature = inspect.signature(self.func, eval_str=True)
        params = []
        for p in signature.parameters.values():
            hint = p.annotation
            if hint is Context:
                hint = typer.Context
            elif any(isinstance(m, Option) for m in getattr(hint, "__metadata__", ())):
                meta = [_typers(m) for m in hint.__metadata__]
                args = (typing.get_args(hint)[0], *meta)
                hint = Annotated[args]
            params.append(p.replace(annotation=hint))
        return signature.replace(parameters=params)

    @functools.cached_property
    def __annotations__(self) -> dict[str, Any]:  # type: ignore[override]
        """What ``typing.get_type_hints`` reads: the converted annotations."""
        return {p.name: p.annotation for p in self.__signature__.parameters.values()}
