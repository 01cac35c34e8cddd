//! A proxy forwards a commit, lets the server commit, loses the reply and closes both sides:
//! every write that answers with a count or a bool still answers right, counters count once,
//! and when the server cannot be asked, the error says the outcome is unknown.

use std::collections::BTreeMap;
use std::time::Duration;

use pg_model_repo::throwaway::{LostReplyProxy, ThrowawayServer};
use pg_model_repo::{Embedding, ModelRepository, RepoError, RepositoryConfig};
use serde_json::json;

struct Setup {
    server: ThrowawayServer,
    proxy: LostReplyProxy,
    repo: ModelRepository,
}

impl Setup {
    fn new(adjust: impl FnOnce(RepositoryConfig) -> RepositoryConfig) -> Self {
        let server = ThrowawayServer::start(&[("max_connections", "100")]).expect("server");
        let proxy = LostReplyProxy::start(server.port()).expect("proxy");
        let config = RepositoryConfig::new(proxy.url())
            .schema("lost")
            .pool_size(2)
            .max_overflow(2)
            .pool_timeout(Duration::from_secs(5))
            .reaper_interval(None);
        let repo = ModelRepository::open(adjust(config)).expect("open");
        Setup {
            server,
            proxy,
            repo,
        }
    }

    /// A direct connection (not through the proxy) in the test's schema.
    fn admin(&self) -> postgres::Client {
        let mut c = postgres::Client::connect(&self.server.url(), postgres::NoTls).unwrap();
        c.batch_execute("SET search_path TO lost").unwrap();
        c
    }

    fn count(&self, sql: &str) -> i64 {
        self.admin().query_one(sql, &[]).unwrap().get(0)
    }

    /// Runs `f` with the next commit reply lost, and checks that one was.
    fn losing_one<T>(&self, f: impl FnOnce() -> T) -> T {
        let before = self.proxy.lost();
        self.proxy.lose_next_commit_replies(1);
        let out = f();
        assert_eq!(self.proxy.lost(), before + 1, "a commit reply was lost");
        out
    }
}

#[test]
fn every_count_and_bool_is_right_after_a_lost_commit_reply() {
    let t = Setup::new(|c| c);
    let repo = &t.repo;
    let meta = json!({});

    repo.save_model("m", "1", b"x", &meta).unwrap();
    assert!(t.losing_one(|| repo.delete_model("m", "1")).unwrap());
    assert_eq!(t.count("SELECT count(*) FROM ml_models WHERE is_active"), 0);

    for v in ["1", "2", "3"] {
        repo.save_model("n", v, v.as_bytes(), &meta).unwrap();
    }
    assert_eq!(t.losing_one(|| repo.cleanup_old_models("n", 1)).unwrap(), 2);
    assert_eq!(
        t.count("SELECT count(*) FROM ml_models WHERE model_name = 'n'"),
        1
    );

    repo.save_model("a", "1", b"x", &meta).unwrap();
    repo.set_model_alias("a", "champion", "1").unwrap();
    assert!(t
        .losing_one(|| repo.delete_model_alias("a", "champion"))
        .unwrap());
    assert!(repo.get_model_aliases("a").unwrap().is_empty());

    for i in 0..5 {
        repo.cache_predictions(&format!("zzqq{i}"), &i, Duration::from_secs(600))
            .unwrap();
    }
    repo.cache_predictions("other", &1, Duration::from_secs(600))
        .unwrap();
    assert_eq!(t.losing_one(|| repo.clear_cache("zzqq*")).unwrap(), 5);
    assert_eq!(t.count("SELECT count(*) FROM prediction_cache"), 1);

    t.admin()
        .batch_execute(
            "INSERT INTO prediction_cache (cache_key, predictions, cached_at, expires_at)
             SELECT 'old' || g, '\\x00', now() - interval '1 hour', now() - interval '1 minute'
             FROM generate_series(1, 3) g",
        )
        .unwrap();
    assert_eq!(t.losing_one(|| repo.purge_expired_cache()).unwrap(), 3);

    let batch: Vec<Embedding> = (0..4)
        .map(|i| Embedding::new("gone", format!("e{i}"), vec![i as f32; 4]))
        .collect();
    repo.batch_save_embeddings(&batch).unwrap();
    assert_eq!(
        t.losing_one(|| repo.drop_embedding_type("gone")).unwrap(),
        4
    );
    assert!(repo.get_all_embeddings("gone").unwrap().is_empty());

    // Writes that answer with a value or nothing were exactly-once already; they stay so.
    for v in ["1", "2", "3"] {
        repo.save_model("r", v, v.as_bytes(), &meta).unwrap();
        repo.set_model_alias("r", "prod", v).unwrap();
    }
    assert_eq!(
        t.losing_one(|| repo.rollback_model_alias("r", "prod"))
            .unwrap(),
        "2"
    );
    assert_eq!(repo.get_alias_history("r", "prod").unwrap().len(), 4);
    let metrics: BTreeMap<String, f64> = [("auc".to_owned(), 0.9)].into();
    t.losing_one(|| repo.save_training_metrics("r", "1", &metrics))
        .unwrap();
    assert_eq!(repo.get_training_metrics_history("r").unwrap().len(), 1);
}

#[test]
fn counter_flushes_count_once_after_a_lost_commit_reply() {
    let t = Setup::new(|c| c);
    let repo = &t.repo;
    repo.cache_predictions("k", &1u8, Duration::from_secs(600))
        .unwrap();
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    for _ in 0..3 {
        assert_eq!(repo.get_cached_predictions::<u8>("k").unwrap(), Some(1));
    }
    let stats = t.losing_one(|| repo.get_cache_statistics()).unwrap();
    assert_eq!(stats.total_access_count, 3);
    repo.load_model("m", "1").unwrap().unwrap();
    repo.load_model("m", "1").unwrap().unwrap();
    let models = t.losing_one(|| repo.get_model_storage_stats()).unwrap();
    assert_eq!(models.models[0].load_count, 2);
    // Later flushes add nothing of those again.
    assert_eq!(repo.get_cache_statistics().unwrap().total_access_count, 3);
    assert_eq!(
        repo.get_model_storage_stats().unwrap().models[0].load_count,
        2
    );
    assert_eq!(
        t.count("SELECT sum(access_count)::int8 FROM prediction_cache"),
        3
    );
}

#[test]
fn an_outcome_the_server_cannot_be_asked_about_is_outcome_unknown_and_settles_later() {
    // One connection: after the loss, asking the server needs a new one, which is refused.
    let t = Setup::new(|c| {
        c.pool_size(1)
            .max_overflow(0)
            .pool_timeout(Duration::from_secs(2))
    });
    let repo = &t.repo;
    repo.save_model("m", "1", b"x", &json!({})).unwrap();
    repo.cache_predictions("k", &1u8, Duration::from_secs(600))
        .unwrap();

    t.proxy.refuse_after_loss(true);
    let deleted = t.losing_one(|| repo.delete_model("m", "1"));
    match &deleted {
        Err(e @ RepoError::OutcomeUnknown(m)) => {
            assert!(m.message().contains("txid_status"), "{m}");
            assert!(!e.is_transient());
        }
        other => panic!("expected OutcomeUnknown, got {other:?}"),
    }
    // It did commit: the server has it.
    assert_eq!(t.count("SELECT count(*) FROM ml_models WHERE is_active"), 0);
    t.proxy.refuse_after_loss(false);

    for _ in 0..3 {
        assert_eq!(repo.get_cached_predictions::<u8>("k").unwrap(), Some(1));
    }
    t.proxy.refuse_after_loss(true);
    let stats = t.losing_one(|| repo.get_cache_statistics());
    assert!(
        matches!(stats, Err(RepoError::OutcomeUnknown(_))),
        "{stats:?}"
    );
    t.proxy.refuse_after_loss(false);
    // The flush in doubt is settled by the next one: it committed, so it is not added again.
    assert_eq!(repo.get_cache_statistics().unwrap().total_access_count, 3);
    assert_eq!(
        t.count("SELECT sum(access_count)::int8 FROM prediction_cache"),
        3
    );
}

/// A full refresh commits more than once (its load's table, then the swap): whichever commit's
/// reply is lost, the answer agrees with what the server stored. The swap's lost reply is
/// settled by asking the server: the refresh committed, so the call reports its rows.
#[test]
fn a_refresh_answers_what_it_stored_whichever_commit_reply_is_lost() {
    let t = Setup::new(|c| c);
    let repo = &t.repo;
    let rows = |round: usize| -> Vec<Embedding> {
        (0..3000)
            .map(|i| Embedding::new("feed", format!("e{i}"), vec![round as f32; 4]))
            .collect()
    };
    repo.replace_embeddings("feed", &rows(0)).unwrap();
    let stored_round = || -> f32 { repo.get_embeddings("feed", "e0").unwrap().unwrap()[0] };
    let mut swap_reply_lost = false;
    for skip in 0..8u64 {
        let round = skip as usize + 1;
        let before = t.proxy.lost();
        t.proxy.lose_commit_reply_after(skip);
        let result = repo.replace_embeddings_iter("feed", &mut rows(round).into_iter());
        if t.proxy.lost() == before {
            // The refresh committed fewer times than `skip`: every commit was tried.
            assert_eq!(result.unwrap().rows, 3000);
            assert!(swap_reply_lost, "no try lost the swap's reply");
            return;
        }
        match result {
            Ok(report) => {
                assert_eq!(report.rows, 3000);
                assert_eq!(
                    stored_round(),
                    round as f32,
                    "skip {skip}: Ok, yet not stored"
                );
                swap_reply_lost = true;
            }
            Err(RepoError::OutcomeUnknown(m)) => {
                panic!("skip {skip}: the server could be asked: {m}")
            }
            Err(e) => {
                assert!(e.is_transient(), "skip {skip}: {e}");
                assert_ne!(
                    stored_round(),
                    round as f32,
                    "skip {skip}: failed ({e}), yet stored"
                );
            }
        }
        assert_eq!(
            t.count("SELECT count(*) FROM embeddings WHERE entity_type = 'feed'"),
            3000,
            "skip {skip}: one set, never a mix"
        );
    }
    panic!("the refresh committed more than 8 times");
}
