-- pg-model-repo schema, version 11: a reload finds the rows it lacks by their keys.
--
-- The end of a load that keeps the type's other rows (V008, V010) copied them with one anti
-- join that read every old row, although a reload (the same keys again, the case that takes
-- this path most) lacks few or none of them: on 100k x 384 that pass read the whole 160 MB
-- table to carry nothing over (106 ms of a 1.3 s reload). embedding_load_carry_over first
-- counts the keys the load lacks from the two key indexes alone (index-only scans, where the
-- old table's pages are all visible: a table loaded with FREEZE, or vacuumed), and reads old
-- rows only for those keys; a load that is mostly new keys (at least four rows per old row),
-- a table whose pages are not all visible, or one whose row count the planner does not know
-- (a Citus coordinator's) keeps the one pass. Nothing else changes.

-- The rows of p_old whose keys p_new lacks, copied into p_new; returns how many. The caller
-- holds writers of the type off. Internal.
CREATE OR REPLACE FUNCTION embedding_load_carry_over(p_new text, p_old text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_old_rows float8;
    v_old_pages float8;
    v_old_visible float8;
    v_new_rows float8;
    v_lacked bigint;
    v_carried bigint;
    v_workers text := current_setting('max_parallel_workers_per_gather');
    -- An old row o whose key the new table lacks.
    v_lacks text := format('NOT EXISTS (SELECT 1 FROM %I n WHERE n.entity_type = o.entity_type
                                                           AND n.entity_id = o.entity_id)',
                           p_new);
BEGIN
    SELECT reltuples, relpages, relallvisible INTO v_old_rows, v_old_pages, v_old_visible
    FROM pg_class WHERE oid = to_regclass(quote_ident(p_old));
    SELECT reltuples INTO v_new_rows FROM pg_class WHERE oid = to_regclass(quote_ident(p_new));
    IF v_old_rows > 0 AND v_new_rows < 4 * v_old_rows AND v_old_visible >= 0.9 * v_old_pages THEN
        -- Keys only: both key indexes in key order, no old row read. One process: workers
        -- (a parallel hash of the keys) took twice as long on 100k keys.
        PERFORM set_config('max_parallel_workers_per_gather', '0', true);
        EXECUTE format('SELECT count(*) FROM %I o WHERE %s', p_old, v_lacks) INTO v_lacked;
        PERFORM set_config('max_parallel_workers_per_gather', v_workers, true);
        IF v_lacked = 0 THEN
            RETURN 0;
        ELSIF v_lacked < 0.1 * v_old_rows THEN
            -- A few: fetched by key.
            EXECUTE format('INSERT INTO %1$I SELECT k.* FROM %2$I k
                            WHERE (k.entity_type, k.entity_id) IN
                                  (SELECT o.entity_type, o.entity_id FROM %2$I o WHERE %3$s)',
                           p_new, p_old, v_lacks);
            GET DIAGNOSTICS v_carried = ROW_COUNT;
            RETURN v_carried;
        END IF;
    END IF;
    EXECUTE format('INSERT INTO %1$I SELECT o.* FROM %2$I o WHERE %3$s', p_new, p_old, v_lacks);
    GET DIAGNOSTICS v_carried = ROW_COUNT;
    RETURN v_carried;
END
$$;

-- V010's end of a load, its carry-over by the function above.
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
            v_carried := embedding_load_carry_over(p_name, v_old);
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


-- Every function's search_path: this schema, then pgvector's where it is installed.
DO $$
DECLARE
    f text;
    v_path text := concat_ws(', ', quote_ident(current_schema()),
        (SELECT quote_ident(n.nspname) FROM pg_extension e
         JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'));
BEGIN
    FOREACH f IN ARRAY ARRAY['embedding_load_carry_over(text, text)',
                             'embedding_load_commit(text, text, integer, boolean)']
    LOOP
        EXECUTE format('ALTER FUNCTION %I.%s SET search_path = %s, pg_temp',
                       current_schema(), f, v_path);
    END LOOP;
    EXECUTE format('REVOKE ALL ON FUNCTION %I.embedding_load_carry_over(text, text) FROM PUBLIC',
                   current_schema());
    -- On Citus the end of a load runs in sequential mode (see sql/citus.sql); a redefinition
    -- drops that.
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        EXECUTE format('ALTER FUNCTION %I.embedding_load_commit(text, text, integer, boolean)
                        SET citus.multi_shard_modify_mode = sequential', current_schema());
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
    VALUES (11, 'V011__carry_over_by_key.sql', '088390c11a4da27fb8fbaad120bb2ced48a3b89a4167be11996d8caaf8e4a69f')
    ON CONFLICT (version) DO NOTHING;
