"""The one exception type the engine raises for bad user input, in the user's own words.

An error names the engine parameter that is wrong (`param`, with the `value` given) and says
what would be right. Each front end renders it with its own names for parameters: the engine
says `layers=['layer9']`, the command line `--layers layer9`, the app its widget's label. A
fix that mentions another parameter writes it as `{name}` (e.g. "pass {checkpoint}"); a front
end without that parameter drops the fix. No front end rewrites another's words.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

_MISSING = object()
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


class CachevizError(ValueError):
    """Bad input or a missing resource; `render(names)` says what to do about it in one sentence.

    `problem`: what is wrong (a clause, no final stop). `fixes`: ways out, joined with "or";
    a fix naming a `{param}` the front end does not have is left out. `param`, `value`: the
    parameter at fault and what was given, shown first.
    """

    def __init__(self, problem: str, *fixes: str, param: str | None = None, value: Any = _MISSING):
        self.problem = problem.rstrip(". ")
        self.fixes = tuple(f for f in fixes if f)
        self.param = param
        self.value = value
        super().__init__(self.render())

    def __reduce__(self):
        # pickled whole (e.g. from a worker process), not as the rendered sentence
        return (_rebuild, (self.problem, self.fixes, self.param, self.value))

    def render(self, names: Mapping[str, str | None] | None = None, values: Mapping[str, Any] | None = None) -> str:
        """The sentence with parameters named by `names` (engine names when None).

        `names[p]`: how a front end names parameter p (`"--layers"`, `"Key layers"`); None when it
        has no such parameter. `values` optionally formats a given value for display.
        """
        def name(p: str) -> str | None:
            if names is None:
                return p
            return names.get(p, p)

        def fill(text: str) -> str | None:
            missing = False

            def sub(m: re.Match) -> str:
                nonlocal missing
                n = name(m.group(1))
                if n is None:
                    missing = True
                    return ""
                return n

            out = _PLACEHOLDER.sub(sub, text)
            return None if missing else out

        problem = fill(self.problem)
        if problem is None:  # the problem itself is about a parameter this front end lacks
            problem = _PLACEHOLDER.sub(lambda m: m.group(1).replace("_", " "), self.problem)
        fixes = [f for f in (fill(x) for x in self.fixes) if f]
        text = problem + ("; " + " or ".join(fixes) if fixes else "")
        if self.param is not None:
            subject = self._subject(name(self.param) or self.param.replace("_", " "), names, values)
            text = f"{subject}: {text}"
        return text if text.endswith((".", "?", "!")) else text + "."

    def _subject(self, label: str, names, values) -> str:
        if self.value is _MISSING:
            return label
        if names is None:
            return f"{label}={self.value!r}"
        shown = values.get(self.param, self.value) if values else self.value
        if isinstance(shown, (list, tuple)):
            shown = ",".join(map(str, shown))
        return f"{label} {shown}" if label.startswith("-") else f"{label} ({shown})"


def _rebuild(problem, fixes, param, value) -> CachevizError:
    return CachevizError(problem, *fixes, param=param, value=value)
