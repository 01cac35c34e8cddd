-- pg-model-repo schema, version 12: on Citus, a load's start waits its turn behind the swaps.
--
-- embedding_load_begin (V008) distributes the load's fresh table beside embeddings before any
-- row comes (create_distributed_table with colocate_with => 'embeddings'). Citus takes its
-- co-location and metadata locks for that, and the end of another type's load (or refresh)
-- holds embeddings exclusively while it swaps its table in, which takes the same Citus locks:
-- in a distributed schema, a start and another type's end deadlocked now and then (40P01, one
-- of them rolled back). The start now takes the schema's DDL lock (embedding_ddl_lock, which
-- every swap takes before it locks embeddings) before it distributes its table, so the two
-- queue instead. Without Citus nothing changes: the start distributes nothing.

CREATE OR REPLACE FUNCTION embedding_load_begin(p_type text, p_dim integer,
                                                OUT load_id bigint, OUT storage text,
                                                OUT registered integer, OUT created boolean)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_method "char";
    v_citus boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus');
BEGIN
    PERFORM embedding_type_lock(p_type);
    SELECT r.dimension INTO registered FROM embedding_types r WHERE r.entity_type = p_type;
    created := NOT FOUND;
    IF created THEN
        INSERT INTO embedding_types (entity_type, dimension) VALUES (p_type, p_dim);
        registered := p_dim;
    END IF;
    load_id := nextval('embeddings_load_seq');
    IF v_citus THEN
        -- Before the table is made: its LIKE embeddings and its distribution beside embeddings
        -- come after every swap that started first.
        PERFORM embedding_ddl_lock();
    END IF;
    storage := embedding_storage_new(p_type, p_dim);
    IF v_citus THEN
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

-- pg-model-repo: record this migration (its checksum covers the statements above, not comments)
CREATE TABLE IF NOT EXISTS model_repo_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO model_repo_migrations (version, name, checksum)
    VALUES (12, 'V012__load_begin_waits_its_turn_on_citus.sql', '202bce446c07cc0bb84cc3e43146ffbcd2e6d34039d320478f3508f14474ad73')
    ON CONFLICT (version) DO NOTHING;
