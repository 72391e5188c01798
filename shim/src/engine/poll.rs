//! Busy-polling a connection's socket for the client's next request.
//!
//! A client at queue depth 1 sends its next request a few microseconds after it reads our
//! reply. A connection thread that sleeps in the kernel meanwhile has to be woken for it, and
//! waking a sleeping CPU costs more than the request itself, all the more in a virtual machine
//! (an IPI and a VM exit each way). So once a connection has gone idle, its thread first asks
//! the socket for the next request with non-blocking `recv(2)` for up to the budget
//! (`siterep serve --poll-us`), and only then sleeps.
//!
//! It spins only while it pays: after an idle period longer than the budget (measured from
//! when the connection went idle, whether it spun or slept), the connection sleeps at once
//! until a request again comes within the budget. At most half the CPUs (none on a single
//! CPU) spin at a time, across all connections; the others sleep as before.
//!
//! A connection served this way is *hot*: the io_uring engine then also runs its lone small
//! READ or WRITE with a plain syscall on its own thread and sends the reply at once, as a
//! one-request-at-a-time server would, because handing either to the kernel's workers would
//! cost the very cross-CPU wakeups the spin avoids.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Threads spinning right now, across all connections.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

fn max_spinning() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()) / 2)
}

/// Tests that poll hold this: with two CPUs only one thread in the process polls at a time.
#[cfg(test)]
pub(crate) static TEST_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A spinner's slot, released on drop.
struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        SPINNING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max_spinning()).then_some(n + 1))
            .ok()
            .map(|_| Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        SPINNING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection's polling state.
#[derive(Debug)]
pub struct IdlePoll {
    budget: Duration,
    /// The last idle period ended within the budget.
    hot: bool,
    /// When the connection last went idle, until the next request arrives.
    idle_since: Option<Instant>,
}

impl IdlePoll {
    /// Polls for up to `budget` (zero: never).
    pub fn new(budget: Duration) -> Self {
        Self { budget, hot: false, idle_since: None }
    }

    /// Whether the client's last request came within the budget of the connection going
    /// idle (a client at queue depth 1).
    pub fn hot(&self) -> bool {
        self.hot
    }

    /// The connection has nothing in flight and waits for a request (if it was not already).
    pub fn went_idle(&mut self) {
        self.idle_since.get_or_insert_with(Instant::now);
    }

    /// The connection has nothing in flight and waits for a request, with no receive posted:
    /// when hot, calls `recv(2)` with `MSG_DONTWAIT` and `flags` into `buf` until it returns
    /// anything but `EAGAIN` (its result, or `-errno`) or the budget runs out (`None`, and the
    /// caller sleeps as usual).
    pub fn spin(&mut self, fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> Option<isize> {
        let start = *self.idle_since.get_or_insert_with(Instant::now);
        if !self.hot || self.budget.is_zero() {
            return None;
        }
        let _slot = Slot::take()?;
        loop {
            // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes for the whole call.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags | libc::MSG_DONTWAIT) };
            let res = crate::sys::result(n);
            if res != -(libc::EAGAIN as isize) && res != -(libc::EINTR as isize) {
                return Some(res);
            }
            if start.elapsed() >= self.budget {
                return None;
            }
            // Let whatever else wants this CPU (the client itself, often) run first.
            // SAFETY: sched_yield has no memory-safety preconditions.
            unsafe { libc::sched_yield() };
        }
    }

    /// A request arrived (spun for or slept for): the connection is hot if it came within the
    /// budget of the connection going idle.
    pub fn arrived(&mut self) {
        if let Some(t) = self.idle_since.take() {
            self.hot = !self.budget.is_zero() && t.elapsed() <= self.budget;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn spins_only_while_requests_come_within_the_budget() {
        let _one_at_a_time = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut p = IdlePoll::new(Duration::from_millis(200));
        let mut buf = [0u8; 8];
        // Cold: it does not spin, only notes when the connection went idle.
        assert_eq!(p.spin(b.as_raw_fd(), &mut buf, 0), None);
        a.write_all(b"x").unwrap();
        p.arrived();
        if max_spinning() == 0 {
            // One CPU: never spins, however hot.
            assert_eq!(p.spin(b.as_raw_fd(), &mut buf, 0), None);
            return;
        }
        assert!(p.hot());
        // Hot: the byte already there is returned at once, without blocking.
        assert_eq!(p.spin(b.as_raw_fd(), &mut buf, 0), Some(1));
        p.arrived();
        assert!(p.hot());
        // Data written while it spins is picked up.
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            a.write_all(b"yz").unwrap();
            a
        });
        assert_eq!(p.spin(b.as_raw_fd(), &mut buf, 0), Some(2));
        p.arrived();
        let a = t.join().unwrap();
        // Nothing comes: it gives up after the budget, and the late arrival cools it.
        let t0 = Instant::now();
        assert_eq!(p.spin(b.as_raw_fd(), &mut buf, 0), None);
        assert!(t0.elapsed() >= Duration::from_millis(200));
        std::thread::sleep(Duration::from_millis(10));
        p.arrived();
        assert!(!p.hot());
        // A closed peer ends the spin with end of file.
        drop(a);
        p.hot = true;
        assert_eq!(p.spin(b.as_raw_fd(), &mut buf, 0), Some(0));
    }

    #[test]
    fn a_zero_budget_never_spins() {
        let _one_at_a_time = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut p = IdlePoll::new(Duration::ZERO);
        a.write_all(b"x").unwrap();
        p.spin(b.as_raw_fd(), &mut [0u8; 1], 0);
        p.arrived();
        assert!(!p.hot());
        assert_eq!(p.spin(b.as_raw_fd(), &mut [0u8; 1], 0), None);
    }
}
