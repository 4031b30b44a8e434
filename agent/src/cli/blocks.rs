//! `precedent blocks list|add NET [--ttl D]|remove NET`.
use std::time::Duration;

use clap::{Args, Subcommand};
use ipnet::IpNet;
use precedent::control::{
    Request,
    api::{Ack, BlockRow},
};

use super::{ControlArgs, empty_note, secs, table};

#[derive(Args, Debug)]
pub struct BlocksArgs {
    #[command(subcommand)]
    pub command: BlocksCommand,
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Subcommand, Debug)]
pub enum BlocksCommand {
    /// Active blocks with time left and packets dropped.
    List,
    /// Drop traffic from an address or prefix (allowlisted ones are refused).
    Add {
        /// `192.0.2.7`, `198.51.100.0/24`, `2001:db8::/64`.
        #[arg(value_parser = parse_net)]
        net: IpNet,
        /// How long, e.g. `15m`, `2h`; default: the daemon's configured block TTL.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Lift a block at once.
    Remove {
        #[arg(value_parser = parse_net)]
        net: IpNet,
    },
}

/// A bare address means just that host (/32 or /128).
fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not an IP address or CIDR prefix"))
}

pub fn run(args: BlocksArgs) -> anyhow::Result<()> {
    match args.command {
        BlocksCommand::List => super::run(&args.control, Request::BlocksList, render_list),
        BlocksCommand::Add { net, ttl } => {
            if ttl.is_some_and(|t| t.is_zero()) {
                anyhow::bail!("--ttl must be positive");
            }
            super::run(&args.control, Request::BlocksAdd { net, ttl }, |a: Ack| {
                a.message
            })
        }
        BlocksCommand::Remove { net } => {
            super::run(&args.control, Request::BlocksRemove { net }, |a: Ack| {
                a.message
            })
        }
    }
}

fn render_list(rows: Vec<BlockRow>) -> String {
    if rows.is_empty() {
        return empty_note("active blocks");
    }
    let mut t = table(&["NET", "REMAINING", "DROPPED", "REASON"], &[2]);
    for r in rows {
        t.add_row(vec![
            r.net.to_string(),
            secs(r.remaining_secs),
            r.dropped.to_string(),
            r.reason.unwrap_or_default(),
        ]);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_addresses_become_host_prefixes() {
        assert_eq!(parse_net("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(
            parse_net("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert_eq!(parse_net("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert!(parse_net("example.com").is_err());
    }
}
