//! Request and response header rewriting: hop-by-hop headers out, forwarding headers set by the
//! gateway (replacing whatever the client sent), everything end-to-end (`Host`, `Origin`,
//! `Cookie`, `Sec-Fetch-*`, XSRF headers) passed unchanged.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use hyper::HeaderMap;
use hyper::header::{self, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the non-standard ones proxies see in practice.
/// Names, not strings: removing by `&str` parsed and hashed each name on every request.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

/// Forwarding headers a client could forge; the gateway replaces them. `X-Real-IP` and
/// `X-Scheme` are read by Tornado (JupyterHub, jupyter_server), so a client must not set them.
static FORWARDING: [HeaderName; 7] = [
    header::FORWARDED,
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-scheme"),
];

/// Removes every header named in `names` that `headers` has. Presence is checked by comparing
/// names (cheap) instead of removing each name (which hashes it): most requests carry none or
/// one of them.
fn remove_all(headers: &mut HeaderMap, names: &[HeaderName]) {
    for name in names {
        if headers.keys().any(|k| k == name) {
            headers.remove(name);
        }
    }
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // `Connection: keep-alive`, `close` or `upgrade` (the usual values) name nothing beyond the
    // fixed list; other tokens name headers to remove too.
    let extra: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.eq_ignore_ascii_case("close")
                && !HOP_BY_HOP
                    .iter()
                    .any(|h| h.as_str().eq_ignore_ascii_case(t))
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in extra {
        headers.remove(name);
    }
    remove_all(headers, &HOP_BY_HOP);
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
    remove_all(headers, &FORWARDING);
    let proto = if fwd.https { "https" } else { "http" };
    let ip = fwd.client.ip();
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    let ip_text = match ip {
        IpAddr::V4(v4) => ipv4_text(v4),
        IpAddr::V6(v6) => v6.to_string(),
    };
    let mut forwarded = String::with_capacity(64);
    match ip {
        IpAddr::V4(_) => {
            forwarded.push_str("for=");
            forwarded.push_str(&ip_text);
        }
        IpAddr::V6(_) => {
            forwarded.push_str("for=\"[");
            forwarded.push_str(&ip_text);
            forwarded.push_str("]\"");
        }
    }
    forwarded.push_str(";proto=");
    forwarded.push_str(proto);
    let set = |headers: &mut HeaderMap, name: &HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name.clone(), v);
        }
    };
    if let Some(host) = host.filter(|h| is_token_host(h)) {
        forwarded.push_str(";host=\"");
        forwarded.push_str(host);
        forwarded.push('"');
        set(headers, &X_FORWARDED_HOST, host);
    }
    set(headers, &X_FORWARDED_FOR, &ip_text);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    headers.insert(X_FORWARDED_PORT.clone(), HeaderValue::from(fwd.port));
    set(headers, &header::FORWARDED, &forwarded);
}

/// Dotted-quad text of `ip` (what `to_string` gives, without the formatting machinery: this
/// runs for every proxied request).
fn ipv4_text(ip: Ipv4Addr) -> String {
    let mut out = String::with_capacity(15);
    let mut digits = itoa::Buffer::new();
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(digits.format(octet));
    }
    out
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
    fn ipv4_text_is_dotted_quad() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.1.2.3",
            "255.255.255.255",
            "192.168.100.9",
        ] {
            let parsed: Ipv4Addr = ip.parse().expect("ip");
            assert_eq!(ipv4_text(parsed), ip);
        }
    }

    #[test]
    fn connection_tokens_are_stripped_and_unusual_ones_too() {
        let mut m = h(&[
            ("connection", "Keep-Alive, close"),
            ("keep-alive", "timeout=5"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut m);
        assert_eq!(m.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"]);
        let mut m = h(&[
            ("connection", "x-a,  X-B"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("x-c", "3"),
        ]);
        strip_hop_by_hop(&mut m);
        assert_eq!(m.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-c"]);
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
