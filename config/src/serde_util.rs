//! Serde helpers: human durations, ports and socket addresses with operator-friendly errors.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;

/// Hint appended to every duration error.
const DURATION_HINT: &str = r#"write it like "30s", "15m" or "1h 30m""#;

/// Parses a human duration such as `"5s"`, `"15m"` or `"1h 30m"`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    use humantime::DurationError as E;
    humantime::parse_duration(text.trim()).map_err(|e| {
        let why = match e {
            E::UnknownUnit { unit, .. } => format!(
                "unknown unit \"{unit}\" (units: ms, s, m, h, d; also sec, min, hours, days, weeks)"
            ),
            E::NumberExpected(_) => "every unit needs a number before it".to_owned(),
            E::Empty => "it is empty".to_owned(),
            other => other.to_string(),
        };
        format!("invalid duration \"{text}\": {why} ({DURATION_HINT})")
    })
}

/// Formats a duration the way [`parse_duration`] reads it back (`"1m 30s"`).
pub(crate) fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a duration string like \"30s\" or \"15m\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse_duration(v).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        Err(E::custom(format!(
            "expected a duration string, found the number {v} (write \"{v}s\" for seconds, or \"{v}m\" for minutes)"
        )))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Err(E::custom(format!(
            "expected a duration string, found the number {v} (write \"{v}s\" for seconds, or \"{v}m\" for minutes)"
        )))
    }
}

/// `#[serde(with = "duration")]` for `Duration` fields.
pub(crate) mod duration {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }
}

/// `#[serde(with = "opt_duration")]` for `Option<Duration>` fields (absent = `None`).
pub(crate) mod opt_duration {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        d.deserialize_any(DurationVisitor).map(Some)
    }
}

struct PortVisitor;

const PORT_RANGE: &str = "must be between 1 and 65535";

impl Visitor<'_> for PortVisitor {
    type Value = u16;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a port number between 1 and 65535")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u16, E> {
        u16::try_from(v).map_err(|_| E::custom(PORT_RANGE))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u16, E> {
        u16::try_from(v).map_err(|_| E::custom(PORT_RANGE))
    }
}

/// `deserialize_with` for port fields: out-of-range numbers read "must be between 1 and 65535".
/// Port 0 is accepted here and rejected by validation, so both paths give the same message.
pub(crate) fn port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    d.deserialize_any(PortVisitor)
}

/// `deserialize_with` for `Option<u16>` port fields.
pub(crate) fn opt_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    d.deserialize_any(PortVisitor).map(Some)
}

struct SocketAddrVisitor;

impl Visitor<'_> for SocketAddrVisitor {
    type Value = SocketAddr;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an address like \"0.0.0.0:2222\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<SocketAddr, E> {
        v.trim().parse().map_err(|_| {
            E::custom(format!(
                "invalid listen address \"{v}\" (write IP:PORT, e.g. \"0.0.0.0:2222\", \"127.0.0.1:9090\" or \"[::]:2222\"; host names are not resolved)"
            ))
        })
    }
}

/// `deserialize_with` for listener addresses.
pub(crate) fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    d.deserialize_any(SocketAddrVisitor)
}

struct ListenerOrOffVisitor;

impl Visitor<'_> for ListenerOrOffVisitor {
    type Value = Option<SocketAddr>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an address like \"0.0.0.0:8080\", or \"off\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<SocketAddr>, E> {
        if v.trim().eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        v.trim().parse().map(Some).map_err(|_| {
            E::custom(format!(
                "invalid listen address \"{v}\" (write IP:PORT, e.g. \"0.0.0.0:8080\", or \"off\" for no listener; host names are not resolved)"
            ))
        })
    }
}

/// `deserialize_with` for a listener that may be switched off (`"off"`).
pub(crate) fn listener_or_off<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    d.deserialize_any(ListenerOrOffVisitor)
}

/// `serialize_with` for a listener that may be switched off: the address, or `"off"`.
pub(crate) fn serialize_listener_or_off<S: serde::Serializer>(
    addr: &Option<SocketAddr>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match addr {
        Some(addr) => s.collect_str(addr),
        None => s.serialize_str("off"),
    }
}

/// `deserialize_with` for optional listener addresses.
pub(crate) fn opt_socket_addr<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    d.deserialize_any(SocketAddrVisitor).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(format_duration(Duration::from_secs(90)), "1m 30s");
        assert_eq!(format_duration(Duration::from_secs(12 * 3600)), "12h");
        let err = parse_duration("5 parsecs").unwrap_err();
        assert!(err.starts_with("invalid duration \"5 parsecs\""), "{err}");
        assert!(
            err.ends_with("(write it like \"30s\", \"15m\" or \"1h 30m\")"),
            "{err}"
        );
        assert!(parse_duration("5").is_err());
        assert_eq!(
            parse_duration("5 parsecs").unwrap_err(),
            "invalid duration \"5 parsecs\": unknown unit \"parsecs\" (units: ms, s, m, h, d; also sec, min, hours, days, weeks) (write it like \"30s\", \"15m\" or \"1h 30m\")"
        );
        assert!(parse_duration("").unwrap_err().contains("it is empty"));
    }

    #[test]
    fn durations_roundtrip() {
        for secs in [0, 1, 59, 61, 3599, 3600, 86_400 + 7] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        let d = Duration::from_millis(1500);
        assert_eq!(parse_duration(&format_duration(d)), Ok(d));
    }
}
