//! The control socket beside the shim's NBD socket (`PATH.ctl`): cut, release, status, the
//! agent's report of what it replicated, and which file or device the shim serves.
//!
//! One JSON request per line (at most `MAX_REQUEST` bytes), one JSON reply per line:
//! `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`. The shim creates the socket mode
//! 0600 and refuses a peer whose uid is neither its own nor root.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tracker::{ReplicatedPoint, Tracker};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// Longest reply line a client accepts.
const MAX_REPLY: u64 = 64 << 20;

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Cut,
    Release {
        generation: u64,
    },
    Status,
    /// Mark the shim resync-required (persisted) until a resync commits and clears it.
    RequireResync {
        why: String,
    },
    ClearResync,
    /// The agent committed a generation as a recovery point (for the RPO in `status`).
    Replicated {
        point: ReplicatedPoint,
    },
    /// Planned failover: refuse writes, drain, flush, cut the final generation.
    Quiesce {
        timeout_ms: u64,
    },
    /// Accept writes again.
    Thaw,
    /// Which file or device the shim serves ([`ImageInfo`]): a local agent may read the live
    /// disk from it directly for a whole-disk scan instead of through the NBD socket.
    Image,
}

/// The image the shim serves, as it opened it: an agent that opens `path` checks that it got
/// the same file (`dev`, `ino`) before reading it.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
pub struct ImageInfo {
    /// Absolute, symlinks resolved.
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    /// The disk's size in bytes.
    pub size: u64,
}

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error("cannot reach the control socket {path} (is `siterep serve` running?)")]
    Connect { path: String, source: io::Error },
    #[error("control socket I/O failed")]
    Io(#[from] io::Error),
    #[error("bad reply from the control socket: {0}")]
    BadReply(String),
    #[error("{0}")]
    Refused(String),
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

/// Binds the control socket, replacing a stale socket file. The caller sets a 0177 umask
/// around it (a socket file takes its mode from the umask at bind time) so it is owner-only
/// from the start.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    UnixListener::bind(path)
}

fn execute(tracker: &Tracker, image: Option<&ImageInfo>, req: Request) -> Result<Value, String> {
    let v = match req {
        Request::Image => serde_json::to_value(image.ok_or("this shim cannot name its image")?),
        Request::Cut => serde_json::to_value(tracker.cut().map_err(|e| e.to_string())?),
        Request::Release { generation } => {
            tracker.release(generation).map_err(|e| e.to_string())?;
            Ok(serde_json::json!({ "released": generation }))
        }
        Request::Status => serde_json::to_value(tracker.status()),
        Request::RequireResync { why } => {
            tracker.require_resync(why.clone());
            Ok(serde_json::json!({ "resync_required": why }))
        }
        Request::ClearResync => {
            tracker.clear_resync();
            Ok(serde_json::json!({ "resync_required": null }))
        }
        Request::Replicated { point } => {
            tracker.set_replicated(point);
            Ok(serde_json::json!({}))
        }
        Request::Quiesce { timeout_ms } => serde_json::to_value(
            tracker.quiesce(std::time::Duration::from_millis(timeout_ms)).map_err(|e| e.to_string())?,
        ),
        Request::Thaw => {
            tracker.thaw();
            Ok(serde_json::json!({ "quiesced": false }))
        }
    };
    v.map_err(|e| e.to_string())
}

/// Serves one control connection from a peer with uid `peer_uid` (SO_PEERCRED) for the shim
/// of `tracker` serving `image`.
pub fn handle(
    stream: UnixStream,
    peer_uid: u32,
    my_uid: u32,
    tracker: &Tracker,
    image: Option<&ImageInfo>,
) -> io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut rd = BufReader::new(stream);
    if peer_uid != my_uid && peer_uid != 0 {
        // Take the request first, so the client's write succeeds and it reads the refusal.
        let _ = (&mut rd).take(MAX_REQUEST).read_line(&mut String::new());
        writeln!(out, "{}", serde_json::json!({"ok": false, "error": "permission denied"}))?;
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("refused uid {peer_uid}")));
    }
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
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => match execute(tracker, image, req) {
                Ok(v) => serde_json::json!({"ok": true, "result": v}),
                Err(e) => serde_json::json!({"ok": false, "error": e}),
            },
            Err(e) => serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        writeln!(out, "{reply}")?;
    }
}

/// Sends one request to the control socket at `path` and returns its result.
pub fn call(path: &Path, req: &Request) -> Result<Value, ControlError> {
    let stream = UnixStream::connect(path)
        .map_err(|source| ControlError::Connect { path: path.display().to_string(), source })?;
    let mut w = stream.try_clone()?;
    let sent =
        writeln!(w, "{}", serde_json::to_string(req).map_err(|e| ControlError::BadReply(e.to_string()))?);
    // Even if the write failed, the shim may have said why before closing.
    let mut line = String::new();
    let read = BufReader::new(stream).take(MAX_REPLY).read_line(&mut line);
    if line.is_empty() {
        sent?;
        read?;
    }
    let v: Value = serde_json::from_str(&line).map_err(|e| ControlError::BadReply(e.to_string()))?;
    if v["ok"] == Value::Bool(true) {
        Ok(v["result"].clone())
    } else {
        Err(ControlError::Refused(v["error"].as_str().unwrap_or("unknown error").to_string()))
    }
}

/// Calls and decodes the result as `T`.
pub fn call_as<T: serde::de::DeserializeOwned>(path: &Path, req: &Request) -> Result<T, ControlError> {
    serde_json::from_value(call(path, req)?).map_err(|e| ControlError::BadReply(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let p = ReplicatedPoint { point: 3, generation: 4, cut_unix_ms: 5, committed_unix_ms: 6 };
        for r in [
            Request::Cut,
            Request::Release { generation: 9 },
            Request::Status,
            Request::ClearResync,
            Request::RequireResync { why: "x".into() },
            Request::Replicated { point: p },
            Request::Image,
        ] {
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
