//! TLS: with the `tls` feature, `sslmode=require` and a custom root certificate give verified
//! TLS connections; without the feature, asking for TLS is an error, never plaintext.

#[cfg(feature = "tls")]
use pg_model_repo::throwaway::ThrowawayServer;
use pg_model_repo::{ModelRepository, RepoError, RepositoryConfig};

#[cfg(not(feature = "tls"))]
#[test]
fn without_the_tls_feature_a_tls_request_is_a_clear_error() {
    for config in [
        RepositoryConfig::new("host=127.0.0.1 user=postgres sslmode=require"),
        RepositoryConfig::new("host=127.0.0.1 user=postgres").tls_root_certificate("/ca.pem"),
    ] {
        match ModelRepository::open(config) {
            Err(RepoError::InvalidInput(m)) => assert!(m.message().contains("tls"), "{m}"),
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it, as PEM (ca, cert, key).
#[cfg(feature = "tls")]
fn certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&server_key, &issuer).unwrap();
    (ca.pem(), cert.pem(), server_key.serialize_pem())
}

#[cfg(feature = "tls")]
fn tls_server(cert: &str, key: &str) -> ThrowawayServer {
    let server = ThrowawayServer::start(&[("max_connections", "50")]).unwrap();
    let data = server.data_dir();
    std::fs::write(data.join("server.crt"), cert).unwrap();
    std::fs::write(data.join("server.key"), key).unwrap();
    for file in ["server.crt", "server.key"] {
        let path = data.join(file);
        std::process::Command::new("chmod")
            .arg("600")
            .arg(&path)
            .status()
            .unwrap();
        // The server runs as `postgres` when the tests run as root.
        let owner = std::fs::metadata(&data)
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap();
        std::process::Command::new("chown")
            .arg(owner.to_string())
            .arg(&path)
            .status()
            .unwrap();
    }
    let mut admin = postgres::Client::connect(&server.url(), postgres::NoTls).unwrap();
    for statement in [
        "ALTER SYSTEM SET ssl = on",
        "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
        "ALTER SYSTEM SET ssl_key_file = 'server.key'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(statement).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    server
}

#[cfg(feature = "tls")]
#[test]
fn sslmode_require_with_a_custom_root_connects_over_verified_tls() {
    let (ca, cert, key) = certificates();
    let server = tls_server(&cert, &key);
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca).unwrap();
    let url = format!("{} sslmode=require", server.url());
    let repo = ModelRepository::open(
        RepositoryConfig::new(url.clone())
            .schema("tls")
            .pool_size(1)
            .reaper_interval(None)
            .tls_root_certificate(&ca_path),
    )
    .unwrap();
    repo.save_model("m", "1", b"over tls", &serde_json::json!({}))
        .unwrap();
    assert_eq!(repo.load_model("m", "1").unwrap().unwrap(), b"over tls");
    let mut admin = postgres::Client::connect(&server.url(), postgres::NoTls).unwrap();
    let encrypted: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'pg-model-repo' AND s.ssl",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(encrypted >= 1);
    let plain: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'pg-model-repo' AND NOT s.ssl",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(plain, 0);

    // A root that did not sign the server's certificate is refused.
    let (other_ca, _, _) = certificates();
    let other_path = dir.path().join("other.pem");
    std::fs::write(&other_path, other_ca).unwrap();
    let refused = ModelRepository::open(
        RepositoryConfig::new(url)
            .schema("tls")
            .pool_size(1)
            .reaper_interval(None)
            .tls_root_certificate(&other_path),
    );
    assert!(
        matches!(refused, Err(RepoError::Database(_))),
        "{refused:?}"
    );
}
