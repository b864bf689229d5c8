"""One exception type for every problem a user can fix.

The CLI catches `SafesteerError` and prints its message as a single line, so messages must say
what is wrong and what to do about it, e.g. "prompt file x.csv has no column 'prompt'; pass
--field with one of: text, goal".
"""


class SafesteerError(Exception):
    """A user-facing error: one line naming the problem and the fix."""
