//! Durations in configuration and rule files: humantime strings such as "15m" or "1h 30m".
//! Use with `#[serde(with = "crate::durations")]`.
use std::time::Duration;

use serde::{Deserialize as _, Deserializer, Serializer};

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
}
