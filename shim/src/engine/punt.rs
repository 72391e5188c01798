//! Whether the io_uring engine hands small buffered writes to io-wq while they queue up.
//!
//! Neither choice wins everywhere. When a write is a plain copy into cached pages, the
//! connection's thread copying every payload itself is the bottleneck, and marking the writes
//! `IOSQE_ASYNC` spreads the copies over io-wq workers on the other CPUs. When the page cache
//! holds the image in large folios (a freshly written image does), ext4 walks all of a folio's
//! block buffers on every write under the inode lock. Writes tried inline first and punted when
//! they would block run one at a time on one io-wq worker; writes marked `IOSQE_ASYNC` run on many
//! workers at once, which spin on the inode lock and take the CPU the rest of the pipeline needs.
//! Which case holds changes with what the page cache holds (BENCHMARKS.md has the measurements).
//!
//! So the engine measures, io-wq first. When io-wq completes at least [`FAST`] writes a second,
//! none of them held the inode lock long, and it is kept without trying the other way: a short
//! probe cannot be trusted there (it overstates inline-first against sustained runs). Slower
//! than that, one [`PROBE`] each way decides, and the way that
//! completed more writes per second is kept. Each probe starts [`SETTLE`] after the switch, so
//! writes submitted the other way are not counted. The way is kept for [`EXPLOIT`] at first, twice
//! as long (up to [`EXPLOIT_MAX`]) each time a measurement keeps it, and [`EXPLOIT`] again when the
//! way changes. A probe that saw fewer than [`MIN_WRITES`] writes (the client slowed down or
//! paused) decides nothing.

use std::time::{Duration, Instant};

/// How long each way is measured.
pub const PROBE: Duration = Duration::from_millis(100);
/// How long each way runs before its measurement starts.
pub const SETTLE: Duration = Duration::from_millis(50);
/// io-wq completing this many writes a second (25 µs a write) is kept untried against
/// inline-first: at that rate no write held the inode lock long. The threshold lies between the
/// rates io-wq reaches with the image evicted and on a freshly written image (BENCHMARKS.md).
pub const FAST: f64 = 40_000.0;
/// How long the faster way is kept before the next measurement, at first.
pub const EXPLOIT: Duration = Duration::from_secs(2);
/// The longest it is kept, after measurements kept choosing it.
pub const EXPLOIT_MAX: Duration = Duration::from_secs(16);
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
    /// Whether the current probe is past its `SETTLE` (always, while keeping a way).
    settled: bool,
    /// Writes per second in the last `ProbeAsync`.
    async_rate: Option<f64>,
    /// The way the last decided measurement chose.
    kept: Option<bool>,
    /// How long the current `Keep` lasts.
    period: Duration,
}

impl PuntPolicy {
    pub fn new(now: Instant) -> Self {
        Self {
            punt: true,
            phase: Phase::ProbeAsync,
            since: now,
            done: 0,
            settled: false,
            async_rate: None,
            kept: None,
            period: EXPLOIT,
        }
    }

    /// Whether queued-up small writes go to io-wq now.
    pub fn punt(&self) -> bool {
        self.punt
    }

    /// A write completed at `now`.
    pub fn write_done(&mut self, now: Instant) {
        if !self.settled {
            if now.saturating_duration_since(self.since) >= SETTLE {
                self.settled = true;
                self.since = now;
                self.done = 0;
            }
            return;
        }
        self.done += 1;
        let elapsed = now.saturating_duration_since(self.since);
        let rate = || (self.done >= MIN_WRITES).then(|| self.done as f64 / elapsed.as_secs_f64());
        match self.phase {
            Phase::ProbeAsync if elapsed >= PROBE => {
                self.async_rate = rate();
                match self.async_rate {
                    Some(a) if a >= FAST => self.decide(Some(true), None, now),
                    _ => self.begin(Phase::ProbeInline, false, now),
                }
            }
            Phase::ProbeInline if elapsed >= PROBE => {
                let inline = rate();
                let punt = match (self.async_rate, inline) {
                    (Some(a), Some(i)) => Some(a >= i),
                    _ => None,
                };
                self.decide(punt, inline, now);
            }
            Phase::Keep if elapsed >= self.period => {
                self.begin(Phase::ProbeAsync, true, now);
            }
            _ => {}
        }
    }

    /// Keeps the way a measurement chose; `None` (undecided) keeps the way kept before (io-wq
    /// before any measurement) for as long as before.
    fn decide(&mut self, chosen: Option<bool>, inline: Option<f64>, now: Instant) {
        let punt = match chosen {
            Some(punt) => {
                self.period =
                    if self.kept == Some(punt) { (self.period * 2).min(EXPLOIT_MAX) } else { EXPLOIT };
                self.kept = Some(punt);
                tracing::debug!(io_wq = ?self.async_rate, ?inline, punt, period = ?self.period, "small writes measured");
                punt
            }
            None => self.kept.unwrap_or(true),
        };
        self.begin(Phase::Keep, punt, now);
    }

    fn begin(&mut self, phase: Phase, punt: bool, now: Instant) {
        self.phase = phase;
        self.punt = punt;
        self.since = now;
        self.done = 0;
        self.settled = phase == Phase::Keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `n` writes evenly over `d` from `*t`, advancing `*t`.
    fn feed(p: &mut PuntPolicy, t: &mut Instant, n: u64, d: Duration) {
        let start = *t;
        for k in 1..=n as u32 {
            *t = start + d * k / n as u32;
            p.write_done(*t);
        }
    }

    /// One probe: writes through its settling time, then `n` writes over `PROBE`.
    fn probe(p: &mut PuntPolicy, t: &mut Instant, n: u64) {
        feed(p, t, 50, SETTLE);
        feed(p, t, n, PROBE);
    }

    /// Writes until the way kept changes or the next measurement starts; returns how long that
    /// took.
    fn keep(p: &mut PuntPolicy, t: &mut Instant) -> Duration {
        let (chosen, start) = (p.punt(), *t);
        while p.punt() == chosen && p.phase == Phase::Keep {
            *t += Duration::from_millis(10);
            p.write_done(*t);
        }
        assert!(p.punt(), "the next measurement starts with io-wq");
        *t - start
    }

    /// Runs one measurement (io-wq at `a`, inline at `i` writes per probe, both below `FAST`)
    /// and returns how long the chosen way is then kept.
    fn measure(p: &mut PuntPolicy, t: &mut Instant, a: u64, i: u64) -> Duration {
        assert!(p.punt(), "a measurement starts with io-wq");
        probe(p, t, a);
        assert!(!p.punt(), "then inline");
        probe(p, t, i);
        keep(p, t)
    }

    fn near(d: Duration, want: Duration) -> bool {
        d >= want && d <= want + Duration::from_millis(10)
    }

    #[test]
    fn keeps_the_way_that_completes_more_writes() {
        let mut t = Instant::now();
        let mut p = PuntPolicy::new(t);
        assert!(p.punt());
        // io-wq: 10k writes/s; inline: 20k writes/s.
        probe(&mut p, &mut t, 1000);
        assert!(!p.punt(), "the inline probe runs");
        probe(&mut p, &mut t, 2000);
        assert!(!p.punt(), "inline was faster");
        feed(&mut p, &mut t, 30_000, EXPLOIT - Duration::from_millis(1));
        assert!(!p.punt(), "kept for the whole period");
        feed(&mut p, &mut t, 100, Duration::from_millis(2));
        assert!(p.punt(), "then measured again, io-wq first");
        // Now io-wq is faster.
        probe(&mut p, &mut t, 3000);
        assert!(!p.punt());
        probe(&mut p, &mut t, 2000);
        assert!(p.punt(), "io-wq was faster");
    }

    #[test]
    fn writes_before_a_probe_settles_do_not_count() {
        let mut t = Instant::now();
        let mut p = PuntPolicy::new(t);
        // A burst while io-wq settles, then io-wq at 10k writes/s; inline at 20k.
        feed(&mut p, &mut t, 10_000, SETTLE);
        feed(&mut p, &mut t, 1000, PROBE);
        // A burst of io-wq completions right after the switch, then inline at 20k writes/s.
        feed(&mut p, &mut t, 10_000, SETTLE);
        feed(&mut p, &mut t, 2000, PROBE);
        assert!(!p.punt(), "inline was faster once settled");
    }

    #[test]
    fn fast_io_wq_is_kept_without_trying_inline() {
        let mut t = Instant::now();
        let mut p = PuntPolicy::new(t);
        // 50k writes/s through io-wq.
        probe(&mut p, &mut t, 5000);
        assert!(p.punt(), "no inline probe");
        assert_eq!(p.phase, Phase::Keep);
        assert!(near(keep(&mut p, &mut t), EXPLOIT));
        probe(&mut p, &mut t, 5000);
        assert!(near(keep(&mut p, &mut t), EXPLOIT * 2), "and measured less often");
    }

    #[test]
    fn too_few_writes_decide_nothing() {
        let mut t = Instant::now();
        let mut p = PuntPolicy::new(t);
        probe(&mut p, &mut t, 10);
        assert!(!p.punt());
        probe(&mut p, &mut t, 2000);
        assert!(p.punt(), "no rate for io-wq: back to io-wq");
    }

    #[test]
    fn measures_less_often_while_the_same_way_keeps_winning() {
        let mut t = Instant::now();
        let mut p = PuntPolicy::new(t);
        // The first measurement is kept for the shortest period, whichever way wins.
        assert!(near(measure(&mut p, &mut t, 2000, 1000), EXPLOIT));
        assert!(near(measure(&mut p, &mut t, 2000, 1000), EXPLOIT * 2));
        // Inline wins: back to the shortest period.
        assert!(near(measure(&mut p, &mut t, 1000, 2000), EXPLOIT));
        assert!(near(measure(&mut p, &mut t, 1000, 2000), EXPLOIT * 2));
        assert!(near(measure(&mut p, &mut t, 1000, 2000), EXPLOIT * 4));
        assert!(near(measure(&mut p, &mut t, 1000, 2000), EXPLOIT_MAX));
        assert!(near(measure(&mut p, &mut t, 1000, 2000), EXPLOIT_MAX), "no longer than the cap");
        // A probe without enough writes keeps the way and the period.
        assert!(near(measure(&mut p, &mut t, 10, 2000), EXPLOIT_MAX));
        // io-wq wins again: the short period, io-wq kept.
        probe(&mut p, &mut t, 2000);
        probe(&mut p, &mut t, 1000);
        assert!(p.punt(), "io-wq was faster");
        assert_eq!(p.period, EXPLOIT);
    }
}
