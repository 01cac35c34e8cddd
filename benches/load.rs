//! `cargo bench`: the load benchmark of `examples/load_bench.rs` at a small size (20,000
//! vectors of dimension 384), so that it stays quick wherever it runs.

#[allow(dead_code)]
#[path = "../examples/load_bench.rs"]
mod load_bench;

fn main() {
    let _ = env_logger::try_init();
    let args = load_bench::Args {
        rows: 20_000,
        progress: false,
        ..load_bench::Args::default()
    };
    if let Err(e) = load_bench::main_with(args) {
        eprintln!("load bench: {e}");
        std::process::exit(1);
    }
}
