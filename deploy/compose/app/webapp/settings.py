"""Settings of the compose app: a database behind pgproxy, configured by the environment."""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "webapp.urls"
WSGI_APPLICATION = "webapp.wsgi.application"
USE_TZ = True

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        # pgproxy, not PostgreSQL: only the host and port differ from a direct connection.
        "HOST": os.environ.get("DATABASE_HOST", "pgproxy"),
        "PORT": os.environ.get("DATABASE_PORT", "6432"),
        "NAME": os.environ.get("DATABASE_NAME", "app"),
        "USER": os.environ.get("DATABASE_USER", "app"),
        "PASSWORD": os.environ.get("DATABASE_PASSWORD", ""),
        # Django's documentation asks for this behind a transaction-mode pooler: a server-side
        # cursor (QuerySet.iterator()) outlives the transaction that opened it, and pgproxy
        # would have to pin the client to one server connection while it is open.
        "DISABLE_SERVER_SIDE_CURSORS": True,
        # A persistent connection to pgproxy holds no server connection between transactions.
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
    }
}
