//! `--metrics ADDR`: a minimal HTTP endpoint serving Prometheus text exposition at /metrics.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use anyhow::{Context, Result};

/// One sample: (name, kind, help, value).
pub type Sample = (&'static str, &'static str, &'static str, f64);

/// Serves `render()` on `addr` from a background thread.
pub fn serve(addr: &str, render: impl Fn() -> Vec<Sample> + Send + 'static) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot serve metrics on {addr}"))?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let mut rd = BufReader::new(&stream);
            let mut request = String::new();
            if rd.read_line(&mut request).is_err() {
                continue;
            }
            // Drain the headers.
            let mut line = String::new();
            while rd.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let mut out = &stream;
            let reply = if request.starts_with("GET /metrics") {
                let body = exposition(&render());
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
            };
            let _ = out.write_all(reply.as_bytes());
        }
    })?;
    Ok(())
}

fn exposition(samples: &[Sample]) -> String {
    let mut s = String::new();
    for (name, kind, help, value) in samples {
        s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let s = exposition(&[("siterep_points_total", "counter", "Points committed.", 3.0)]);
        assert_eq!(s, "# HELP siterep_points_total Points committed.\n# TYPE siterep_points_total counter\nsiterep_points_total 3\n");
    }
}
