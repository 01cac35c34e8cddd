-- pg-model-repo schema, version 10: half-size vectors per entity type.
--
-- A type is declared with a precision before its first row (embedding_type_declare): 'f32'
-- (the default, 4 bytes a dimension) or 'f16', stored as pgvector's `halfvec` (2 bytes a
-- dimension; HNSW indexes up to 4,000 dimensions) in a column of its own, embeddings_half:
-- the partitions of one table share their column types, so an f16 type's partition keeps
-- `embeddings` NULL and its values in embeddings_half. Every client writes an f16 type as it
-- writes any other (a `vector` in `embeddings`): a trigger on the type's partition converts
-- the row to halfvec (pgvector's cast, which refuses a value outside f16's range with 22003),
-- so no write path changes and no conversion is silent (the type was declared f16). Readers
-- read coalesce(embeddings, embeddings_half::vector): f32 values widened from f16.
--
-- f16 needs pgvector: on a BYTEA schema embeddings_half is a BYTEA column that stays NULL, and
-- declaring an f16 type is refused; converting the schema to pgvector later (V006) runs this
-- file again, which turns embeddings_half into a halfvec.
--
-- Locks: adding a nullable column and dropping NOT NULL change the catalog only; the existing
-- partitions get their NOT NULL rule back as a CHECK that is NOT VALID (no scan, enforced for
-- every new row).

ALTER TABLE embedding_types ADD COLUMN IF NOT EXISTS vector_precision text NOT NULL DEFAULT 'f32';

DO $$
DECLARE
    v_type text := (SELECT t.typname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                    WHERE a.attrelid = 'embeddings'::regclass AND a.attname = 'embeddings');
    v_half text := (SELECT t.typname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                    WHERE a.attrelid = 'embeddings'::regclass AND a.attname = 'embeddings_half'
                      AND NOT a.attisdropped);
    v_ext text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                   JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
    t record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'embedding_types_precision'
                   AND conrelid = 'embedding_types'::regclass) THEN
        ALTER TABLE embedding_types ADD CONSTRAINT embedding_types_precision
            CHECK (vector_precision IN ('f32', 'f16'));
    END IF;
    IF v_half IS NULL THEN
        EXECUTE format('ALTER TABLE embeddings ADD COLUMN embeddings_half %s',
                       CASE WHEN v_type = 'vector' THEN v_ext || '.halfvec' ELSE 'bytea' END);
    ELSIF v_type = 'vector' AND v_half = 'bytea' THEN
        -- A BYTEA schema converted to pgvector (V006, which rewrites the table anyway).
        EXECUTE format('ALTER TABLE embeddings ALTER COLUMN embeddings_half TYPE %s.halfvec USING NULL',
                       v_ext);
    END IF;
    ALTER TABLE embeddings ALTER COLUMN embeddings DROP NOT NULL;
    FOR t IN
        SELECT r.storage, r.vector_precision FROM embedding_types r
        WHERE r.storage IS NOT NULL AND to_regclass(quote_ident(r.storage)) IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                          WHERE c.conrelid = to_regclass(quote_ident(r.storage))
                            AND c.conname = r.storage || '_values')
    LOOP
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (embeddings IS NOT NULL AND embeddings_half IS NULL) NOT VALID',
                       t.storage, t.storage || '_values');
    END LOOP;
END
$$;

-- Converts an f16 type's row: the vector in `embeddings` becomes a halfvec in embeddings_half.
-- pgvector's cast rounds to nearest and refuses a value outside f16's range (22003).
CREATE OR REPLACE FUNCTION embedding_half_in() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.embeddings IS NOT NULL THEN
        NEW.embeddings_half := NEW.embeddings::halfvec;
        NEW.embeddings := NULL;
    END IF;
    RETURN NEW;
END
$$;

-- Whether a storage table holds an f16 type (it has the conversion trigger).
CREATE OR REPLACE FUNCTION embedding_storage_is_half(p_name text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = to_regclass(quote_ident(p_name)) AND tgname = p_name || '_half')
$$;

-- V004's and V006's, for both storages and both precisions: the type's rules as CHECKs, and
-- for an f16 type the conversion trigger. Internal.
CREATE OR REPLACE FUNCTION embedding_storage_new(p_type text, p_dim integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_name text;
    v_precision text;
    v_vector boolean := (SELECT t.typname = 'vector' FROM pg_attribute a
                         JOIN pg_type t ON t.oid = a.atttypid
                         WHERE a.attrelid = 'embeddings'::regclass AND a.attname = 'embeddings');
    v_rule text;
BEGIN
    SELECT format('embeddings_%s_%s', id, nextval('embedding_storage_seq')), vector_precision
    INTO STRICT v_name, v_precision FROM embedding_types WHERE entity_type = p_type;
    EXECUTE format('CREATE TABLE %I (LIKE embeddings INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
                    WITH (fillfactor = 100)', v_name);
    IF v_precision = 'f16' THEN
        v_rule := format('embeddings IS NULL AND embeddings_half IS NOT NULL AND vector_dims(embeddings_half) = %s', p_dim);
    ELSIF v_vector THEN
        v_rule := format('embeddings IS NOT NULL AND embeddings_half IS NULL AND vector_dims(embeddings) = %s', p_dim);
    ELSE
        v_rule := format('embeddings IS NOT NULL AND embeddings_half IS NULL AND octet_length(embeddings) = %s', 4 * p_dim);
    END IF;
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (entity_type = %L),
                    ADD CONSTRAINT %I CHECK (dimension = %s AND %s)',
                   v_name, v_name || '_type', p_type, v_name || '_dimension', p_dim, v_rule);
    IF v_precision = 'f16' THEN
        -- Citus distributes a table with a trigger only when told that it may.
        PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
        EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE ON %I FOR EACH ROW
                        EXECUTE FUNCTION embedding_half_in()', v_name || '_half', v_name);
    END IF;
    RETURN v_name;
END
$$;

-- Declares a type before its first row: its dimension and precision ('f32' or 'f16').
-- Returns 'created', 'unchanged' (the same declaration again), 'redeclared' (an empty type
-- with other values: its storage is made again) or 'has_rows' (other values for a type with
-- rows: nothing changes).
CREATE OR REPLACE FUNCTION embedding_type_declare(p_type text, p_dim integer, p_precision text)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_dim integer;
    v_precision text;
    v_storage text;
    v_empty boolean := true;
BEGIN
    IF p_precision NOT IN ('f32', 'f16') THEN
        RAISE invalid_parameter_value USING MESSAGE = format('precision %s', p_precision);
    END IF;
    IF p_precision = 'f16' AND (SELECT t.typname <> 'vector' FROM pg_attribute a
                                JOIN pg_type t ON t.oid = a.atttypid
                                WHERE a.attrelid = 'embeddings'::regclass
                                  AND a.attname = 'embeddings') THEN
        RAISE feature_not_supported USING MESSAGE =
            'half-size vectors need pgvector, and this schema stores vectors as BYTEA';
    END IF;
    PERFORM embedding_type_lock(p_type);
    SELECT dimension, vector_precision, storage INTO v_dim, v_precision, v_storage
    FROM embedding_types WHERE entity_type = p_type FOR UPDATE;
    IF FOUND AND v_storage IS NOT NULL AND v_dim = p_dim AND v_precision = p_precision THEN
        RETURN 'unchanged';
    END IF;
    IF v_storage IS NOT NULL AND to_regclass(quote_ident(v_storage)) IS NOT NULL THEN
        EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM %I)', v_storage) INTO v_empty;
    END IF;
    IF NOT v_empty THEN
        RETURN 'has_rows';
    END IF;
    PERFORM embedding_ddl_lock();
    INSERT INTO embedding_types AS r (entity_type, dimension, vector_precision)
    VALUES (p_type, p_dim, p_precision)
    ON CONFLICT (entity_type) DO UPDATE SET dimension = EXCLUDED.dimension,
        vector_precision = EXCLUDED.vector_precision, updated_at = EXCLUDED.updated_at;
    IF v_storage IS NOT NULL AND to_regclass(quote_ident(v_storage)) IS NOT NULL THEN
        PERFORM embedding_lock_all();
        EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', v_storage);
        EXECUTE format('DROP TABLE %I', v_storage);
    END IF;
    IF to_regclass('embedding_vector_indexes') IS NOT NULL THEN
        -- The new storage has no index; a type redeclared is indexed again by its owner.
        EXECUTE 'DELETE FROM embedding_vector_indexes WHERE entity_type = $1' USING p_type;
    END IF;
    PERFORM embedding_storage_attach(p_type, embedding_storage_new(p_type, p_dim), true);
    RETURN CASE WHEN v_storage IS NULL THEN 'created' ELSE 'redeclared' END;
END
$$;

-- V008's end of a load, with HNSW's dimension limit of the table's precision (4,000 for f16).
CREATE OR REPLACE FUNCTION embedding_load_commit(p_type text, p_name text, p_dim integer,
                                                 p_keep_old boolean)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_target text := current_setting('default_statistics_target');
    v_id integer;
    v_old text;
    v_carried bigint := 0;
    v_metric text;
    v_loading boolean;
BEGIN
    PERFORM embedding_type_lock(p_type);
    SELECT id, r.storage INTO STRICT v_id, v_old FROM embedding_types r
    WHERE entity_type = p_type FOR UPDATE;
    -- A statement of its own: in a Citus distributed schema, this EXISTS inside the OR below
    -- answered true when the row was there (Citus 13.2).
    v_loading := EXISTS (SELECT 1 FROM embedding_loads l WHERE l.storage = p_name);
    IF p_name !~ ('^embeddings_' || v_id || '_[0-9]+$') OR p_name IS NOT DISTINCT FROM v_old
       OR NOT v_loading OR to_regclass(quote_ident(p_name)) IS NULL THEN
        RAISE invalid_parameter_value USING MESSAGE =
            format('%s is not a loading storage table of entity type %s', p_name, p_type);
    END IF;
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I PRIMARY KEY (entity_type, entity_id)',
                   p_name, p_name || '_key');
    IF to_regclass('embedding_vector_indexes') IS NOT NULL THEN
        IF p_dim > (CASE WHEN embedding_storage_is_half(p_name) THEN 4000 ELSE 2000 END) THEN
            DELETE FROM embedding_vector_indexes WHERE entity_type = p_type;
        END IF;
        FOR v_metric IN SELECT metric FROM embedding_vector_indexes
                        WHERE entity_type = p_type ORDER BY metric LOOP
            PERFORM embedding_vector_index_build(p_name, p_dim, v_metric);
        END LOOP;
    END IF;
    -- Planner statistics from a small sample: keys, types and dimensions need no more.
    PERFORM set_config('default_statistics_target', '10', true);
    EXECUTE format('ANALYZE %I', p_name);
    PERFORM set_config('default_statistics_target', v_target, true);
    PERFORM embedding_ddl_lock();
    IF p_keep_old THEN
        -- Writers wait from here to the commit (readers go on): none is lost.
        PERFORM embedding_lock_mode('EXCLUSIVE');
        IF v_old IS NOT NULL AND to_regclass(quote_ident(v_old)) IS NOT NULL THEN
            EXECUTE format('INSERT INTO %1$I SELECT o.* FROM %2$I o WHERE NOT EXISTS
                                (SELECT 1 FROM %1$I n WHERE n.entity_type = o.entity_type
                                                        AND n.entity_id = o.entity_id)',
                           p_name, v_old);
            GET DIAGNOSTICS v_carried = ROW_COUNT;
        END IF;
        -- Rows of the type in the default partition whose keys the load has: the load's
        -- win; the others are adopted when the table is attached.
        EXECUTE format('DELETE FROM embeddings_default d WHERE d.entity_type = %L AND EXISTS
                            (SELECT 1 FROM %I n WHERE n.entity_id = d.entity_id)',
                       p_type, p_name);
    END IF;
    PERFORM embedding_lock_all();
    IF v_old IS NOT NULL AND to_regclass(quote_ident(v_old)) IS NOT NULL THEN
        EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', v_old);
        EXECUTE format('DROP TABLE %I', v_old);
    END IF;
    UPDATE embedding_types SET dimension = p_dim WHERE entity_type = p_type;
    PERFORM embedding_storage_attach(p_type, p_name, p_keep_old);
    DELETE FROM embedding_loads WHERE storage = p_name;
    RETURN v_carried;
END
$$;

-- V006's index build, for both precisions: an f16 type's index is on
-- (embeddings_half::halfvec(dim)) with the halfvec operator classes. Internal.
CREATE OR REPLACE FUNCTION embedding_vector_index_build(p_table text, p_dim integer, p_metric text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_half boolean := embedding_storage_is_half(p_table);
    v_ops text := CASE p_metric WHEN 'l2' THEN '_l2_ops' WHEN 'cosine' THEN '_cosine_ops'
                                WHEN 'inner_product' THEN '_ip_ops' END;
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
    IF v_half THEN
        EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I USING hnsw ((embeddings_half::halfvec(%s)) %s)',
                       p_table || '_hnsw_' || p_metric, p_table, p_dim, 'halfvec' || v_ops);
    ELSE
        EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I USING hnsw ((embeddings::vector(%s)) %s)',
                       p_table || '_hnsw_' || p_metric, p_table, p_dim, 'vector' || v_ops);
    END IF;
END
$$;

-- V006's, with HNSW's dimension limit of the type's precision (4,000 for f16).
CREATE OR REPLACE FUNCTION embedding_vector_index_create(p_type text, p_metric text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_storage text;
    v_dim integer;
    v_max integer;
BEGIN
    SELECT storage, dimension INTO v_storage, v_dim FROM embedding_types
    WHERE entity_type = p_type AND storage IS NOT NULL FOR UPDATE;
    IF NOT FOUND OR to_regclass(quote_ident(v_storage)) IS NULL THEN
        RETURN false;
    END IF;
    v_max := CASE WHEN embedding_storage_is_half(v_storage) THEN 4000 ELSE 2000 END;
    IF v_dim > v_max THEN
        RAISE invalid_parameter_value USING MESSAGE = format(
            'entity type %s has %s dimensions; pgvector''s HNSW indexes take at most %s', p_type, v_dim, v_max);
    END IF;
    EXECUTE format('ANALYZE %I', v_storage);
    PERFORM embedding_vector_index_build(v_storage, v_dim, p_metric);
    INSERT INTO embedding_vector_indexes (entity_type, metric) VALUES (p_type, p_metric)
    ON CONFLICT (entity_type, metric) DO NOTHING;
    RETURN true;
END
$$;

-- Every function's search_path: this schema, then pgvector's where it is installed.
DO $$
DECLARE
    f text;
    v_path text := concat_ws(', ', quote_ident(current_schema()),
        (SELECT quote_ident(n.nspname) FROM pg_extension e
         JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'));
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'embedding_half_in()', 'embedding_storage_is_half(text)',
        'embedding_storage_new(text, integer)',
        'embedding_type_declare(text, integer, text)',
        'embedding_load_commit(text, text, integer, boolean)',
        'embedding_vector_index_build(text, integer, text)',
        'embedding_vector_index_create(text, text)']
    LOOP
        EXECUTE format('ALTER FUNCTION %I.%s SET search_path = %s, pg_temp',
                       current_schema(), f, v_path);
    END LOOP;
    EXECUTE format('REVOKE ALL ON FUNCTION %I.embedding_storage_new(text, integer),
                    %I.embedding_vector_index_build(text, integer, text) FROM PUBLIC',
                   current_schema(), current_schema());
    -- On Citus these run in sequential mode (see sql/citus.sql); a redefinition drops that.
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        FOREACH f IN ARRAY ARRAY['embedding_type_declare(text, integer, text)',
                                 'embedding_load_commit(text, text, integer, boolean)',
                                 'embedding_vector_index_create(text, text)']
        LOOP
            EXECUTE format('ALTER FUNCTION %I.%s SET citus.multi_shard_modify_mode = sequential',
                           current_schema(), f);
        END LOOP;
    END IF;
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
    VALUES (10, 'V010__half_size_vectors.sql', '8287758389bc832d77a6de393ef7f6906aedb16552d21a80b2dca0c1fe1d6b94')
    ON CONFLICT (version) DO NOTHING;
