//! One attempt of a request on one VM (plain, or an upgrade), and what follows a failed one:
//! send again once after a broken keep-alive connection, another VM when this one cannot be
//! reached and the request can be replayed, else the final error page.

use super::super::body::Slot;
use super::*;

/// Methods a proxy may send again after the connection broke without an answer (idempotent,
/// RFC 9110 §9.2.2), as nginx's `proxy_next_upstream` does; POST and PATCH never are.
pub(super) fn resend_safe(method: &hyper::Method) -> bool {
    use hyper::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// How one attempt on one VM ended, when it did not produce a response.
pub(super) enum Attempt {
    /// Could not connect: try another VM (the body is back when it was never read).
    Unreachable(String, Option<Body>),
    /// The connection broke before any answer, on a request that is safe to send again (an
    /// idempotent method whose body was never read): typically a pooled keep-alive connection
    /// the VM closed (or died under) just as the request went out. Sent once more; a second
    /// break counts as [`Attempt::Unreachable`].
    Broken(String, Option<Body>),
    /// Gave up with this error.
    Fail(GatewayError),
    /// The client's request was at fault (its body could not be read): no VM is blamed.
    Client(GatewayError),
}

/// What the attempts of one request have seen so far.
#[derive(Default)]
pub(super) struct Tries {
    /// VMs that could not be reached.
    pub(super) tried: Vec<String>,
    /// The last of those failures (the answer when no VM is left).
    pub(super) last_failure: Option<GatewayError>,
    /// The request was already sent again after a broken keep-alive connection.
    pub(super) resent: bool,
}

/// An error reading the client's request body (bad chunked framing, the client went away): the
/// client's fault, not the VM's. Wrapped around body errors so it can be told apart from the
/// VM's errors in the client error chain.
#[derive(Debug)]
pub(super) struct ClientBodyError(pub(super) BoxError);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reading the request body from the client: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The client body error behind `e`, if that is what made it fail.
pub(super) fn client_body_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a ClientBodyError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<ClientBodyError>() {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

/// An error and its sources on one line.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

impl Frontend {
    /// One attempt of a plain request: [`Self::plain_request`] sent, then
    /// [`Self::plain_outcome`].
    pub(super) async fn attempt_plain(
        &self,
        out: &mut Outbound,
        name: &str,
        authority: Arc<str>,
        kept: Option<&Arc<Kept>>,
        headers: HeaderMap,
    ) -> Result<(Response<Driven>, Instant), Attempt> {
        let (slot, up) = self.plain_request(out, headers);
        let started = Instant::now();
        let sent = tokio::time::timeout(
            self.inner.settings.response_header_timeout,
            self.inner.upstreams.send(authority, kept, up),
        )
        .await
        .map_err(|_| TimedOut);
        self.plain_outcome(out, name, &slot, sent)
            .map(|resp| (resp, started))
    }

    /// A plain request for one VM, with `headers`, to send with [`Upstreams::send`] (the caller
    /// keeps `response_header_timeout`). The body goes to the VM through a [`Handoff`], so it
    /// comes back (from the slot) for another VM when this one never read it.
    ///
    /// The request is returned rather than the sending future: a future returned (and then
    /// pinned) is copied whole each time, about 250 instructions per request (callgrind).
    pub(super) fn plain_request(
        &self,
        out: &mut Outbound,
        headers: HeaderMap,
    ) -> (Slot, Request<Handoff>) {
        let (slot, handoff) = match out.body.take() {
            Some(body) if !body.is_end_stream() => Handoff::new(body),
            _ => Handoff::bodiless(),
        };
        let mut up = Request::new(handoff);
        *up.method_mut() = out.method.clone();
        *up.uri_mut() = Uri::from(out.target.clone());
        *up.headers_mut() = headers;
        *up.version_mut() = Version::HTTP_11;
        (slot, up)
    }

    /// What an attempt's send came to: the response, or why there is none.
    pub(super) fn plain_outcome(
        &self,
        out: &Outbound,
        name: &str,
        slot: &Slot,
        sent: Result<Result<Response<Driven>, SendError>, TimedOut>,
    ) -> Result<Response<Driven>, Attempt> {
        let inner = &self.inner;
        match sent {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(SendError::Connect(detail))) => {
                Err(Attempt::Unreachable(detail, Handoff::take_back(slot)))
            }
            Ok(Err(SendError::Http(e))) if client_body_error(&e).is_some() => {
                Err(Attempt::Client(GatewayError::Refused {
                    status: StatusCode::BAD_REQUEST,
                    detail: client_body_error(&e)
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                }))
            }
            Ok(Err(SendError::Http(e))) => match Handoff::take_back(slot) {
                Some(back) if resend_safe(&out.method) => {
                    Err(Attempt::Broken(error_chain(&e), Some(back)))
                }
                _ => Err(Attempt::Fail(GatewayError::VmFailed {
                    vm: name.to_owned(),
                    detail: error_chain(&e),
                })),
            },
            Err(_) => Err(Attempt::Fail(GatewayError::Timeout {
                vm: name.to_owned(),
                after: inner.settings.response_header_timeout,
            })),
        }
    }

    /// One attempt of an upgrade (websocket): the VM's `101` is relayed and the two upgraded
    /// streams joined. The client's side of the upgrade comes back when the VM cannot be
    /// reached, for another VM.
    pub(super) async fn attempt_upgrade(
        &self,
        out: &mut Outbound,
        client: &ClientConn,
        name: &str,
        authority: &str,
        mut headers: HeaderMap,
    ) -> Result<(Response<Body>, Instant), Attempt> {
        let inner = &self.inner;
        let (Some(on_client), Some(proto)) = (out.client_upgrade.take(), out.upgrade_proto.clone())
        else {
            return self
                .attempt_plain(out, name, authority.into(), None, headers)
                .await
                .map(|(resp, started)| (resp.map(BodyExt::boxed_unsync), started));
        };
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto);
        let mut up = Request::new(empty());
        *up.method_mut() = out.method.clone();
        *up.headers_mut() = headers;
        *up.version_mut() = Version::HTTP_11;
        *up.uri_mut() = Uri::from(out.target.clone());
        let metrics = inner.metrics.clone();
        let pool = inner.pool.clone();
        let pin = out.pin.clone();
        let vm_name = name.to_owned();
        // An open websocket (kernel, terminal) holds a session of its VM for as long as it is
        // open, whatever `http.session_idle` says: a notebook in a background tab holds nothing
        // else. A pinned browser's websocket holds the browser's own session there (no load of
        // its own), so one user is one session however many kernels and terminals it opens.
        // The guard lives in `on_done`: dropped with it when the VM does not switch protocols,
        // else held by the relay until the stream ends.
        let session_key = out.pin.as_deref().map(|pin| pin.session.as_str());
        let open_session = inner.pool.http_open(name, session_key, None);
        let on_done = move |up: u64, down: u64| {
            let _open_session = open_session;
            metrics.bytes(Protocol::Http, &vm_name, up, down);
            if let Some(pin) = pin {
                pool.http_add_bytes(&pin.session, up, down);
            }
        };
        let started = Instant::now();
        // Not boxed here: the caller boxes this whole attempt.
        match upgrade::forward(
            client.span(),
            authority,
            up,
            on_client,
            inner.settings.connect_timeout,
            inner.settings.response_header_timeout,
            on_done,
        )
        .await
        {
            Ok(resp) => Ok((resp.map(|b| b.map_err(Into::into).boxed_unsync()), started)),
            Err(UpgradeError::Connect(detail, on_client)) => {
                out.client_upgrade = Some(on_client);
                Err(Attempt::Unreachable(detail, None))
            }
            Err(UpgradeError::Timeout) => Err(Attempt::Fail(GatewayError::Timeout {
                vm: name.to_owned(),
                after: inner.settings.response_header_timeout,
            })),
            Err(UpgradeError::Failed(detail)) => Err(Attempt::Fail(GatewayError::VmFailed {
                vm: name.to_owned(),
                detail,
            })),
        }
    }

    /// After a failed attempt on `name`: `None` to try again (the same VM once for a broken
    /// keep-alive connection, another VM when this one cannot be reached and the request can
    /// be replayed), else the final answer.
    pub(super) fn failed(
        &self,
        out: &mut Outbound,
        client: &ClientConn,
        tries: &mut Tries,
        name: String,
        failed: Attempt,
    ) -> Option<(Response<Body>, Option<String>)> {
        let inner = &self.inner;
        match failed {
            Attempt::Broken(detail, back) if !tries.resent => {
                // Once, without blaming the VM: a closed keep-alive connection is normal. If
                // the VM is gone, the next attempt cannot connect and fails over.
                tracing::info!(parent: client.span(), vm = %name, "connection to the VM broke before an answer ({detail}); sending the request again");
                tries.resent = true;
                out.body = back;
                None
            }
            Attempt::Client(e) => {
                tracing::info!(parent: client.span(), vm = %name, ?e, "request refused: the client's request body could not be read");
                self.forget_new(out.pin.as_deref(), &out.new_session);
                Some((e.response_as(out.json()), Some(name)))
            }
            Attempt::Fail(e) => {
                tracing::warn!(parent: client.span(), vm = %name, "HTTP request failed: {}", e.status());
                inner.metrics.session_started(
                    Protocol::Http,
                    &name,
                    outcome::VM_FAILED,
                    Duration::ZERO,
                );
                self.forget_new(out.pin.as_deref(), &out.new_session);
                Some((e.response_as(out.json()), Some(name)))
            }
            Attempt::Unreachable(detail, returned) | Attempt::Broken(detail, returned) => {
                tracing::warn!(parent: client.span(), vm = %name, "cannot reach VM: {detail}; trying another");
                (inner.on_vm_failure)(&name);
                inner.metrics.session_started(
                    Protocol::Http,
                    &name,
                    outcome::VM_FAILED,
                    Duration::ZERO,
                );
                let failure = GatewayError::VmFailed {
                    vm: name.clone(),
                    detail,
                };
                tries.tried.push(name);
                // A body already partly sent cannot be replayed.
                let replayable = returned.is_some() || out.is_upgrade;
                if !replayable || tries.tried.len() >= inner.settings.max_attempts {
                    self.forget_new(out.pin.as_deref(), &out.new_session);
                    return Some((failure.response_as(out.json()), tries.tried.pop()));
                }
                out.body = returned;
                tries.last_failure = Some(failure);
                None
            }
        }
    }

    /// No VM can take the request: the last attempt's failure, or a "no VM" page (which also
    /// wakes the pool).
    pub(super) fn no_vm(
        &self,
        out: &Outbound,
        no_vm: NoVm,
        last_failure: Option<GatewayError>,
        https: bool,
    ) -> Response<Body> {
        let inner = &self.inner;
        self.forget_new(out.pin.as_deref(), &out.new_session);
        let Some(err) = last_failure else {
            let wake = self.wake_pool(out);
            // A waiting browser counts once, not with every refresh of its page.
            if !matches!(wake, Wake::Renewed) {
                inner.metrics.session_started(
                    Protocol::Http,
                    "none",
                    outcome::NO_VM,
                    Duration::ZERO,
                );
            }
            inner.no_vm_log.refused(&no_vm);
            let waking = !matches!(wake, Wake::No);
            // A client given its wait cookie now is asked back at once: then it waits.
            let retry_after = match wake {
                Wake::AfterCookie(_) => Duration::from_secs(1).min(inner.settings.retry_after),
                _ => inner.settings.retry_after,
            };
            let mut resp = GatewayError::NoVm {
                cause: NoVmCause::of(&no_vm, waking),
                reason: no_vm.to_string(),
                retry_after,
            }
            .response_as(out.json());
            if let Wake::AfterCookie(key) = wake {
                let cookie = set_cookie_header(
                    &format!("{}{WAIT_COOKIE_SUFFIX}", inner.settings.cookie_name),
                    &key,
                    WAIT_COOKIE_MAX_AGE,
                    https,
                );
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    resp.headers_mut().append(header::SET_COOKIE, v);
                }
            }
            return resp;
        };
        err.response_as(out.json())
    }
}
