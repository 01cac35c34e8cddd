-- pg-model-repo schema, version 2: a re-save by another client keeps its model readable.
--
-- The seed's Python (like any SQL user) overwrites a version with
--   INSERT ... ON CONFLICT (model_name, version) DO UPDATE SET model_data = EXCLUDED.model_data
-- or a plain UPDATE of model_data, and leaves checksum and save_seq alone. Version 1 filled the
-- checksum on INSERT only, so such a row then read as Corrupt, and "latest" did not move.
--
-- Now, when an UPDATE writes other bytes to model_data and the writer did not supply a new
-- checksum, the database computes it, and the row takes a new save sequence and created_at
-- (unless the writer set them): the re-save becomes "latest", as it was a save. A writer that
-- supplies its own checksum keeps it (the library always does). Bytes that change without
-- this trigger (a disk fault; an UPDATE under session_replication_role = replica) still read
-- as Corrupt. The trigger fires only for UPDATEs that set model_data, so flushing load counts
-- and soft deletes cost nothing extra.

CREATE OR REPLACE FUNCTION ml_models_resave() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.model_data IS DISTINCT FROM OLD.model_data THEN
        IF NEW.checksum IS NULL OR NEW.checksum = OLD.checksum THEN
            NEW.checksum := encode(sha256(NEW.model_data), 'hex');
            IF NEW.save_seq = OLD.save_seq THEN
                NEW.save_seq := nextval(format('%I.ml_models_save_seq', TG_TABLE_SCHEMA)::regclass);
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
CREATE OR REPLACE TRIGGER ml_models_resave
    BEFORE UPDATE OF model_data ON ml_models
    FOR EACH ROW EXECUTE FUNCTION ml_models_resave();

-- pg-model-repo: record this migration (its checksum covers the statements above, not comments)
CREATE TABLE IF NOT EXISTS model_repo_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO model_repo_migrations (version, name, checksum)
    VALUES (2, 'V002__resave_recomputes_checksum.sql', '553142adb36bdf8cbb02734bf09d6e95d20dd1a548c25944d40f922773741d83')
    ON CONFLICT (version) DO NOTHING;
