//! precedent: a host agent that protects HTTP APIs against sequential abuse.
//!
//! Modules follow the data: `capture` (XDP program and ring buffer) → `http` (request
//! parsing) → … → `enforce` (block maps) → `daemon` (the long-running process that wires the
//! stages together). `clock` converts between the kernel's clock and wall time.
pub mod capture;
pub mod clock;
pub mod daemon;
pub mod enforce;
pub mod http;
