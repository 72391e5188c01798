//! The control socket beside the NBD socket (`PATH.ctl`): `cut`, `release N`, `status`.
//!
//! One JSON request per line (at most `MAX_REQUEST` bytes), one JSON reply per line:
//! `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`. The socket is created mode 0600
//! and a peer whose uid is neither ours nor root is refused.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracker::Tracker;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Cut,
    Release { generation: u64 },
    Status,
    ClearResync,
}

/// The control socket path for an NBD socket: `PATH.ctl` unless named explicitly.
pub fn control_path(socket: &Path, control: Option<&Path>) -> PathBuf {
    match control {
        Some(c) => c.to_path_buf(),
        None => {
            let mut s = socket.as_os_str().to_owned();
            s.push(".ctl");
            PathBuf::from(s)
        }
    }
}

/// Binds the control socket with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    // The socket file takes its mode from the umask at bind time: owner-only from the start.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let r = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    r.with_context(|| format!("cannot create the control socket {}", path.display()))
}

fn execute(tracker: &Tracker, req: Request) -> Result<Value> {
    Ok(match req {
        Request::Cut => serde_json::to_value(tracker.cut()?)?,
        Request::Release { generation } => {
            tracker.release(generation)?;
            serde_json::json!({ "released": generation })
        }
        Request::Status => serde_json::to_value(tracker.status())?,
        Request::ClearResync => {
            tracker.clear_resync();
            serde_json::json!({ "resync_required": null })
        }
    })
}

fn handle(stream: UnixStream, tracker: &Tracker) -> Result<()> {
    let creds = getsockopt(&stream, PeerCredentials)?;
    let me = nix::unistd::geteuid().as_raw();
    let mut out = stream.try_clone()?;
    if creds.uid() != me && creds.uid() != 0 {
        writeln!(out, "{}", serde_json::json!({"ok": false, "error": "permission denied"}))?;
        bail!("refused control connection from uid {}", creds.uid());
    }
    let mut rd = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = (&mut rd).take(MAX_REQUEST).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') {
            writeln!(
                out,
                "{}",
                serde_json::json!({"ok": false, "error": "request too long or unterminated"})
            )?;
            return Ok(());
        }
        let reply = match serde_json::from_str::<Request>(&line).map_err(|e| anyhow!("bad request: {e}")) {
            Ok(req) => match execute(tracker, req) {
                Ok(v) => serde_json::json!({"ok": true, "result": v}),
                Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
            },
            Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
        };
        writeln!(out, "{reply}")?;
    }
}

/// Serves control requests until `shutdown` fires.
pub fn serve(listener: UnixListener, tracker: Arc<Tracker>, shutdown: Arc<nbd::Shutdown>) {
    let _ = listener.set_nonblocking(true);
    while !shutdown.is_set() {
        let mut fds =
            [PollFd::new(listener.as_fd(), PollFlags::POLLIN), PollFd::new(shutdown.fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        while let Ok((stream, _)) = listener.accept() {
            let _ = stream.set_nonblocking(false);
            let t = tracker.clone();
            std::thread::spawn(move || {
                if let Err(e) = handle(stream, &t) {
                    tracing::warn!("control connection: {e:#}");
                }
            });
        }
    }
}

/// Sends one request to the control socket at `path` and returns its result.
pub fn call(path: &Path, req: &Request) -> Result<Value> {
    let stream = UnixStream::connect(path).with_context(|| {
        format!("cannot reach the control socket {} (is `siterep serve` running?)", path.display())
    })?;
    let mut w = stream.try_clone()?;
    writeln!(w, "{}", serde_json::to_string(req)?)?;
    let mut line = String::new();
    BufReader::new(stream).take(64 << 20).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).context("bad reply from the control socket")?;
    if v["ok"] == Value::Bool(true) {
        Ok(v["result"].clone())
    } else {
        bail!("{}", v["error"].as_str().unwrap_or("unknown error"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [Request::Cut, Request::Release { generation: 9 }, Request::Status, Request::ClearResync] {
            let s = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        }
        assert_eq!(
            serde_json::to_string(&Request::Release { generation: 3 }).unwrap(),
            r#"{"cmd":"release","generation":3}"#
        );
    }

    #[test]
    fn control_path_defaults_beside_the_socket() {
        assert_eq!(control_path(Path::new("/run/a.sock"), None), PathBuf::from("/run/a.sock.ctl"));
        assert_eq!(control_path(Path::new("/run/a.sock"), Some(Path::new("/x"))), PathBuf::from("/x"));
    }
}
