//! Exact nearest-neighbour search: a type's vectors arrive in blocks, and every block is scored
//! against all queries at once on the crate's rayon pool. Each query keeps its own top-k, so
//! the answer is exact whatever the order rows arrive in.
//!
//! Distances are pgvector's (L2, 1 - cosine similarity, negative inner product), computed in
//! f64 from the stored f32 values. Scoring every (query, row) pair in f64 would cost several
//! times a matrix product, so a block is first scored in f32 by one matrix product
//! (`matrixmultiply`, which picks AVX/FMA kernels at run time), and only the rows whose f32
//! score, widened by its proven rounding bound, could still enter a query's top-k are scored
//! again in f64. The bound is the classic one for a dot product of n terms in any summation
//! order: |fl(q·x) - q·x| <= gamma_n * sum |q_i x_i| <= gamma_n * |q| |x|, with gamma_n about
//! n * 2^-24; this code uses (n + 8) * 2^-23, twice that. The bound holds only for a sum that
//! never overflowed: a non-finite f32 score (values near f32::MAX, 1e20 squared) is never
//! screened, the row is scored in f64.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::io::Read;

use rayon::prelude::*;

use crate::db::binary_copy::RowReader;
use crate::embeddings::encode::on_cpu_pool;
use crate::embeddings::filter::RowFilter;
use crate::embeddings::types::Storage;
use crate::embeddings::types::{Metric, Neighbor};
use crate::error::{RepoError, Result};

/// Vector bytes per block: large enough that a block amortizes the matrix product's setup and
/// the hand-over between threads, small enough to stay in cache-friendly sizes.
const BLOCK_BYTES: usize = 2 << 20;
/// Queries scored together by one rayon task.
const QUERY_CHUNK: usize = 16;

/// One neighbour candidate; ordered by distance (NaN last), then entity_id.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    distance: Distance,
    entity_id: String,
}

/// A distance as returned (f32), with the total order the results follow: numbers ascending,
/// NaN (a zero vector under Cosine, as in pgvector) after every number, -0 equal to 0.
#[derive(Clone, Copy, Debug)]
struct Distance(f32);

impl Distance {
    fn new(d: f64) -> Self {
        let d = d as f32;
        // One NaN (positive, so total_cmp puts it last) and one zero (-0 + 0 = +0).
        Distance(if d.is_nan() { f32::NAN } else { d + 0.0 })
    }
}

impl PartialEq for Distance {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Distance {}

impl PartialOrd for Distance {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Distance {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.distance
            .cmp(&other.distance)
            .then_with(|| self.entity_id.cmp(&other.entity_id))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The k best entries seen so far: a max-heap whose top is the worst kept.
#[derive(Debug)]
struct TopK {
    k: usize,
    heap: BinaryHeap<Entry>,
}

impl TopK {
    fn new(k: usize) -> Self {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k.min(1024) + 1),
        }
    }

    /// The worst distance kept, once k are kept: a row must come within it to enter.
    fn threshold(&self) -> Option<f32> {
        (self.heap.len() >= self.k).then(|| self.heap.peek().map_or(f32::NAN, |e| e.distance.0))
    }

    fn offer(&mut self, distance: Distance, entity_id: &str) {
        if self.heap.len() < self.k {
            self.heap.push(Entry {
                distance,
                entity_id: entity_id.to_owned(),
            });
            return;
        }
        let better = self.heap.peek().is_some_and(|worst| {
            distance
                .cmp(&worst.distance)
                .then_with(|| entity_id.cmp(&worst.entity_id))
                == Ordering::Less
        });
        if better {
            self.heap.pop();
            self.heap.push(Entry {
                distance,
                entity_id: entity_id.to_owned(),
            });
        }
    }

    fn into_sorted(self) -> Vec<Neighbor> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|e| Neighbor {
                entity_id: e.entity_id,
                distance: e.distance.0,
            })
            .collect()
    }
}

/// One query being answered.
#[derive(Debug)]
struct QueryState {
    norm_sq: f64,
    norm: f64,
    best: TopK,
}

/// A block of rows: ids back to back in one string, values row-major.
#[derive(Debug)]
struct Block {
    ids: String,
    id_ends: Vec<usize>,
    values: Vec<f32>,
    rows: usize,
    capacity: usize,
}

impl Block {
    fn new(capacity: usize, dim: usize) -> Self {
        Block {
            ids: String::new(),
            id_ends: Vec::with_capacity(capacity),
            values: Vec::with_capacity(capacity * dim),
            rows: 0,
            capacity,
        }
    }

    fn push(&mut self, id: &str, vector: &[f32]) {
        self.ids.push_str(id);
        self.id_ends.push(self.ids.len());
        self.values.extend_from_slice(vector);
        self.rows += 1;
    }

    fn id(&self, row: usize) -> &str {
        let start = if row == 0 { 0 } else { self.id_ends[row - 1] };
        &self.ids[start..self.id_ends[row]]
    }

    fn is_full(&self) -> bool {
        self.rows >= self.capacity
    }

    fn clear(&mut self) {
        self.ids.clear();
        self.id_ends.clear();
        self.values.clear();
        self.rows = 0;
    }
}

/// Scores blocks of a type's rows against a set of queries of one dimension.
#[derive(Debug)]
pub(crate) struct Scorer {
    metric: Metric,
    dim: usize,
    /// The queries, row-major, `dim` values each.
    queries: Vec<f32>,
    states: Vec<QueryState>,
    /// The f32 rounding bound factor for a dot product of `dim` terms.
    gamma: f64,
}

impl Scorer {
    /// A scorer for `queries`, every one `dim` values long (checked by the caller).
    pub(crate) fn new(metric: Metric, k: usize, dim: usize, queries: &[&[f32]]) -> Self {
        let states = queries
            .iter()
            .map(|q| {
                let norm_sq = q.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>();
                QueryState {
                    norm_sq,
                    norm: norm_sq.sqrt(),
                    best: TopK::new(k),
                }
            })
            .collect();
        Scorer {
            metric,
            dim,
            queries: queries.iter().flat_map(|q| q.iter().copied()).collect(),
            states,
            gamma: (dim as f64 + 8.0) * f64::from(f32::EPSILON),
        }
    }

    /// Each query's neighbours, closest first, in the order the queries were given.
    pub(crate) fn finish(self) -> Vec<Vec<Neighbor>> {
        self.states
            .into_iter()
            .map(|s| s.best.into_sorted())
            .collect()
    }

    /// Scores rows already in memory (a candidate set's vectors), in blocks.
    pub(crate) fn score_rows<'r>(&mut self, rows: impl IntoIterator<Item = (&'r str, &'r [f32])>) {
        let capacity = (BLOCK_BYTES / (4 * self.dim)).clamp(64, 16_384);
        let mut block = Block::new(capacity, self.dim);
        for (id, vector) in rows {
            block.push(id, vector);
            if block.is_full() {
                self.score_block(&block);
                block.clear();
            }
        }
        self.score_block(&block);
    }

    /// Reads a binary COPY stream of (entity_id, vector) rows stored as `storage` and scores
    /// every row that passes `filter`: this thread parses blocks while a scoring thread has
    /// the rayon pool score the previous one. Returns the rows read.
    pub(crate) fn score_stream(
        &mut self,
        reader: &mut dyn Read,
        storage: Storage,
        filter: Option<&RowFilter<'_>>,
    ) -> Result<u64> {
        let dim = self.dim;
        let capacity = (BLOCK_BYTES / (4 * dim)).clamp(64, 16_384);
        let (full_tx, full_rx) = crossbeam_channel::bounded::<Block>(1);
        let (empty_tx, empty_rx) = crossbeam_channel::bounded::<Block>(3);
        for _ in 0..3 {
            let _ = empty_tx.send(Block::new(capacity, dim));
        }
        std::thread::scope(|scope| -> Result<u64> {
            let worker = std::thread::Builder::new()
                .name("pg-model-repo-score".into())
                .spawn_scoped(scope, || {
                    // Ends when the reader hangs up, after the blocks it sent.
                    for mut block in full_rx {
                        self.score_block(&block);
                        block.clear();
                        // The reader may be done already: then the block is not needed.
                        let _ = empty_tx.send(block);
                    }
                })?;
            let read = read_blocks(reader, storage, dim, filter, &full_tx, &empty_rx);
            // Hang up, so the worker ends after the last block.
            drop(full_tx);
            drop(empty_rx);
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
            read
        })
    }

    /// Scores one block against every query, the queries split across the rayon pool.
    fn score_block(&mut self, block: &Block) {
        if block.rows == 0 {
            return;
        }
        let dim = self.dim;
        let norms: Vec<(f64, f64)> = block
            .values
            .chunks_exact(dim)
            .map(|x| {
                let sq = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>();
                (sq, sq.sqrt())
            })
            .collect();
        let (metric, gamma) = (self.metric, self.gamma);
        let queries = &self.queries;
        let states = &mut self.states;
        on_cpu_pool(|| {
            states
                .par_chunks_mut(QUERY_CHUNK)
                .zip(queries.par_chunks(QUERY_CHUNK * dim))
                .for_each(|(states, queries)| {
                    let mut dots = Vec::new();
                    dot_products(queries, &block.values, dim, &mut dots);
                    for (i, state) in states.iter_mut().enumerate() {
                        let q = &queries[i * dim..(i + 1) * dim];
                        let row_dots = &dots[i * block.rows..(i + 1) * block.rows];
                        score_rows(metric, gamma, q, state, row_dots, &norms, block);
                    }
                });
        });
    }
}

/// Parses rows into blocks and hands each full block to the scoring thread.
fn read_blocks(
    reader: &mut dyn Read,
    storage: Storage,
    dim: usize,
    filter: Option<&RowFilter<'_>>,
    full: &crossbeam_channel::Sender<Block>,
    empty: &crossbeam_channel::Receiver<Block>,
) -> Result<u64> {
    let scoring_stopped = || RepoError::Io(std::io::Error::other("the scoring thread stopped"));
    let mut rows = RowReader::new(reader, 2)?;
    let mut vector = Vec::with_capacity(dim);
    let mut block = empty.recv().map_err(|_| scoring_stopped())?;
    let mut count = 0u64;
    while let Some(fields) = rows.next_row()? {
        let id = std::str::from_utf8(&fields[0])
            .map_err(|e| RepoError::corrupt(format!("entity_id is not UTF-8: {e}")))?;
        count += 1;
        if filter.is_some_and(|f| !f.passes(id)) {
            continue;
        }
        storage.decode_into(&fields[1], &mut vector)?;
        if vector.len() != dim {
            return Err(RepoError::corrupt(format!(
                "entity {id:?} has {} values; its type's dimension is {dim}",
                vector.len()
            )));
        }
        block.push(id, &vector);
        if block.is_full() {
            full.send(block).map_err(|_| scoring_stopped())?;
            block = empty.recv().map_err(|_| scoring_stopped())?;
        }
    }
    if block.rows > 0 {
        full.send(block).map_err(|_| scoring_stopped())?;
    }
    Ok(count)
}

/// Screens one query's f32 scores of a block and scores in f64 the rows that may enter its
/// top-k (see the module docs for the bound).
fn score_rows(
    metric: Metric,
    gamma: f64,
    q: &[f32],
    state: &mut QueryState,
    row_dots: &[f32],
    norms: &[(f64, f64)],
    block: &Block,
) {
    let dim = q.len();
    for (row, (&dot, &(x_sq, x_norm))) in row_dots.iter().zip(norms).enumerate() {
        // An f32 dot product that overflowed (large but finite values) bounds nothing: the
        // row is scored exactly. A finite one had no overflow anywhere in its sum (an
        // infinity never comes back finite), so the rounding bound holds.
        let screened = dot.is_finite().then(|| state.best.threshold()).flatten();
        if let Some(threshold) = screened {
            let threshold = f64::from(threshold);
            let bound = gamma * state.norm * x_norm + 1e-30;
            let dot = f64::from(dot);
            let lower = match metric {
                Metric::InnerProduct => -(dot + bound),
                Metric::Cosine => {
                    let denominator = state.norm * x_norm;
                    1.0 - ((dot + bound) / denominator).min(1.0)
                }
                Metric::L2 => {
                    let sq = state.norm_sq + x_sq;
                    (sq - 2.0 * (dot + bound) - 1e-12 * sq).max(0.0).sqrt()
                }
            };
            // A row may tie with the worst kept once rounded to f32 (and win on its id): let
            // it through when it comes within a few f32 ulps of the threshold.
            let slack = threshold.abs() * 4.0 * f64::from(f32::EPSILON) + 1e-38;
            // NaN anywhere (a zero vector under Cosine, an overflowing f32 score) falls
            // through to the exact score.
            if lower > threshold + slack {
                continue;
            }
        }
        let x = &block.values[row * dim..(row + 1) * dim];
        let distance = exact_distance(metric, q, state.norm_sq, x, x_sq);
        state.best.offer(Distance::new(distance), block.id(row));
    }
}

/// pgvector's distance of `q` and `x`, in f64 (f32 products are exact in f64).
pub(crate) fn exact_distance(metric: Metric, q: &[f32], q_sq: f64, x: &[f32], x_sq: f64) -> f64 {
    match metric {
        Metric::L2 => q
            .iter()
            .zip(x)
            .map(|(a, b)| {
                let d = f64::from(*a) - f64::from(*b);
                d * d
            })
            .sum::<f64>()
            .sqrt(),
        Metric::InnerProduct => -dot64(q, x),
        Metric::Cosine => {
            // As pgvector: similarity over sqrt(|q|^2 |x|^2), kept within [-1, 1]; a zero
            // vector gives NaN.
            let similarity = dot64(q, x) / (q_sq * x_sq).sqrt();
            if similarity.is_nan() {
                f64::NAN
            } else {
                1.0 - similarity.clamp(-1.0, 1.0)
            }
        }
    }
}

fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

/// `out` (m x n, row-major) = the f32 dot products of the m queries (row-major, `dim` each)
/// with the n rows (row-major, `dim` each).
fn dot_products(queries: &[f32], rows: &[f32], dim: usize, out: &mut Vec<f32>) {
    let (m, n) = (queries.len() / dim, rows.len() / dim);
    out.clear();
    out.resize(m * n, 0.0);
    if m == 0 || n == 0 || queries.len() != m * dim || rows.len() != n * dim {
        return;
    }
    // SAFETY: A is `queries` as an m x dim row-major matrix (row stride dim, column stride 1),
    // B is `rows` read as a dim x n matrix (B[p][j] = rows[j * dim + p]: row stride 1, column
    // stride dim), C is `out`, m x n row-major; the lengths were checked above, so every
    // element sgemm reads or writes lies inside its slice, and `out` is not aliased.
    unsafe {
        matrixmultiply::sgemm(
            m,
            dim,
            n,
            1.0,
            queries.as_ptr(),
            dim as isize,
            1,
            rows.as_ptr(),
            1,
            dim as isize,
            0.0,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores `rows` (id, vector) as one stream would, in blocks of `capacity`.
    fn search(
        metric: Metric,
        k: usize,
        queries: &[&[f32]],
        rows: &[(&str, Vec<f32>)],
    ) -> Vec<Vec<Neighbor>> {
        let dim = queries[0].len();
        let mut scorer = Scorer::new(metric, k, dim, queries);
        for chunk in rows.chunks(3) {
            let mut block = Block::new(3, dim);
            for (id, v) in chunk {
                block.push(id, v);
            }
            scorer.score_block(&block);
        }
        scorer.finish()
    }

    fn brute(metric: Metric, k: usize, q: &[f32], rows: &[(&str, Vec<f32>)]) -> Vec<(String, f32)> {
        let q_sq = q.iter().map(|v| f64::from(*v).powi(2)).sum();
        let mut all: Vec<(Distance, String)> = rows
            .iter()
            .map(|(id, x)| {
                let x_sq = x.iter().map(|v| f64::from(*v).powi(2)).sum();
                (
                    Distance::new(exact_distance(metric, q, q_sq, x, x_sq)),
                    id.to_string(),
                )
            })
            .collect();
        all.sort();
        all.into_iter().take(k).map(|(d, id)| (id, d.0)).collect()
    }

    #[test]
    fn screening_never_changes_the_exact_answer() {
        let mut rng = fastrand::Rng::with_seed(7);
        let ids: Vec<String> = (0..500).map(|i| format!("r{i:04}")).collect();
        for dim in [1, 3, 17, 64] {
            let rows: Vec<(&str, Vec<f32>)> = ids
                .iter()
                .map(|id| {
                    // Few distinct values: many exact ties.
                    let v = (0..dim)
                        .map(|_| (rng.u8(0..4) as f32) * 0.5 - 0.75)
                        .collect();
                    (id.as_str(), v)
                })
                .collect();
            let queries: Vec<Vec<f32>> = (0..40)
                .map(|_| (0..dim).map(|_| rng.f32() * 2.0 - 0.9).collect())
                .collect();
            let refs: Vec<&[f32]> = queries.iter().map(|q| q.as_slice()).collect();
            for metric in [Metric::L2, Metric::Cosine, Metric::InnerProduct] {
                for k in [1, 5, 30] {
                    let got = search(metric, k, &refs, &rows);
                    for (q, answer) in refs.iter().zip(got) {
                        let answer: Vec<(String, f32)> = answer
                            .into_iter()
                            .map(|n| (n.entity_id, n.distance))
                            .collect();
                        let expected = brute(metric, k, q, &rows);
                        assert_eq!(answer.len(), expected.len());
                        for (a, e) in answer.iter().zip(&expected) {
                            assert_eq!(a.0, e.0, "{metric:?} k={k} dim={dim}");
                            assert!(a.1 == e.1 || (a.1.is_nan() && e.1.is_nan()));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn zero_rows_come_last_under_cosine() {
        let rows = vec![
            ("a", vec![0.0, 0.0]),
            ("b", vec![1.0, 0.0]),
            ("c", vec![-1.0, 0.0]),
        ];
        let got = search(Metric::Cosine, 3, &[&[1.0, 1.0]], &rows);
        let ids: Vec<&str> = got[0].iter().map(|n| n.entity_id.as_str()).collect();
        assert_eq!(ids, ["b", "c", "a"]);
        assert!(got[0][2].distance.is_nan());
    }
}
