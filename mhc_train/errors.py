"""The one error base of mhc-train.

Every error a user can cause (bad config, data, checkpoint, launch, disk) derives from `MhcTrainError` and carries a
one-line message that names the problem and the fix. The CLI catches this class once and prints the message; anything
else is a bug and keeps its traceback. Subclasses may also derive from a builtin (`ValueError`, `RuntimeError`) so
that Python users can catch what they caught before.
"""

from __future__ import annotations


class MhcTrainError(Exception):
    """A user-facing error: its message is one line naming the problem and the fix."""
