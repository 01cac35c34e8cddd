//! Change events under faults, on a throwaway server of the example's own: writer threads save
//! models (and move an alias now and then) continuously while a chaos thread kills every
//! backend of the repository (the subscription's listening session included) every few
//! seconds and restarts the server twice (a fast shutdown, then an immediate one), up to 5 s
//! before the end; one subscription records every event.
//!
//! What committed is read from the tables at the end (writers never delete, so a version that
//! is there committed; the alias history lists every move that committed). Each writer's
//! changes are sequential, so their commit order is the writer's order. The checks:
//! - between two `Resync`s, each writer's events are consecutive changes of its own, in
//!   commit order: nothing committed between two events that were seen is missing;
//! - no change is seen twice, and no event is a repeat (`resave`);
//! - after the last `Resync`, every change from the first one seen to the end is seen;
//! - no rolled-back change is ever seen: every tenth save goes to a model whose row a deferred
//!   constraint trigger refuses at COMMIT, after the event was sent inside the transaction.
//!
//! The last line, for scripts (exit status 1 if a check failed):
//!
//!     event_resilience: seconds=N committed=N seen=N missed_in_gaps=N resyncs=N kills=N
//!         restarts=N duplicates=N out_of_order=N gaps=N tail_missing=N rolled_back_seen=N
//!
//!     cargo run --release --example event_resilience -- [--seconds 60] [--writers 4]
//!         [--kill-every-ms 4000]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pg_model_repo::throwaway::{StopMode, ThrowawayServer};
use pg_model_repo::{ModelEvent, ModelEventKind, ModelRepository, RepositoryConfig};
use serde_json::json;

const APP: &str = "event-resilience";

/// The last seconds of the run, without faults.
const QUIET_TAIL: u64 = 5;

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One change as the checks name it: (model, kind, version).
type Change = (String, ModelEventKind, String);

fn with_app(url: &str) -> String {
    format!("{url} application_name={APP}")
}

fn kill_backends(url: &str) -> u64 {
    let Ok(mut admin) = postgres::Client::connect(url, postgres::NoTls) else {
        return 0;
    };
    admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1",
            &[&APP],
        )
        .map(|r| r.get::<_, i64>(0) as u64)
        .unwrap_or(0)
}

fn main() -> pg_model_repo::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).init();
    let args: Vec<String> = std::env::args().collect();
    let seconds = arg(&args, "--seconds", 60);
    let writers = arg(&args, "--writers", 4) as usize;
    let kill_every = Duration::from_millis(arg(&args, "--kill-every-ms", 4000));
    let server = Mutex::new(ThrowawayServer::start(&[("max_connections", "100")])?);
    let url = server.lock().unwrap().url();
    let schema = "resilience";
    let repo = ModelRepository::open(
        RepositoryConfig::new(with_app(&url))
            .schema(schema)
            .pool_size(writers as u32 + 1)
            .pool_timeout(Duration::from_secs(10))
            .reaper_interval(None),
    )?;
    let mut admin = postgres::Client::connect(&url, postgres::NoTls)
        .map_err(pg_model_repo::RepoError::Database)?;
    admin
        .batch_execute(&format!(
            "SET search_path TO {schema};
             CREATE FUNCTION doom() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'rolled back at commit'; END $$;
             CREATE CONSTRAINT TRIGGER doom AFTER INSERT OR UPDATE ON ml_models
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                 WHEN (NEW.model_name LIKE 'doomed%') EXECUTE FUNCTION doom();"
        ))
        .map_err(pg_model_repo::RepoError::Database)?;
    drop(admin);

    let events = repo.subscribe_model_events()?;
    let seen: Mutex<Vec<ModelEvent>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let writers_done = AtomicBool::new(false);
    let (kills, restarts, errors, doomed_tries) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    println!(
        "event_resilience: {seconds} s, {writers} writers, every backend killed each {kill_every:?}, \
         the server restarted twice"
    );
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            // Until the writers stopped and two quiet seconds passed.
            let mut quiet_since = None;
            loop {
                match events.recv_timeout(Duration::from_millis(200)) {
                    Some(event) => {
                        quiet_since = None;
                        if event.kind == ModelEventKind::Resync {
                            log::info!("Resync at {:?}", started.elapsed());
                        }
                        seen.lock().unwrap().push(event);
                    }
                    None if writers_done.load(Ordering::Acquire) => {
                        let since = *quiet_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_secs(2) {
                            return;
                        }
                    }
                    None => {}
                }
            }
        });
        for w in 0..writers {
            let (repo, stop, errors, doomed_tries) = (&repo, &stop, &errors, &doomed_tries);
            s.spawn(move || {
                let model = format!("w{w}");
                let mut n = 0u64;
                let mut slowest = (Duration::ZERO, 0u64);
                while !stop.load(Ordering::Acquire) {
                    let version = n.to_string();
                    let call = Instant::now();
                    let saved = repo.save_model(&model, &version, version.as_bytes(), &json!({}));
                    if call.elapsed() > slowest.0 {
                        slowest = (call.elapsed(), n);
                    }
                    if saved.is_ok() && n.is_multiple_of(5) {
                        if let Err(e) = repo.set_model_alias(&model, "champion", &version) {
                            log::warn!("alias: {e}");
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if let Err(e) = saved {
                        log::warn!("save: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if n % 10 == 3 {
                        doomed_tries.fetch_add(1, Ordering::Relaxed);
                        let doomed =
                            repo.save_model(&format!("doomed{w}"), &version, b"x", &json!({}));
                        assert!(doomed.is_err(), "a doomed save committed");
                    }
                    n += 1;
                }
                println!(
                    "event_resilience: writer {model}: {n} saves tried, the slowest took {:?} \
                     (save {})",
                    slowest.0, slowest.1
                );
            });
        }
        s.spawn(|| {
            let restart_at = [seconds / 3, 2 * seconds / 3].map(Duration::from_secs);
            let mut next_kill = started + kill_every;
            let mut restarted = 0;
            // The last seconds run without faults: the check of the last segment needs
            // changes committed after the last reconnect.
            let faults_until = Duration::from_secs(seconds.saturating_sub(QUIET_TAIL));
            while started.elapsed() < Duration::from_secs(seconds) {
                std::thread::sleep(Duration::from_millis(50));
                if started.elapsed() >= faults_until {
                    continue;
                }
                if restarted < 2 && started.elapsed() >= restart_at[restarted] {
                    let mode = if restarted == 0 {
                        StopMode::Fast
                    } else {
                        StopMode::Immediate
                    };
                    let done = server.lock().unwrap().restart(mode);
                    println!(
                        "event_resilience: server restarted ({mode:?}) at {:?}: {done:?}",
                        started.elapsed()
                    );
                    restarts.fetch_add(1, Ordering::Relaxed);
                    restarted += 1;
                }
                if Instant::now() >= next_kill {
                    kills.fetch_add(kill_backends(&url), Ordering::Relaxed);
                    next_kill += kill_every;
                }
            }
            stop.store(true, Ordering::Release);
        });
        // The writers end after the chaos thread stops them; then the subscriber drains.
        while !stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
        writers_done.store(true, Ordering::Release);
    });

    // What committed, per writer, in commit order.
    let mut admin = postgres::Client::connect(&url, postgres::NoTls)
        .map_err(pg_model_repo::RepoError::Database)?;
    admin
        .batch_execute(&format!("SET search_path TO {schema}"))
        .map_err(pg_model_repo::RepoError::Database)?;
    let mut committed: BTreeMap<String, Vec<Change>> = BTreeMap::new();
    let versions = admin
        .query(
            "SELECT model_name::text, version::text FROM ml_models ORDER BY model_name, version::int8",
            &[],
        )
        .map_err(pg_model_repo::RepoError::Database)?;
    let moves = admin
        .query(
            "SELECT model_name::text, version::text FROM model_alias_history ORDER BY event_seq",
            &[],
        )
        .map_err(pg_model_repo::RepoError::Database)?;
    let mut moved: HashMap<(String, String), usize> = HashMap::new();
    for row in &moves {
        *moved.entry((row.get(0), row.get(1))).or_default() += 1;
    }
    for row in &versions {
        let (model, version): (String, String) = (row.get(0), row.get(1));
        let changes = committed.entry(model.clone()).or_default();
        changes.push((model.clone(), ModelEventKind::Saved, version.clone()));
        for _ in 0..moved
            .get(&(model.clone(), version.clone()))
            .copied()
            .unwrap_or(0)
        {
            changes.push((model.clone(), ModelEventKind::AliasSet, version.clone()));
        }
    }
    let position: HashMap<Change, usize> = committed
        .values()
        .flat_map(|changes| changes.iter().enumerate().map(|(i, c)| (c.clone(), i)))
        .collect();

    // The checks, segment by segment (a Resync starts a new one).
    let seen = seen.into_inner().unwrap();
    let (mut duplicates, mut out_of_order, mut gaps, mut rolled_back, mut repeats) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut resyncs = 0u64;
    let mut seen_once: HashMap<Change, usize> = HashMap::new();
    // Per writer: the position of its last event in the current segment, and in any.
    let mut last_in_segment: HashMap<String, usize> = HashMap::new();
    let mut last_ever: HashMap<String, usize> = HashMap::new();
    let mut per_segment: BTreeMap<String, usize> = BTreeMap::new();
    for event in &seen {
        if event.kind == ModelEventKind::Resync {
            log::info!("segment {resyncs}: {per_segment:?}");
            per_segment.clear();
            resyncs += 1;
            last_in_segment.clear();
            continue;
        }
        if event.resave {
            repeats += 1;
        }
        let change = (
            event.model_name.clone(),
            event.kind,
            event.version.clone().unwrap_or_default(),
        );
        let Some(&at) = position.get(&change) else {
            // Not committed: a rolled-back change (or an event of a kind nobody made).
            rolled_back += 1;
            eprintln!("event_resilience: seen but never committed: {event:?}");
            continue;
        };
        let count = seen_once.entry(change.clone()).or_default();
        *count += 1;
        if *count > 1 {
            duplicates += 1;
            eprintln!("event_resilience: seen twice: {event:?}");
        }
        let model = event.model_name.clone();
        *per_segment.entry(model.clone()).or_default() += 1;
        if let Some(&before) = last_ever.get(&model) {
            if at <= before {
                out_of_order += 1;
                eprintln!("event_resilience: out of commit order: {event:?}");
            }
        }
        if let Some(&before) = last_in_segment.get(&model) {
            if at > before + 1 {
                gaps += (at - before - 1) as u64;
                eprintln!(
                    "event_resilience: {} changes of {model} missing before {event:?}",
                    at - before - 1
                );
            }
        }
        last_in_segment.insert(model.clone(), at);
        last_ever.insert(model, at);
    }
    log::info!("last segment: {per_segment:?}");
    // After the last Resync (well before the end: the writers go on for a few seconds after
    // the last fault) nothing may be missing up to the end.
    let mut tail_missing = 0u64;
    for (model, changes) in &committed {
        let last = last_in_segment.get(model).copied();
        let seen_up_to = last.map_or(0, |at| at + 1);
        if last.is_none() {
            eprintln!("event_resilience: no event of {model} after the last Resync");
        }
        tail_missing += (changes.len() - seen_up_to) as u64;
    }
    let committed_total: usize = committed.values().map(Vec::len).sum();
    let seen_total = seen_once.len();
    let missed = committed_total.saturating_sub(seen_total);
    println!(
        "event_resilience: {} save and alias errors returned to writers (retried or given up), \
         {} doomed saves refused at commit",
        errors.load(Ordering::Relaxed),
        doomed_tries.load(Ordering::Relaxed)
    );
    let failed = duplicates + out_of_order + gaps + tail_missing + rolled_back + repeats > 0;
    println!(
        "event_resilience: seconds={seconds} committed={committed_total} seen={seen_total} \
         missed_in_gaps={missed} resyncs={resyncs} kills={} restarts={} duplicates={duplicates} \
         out_of_order={out_of_order} gaps={gaps} tail_missing={tail_missing} \
         rolled_back_seen={rolled_back} resaves_seen={repeats}",
        kills.load(Ordering::Relaxed),
        restarts.load(Ordering::Relaxed),
    );
    drop(events);
    repo.close();
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
