"""Another client on every vector storage, written as docs/embeddings.md ("Other clients")
shows: psycopg 3 with numpy, and pgvector-python for the pgvector types. Run by
tests/it/search_pgvector/half_vectors (python_storages test) where these are importable.

Usage: python3 python_storages.py read|write CONNINFO SCHEMA STORAGE TYPE
  STORAGE: vector (an f32 type on pgvector), halfvec (a type declared f16), bytea (a BYTEA schema)
read:  checks the rows r0..r4 the Rust test wrote: value(r, i) exactly (f32) or within f16's
       rounding (halfvec)
write: writes rows p0..p4 with value(r, i) for the Rust test to read back
Prints "ok <checks>", or raises.
"""

import sys

import numpy as np
import psycopg
from psycopg import sql

DIM = 16


def value(r, i):
    # The same float32 arithmetic as the Rust test: bit-exact on both sides.
    return np.float32((r * 7 + i) % 13) * np.float32(0.1) - np.float32(0.6)


def expected(r):
    return np.array([value(r, i) for i in range(DIM)], dtype=np.float32)


# The upsert every client uses: embeddings_half too (an f16 type's trigger has moved the new
# row's value there before the conflict is seen); updated_at from the new row (Citus allows
# no now() in DO UPDATE SET).
UPSERT = ("INSERT INTO embeddings (entity_type, entity_id, embeddings, dimension) "
          "VALUES (%s, %s, %s, %s) ON CONFLICT (entity_type, entity_id) DO UPDATE SET "
          "embeddings = EXCLUDED.embeddings, embeddings_half = EXCLUDED.embeddings_half, "
          "dimension = EXCLUDED.dimension, updated_at = EXCLUDED.updated_at")


def connect(conninfo, schema, storage):
    conn = psycopg.connect(conninfo, autocommit=True)
    path = [schema]
    if storage != "bytea":
        ext = conn.execute("SELECT n.nspname FROM pg_extension e JOIN pg_namespace n "
                           "ON n.oid = e.extnamespace WHERE e.extname = 'vector'").fetchone()[0]
        path.append(ext)
    conn.execute(sql.SQL("SET search_path TO {}").format(
        sql.SQL(", ").join(sql.Identifier(p) for p in path)))
    if storage != "bytea":
        from pgvector.psycopg import register_vector
        register_vector(conn)  # vector <-> numpy float32, halfvec <-> HalfVector
    return conn


def read(conn, storage, etype):
    checks = 0
    if storage == "bytea":
        rows = conn.execute("SELECT entity_id, embeddings FROM embeddings WHERE entity_type = %s",
                            (etype,)).fetchall()
        got = {i: np.frombuffer(b, dtype="<f4") for i, b in rows}
    elif storage == "vector":
        rows = conn.execute("SELECT entity_id, embeddings FROM embeddings WHERE entity_type = %s",
                            (etype,)).fetchall()
        # pgvector-python returns a Vector (newer releases) or a numpy array (older ones).
        got = {i: np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v, dtype=np.float32)
               for i, v in rows}
    else:
        # An f16 type: embeddings_half as a HalfVector (float16), widened to float32.
        rows = conn.execute("SELECT entity_id, embeddings_half FROM embeddings "
                            "WHERE entity_type = %s", (etype,)).fetchall()
        got = {i: h.to_numpy().astype(np.float32) for i, h in rows}
    for r in range(5):
        v, want = got["r%d" % r], expected(r)
        assert v.dtype == np.float32 and v.shape == (DIM,), (v.dtype, v.shape)
        if storage == "halfvec":
            assert np.all(np.abs(v - want) <= np.abs(want) * 2.0 ** -11 + 2.0 ** -25), (v, want)
            assert np.array_equal(v, want.astype(np.float16).astype(np.float32))
        else:
            assert v.tobytes() == want.tobytes(), (v, want)
        checks += 1
    return checks


def write(conn, storage, etype):
    for r in range(5):
        v = expected(r)
        # bytea: little-endian float32 bytes; pgvector: a numpy float32 array, which
        # register_vector sends as a vector (an f16 type's trigger stores it as halfvec).
        param = v.astype("<f4").tobytes() if storage == "bytea" else v
        conn.execute(UPSERT, (etype, "p%d" % r, param, DIM))
    return 5


def main():
    mode, conninfo, schema, storage, etype = sys.argv[1:6]
    with connect(conninfo, schema, storage) as conn:
        checks = read(conn, storage, etype) if mode == "read" else write(conn, storage, etype)
    print("ok %d" % checks)


if __name__ == "__main__":
    main()
