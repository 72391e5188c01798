//! The shim's control interface: `siterep cut | release N | status --json` as a client runs
//! them, and raw JSON-line requests to the control socket (`PATH.ctl`) for what the command
//! line does not offer or when a test polls faster than a process start allows.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::{parse_json, run, siterep};

/// The default control socket of a shim serving on `socket`: `socket` + `.ctl`.
pub fn control_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

/// `siterep status --socket SOCKET --json`, parsed.
#[track_caller]
pub fn status(socket: &Path) -> Value {
    let out = run(siterep().arg("status").arg("--socket").arg(socket).arg("--json"));
    parse_json("siterep status --json", &out.stdout)
}

/// `siterep cut --socket SOCKET --json`: the new generation (`generation`, `cut_unix_ms`,
/// `dirty_bytes`, `zero_bytes`).
#[track_caller]
pub fn cut(socket: &Path) -> Value {
    let out = run(siterep().arg("cut").arg("--socket").arg(socket).arg("--json"));
    parse_json("siterep cut --json", &out.stdout)
}

/// `siterep release N --socket SOCKET`.
#[track_caller]
pub fn release(socket: &Path, generation: u64) {
    run(siterep().arg("release").arg(generation.to_string()).arg("--socket").arg(socket));
}

/// Sends one JSON request line (e.g. `{"cmd":"status"}`) to the control socket `control` and
/// returns the whole reply object (`{"ok":true,"result":…}` or `{"ok":false,"error":…}`).
#[track_caller]
pub fn request(control: &Path, line: &str) -> Value {
    let stream = UnixStream::connect(control)
        .unwrap_or_else(|e| panic!("connect to the control socket {}: {e}", control.display()));
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("set_read_timeout");
    (&stream).write_all(format!("{line}\n").as_bytes()).expect("send a control request");
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).expect("read the control reply");
    serde_json::from_str(reply.trim())
        .unwrap_or_else(|e| panic!("control socket answered {line} with unparsable JSON ({e}): {reply:?}"))
}

/// The `result` of a raw request that must succeed.
#[track_caller]
pub fn request_ok(control: &Path, line: &str) -> Value {
    let reply = request(control, line);
    assert_eq!(reply["ok"], true, "control request {line} failed: {reply}");
    reply.get("result").cloned().unwrap_or_else(|| panic!("control request {line}: no result in {reply}"))
}
