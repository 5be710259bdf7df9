//! The answer as the client sees it: response headers, the sticky cookie, byte accounting.

use super::*;

/// The sticky cookie as the request brought it, for the response.
pub(super) struct Sticky<'a> {
    /// The request's valid cookie, if any.
    pin: Option<Arc<Pin>>,
    /// The session id a new cookie gets when the request had none.
    new_session: &'a str,
    /// Unix time the request's cookie was checked at.
    now: u64,
}

/// What the response's end settles: the bytes each way and the request in flight.
pub(super) struct Counted {
    /// Request body bytes sent (`None`: the request has no body).
    pub(super) up_bytes: Option<Arc<AtomicU64>>,
    /// The VM's `bytes_total{protocol="http",direction="down"}`.
    pub(super) down: prometheus::IntCounter,
    /// The request in flight on its client connection.
    pub(super) active: Active,
    /// The browser session's byte counters (a request with a valid cookie).
    pub(super) session: Option<SessionBytes>,
}

pub(super) fn bad_target(json: bool) -> Response<Body> {
    GatewayError::Refused {
        status: StatusCode::BAD_REQUEST,
        detail: "the request target is not a valid path".into(),
    }
    .response_as(json)
}

impl Frontend {
    /// The VM answered: timing, a session started when the browser moved to this VM, and the
    /// response as the client sees it.
    pub(super) fn answered<B>(
        &self,
        out: Outbound,
        resp: Response<B>,
        started: Instant,
        vm: &Arc<Vm>,
        conn: ConnInfo,
        down: prometheus::IntCounter,
    ) -> Response<Body>
    where
        B: HttpBody<Data = Bytes, Error = BoxError> + Send + Unpin + 'static,
    {
        let inner = &self.inner;
        inner
            .connect_seconds
            .observe(started.elapsed().as_secs_f64());
        let name = vm.name();
        if out.pin.is_some() && out.session_started {
            inner
                .metrics
                .session_started(Protocol::Http, name, outcome::OK, started.elapsed());
        }
        self.finish(
            resp,
            vm,
            Sticky {
                pin: out.pin,
                new_session: &out.new_session,
                now: out.now,
            },
            conn,
            Counted {
                up_bytes: out.up_bytes,
                down,
                active: out.active,
                session: out.session_bytes,
            },
        )
    }

    /// Response headers as the client sees them, the sticky cookie, and byte accounting.
    pub(super) fn finish<B>(
        &self,
        resp: Response<B>,
        vm: &Arc<Vm>,
        sticky: Sticky<'_>,
        conn: ConnInfo,
        counted: Counted,
    ) -> Response<Body>
    where
        B: HttpBody<Data = Bytes, Error = BoxError> + Send + Unpin + 'static,
    {
        let inner = &self.inner;
        let Sticky {
            pin,
            new_session,
            now,
        } = sticky;
        let (mut parts, body) = resp.into_parts();
        // The gateway answers in its own HTTP version (RFC 9110, section 6.2), not the VM's: a
        // VM speaking HTTP/1.0 must not make the client's connection HTTP/1.0 and close it after
        // each response. hyper still answers an HTTP/1.0 client in HTTP/1.0.
        parts.version = Version::HTTP_11;
        if parts.status != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(&mut parts.headers);
        }
        let name = vm.name();
        let rewrite = match &pin {
            None => true,
            Some(p) => p.vm != name || inner.signer.wants_refresh(p, now),
        };
        if rewrite {
            let sid = pin.as_ref().map_or(new_session, |p| &p.session);
            if let Some(v) = self.sticky_cookie(name, sid, now, conn.https) {
                parts.headers.append(header::SET_COOKIE, v);
            }
        }
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            // Bytes of the upgraded stream are counted by the relay.
            let resp = Response::from_parts(parts, BodyExt::boxed_unsync(body));
            return counted.active.attach(resp);
        }
        let metrics = inner.metrics.clone();
        let vm = Arc::clone(vm);
        let body = Observed::new(body, move |down| {
            let Counted {
                up_bytes,
                down: down_total,
                active,
                session,
            } = counted;
            let up = up_bytes.map_or(0, |b| b.load(Ordering::Relaxed));
            // Downloads are counted on every response; uploads (a request body) rarely.
            down_total.inc_by(down);
            if up > 0 {
                metrics.bytes(Protocol::Http, vm.name(), up, 0);
            }
            // The session's counters as routing found them: not looked up again by its id.
            if let Some(session) = session {
                session.add(up, down);
            }
            drop(active);
        })
        .boxed();
        Response::from_parts(parts, body)
    }
}
