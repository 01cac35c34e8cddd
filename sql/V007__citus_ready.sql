-- pg-model-repo schema, version 7: the same functions in shapes a Citus cluster accepts (and
-- that mean the same on one server).
--
-- embedding_type_ensure: Citus refuses a subquery inside INSERT ... VALUES, so the dimension
-- of rows other clients wrote first is read by a statement of its own.
--
-- ml_models_resave (the re-save trigger of V002): on a Citus cluster the trigger runs on a
-- worker, against the shard, where nextval() of ml_models_save_seq would come from the worker's
-- own range of the sequence, far above every value the coordinator hands out: that version
-- would stay "latest" for ever. A trigger that fires on a shard (its table is not ml_models
-- itself) asks the coordinator for the next value (Citus's run_command_on_coordinator, over
-- the cluster's own connections). Should the coordinator be out of reach from the worker (not
-- in Citus's metadata), it takes one more than the model's highest save sequence, read from
-- the same shard, which holds every version of the model (ml_models is distributed by
-- model_name): right for this model until the coordinator's sequence catches up. On one
-- server, and on the coordinator, nothing changes.

CREATE OR REPLACE FUNCTION embedding_type_ensure(p_type text, p_dim integer,
                                                 OUT registered integer, OUT created boolean)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_storage text;
    v_found integer;
BEGIN
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
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION %I.embedding_type_ensure(text, integer) SET search_path = %I, pg_temp',
                   current_schema(), current_schema());
END
$$;

CREATE OR REPLACE FUNCTION ml_models_resave() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
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

-- pg-model-repo: record this migration (its checksum covers the statements above, not comments)
CREATE TABLE IF NOT EXISTS model_repo_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO model_repo_migrations (version, name, checksum)
    VALUES (7, 'V007__citus_ready.sql', '219be6c0ad24371ff45f3ab2539cab3038ebdba64a4ca54cb10dcda47703dfa7')
    ON CONFLICT (version) DO NOTHING;
