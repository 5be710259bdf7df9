//! A browser-like client: HTTPS (trusting the test CA) or HTTP, a cookie jar that honours
//! cookie paths (JupyterHub sets `_xsrf` for both `/hub/` and `/user/<name>/`), redirects,
//! server-sent events and websockets. One connection per request keeps it simple.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Bound for one request (a 50 MiB upload included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A websocket opened by a [`Browser`].
pub type WebSocket = WebSocketStream<Box<dyn AsyncReadWrite>>;

/// Object-safe stream for [`WebSocket`].
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

#[derive(Clone, Debug)]
struct Cookie {
    name: String,
    value: String,
    path: String,
}

/// A complete response.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A browser with its own cookies.
pub struct Browser {
    addr: SocketAddr,
    host: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    jar: Mutex<Vec<Cookie>>,
}

impl Browser {
    /// A browser for `https://localhost:<port>` on `addr`, trusting `tls` roots.
    pub fn https(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            addr,
            host: format!("localhost:{}", addr.port()),
            tls: Some(tls),
            jar: Mutex::new(Vec::new()),
        }
    }

    /// A browser for `http://127.0.0.1:<port>` on `addr` (no TLS).
    pub fn http(addr: SocketAddr) -> Self {
        Self {
            addr,
            host: format!("127.0.0.1:{}", addr.port()),
            tls: None,
            jar: Mutex::new(Vec::new()),
        }
    }

    /// The origin, e.g. `https://localhost:8443`.
    pub fn origin(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.host)
    }

    async fn connect(&self) -> Box<dyn AsyncReadWrite> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.addr));
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .unwrap_or_else(|e| panic!("TLS handshake with {}: {e}", self.addr));
                Box::new(tls)
            }
            None => Box::new(tcp),
        }
    }

    /// The `Cookie` header for `path`: matching cookies, longest path first.
    pub fn cookie_header(&self, path: &str) -> String {
        let path = path.split('?').next().unwrap_or("/");
        let mut jar: Vec<Cookie> = self
            .jar
            .lock()
            .expect("jar")
            .iter()
            .filter(|c| path_matches(&c.path, path))
            .cloned()
            .collect();
        jar.sort_by_key(|c| std::cmp::Reverse(c.path.len()));
        jar.iter()
            .map(|c| format!("{}={}", c.name, c.value))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The value of cookie `name` that a request to `path` would send.
    pub fn cookie(&self, name: &str, path: &str) -> Option<String> {
        let mut jar: Vec<Cookie> = self
            .jar
            .lock()
            .expect("jar")
            .iter()
            .filter(|c| c.name == name && path_matches(&c.path, path))
            .cloned()
            .collect();
        jar.sort_by_key(|c| std::cmp::Reverse(c.path.len()));
        jar.first().map(|c| c.value.clone())
    }

    /// Forgets every cookie (a new browser profile).
    pub fn clear_cookies(&self) {
        self.jar.lock().expect("jar").clear();
    }

    fn store_cookies(&self, request_path: &str, headers: &HeaderMap) {
        let mut jar = self.jar.lock().expect("jar");
        for v in headers.get_all("set-cookie") {
            let Ok(v) = v.to_str() else { continue };
            let mut parts = v.split(';');
            let Some((name, value)) = parts.next().and_then(|p| p.trim().split_once('=')) else {
                continue;
            };
            let default_path = request_path
                .split('?')
                .next()
                .and_then(|p| p.rfind('/').map(|i| &p[..i.max(1)]))
                .unwrap_or("/")
                .to_string();
            let mut path = default_path;
            let mut delete = false;
            for attr in parts {
                let attr = attr.trim();
                let (k, v) = attr.split_once('=').unwrap_or((attr, ""));
                match k.to_ascii_lowercase().as_str() {
                    "path" => path = v.to_string(),
                    "max-age" => delete |= v.trim().parse::<i64>().is_ok_and(|n| n <= 0),
                    "expires" => delete |= v.contains("1970"),
                    _ => {}
                }
            }
            jar.retain(|c| !(c.name == name && c.path == path));
            if !delete {
                jar.push(Cookie {
                    name: name.to_string(),
                    value: value.trim_matches('"').to_string(),
                    path,
                });
            }
        }
    }

    /// Sends a request and returns the response with its body still streaming (cookies are
    /// stored). `headers` are added to `Host`, `Cookie` and `User-Agent`.
    pub async fn send_streaming(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Response<Incoming> {
        let io = self.connect().await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .expect("HTTP handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .header("user-agent", "poolgate-tests browser");
        let cookies = self.cookie_header(path);
        if !cookies.is_empty() {
            req = req.header("cookie", cookies);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).expect("request");
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(req))
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no response within {REQUEST_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        self.store_cookies(path, resp.headers());
        resp
    }

    /// Sends a request and reads the whole response.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let resp = self
            .send_streaming(method, path, headers, body.into())
            .await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = tokio::time::timeout(REQUEST_TIMEOUT, resp.into_body().collect())
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: body not complete in time"))
            .unwrap_or_else(|e| panic!("{method} {path}: body: {e}"))
            .to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, &[], Bytes::new()).await
    }

    /// `GET path`, following redirects within this origin (10 at most); returns the last
    /// response and its path.
    pub async fn follow(&self, path: &str) -> (Reply, String) {
        let mut path = path.to_string();
        for _ in 0..10 {
            let r = self.get(&path).await;
            if !(300..400).contains(&r.status) {
                return (r, path);
            }
            let location = r
                .header("location")
                .expect("redirect has a Location")
                .to_string();
            path = match location.strip_prefix(&self.origin()) {
                Some(rest) => rest.to_string(),
                None if location.starts_with('/') => location,
                None => panic!("redirect out of the origin: {location}"),
            };
        }
        panic!("more than 10 redirects from {path}");
    }

    /// A POST of `fields` as `application/x-www-form-urlencoded`.
    pub async fn post_form(&self, path: &str, fields: &[(&str, &str)]) -> Reply {
        let body = fields
            .iter()
            .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let origin = self.origin();
        self.send(
            "POST",
            path,
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", &origin),
            ],
            body,
        )
        .await
    }

    /// A JSON API call with the XSRF token of `path` (cookie `_xsrf`) in `X-XSRFToken`, as
    /// JupyterLab sends it.
    pub async fn api(&self, method: &str, path: &str, json: Option<&serde_json::Value>) -> Reply {
        let xsrf = self.cookie("_xsrf", path).unwrap_or_default();
        let origin = self.origin();
        let body = json.map(|j| j.to_string()).unwrap_or_default();
        self.send(
            method,
            path,
            &[
                ("content-type", "application/json"),
                ("accept", "application/json"),
                ("x-xsrftoken", &xsrf),
                ("origin", &origin),
                ("sec-fetch-site", "same-origin"),
                ("sec-fetch-mode", "cors"),
            ],
            body,
        )
        .await
    }

    /// Starts a `python3` kernel on the Jupyter server under `prefix` (`""` for a plain
    /// jupyter_server, `/user/<name>` behind JupyterHub), asserting `201 Created`, and opens its
    /// channels websocket for the client session `session_id`, as a notebook tab does. Needs the
    /// `_xsrf` cookie a page load sets.
    pub async fn open_kernel(&self, prefix: &str, session_id: &str) -> WebSocket {
        let r = self
            .api(
                "POST",
                &format!("{prefix}/api/kernels"),
                Some(&serde_json::json!({"name": "python3"})),
            )
            .await;
        assert_eq!(r.status, 201, "start a kernel: {}", r.text());
        let kernel = r.json()["id"].as_str().expect("kernel id").to_string();
        self.websocket(&format!(
            "{prefix}/api/kernels/{kernel}/channels?session_id={session_id}"
        ))
        .await
    }

    /// Opens a websocket to `path` with this browser's cookies and `Origin`. Waits up to
    /// [`WEBSOCKET_HANDSHAKE`] for the answer.
    pub async fn websocket(&self, path: &str) -> WebSocket {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        let mut req = format!("{scheme}://{}{path}", self.host)
            .into_client_request()
            .expect("websocket request");
        let h = req.headers_mut();
        h.insert("origin", self.origin().parse().expect("origin"));
        let cookies = self.cookie_header(path);
        if !cookies.is_empty() {
            h.insert("cookie", cookies.parse().expect("cookie"));
        }
        let io = self.connect().await;
        let (ws, resp) = tokio::time::timeout(
            WEBSOCKET_HANDSHAKE,
            tokio_tungstenite::client_async(req, io),
        )
        .await
        .unwrap_or_else(|_| panic!("websocket {path}: no handshake within {WEBSOCKET_HANDSHAKE:?}"))
        .unwrap_or_else(|e| panic!("websocket {path}: {e}"));
        self.store_cookies(path, resp.headers());
        ws
    }
}

/// How long [`Browser::websocket`] waits for the handshake's answer. jupyter_server answers a
/// kernel's channels websocket only once the kernel has replied to `kernel_info`, or once its
/// `kernel_info_timeout` (60 s) has passed: kernels that start together on a busy machine can
/// take tens of seconds. The gateway gives a VM `http.response_header_timeout` (60 s by
/// default) and then answers 504 itself, so waiting longer than both shows which one was slow.
pub const WEBSOCKET_HANDSHAKE: Duration = Duration::from_secs(75);

/// Sends a text message.
pub async fn ws_send(ws: &mut WebSocket, text: String) {
    ws.send(Message::text(text)).await.expect("websocket send");
}

/// The next text message (or `None` when closed).
pub async fn ws_next_text(ws: &mut WebSocket) -> Option<String> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => return Some(t.to_string()),
            Ok(Message::Binary(b)) => return Some(String::from_utf8_lossy(&b).into_owned()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// The `execute_request` message that runs `code` in a kernel, with the message id `msg_id`
/// (its answers name it as their parent) in the client session `session`.
pub fn execute_request(code: &str, msg_id: &str, session: &str) -> serde_json::Value {
    serde_json::json!({
        "header": {"msg_id": msg_id, "username": "poolgate-test", "session": session,
                   "msg_type": "execute_request", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "buffers": [], "channel": "shell",
        "content": {"code": code, "silent": false, "store_history": true,
                    "user_expressions": {}, "allow_stdin": false, "stop_on_error": true},
    })
}

/// Runs `code` in the kernel behind an open kernel-channels websocket; returns the
/// `text/plain` of its `execute_result` (waits up to 60 s for it).
pub async fn run_code(ws: &mut WebSocket, code: &str, msg_id: &str) -> String {
    ws_send(ws, execute_request(code, msg_id, "s1").to_string()).await;
    loop {
        let text = tokio::time::timeout(Duration::from_secs(60), ws_next_text(ws))
            .await
            .expect("the kernel answers within 60 s")
            .expect("the kernel websocket is open");
        let msg: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        if msg["parent_header"]["msg_id"] == msg_id && msg["header"]["msg_type"] == "execute_result"
        {
            return msg["content"]["data"]["text/plain"]
                .as_str()
                .unwrap_or_default()
                .to_string();
        }
    }
}

/// Runs `code` in a new kernel of the Jupyter server at `prefix` (`""` or `/user/<name>`)
/// over the kernel websocket; returns the `text/plain` result once the kernel has also replied
/// `ok` (60 s at most for both).
pub async fn execute(b: &Browser, prefix: &str, code: &str) -> String {
    let session = "poolgate-test-session";
    let mut ws = b.open_kernel(prefix, session).await;
    let msg_id = "poolgate-exec-1";
    ws_send(&mut ws, execute_request(code, msg_id, session).to_string()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut result = None;
    let mut replied = false;
    while result.is_none() || !replied {
        let text = tokio::time::timeout_at(deadline, ws_next_text(&mut ws))
            .await
            .expect("kernel answered within 60 s")
            .expect("kernel websocket open");
        let msg: serde_json::Value = serde_json::from_str(&text).expect("kernel message JSON");
        if msg["parent_header"]["msg_id"] != msg_id {
            continue;
        }
        match msg["header"]["msg_type"].as_str() {
            Some("execute_result") => {
                result = msg["content"]["data"]["text/plain"]
                    .as_str()
                    .map(str::to_owned)
            }
            Some("execute_reply") => {
                assert_eq!(msg["content"]["status"], "ok", "{msg}");
                replied = true;
            }
            Some("error") => panic!("kernel error: {msg}"),
            _ => {}
        }
    }
    result.unwrap_or_default()
}

/// The VM a `poolgate_vm` affinity cookie names (its first field is base64url of the name).
pub fn cookie_vm(value: &str) -> String {
    let first = value.split('.').next().unwrap_or("");
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(first.as_bytes())
        .unwrap_or_else(|e| panic!("cookie {value:?}: {e}"));
    String::from_utf8(bytes).expect("UTF-8 VM name")
}

fn path_matches(cookie_path: &str, path: &str) -> bool {
    path == cookie_path
        || (path.starts_with(cookie_path)
            && (cookie_path.ends_with('/') || path[cookie_path.len()..].starts_with('/')))
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_paths_match_like_browsers() {
        assert!(path_matches("/", "/hub/login"));
        assert!(path_matches("/hub/", "/hub/login"));
        assert!(path_matches("/user/ann", "/user/ann/lab"));
        assert!(!path_matches("/user/ann", "/user/anna"));
        assert!(!path_matches("/hub/", "/user/ann/"));
        assert_eq!(urlencode("a b/?"), "a%20b%2F%3F");
    }

    #[test]
    fn jar_keeps_one_value_per_name_and_path() {
        let b = Browser::http("127.0.0.1:1".parse().expect("addr"));
        let mut h = HeaderMap::new();
        h.append("set-cookie", "_xsrf=hub; Path=/hub/".parse().expect("v"));
        h.append("set-cookie", "pg=1; Path=/; HttpOnly".parse().expect("v"));
        b.store_cookies("/hub/login", &h);
        let mut h = HeaderMap::new();
        h.append(
            "set-cookie",
            "_xsrf=user; Path=/user/ann/".parse().expect("v"),
        );
        h.append("set-cookie", "pg=2; Path=/".parse().expect("v"));
        b.store_cookies("/user/ann/lab", &h);
        assert_eq!(b.cookie("_xsrf", "/hub/api"), Some("hub".into()));
        assert_eq!(b.cookie("_xsrf", "/user/ann/api"), Some("user".into()));
        assert_eq!(b.cookie_header("/user/ann/api"), "_xsrf=user; pg=2");
        let mut h = HeaderMap::new();
        h.append("set-cookie", "pg=; Path=/; Max-Age=0".parse().expect("v"));
        b.store_cookies("/", &h);
        assert_eq!(b.cookie("pg", "/"), None);
    }
}
