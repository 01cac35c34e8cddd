-- Taking over the seed's ml_models: run by the library (src/db/seed_takeover.rs) inside the
-- migration's transaction, before V001__init.sql, once it has recognised the table as the
-- seed's (id uuid primary key, uq_model_name_version, no save sequence). Every row is kept.

-- The natural key instead of the uuid. The id column stays, with its default, so that SQL
-- naming it keeps working; it is no longer a key.
ALTER TABLE ml_models DROP CONSTRAINT ml_models_pkey;
ALTER TABLE ml_models ADD CONSTRAINT ml_models_pkey PRIMARY KEY (model_name, version);
ALTER TABLE ml_models DROP CONSTRAINT uq_model_name_version;

CREATE SEQUENCE ml_models_save_seq;
ALTER TABLE ml_models
    ADD COLUMN size_bytes     bigint GENERATED ALWAYS AS (octet_length(model_data)) STORED,
    ADD COLUMN checksum       text,
    ADD COLUMN save_seq       bigint,
    ADD COLUMN load_count     bigint NOT NULL DEFAULT 0,
    ADD COLUMN last_loaded_at timestamptz,
    ALTER COLUMN model_data SET STORAGE EXTERNAL;

-- Save sequence in created_at order, then id; checksums of the bytes as stored. The bytes are
-- written anew so that they are kept uncompressed (STORAGE EXTERNAL applies to new values
-- only, and streaming loads read compressed values from the start for every slice).
UPDATE ml_models m
   SET save_seq = o.seq,
       checksum = encode(sha256(m.model_data), 'hex'),
       model_data = m.model_data || ''::bytea
  FROM (SELECT id, row_number() OVER (ORDER BY created_at, id) AS seq FROM ml_models) o
 WHERE m.id = o.id;
SELECT setval('ml_models_save_seq', coalesce(max(save_seq), 0) + 1, false) FROM ml_models;

-- Columns the seed left nullable. A NULL is_active was invisible to the seed's
-- "is_active = true" queries, so it stays inactive; a missing created_at sorted last above.
UPDATE ml_models SET created_at = now() WHERE created_at IS NULL;
UPDATE ml_models SET is_active = false WHERE is_active IS NULL;
-- Metadata must be an object: JSON null becomes {}, any other value is kept under one key.
UPDATE ml_models
   SET metadata = CASE WHEN metadata = 'null'::jsonb THEN '{}'::jsonb
                       ELSE jsonb_build_object('seed_metadata', metadata) END
 WHERE jsonb_typeof(metadata) <> 'object';

ALTER TABLE ml_models
    ALTER COLUMN save_seq SET DEFAULT nextval('ml_models_save_seq'),
    ALTER COLUMN save_seq SET NOT NULL,
    ALTER COLUMN created_at SET DEFAULT now(),
    ALTER COLUMN created_at SET NOT NULL,
    ALTER COLUMN is_active SET NOT NULL,
    ADD CONSTRAINT ml_models_metadata_is_object CHECK (jsonb_typeof(metadata) = 'object');
