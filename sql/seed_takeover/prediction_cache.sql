-- Taking over the seed's prediction_cache: run by the library inside the migration's
-- transaction, before V001__init.sql. Every entry is kept as it is; values the seed's Python
-- pickled read back as RepoError::Serialization (they are not CBOR) until they are
-- rewritten or expire.

ALTER TABLE prediction_cache DROP CONSTRAINT prediction_cache_pkey;
ALTER TABLE prediction_cache DROP CONSTRAINT prediction_cache_cache_key_key;
UPDATE prediction_cache SET access_count = 0 WHERE access_count IS NULL;
UPDATE prediction_cache
   SET cached_at = LEAST(now(), expires_at - interval '1 microsecond')
 WHERE cached_at IS NULL;

-- COLLATE "C": byte order, so that a glob's literal prefix is a range scan on the key.
ALTER TABLE prediction_cache
    ALTER COLUMN cache_key TYPE varchar(512) COLLATE "C",
    ALTER COLUMN access_count TYPE bigint,
    ALTER COLUMN access_count SET DEFAULT 0,
    ALTER COLUMN access_count SET NOT NULL,
    ALTER COLUMN cached_at SET DEFAULT now(),
    ALTER COLUMN cached_at SET NOT NULL,
    ALTER COLUMN last_accessed SET DEFAULT now(),
    ADD CONSTRAINT prediction_cache_pkey PRIMARY KEY (cache_key),
    SET (fillfactor = 90);
