-- pg-model-repo schema, version 9: every model readable by other clients, and the channel of
-- the change events.
--
-- A chunked version (larger than model_chunk_size, stored in ml_model_chunks) kept an empty
-- model_data, which a reader that does not know about chunks took for a model of 0 bytes. Its
-- model_data is now NULL: a reader that expects bytes fails loudly instead of reading a wrong
-- model, and the bytes are not stored twice (a whole copy could not hold a model above
-- bytea's 1 GiB anyway). Other clients read any model with the functions below:
--   SELECT model_bytes('ranker', '2.0');             -- the whole model (up to bytea's 1 GiB)
--   SELECT model_chunks('ranker', '2.0');            -- its bytes in order, one row a piece
-- Both take a literal version (resolve "latest" and "@alias" with ml_models.save_seq and
-- model_aliases first) and see active versions only: an absent or soft-deleted version is
-- NULL, or no rows.

-- The re-save trigger (V002, V007) recomputed the checksum whenever model_data changed: a
-- chunked row's model_data is not its model, so it is left alone (the conversion below
-- would otherwise replace each checksum with NULL and move every chunked version to
-- "latest").
CREATE OR REPLACE FUNCTION ml_models_resave() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.chunk_count > 0 THEN
        RETURN NEW;
    END IF;
    IF NEW.model_data IS DISTINCT FROM OLD.model_data THEN
        IF NEW.checksum IS NULL OR NEW.checksum = OLD.checksum THEN
            NEW.checksum := encode(sha256(NEW.model_data), 'hex');
            IF NEW.save_seq = OLD.save_seq THEN
                IF TG_TABLE_NAME = 'ml_models' THEN
                    NEW.save_seq := nextval(format('%I.ml_models_save_seq', TG_TABLE_SCHEMA)::regclass);
                ELSE
                    BEGIN
                        SELECT c.result::bigint INTO NEW.save_seq
                        FROM run_command_on_coordinator(format('SELECT nextval(%L::regclass)',
                                 format('%I.ml_models_save_seq', TG_TABLE_SCHEMA))) c
                        WHERE c.success;
                    EXCEPTION WHEN OTHERS THEN
                        NEW.save_seq := NULL;
                    END;
                    IF NEW.save_seq IS NULL THEN
                        EXECUTE format('SELECT max(save_seq) + 1 FROM %I.%I WHERE model_name = $1',
                                       TG_TABLE_SCHEMA, TG_TABLE_NAME)
                            INTO NEW.save_seq USING NEW.model_name;
                    END IF;
                END IF;
            END IF;
            IF NEW.created_at = OLD.created_at THEN
                NEW.created_at := now();
            END IF;
        END IF;
    ELSIF NEW.checksum IS NULL THEN
        NEW.checksum := encode(sha256(NEW.model_data), 'hex');
    END IF;
    RETURN NEW;
END
$$;

-- A chunked version's model_data is NULL; an inline one's holds its bytes.
ALTER TABLE ml_models ALTER COLUMN model_data DROP NOT NULL;
ALTER TABLE ml_models DROP CONSTRAINT IF EXISTS ml_models_chunking;
UPDATE ml_models SET model_data = NULL WHERE chunk_count > 0 AND model_data IS NOT NULL;
ALTER TABLE ml_models ADD CONSTRAINT ml_models_chunking CHECK (
    (chunk_count = 0 AND chunk_set IS NULL AND model_data IS NOT NULL)
    OR (chunk_count > 0 AND chunk_set IS NOT NULL AND chunk_size > 0 AND model_data IS NULL));

-- The whole model of an active version, inline or chunked; NULL when the version is absent or
-- soft-deleted. A chunked model above what one bytea holds (1 GiB) is an error that says to
-- use model_chunks.
CREATE OR REPLACE FUNCTION model_bytes(model_name text, version text) RETURNS bytea
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    v_row record;
    v_data bytea;
BEGIN
    SELECT m.model_data, m.size_bytes, m.chunk_count, m.chunk_set INTO v_row
    FROM ml_models m WHERE m.model_name = $1 AND m.version = $2 AND m.is_active;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_row.chunk_count = 0 THEN
        RETURN v_row.model_data;
    END IF;
    IF v_row.size_bytes > 1073741823 THEN
        RAISE program_limit_exceeded USING
            MESSAGE = format('model %s/%s is %s bytes: more than one bytea holds', $1, $2, v_row.size_bytes),
            HINT = 'read it piece by piece with model_chunks(model_name, version)';
    END IF;
    SELECT string_agg(c.data, ''::bytea ORDER BY c.chunk_no) INTO v_data
    FROM ml_model_chunks c
    WHERE c.model_name = $1 AND c.version = $2 AND c.chunk_set = v_row.chunk_set;
    RETURN v_data;
END
$$;

-- The bytes of an active version in order, one row a piece (any size: one row for an inline
-- model, one a chunk for a chunked one); no rows when the version is absent or soft-deleted.
-- Where the database has no Citus it is one SQL query that the planner inlines when it is
-- called in FROM (SELECT * FROM model_chunks('ranker', '2.0')), so the server streams the
-- rows, each chunk in turn in the primary key's order, instead of collecting them first.
-- Citus runs no SQL function with parameters over distributed tables: where it is installed,
-- the function is PL/pgSQL and reads chunk by chunk (its rows are collected on the coordinator,
-- spilling to temporary files past work_mem, before the first is sent); sql/citus.sql
-- replaces the SQL one when it distributes a schema built before Citus was installed. The
-- tables are named with their schema: an inlined function takes no SET search_path.
DO $do$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        EXECUTE format($f$CREATE OR REPLACE FUNCTION %1$I.model_chunks(model_name text, version text)
            RETURNS SETOF bytea LANGUAGE plpgsql STABLE SET search_path = %1$I, pg_temp AS $body$
            #variable_conflict use_column
            DECLARE
                v_row record;
            BEGIN
                SELECT m.model_data, m.chunk_count, m.chunk_set INTO v_row FROM ml_models m
                WHERE m.model_name = $1 AND m.version = $2 AND m.is_active;
                IF NOT FOUND THEN
                    RETURN;
                END IF;
                IF v_row.chunk_count = 0 THEN
                    RETURN NEXT v_row.model_data;
                    RETURN;
                END IF;
                FOR v_no IN 0 .. v_row.chunk_count - 1 LOOP
                    RETURN NEXT (SELECT c.data FROM ml_model_chunks c
                                 WHERE c.model_name = $1 AND c.version = $2
                                   AND c.chunk_set = v_row.chunk_set AND c.chunk_no = v_no);
                END LOOP;
            END
            $body$$f$, current_schema());
    ELSE
        EXECUTE format($f$CREATE OR REPLACE FUNCTION %1$I.model_chunks(model_name text, version text)
            RETURNS SETOF bytea LANGUAGE sql STABLE AS $body$
            (SELECT m.model_data FROM %1$I.ml_models m
             WHERE m.model_name = $1 AND m.version = $2 AND m.is_active AND m.chunk_count = 0)
            UNION ALL
            (SELECT c.data FROM %1$I.ml_model_chunks c
             WHERE c.model_name = $1 AND c.version = $2
               AND c.chunk_set = (SELECT m.chunk_set FROM %1$I.ml_models m
                                  WHERE m.model_name = $1 AND m.version = $2 AND m.is_active)
             ORDER BY c.chunk_no)
            $body$$f$, current_schema());
    END IF;
    -- model_bytes finds its tables whatever the caller's search_path.
    EXECUTE format('ALTER FUNCTION %I.model_bytes(text, text) SET search_path = %I, pg_temp',
                   current_schema(), current_schema());
END
$do$;

-- The LISTEN channel of this schema's change events (see docs/models.md, "Change events"):
-- model_events.<schema>, or for a schema name longer than 50 characters its first 33
-- characters and 16 hex digits of its sha256, so that a channel stays under PostgreSQL's 63.
DO $do$
DECLARE
    v_schema text := current_schema();
BEGIN
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %I.model_events_channel() RETURNS text
        LANGUAGE sql IMMUTABLE AS %L$f$, v_schema,
        format('SELECT %L::text', CASE WHEN length(v_schema) <= 50 THEN 'model_events.' || v_schema
            ELSE 'model_events.' || left(v_schema, 33) || '.'
                 || left(encode(sha256(convert_to(v_schema, 'UTF8')), 'hex'), 16) END));
END
$do$;

-- pg-model-repo: record this migration (its checksum covers the statements above, not comments)
CREATE TABLE IF NOT EXISTS model_repo_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO model_repo_migrations (version, name, checksum)
    VALUES (9, 'V009__models_for_every_client.sql', '8d5ef12021e7833831e726a730566d9fce97b9e11fbbfae8a8e0f2d9dab4be9d')
    ON CONFLICT (version) DO NOTHING;
