"""Reselection: when to move slots (schedule) and where to grow them (RigL or SM3 scores)."""

from .schedule import Schedule

__all__ = ["Schedule"]
