"""relate-smtp: the SMTP host of the Relate mail platform."""

__version__ = "0.1.0"
