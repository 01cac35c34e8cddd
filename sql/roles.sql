-- Least privilege for pg-model-repo.
--
-- The owner role creates the schema and runs migrations (ModelRepository::migrate, or the
-- numbered files by hand as sql/V001__init.sql describes). The application role gets USAGE on
-- the schema and row-level DML only: no CREATE, no DDL. It opens the repository with
-- auto_migrate(false), or with the default auto_migrate(true) while no migration is pending
-- (opening then runs no DDL; with one pending it is told to ask the owner).
--
-- The application role must exist before this file runs (it does not create roles: that
-- takes CREATEROLE, which the owner should not need). Create it once, e.g. as a superuser:
--   psql -d mydb -c "CREATE ROLE ml_app LOGIN PASSWORD 'change-me'"
-- Then run this file as the owner, after the migrations, with the schema and the application
-- role as psql variables:
--   psql -d mydb -v ON_ERROR_STOP=1 -v schema=ml -v app_role=ml_app -f sql/roles.sql
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
