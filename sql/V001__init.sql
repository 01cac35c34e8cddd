-- pg-model-repo schema, version 1.
--
-- Creates every table in the first schema of the search_path. The library applies the
-- numbered files itself (embedded, under an advisory lock, in one transaction), and each file
-- ends by recording itself in model_repo_migrations, so a schema set up by hand is one the
-- library recognises. To set it up by hand, from the crate's root directory, as the role that
-- is to own the tables (psql 10 or later; every numbered file, in order, in one transaction):
--   cat sql/V*.sql | psql -d mydb -v ON_ERROR_STOP=1 -1 -c 'CREATE SCHEMA IF NOT EXISTS ml' -c 'SET search_path TO ml' -f -
-- (for vectors in pgvector's type, then run sql/optional/V006__vector_storage.sql as its header
-- says), then give the application role its rights with sql/roles.sql. Both the owner and the
-- application role can then open the schema with auto_migrate(false). When a later release
-- adds files, run ModelRepository::migrate as the owner (or only the new files, the same way).
--
-- Keys are natural and every primary or unique key includes the column its table would be
-- distributed by under Citus (see citus.sql). Every column the seed did not have carries a
-- default, so a row inserted with only the seed's columns is valid.

-- Models ---------------------------------------------------------------------------------

-- The save sequence: "newest" and "latest" follow it, never the clock alone.
CREATE SEQUENCE IF NOT EXISTS ml_models_save_seq;

CREATE TABLE IF NOT EXISTS ml_models (
    model_name     varchar(255) NOT NULL,
    version        varchar(50)  NOT NULL,
    model_data     bytea        NOT NULL,
    metadata       jsonb        NOT NULL DEFAULT '{}',
    created_at     timestamptz  NOT NULL DEFAULT now(),
    is_active      boolean      NOT NULL DEFAULT true,
    size_bytes     bigint       GENERATED ALWAYS AS (octet_length(model_data)) STORED,
    checksum       text,
    save_seq       bigint       NOT NULL DEFAULT nextval('ml_models_save_seq'),
    load_count     bigint       NOT NULL DEFAULT 0,
    last_loaded_at timestamptz,
    CONSTRAINT ml_models_pkey PRIMARY KEY (model_name, version),
    CONSTRAINT ml_models_metadata_is_object CHECK (jsonb_typeof(metadata) = 'object')
);
ALTER SEQUENCE ml_models_save_seq OWNED BY ml_models.save_seq;

-- Uncompressed out-of-line storage: a slice read (streaming load) fetches only its own TOAST
-- chunks instead of decompressing from the start.
ALTER TABLE ml_models ALTER COLUMN model_data SET STORAGE EXTERNAL;

-- "latest" and version listings: active versions of one model by save sequence.
CREATE INDEX IF NOT EXISTS ml_models_active_by_seq
    ON ml_models (model_name, save_seq DESC) WHERE is_active;
-- search_models: metadata @> filter over active versions.
CREATE INDEX IF NOT EXISTS ml_models_active_metadata
    ON ml_models USING gin (metadata jsonb_path_ops) WHERE is_active;

-- A row inserted by hand without a checksum gets one; the library always supplies its own.
-- (V002 adds the rule for updates of model_data: a re-save by another client.)
CREATE OR REPLACE FUNCTION ml_models_fill_checksum() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.checksum IS NULL THEN
        NEW.checksum := encode(sha256(NEW.model_data), 'hex');
    END IF;
    RETURN NEW;
END
$$;
CREATE OR REPLACE TRIGGER ml_models_fill_checksum
    BEFORE INSERT ON ml_models
    FOR EACH ROW EXECUTE FUNCTION ml_models_fill_checksum();

-- Aliases: the current pointer, the stack that rollback pops, and the history of every move.
CREATE SEQUENCE IF NOT EXISTS model_alias_seq;

CREATE TABLE IF NOT EXISTS model_aliases (
    model_name varchar(255) NOT NULL,
    alias      varchar(64)  NOT NULL,
    version    varchar(50)  NOT NULL,
    updated_at timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT model_aliases_pkey PRIMARY KEY (model_name, alias)
);

CREATE TABLE IF NOT EXISTS model_alias_stack (
    model_name varchar(255) NOT NULL,
    alias      varchar(64)  NOT NULL,
    position   bigint       NOT NULL DEFAULT nextval('model_alias_seq'),
    version    varchar(50)  NOT NULL,
    CONSTRAINT model_alias_stack_pkey PRIMARY KEY (model_name, alias, position)
);

CREATE TABLE IF NOT EXISTS model_alias_history (
    model_name varchar(255) NOT NULL,
    alias      varchar(64)  NOT NULL,
    event_seq  bigint       NOT NULL DEFAULT nextval('model_alias_seq'),
    version    varchar(50)  NOT NULL,
    action     varchar(16)  NOT NULL DEFAULT 'set',
    set_at     timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT model_alias_history_pkey PRIMARY KEY (model_name, alias, event_seq),
    CONSTRAINT model_alias_history_action CHECK (action IN ('set', 'rollback'))
);

-- Training metrics -------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS training_metrics (
    model_name    varchar(255) NOT NULL,
    version       varchar(50)  NOT NULL,
    metrics       jsonb        NOT NULL,
    training_date timestamptz  NOT NULL DEFAULT now(),
    record_seq    bigint       GENERATED BY DEFAULT AS IDENTITY,
    CONSTRAINT training_metrics_pkey PRIMARY KEY (model_name, version, record_seq)
);

-- Embeddings -----------------------------------------------------------------------------

-- The dimension registry: fixed by the first vector saved for a type.
CREATE TABLE IF NOT EXISTS embedding_types (
    entity_type varchar(50) NOT NULL,
    dimension   integer     NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT embedding_types_pkey PRIMARY KEY (entity_type),
    CONSTRAINT embedding_types_dimension_positive CHECK (dimension > 0)
);

-- Vectors as little-endian f32 bytes. fillfactor 50 leaves room on each page for a second
-- version of its rows, so that a re-load of existing keys is a HOT update that skips the index
-- (at 384 dimensions a row is ~1.6 kB: fillfactor 90 leaves room for one row in four; the
-- measured difference is in docs/embeddings.md). Write-once workloads may prefer
-- ALTER TABLE embeddings SET (fillfactor = 100).
CREATE TABLE IF NOT EXISTS embeddings (
    entity_type varchar(50)  NOT NULL,
    entity_id   varchar(255) NOT NULL,
    embeddings  bytea        NOT NULL,
    dimension   integer      NOT NULL,
    created_at  timestamptz  NOT NULL DEFAULT now(),
    updated_at  timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT embeddings_pkey PRIMARY KEY (entity_type, entity_id),
    CONSTRAINT embeddings_bytes_match_dimension CHECK (octet_length(embeddings) = 4 * dimension)
) WITH (fillfactor = 50);

-- ParallelCopy's landing area: several connections COPY parts of a load into it at once, each
-- part committed under its own load id, while one transaction merges the parts into embeddings
-- and finally deletes them (a failed load deletes them too). UNLOGGED: rows live here for
-- seconds and WAL would only slow the COPY streams down.
CREATE SEQUENCE IF NOT EXISTS embeddings_load_seq;

CREATE UNLOGGED TABLE IF NOT EXISTS embeddings_staging (
    load_id     bigint      NOT NULL,
    entity_type text        NOT NULL,
    entity_id   text        NOT NULL,
    embeddings  bytea       NOT NULL,
    dimension   integer     NOT NULL,
    staged_at   timestamptz NOT NULL DEFAULT now()
);
-- Each part of a load has its own id, merged as soon as its stream commits it.
CREATE INDEX IF NOT EXISTS embeddings_staging_load_id ON embeddings_staging (load_id);

-- Prediction cache -----------------------------------------------------------------------

-- COLLATE "C": byte order, so a glob's literal prefix becomes a range scan on the key index.
CREATE TABLE IF NOT EXISTS prediction_cache (
    cache_key     varchar(512) COLLATE "C" NOT NULL,
    predictions   bytea        NOT NULL,
    metadata      jsonb        NOT NULL DEFAULT '{}',
    cached_at     timestamptz  NOT NULL DEFAULT now(),
    expires_at    timestamptz  NOT NULL,
    access_count  bigint       NOT NULL DEFAULT 0,
    last_accessed timestamptz  DEFAULT now(),
    CONSTRAINT prediction_cache_pkey PRIMARY KEY (cache_key),
    CONSTRAINT prediction_cache_expires_after_cached CHECK (expires_at > cached_at)
) WITH (fillfactor = 90);
-- fillfactor 90: flushing hit counts touches no indexed column, so with room on the page
-- the update is HOT (no index write).
-- The reaper's scan.
CREATE INDEX IF NOT EXISTS prediction_cache_expires_at ON prediction_cache (expires_at);

-- pg-model-repo: record this migration (its checksum covers the statements above, not comments)
CREATE TABLE IF NOT EXISTS model_repo_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO model_repo_migrations (version, name, checksum)
    VALUES (1, 'V001__init.sql', '0848ed6bda79d0f785ea2c0e0b52b5f485b1b797807bcb261e42ef0a71488452')
    ON CONFLICT (version) DO NOTHING;
