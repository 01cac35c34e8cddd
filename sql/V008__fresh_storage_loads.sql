-- pg-model-repo schema, version 8: bulk loads into fresh storage, with no merge pass.
--
-- A load that fills a type's storage from scratch (the type's first load, a full refresh, or a
-- reload that covers most of the type) writes its rows straight into a fresh, unattached
-- storage table of the type's shape, without an index: one COPY with FREEZE on one
-- connection, or several COPY streams on connections of their own. One short transaction
-- then builds the key, carries over the type's rows whose keys the load does not have (for a
-- load; a refresh drops them), and swaps the new table in for the type's old partition.
--
--   embedding_load_begin(type, dim)        registers the type if new (without storage) and
--                                          creates the fresh table (committed by the caller),
--                                          recorded in embedding_loads under a load id that
--                                          the loading session keeps locked
--   embedding_load_commit(type, table, dim, keep_old)
--                                          the end of a load, in one transaction
--   embedding_load_abandon(load_id, min_age)
--                                          drops the table of a load that failed or died
--
-- Locks: a load of a type takes the type's advisory lock first (embedding_type_lock), so
-- loads and refreshes of one type queue instead of deadlocking, and loads of different types
-- never wait on each other's tables. The commit blocks writers of every type (EXCLUSIVE on
-- embeddings, readers go on) while it carries the type's other rows over, then takes ACCESS
-- EXCLUSIVE for the swap itself; both in short attempts until lock_timeout.
--
-- A table of a load whose process died stays unattached and is dropped by the leftovers
-- sweep an hour later; the sweep skips a load whose id its session still holds locked.

CREATE TABLE IF NOT EXISTS embedding_loads (
    load_id     bigint      PRIMARY KEY,
    entity_type varchar(50) NOT NULL,
    storage     text        NOT NULL UNIQUE,
    started_at  timestamptz NOT NULL DEFAULT now()
);

-- The advisory lock of one entity type: loads, refreshes, drops and first saves of a type
-- queue on it (transaction scope). Waits without lock_timeout: a load of the type ahead may
-- take long, and the queue is the point (the caller's watchdog bounds a hung server).
CREATE OR REPLACE FUNCTION embedding_type_lock(p_type text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_old text := current_setting('lock_timeout');
BEGIN
    PERFORM set_config('lock_timeout', '0', true);
    PERFORM pg_advisory_xact_lock(1886221874, hashtext(current_schema() || '.' || p_type));
    PERFORM set_config('lock_timeout', v_old, true);
END
$$;

-- A lock on embeddings itself (ONLY: not on its partitions) in p_mode, taken in short
-- attempts until the session's lock_timeout (lock_not_available, 55P03, after it), so waiting
-- for it never stalls other sessions for more than one attempt. Every client reaches the
-- partitions through embeddings, so this is enough to hold them off; a partition to drop is
-- then locked by an ordinary wait, which cancels an autovacuum working on it (PostgreSQL
-- does that for a wait longer than deadlock_timeout; short attempts never got there, and a
-- refresh waited out lock_timeout behind the autovacuum of a freshly loaded type). Internal.
CREATE OR REPLACE FUNCTION embedding_lock_mode(p_mode text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_old text := current_setting('lock_timeout');
    v_deadline timestamptz := clock_timestamp()
        + coalesce(nullif(v_old, '0')::interval, interval '1 hour');
BEGIN
    IF p_mode NOT IN ('EXCLUSIVE', 'ACCESS EXCLUSIVE') THEN
        RAISE invalid_parameter_value USING MESSAGE = format('lock mode %s', p_mode);
    END IF;
    LOOP
        BEGIN
            PERFORM set_config('lock_timeout', '100ms', true);
            EXECUTE format('LOCK TABLE ONLY embeddings IN %s MODE', p_mode);
            PERFORM set_config('lock_timeout', v_old, true);
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            IF clock_timestamp() >= v_deadline THEN
                RAISE lock_not_available USING MESSAGE = format(
                    'could not lock the embeddings table within lock_timeout (%s)', v_old);
            END IF;
            PERFORM pg_sleep(0.02 + random() * 0.05);
        END;
    END LOOP;
END
$$;

-- V004's, on embeddings itself only (see embedding_lock_mode): the callers lock the one
-- partition they drop by an ordinary wait.
CREATE OR REPLACE FUNCTION embedding_lock_all() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM embedding_lock_mode('ACCESS EXCLUSIVE');
END
$$;

-- Starts a load into fresh storage: registers the type with p_dim if it is new (its storage
-- comes with the load's commit), and creates the load's table, unattached and without an
-- index, distributed and co-located with embeddings on a row-based Citus cluster (in a
-- distributed schema it is placed with the schema). Returns the load id (the caller holds
-- its session advisory lock while the load lives), the table, the registered dimension
-- (another than p_dim: a load, not a refresh, fails with a dimension mismatch and rolls
-- back) and whether this call registered the type (a failed load forgets it again).
CREATE OR REPLACE FUNCTION embedding_load_begin(p_type text, p_dim integer,
                                                OUT load_id bigint, OUT storage text,
                                                OUT registered integer, OUT created boolean)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_method "char";
BEGIN
    PERFORM embedding_type_lock(p_type);
    SELECT r.dimension INTO registered FROM embedding_types r WHERE r.entity_type = p_type;
    created := NOT FOUND;
    IF created THEN
        INSERT INTO embedding_types (entity_type, dimension) VALUES (p_type, p_dim);
        registered := p_dim;
    END IF;
    load_id := nextval('embeddings_load_seq');
    storage := embedding_storage_new(p_type, p_dim);
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        -- Placed beside embeddings before any row comes, so the COPY streams write straight
        -- to the nodes: by entity_id (row-based), or whole beside the schema's other tables
        -- (a distributed schema).
        EXECUTE format('SELECT partmethod FROM pg_dist_partition WHERE logicalrelid = %L::regclass',
                       'embeddings') INTO v_method;
        IF v_method = 'h' THEN
            EXECUTE format('SELECT create_distributed_table(%L, %L, colocate_with => %L)',
                           quote_ident(storage), 'entity_id', 'embeddings');
        ELSIF v_method = 'n' THEN
            EXECUTE format('SELECT create_distributed_table(%L, NULL, colocate_with => %L)',
                           quote_ident(storage), 'embeddings');
        END IF;
    END IF;
    INSERT INTO embedding_loads (load_id, entity_type, storage) VALUES (load_id, p_type, storage);
END
$$;

-- Empties a load's table in the caller's transaction, so that a COPY in the same transaction
-- may FREEZE its rows (PostgreSQL allows it into a table created or truncated in the
-- transaction): the load's transaction never touches embeddings itself until its commit.
CREATE OR REPLACE FUNCTION embedding_load_truncate(p_name text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM embedding_loads WHERE storage = p_name) THEN
        RAISE invalid_parameter_value USING MESSAGE =
            format('%s is not the table of a load in progress', p_name);
    END IF;
    EXECUTE format('TRUNCATE %I', p_name);
END
$$;

-- Ends a load into fresh storage, in the caller's transaction: builds the table's key (and
-- the type's HNSW indexes), then, with writers held off, carries over the type's rows whose
-- keys the table lacks when p_keep_old (a load; rows of the type that other clients wrote to
-- the default partition too), or drops them (a full refresh), and swaps the table in for
-- the type's old storage with the type's dimension set to p_dim. Returns the rows carried
-- over from the old storage. A key twice in the table fails the key's build (unique_violation).
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
        IF p_dim > 2000 THEN
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

-- Drops the table of load p_load_id if it was started at least p_min_age seconds ago and is
-- still unattached; returns whether it did. The caller holds the load id's advisory lock
-- (the sweep tries it; a failed load's own session holds it).
CREATE OR REPLACE FUNCTION embedding_load_abandon(p_load_id bigint, p_min_age float8)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_storage text;
BEGIN
    DELETE FROM embedding_loads
    WHERE load_id = p_load_id AND started_at <= now() - p_min_age * interval '1 second'
    RETURNING storage INTO v_storage;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- Never a table that became a type's storage.
    IF to_regclass(quote_ident(v_storage)) IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM embedding_types WHERE storage = v_storage)
       AND NOT EXISTS (SELECT 1 FROM pg_inherits
                       WHERE inhrelid = to_regclass(quote_ident(v_storage))) THEN
        EXECUTE format('DROP TABLE %I', v_storage);
    END IF;
    RETURN true;
END
$$;

-- V004's, and also for a type registered by a load that failed before its storage existed.
CREATE OR REPLACE FUNCTION embedding_type_forget(p_type text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_storage text;
    v_empty boolean;
BEGIN
    SELECT storage INTO v_storage FROM embedding_types WHERE entity_type = p_type FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF v_storage IS NULL THEN
        DELETE FROM embedding_types WHERE entity_type = p_type;
        RETURN true;
    END IF;
    IF to_regclass(quote_ident(v_storage)) IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM %I)', v_storage) INTO v_empty;
    IF NOT v_empty THEN
        RETURN false;
    END IF;
    PERFORM embedding_lock_all();
    EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', v_storage);
    EXECUTE format('DROP TABLE %I', v_storage);
    DELETE FROM embedding_types WHERE entity_type = p_type;
    RETURN true;
END
$$;

-- V007's, with the type's advisory lock taken first: a first save that read the default
-- partition before waiting on the registry row deadlocked with the creator's ATTACH, which
-- needs that partition exclusively.
CREATE OR REPLACE FUNCTION embedding_type_ensure(p_type text, p_dim integer,
                                                 OUT registered integer, OUT created boolean)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_storage text;
    v_found integer;
BEGIN
    PERFORM embedding_type_lock(p_type);
    SELECT r.dimension, r.storage INTO registered, v_storage FROM embedding_types r
    WHERE r.entity_type = p_type;
    IF FOUND AND v_storage IS NOT NULL THEN
        created := false;
        RETURN;
    END IF;
    -- A type other clients already wrote rows of takes their (most common) dimension.
    SELECT mode() WITHIN GROUP (ORDER BY d.dimension) INTO v_found
    FROM embeddings_default d WHERE d.entity_type = p_type;
    INSERT INTO embedding_types AS r (entity_type, dimension)
    VALUES (p_type, coalesce(v_found, p_dim))
    ON CONFLICT (entity_type) DO UPDATE SET dimension = r.dimension
    RETURNING r.dimension, r.storage INTO registered, v_storage;
    created := v_storage IS NULL;
    IF created THEN
        PERFORM embedding_storage_attach(p_type, embedding_storage_new(p_type, registered), true);
    END IF;
END
$$;

-- V004's, queued behind loads of the type.
CREATE OR REPLACE FUNCTION embedding_type_drop(p_type text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_storage text;
    v_rows bigint := 0;
BEGIN
    PERFORM embedding_type_lock(p_type);
    SELECT storage INTO v_storage FROM embedding_types WHERE entity_type = p_type FOR UPDATE;
    IF NOT FOUND THEN
        -- Not registered: only other clients' rows, in the default partition, if any.
        DELETE FROM embeddings_default WHERE entity_type = p_type;
        GET DIAGNOSTICS v_rows = ROW_COUNT;
        RETURN v_rows;
    END IF;
    PERFORM embedding_lock_all();
    IF v_storage IS NOT NULL AND to_regclass(quote_ident(v_storage)) IS NOT NULL THEN
        EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', v_storage);
        EXECUTE format('SELECT count(*) FROM %I', v_storage) INTO v_rows;
        EXECUTE format('DROP TABLE %I', v_storage);
    END IF;
    DELETE FROM embedding_types WHERE entity_type = p_type;
    RETURN v_rows;
END
$$;

DO $$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'embedding_type_lock(text)', 'embedding_lock_mode(text)', 'embedding_lock_all()',
        'embedding_load_begin(text, integer)', 'embedding_load_truncate(text)',
        'embedding_load_commit(text, text, integer, boolean)',
        'embedding_load_abandon(bigint, double precision)', 'embedding_type_forget(text)',
        'embedding_type_ensure(text, integer)', 'embedding_type_drop(text)']
    LOOP
        EXECUTE format('ALTER FUNCTION %I.%s SET search_path = %s, pg_temp',
                       current_schema(), f,
                       (SELECT string_agg(quote_ident(n), ', ') FROM unnest(current_schemas(false)) n));
    END LOOP;
    EXECUTE format('REVOKE ALL ON FUNCTION %I.embedding_lock_mode(text), %I.embedding_lock_all()
                    FROM PUBLIC', current_schema(), current_schema());
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
    VALUES (8, 'V008__fresh_storage_loads.sql', '42e6ce9f34c8cae0f602d071a0a87ffe4d953721dd8a1baccd78326a6dff6a8a')
    ON CONFLICT (version) DO NOTHING;
