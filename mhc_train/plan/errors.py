"""Errors of `mhc-train plan`: a layout the requested world cannot hold, or a plan that cannot run here."""

from __future__ import annotations

from mhc_train.errors import MhcTrainError


class PlanError(MhcTrainError, ValueError):
    """The plan cannot be made (a world the layout cannot hold, a process group already running); one line."""
