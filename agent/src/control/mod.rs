//! The control socket: a root-only unix socket where the CLI asks the running daemon for
//! status and listings and changes rules, blocks, mode and model.
//!
//! Protocol (version [`PROTOCOL_VERSION`]): one JSON request per connection, terminated by a
//! newline, at most [`MAX_REQUEST_BYTES`]; one JSON response line back, then the server closes.
//! `{"version":1,"cmd":"sequences","top":20}` → `{"version":1,"ok":true,"data":[...]}` or
//! `{"version":1,"ok":false,"error":"..."}`. The server only parses and forwards; the daemon's
//! engine owner answers each [`server::ControlRequest`].
use std::{path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

pub mod api;
pub mod client;
pub mod server;

pub use api::Mode;
pub use client::{ClientError, ControlClient};
pub use server::{ControlError, ControlRequest, ControlServer, Peer, ServerConfig};

pub const PROTOCOL_VERSION: u32 = 1;
pub const DEFAULT_SOCKET: &str = "/run/precedent/control.sock";
/// Requests are small (a rules file at most); anything larger is refused unread.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Listings are bounded by the daemon's caps; this only stops a runaway reply exhausting the CLI.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Upper bound for `top` and `limit`.
pub const MAX_ROWS: usize = 100_000;
pub const DEFAULT_TOP: usize = 20;
pub const DEFAULT_SESSIONS_LIMIT: usize = 50;
pub const DEFAULT_MIN_SCORE: f64 = 0.9;

/// A control request. On the wire it is an object with `cmd` naming the variant and a
/// `version` beside it (added by [`encode_request`], checked by [`decode_request`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Endpoints,
    Sequences {
        #[serde(default = "default_top")]
        top: usize,
    },
    Sessions {
        #[serde(default = "default_sessions_limit")]
        limit: usize,
    },
    /// Operations and their strongest transitions (`sequences`/`endpoints --format dot`):
    /// the daemon answers with `graph::build(&engine, view, top)`.
    Graph {
        view: crate::graph::GraphView,
        #[serde(default = "default_top")]
        top: usize,
    },
    RulesList,
    /// A TOML rules file (`[[rule]]` / `[[deny]]`) to add at run time.
    RulesAdd {
        toml: String,
    },
    RulesRemove {
        id: String,
    },
    RulesSuggest {
        #[serde(default = "default_min_score")]
        min_score: f64,
    },
    BlocksList,
    BlocksAdd {
        net: IpNet,
        /// `15m`, `1h30m`, ...; absent: the daemon's configured default TTL.
        #[serde(
            default,
            with = "opt_humantime",
            skip_serializing_if = "Option::is_none"
        )]
        ttl: Option<Duration>,
    },
    BlocksRemove {
        net: IpNet,
    },
    ModeGet,
    ModeSet {
        mode: Mode,
    },
    ModelSave,
    /// Load a model file; absent path: the state directory's copy.
    ModelLoad {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathBuf>,
    },
    ModelReset,
}

fn default_top() -> usize {
    DEFAULT_TOP
}
fn default_sessions_limit() -> usize {
    DEFAULT_SESSIONS_LIMIT
}
fn default_min_score() -> f64 {
    DEFAULT_MIN_SCORE
}

impl Request {
    /// The `cmd` name, for logs.
    pub fn cmd(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Endpoints => "endpoints",
            Request::Sequences { .. } => "sequences",
            Request::Sessions { .. } => "sessions",
            Request::Graph { .. } => "graph",
            Request::RulesList => "rules_list",
            Request::RulesAdd { .. } => "rules_add",
            Request::RulesRemove { .. } => "rules_remove",
            Request::RulesSuggest { .. } => "rules_suggest",
            Request::BlocksList => "blocks_list",
            Request::BlocksAdd { .. } => "blocks_add",
            Request::BlocksRemove { .. } => "blocks_remove",
            Request::ModeGet => "mode_get",
            Request::ModeSet { .. } => "mode_set",
            Request::ModelSave => "model_save",
            Request::ModelLoad { .. } => "model_load",
            Request::ModelReset => "model_reset",
        }
    }

    fn is_unit(&self) -> bool {
        matches!(
            self,
            Request::Status
                | Request::Endpoints
                | Request::RulesList
                | Request::BlocksList
                | Request::ModeGet
                | Request::ModelSave
                | Request::ModelReset
        )
    }

    /// Range checks serde cannot express.
    fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |m: String| Err(ProtocolError::Invalid(m));
        match self {
            Request::Sequences { top: n }
            | Request::Sessions { limit: n }
            | Request::Graph { top: n, .. }
                if *n == 0 || *n > MAX_ROWS =>
            {
                bad(format!("{} must be 1..={MAX_ROWS}, got {n}", self.cmd()))
            }
            Request::RulesSuggest { min_score } if !(0.0..=1.0).contains(min_score) => {
                bad(format!("min_score must be in 0..=1, got {min_score}"))
            }
            Request::BlocksAdd { ttl: Some(t), .. } if t.is_zero() => {
                bad("ttl must be positive".into())
            }
            _ => Ok(()),
        }
    }
}

/// A reply: `data` on success, `error` on failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// Success carrying `data` (one of the [`api`] types, a `Vec` of rows, ...).
    pub fn ok(data: impl Serialize) -> Response {
        match serde_json::to_value(data) {
            Ok(v) => Response {
                version: PROTOCOL_VERSION,
                ok: true,
                data: Some(v),
                error: None,
            },
            Err(e) => Response::error(format!("could not serialise the reply: {e}")),
        }
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response {
            version: PROTOCOL_VERSION,
            ok: false,
            data: None,
            error: Some(message.into()),
        }
    }

    /// `data` (null when absent), or the daemon's error message.
    pub fn into_result(self) -> Result<Value, String> {
        if self.ok {
            Ok(self.data.unwrap_or(Value::Null))
        } else {
            Err(self
                .error
                .unwrap_or_else(|| "the daemon reported an error without a message".into()))
        }
    }

    /// `data` decoded as `T`, or the daemon's error message.
    pub fn into_data<T: DeserializeOwned>(self) -> Result<T, String> {
        let v = self.into_result()?;
        serde_json::from_value(v).map_err(|e| format!("unexpected reply from the daemon: {e}"))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("request is not valid JSON: {0}")]
    Json(String),
    #[error("request must be a JSON object with \"cmd\" and \"version\"")]
    NotAnObject,
    #[error("request has no \"version\"; this daemon speaks control protocol {PROTOCOL_VERSION}")]
    MissingVersion,
    #[error(
        "control protocol version {found} is not supported; this daemon speaks version {PROTOCOL_VERSION} (use the precedent binary that matches the daemon)"
    )]
    UnsupportedVersion { found: String },
    #[error("bad request: {0}")]
    Invalid(String),
}

/// The request as one JSON line (with the trailing newline).
pub fn encode_request(req: &Request) -> Vec<u8> {
    let mut v = serde_json::to_value(req).expect("requests always serialise");
    if let Value::Object(m) = &mut v {
        m.insert("version".into(), Value::from(PROTOCOL_VERSION));
    }
    let mut out = serde_json::to_vec(&v).expect("a Value always serialises");
    out.push(b'\n');
    out
}

/// Parses one request line (trailing newline optional). The version is checked before the
/// command, so an old or new client gets a version error rather than a confusing field error.
pub fn decode_request(line: &[u8]) -> Result<Request, ProtocolError> {
    let v: Value = serde_json::from_slice(line).map_err(|e| ProtocolError::Json(e.to_string()))?;
    let Value::Object(mut m) = v else {
        return Err(ProtocolError::NotAnObject);
    };
    check_version(&mut m)?;
    // serde's deny_unknown_fields does not cover unit variants of internally tagged enums,
    // so `{"cmd":"status","force":true}` would pass silently; catch it here.
    let extra: Vec<String> = m.keys().filter(|k| *k != "cmd").cloned().collect();
    let req: Request = serde_json::from_value(Value::Object(m))
        .map_err(|e| ProtocolError::Invalid(e.to_string()))?;
    if req.is_unit() && !extra.is_empty() {
        return Err(ProtocolError::Invalid(format!(
            "unknown field `{}`: {} takes no arguments",
            extra[0],
            req.cmd()
        )));
    }
    req.validate()?;
    Ok(req)
}

fn check_version(m: &mut Map<String, Value>) -> Result<(), ProtocolError> {
    match m.remove("version") {
        None => Err(ProtocolError::MissingVersion),
        Some(Value::Number(n)) if n.as_u64() == Some(PROTOCOL_VERSION as u64) => Ok(()),
        Some(other) => Err(ProtocolError::UnsupportedVersion {
            found: other.to_string(),
        }),
    }
}

/// The response as one JSON line.
pub fn encode_response(resp: &Response) -> Vec<u8> {
    let mut out = serde_json::to_vec(resp).unwrap_or_else(|e| {
        serde_json::to_vec(&Response::error(format!(
            "could not serialise the reply: {e}"
        )))
        .expect("an error response always serialises")
    });
    out.push(b'\n');
    out
}

mod opt_humantime {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&humantime::format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Status,
            Request::Endpoints,
            Request::Sequences { top: 5 },
            Request::Sessions { limit: 7 },
            Request::Graph {
                view: crate::graph::GraphView::Transitions,
                top: 30,
            },
            Request::RulesList,
            Request::RulesAdd {
                toml: "[[rule]]\nid = \"a\"\n".into(),
            },
            Request::RulesRemove { id: "a".into() },
            Request::RulesSuggest { min_score: 0.8 },
            Request::BlocksList,
            Request::BlocksAdd {
                net: "10.0.0.0/8".parse().unwrap(),
                ttl: Some(Duration::from_secs(900)),
            },
            Request::BlocksAdd {
                net: "2001:db8::1/128".parse().unwrap(),
                ttl: None,
            },
            Request::BlocksRemove {
                net: "192.0.2.7/32".parse().unwrap(),
            },
            Request::ModeGet,
            Request::ModeSet {
                mode: Mode::Enforce,
            },
            Request::ModelSave,
            Request::ModelLoad {
                path: Some("/tmp/m.state".into()),
            },
            Request::ModelLoad { path: None },
            Request::ModelReset,
        ]
    }

    #[test]
    fn every_request_round_trips() {
        for req in all_requests() {
            let line = encode_request(&req);
            assert_eq!(line.last(), Some(&b'\n'));
            assert!(!line[..line.len() - 1].contains(&b'\n'), "one line");
            assert_eq!(
                decode_request(&line).unwrap(),
                req,
                "{}",
                String::from_utf8_lossy(&line)
            );
        }
    }

    #[test]
    fn wire_format_is_the_documented_one() {
        let line = encode_request(&Request::Sequences { top: 3 });
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"version": 1, "cmd": "sequences", "top": 3})
        );
        let v: Value = serde_json::from_slice(&encode_request(&Request::BlocksAdd {
            net: "10.1.2.3/32".parse().unwrap(),
            ttl: Some(Duration::from_secs(15 * 60)),
        }))
        .unwrap();
        assert_eq!(v["ttl"], "15m");
        let r: Value = serde_json::from_slice(&encode_response(&Response::ok(42))).unwrap();
        assert_eq!(r, serde_json::json!({"version": 1, "ok": true, "data": 42}));
        let r: Value = serde_json::from_slice(&encode_response(&Response::error("nope"))).unwrap();
        assert_eq!(
            r,
            serde_json::json!({"version": 1, "ok": false, "error": "nope"})
        );
    }

    #[test]
    fn defaults_apply_to_omitted_fields() {
        let r = decode_request(br#"{"version":1,"cmd":"sequences"}"#).unwrap();
        assert_eq!(r, Request::Sequences { top: DEFAULT_TOP });
        let r = decode_request(br#"{"version":1,"cmd":"rules_suggest"}"#).unwrap();
        assert_eq!(
            r,
            Request::RulesSuggest {
                min_score: DEFAULT_MIN_SCORE
            }
        );
        let r = decode_request(br#"{"version":1,"cmd":"blocks_add","net":"10.0.0.1/32"}"#).unwrap();
        assert!(matches!(r, Request::BlocksAdd { ttl: None, .. }));
    }

    #[test]
    fn version_is_required_and_checked_first() {
        assert_eq!(
            decode_request(br#"{"cmd":"status"}"#),
            Err(ProtocolError::MissingVersion)
        );
        let e = decode_request(br#"{"version":2,"cmd":"no_such_thing"}"#).unwrap_err();
        assert_eq!(e, ProtocolError::UnsupportedVersion { found: "2".into() });
        assert!(e.to_string().contains("version 2 is not supported"), "{e}");
        assert!(matches!(
            decode_request(br#"{"version":"1","cmd":"status"}"#),
            Err(ProtocolError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn malformed_requests_are_rejected_with_a_reason() {
        assert!(matches!(
            decode_request(b"{not json"),
            Err(ProtocolError::Json(_))
        ));
        assert_eq!(decode_request(b"[1,2]"), Err(ProtocolError::NotAnObject));
        let e = decode_request(br#"{"version":1,"cmd":"reboot"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `reboot`"), "{e}");
        let e = decode_request(br#"{"version":1,"cmd":"status","extra":1}"#).unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        let e = decode_request(br#"{"version":1,"cmd":"sequences","top":1,"x":1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `x`"), "{e}");
        let e =
            decode_request(br#"{"version":1,"cmd":"blocks_add","net":"not-a-net"}"#).unwrap_err();
        assert!(matches!(e, ProtocolError::Invalid(_)), "{e}");
        let e =
            decode_request(br#"{"version":1,"cmd":"blocks_add","net":"10.0.0.1/32","ttl":"soon"}"#)
                .unwrap_err();
        assert!(matches!(e, ProtocolError::Invalid(_)), "{e}");
        let e = decode_request(br#"{"version":1,"cmd":"mode_set","mode":"panic"}"#).unwrap_err();
        assert!(e.to_string().contains("panic"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        for line in [
            &br#"{"version":1,"cmd":"sequences","top":0}"#[..],
            br#"{"version":1,"cmd":"sessions","limit":100000000}"#,
            br#"{"version":1,"cmd":"rules_suggest","min_score":1.5}"#,
            br#"{"version":1,"cmd":"blocks_add","net":"10.0.0.1/32","ttl":"0s"}"#,
        ] {
            assert!(
                matches!(decode_request(line), Err(ProtocolError::Invalid(_))),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn response_helpers_decode_typed_data_and_errors() {
        let report = api::ModeReport {
            mode: Mode::Detect,
            previous: Some(Mode::Learn),
        };
        let line = encode_response(&Response::ok(report));
        let resp: Response = serde_json::from_slice(&line).unwrap();
        assert_eq!(resp.into_data::<api::ModeReport>().unwrap(), report);
        let resp: Response =
            serde_json::from_slice(&encode_response(&Response::error("no rule with id x")))
                .unwrap();
        assert_eq!(
            resp.into_data::<api::ModeReport>().unwrap_err(),
            "no rule with id x"
        );
    }

    #[test]
    fn api_payloads_round_trip_through_json() {
        use std::time::UNIX_EPOCH;
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let endpoint = api::EndpointRow {
            operation: "GET /api/v1/accounts/{id}".into(),
            count: 3,
            source: Some("learned".into()),
        };
        let v = serde_json::to_value(&endpoint).unwrap();
        assert_eq!(v["operation"], "GET /api/v1/accounts/{id}");
        assert_eq!(
            serde_json::from_value::<api::EndpointRow>(v).unwrap(),
            endpoint
        );

        let session = api::SessionRow {
            key: "3fa2c1".into(),
            client: "192.0.2.1".parse().unwrap(),
            steps: 4,
            last_operation: None,
            last_seen: t,
            surprise: 2.5,
        };
        let v = serde_json::to_value(&session).unwrap();
        assert_eq!(
            serde_json::from_value::<api::SessionRow>(v).unwrap(),
            session
        );

        let status = api::StatusReport {
            version: "0.1.0".into(),
            pid: 1,
            mode: Mode::Learn,
            uptime_secs: 5,
            interfaces: vec![api::InterfaceStatus {
                name: "eth0".into(),
                ifindex: 2,
                attach_mode: crate::capture::AttachMode::Native,
            }],
            kernel_counters: [("passed".to_string(), 10)].into(),
            userspace_counters: [("engine_overflow".to_string(), 0)].into(),
            model: api::ModelSize::default(),
            endpoints: 0,
            sessions_live: 0,
            requests_waiting: 0,
            blocks_active: 0,
            alerts_by_signal: Default::default(),
            enforcement_suspended: None,
            interfaces_missing: Vec::new(),
            state_save_error: None,
        };
        let v = serde_json::to_value(&status).unwrap();
        assert_eq!(v["interfaces"][0]["attach_mode"], "native");
        assert_eq!(
            serde_json::from_value::<api::StatusReport>(v).unwrap(),
            status
        );
    }

    #[test]
    fn mode_parses_and_prints() {
        for m in Mode::ALL {
            assert_eq!(m.to_string().parse::<Mode>().unwrap(), m);
        }
        assert!("enforcing".parse::<Mode>().is_err());
    }
}
