"""The one root of the errors imgflow raises on purpose, and the kinds the shared loop tells apart.

Every error meant for a user (a bad setting, an unreachable broker, a locked output...) derives
from `ImgflowError`, so the CLI catches that one class and prints its message without a traceback.
"""


class ImgflowError(Exception):
    """An error with a message written for the user: the CLI prints it and exits 2."""


class BadInput(ImgflowError):
    """The input itself is unusable (corrupt image, missing file, refused path...).
    Permanent: it goes to the dead-letter topic at once, without retries."""


class StageConfigError(ImgflowError):
    """A setting is wrong; raised at start-up, before any message is consumed."""
