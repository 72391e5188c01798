//! Whether the io_uring engine hands small buffered writes to io-wq while they queue up.
//!
//! Neither choice wins everywhere. When a write is a plain copy into cached pages, the
//! connection's thread copying every payload itself is the bottleneck, and marking the writes
//! `IOSQE_ASYNC` spreads the copies over io-wq workers on the other CPUs (4k randwrite qd32:
//! 1.5×, BENCHMARKS.md session 2). When the page cache holds the image in large folios, every
//! 4k write dirties a whole folio and writers are throttled by writeback: io-wq runs the writes
//! to one file one at a time, each waiting its turn to be throttled, while a write submitted
//! without the flag is first tried without blocking and goes to io-wq only if it would block
//! (1.5× the other way, session 5). Which case holds changes with what the page cache holds.
//!
//! So the engine measures. It starts handing writes to io-wq; every [`EXPLOIT`] it runs one
//! [`PROBE`] each way and keeps the way that completed more writes per second. A probe that saw
//! fewer than [`MIN_WRITES`] writes (the client slowed down or paused) decides nothing.

use std::time::{Duration, Instant};

/// How long each way is measured.
pub const PROBE: Duration = Duration::from_millis(100);
/// How long the faster way is kept before the next measurement.
pub const EXPLOIT: Duration = Duration::from_secs(2);
/// Fewest writes a probe must complete to count.
pub const MIN_WRITES: u64 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    ProbeAsync,
    ProbeInline,
    Keep,
}

#[derive(Debug)]
pub struct PuntPolicy {
    punt: bool,
    phase: Phase,
    since: Instant,
    done: u64,
    /// Writes per second in the last `ProbeAsync`.
    async_rate: Option<f64>,
}

impl PuntPolicy {
    pub fn new(now: Instant) -> Self {
        Self { punt: true, phase: Phase::ProbeAsync, since: now, done: 0, async_rate: None }
    }

    /// Whether queued-up small writes go to io-wq now.
    pub fn punt(&self) -> bool {
        self.punt
    }

    /// A write completed at `now`.
    pub fn write_done(&mut self, now: Instant) {
        self.done += 1;
        let elapsed = now.saturating_duration_since(self.since);
        let rate = || (self.done >= MIN_WRITES).then(|| self.done as f64 / elapsed.as_secs_f64());
        match self.phase {
            Phase::ProbeAsync if elapsed >= PROBE => {
                self.async_rate = rate();
                self.begin(Phase::ProbeInline, false, now);
            }
            Phase::ProbeInline if elapsed >= PROBE => {
                let punt = match (self.async_rate, rate()) {
                    (Some(a), Some(i)) => a >= i,
                    // Undecided: io-wq, as before any measurement.
                    _ => true,
                };
                self.begin(Phase::Keep, punt, now);
            }
            Phase::Keep if elapsed >= EXPLOIT => {
                self.begin(Phase::ProbeAsync, true, now);
            }
            _ => {}
        }
    }

    fn begin(&mut self, phase: Phase, punt: bool, now: Instant) {
        self.phase = phase;
        self.punt = punt;
        self.since = now;
        self.done = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `n` writes evenly over `d` from `*t`, advancing `*t`.
    fn feed(p: &mut PuntPolicy, t: &mut Instant, n: u64, d: Duration) {
        for _ in 0..n {
            *t += d / n as u32;
            p.write_done(*t);
        }
    }

    #[test]
    fn keeps_the_way_that_completes_more_writes() {
        let mut t = Instant::now();
        let mut p = PuntPolicy::new(t);
        assert!(p.punt());
        // io-wq: 10k writes/s; inline: 20k writes/s.
        feed(&mut p, &mut t, 1000, PROBE);
        assert!(!p.punt(), "the inline probe runs");
        feed(&mut p, &mut t, 2000, PROBE);
        assert!(!p.punt(), "inline was faster");
        feed(&mut p, &mut t, 30_000, EXPLOIT - Duration::from_millis(1));
        assert!(!p.punt(), "kept for the whole period");
        feed(&mut p, &mut t, 100, Duration::from_millis(2));
        assert!(p.punt(), "then measured again, io-wq first");
        // Now io-wq is faster.
        feed(&mut p, &mut t, 5000, PROBE);
        assert!(!p.punt());
        feed(&mut p, &mut t, 2000, PROBE);
        assert!(p.punt(), "io-wq was faster");
    }

    #[test]
    fn too_few_writes_decide_nothing() {
        let mut t = Instant::now();
        let mut p = PuntPolicy::new(t);
        feed(&mut p, &mut t, 10, PROBE);
        assert!(!p.punt());
        feed(&mut p, &mut t, 2000, PROBE);
        assert!(p.punt(), "no rate for io-wq: back to io-wq");
    }
}
