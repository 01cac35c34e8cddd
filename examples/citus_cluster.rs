//! Starts a throwaway Citus cluster (a coordinator and `--workers N` workers, default 2) from
//! the local binaries, prints the coordinator's URL, and keeps it running until stdin closes
//! or a line is entered; then stops and deletes every node.
//!
//! ```text
//! cargo run --example citus_cluster -- [--workers 2]
//! ```

use std::io::BufRead;

use pg_model_repo::throwaway::ThrowawayCluster;

fn main() -> pg_model_repo::Result<()> {
    env_logger::init();
    let mut workers = 2;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--workers" => {
                workers = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--workers needs a number")
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let cluster = ThrowawayCluster::start(workers)?;
    println!("{}", cluster.url());
    for (i, worker) in cluster.workers().iter().enumerate() {
        println!("worker {i}: {}", worker.url());
    }
    let _ = std::io::stdin().lock().lines().next();
    Ok(())
}
