//! precedent: a host agent that protects HTTP APIs against sequential abuse.
//!
//! Modules follow the data: `capture` (XDP program and ring buffer) → `http` (request
//! parsing) → `discovery` (path → operation) → `session` (per-client steps) → `rules`
//! (precedence and deny rules) → … → `enforce` (block maps) → `daemon` (the long-running
//! process that wires the stages together). `clock` converts the kernel's clock to wall time.
pub mod acked;
pub mod capture;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod decide;
pub mod discovery;
pub mod durations;
pub mod enforce;
pub mod engine;
pub mod graph;
pub mod http;
pub mod ifwatch;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod proxy;
pub mod reassemble;
pub mod replay;
pub mod rules;
pub mod session;
pub mod state;
