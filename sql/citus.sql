-- Scale-out with Citus: run once on the coordinator, after the schema exists (V001__init.sql),
-- with the search_path set to the repository's schema:
--   psql -d mydb -c 'SET search_path TO ml' -f sql/citus.sql
--
-- Every primary and unique key includes its table's distribution column (a test checks it
-- against the catalog), so these calls succeed unchanged. Model-keyed tables are co-located by
-- model_name so alias moves and cleanups stay single-shard transactions.

-- Small, read on every embedding write: a copy on every node.
SELECT create_reference_table('embedding_types');

SELECT create_distributed_table('ml_models', 'model_name');
SELECT create_distributed_table('model_aliases', 'model_name', colocate_with => 'ml_models');
SELECT create_distributed_table('model_alias_stack', 'model_name', colocate_with => 'ml_models');
SELECT create_distributed_table('model_alias_history', 'model_name', colocate_with => 'ml_models');
SELECT create_distributed_table('training_metrics', 'model_name', colocate_with => 'ml_models');

SELECT create_distributed_table('embeddings', 'entity_id');
-- embeddings_staging (ParallelCopy's UNLOGGED staging) stays a local table on the coordinator:
-- its rows are merged into the distributed embeddings table by INSERT … SELECT.
SELECT create_distributed_table('prediction_cache', 'cache_key');
-- pgvector (sql/V006) on Citus (designed for, not yet tested on a cluster): the extension
-- must exist in the same schema on the coordinator and every worker before the tables are
-- distributed. The exact search reads a type through the coordinator by COPY (SELECT …) TO
-- STDOUT and scores it in the client, so its answer is the exact global one; an indexed
-- search's ORDER BY distance LIMIT k runs on every shard and the coordinator merges the
-- per-shard top-k. A type's HNSW index is created on its partition, which Citus propagates to
-- the shards; DDL inside the SECURITY DEFINER functions needs citus.enable_ddl_propagation.
