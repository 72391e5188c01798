//! Failure injection for tests: a named step of the store (`"promote.syncfs"`, `"gc.delete"`,
//! …) fails once it has passed a given number of times. Outside tests every step passes and
//! the check compiles to nothing.

#[cfg(test)]
use std::collections::HashMap;
#[cfg(test)]
use std::path::PathBuf;
#[cfg(test)]
use std::sync::Mutex;

use super::error::StoreError;

/// The steps set to fail (tests only).
#[derive(Default)]
pub(crate) struct Faults {
    #[cfg(test)]
    after: Mutex<HashMap<&'static str, usize>>,
}

impl Faults {
    /// Passes step `at`, or fails it if it was set to fail now.
    #[cfg(test)]
    pub(crate) fn step(&self, at: &'static str) -> Result<(), StoreError> {
        let mut faults = self.after.lock().unwrap();
        match faults.get_mut(at) {
            Some(0) => Err(StoreError::Io {
                op: "injected fault",
                path: PathBuf::from(at),
                source: std::io::Error::other("injected"),
            }),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    #[cfg(not(test))]
    #[inline]
    pub(crate) fn step(&self, _at: &'static str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Makes step `at` fail after it has passed `after` times.
    #[cfg(test)]
    pub(crate) fn inject(&self, at: &'static str, after: usize) {
        self.after.lock().unwrap().insert(at, after);
    }

    /// Every step succeeds again.
    #[cfg(test)]
    pub(crate) fn clear(&self) {
        self.after.lock().unwrap().clear();
    }
}
