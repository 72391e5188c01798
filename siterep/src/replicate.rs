//! `siterep agent` and `siterep server`: replication to the recovery site over mutual TLS.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent::tls::TlsFiles;
use agent::{parse_duration, AgentConfig, AppConsistency};
use anyhow::{bail, Context, Result};
use clap::Args;

use crate::size::parse_size;

/// Certificates for mutual TLS (`siterep certs init`), or `--insecure`.
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// PEM certificate this side presents.
    #[arg(long, value_name = "PEM", required_unless_present = "insecure")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", required_unless_present = "insecure")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate the peer's certificate must chain to.
    #[arg(long, value_name = "PEM", required_unless_present = "insecure")]
    tls_ca: Option<PathBuf>,
    /// Plaintext instead of TLS (loopback addresses only).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    insecure: bool,
}

impl TlsArgs {
    /// The certificate files, or `None` with `--insecure` (after checking `addr` is loopback).
    fn files(&self, addr: &str) -> Result<Option<TlsFiles<'_>>> {
        if self.insecure {
            let loopback = std::net::ToSocketAddrs::to_socket_addrs(addr)
                .with_context(|| format!("cannot resolve {addr}"))?
                .all(|a| a.ip().is_loopback());
            if !loopback {
                bail!("--insecure (plaintext) is allowed on loopback addresses only, not {addr}");
            }
            tracing::warn!("--insecure: replication traffic is NOT encrypted or authenticated");
            return Ok(None);
        }
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            _ => bail!("give --tls-cert, --tls-key and --tls-ca (or --insecure on loopback)"),
        }
    }
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The shim's NBD socket (`siterep serve --socket`).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The shim's control socket, if not PATH.ctl.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The shim's export name.
    #[arg(long, default_value = "siterep")]
    export: String,
    /// The recovery server, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    server: String,
    /// Name the server's certificate must carry (default: the HOST of --server).
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// The protected disk's name at the recovery site.
    #[arg(long)]
    disk: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Time between generations.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    interval: Duration,
    /// Cut early once the live dirty set exceeds this.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    backlog_threshold: u64,
    /// zstd level (1 fastest .. 19 smallest).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    zstd_level: i32,
    /// Parallel readers/compressors.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    readers: u16,
    /// Make an application-consistent point this often (around the hooks).
    #[arg(long, value_parser = parse_duration)]
    app_consistent_every: Option<Duration>,
    /// Command run before an app-consistent cut (e.g. "fsfreeze -f /mnt").
    #[arg(long, value_name = "CMD")]
    pre_hook: Option<String>,
    /// Command run after it, always (e.g. "fsfreeze -u /mnt").
    #[arg(long, value_name = "CMD")]
    post_hook: Option<String>,
    /// Longest a hook may run.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    hook_timeout: Duration,
    /// Scale the retry delays (1, 2, 4, 8, 10 minutes, then every 30); e.g. 0.001 for tests.
    #[arg(long, default_value_t = 1.0)]
    retry_scale: f64,
    /// Run one cycle (the initial copy, a resync, or one generation), print a JSON summary, exit.
    #[arg(long)]
    once: bool,
    /// Give up after this many failed attempts in a row (each after its retry delay) and exit
    /// non-zero. Default: 5 with --once (the whole 1-2-4-8-10 minute schedule), else never.
    #[arg(long, value_name = "N")]
    max_retries: Option<usize>,
    /// Resync now: compare the disk with the server's latest point by hashes and send only the
    /// blocks that differ (with --once: just the resync). Also automatic when the shim requires
    /// it (tracking lost) or the backlog exceeds half the disk.
    #[arg(long)]
    resync: bool,
    /// Bind the disk on the server to this shim's source identity, then resync. For a
    /// reinstalled source whose shim state (and so its identity) was created anew; the server
    /// refuses a second source under a disk's name otherwise. Never use it for a clone: protect
    /// a clone under another --disk name.
    #[arg(long)]
    reenroll: bool,
    /// Most bytes per second a resync reads from the disk (default: unlimited).
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = parse_size)]
    resync_rate: Option<u64>,
    /// A resync pauses its reads while the application dirties more than this many new bytes
    /// per second (measured every second; after 10 s of pausing it runs 2 s regardless); 0: never.
    #[arg(long, value_name = "BYTES_PER_SEC", default_value = "32M", value_parser = parse_size)]
    resync_backoff: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
}

pub fn agent(args: AgentArgs) -> Result<()> {
    if args.interval < Duration::from_millis(100) {
        bail!("--interval must be at least 100ms");
    }
    if !(args.retry_scale > 0.0 && args.retry_scale <= 100.0) {
        bail!("--retry-scale must be in (0, 100]");
    }
    if args.resync_rate == Some(0) {
        bail!("--resync-rate must be above 0");
    }
    if (args.pre_hook.is_some() || args.post_hook.is_some()) && args.app_consistent_every.is_none() {
        bail!("--pre-hook/--post-hook need --app-consistent-every");
    }
    // Before any other thread starts, so that every thread inherits the blocked mask and only
    // the waiting thread takes these signals. The agent's state is safe at any moment: the
    // shim keeps every generation until the server has committed it.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.thread_block()?;
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            tracing::info!("agent stopping on {sig:?}");
            std::process::exit(0);
        }
    });
    let tls = args.tls.files(&args.server)?.map(|f| agent::tls::client_config(&f)).transpose()?;
    let metrics = std::sync::Arc::new(agent::Metrics::default());
    if let Some(addr) = &args.metrics {
        let m = metrics.clone();
        crate::metrics::serve(addr, move || agent_samples(&m))?;
    }
    let host = args.server.rsplit_once(':').map(|(h, _)| h).unwrap_or(&args.server);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let cfg = AgentConfig {
        control: tracker::control::control_path(&args.socket, args.control.as_deref()),
        socket: args.socket,
        export: args.export,
        server_name: args.server_name.unwrap_or_else(|| host.to_string()),
        server: args.server,
        tls,
        metrics,
        agent_name: format!(
            "{}@{}",
            args.disk,
            nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default()
        ),
        disk: args.disk,
        interval: args.interval,
        backlog_threshold: args.backlog_threshold,
        zstd_level: args.zstd_level,
        readers: args.readers.into(),
        app: args.app_consistent_every.map(|every| AppConsistency {
            every,
            pre_hook: args.pre_hook,
            post_hook: args.post_hook,
            hook_timeout: args.hook_timeout,
        }),
        retry_scale: args.retry_scale,
        max_retries: args.max_retries.or(args.once.then_some(5)),
        once: args.once,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        resync: agent::ResyncOptions {
            force: args.resync,
            rate: args.resync_rate,
            backoff_rate: args.resync_backoff,
        },
        reenroll: args.reenroll,
    };
    match agent::run(&cfg) {
        Ok(Some(summary)) => {
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context("replication stopped")),
    }
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// The recovery site's store directory.
    #[arg(long, value_name = "DIR")]
    store: PathBuf,
    /// Address to accept agents on, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Keep at most this many points per disk (the latest is always kept).
    #[arg(long, value_name = "N")]
    retain_count: Option<usize>,
    /// Drop points older than this (e.g. 7d); the latest is always kept.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    retain_age: Option<Duration>,
    /// How often retention and garbage collection run.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    gc_interval: Duration,
    /// Verify every point's roots, map pages and chunks in the background, at start and then
    /// this often (e.g. 24h); damaged objects are quarantined and their disks need a resync.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    scrub_every: Option<Duration>,
    /// Most bytes per second the scrub reads from the store.
    #[arg(long, value_name = "BYTES_PER_SEC", default_value = "50M", value_parser = parse_size)]
    scrub_rate: u64,
    /// Which agent certificates may write which disks (`siterep certs init` writes one).
    /// Without it, any agent whose certificate the CA signed may write any disk.
    #[arg(long, value_name = "FILE")]
    enrollment: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Most connections in their handshake (TLS and Hello) at once; one beyond them is closed
    /// at once.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_handshakes: u32,
    /// Time a connection has to complete its TLS handshake and send Hello (e.g. 10s).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
}

pub fn server(args: ServerArgs) -> Result<()> {
    if args.handshake_timeout < Duration::from_millis(100) {
        bail!("--handshake-timeout must be at least 100ms");
    }
    let limits = server::net::Limits {
        max_handshakes: args.max_handshakes as usize,
        handshake_timeout: args.handshake_timeout,
    };
    let tls = args.tls.files(&args.listen)?.map(|f| agent::tls::server_config(&f)).transpose()?;
    let enrollment = match &args.enrollment {
        Some(path) => server::net::Enrollment::load(path).map_err(anyhow::Error::msg)?,
        None => {
            if tls.is_some() {
                tracing::warn!(
                    "no --enrollment: any agent with a certificate from this CA may write any disk"
                );
            }
            server::net::Enrollment::default()
        }
    };
    if tls.is_none() && args.enrollment.is_some() {
        bail!("--enrollment needs TLS: plaintext agents have no certificate to check");
    }
    if args.scrub_rate == 0 {
        bail!("--scrub-rate must be above 0");
    }
    let metrics = Arc::new(server::net::Metrics::default());
    let access = Arc::new(server::net::Access {
        tls,
        enrollment,
        metrics: metrics.clone(),
        sessions: Default::default(),
    });
    let store = Arc::new(
        server::Store::open(&args.store)
            .with_context(|| format!("opening store {}", args.store.display()))?,
    );
    let listener = std::net::TcpListener::bind(&args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.thread_block()?;
    let s = stop.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            tracing::info!("{sig:?}: stopping");
        }
        s.store(true, Ordering::SeqCst);
    });
    if args.retain_count.is_some() || args.retain_age.is_some() {
        let policy = server::Retention { keep_last: args.retain_count, max_age: args.retain_age };
        let (store, stop, every) = (store.clone(), stop.clone(), args.gc_interval);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match store.retain(&policy) {
                    Ok(r) => tracing::info!(report = ?r, "retention"),
                    Err(e) => tracing::error!("retention failed: {e}"),
                }
                sleep_unless_stopped(every, &stop);
            }
        });
    }
    let scrub = Arc::new(ScrubMetrics::default());
    if let Some(every) = args.scrub_every {
        let options = server::VerifyOptions {
            rate: Some(args.scrub_rate),
            stop: Some(stop.clone()),
            ..server::VerifyOptions::default()
        };
        let (store, stop, scrub) = (store.clone(), stop.clone(), scrub.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                scrub_once(&store, &options, &scrub);
                sleep_unless_stopped(every, &stop);
            }
        });
    }
    tracing::info!(store = %args.store.display(), listen = %args.listen, "recovery server ready");
    let name = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "siterep".into());
    if let Some(addr) = &args.metrics {
        let m = metrics.clone();
        crate::metrics::serve(addr, move || server_samples(&m, &scrub))?;
    }
    server::net::serve(listener, access, store, name, limits, stop)?;
    Ok(())
}

/// Sleeps for `every`, waking early once `stop` is set.
fn sleep_unless_stopped(every: Duration, stop: &AtomicBool) {
    let until = std::time::Instant::now() + every;
    while std::time::Instant::now() < until && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the server's scrub has done, for `--metrics`.
#[derive(Default)]
struct ScrubMetrics {
    runs_total: AtomicU64,
    failures_total: AtomicU64,
    damaged_objects: AtomicU64,
    bytes_total: AtomicU64,
    last_success_unix_ms: AtomicU64,
}

/// One scrub: verifies every point (rate-limited), quarantining what is damaged.
fn scrub_once(store: &server::Store, options: &server::VerifyOptions, m: &ScrubMetrics) {
    match store.verify(options) {
        Ok(r) => {
            m.runs_total.fetch_add(1, Ordering::Relaxed);
            m.bytes_total.fetch_add(r.checked.bytes, Ordering::Relaxed);
            m.damaged_objects.store(r.damaged.len() as u64, Ordering::Relaxed);
            if !r.interrupted {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                m.last_success_unix_ms.store(now.map_or(0, |d| d.as_millis() as u64), Ordering::Relaxed);
            }
            if r.damaged.is_empty() {
                tracing::info!(checked = ?r.checked, elapsed_ms = r.elapsed_ms, "scrub: no damage found");
            } else {
                tracing::error!(
                    "scrub found damage (quarantined; the disks concerned need a resync):\n{}",
                    r.human()
                );
            }
        }
        Err(e) => {
            m.failures_total.fetch_add(1, Ordering::Relaxed);
            tracing::error!("scrub failed: {e}");
        }
    }
}

fn agent_samples(m: &agent::Metrics) -> Vec<crate::metrics::Sample> {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let last = m.last_cut_unix_ms.load(Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let rpo = if last == 0 { f64::NAN } else { now.saturating_sub(last) as f64 / 1000.0 };
    vec![
        ("siterep_rpo_seconds", "gauge", "Now minus the cut time of the newest committed point.", rpo),
        ("siterep_backlog_bytes", "gauge", "Bytes waiting to be replicated.", get(&m.backlog_bytes)),
        (
            "siterep_bytes_read_total",
            "counter",
            "Bytes read from the protected disk.",
            get(&m.bytes_read_total),
        ),
        (
            "siterep_bytes_sent_total",
            "counter",
            "Compressed chunk bytes sent to the server.",
            get(&m.bytes_sent_total),
        ),
        (
            "siterep_bytes_deduplicated_total",
            "counter",
            "Bytes the server already had.",
            get(&m.bytes_deduplicated_total),
        ),
        ("siterep_bytes_zero_total", "counter", "Bytes shipped as zero extents.", get(&m.bytes_zero_total)),
        ("siterep_points_total", "counter", "Recovery points committed.", get(&m.points_total)),
        ("siterep_errors_total", "counter", "Failed replication attempts (retried).", get(&m.errors_total)),
    ]
}

fn server_samples(m: &server::net::Metrics, scrub: &ScrubMetrics) -> Vec<crate::metrics::Sample> {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let last_scrub = scrub.last_success_unix_ms.load(Ordering::Relaxed);
    vec![
        ("siterep_server_connections", "gauge", "Open agent connections.", get(&m.connections)),
        (
            "siterep_server_handshakes",
            "gauge",
            "Connections in their handshake (TLS and Hello).",
            get(&m.handshakes),
        ),
        (
            "siterep_server_handshakes_refused_total",
            "counter",
            "Connections closed at once: --max-handshakes were in their handshake.",
            get(&m.handshakes_refused_total),
        ),
        (
            "siterep_server_handshakes_failed_total",
            "counter",
            "Handshakes that failed or timed out (--handshake-timeout).",
            get(&m.handshakes_failed_total),
        ),
        ("siterep_points_total", "counter", "Recovery points committed.", get(&m.points_total)),
        (
            "siterep_chunks_received_total",
            "counter",
            "Chunks received with data.",
            get(&m.chunks_stored_total),
        ),
        (
            "siterep_bytes_received_total",
            "counter",
            "Compressed chunk bytes received.",
            get(&m.bytes_received_total),
        ),
        ("siterep_rejected_total", "counter", "Requests or generations rejected.", get(&m.rejected_total)),
        (
            "siterep_scrub_runs_total",
            "counter",
            "Scrubs run (stopped ones included).",
            get(&scrub.runs_total),
        ),
        ("siterep_scrub_failures_total", "counter", "Scrubs that failed.", get(&scrub.failures_total)),
        (
            "siterep_scrub_damaged_objects",
            "gauge",
            "Damaged objects the last scrub found (quarantined).",
            get(&scrub.damaged_objects),
        ),
        ("siterep_scrub_bytes_total", "counter", "Bytes the scrub read.", get(&scrub.bytes_total)),
        (
            "siterep_scrub_last_success_timestamp_seconds",
            "gauge",
            "When the last complete scrub ended (unix seconds; NaN: none yet).",
            if last_scrub == 0 { f64::NAN } else { last_scrub as f64 / 1000.0 },
        ),
    ]
}
