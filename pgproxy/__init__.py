"""pgproxy: a PostgreSQL connection-pooling proxy on asyncio and uvloop."""

__version__ = "0.1.0"
