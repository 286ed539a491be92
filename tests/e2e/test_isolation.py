import psycopg
import asyncio, asyncpg
import pg8000.native
from .helpers import conninfo

def test_probe(pg, make_proxy):
    for port in (pg.port, make_proxy().port):
        print("PORT", port == pg.port)
        c = psycopg.connect(conninfo(port), autocommit=True, prepare_threshold=0)
        print(c.execute("SELECT name, is_holdable FROM pg_cursors").fetchall())
        print(c.execute("SELECT name FROM pg_cursors WHERE %s::int = 1", (1,)).fetchall())
        print(c.execute("SELECT name, statement FROM pg_prepared_statements").fetchall())
        c.execute("BEGIN"); c.execute("SET LOCAL isotest.owner = 'w1'")
        print(c.info.transaction_status, c.execute("SELECT current_setting('isotest.owner', true), pg_current_xact_id_if_assigned()::text").fetchall())
        c.execute("ROLLBACK")
        print(c.execute("SELECT current_setting('isotest.owner', true), pg_current_xact_id_if_assigned()::text").fetchall())
        c.close()
        async def a():
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret", database="app", server_settings={"application_name": "aw", "TimeZone": "Asia/Tokyo"})
            print(await conn.fetch("SELECT name FROM pg_cursors WHERE $1::int = 1", 1))
            print(await conn.fetch("SELECT name, statement FROM pg_prepared_statements WHERE $1::int = 1", 1))
            print(await conn.fetch("SELECT current_setting('TimeZone'), current_setting('application_name')"))
            await conn.close()
        asyncio.run(a())
        p = pg8000.native.Connection("app", host="127.0.0.1", port=port, password="app-secret", database="app", application_name="p8", startup_params={"TimeZone": "Europe/Paris", "options": "-c work_mem=3MB"})
        st = p.prepare("SELECT :v::int + 5")
        print(st.run(v=1), p.run("SELECT name, statement FROM pg_prepared_statements"))
        print(p.run("SELECT name FROM pg_cursors"), p.run("SELECT current_setting('TimeZone'), current_setting('work_mem')"))
        p.close()
