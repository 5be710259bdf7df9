//! Request and response header rewriting: hop-by-hop headers out, forwarding headers set by the
//! gateway (replacing whatever the client sent), everything end-to-end (`Host`, `Origin`,
//! `Cookie`, `Sec-Fetch-*`, XSRF headers) passed unchanged.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, BytesMut};
use hyper::HeaderMap;
use hyper::header::{self, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the non-standard ones proxies see in practice,
/// lower case (as `HeaderName::as_str` gives every name).
const HOP_BY_HOP: [&str; 9] = [
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

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

/// Forwarding headers a client could forge; the gateway replaces them. `X-Real-IP` and
/// `X-Scheme` are read by Tornado (JupyterHub, jupyter_server), so a client must not set them.
const FORWARDING: [&str; 7] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-real-ip",
    "x-scheme",
];

/// What a request loses before it goes to a VM: the hop-by-hop headers and the forwarding
/// headers the gateway sets itself, looked for in one pass over the request's headers.
const REQUEST_STRIPPED: [&str; HOP_BY_HOP.len() + FORWARDING.len()] = {
    let mut out = [""; HOP_BY_HOP.len() + FORWARDING.len()];
    let mut i = 0;
    while i < HOP_BY_HOP.len() {
        out[i] = HOP_BY_HOP[i];
        i += 1;
    }
    while i < out.len() {
        out[i] = FORWARDING[i - HOP_BY_HOP.len()];
        i += 1;
    }
    out
};

// A set keeps one bit per name.
const _: () = assert!(REQUEST_STRIPPED.len() <= 16);

/// `Connection`'s bit in the sets that strip the hop-by-hop headers: it comes first in
/// [`HOP_BY_HOP`], so in [`REQUEST_STRIPPED`] too.
const CONNECTION_BIT: u16 = 1;

/// The names of `list` as header names, made at compile time: a header removed by its text
/// would have that text parsed into a name first, about 250 instructions for every response
/// (which carries `Connection: keep-alive`).
const fn header_names<const N: usize>(list: [&'static str; N]) -> [HeaderName; N] {
    let mut out = [const { HeaderName::from_static("te") }; N];
    let mut i = 0;
    while i < N {
        // A `HeaderName` cannot be dropped at compile time; the placeholder holds nothing.
        std::mem::forget(std::mem::replace(
            &mut out[i],
            HeaderName::from_static(list[i]),
        ));
        i += 1;
    }
    out
}

static HOP_BY_HOP_HEADERS: [HeaderName; HOP_BY_HOP.len()] = header_names(HOP_BY_HOP);
static FORWARDING_HEADERS: [HeaderName; FORWARDING.len()] = header_names(FORWARDING);
static REQUEST_STRIPPED_HEADERS: [HeaderName; REQUEST_STRIPPED.len()] =
    header_names(REQUEST_STRIPPED);

/// A set of header names with a bit per name length (lengths of 63 and more share the last),
/// so most names present are told apart from all of them by one test.
struct Names {
    /// As text, to compare with the names present.
    names: &'static [&'static str],
    /// The same as header names, to remove them by.
    headers: &'static [HeaderName],
    lengths: u64,
}

impl Names {
    const fn new(names: &'static [&'static str], headers: &'static [HeaderName]) -> Self {
        assert!(names.len() == headers.len());
        let mut lengths = 0u64;
        let mut i = 0;
        while i < names.len() {
            lengths |= Self::bit(names[i].len());
            i += 1;
        }
        Self {
            names,
            headers,
            lengths,
        }
    }

    const fn bit(len: usize) -> u64 {
        1 << if len < 63 { len } else { 63 }
    }

    /// A bit per name of the set that `headers` has. This runs on every request and response,
    /// and most carry none or one of them: one pass over the names present (a length test
    /// rules out most, the text is compared for the rest).
    fn present(&self, headers: &HeaderMap) -> u16 {
        let mut present = 0u16;
        for key in headers.keys() {
            let key = key.as_str();
            if self.lengths & Self::bit(key.len()) == 0 {
                continue;
            }
            if let Some(i) = self.names.iter().position(|n| *n == key) {
                present |= 1 << i;
            }
        }
        present
    }

    /// Removes the names `present` has a bit for (a removal hashes, so only those found; the
    /// set bits are visited, not every name of the set).
    fn remove(&self, headers: &mut HeaderMap, present: u16) {
        let mut bits = present;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let Some(name) = self.headers.get(i) {
                headers.remove(name);
            }
        }
    }

    /// Removes every header of the set that `headers` has.
    fn remove_all(&self, headers: &mut HeaderMap) {
        let present = self.present(headers);
        self.remove(headers, present);
    }

    /// Removes every header of a set that starts with the hop-by-hop list, and those a
    /// `Connection` header names.
    fn strip(&self, headers: &mut HeaderMap) {
        debug_assert_eq!(self.names.first(), Some(&"connection"));
        let present = self.present(headers);
        if present & CONNECTION_BIT != 0 {
            remove_connection_tokens(headers);
        }
        self.remove(headers, present);
    }
}

static HOP_BY_HOP_NAMES: Names = Names::new(&HOP_BY_HOP, &HOP_BY_HOP_HEADERS);
static FORWARDING_NAMES: Names = Names::new(&FORWARDING, &FORWARDING_HEADERS);
static REQUEST_NAMES: Names = Names::new(&REQUEST_STRIPPED, &REQUEST_STRIPPED_HEADERS);

/// Removes the headers the `Connection` header names beyond the fixed hop-by-hop list.
/// `Connection: keep-alive`, `close` or `upgrade` (the usual values, and every response of
/// nginx or Tornado carries one) name nothing more; other tokens are rare, so they are
/// collected only when present. Read as bytes: a token that is not a header name (text beyond
/// ASCII among them) names nothing.
fn remove_connection_tokens(headers: &mut HeaderMap) {
    let mut extra: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.is_empty() || names_no_other_header(token) {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                extra.push(name);
            }
        }
    }
    for name in extra {
        headers.remove(name);
    }
}

/// A `Connection` token that names no header beyond the fixed hop-by-hop list: `close`, or one
/// of that list, in any case.
fn names_no_other_header(token: &[u8]) -> bool {
    token.eq_ignore_ascii_case(b"close")
        || HOP_BY_HOP
            .iter()
            .any(|h| h.as_bytes().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    HOP_BY_HOP_NAMES.strip(headers);
}

/// Removes what a request loses on its way to a VM, in one pass: the hop-by-hop headers (and
/// those the `Connection` header names) and the forwarding headers a client could forge, which
/// [`ConnForwarding::insert`] then sets.
pub fn strip_request(headers: &mut HeaderMap) {
    REQUEST_NAMES.strip(headers);
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

/// The forwarding headers' values for one client connection, made once when it opens: its
/// address, scheme and port do not change between its requests. Only `Forwarded` names the
/// request's host as well; it is made again when the host differs from the last request's
/// ([`ForwardedFor`]).
#[derive(Debug)]
pub struct ConnForwarding {
    /// `X-Forwarded-For`: the client's address (an IPv4-mapped IPv6 address as IPv4).
    for_value: HeaderValue,
    /// `X-Forwarded-Proto`.
    proto: HeaderValue,
    /// `X-Forwarded-Port`.
    port: HeaderValue,
    /// `Forwarded` without a host: `for=...;proto=...`.
    forwarded: HeaderValue,
}

/// The `Forwarded` value of the last host a connection's request named, and that host.
pub type ForwardedFor = Option<(HeaderValue, HeaderValue)>;

impl ConnForwarding {
    /// The values for connection `fwd`.
    pub fn new(fwd: &Forwarding) -> Self {
        let proto = if fwd.https { "https" } else { "http" };
        let ip = fwd.client.ip();
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        // An address (at most 39 characters) twice, `Forwarded`'s words, a port.
        let mut buf = BytesMut::with_capacity(2 * 39 + 20 + 5);
        // `write!` into a `BytesMut` cannot fail: it grows as needed.
        let _ = write!(buf, "{ip}");
        let for_value = buf.split();
        match ip {
            IpAddr::V4(_) => {
                buf.put_slice(b"for=");
                buf.put_slice(&for_value);
            }
            IpAddr::V6(_) => {
                buf.put_slice(b"for=\"[");
                buf.put_slice(&for_value);
                buf.put_slice(b"]\"");
            }
        }
        buf.put_slice(b";proto=");
        buf.put_slice(proto.as_bytes());
        let forwarded = buf.split();
        buf.put_slice(itoa::Buffer::new().format(fwd.port).as_bytes());
        // An address, the fixed words and a number: always valid header values.
        let value = |b: BytesMut| {
            HeaderValue::from_maybe_shared(b.freeze())
                .unwrap_or_else(|_| HeaderValue::from_static(""))
        };
        Self {
            for_value: value(for_value),
            proto: HeaderValue::from_static(proto),
            port: value(buf),
            forwarded: value(forwarded),
        }
    }

    /// Sets `X-Forwarded-For`, `-Proto`, `-Host`, `-Port` and `Forwarded` for `host` (the
    /// request's `Host`), replacing any the client sent. `last` keeps the `Forwarded` value
    /// made for the last host, for the connection's next request. The values are shared, not
    /// copied.
    pub fn set(
        &self,
        headers: &mut HeaderMap,
        host: Option<&HeaderValue>,
        last: &mut ForwardedFor,
    ) {
        FORWARDING_NAMES.remove_all(headers);
        self.insert(headers, host, last);
    }

    /// [`ConnForwarding::set`] for headers that have no forwarding header left (after
    /// [`strip_request`]).
    pub fn insert(
        &self,
        headers: &mut HeaderMap,
        host: Option<&HeaderValue>,
        last: &mut ForwardedFor,
    ) {
        // The host when it is a token host (ASCII, safe inside the quoted `Forwarded` value).
        let host = host.and_then(|h| Some((h, h.to_str().ok().filter(|t| is_token_host(t))?)));
        let forwarded = match (host, &*last) {
            (None, _) => self.forwarded.clone(),
            (Some((value, _)), Some((seen, forwarded))) if seen == value => forwarded.clone(),
            (Some((value, text)), _) => {
                let mut buf = BytesMut::with_capacity(self.forwarded.len() + text.len() + 8);
                buf.put_slice(self.forwarded.as_bytes());
                buf.put_slice(b";host=\"");
                buf.put_slice(text.as_bytes());
                buf.put_u8(b'"');
                match HeaderValue::from_maybe_shared(buf.freeze()) {
                    Ok(f) => {
                        *last = Some((value.clone(), f.clone()));
                        f
                    }
                    Err(_) => self.forwarded.clone(),
                }
            }
        };
        if let Some((value, _)) = host {
            headers.insert(X_FORWARDED_HOST.clone(), value.clone());
        }
        headers.insert(X_FORWARDED_FOR.clone(), self.for_value.clone());
        headers.insert(X_FORWARDED_PROTO.clone(), self.proto.clone());
        headers.insert(X_FORWARDED_PORT.clone(), self.port.clone());
        headers.insert(header::FORWARDED, forwarded);
    }
}

/// [`ConnForwarding::set`] for one request of connection `fwd`.
pub fn set_forwarding(headers: &mut HeaderMap, fwd: &Forwarding, host: Option<&HeaderValue>) {
    ConnForwarding::new(fwd).set(headers, host, &mut None);
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
        set_forwarding(
            &mut m,
            &fwd,
            Some(&HeaderValue::from_static("hub.example:8443")),
        );
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
        set_forwarding(&mut m, &v6, Some(&HeaderValue::from_static("bad\"host")));
        assert_eq!(get(&m, "forwarded"), "for=\"[2001:db8::1]\";proto=http");
        assert!(m.get("x-forwarded-host").is_none());
    }

    #[test]
    fn a_connection_reuses_its_forwarded_value_until_the_host_changes() {
        let conn = ConnForwarding::new(&Forwarding {
            client: "10.0.0.9:4000".parse().expect("addr"),
            https: false,
            port: 80,
        });
        let mut last = None;
        let hosts = [
            "a.example",
            "a.example",
            "b.example",
            "bad\"host",
            "b.example",
        ];
        for host in hosts {
            let mut m = h(&[("forwarded", "for=6.6.6.6"), ("x-forwarded-host", "evil")]);
            conn.set(&mut m, Some(&HeaderValue::from_static(host)), &mut last);
            let expected = if host.contains('"') {
                "for=10.0.0.9;proto=http".to_owned()
            } else {
                format!("for=10.0.0.9;proto=http;host=\"{host}\"")
            };
            assert_eq!(m["forwarded"], expected.as_str(), "host {host}");
            assert_eq!(m.get_all("forwarded").iter().count(), 1);
            assert_eq!(m["x-forwarded-for"], "10.0.0.9");
            assert_eq!(m["x-forwarded-port"], "80");
            match host.contains('"') {
                true => assert!(m.get("x-forwarded-host").is_none()),
                false => assert_eq!(m["x-forwarded-host"], host),
            }
        }
        let mut m = HeaderMap::new();
        conn.set(&mut m, None, &mut last);
        assert_eq!(m["forwarded"], "for=10.0.0.9;proto=http");
    }

    #[test]
    fn the_name_lists_are_header_names_as_hyper_spells_them() {
        for name in HOP_BY_HOP.iter().chain(&FORWARDING) {
            assert_eq!(HeaderName::from_static(name).as_str(), *name);
        }
        for set in [&HOP_BY_HOP_NAMES, &FORWARDING_NAMES, &REQUEST_NAMES] {
            let made: Vec<_> = set.headers.iter().map(HeaderName::as_str).collect();
            assert_eq!(made, set.names);
        }
        assert_eq!(HOP_BY_HOP[0], "connection", "CONNECTION_BIT");
        assert_eq!(REQUEST_STRIPPED[..HOP_BY_HOP.len()], HOP_BY_HOP);
        assert_eq!(REQUEST_STRIPPED[HOP_BY_HOP.len()..], FORWARDING);
    }

    #[test]
    fn a_request_loses_hop_by_hop_and_forged_forwarding_headers_in_one_pass() {
        let forged = [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("forwarded", "for=6.6.6.6"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil"),
            ("x-real-ip", "6.6.6.6"),
            ("x-scheme", "https"),
            ("cookie", "a=b"),
            ("host", "hub.example"),
        ];
        let mut m = h(&forged);
        strip_request(&mut m);
        let mut left: Vec<_> = m.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["cookie", "host"]);
        // The same as the two steps it replaces.
        let mut two_steps = h(&forged);
        strip_hop_by_hop(&mut two_steps);
        FORWARDING_NAMES.remove_all(&mut two_steps);
        assert_eq!(m, two_steps);
        // `Connection` naming a header the client relies on still removes it.
        let mut m = h(&[
            ("connection", "host"),
            ("host", "a.example"),
            ("accept", "*/*"),
        ]);
        strip_request(&mut m);
        assert_eq!(m.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"]);
        // Nothing to strip: nothing changes.
        let mut m = h(&[("host", "a.example"), ("cookie", "a=b")]);
        let before = m.clone();
        strip_request(&mut m);
        assert_eq!(m, before);
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
        // Empty tokens and one with bytes beyond ASCII name nothing; the token beside them
        // still goes, in a second `Connection` field too.
        let mut m = h(&[("x-a", "1"), ("x-b", "2"), ("x-c", "3")]);
        m.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b" ,x-a,, gr\xfcn ,").unwrap(),
        );
        m.append(header::CONNECTION, HeaderValue::from_static("UPGRADE, X-B"));
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
