//! The process server's network side: agents connect over mutual TLS, speak `wire` frames,
//! and their generations become recovery points in the [`Store`]. One thread per connection;
//! many agents and disks at once.
//!
//! Per connection: Hello → Welcome (version negotiation) → RegisterDisk → DiskState, then per
//! generation BeginGeneration, HaveQuery/HaveReply, Chunk, Zero, Progress/ProgressAck, Commit →
//! Committed. Every chunk is verified (decompressed, blake3) before it is stored; a bad one
//! rejects the whole generation. A commit is acknowledged only once the point is durable.
//!
//! For a resync the agent asks `HashQuery` → `Hashes` (`docs/wire.md` §6.8): the blake3 of each
//! block of a point, computed by the store from the point's
//! [`PointReader`](crate::PointReader) (zero ranges without reading anything,
//! `store/hashes.rs`), so only blocks that differ cross the network.
//!
//! The modules: `access` (enrollment, the peer a certificate names, one session per disk),
//! `admission` (what a connection may cost before it is authenticated), `stream` (the bytes:
//! TCP, TLS, frames in and out), `session` (a connection's loop, which drives
//! [`wire::session::ServerSession`], the order of frames), `actions` (what each action the
//! session asks for does to the store), `ingest` (chunks verified in parallel, extents applied
//! in order), `metrics`; `serve` here accepts connections.

mod access;
mod actions;
mod admission;
mod ingest;
mod metrics;
mod session;
mod stream;

use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ServerConfig, ServerConnection, StreamOwned};

pub use access::{Access, EnrolledAgent, Enrollment, Sessions};
pub use admission::Limits;
pub use metrics::Metrics;

use crate::Store;
use access::Peer;
use admission::{Admission, Handshake};
use stream::{tls_record, Conn, Stream};

/// Serves agents on `listener` until `stop` is set (checked every 200 ms).
///
/// One thread per connection. Before a connection is authenticated it holds one of
/// `limits.max_handshakes` slots (a connection beyond them is closed at once), reads with a
/// small buffer, and must complete its TLS handshake and send `Hello` within
/// `limits.handshake_timeout`; only then does the idle timeout of a session apply.
pub fn serve(
    listener: TcpListener,
    access: Arc<Access>,
    store: Arc<Store>,
    name: String,
    limits: Limits,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let admission = Arc::new(Admission::new(limits, access.metrics.clone()));
    let mut threads = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((tcp, peer)) => {
                // Closing at once (dropping the socket) costs the server nothing more.
                let Some(mut gate) = admission.admit(peer) else { continue };
                let (access, store, name, admission) =
                    (access.clone(), store.clone(), name.clone(), admission.clone());
                let spawned = std::thread::Builder::new().name("siterep-conn".into()).spawn(move || {
                    access.metrics.connections.fetch_add(1, Ordering::Relaxed);
                    let r = connection(tcp, peer, &access, &store, &name, &mut gate);
                    access.metrics.connections.fetch_sub(1, Ordering::Relaxed);
                    match r {
                        Err(e) if !gate.is_done() => admission.failed(peer, &e),
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            tracing::debug!(%peer, "agent disconnected")
                        }
                        Err(e) => tracing::info!(%peer, "agent connection ended: {e}"),
                        Ok(()) => {}
                    }
                });
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => tracing::warn!(%peer, "cannot start a thread for a connection: {e}"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        threads.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
    }
    Ok(())
}

fn connection(
    tcp: TcpStream,
    addr: std::net::SocketAddr,
    access: &Access,
    store: &Store,
    name: &str,
    gate: &mut Handshake,
) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    keepalive(&tcp)?;
    match &access.tls {
        Some(tls) => {
            let stream = tls_handshake(tcp, tls, gate)?;
            let peer =
                Peer::of(addr, stream.conn.peer_certificates().and_then(|c| c.first()), &access.enrollment);
            session::run(Conn::unauthenticated(stream), access, peer, store, name, gate)
        }
        None => {
            let peer = Peer { addr: Some(addr), ..Peer::default() };
            session::run(Conn::unauthenticated(tcp), access, peer, store, name, gate)
        }
    }
}

/// The server's side of the TLS handshake, within the handshake's deadline.
fn tls_handshake(
    tcp: TcpStream,
    tls: &Arc<ServerConfig>,
    gate: &Handshake,
) -> io::Result<StreamOwned<ServerConnection, TcpStream>> {
    let conn = ServerConnection::new(tls.clone()).map_err(io::Error::other)?;
    let mut stream = StreamOwned::new(conn, tcp);
    // Whether the agent's first bytes were not a TLS record (an agent run with --insecure):
    // rustls answers them with an alert, which that agent reports.
    let mut plaintext = None;
    while stream.conn.is_handshaking() {
        stream.sock.set_timeouts(gate.left("TLS handshake")?);
        if plaintext.is_none() {
            let mut head = [0u8; 2];
            match stream.sock.peek(&mut head) {
                Ok(2) => plaintext = Some(!tls_record(&head)),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(gate.expired("TLS handshake"))
                }
                Err(e) => return Err(e),
            }
        }
        match stream.conn.complete_io(&mut stream.sock) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(gate.expired("TLS handshake"))
            }
            Err(_) if plaintext == Some(true) => {
                let e = "the agent sent plaintext, not TLS (is it running with --insecure?)";
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(stream)
}

/// TCP keepalive: an agent that vanished without closing (a cut link, a crashed host) is
/// noticed within about half a minute, not at the idle timeout, so its session releases its
/// disk (one session per disk) and the agent's next session is not refused as busy for long.
const KEEPALIVE_IDLE_S: u32 = 15;
const KEEPALIVE_INTERVAL_S: u32 = 5;
const KEEPALIVE_PROBES: u32 = 3;

fn keepalive(tcp: &TcpStream) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(tcp, sockopt::KeepAlive, &true)?;
    setsockopt(tcp, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE_S)?;
    setsockopt(tcp, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL_S)?;
    setsockopt(tcp, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// Accepted connections probe a silent peer, so a vanished agent frees its disk's session.
    #[test]
    fn accepted_connections_keep_alive() {
        use nix::sys::socket::{getsockopt, sockopt};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (tcp, _) = listener.accept().unwrap();
        keepalive(&tcp).unwrap();
        assert!(getsockopt(&tcp, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&tcp, sockopt::TcpKeepIdle).unwrap(), KEEPALIVE_IDLE_S);
        assert_eq!(getsockopt(&tcp, sockopt::TcpKeepInterval).unwrap(), KEEPALIVE_INTERVAL_S);
        assert_eq!(getsockopt(&tcp, sockopt::TcpKeepCount).unwrap(), KEEPALIVE_PROBES);
    }
}
