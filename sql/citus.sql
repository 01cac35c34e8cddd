-- Scale-out with Citus: distributes a repository's tables on a Citus coordinator. The library
-- runs this very file (embedded) at the end of its migrations when the database has the citus
-- extension (RepositoryConfig::citus, CitusMode::Auto by default); run by hand, it does the
-- same, idempotently. By hand, from the crate's root directory, on the coordinator: build the
-- schema with the V*.sql files as V001__init.sql says, with schema-based sharding off for that
-- session (V001 gives a sequence an owner, which Citus refuses in a distributed schema):
--   cat sql/V*.sql | PGOPTIONS='-c citus.enable_schema_based_sharding=off' psql -d mydb -v ON_ERROR_STOP=1 -1 -c 'CREATE SCHEMA IF NOT EXISTS ml' -c 'SET search_path TO ml' -f -
-- then distribute it, row-based:
--   psql -d mydb -v ON_ERROR_STOP=1 -1 -c 'SET search_path TO ml' -f sql/citus.sql
-- or schema-based (the whole schema on one node):
--   psql -d mydb -v ON_ERROR_STOP=1 -1 -c 'SET search_path TO ml' -c "SET pg_model_repo.citus_mode = 'schema'" -f sql/citus.sql
-- A schema Citus already made a distributed schema (created while
-- citus.enable_schema_based_sharding was on) is left as it is: every table in it already lives
-- whole on one node.
--
-- Row-based: every primary and unique key includes its table's distribution column (a test
-- checks it against the catalog). Model-keyed tables are co-located by model_name, so alias
-- moves, chunked saves and cleanups stay single-shard transactions; embeddings and their
-- quarantine by entity_id; the cache by its key (its key is COLLATE "C"). Each of the three
-- is a co-location group of the repository's own, so that distributing or moving one
-- repository never waits on another's. The type registry and the list of HNSW indexes (which
-- refers to it) are reference tables, a copy on every node. The
-- migration history and ParallelCopy's staging table stay local to the coordinator (the
-- staging rows are merged into embeddings by INSERT ... SELECT through it, and the advisory
-- locks that guard them are the coordinator's).
--
-- The model table's triggers (checksum, size, re-save; sql/V001, V002, V005) run on the shards:
-- Citus needs citus.enable_unsafe_triggers to distribute a table that has triggers. It is set
-- here for this transaction only; the triggers touch nothing but the row they fire for.
DO $citus$
DECLARE
    v_schema text := current_schema();
    v_mode text := coalesce(nullif(current_setting('pg_model_repo.citus_mode', true), ''), 'row');
    v_table text;
    v_column text;
    v_with text;
    v_function regprocedure;
BEGIN
    IF v_schema IS NULL THEN
        RAISE invalid_schema_name USING MESSAGE = 'set the search_path to the repository''s schema first';
    END IF;
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    -- The functions that create, refresh and drop a type's storage read the distributed
    -- embeddings table in parallel and then change the registry, a reference table that
    -- another (the HNSW index list) refers to: Citus allows that only over one connection
    -- per node, so they run in sequential mode (a setting of each function, for its call).
    FOREACH v_table IN ARRAY ARRAY['embedding_type_ensure(text, integer)',
            'embedding_type_forget(text)', 'embedding_replace_begin(text, integer)',
            'embedding_replace_commit(text, text, integer)', 'embedding_type_drop(text)',
            'embedding_vector_index_create(text, text)', 'embedding_load_begin(text, integer)',
            'embedding_load_commit(text, text, integer, boolean)',
            'embedding_load_abandon(bigint, double precision)',
            'embedding_type_declare(text, integer, text)']
    LOOP
        IF to_regprocedure(format('%I.%s', v_schema, v_table)) IS NOT NULL THEN
            EXECUTE format('ALTER FUNCTION %I.%s SET citus.multi_shard_modify_mode = sequential',
                           v_schema, v_table);
        END IF;
    END LOOP;
    -- model_chunks (V009) is one inlinable SQL query where a schema was built without Citus
    -- (the server streams its rows); Citus runs no SQL function with parameters over
    -- distributed tables, so here it becomes the PL/pgSQL one V009 creates where Citus is
    -- installed: it reads chunk by chunk.
    IF EXISTS (SELECT 1 FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
               WHERE p.oid = to_regprocedure(format('%I.model_chunks(text, text)', v_schema))
                 AND l.lanname = 'sql') THEN
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
            $body$$f$, v_schema);
    END IF;
    -- pgvector's conversions (V006) run inside statements that the workers execute: every
    -- node needs them.
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = quote_ident(v_schema)::regnamespace
          AND p.proname IN ('embedding_bytes_to_vector', 'embedding_vector_to_bytes')
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_object o WHERE o.objid = p.oid)
    LOOP
        PERFORM create_distributed_function(v_function);
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_dist_schema WHERE schemaid = quote_ident(v_schema)::regnamespace) THEN
        RETURN;
    END IF;
    IF v_mode = 'schema' THEN
        PERFORM citus_schema_distribute(quote_ident(v_schema)::regnamespace);
        RETURN;
    ELSIF v_mode <> 'row' THEN
        RAISE invalid_parameter_value USING MESSAGE =
            format('pg_model_repo.citus_mode is %L: use row or schema', v_mode);
    END IF;
    FOR v_table, v_column, v_with IN
        SELECT * FROM (VALUES
            ('embedding_types',       NULL,         NULL),
            ('embedding_vector_indexes', NULL,      NULL),
            ('ml_models',             'model_name', 'none'),
            ('ml_model_chunks',       'model_name', 'ml_models'),
            ('model_aliases',         'model_name', 'ml_models'),
            ('model_alias_stack',     'model_name', 'ml_models'),
            ('model_alias_history',   'model_name', 'ml_models'),
            ('training_metrics',      'model_name', 'ml_models'),
            ('embeddings',            'entity_id',  'none'),
            ('embeddings_quarantine', 'entity_id',  'embeddings'),
            ('prediction_cache',      'cache_key',  'none')
        ) AS t(name, distribution_column, colocate_with)
    LOOP
        -- embedding_vector_indexes exists only where vectors use pgvector's type (V006).
        CONTINUE WHEN to_regclass(format('%I.%I', v_schema, v_table)) IS NULL;
        -- Done: hash-distributed, or a reference table. (A table with a foreign key to a
        -- reference table becomes a "Citus local table" by itself; it is made a reference
        -- table here: Citus locks every local table of the database on each DDL statement.)
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_dist_partition
                              WHERE logicalrelid = format('%I.%I', v_schema, v_table)::regclass
                                AND (partmethod = 'h' OR repmodel = 't'));
        IF v_column IS NULL THEN
            PERFORM create_reference_table(format('%I.%I', v_schema, v_table)::regclass);
        ELSE
            PERFORM create_distributed_table(format('%I.%I', v_schema, v_table)::regclass,
                v_column, colocate_with => CASE WHEN v_with = 'none' THEN v_with
                                                ELSE format('%I.%I', v_schema, v_with) END);
        END IF;
    END LOOP;
END
$citus$;
