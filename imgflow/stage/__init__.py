"""The shared stage loop (consume -> transform -> produce -> commit) and its parts."""

from imgflow.stage.crash import CrashPoints
from imgflow.stage.ranges import RangeBounds, RangeTracker
from imgflow.stage.records import HandledIds, InputRecord, OutputRecord, Transform, decode_messages
from imgflow.stage.runner import StageRunner, install_signal_handlers

__all__ = [
    "CrashPoints",
    "HandledIds",
    "InputRecord",
    "OutputRecord",
    "RangeBounds",
    "RangeTracker",
    "StageRunner",
    "Transform",
    "decode_messages",
    "install_signal_handlers",
]
