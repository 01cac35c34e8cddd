//! Change event latency: writer threads save small models continuously while one subscription
//! receives their `Saved` events; how long from a writer's commit to the subscriber's `recv`.
//!
//! Two measures, both in one process on one machine:
//! - *commit reply -> recv*: from the moment the writer's `save_model` returned (its COMMIT
//!   answered) to the moment the subscriber's `recv` returned the event (0 when the event came
//!   first: the server sends the notification and the commit reply together);
//! - *notify -> recv*: from the event's `committed_at` (the database clock at the library's
//!   NOTIFY, the transaction's last statement before COMMIT) to `recv`, by the same clock:
//!   an upper bound that includes the COMMIT itself.
//!
//! On `DATABASE_URL`, or a throwaway server of its own. The last line, for scripts:
//!
//!     event_bench: writers=N events=N saves_per_s=N p50_ms=X p99_ms=X max_ms=X (commit reply -> recv)
//!
//!     cargo run --release --example event_bench -- [--seconds 20] [--writers 4]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use pg_model_repo::throwaway::database_url_or_start;
use pg_model_repo::{ModelEventKind, ModelRepository, RepositoryConfig};
use serde_json::json;

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where each save's two instants meet: whichever of the writer and the subscriber comes
/// second records the latency.
struct Meeting {
    /// (model, version) -> when the writer's call returned, or when the subscriber received.
    waiting: HashMap<(String, String), (bool, Instant)>,
    reply_to_recv: Histogram<u64>,
}

impl Meeting {
    fn new() -> Self {
        Meeting {
            waiting: HashMap::new(),
            reply_to_recv: Histogram::new(3).expect("a histogram"),
        }
    }

    /// `from_writer`: the writer's call returned at `at`; else the subscriber received at `at`.
    fn arrive(&mut self, key: (String, String), from_writer: bool, at: Instant) {
        match self.waiting.remove(&key) {
            Some((other_is_writer, other_at)) if other_is_writer != from_writer => {
                let (reply, recv) = if from_writer {
                    (at, other_at)
                } else {
                    (other_at, at)
                };
                let us = recv.saturating_duration_since(reply).as_micros() as u64;
                let _ = self.reply_to_recv.record(us.max(1));
            }
            _ => {
                self.waiting.insert(key, (from_writer, at));
            }
        }
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn main() -> pg_model_repo::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args: Vec<String> = std::env::args().collect();
    let seconds = arg(&args, "--seconds", 20);
    let writers = arg(&args, "--writers", 4) as usize;
    let (url, _server) = database_url_or_start(&[("max_connections", "100")])?;
    let schema = format!("event_bench_{}", std::process::id());
    let repo = ModelRepository::open(
        RepositoryConfig::new(url.clone())
            .schema(&schema)
            .pool_size(writers as u32 + 1)
            .reaper_interval(None),
    )?;
    let events = repo.subscribe_model_events()?;
    let meeting = Arc::new(Mutex::new(Meeting::new()));
    let notify_to_recv = Mutex::new(Histogram::<u64>::new(3).expect("a histogram"));
    let stop = AtomicBool::new(false);
    let saves = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let payload = vec![7u8; 1024];
    println!("event_bench: {writers} writers saving 1 KiB models for {seconds} s, one subscriber");
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            // Until the writers are done and every event of theirs has come.
            loop {
                let Some(event) = events.recv_timeout(Duration::from_millis(200)) else {
                    if stop.load(Ordering::Acquire)
                        && received.load(Ordering::Acquire) >= saves.load(Ordering::Acquire)
                    {
                        return;
                    }
                    if stop.load(Ordering::Acquire)
                        && started.elapsed() > Duration::from_secs(seconds + 10)
                    {
                        eprintln!("event_bench: events missing at the end");
                        return;
                    }
                    continue;
                };
                let now = Instant::now();
                let wall = SystemTime::now();
                if event.kind != ModelEventKind::Saved {
                    eprintln!("event_bench: unexpected {event:?}");
                    continue;
                }
                if let Some(at) = event.committed_at {
                    let us = wall.duration_since(at).unwrap_or_default().as_micros() as u64;
                    let _ = notify_to_recv.lock().unwrap().record(us.max(1));
                }
                let key = (event.model_name, event.version.unwrap_or_default());
                meeting.lock().unwrap().arrive(key, false, now);
                received.fetch_add(1, Ordering::AcqRel);
            }
        });
        for w in 0..writers {
            let (repo, meeting, stop, saves, payload) = (&repo, &meeting, &stop, &saves, &payload);
            s.spawn(move || {
                let model = format!("bench-w{w}");
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let version = n.to_string();
                    match repo.save_model(&model, &version, payload, &json!({})) {
                        Ok(_) => {
                            let now = Instant::now();
                            saves.fetch_add(1, Ordering::AcqRel);
                            meeting
                                .lock()
                                .unwrap()
                                .arrive((model.clone(), version), true, now);
                        }
                        Err(e) => eprintln!("event_bench: save failed: {e}"),
                    }
                    n += 1;
                }
            });
        }
        std::thread::sleep(Duration::from_secs(seconds));
        stop.store(true, Ordering::Release);
    });
    let elapsed = started.elapsed();
    let meeting = meeting.lock().unwrap();
    let h = &meeting.reply_to_recv;
    let n2r = notify_to_recv.lock().unwrap();
    let saves = saves.load(Ordering::Acquire);
    println!(
        "event_bench: notify -> recv (database clock): p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, \
         max {:.2} ms over {} events",
        ms(n2r.value_at_quantile(0.5)),
        ms(n2r.value_at_quantile(0.95)),
        ms(n2r.value_at_quantile(0.99)),
        ms(n2r.max()),
        n2r.len()
    );
    println!(
        "event_bench: writers={writers} events={} saves_per_s={:.0} p50_ms={:.2} p95_ms={:.2} \
         p99_ms={:.2} max_ms={:.2} unmatched={} (commit reply -> recv)",
        h.len(),
        saves as f64 / elapsed.as_secs_f64().min(seconds as f64).max(1.0),
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.95)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
        meeting.waiting.len()
    );
    drop(events);
    repo.close();
    let mut admin = postgres::Client::connect(&url, postgres::NoTls)
        .map_err(pg_model_repo::RepoError::Database)?;
    let _ = admin.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"));
    Ok(())
}
