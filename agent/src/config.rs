//! The daemon's configuration file (`/etc/precedent/precedent.toml`): TOML with serde
//! defaults, unknown keys rejected, and validation errors that name the key at fault.
//!
//! `precedent config check` runs exactly this validation without starting anything.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    capture::AttachMode,
    decide::{DecideConfig, Mode},
    discovery::DiscoveryConfig,
    engine::{Engine, EngineConfig},
    http::HttpConfig,
    model::{ModelConfig, SignalConfig},
    proxy::ProxyConfig,
    rules::{DenyRule, Rule, RuleFile},
    session::SessionConfig,
};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/precedent/precedent.toml";
pub const DEFAULT_SOCKET: &str = "/run/precedent/control.sock";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (what journald and log shippers want).
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `learn` (model only), `detect` (alerts), or `enforce` (alerts and blocks).
    pub mode: Mode,
    /// Interfaces to attach the XDP program to.
    pub interfaces: Vec<String>,
    /// `auto` (native XDP, generic where the driver lacks it), `native` or `generic`.
    pub attach_mode: AttachMode,
    /// Bytes of each request captured (request line and first headers), 1..=4096.
    pub capture_len: u32,
    /// Ring buffer between the kernel and the daemon, bytes (a power of two, >= 64 KiB).
    pub ring_buffer_bytes: u32,
    /// Only requests to these server ports are analysed (empty: all ports). The XDP program
    /// filters up to `agent_common::KERNEL_PORTS` of them itself; the daemon filters the rest.
    pub ports: Vec<u16>,
    /// Count a request only once the server's TCP stack acknowledged it (a TC egress program
    /// reports the acknowledgements): segments the stack drops (forged source addresses, bad
    /// checksums, data outside the window) are then never analysed. Turn off only where the
    /// server's replies leave through an interface precedent is not attached to.
    pub wait_for_acks: bool,
    /// Let IP fragments of TCP segments through. By default the XDP program drops them: no
    /// request can be read from a fragment, so a client that fragments its requests would
    /// have them served unread; TCP stacks send segments that fit the path with DF set, so
    /// only an evasion or a broken path fragments TCP. Counted (`tcp_fragments`) either way.
    pub pass_tcp_fragments: bool,
    /// Pin the block and allow maps in this bpffs directory so blocks survive restarts.
    pub pin_maps: Option<PathBuf>,
    /// Model, endpoints, runtime rules, blocks and the session-hashing secret live here.
    pub state_dir: PathBuf,
    /// How often state is saved (it is also saved at shutdown).
    #[serde(with = "crate::durations")]
    pub save_every: Duration,
    pub socket: PathBuf,
    /// Operational logs on stderr: `json` or `text`. Alerts are always JSON lines on stdout.
    pub log_format: LogFormat,
    /// Also print every captured request as a JSON line (`"kind":"request"`) on stdout, next
    /// to the alerts: for checking what precedent sees. Costly on a busy server.
    pub log_requests: bool,
    /// Serve the `status` counters as Prometheus text on `http://ADDR/metrics` (off when
    /// absent). Loopback addresses only: the endpoint has no authentication, so a scraper on
    /// another host goes through a local agent or proxy.
    pub metrics_listen: Option<SocketAddr>,
    /// An OpenAPI 3 document (JSON or YAML) whose paths become operation templates.
    pub openapi: Option<PathBuf>,
    pub http: HttpConfig,
    pub discovery: DiscoveryConfig,
    pub session: SessionConfig,
    pub model: ModelConfig,
    pub signals: SignalConfig,
    pub decide: DecideConfig,
    /// Clients (addresses or prefixes) that are never blocked.
    pub allowlist: Vec<IpNet>,
    /// Reverse proxies and load balancers whose requests name their client in a header.
    pub proxy: ProxyConfig,
    /// Precedence rules (`[[rule]]`).
    #[serde(rename = "rule", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// Sequences that must never happen (`[[deny]]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<DenyRule>,
}

impl Default for Config {
    fn default() -> Self {
        let engine = EngineConfig::default();
        Self {
            mode: Mode::Detect,
            interfaces: Vec::new(),
            attach_mode: AttachMode::Auto,
            capture_len: agent_common::CAPTURE_DEFAULT,
            ring_buffer_bytes: 4 << 20,
            ports: Vec::new(),
            wait_for_acks: true,
            pass_tcp_fragments: false,
            pin_maps: None,
            state_dir: PathBuf::from(crate::state::DEFAULT_STATE_DIR),
            save_every: Duration::from_secs(300),
            socket: PathBuf::from(DEFAULT_SOCKET),
            log_format: LogFormat::Json,
            log_requests: false,
            metrics_listen: None,
            openapi: None,
            http: engine.http,
            discovery: engine.discovery,
            session: engine.session,
            model: engine.model,
            signals: engine.signals,
            decide: engine.decide,
            allowlist: Vec::new(),
            proxy: engine.proxy,
            rules: Vec::new(),
            deny: Vec::new(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates TOML text; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks what serde cannot: ranges, and everything the engine would refuse at start-up.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            message,
        };
        if !(1..=agent_common::CAPTURE_MAX as u32).contains(&self.capture_len) {
            return Err(invalid(
                "capture_len",
                format!(
                    "{} is out of range 1..={}",
                    self.capture_len,
                    agent_common::CAPTURE_MAX
                ),
            ));
        }
        if !self.ring_buffer_bytes.is_power_of_two() || self.ring_buffer_bytes < 64 * 1024 {
            return Err(invalid(
                "ring_buffer_bytes",
                format!(
                    "{} must be a power of two of at least 65536",
                    self.ring_buffer_bytes
                ),
            ));
        }
        if self.save_every.is_zero() {
            return Err(invalid("save_every", "must be positive".into()));
        }
        if let Some(dup) = self
            .interfaces
            .iter()
            .enumerate()
            .find_map(|(i, a)| self.interfaces[..i].contains(a).then_some(a))
        {
            return Err(invalid("interfaces", format!("{dup} is listed twice")));
        }
        if self.ports.contains(&0) {
            return Err(invalid("ports", "port 0 is not a port".into()));
        }
        if let Some(addr) = self.metrics_listen
            && !addr.ip().is_loopback()
        {
            return Err(invalid(
                "metrics_listen",
                format!(
                    "{addr} is not a loopback address; the metrics endpoint has no \
                     authentication, so use 127.0.0.1:{port} or [::1]:{port}",
                    port = addr.port()
                ),
            ));
        }
        // Whoever is trusted may name any client and have it blocked: a whole range of the
        // internet trusted by a slip (0.0.0.0/0 for a /32) would hand that to everyone.
        if let Some(net) = self.proxy.trusted.iter().find(|n| match n {
            ipnet::IpNet::V4(n) => n.prefix_len() < 8,
            ipnet::IpNet::V6(n) => n.prefix_len() < 16,
        }) {
            return Err(invalid(
                "proxy.trusted",
                format!(
                    "{net} is wider than /8 (IPv4) or /16 (IPv6): list the proxies' own addresses or subnets"
                ),
            ));
        }
        self.model
            .validate()
            .map_err(|e| invalid("model", e.to_string()))?;
        self.decide.validate().map_err(|e| invalid("decide", e))?;
        // Building an engine checks rules, templates and cross-section constraints.
        let mut engine = Engine::new(&self.engine(), self.rule_file(), [0; 16], self.mode)
            .map_err(|e| {
                // The key names the table; the stage's own message follows, without the
                // engine's prefix for it ("discovery: discovery: ...").
                use crate::engine::EngineError;
                let (key, message) = match e {
                    EngineError::Rules(e) => ("rule", e.to_string()),
                    EngineError::Discovery(e) => ("discovery", e.to_string()),
                    EngineError::Model(e) => ("model", e.to_string()),
                    EngineError::Config(message) => ("session", message),
                };
                invalid(key, message)
            })?;
        // The OpenAPI document is imported as the daemon will import it, so a document it
        // would refuse at start (unreadable, not OpenAPI 3, too many templates) fails here.
        if let Some(p) = &self.openapi {
            let imported = std::fs::read_to_string(p)
                .map_err(|e| e.to_string())
                .and_then(|doc| engine.import_openapi(&doc).map_err(|e| e.to_string()));
            if let Err(e) = imported {
                return Err(invalid("openapi", format!("{}: {e}", p.display())));
            }
        }
        Ok(())
    }

    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            http: self.http.clone(),
            discovery: self.discovery.clone(),
            session: self.session.clone(),
            model: self.model.clone(),
            signals: self.signals.clone(),
            decide: self.decide.clone(),
            allowlist: self.allowlist.clone(),
            proxy: self.proxy.clone(),
        }
    }

    /// The rules written in the config file.
    pub fn rule_file(&self) -> RuleFile {
        RuleFile {
            rules: self.rules.clone(),
            deny: self.deny.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_means_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.mode, Mode::Detect);
    }

    #[test]
    fn the_shipped_config_file_is_valid() {
        let text = include_str!("../../dist/precedent.toml");
        let c = parse(text).unwrap_or_else(|e| panic!("dist/precedent.toml: {e}"));
        assert!(!c.interfaces.is_empty());
        // It says what the defaults are.
        assert!(!c.pass_tcp_fragments);
        assert_eq!(
            c.session.max_sessions_per_client,
            SessionConfig::default().max_sessions_per_client
        );
    }

    #[test]
    fn sections_and_rules_parse() {
        let c = parse(
            r#"
            mode = "enforce"
            interfaces = ["eth0", "eth1"]
            ports = [80, 8080]
            save_every = "1m"
            allowlist = ["10.0.0.0/8", "2001:db8::/32"]
            [session]
            idle_timeout = "5m"
            [decide]
            block_ttl = "1h"
            [[rule]]
            id = "transfer-needs-balance"
            operation = "POST /api/v1/transferFunds"
            preceded_by = ["GET /api/v1/accounts/{account_id}/balance"]
            action = "block"
            block_ttl = "15m"
            "#,
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Enforce);
        assert_eq!(c.session.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.rules.len(), 1);
        assert_eq!(c.allowlist.len(), 2);
    }

    #[test]
    fn metrics_are_off_by_default_and_take_loopback_addresses() {
        assert_eq!(parse("").unwrap().metrics_listen, None);
        for addr in ["127.0.0.1:9464", "127.0.0.2:1", "[::1]:9464"] {
            let c = parse(&format!("metrics_listen = \"{addr}\"")).unwrap();
            assert_eq!(c.metrics_listen, Some(addr.parse().unwrap()), "{addr}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = parse("interfacs = [\"eth0\"]").unwrap_err().to_string();
        assert!(e.contains("interfacs"), "{e}");
        let e = parse("[model]\nmax_ordr = 3").unwrap_err().to_string();
        assert!(e.contains("max_ordr"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("capture_len = 0", "capture_len"),
            ("capture_len = 5000", "capture_len"),
            ("ring_buffer_bytes = 1000", "ring_buffer_bytes"),
            ("save_every = \"soon\"", "save_every"),
            ("mode = \"panic\"", "mode"),
            ("interfaces = [\"eth0\", \"eth0\"]", "interfaces"),
            ("ports = [0]", "ports"),
            ("openapi = \"/nonexistent/api.yaml\"", "openapi"),
            ("allowlist = [\"10.0.0.0/33\"]", "allowlist"),
            ("[proxy]\ntrusted = [\"0.0.0.0/0\"]", "proxy.trusted"),
            ("[proxy]\ntrusted = [\"2000::/3\"]", "proxy.trusted"),
            ("[proxy]\nheader = \"via\"", "header"),
            ("[decide]\nmax_block_share = 2.0", "max_block_share"),
            (
                "[[rule]]\nid = \"r\"\noperation = \"transfer\"\npreceded_by = [\"GET /a\"]",
                "rule",
            ),
            ("[session]\nn_max = 3", "n_max"),
            ("metrics_listen = \"0.0.0.0:9464\"", "metrics_listen"),
            ("metrics_listen = \"[::]:9464\"", "metrics_listen"),
            ("metrics_listen = \"10.1.2.3:9464\"", "metrics_listen"),
            ("metrics_listen = \"localhost:9464\"", "metrics_listen"),
            ("metrics_listen = \"127.0.0.1\"", "metrics_listen"),
        ];
        for (text, key) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.contains(key),
                "{text:?} gave {e:?}, which does not name {key}"
            );
        }
    }

    #[test]
    fn the_openapi_document_is_imported_as_the_daemon_would() {
        let dir = tempfile::tempdir().unwrap();
        let doc = dir.path().join("api.json");
        let with = |text: &str| {
            std::fs::write(&doc, text).unwrap();
            parse(&format!("openapi = {:?}", doc.display().to_string()))
        };
        let good = r#"{"openapi":"3.0.0","info":{"title":"t","version":"1"},
            "paths":{"/accounts/{id}/balance":{"get":{"responses":{"200":{"description":"ok"}}}}}}"#;
        assert!(with(good).is_ok());
        for bad in ["{not json", r#"{"swagger":"2.0"}"#] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("openapi") && e.contains("api.json"), "{e}");
        }
    }

    /// What `main` prints: the error and its chain of sources (`{:#}`), each cause once.
    fn reported(e: ConfigError) -> String {
        format!("{:#}", anyhow::Error::from(e))
    }

    #[test]
    fn errors_say_their_cause_once() {
        let e = reported(Config::load(Path::new("/nonexistent/precedent.toml")).unwrap_err());
        assert_eq!(e.matches("No such file").count(), 1, "{e}");
        let e = reported(parse("[discovery]\ntemplates = [\"GET /a/{id\"]").unwrap_err());
        assert!(e.contains("discovery: template"), "{e}");
        assert_eq!(e.matches("discovery:").count(), 1, "{e}");
    }
}
