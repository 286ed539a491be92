"""Run one Django scenario in this interpreter: `python -m tests.e2e.django_app DRIVER NAME ARGS`.

DRIVER is `psycopg` or `psycopg2`, NAME a function of scenarios.py and ARGS a JSON object with
at least `port`, `name`, `user` and `password` of the database behind pgproxy. The scenario's
result is printed as one JSON line on stdout; a failure exits non-zero with its traceback.

Django's PostgreSQL backend imports psycopg 3 when it can and psycopg2 otherwise; there is no
setting for it. To get psycopg2 with both installed, `sys.modules["psycopg"] = None` makes
`import psycopg` raise ImportError (the import system's documented way to block a module),
before Django is imported.
"""

from __future__ import annotations

import json
import sys

DRIVERS = ("psycopg", "psycopg2")


def main(argv: list[str]) -> None:
    driver, scenario, raw_args = argv
    if driver not in DRIVERS:
        raise SystemExit(f"driver must be one of {DRIVERS}, not {driver!r}")
    if driver == "psycopg2":
        sys.modules["psycopg"] = None  # type: ignore[assignment]
    args = json.loads(raw_args)

    import django
    from django.conf import settings

    from tests.e2e.django_app.settings import settings_for

    settings.configure(
        **settings_for(
            port=args["port"], name=args["name"], user=args["user"], password=args["password"]
        )
    )
    django.setup()

    from django.db import connection

    from tests.e2e.django_app import scenarios

    in_use = connection.Database.__name__
    if in_use != driver:
        raise SystemExit(f"Django uses {in_use}, not {driver}")
    result = getattr(scenarios, scenario)(args)
    print(json.dumps({"driver": in_use, "result": result}))


if __name__ == "__main__":
    main(sys.argv[1:])
