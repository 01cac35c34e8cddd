-- Taking over the seed's embeddings, first part: run by the library inside the migration's
-- transaction, before V001__init.sql. The library then converts float64 vectors to float32
-- and moves vectors with non-finite values aside, and finally adds the byte-length CHECK.

ALTER TABLE embeddings DROP CONSTRAINT embeddings_pkey;
ALTER TABLE embeddings ADD CONSTRAINT embeddings_pkey PRIMARY KEY (entity_type, entity_id);
ALTER TABLE embeddings DROP CONSTRAINT uq_entity_type_id;
UPDATE embeddings
   SET created_at = coalesce(created_at, updated_at, now()),
       updated_at = coalesce(updated_at, created_at, now())
 WHERE created_at IS NULL OR updated_at IS NULL;
ALTER TABLE embeddings
    ALTER COLUMN created_at SET DEFAULT now(),
    ALTER COLUMN created_at SET NOT NULL,
    ALTER COLUMN updated_at SET DEFAULT now(),
    ALTER COLUMN updated_at SET NOT NULL,
    SET (fillfactor = 50);

-- Rows that are not valid vectors, kept here with the reason instead of in embeddings: the
-- table V004__embeddings_per_type.sql creates (and uses for its own misfits), as it defines it.
CREATE TABLE IF NOT EXISTS embeddings_quarantine (
    entity_type    varchar(50)  NOT NULL,
    entity_id      varchar(255) NOT NULL,
    embeddings     bytea,
    dimension      integer,
    created_at     timestamptz,
    updated_at     timestamptz,
    reason         text         NOT NULL,
    quarantined_at timestamptz  NOT NULL DEFAULT now()
);

-- A type's dimension: the most common one among its vectors of a usable size (4 x dimension
-- bytes, float32, or 8 x dimension, float64), the earliest saved on a tie. Rows of another
-- size or dimension go to the quarantine.
WITH type_dimension AS (
    SELECT DISTINCT ON (entity_type) entity_type, dimension
      FROM (SELECT entity_type, dimension, count(*) AS vectors, min(created_at) AS first_saved
              FROM embeddings
             WHERE dimension > 0
               AND octet_length(embeddings) IN (4 * dimension::bigint, 8 * dimension::bigint)
             GROUP BY entity_type, dimension) d
     ORDER BY entity_type, vectors DESC, first_saved, dimension
), verdict AS (
    SELECT e.entity_type, e.entity_id,
           CASE
               WHEN e.dimension <= 0 THEN format('dimension %s is not positive', e.dimension)
               WHEN octet_length(e.embeddings)
                    NOT IN (4 * e.dimension::bigint, 8 * e.dimension::bigint)
                   THEN format('%s bytes for dimension %s: neither 4 x (float32) nor 8 x '
                               '(float64) the dimension', octet_length(e.embeddings), e.dimension)
               WHEN e.dimension <> t.dimension
                   THEN format('dimension %s, while most vectors of the type have %s',
                               e.dimension, t.dimension)
           END AS reason
      FROM embeddings e LEFT JOIN type_dimension t ON t.entity_type = e.entity_type
), moved AS (
    DELETE FROM embeddings e
     USING verdict v
     WHERE v.reason IS NOT NULL
       AND e.entity_type = v.entity_type AND e.entity_id = v.entity_id
    RETURNING e.entity_type, e.entity_id, e.embeddings, e.dimension, e.created_at,
              e.updated_at, v.reason
)
INSERT INTO embeddings_quarantine
       (entity_type, entity_id, embeddings, dimension, created_at, updated_at, reason)
SELECT entity_type, entity_id, embeddings, dimension, created_at, updated_at, reason
  FROM moved;
