//! A TCP proxy in front of a server that loses the server's reply to a commit: it forwards
//! the client's COMMIT (or autocommit write), lets the server commit, swallows the reply and
//! closes both sides, as a network that fails at the worst moment would. Plaintext only.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::Result;

/// The proxy; connections through [`url`](Self::url) reach the server, and the next
/// [`lose_next_commit_replies`](Self::lose_next_commit_replies) commit replies never return.
///
/// ```no_run
/// # fn main() -> pg_model_repo::Result<()> {
/// use pg_model_repo::throwaway::{LostReplyProxy, ThrowawayServer};
/// let server = ThrowawayServer::start(&[])?;
/// let proxy = LostReplyProxy::start(server.port())?;
/// let repo = pg_model_repo::ModelRepository::connect(&proxy.url())?;
/// proxy.lose_next_commit_replies(1);
/// let removed = repo.clear_cache("*")?; // committed, its reply lost, and still the right count
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LostReplyProxy {
    port: u16,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Commit replies still to lose.
    armed: AtomicU64,
    /// Commits let through before the armed losses begin.
    skip: AtomicU64,
    /// Commit replies lost so far.
    lost: AtomicU64,
    /// Refuse new connections once a reply was lost (until told otherwise).
    refuse_after_loss: AtomicBool,
    /// New connections are closed at once.
    refusing: AtomicBool,
    /// Both sockets of every live connection, to close them on drop.
    sockets: Mutex<Vec<TcpStream>>,
}

impl LostReplyProxy {
    /// Listens on 127.0.0.1 at a free port and forwards to the server at 127.0.0.1:`server_port`.
    pub fn start(server_port: u16) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::default());
        let accepting = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("lost-reply-proxy".to_owned())
            .spawn(move || {
                for client in listener.incoming().flatten() {
                    let Some(shared) = accepting.upgrade() else {
                        return;
                    };
                    if shared.refusing.load(Ordering::Acquire) {
                        continue;
                    }
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)) {
                        connect(shared, client, server);
                    }
                }
            })?;
        Ok(LostReplyProxy { port, shared })
    }

    /// A key/value connection string for the `postgres` superuser through the proxy.
    pub fn url(&self) -> String {
        super::superuser_url(self.port)
    }

    /// The port the proxy listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Loses the replies to the next `n` commits (on any connection through the proxy).
    pub fn lose_next_commit_replies(&self, n: u64) {
        self.shared.armed.fetch_add(n, Ordering::AcqRel);
    }

    /// Lets the replies to the next `skip` commits through, then loses the reply to the one
    /// after (on any connection through the proxy): for the last commit of a call that commits
    /// several times.
    pub fn lose_commit_reply_after(&self, skip: u64) {
        self.shared.skip.store(skip, Ordering::Release);
        self.shared.armed.fetch_add(1, Ordering::AcqRel);
    }

    /// Commit replies still to lose.
    pub fn armed(&self) -> u64 {
        self.shared.armed.load(Ordering::Acquire)
    }

    /// Commit replies lost so far.
    pub fn lost(&self) -> u64 {
        self.shared.lost.load(Ordering::Acquire)
    }

    /// With `true`, the proxy refuses every new connection from the moment it loses a reply,
    /// so that nobody can ask the server what became of the commit; with `false` it accepts
    /// connections again.
    pub fn refuse_after_loss(&self, on: bool) {
        self.shared.refuse_after_loss.store(on, Ordering::Release);
        if !on {
            self.shared.refusing.store(false, Ordering::Release);
        }
    }
}

impl Drop for LostReplyProxy {
    fn drop(&mut self) {
        let sockets = std::mem::take(&mut *lock(&self.shared.sockets));
        for s in sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Wake the accept loop so it sees the proxy is gone.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn connect(shared: Arc<Shared>, client: TcpStream, server: TcpStream) {
    // Small messages go out at once (Nagle's delay against delayed ACKs costs 40 ms a turn).
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
        client.try_clone(),
        server.try_clone(),
        client.try_clone(),
        server.try_clone(),
    ) else {
        return;
    };
    {
        let mut sockets = lock(&shared.sockets);
        sockets.retain(|s| s.peer_addr().is_ok());
        sockets.push(c3);
        sockets.push(s3);
    }
    let _ = std::thread::Builder::new()
        .name("lost-reply-proxy-up".to_owned())
        .spawn(move || pump(client, server));
    let _ = std::thread::Builder::new()
        .name("lost-reply-proxy-down".to_owned())
        .spawn(move || replies(&shared, s2, c2));
}

/// Client to server, byte for byte.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Server to client, message by message: from a CommandComplete of a commit (or of a write
/// outside a transaction block) to the ReadyForQuery that ends it, messages are held; if the
/// transaction status is then idle and a loss is armed, they are dropped and both sides
/// closed.
fn replies(shared: &Shared, server: TcpStream, client: TcpStream) {
    let mut server = BufReader::with_capacity(64 * 1024, server);
    let mut client = BufWriter::with_capacity(64 * 1024, client);
    let mut held: Vec<u8> = Vec::new();
    let mut holding = false;
    loop {
        // Everything read so far is passed on before waiting for more.
        if server.buffer().is_empty() && client.flush().is_err() {
            break;
        }
        let mut header = [0u8; 5];
        if server.read_exact(&mut header).is_err() {
            break;
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        if server.read_exact(&mut body).is_err() {
            break;
        }
        let kind = header[0];
        if kind == b'C' && commits(&body) {
            holding = true;
        }
        let mut message = header.to_vec();
        message.extend_from_slice(&body);
        if !holding {
            if client.write_all(&message).is_err() {
                break;
            }
            continue;
        }
        held.extend_from_slice(&message);
        if kind != b'Z' {
            continue;
        }
        holding = false;
        let idle = body.first() == Some(&b'I');
        let lose = idle && shared.take_loss();
        if lose {
            if shared.refuse_after_loss.load(Ordering::Acquire) {
                shared.refusing.store(true, Ordering::Release);
            }
            shared.lost.fetch_add(1, Ordering::AcqRel);
            break;
        }
        if client.write_all(&held).is_err() {
            break;
        }
        held.clear();
    }
    // What came before the lost reply still arrives; then both sides close.
    let _ = client.flush();
    let _ = client.get_ref().shutdown(Shutdown::Both);
    let _ = server.get_ref().shutdown(Shutdown::Both);
}

impl Shared {
    /// Whether the reply to the commit that just ended is to be lost.
    fn take_loss(&self) -> bool {
        let decrement = |n: u64| n.checked_sub(1);
        if self.armed.load(Ordering::Acquire) == 0 {
            return false;
        }
        if self
            .skip
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, decrement)
            .is_ok()
        {
            return false;
        }
        self.armed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, decrement)
            .is_ok()
    }
}

/// True for the command tag of a commit or of a write (which commits when it runs outside a
/// transaction block).
fn commits(body: &[u8]) -> bool {
    let tag = body.split(|b| *b == 0).next().unwrap_or_default();
    ["COMMIT", "INSERT", "UPDATE", "DELETE", "MERGE", "COPY"]
        .iter()
        .any(|t| tag.starts_with(t.as_bytes()))
}
