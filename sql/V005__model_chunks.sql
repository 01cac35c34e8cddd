-- pg-model-repo schema, version 5: models of any size.
--
-- A model up to one chunk (the repository's model_chunk_size, 4 MiB by default) stays inline in
-- ml_models.model_data as before. A larger one is stored in ml_model_chunks, one row per chunk,
-- and its ml_models row keeps an empty model_data with the model's size, sha256 and chunking
-- facts. Runs by hand after the files before it, as README.md "Schema and migrations" shows.

-- size_bytes was GENERATED from octet_length(model_data); chunked rows carry their size
-- themselves. DROP EXPRESSION turns it into a plain column in place: no table rewrite, every
-- stored value kept.
ALTER TABLE ml_models ALTER COLUMN size_bytes DROP EXPRESSION IF EXISTS;
ALTER TABLE ml_models ALTER COLUMN size_bytes SET DEFAULT 0;
ALTER TABLE ml_models ALTER COLUMN size_bytes SET NOT NULL;

-- chunk_count = 0: inline (model_data holds the bytes). Otherwise chunk_count rows of
-- ml_model_chunks under chunk_set hold them, chunk_size bytes each (the last one may be
-- shorter), and model_data is empty.
ALTER TABLE ml_models
    ADD COLUMN IF NOT EXISTS chunk_size  integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS chunk_count integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS chunk_set   bigint;
ALTER TABLE ml_models
    DROP CONSTRAINT IF EXISTS ml_models_chunking,
    ADD CONSTRAINT ml_models_chunking CHECK (
        (chunk_count = 0 AND chunk_set IS NULL)
        OR (chunk_count > 0 AND chunk_set IS NOT NULL AND chunk_size > 0
            AND octet_length(model_data) = 0));

-- An inline row keeps size_bytes = octet_length(model_data), however it is written (by the
-- library or by hand with only the seed's columns), as the generated column did.
CREATE OR REPLACE FUNCTION ml_models_fill_size() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.chunk_count = 0 THEN
        NEW.size_bytes := octet_length(NEW.model_data);
    END IF;
    RETURN NEW;
END
$$;
CREATE OR REPLACE TRIGGER ml_models_fill_size
    BEFORE INSERT OR UPDATE OF model_data, chunk_count, size_bytes ON ml_models
    FOR EACH ROW EXECUTE FUNCTION ml_models_fill_size();

-- One id per chunked save: its chunks are staged under it, committed chunk by chunk by several
-- connections, and become part of a model only when one short transaction writes the
-- ml_models row that names it. Staged chunks of a save that died are removed by the leftover
-- sweep (reaper tick, optimize_database) once old and no longer locked by their save.
CREATE SEQUENCE IF NOT EXISTS ml_model_chunk_sets;

-- The primary key starts with model_name, the distribution column of ml_models, so the table
-- can be distributed co-located with it.
CREATE TABLE IF NOT EXISTS ml_model_chunks (
    model_name varchar(255) NOT NULL,
    version    varchar(50)  NOT NULL,
    chunk_set  bigint       NOT NULL,
    chunk_no   integer      NOT NULL,
    -- sha256 of data, lowercase hex: each chunk is checked on its own as it is read.
    checksum   text         NOT NULL,
    data       bytea        NOT NULL,
    -- When the chunk was staged; NULL once its save published it.
    staged_at  timestamptz  DEFAULT now(),
    CONSTRAINT ml_model_chunks_pkey PRIMARY KEY (model_name, version, chunk_set, chunk_no),
    CONSTRAINT ml_model_chunks_no_not_negative CHECK (chunk_no >= 0)
);
-- Model bytes rarely compress: no compression attempts, and slices stay cheap.
ALTER TABLE ml_model_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
-- The sweep's scan: only chunks not yet published (one small entry per chunk staged).
CREATE INDEX IF NOT EXISTS ml_model_chunks_unpublished
    ON ml_model_chunks (staged_at) WHERE staged_at IS NOT NULL;

-- pg-model-repo: record this migration (its checksum covers the statements above, not comments)
CREATE TABLE IF NOT EXISTS model_repo_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO model_repo_migrations (version, name, checksum)
    VALUES (5, 'V005__model_chunks.sql', '9ae2cf6025cd15bb76505c64698aa2f4cdd9ae98cc8758e139cf3b5ebaa2049a')
    ON CONFLICT (version) DO NOTHING;
