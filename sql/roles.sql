-- Least privilege for pg-model-repo.
--
-- The owner role creates the schema and runs migrations (ModelRepository::migrate, or
-- V001__init.sql by hand). The application role gets USAGE on the schema and row-level DML
-- only: no CREATE, no DDL; it opens the repository with auto_migrate(false).
--
-- Run as the owner, after the migrations, with the schema and the application role as psql
-- variables:
--   psql -d mydb -v schema=ml -v app_role=ml_app -f sql/roles.sql
--
-- The application role also uses temporary tables (streaming model saves and COPY loads stage
-- rows there): PostgreSQL grants TEMP on every database to PUBLIC by default; if yours does
-- not, add: GRANT TEMP ON DATABASE mydb TO ml_app;

GRANT USAGE ON SCHEMA :"schema" TO :"app_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA :"schema" TO :"app_role";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA :"schema" TO :"app_role";
-- Tables and sequences that later migrations add.
ALTER DEFAULT PRIVILEGES IN SCHEMA :"schema"
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app_role";
ALTER DEFAULT PRIVILEGES IN SCHEMA :"schema"
    GRANT USAGE, SELECT ON SEQUENCES TO :"app_role";
-- Where vectors are stored in pgvector's type (sql/V006): the role uses the extension's types
-- and operators, found in its schema (V006 grants USAGE on the `pgvector` schema it creates to
-- every role; an extension installed elsewhere may need this).
SELECT format('GRANT USAGE ON SCHEMA %I TO %I', n.nspname, :'app_role')
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE e.extname = 'vector'
\gexec
