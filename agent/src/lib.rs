//! precedent: a host agent that protects HTTP APIs against sequential abuse.
//!
//! Modules follow the data: `capture` (XDP ring buffer) → `http` (request parsing) → … →
//! `daemon` (the long-running process that wires the stages together).
pub mod capture;
pub mod daemon;
pub mod http;
pub mod model;
