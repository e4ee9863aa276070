-- 003: blogqa_reader, a role that can read the output tables and the queue but change
-- nothing. Grant it to the login role of a reporting tool or of the results API
-- (`GRANT blogqa_reader TO some_login`). NOLOGIN: it is a group role. Roles are
-- cluster-wide, so creating it is idempotent (a second database on the same server, or a
-- re-run after the role was created by hand, finds it already there).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'blogqa_reader') THEN
        CREATE ROLE blogqa_reader NOLOGIN;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA blogqa TO blogqa_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA blogqa TO blogqa_reader;
-- Tables and views created later by the role running the migrations.
ALTER DEFAULT PRIVILEGES IN SCHEMA blogqa GRANT SELECT ON TABLES TO blogqa_reader;
