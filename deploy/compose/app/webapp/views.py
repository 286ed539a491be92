"""One view that runs a query, to show the database is reached through pgproxy."""

from django.db import connection
from django.http import HttpRequest, JsonResponse


def index(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database(), current_user, pg_backend_pid(), now()")
        database, user, backend_pid, now = cursor.fetchone()
    # backend_pid changes between requests: each transaction gets whichever server
    # connection of the pool is free.
    return JsonResponse(
        {
            "database": database,
            "user": user,
            "backend_pid": backend_pid,
            "server_time": now.isoformat(),
        }
    )
