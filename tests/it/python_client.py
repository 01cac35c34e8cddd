"""The other client, as a data team writes it: psycopg 3, cbor2 and numpy against the tables
the Rust library uses (run by tests/it/interop.rs when these are importable).

Usage: python3 python_client.py read|write CONNINFO SCHEMA

read:  checks what the Rust test wrote (model bytes against their checksum, vectors decoded
       with numpy as little-endian float32, cache values decoded with cbor2, metrics).
write: writes as the Python side of a shared database does (a model re-save by upsert, float32
       vectors, CBOR cache values, metrics), for the Rust test to read back.
Prints one line: "ok <number of checks>", or raises.
"""

import hashlib
import sys

import cbor2
import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

checks = 0


def check(condition, what):
    global checks
    if not condition:
        raise AssertionError(what)
    checks += 1


def read(cur):
    cur.execute("SELECT model_name, version, model_data, checksum, size_bytes FROM ml_models "
                "ORDER BY model_name, version")
    models = cur.fetchall()
    check(len(models) == 2, f"two models, got {len(models)}")
    for name, version, data, checksum, size in models:
        check(hashlib.sha256(data).hexdigest() == checksum, f"{name}/{version} checksum")
        check(len(data) == size, f"{name}/{version} size")
        # model_bytes() reads every model the same way, chunked ones included.
        cur.execute("SELECT model_bytes(%s, %s)", (name, version))
        check(cur.fetchone()[0] == data, f"{name}/{version} model_bytes")

    cur.execute("SELECT entity_id, embeddings, dimension FROM embeddings "
                "WHERE entity_type = 'user' ORDER BY entity_id")
    for entity_id, data, dimension in cur.fetchall():
        vector = np.frombuffer(data, dtype="<f4")
        check(len(vector) == dimension, f"{entity_id} dimension")
        expected = np.array([0.1, -2.5, 3.25, 1e-7], dtype="<f4") * (1 if entity_id == "u1" else 2)
        check(np.array_equal(vector, expected), f"{entity_id}: {vector} != {expected}")

    cur.execute("SELECT cache_key, predictions FROM prediction_cache ORDER BY cache_key")
    values = {key: cbor2.loads(value) for key, value in cur.fetchall()}
    check(values["recs"] == {"recommendations": [1, 2, 3], "scores": [0.5, 0.25]}, f"recs: {values['recs']}")
    check(values["label"] == "churn", f"label: {values['label']}")
    check(values["count"] == 7 and type(values["count"]) is int, f"count: {values['count']!r}")
    check(values["floats"] == [0.5, 0.25, -1.0], f"floats: {values['floats']}")

    cur.execute("SELECT metrics FROM training_metrics WHERE model_name = 'ranker'")
    check(cur.fetchone()[0] == {"auc": 0.91, "loss": 0.25}, "metrics")


def write(cur):
    # The seed's re-save: upsert naming only its own columns.
    cur.execute(
        "INSERT INTO ml_models (model_name, version, model_data, metadata) VALUES (%s, %s, %s, '{}') "
        "ON CONFLICT (model_name, version) DO UPDATE SET model_data = EXCLUDED.model_data",
        ("ranker", "1", b"retrained by python"))
    vector = np.array([0.5, 0.25, 0.125, -8.0])
    cur.execute(
        "INSERT INTO embeddings (entity_type, entity_id, embeddings, dimension) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (entity_type, entity_id) DO UPDATE SET embeddings = EXCLUDED.embeddings, "
        # Not now(): Citus refuses functions that are not IMMUTABLE in DO UPDATE SET; the
        # excluded row's updated_at is its default, now(), computed for the insert.
        "dimension = EXCLUDED.dimension, updated_at = EXCLUDED.updated_at",
        ("user", "py", np.asarray(vector, dtype="<f4").tobytes(), len(vector)))
    cur.execute(
        "INSERT INTO prediction_cache (cache_key, predictions, expires_at) "
        "VALUES (%s, %s, now() + interval '1 hour')",
        ("py_recs", cbor2.dumps({"items": ["a", "b"], "scores": [0.9, 0.8]})))
    cur.execute(
        "INSERT INTO training_metrics (model_name, version, metrics) VALUES (%s, %s, %s)",
        ("ranker", "1", Jsonb({"auc": 0.93})))
    check(True, "written")


def main():
    mode, conninfo, schema = sys.argv[1:4]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            {"read": read, "write": write}[mode](cur)
    print(f"ok {checks}")


if __name__ == "__main__":
    main()
