//! Helpers shared by the root integration tests that drive the agent's datapath directly.

use precedent::enforce::Block;

/// Each block as (network, packets dropped), in listing order.
pub fn dropped_by_block(blocks: &[Block]) -> Vec<(String, u64)> {
    blocks
        .iter()
        .map(|b| (b.net.to_string(), b.dropped))
        .collect()
}
