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

#[cfg(test)]
mod tests {
    use super::*;
    use precedent::{
        capture::AttachMode,
        control::api::{InterfaceStatus, Mode, ModelSize},
    };

    #[test]
    fn missing_interfaces_and_failing_saves_stand_out() {
        let mut s = StatusReport {
            version: "0.1.0".into(),
            pid: 1,
            mode: Mode::Enforce,
            uptime_secs: 5,
            interfaces: vec![InterfaceStatus {
                name: "eth0".into(),
                ifindex: 2,
                attach_mode: AttachMode::Native,
            }],
            interfaces_missing: vec!["eth1".into()],
            state_save_error: Some("state directory /var/lib/precedent is full".into()),
            kernel_counters: Default::default(),
            userspace_counters: Default::default(),
            model: ModelSize::default(),
            endpoints: 0,
            sessions_live: 0,
            requests_waiting: 0,
            blocks_active: 0,
            alerts_by_signal: Default::default(),
            enforcement_suspended: None,
        };
        let out = render(s.clone());
        assert!(
            out.contains("interfaces:  eth0 (native), eth1 (MISSING: not protected)"),
            "{out}"
        );
        assert!(
            out.contains("state:       SAVE FAILING: state directory /var/lib/precedent is full"),
            "{out}"
        );
        s.interfaces_missing.clear();
        s.state_save_error = None;
        let out = render(s);
        assert!(!out.contains("MISSING") && !out.contains("state:"), "{out}");
    }
}
