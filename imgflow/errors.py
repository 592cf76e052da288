"""Error kinds the shared loop tells apart."""


class BadInput(Exception):
    """The input itself is unusable (corrupt image, missing file, refused path...).
    Permanent: it goes to the dead-letter topic at once, without retries."""


class StageConfigError(Exception):
    """A setting is wrong; raised at start-up, before any message is consumed."""
