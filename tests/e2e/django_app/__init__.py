"""A minimal Django project for the drop-in tests: settings, two models, one migration.

Nothing here is imported by the test process itself. `python -m tests.e2e.django_app` runs one
scenario in a fresh interpreter (see __main__.py), because Django can be configured once per
process and picks its PostgreSQL driver (psycopg 3 or psycopg2) at import time.
"""
