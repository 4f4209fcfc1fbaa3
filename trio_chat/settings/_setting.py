"""One declared setting (`Setting`): its parser, its rule and how the docs show it.

`trio_chat.settings._settings` reads each field of `Settings` into one of these; this
module knows nothing of `Settings` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from .._errors import ConfigError

if TYPE_CHECKING:
    from ._kinds import Kind


@dataclass(frozen=True, slots=True)
class Setting:
    """One declared setting, as `SETTINGS` reads it from `Settings`."""

    name: str
    #: The annotated type ``msgspec.convert`` checks a parsed value against.
    type: Any
    default: object
    help: str
    kind: Kind
    unit: str
    unset: str
    #: What values are taken, from the kind and the type's bounds ("must be " + rule).
    rule: str

    @property
    def var(self) -> str:
        return "TRIO_CHAT_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, raw: str) -> object:
        """The value of this setting written as ``raw``.

        Raises:
          ConfigError: ``raw`` breaks the rule; the message names the variable and value.
        """
        try:
            data = self.kind.parse(raw)
        except ValueError as exc:
            raise self._refusal(raw, str(exc)) from None
        try:
            return msgspec.convert(data, self.type, strict=False, dec_hook=_dec_hook)
        except msgspec.ValidationError:
            raise self._refusal(raw, "") from None

    def render(self, value: object) -> str:
        """``value`` as written in the environment ("" for None: unset)."""
        return "" if value is None else self.kind.render(value)

    def default_text(self) -> str:
        """The default as the docs show it, Markdown: the value and its unit, or ``unset``."""
        rendered = "" if self.kind.secret else self.render(self.default)
        if not rendered:
            return self.unset
        return f"`{rendered}` {self.unit}".rstrip()

    def _refusal(self, raw: str, reason: str) -> ConfigError:
        shown = f"({len(raw)} characters, not shown)" if self.kind.secret else repr(raw)
        return ConfigError(f"{self.var}={shown}: {reason or 'must be ' + self.rule}")


def _dec_hook(type_: type, obj: object) -> object:
    if type_ is Path and isinstance(obj, str):
        return Path(obj)
    raise NotImplementedError


def rule(kind: Kind, info: msgspec.inspect.Type) -> str:
    """What values a setting takes, from its kind and its type's bounds."""
    if isinstance(info, msgspec.inspect.Metadata):
        info = info.type
    if isinstance(info, msgspec.inspect.UnionType):
        (info,) = (t for t in info.types if not isinstance(t, msgspec.inspect.NoneType))
    if isinstance(info, msgspec.inspect.LiteralType):
        return "one of " + ", ".join(map(str, info.values))
    if isinstance(info, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        whole = isinstance(info, msgspec.inspect.IntType)
        what = kind.what or ("a whole number" if whole else "a number")
        show = kind.render
        if info.ge is not None and info.le is not None:
            return f"{what} from {show(info.ge)} to {show(info.le)}"
        if info.gt is not None or (whole and info.ge == 1):
            return f"{what} above {show(info.gt or 0)}"
        if info.ge == 0:
            return f"{what}, 0 or above"
        if info.ge is not None:
            return f"{what}, at least {show(info.ge)}"
        return what
    if isinstance(info, msgspec.inspect.BytesType) and info.min_length:
        return f"text of at least {info.min_length} characters"
    return kind.what or "text"
