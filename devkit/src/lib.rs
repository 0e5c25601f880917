//! Real local components that `cutover demo`, the benchmarks and the tests
//! start on loopback, so none of them needs a mock: throwaway PostgreSQL
//! servers (and their streaming standbys) from the installed server
//! binaries, and a writer that numbers its writes, which is how a failover
//! is shown to lose nothing (or how much).
//!
//! Harness code: it reports with `anyhow` like the binaries and tests that
//! use it, and depends on nothing of cutover but `cutover-shared`, so the
//! agent's tests use it without building the coordinator.

#![forbid(unsafe_code)]

pub mod ports;
pub mod postgres;
pub mod sample_app;
pub mod writer;
