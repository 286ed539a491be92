-- pgproxy's default auth_query calls this function: install it, as a superuser, in the
-- database named by auth_dbname (default: postgres), then let auth_user execute it.
--
--   psql -U postgres -d postgres -v auth_user=pgproxy_auth -f deploy/auth_query.sql
--
-- SECURITY DEFINER lets a role without superuser read pg_shadow through this one query only.
-- A password past its VALID UNTIL comes back as NULL, and the login is refused.

CREATE ROLE :"auth_user" LOGIN;  -- then: \password pgproxy_auth (or ALTER ROLE ... PASSWORD)
CREATE SCHEMA IF NOT EXISTS pgproxy;
REVOKE ALL ON SCHEMA pgproxy FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgproxy.user_lookup(p_user text, OUT usename name, OUT passwd text)
RETURNS record
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.usename,
           CASE WHEN s.valuntil IS NOT NULL AND s.valuntil < now() THEN NULL ELSE s.passwd END
    FROM pg_catalog.pg_shadow AS s
    WHERE s.usename = p_user
$$;

REVOKE ALL ON FUNCTION pgproxy.user_lookup(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA pgproxy TO :"auth_user";
GRANT EXECUTE ON FUNCTION pgproxy.user_lookup(text) TO :"auth_user";
