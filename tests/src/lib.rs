//! Integration-test support: starting `siterep serve` and driving real NBD clients.
