//! Empty library target: lets `agent` list this crate as a build-dependency so cargo
//! rebuilds the agent when the XDP program changes (see aya-template).
#![no_std]
