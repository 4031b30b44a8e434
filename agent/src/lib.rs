//! precedent: a host agent that protects HTTP APIs against sequential abuse.
//!
//! Modules follow the data: `capture` (XDP ring buffer) → `http` (request parsing) →
//! `discovery` (path → operation) → `session` (per-client steps) → `rules` (precedence and
//! deny rules) → … → `daemon` (the long-running process that wires the stages together).
pub mod capture;
pub mod daemon;
pub mod discovery;
pub mod http;
pub mod rules;
pub mod session;
