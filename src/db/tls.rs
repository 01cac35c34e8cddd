//! How connections are made: plaintext, or TLS (rustls) when the `tls` feature is on and the
//! URL asks for `sslmode=require` or a root certificate is configured. Without the feature a
//! request for TLS is an error, never a silent plaintext connection.
//!
//! r2d2_postgres's `PostgresConnectionManager` makes the connections with our
//! [`WatchedConnect`] as its TLS connector. Every TCP connection's socket is wrapped in a
//! [`Watched`] stream from its first byte (login included), so the watchdog of `db::deadline`
//! can cut it. tokio-postgres hands its socket to the TLS connector only, so we ask it for
//! "direct" TLS and do the PostgreSQL negotiation (SSLRequest, then rustls or plaintext)
//! ourselves; the server sees the same bytes as from any client. tokio-postgres offers no such
//! hook on plaintext Unix-domain sockets: those connect without a client-side deadline.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use postgres::config::{Host, SslMode, SslNegotiation};
use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use postgres::Socket;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::db::config::ConnectionConfig;
use crate::db::deadline::{Watch, WatchGroup, Watched};
use crate::error::{RepoError, Result};

/// Opens sessions for one configuration.
#[derive(Clone)]
pub(crate) enum Connector {
    /// No TLS at all (sslmode disable or prefer, no root certificate).
    Plain,
    /// TLS verified against the configured root certificate or the system's roots.
    #[cfg(feature = "tls")]
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connector::Plain => f.write_str("Plain"),
            #[cfg(feature = "tls")]
            Connector::Rustls(_) => f.write_str("Rustls"),
        }
    }
}

impl Connector {
    /// The connector `config` asks for.
    pub(crate) fn for_config(config: &ConnectionConfig, pg: &postgres::Config) -> Result<Self> {
        let wants_tls =
            pg.get_ssl_mode() == SslMode::Require || config.tls_root_certificate.is_some();
        if !wants_tls {
            return Ok(Connector::Plain);
        }
        tls_connector(config)
    }

    /// What r2d2_postgres's `PostgresConnectionManager` connects with: the settings to hand
    /// it and the [`WatchedConnect`] that wraps each new socket. Each connection's watch is
    /// armed with `login` until the login is done, and joins `group` when there is one.
    pub(crate) fn watched(
        &self,
        pg: &postgres::Config,
        login: Duration,
        group: Option<WatchGroup>,
    ) -> (postgres::Config, WatchedConnect) {
        let tcp_only =
            !pg.get_hosts().is_empty() && pg.get_hosts().iter().all(|h| matches!(h, Host::Tcp(_)));
        let mut settings = pg.clone();
        let negotiate = if tcp_only {
            // "Direct" TLS: tokio-postgres hands us the raw socket before its first byte, and
            // we negotiate (or not) ourselves.
            settings
                .ssl_mode(SslMode::Require)
                .ssl_negotiation(SslNegotiation::Direct);
            match self {
                Connector::Plain => Negotiate::Plain,
                #[cfg(feature = "tls")]
                Connector::Rustls(tls) => match pg.get_ssl_mode() {
                    SslMode::Disable => Negotiate::Plain,
                    mode => Negotiate::Tls {
                        required: mode != SslMode::Prefer,
                        tls: tls.clone(),
                    },
                },
            }
        } else {
            // Unix-domain sockets: tokio-postgres negotiates itself, and hands us a socket
            // only once the server agreed to TLS (which PostgreSQL never does on a Unix
            // socket); plaintext sockets are not watched.
            match self {
                Connector::Plain => {
                    settings.ssl_mode(SslMode::Disable);
                    Negotiate::Plain
                }
                #[cfg(feature = "tls")]
                Connector::Rustls(tls) => Negotiate::Agreed { tls: tls.clone() },
            }
        };
        let connect = WatchedConnect {
            watch: Watch::new(),
            login,
            group,
            negotiate,
        };
        (settings, connect)
    }
}

thread_local! {
    /// The watch of the connection this thread is opening (see [`WatchedConnect`]'s `Clone`).
    static OPENING: RefCell<Option<Watch>> = const { RefCell::new(None) };
}

/// The watch of the connection the calling thread opened last through a [`WatchedConnect`]
/// clone, if not taken yet: r2d2_postgres keeps the connector's clone inside the client it
/// returns, so the watch comes back this way.
pub(crate) fn take_opened_watch() -> Option<Watch> {
    OPENING.with(|w| w.borrow_mut().take())
}

/// What to do on a fresh socket before the startup message.
#[derive(Clone)]
enum Negotiate {
    /// Nothing: plaintext.
    Plain,
    /// Ask for TLS (SSLRequest); `required`: a refusal fails, else it falls back to plaintext.
    #[cfg(feature = "tls")]
    Tls {
        required: bool,
        tls: tokio_postgres_rustls::MakeRustlsConnect,
    },
    /// The server already agreed to TLS (tokio-postgres asked): the handshake.
    #[cfg(feature = "tls")]
    Agreed {
        tls: tokio_postgres_rustls::MakeRustlsConnect,
    },
}

/// Our stand-in for a TLS connector, which r2d2_postgres's manager clones for every
/// connection it opens: it receives the raw socket, wraps it in a watched stream and
/// negotiates what the configuration asks for.
///
/// Every clone is a new connection, so cloning makes a fresh [`Watch`] (armed with the login
/// bound, in the pool's group) and leaves a handle to it for the cloning thread, which takes it
/// with [`take_opened_watch`] once the connection is made: the manager clones and connects on
/// the thread that asked, and the client it returns keeps the clone out of reach.
pub(crate) struct WatchedConnect {
    watch: Watch,
    login: Duration,
    group: Option<WatchGroup>,
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    negotiate: Negotiate,
}

impl Clone for WatchedConnect {
    fn clone(&self) -> Self {
        let watch = Watch::new();
        if let Some(group) = &self.group {
            group.add(&watch);
        }
        watch.arm(self.login);
        OPENING.with(|w| *w.borrow_mut() = Some(watch.clone()));
        WatchedConnect {
            watch,
            login: self.login,
            group: self.group.clone(),
            negotiate: self.negotiate.clone(),
        }
    }
}

impl std::fmt::Debug for WatchedConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let negotiate = match &self.negotiate {
            Negotiate::Plain => "Plain",
            #[cfg(feature = "tls")]
            Negotiate::Tls { .. } => "Tls",
            #[cfg(feature = "tls")]
            Negotiate::Agreed { .. } => "Agreed",
        };
        f.debug_struct("WatchedConnect")
            .field("negotiate", &negotiate)
            .field("login", &self.login)
            .finish_non_exhaustive()
    }
}

/// [`WatchedConnect`] for one host.
pub(crate) struct WatchedConnectHost {
    watch: Watch,
    /// TLS: whether to send the SSLRequest first, whether a refusal fails, the handshake.
    #[cfg(feature = "tls")]
    tls: Option<(bool, bool, RustlsConnect)>,
}

#[cfg(feature = "tls")]
type RustlsConnect =
    <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Watched<Socket>>>::TlsConnect;
#[cfg(feature = "tls")]
type RustlsStream = <RustlsConnect as TlsConnect<Watched<Socket>>>::Stream;

impl MakeTlsConnect<Socket> for WatchedConnect {
    type Stream = Stream;
    type TlsConnect = WatchedConnectHost;
    type Error = io::Error;

    fn make_tls_connect(&mut self, _domain: &str) -> io::Result<WatchedConnectHost> {
        Ok(WatchedConnectHost {
            watch: self.watch.clone(),
            #[cfg(feature = "tls")]
            tls: match &mut self.negotiate {
                Negotiate::Plain => None,
                Negotiate::Tls { required, tls } => Some((
                    true,
                    *required,
                    MakeTlsConnect::<Watched<Socket>>::make_tls_connect(tls, _domain)
                        .map_err(io::Error::other)?,
                )),
                Negotiate::Agreed { tls } => Some((
                    false,
                    true,
                    MakeTlsConnect::<Watched<Socket>>::make_tls_connect(tls, _domain)
                        .map_err(io::Error::other)?,
                )),
            },
        })
    }
}

impl TlsConnect<Socket> for WatchedConnectHost {
    type Stream = Stream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        let stream = self.watch.stream(socket);
        #[cfg(feature = "tls")]
        if let Some((request, required, tls)) = self.tls {
            return Box::pin(negotiate_tls(stream, request, required, tls));
        }
        Box::pin(std::future::ready(Ok(Stream::Plain(stream))))
    }
}

/// The PostgreSQL TLS negotiation: an SSLRequest (unless `request` is false: already
/// agreed), then TLS on 'S', plaintext on 'N' (unless TLS is required).
#[cfg(feature = "tls")]
async fn negotiate_tls(
    mut stream: Watched<Socket>,
    request: bool,
    required: bool,
    tls: RustlsConnect,
) -> io::Result<Stream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// Length 8, then the SSLRequest code 80877103.
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    if !request {
        return Ok(Stream::Tls(Box::new(tls.connect(stream).await?)));
    }
    stream.write_all(&SSL_REQUEST).await?;
    let mut answer = [0u8];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => Ok(Stream::Tls(Box::new(tls.connect(stream).await?))),
        b'N' if !required => Ok(Stream::Plain(stream)),
        b'N' => Err(io::Error::other("server does not support TLS")),
        other => Err(io::Error::other(format!(
            "unexpected answer {other:#04x} to the TLS request"
        ))),
    }
}

/// A connection's stream: plaintext or TLS, always watched underneath.
pub(crate) enum Stream {
    Plain(Watched<Socket>),
    #[cfg(feature = "tls")]
    Tls(Box<RustlsStream>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl TlsStream for Stream {
    fn channel_binding(&self) -> ChannelBinding {
        match self {
            Stream::Plain(s) => s.channel_binding(),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.channel_binding(),
        }
    }
}

#[cfg(not(feature = "tls"))]
fn tls_connector(_config: &ConnectionConfig) -> Result<Connector> {
    Err(RepoError::invalid(
        "TLS was requested (sslmode=require or a root certificate), but this build has no TLS \
         support: enable the `tls` feature of pg-model-repo; refusing to connect in plaintext",
    ))
}

#[cfg(feature = "tls")]
fn tls_connector(config: &ConnectionConfig) -> Result<Connector> {
    use std::sync::Arc;

    let mut roots = rustls::RootCertStore::empty();
    match &config.tls_root_certificate {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                RepoError::invalid(format!(
                    "cannot read root certificate {}: {e}",
                    path.display()
                ))
            })?;
            add_pem_certificates(&mut roots, &pem)?;
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(RepoError::invalid(
            "no root certificate to verify the server with",
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RepoError::invalid(format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Connector::Rustls(
        tokio_postgres_rustls::MakeRustlsConnect::new(tls),
    ))
}

#[cfg(feature = "tls")]
fn add_pem_certificates(roots: &mut rustls::RootCertStore, pem: &[u8]) -> Result<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert =
            cert.map_err(|e| RepoError::invalid(format!("bad root certificate PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| RepoError::invalid(format!("unusable root certificate: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(RepoError::invalid(
            "the root certificate file holds no certificate",
        ));
    }
    Ok(())
}
