"""Text from a model made safe to print on a terminal.

Layer and model names, class names and paths come from files that anyone
may have written. A name holding an escape sequence (`\\x1b]0;...\\x07` sets
the terminal's title), a carriage return or a newline could rewrite what
the user sees, or forge result lines ("0 layers converted"). Every line
bnconvert prints shows such characters escaped, as Python writes them in a
string literal (`\\x1b`, `\\n`, `\\u202e`); JSON output keeps the real
names, JSON-escaped.
"""

import re

# C0 and C1 controls, DEL, and the Unicode line separators and bidirectional
# overrides, which reorder or break what follows them.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text, *, newlines=False):
    """`text` with its control characters escaped (`"\\x1b"` -> `"\\\\x1b"`).

    Args:
        text: Any object; its `str()` is escaped.
        newlines: Keep `\\n` as is, for text whose lines bnconvert made.
    """
    pattern = _CONTROL_BUT_NEWLINE if newlines else _CONTROL
    return pattern.sub(lambda m: repr(m.group())[1:-1], str(text))
