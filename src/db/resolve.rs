//! Host names resolved within a bound. tokio-postgres resolves a host name before its
//! connect_timeout starts, on the system's resolver, which may never answer (a DNS server
//! black-holed by a firewall, a resolver that retries for minutes): a login would wait on it
//! unbounded. So before each login the names are resolved here, on a thread of their own,
//! within what is left of the login's bound. A resolver that answers lets the login go on
//! (tokio-postgres resolves again, and tries each address, as it always does); one that does
//! not fails the login with `Timeout` when the bound passes, the resolving thread left to end
//! on its own.

use std::net::{IpAddr, ToSocketAddrs};
use std::time::Duration;

use postgres::config::Host;

use crate::error::{RepoError, Result, TimeoutKind};

/// Resolves the host names `pg` connects to (not IP addresses, not Unix sockets, nothing when
/// `hostaddr` is given) within `bound`.
pub(crate) fn resolve_within(pg: &postgres::Config, bound: Duration) -> Result<()> {
    let names = host_names(pg);
    if names.is_empty() {
        return Ok(());
    }
    let (answered, answer) = crossbeam_channel::bounded::<()>(1);
    let looked_up = names.clone();
    std::thread::Builder::new()
        .name("pg-model-repo-resolve".into())
        .spawn(move || {
            for (name, port) in &looked_up {
                // An error is the login's to report, in tokio-postgres's words.
                let _ = (name.as_str(), *port).to_socket_addrs();
            }
            let _ = answered.send(());
        })
        .map_err(RepoError::Io)?;
    match answer.recv_timeout(bound) {
        Ok(()) => Ok(()),
        Err(_) => {
            let names: Vec<&str> = names.iter().map(|(name, _)| name.as_str()).collect();
            log::warn!(
                "pg-model-repo: the resolver gave no answer for {} within {bound:?}",
                names.join(", ")
            );
            Err(RepoError::timeout(
                TimeoutKind::NoReply,
                format!(
                    "resolving the host name {} took longer than the login's bound ({bound:?}): \
                     the system's resolver does not answer",
                    names.join(", ")
                ),
            ))
        }
    }
}

/// The host names (with their ports) a login would resolve.
fn host_names(pg: &postgres::Config) -> Vec<(String, u16)> {
    if !pg.get_hostaddrs().is_empty() {
        return Vec::new();
    }
    let ports = pg.get_ports();
    let port = |i: usize| match ports {
        [] => 5432,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(5432),
    };
    pg.get_hosts()
        .iter()
        .enumerate()
        .filter_map(|(i, host)| match host {
            Host::Tcp(name) if name.parse::<IpAddr>().is_err() => Some((name.clone(), port(i))),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    #[test]
    fn only_names_are_resolved_not_addresses_sockets_or_hostaddrs() {
        let names = |url: &str| host_names(&postgres::Config::from_str(url).unwrap());
        assert!(names("postgres://u@127.0.0.1:5433/db").is_empty());
        assert!(names("postgres://u@[::1]/db").is_empty());
        assert!(names("host=/var/run/postgresql user=u").is_empty());
        assert!(names("host=db.example hostaddr=10.0.0.1 user=u").is_empty());
        assert_eq!(
            names("host=a.example,b.example port=5433,5434 user=u"),
            [
                ("a.example".to_owned(), 5433),
                ("b.example".to_owned(), 5434)
            ]
        );
        assert_eq!(
            names("postgres://u@localhost/db"),
            [("localhost".to_owned(), 5432)]
        );
    }
}
