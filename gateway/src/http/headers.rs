//! Request and response header rewriting: hop-by-hop headers out, forwarding headers set by the
//! gateway (replacing whatever the client sent), everything end-to-end (`Host`, `Origin`,
//! `Cookie`, `Sec-Fetch-*`, XSRF headers) passed unchanged.

use std::net::{IpAddr, SocketAddr};

use hyper::HeaderMap;
use hyper::header::{self, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the non-standard ones proxies see in practice.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Forwarding headers a client could forge; the gateway replaces them. `X-Real-IP` and
/// `X-Scheme` are read by Tornado (JupyterHub, jupyter_server), so a client must not set them.
const FORWARDING: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-real-ip",
    "x-scheme",
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// What the gateway knows about the client connection.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding {
    /// The client's address.
    pub client: SocketAddr,
    /// `https` or `http`.
    pub https: bool,
    /// The port the client connected to.
    pub port: u16,
}

/// Sets `X-Forwarded-For`, `-Proto`, `-Host`, `-Port` and `Forwarded` for `host` (the
/// request's `Host`), replacing any the client sent.
pub fn set_forwarding(headers: &mut HeaderMap, fwd: &Forwarding, host: Option<&str>) {
    for name in FORWARDING {
        headers.remove(*name);
    }
    let proto = if fwd.https { "https" } else { "http" };
    let ip = fwd.client.ip();
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    let mut forwarded = match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    };
    forwarded.push_str(";proto=");
    forwarded.push_str(proto);
    let set = |headers: &mut HeaderMap, name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    };
    if let Some(host) = host.filter(|h| is_token_host(h)) {
        forwarded.push_str(";host=\"");
        forwarded.push_str(host);
        forwarded.push('"');
        set(headers, "x-forwarded-host", host);
    }
    set(headers, "x-forwarded-for", &ip.to_string());
    set(headers, "x-forwarded-proto", proto);
    set(headers, "x-forwarded-port", &fwd.port.to_string());
    set(headers, "forwarded", &forwarded);
}

/// A host (or host:port) safe to put in a quoted `Forwarded` value.
fn is_token_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
}

/// Whether the request asks for a protocol upgrade (websocket) on HTTP/1.1.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        m
    }

    #[test]
    fn hop_by_hop_go_end_to_end_stay() {
        let mut m = h(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("cookie", "a=b"),
            ("origin", "https://hub.example"),
            ("sec-fetch-mode", "cors"),
            ("x-xsrftoken", "t"),
            ("host", "hub.example"),
        ]);
        strip_hop_by_hop(&mut m);
        let mut left: Vec<_> = m.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            ["cookie", "host", "origin", "sec-fetch-mode", "x-xsrftoken"]
        );
    }

    #[test]
    fn forwarding_headers_replace_the_clients() {
        let mut m = h(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "http"),
            ("x-scheme", "http"),
            ("x-real-ip", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        let fwd = Forwarding {
            client: "[::ffff:10.1.2.3]:5555".parse().expect("addr"),
            https: true,
            port: 8443,
        };
        set_forwarding(&mut m, &fwd, Some("hub.example:8443"));
        fn get<'a>(m: &'a HeaderMap, n: &str) -> &'a str {
            m.get(n).and_then(|v| v.to_str().ok()).unwrap_or("")
        }
        assert_eq!(get(&m, "x-forwarded-for"), "10.1.2.3");
        assert_eq!(get(&m, "x-forwarded-proto"), "https");
        assert_eq!(get(&m, "x-forwarded-host"), "hub.example:8443");
        assert_eq!(get(&m, "x-forwarded-port"), "8443");
        assert_eq!(
            get(&m, "forwarded"),
            "for=10.1.2.3;proto=https;host=\"hub.example:8443\""
        );
        assert!(m.get("x-scheme").is_none() && m.get("x-real-ip").is_none());
        assert_eq!(m.get_all("x-forwarded-for").iter().count(), 1);

        let v6 = Forwarding {
            client: "[2001:db8::1]:1".parse().expect("addr"),
            https: false,
            port: 80,
        };
        set_forwarding(&mut m, &v6, Some("bad\"host"));
        assert_eq!(get(&m, "forwarded"), "for=\"[2001:db8::1]\";proto=http");
        assert!(m.get("x-forwarded-host").is_none());
    }

    #[test]
    fn detects_upgrades() {
        assert!(wants_upgrade(&h(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket")
        ])));
        assert!(!wants_upgrade(&h(&[("upgrade", "websocket")])));
        assert!(!wants_upgrade(&h(&[("connection", "upgrade")])));
    }
}
