-- pg-model-repo schema, version 6 (optional): vectors in pgvector's `vector` type.
--
-- Applied by the library to a new schema (no vectors yet) where pgvector is available, or
-- when the owner asks for it (RepositoryConfig::vector_storage(VectorStorage::Pgvector) with
-- ModelRepository::migrate); never to a schema that keeps BYTEA. The values are the same f32
-- numbers (pgvector keeps them as 4-byte floats too); what changes is the column type, so that
-- pgvector's distance operators and HNSW indexes apply.
--
-- The conversion rewrites the embeddings table (every partition) and the ParallelCopy staging
-- table under an ACCESS EXCLUSIVE lock, in this migration's one transaction: readers and
-- writers of every type wait until it commits, and it needs room for a second copy of the
-- vectors meanwhile. Rows that cannot be vectors (empty, or more than pgvector's 16,000
-- dimensions: written by other clients) move to embeddings_quarantine first.
--
-- The extension lives once per database in a schema of its own, `pgvector` (or wherever an
-- earlier installation put it), never in a repository's schema: otherwise dropping that one
-- schema with CASCADE would drop every `vector` column of every other repository. Sessions
-- find it on their search_path after the repository's schema; the functions below pin both.
-- Creating the extension needs a superuser (pgvector is not a trusted extension) unless it
-- exists already.
--
-- By hand (after V001 and V004, as the schema's owner), in one transaction (-1: the file sets
-- its search_path for the rest of its transaction):
--   psql -1 -d mydb -c 'SET search_path TO ml' -f sql/optional/V006__vector_storage.sql

-- Two repositories migrating at once must not both create the extension: one database-wide
-- lock (the key spells "pgmrvect") serializes them.
SELECT pg_advisory_xact_lock(8099562793229181812);

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') THEN
        IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgvector') THEN
            CREATE SCHEMA pgvector;
            -- Like `public`: every role may use the types and operators found there.
            GRANT USAGE ON SCHEMA pgvector TO PUBLIC;
        END IF;
        CREATE EXTENSION IF NOT EXISTS vector SCHEMA pgvector;
    END IF;
    IF (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
        WHERE e.extname = 'vector') = current_schema() THEN
        RAISE WARNING 'the vector extension lives in schema %, a repository schema: dropping it drops every vector column of other repositories too', current_schema();
    END IF;
    -- The rest of this file finds pgvector's type and functions after this schema.
    PERFORM set_config('search_path', format('%I, %I', current_schema(),
        (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
         WHERE e.extname = 'vector')), true);
END
$$;

-- Little-endian f32 bytes (the BYTEA storage) as a vector, exactly: each value is rebuilt
-- from its sign, exponent and mantissa bits in float8 (exact for every finite float4).
CREATE OR REPLACE FUNCTION embedding_bytes_to_vector(b bytea) RETURNS vector
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT array_agg(
               (CASE WHEN bits >> 31 = 1 THEN -1.0::float8 ELSE 1.0::float8 END)
             * (CASE WHEN (bits >> 23) & 255 = 0
                     THEN (bits & 8388607)::float8 * 2.0::float8 ^ -149
                     ELSE (1.0::float8 + (bits & 8388607)::float8 * 2.0::float8 ^ -23)
                          * 2.0::float8 ^ (((bits >> 23) & 255) - 127) END)
             ORDER BY i)::real[]::vector
    -- (PostgreSQL gives | and << one precedence, left to right: hence the parentheses.)
    FROM (SELECT i, get_byte(b, 4 * i)::bigint
                    | (get_byte(b, 4 * i + 1)::bigint << 8)
                    | (get_byte(b, 4 * i + 2)::bigint << 16)
                    | (get_byte(b, 4 * i + 3)::bigint << 24) AS bits
          FROM generate_series(0, length(b) / 4 - 1) AS i) AS v
$$;

-- A vector as little-endian f32 bytes (for embeddings_quarantine, which keeps BYTEA).
CREATE OR REPLACE FUNCTION embedding_vector_to_bytes(v vector) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT string_agg(substr(b, 4, 1) || substr(b, 3, 1) || substr(b, 2, 1) || substr(b, 1, 1),
                      ''::bytea ORDER BY i)
    FROM (SELECT i, float4send(x) AS b FROM unnest(v::real[]) WITH ORDINALITY AS u(x, i)) AS s
$$;

-- Rows no vector can hold go to quarantine (only other clients can have written them).
WITH misfits AS (
    DELETE FROM embeddings
    WHERE octet_length(embeddings) = 0 OR octet_length(embeddings) > 4 * 16000
    RETURNING *)
INSERT INTO embeddings_quarantine
    (entity_type, entity_id, embeddings, dimension, created_at, updated_at, reason)
SELECT entity_type, entity_id, embeddings, dimension, created_at, updated_at,
       format('%s bytes cannot be a pgvector vector (1..16000 dimensions)',
              octet_length(embeddings))
FROM misfits;

-- The byte-length CHECKs go (on the parent, then each partition's own copy), the column
-- becomes a vector, and the same rules come back in vector terms.
DO $$
DECLARE
    c record;
    t record;
BEGIN
    PERFORM embedding_lock_all();
    -- This schema's constraints first, materialized: pg_get_constraintdef must not meet the
    -- constraints of other sessions' tables being dropped meanwhile.
    FOR c IN
        WITH mine AS MATERIALIZED (
            SELECT con.oid, con.conrelid, con.conname
            FROM pg_constraint con
            JOIN pg_partition_tree('embeddings'::regclass) tree ON tree.relid = con.conrelid
            WHERE con.contype = 'c')
        SELECT conrelid::regclass AS rel, conname FROM mine
        WHERE pg_get_constraintdef(oid) LIKE '%octet_length(embeddings)%'
        ORDER BY conrelid <> 'embeddings'::regclass, conname
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT IF EXISTS %I', c.rel, c.conname);
    END LOOP;
    ALTER TABLE embeddings ALTER COLUMN embeddings TYPE vector
        USING embedding_bytes_to_vector(embeddings);
    ALTER TABLE embeddings ADD CONSTRAINT embeddings_dims_match_dimension
        CHECK (vector_dims(embeddings) = dimension);
    FOR t IN
        SELECT r.storage, r.dimension FROM embedding_types r
        WHERE r.storage IS NOT NULL AND to_regclass(quote_ident(r.storage)) IS NOT NULL
    LOOP
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (dimension = %s AND vector_dims(embeddings) = %s)',
                       t.storage, t.storage || '_dimension', t.dimension, t.dimension);
    END LOOP;
END
$$;

ALTER TABLE embeddings_staging ALTER COLUMN embeddings TYPE vector
    USING embedding_bytes_to_vector(embeddings);

-- The storage functions of V004, in vector terms.

CREATE OR REPLACE FUNCTION embedding_storage_new(p_type text, p_dim integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_name text;
BEGIN
    SELECT format('embeddings_%s_%s', id, nextval('embedding_storage_seq')) INTO STRICT v_name
    FROM embedding_types WHERE entity_type = p_type;
    EXECUTE format('CREATE TABLE %I (LIKE embeddings INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
                    WITH (fillfactor = 100)', v_name);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (entity_type = %L),
                    ADD CONSTRAINT %I CHECK (dimension = %s AND vector_dims(embeddings) = %s)',
                   v_name, v_name || '_type', p_type, v_name || '_dimension', p_dim, p_dim);
    RETURN v_name;
END
$$;

CREATE OR REPLACE FUNCTION embedding_storage_attach(p_type text, p_name text, p_adopt boolean)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_dim integer;
BEGIN
    SELECT dimension INTO STRICT v_dim FROM embedding_types WHERE entity_type = p_type;
    IF p_adopt THEN
        EXECUTE format('WITH moved AS (DELETE FROM embeddings_default
                            WHERE entity_type = %L AND dimension = %s
                              AND vector_dims(embeddings) = %s RETURNING *)
                        INSERT INTO %I SELECT * FROM moved', p_type, v_dim, v_dim, p_name);
        WITH misfits AS (DELETE FROM embeddings_default WHERE entity_type = p_type RETURNING *)
        INSERT INTO embeddings_quarantine
            (entity_type, entity_id, embeddings, dimension, created_at, updated_at, reason)
        SELECT entity_type, entity_id, embedding_vector_to_bytes(embeddings), dimension,
               created_at, updated_at,
               format('dimension %s, but the type is registered with %s', dimension, v_dim)
        FROM misfits;
    ELSE
        DELETE FROM embeddings_default WHERE entity_type = p_type;
    END IF;
    EXECUTE format('CREATE UNIQUE INDEX IF NOT EXISTS %I ON %I (entity_type, entity_id)',
                   p_name || '_key', p_name);
    -- ATTACH adopts an index as the partition of the parent's primary key only when it backs
    -- a primary key itself (else it builds a second one): see V004.
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = to_regclass(quote_ident(p_name)) AND contype = 'p') THEN
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I PRIMARY KEY USING INDEX %I',
                       p_name, p_name || '_key', p_name || '_key');
    END IF;
    EXECUTE format('ALTER TABLE embeddings ATTACH PARTITION %I FOR VALUES IN (%L)', p_name, p_type);
    UPDATE embedding_types SET storage = p_name, updated_at = now() WHERE entity_type = p_type;
END
$$;

-- HNSW indexes per type ------------------------------------------------------------------

-- Which metrics each type has an HNSW index for: a full refresh builds them again on the new
-- storage, and dropping the type forgets them.
CREATE TABLE IF NOT EXISTS embedding_vector_indexes (
    entity_type varchar(50) NOT NULL
        REFERENCES embedding_types (entity_type) ON DELETE CASCADE,
    metric      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT embedding_vector_indexes_pkey PRIMARY KEY (entity_type, metric),
    CONSTRAINT embedding_vector_indexes_metric CHECK (metric IN ('l2', 'cosine', 'inner_product'))
);

-- Builds the HNSW index of one metric on a storage table, on the expression
-- (embeddings::vector(dim)): HNSW needs a fixed dimension, and the column of a partitioned
-- table has none. Searches must order by the same expression. maintenance_work_mem is raised
-- for this transaction to what the graph needs (at most 2 GB), since a graph that outgrows it
-- builds many times slower. Internal.
CREATE OR REPLACE FUNCTION embedding_vector_index_build(p_table text, p_dim integer, p_metric text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_ops text := CASE p_metric WHEN 'l2' THEN 'vector_l2_ops'
                                WHEN 'cosine' THEN 'vector_cosine_ops'
                                WHEN 'inner_product' THEN 'vector_ip_ops' END;
    v_rows bigint;
    v_mem bigint;
BEGIN
    IF v_ops IS NULL THEN
        RAISE invalid_parameter_value USING MESSAGE = format('unknown metric %s', p_metric);
    END IF;
    SELECT greatest(reltuples, 0)::bigint INTO v_rows FROM pg_class WHERE oid = to_regclass(quote_ident(p_table));
    v_mem := greatest(pg_size_bytes(current_setting('maintenance_work_mem')),
                      least(2147483648, coalesce(v_rows, 0) * (8 * p_dim + 512)));
    PERFORM set_config('maintenance_work_mem', (v_mem / 1024)::text || 'kB', true);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I USING hnsw ((embeddings::vector(%s)) %s)',
                   p_table || '_hnsw_' || p_metric, p_table, p_dim, v_ops);
END
$$;

-- Builds a type's HNSW index for a metric and records it; returns false for a type without
-- storage. pgvector's HNSW takes at most 2,000 dimensions.
CREATE OR REPLACE FUNCTION embedding_vector_index_create(p_type text, p_metric text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_storage text;
    v_dim integer;
BEGIN
    SELECT storage, dimension INTO v_storage, v_dim FROM embedding_types
    WHERE entity_type = p_type AND storage IS NOT NULL FOR UPDATE;
    IF NOT FOUND OR to_regclass(quote_ident(v_storage)) IS NULL THEN
        RETURN false;
    END IF;
    IF v_dim > 2000 THEN
        RAISE invalid_parameter_value USING MESSAGE = format(
            'entity type %s has %s dimensions; pgvector''s HNSW indexes take at most 2000', p_type, v_dim);
    END IF;
    EXECUTE format('ANALYZE %I', v_storage);
    PERFORM embedding_vector_index_build(v_storage, v_dim, p_metric);
    INSERT INTO embedding_vector_indexes (entity_type, metric) VALUES (p_type, p_metric)
    ON CONFLICT (entity_type, metric) DO NOTHING;
    RETURN true;
END
$$;

-- V004's end of a full refresh, with the type's HNSW indexes built on the new storage
-- before the swap (a new dimension above HNSW's 2,000 forgets them, with a notice).
CREATE OR REPLACE FUNCTION embedding_replace_commit(p_type text, p_name text, p_dim integer)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_target text := current_setting('default_statistics_target');
    v_id integer;
    v_old text;
    v_metric text;
BEGIN
    SELECT id, storage INTO STRICT v_id, v_old FROM embedding_types
    WHERE entity_type = p_type FOR UPDATE;
    IF p_name !~ ('^embeddings_' || v_id || '_[0-9]+$') OR p_name = v_old
       OR to_regclass(quote_ident(p_name)) IS NULL THEN
        RAISE invalid_parameter_value USING MESSAGE =
            format('%s is not a new storage table of entity type %s', p_name, p_type);
    END IF;
    EXECUTE format('CREATE UNIQUE INDEX %I ON %I (entity_type, entity_id)',
                   p_name || '_key', p_name);
    -- Planner statistics from a small sample (see V004).
    PERFORM set_config('default_statistics_target', '10', true);
    EXECUTE format('ANALYZE %I', p_name);
    PERFORM set_config('default_statistics_target', v_target, true);
    IF p_dim > 2000 THEN
        DELETE FROM embedding_vector_indexes WHERE entity_type = p_type;
        IF FOUND THEN
            RAISE NOTICE 'entity type % now has % dimensions: its HNSW indexes are gone (at most 2000)', p_type, p_dim;
        END IF;
    END IF;
    FOR v_metric IN SELECT metric FROM embedding_vector_indexes WHERE entity_type = p_type ORDER BY metric LOOP
        PERFORM embedding_vector_index_build(p_name, p_dim, v_metric);
    END LOOP;
    PERFORM embedding_lock_all();
    IF v_old IS NOT NULL AND to_regclass(quote_ident(v_old)) IS NOT NULL THEN
        EXECUTE format('DROP TABLE %I', v_old);
    END IF;
    UPDATE embedding_types SET dimension = p_dim WHERE entity_type = p_type;
    PERFORM embedding_storage_attach(p_type, p_name, false);
END
$$;

-- Every function's search_path: this schema, then pgvector's, pg_temp last.
DO $$
DECLARE
    f text;
    v_ext text := (SELECT n.nspname FROM pg_extension e
                   JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'embedding_storage_new(text, integer)', 'embedding_storage_attach(text, text, boolean)',
        'embedding_lock_all()', 'embedding_type_ensure(text, integer)', 'embedding_type_forget(text)',
        'embedding_replace_begin(text, integer)', 'embedding_replace_commit(text, text, integer)',
        'embedding_type_drop(text)', 'embedding_bytes_to_vector(bytea)',
        'embedding_vector_to_bytes(vector)', 'embedding_vector_index_build(text, integer, text)',
        'embedding_vector_index_create(text, text)']
    LOOP
        EXECUTE format('ALTER FUNCTION %I.%s SET search_path = %I, %I, pg_temp',
                       current_schema(), f, current_schema(), v_ext);
    END LOOP;
    EXECUTE format('REVOKE ALL ON FUNCTION %I.embedding_storage_new(text, integer),
                    %I.embedding_storage_attach(text, text, boolean),
                    %I.embedding_vector_index_build(text, integer, text) FROM PUBLIC',
                   current_schema(), current_schema(), current_schema());
END
$$;

-- pg-model-repo: record this migration (its checksum covers the statements above, not comments)
CREATE TABLE IF NOT EXISTS model_repo_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO model_repo_migrations (version, name, checksum)
    VALUES (6, 'V006__vector_storage.sql', 'a14f490f924ad7977ea8781c7c321f04b63213409a2f0869b73c2d6f6e087a91')
    ON CONFLICT (version) DO NOTHING;
