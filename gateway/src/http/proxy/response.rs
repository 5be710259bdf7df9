//! The answer as the client sees it: response headers, the sticky cookie, byte accounting.

use super::*;

/// The sticky cookie as the request brought it, for the response.
#[derive(Clone, Copy)]
pub(super) struct Sticky<'a> {
    /// The request's valid cookie, if any.
    pin: Option<&'a Pin>,
    /// The session id a new cookie gets when the request had none.
    new_session: &'a str,
    /// Unix time the request's cookie was checked at.
    now: u64,
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
    pub(super) fn answered(
        &self,
        out: &Outbound,
        resp: Response<Body>,
        started: Instant,
        name: &str,
        conn: ConnInfo,
    ) -> Response<Body> {
        let inner = &self.inner;
        inner
            .connect_seconds
            .observe(started.elapsed().as_secs_f64());
        if out.pin.is_some() && out.previous_vm.as_deref() != Some(name) {
            inner
                .metrics
                .session_started(Protocol::Http, name, outcome::OK, started.elapsed());
        }
        self.finish(
            resp,
            name,
            Sticky {
                pin: out.pin.as_ref(),
                new_session: &out.new_session,
                now: out.now,
            },
            conn,
            &out.up_bytes,
        )
    }

    /// Response headers as the client sees them, the sticky cookie, and byte accounting.
    pub(super) fn finish(
        &self,
        resp: Response<Body>,
        vm: &str,
        sticky: Sticky<'_>,
        conn: ConnInfo,
        up_bytes: &Arc<AtomicU64>,
    ) -> Response<Body> {
        let inner = &self.inner;
        let Sticky {
            pin,
            new_session,
            now,
        } = sticky;
        let (mut parts, body) = resp.into_parts();
        if parts.status != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(&mut parts.headers);
        }
        let rewrite = match pin {
            None => true,
            Some(p) => p.vm != vm || inner.signer.wants_refresh(p, now),
        };
        if rewrite {
            let sid = pin.map_or_else(|| new_session.to_owned(), |p| p.session.clone());
            let value = inner.signer.sign(vm, &sid, now);
            let cookie = set_cookie_header(
                &inner.settings.cookie_name,
                &value,
                inner.signer.max_age(),
                conn.https,
            );
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                parts.headers.append(header::SET_COOKIE, v);
            }
        }
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            // Bytes of the upgraded stream are counted by the relay.
            return Response::from_parts(parts, body);
        }
        let metrics = inner.metrics.clone();
        let pool = inner.pool.clone();
        let vm = vm.to_owned();
        let sid = pin.map(|p| p.session.clone());
        let up_bytes = up_bytes.clone();
        let body = Observed::new(body, move |down| {
            let up = up_bytes.load(Ordering::Relaxed);
            metrics.bytes(Protocol::Http, &vm, up, down);
            if let Some(sid) = sid {
                pool.http_add_bytes(&sid, up, down);
            }
        })
        .boxed();
        Response::from_parts(parts, body)
    }
}
