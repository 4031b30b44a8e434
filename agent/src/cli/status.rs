//! `precedent status`: mode, interfaces, uptime, model size and every counter.
use clap::Args;
use precedent::control::{Request, api::StatusReport};

use super::{ControlArgs, secs, table};

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub control: ControlArgs,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    super::run(&args.control, Request::Status, render)
}

fn render(s: StatusReport) -> String {
    let mut ifaces: Vec<String> = s
        .interfaces
        .iter()
        .map(|i| format!("{} ({})", i.name, i.attach_mode))
        .collect();
    ifaces.extend(
        s.interfaces_missing
            .iter()
            .map(|i| format!("{i} (MISSING: not protected)")),
    );
    let mut out = format!(
        "precedent {} (pid {}), up {}\n\
         mode:        {}{}\n\
         interfaces:  {}\n\
         model:       {} operations, {} contexts, {} bytes\n\
         endpoints:   {}\n\
         sessions:    {} live\n\
         blocks:      {} active\n{}",
        s.version,
        s.pid,
        secs(s.uptime_secs),
        s.mode,
        s.enforcement_suspended
            .as_deref()
            .map(|r| format!(" (enforcement suspended: {r})"))
            .unwrap_or_default(),
        if ifaces.is_empty() {
            "none".into()
        } else {
            ifaces.join(", ")
        },
        s.model.operations,
        s.model.contexts,
        s.model.bytes,
        s.endpoints,
        s.sessions_live,
        s.blocks_active,
        s.state_save_error
            .as_deref()
            .map(|e| format!("state:       SAVE FAILING: {e}\n"))
            .unwrap_or_default(),
    );
    let mut t = table(&["COUNTER", "VALUE"], &[1]);
    for (name, v) in &s.kernel_counters {
        t.add_row(vec![format!("kernel.{name}"), v.to_string()]);
    }
    for (name, v) in &s.userspace_counters {
        t.add_row(vec![format!("agent.{name}"), v.to_string()]);
    }
    for (name, v) in &s.alerts_by_signal {
        t.add_row(vec![format!("alerts.{name}"), v.to_string()]);
    }
    out.push('\n');
    out.push_str(&t.to_string());
    out
}
