//! The sticky-session cookie: `base64url(vm) . issued_at . session_id . mac`, signed with
//! HMAC-SHA256 over the first three fields. Verification is constant-time and any parse error
//! rejects the cookie (it is then ignored and the browser re-picked).

use std::path::Path;
use std::time::Duration;

use data_encoding::BASE64URL_NOPAD;
use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::secrets::{self, SecretFileError};

type HmacSha256 = hmac::Hmac<Sha256>;

/// Bytes of a generated cookie secret.
pub const SECRET_LEN: usize = 32;
/// Bytes of a session id.
const SID_LEN: usize = 16;
/// HMAC-SHA256 tag length.
const TAG_LEN: usize = 32;
/// Longest cookie value accepted (a VM name is at most a few hundred bytes).
const MAX_VALUE_LEN: usize = 1024;
/// Cookies issued this far in the future (clock skew) are still accepted.
const SKEW_SECS: u64 = 300;

/// A verified cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The VM the browser is pinned to.
    pub vm: String,
    /// When the cookie was issued (seconds since the Unix epoch).
    pub issued_at: u64,
    /// The browser session id (base64url, as in the cookie): the key of its load slot.
    pub session: String,
}

/// Signs and verifies sticky cookies.
#[derive(Clone)]
pub struct CookieSigner {
    /// HMAC state with the key already absorbed: cloned per cookie, so each signature costs the
    /// message's compressions only, not the key's two extra blocks.
    keyed: HmacSha256,
    /// Cookies older than this are stale (ignored).
    max_age: Duration,
}

impl std::fmt::Debug for CookieSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieSigner")
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

impl CookieSigner {
    /// A signer with `key` (at least 16 bytes recommended; any length works for HMAC).
    pub fn new(key: &[u8], max_age: Duration) -> Self {
        // HMAC accepts keys of any length: this cannot fail.
        let keyed = match HmacSha256::new_from_slice(key) {
            Ok(mac) => mac,
            Err(_) => HmacSha256::new(&Default::default()),
        };
        Self { keyed, max_age }
    }

    /// Loads the secret from `path`, or generates [`SECRET_LEN`] random bytes there (mode 0600)
    /// when the file is missing. Returns the signer and whether the secret was generated.
    pub fn load_or_generate(
        path: &Path,
        max_age: Duration,
    ) -> Result<(Self, bool), SecretFileError> {
        if path.exists() {
            let key = secrets::read(path)?;
            if key.len() < 16 {
                return Err(SecretFileError::Invalid {
                    path: path.display().to_string(),
                    message: format!(
                        "a cookie secret needs at least 16 bytes, this one has {}; delete the \
                         file to have poolgate generate one",
                        key.len()
                    ),
                });
            }
            return Ok((Self::new(&key, max_age), false));
        }
        let key: [u8; SECRET_LEN] = rand::random();
        secrets::write(path, &key)?;
        Ok((Self::new(&key, max_age), true))
    }

    /// How long a cookie stays valid after it was issued.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// A fresh random session id.
    pub fn new_session_id() -> String {
        let sid: [u8; SID_LEN] = rand::random();
        BASE64URL_NOPAD.encode(&sid)
    }

    fn mac(&self, signed: &str) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(signed.as_bytes());
        mac
    }

    /// The cookie value pinning `session` to `vm`, issued at `now` (Unix seconds).
    pub fn sign(&self, vm: &str, session: &str, now: u64) -> String {
        let signed = format!("{}.{now}.{session}", BASE64URL_NOPAD.encode(vm.as_bytes()));
        let tag = self.mac(&signed).finalize().into_bytes();
        format!("{signed}.{}", BASE64URL_NOPAD.encode(&tag))
    }

    /// Verifies a cookie value at `now` (Unix seconds). `None` when it is malformed, forged,
    /// issued in the future or older than the maximum age.
    pub fn verify(&self, value: &str, now: u64) -> Option<Pin> {
        if value.len() > MAX_VALUE_LEN {
            return None;
        }
        let (signed, tag_text) = value.rsplit_once('.')?;
        // Decoded on the stack (this runs for every request with the cookie); a tag of another
        // length is no HMAC-SHA256 tag.
        let mut tag = [0u8; TAG_LEN];
        decode_exact(tag_text, &mut tag)?;
        // Constant-time comparison.
        self.mac(signed).verify_slice(&tag).ok()?;
        let mut fields = signed.split('.');
        let vm = fields.next()?;
        let issued_at: u64 = fields.next()?.parse().ok()?;
        let session = fields.next()?;
        if fields.next().is_some() {
            return None;
        }
        let vm = String::from_utf8(BASE64URL_NOPAD.decode(vm.as_bytes()).ok()?).ok()?;
        let mut sid = [0u8; SID_LEN];
        decode_exact(session, &mut sid)?;
        if vm.is_empty() {
            return None;
        }
        let pin = Pin {
            vm,
            issued_at,
            session: session.to_owned(),
        };
        self.still_valid(&pin, now).then_some(pin)
    }

    /// Whether a verified cookie is still valid at `now`: not issued in the future (beyond
    /// clock skew), not older than the maximum age.
    pub fn still_valid(&self, pin: &Pin, now: u64) -> bool {
        pin.issued_at <= now.saturating_add(SKEW_SECS)
            && now.saturating_sub(pin.issued_at) <= self.max_age.as_secs()
    }

    /// Whether a valid cookie is old enough to be re-issued (past half its maximum age), so an
    /// active browser never reaches the maximum age.
    pub fn wants_refresh(&self, pin: &Pin, now: u64) -> bool {
        now.saturating_sub(pin.issued_at) > self.max_age.as_secs() / 2
    }
}

/// Decodes unpadded base64url `text` into all of `out`: `None` unless it is valid and exactly
/// that long.
fn decode_exact(text: &str, out: &mut [u8]) -> Option<()> {
    if BASE64URL_NOPAD.decode_len(text.len()).ok()? != out.len() {
        return None;
    }
    BASE64URL_NOPAD.decode_mut(text.as_bytes(), out).ok()?;
    Some(())
}

/// Finds one cookie, by name, in a request's `Cookie` headers. Made once for the name: the
/// search (`memchr`'s vectorised one) is prepared for it.
pub struct CookieFinder {
    name: memchr::memmem::Finder<'static>,
}

impl CookieFinder {
    pub fn new(name: &str) -> Self {
        Self {
            name: memchr::memmem::Finder::new(name.as_bytes()).into_owned(),
        }
    }

    /// The cookie's value (the first one when repeated), without blanks or quotes around it.
    ///
    /// Read as bytes: a browser's `Cookie` header can run to kilobytes (every cookie of the
    /// domain), and this runs on every request, so the name is searched for rather than every
    /// pair split off and compared. Another cookie's value with bytes beyond ASCII (browsers
    /// send what scripts set) does not hide this one. The value is bytes too: a connection
    /// compares it with the one it verified last, and only a new value is checked as text
    /// (by the signature check).
    pub fn find<'a>(&self, headers: &'a hyper::HeaderMap) -> Option<&'a [u8]> {
        let len = self.name.needle().len();
        headers.get_all(hyper::header::COOKIE).iter().find_map(|v| {
            let text = v.as_bytes();
            self.name.find_iter(text).find_map(|at| {
                // A whole name: at the start of a pair (after `;` and any blanks), followed
                // by `=`.
                let before = text[..at].trim_ascii_end();
                if !(before.is_empty() || before.ends_with(b";")) {
                    return None;
                }
                let rest = text[at + len..].strip_prefix(b"=")?;
                let value = &rest[..memchr::memchr(b';', rest).unwrap_or(rest.len())];
                let value = value.trim_ascii();
                let start = value.iter().position(|&b| b != b'"').unwrap_or(value.len());
                let end = value
                    .iter()
                    .rposition(|&b| b != b'"')
                    .map_or(start, |i| i + 1);
                Some(&value[start..end])
            })
        })
    }
}

/// A `Set-Cookie` value: path `/`, HttpOnly, SameSite=Lax, Secure when served over HTTPS.
pub fn set_cookie_header(name: &str, value: &str, max_age: Duration, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{name}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        max_age.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86400);

    fn signer() -> CookieSigner {
        CookieSigner::new(b"0123456789abcdef0123456789abcdef", DAY)
    }

    #[test]
    fn round_trip() {
        let s = signer();
        let sid = CookieSigner::new_session_id();
        let v = s.sign("dsvm-1.internal", &sid, 1000);
        let pin = s.verify(&v, 1010).expect("valid");
        assert_eq!(pin.vm, "dsvm-1.internal");
        assert_eq!(pin.session, sid);
        assert_eq!(pin.issued_at, 1000);
        assert!(!s.wants_refresh(&pin, 1010));
        assert!(s.wants_refresh(&pin, 1000 + DAY.as_secs() / 2 + 1));
    }

    #[test]
    fn forged_stale_and_malformed_cookies_are_rejected() {
        let s = signer();
        let sid = CookieSigner::new_session_id();
        let v = s.sign("a", &sid, 1000);
        // Another key.
        let other = CookieSigner::new(b"another key, same length, 32 b!!", DAY);
        assert!(other.verify(&v, 1000).is_none());
        // Tampered VM name (MAC no longer matches).
        let forged = v.replacen(
            &BASE64URL_NOPAD.encode(b"a"),
            &BASE64URL_NOPAD.encode(b"b"),
            1,
        );
        assert_ne!(forged, v);
        assert!(s.verify(&forged, 1000).is_none());
        // Too old, from the future.
        assert!(s.verify(&v, 1000 + DAY.as_secs() + 1).is_none());
        assert!(s.verify(&v, 1000 - SKEW_SECS - 1).is_none());
        // Garbage of all kinds.
        for bad in [
            "",
            ".",
            "...",
            "a.b.c.d",
            "!!!.1.x.y",
            &"x".repeat(5000),
            &format!("{v}."),
            &v[..v.len() - 1],
        ] {
            assert!(s.verify(bad, 1000).is_none(), "{bad:?}");
        }
        // A correctly signed value with a bad session id or an empty VM is refused too.
        let short = s.sign("a", "c2hvcnQ", 1000);
        assert!(s.verify(&short, 1000).is_none());
        let empty = s.sign("", &sid, 1000);
        assert!(s.verify(&empty, 1000).is_none());
    }

    #[test]
    fn a_cookie_is_found_beside_one_whose_value_is_not_ascii() {
        let mut h = hyper::HeaderMap::new();
        let value = hyper::header::HeaderValue::from_bytes(
            "theme=gr\u{fc}n; poolgate_vm=\"v1\" ;other=1".as_bytes(),
        )
        .expect("header");
        h.append(hyper::header::COOKIE, value);
        assert_eq!(CookieFinder::new("poolgate_vm").find(&h), Some(&b"v1"[..]));
        assert_eq!(CookieFinder::new("other").find(&h), Some(&b"1"[..]));
        assert_eq!(
            CookieFinder::new("theme").find(&h),
            Some("gr\u{fc}n".as_bytes())
        );
        // Only quotes: an empty value.
        let mut h = hyper::HeaderMap::new();
        h.append(
            hyper::header::COOKIE,
            "a=\"\"; b=\"".parse().expect("header"),
        );
        assert_eq!(CookieFinder::new("a").find(&h), Some(&b""[..]));
        assert_eq!(CookieFinder::new("b").find(&h), Some(&b""[..]));
    }

    #[test]
    fn finds_the_cookie_among_others() {
        let mut h = hyper::HeaderMap::new();
        h.append(
            hyper::header::COOKIE,
            "_xsrf=abc; poolgate_vm=v1".parse().expect("header"),
        );
        h.append(
            hyper::header::COOKIE,
            "poolgate_vm=v2".parse().expect("header"),
        );
        assert_eq!(CookieFinder::new("poolgate_vm").find(&h), Some(&b"v1"[..]));
        assert_eq!(CookieFinder::new("_xsrf").find(&h), Some(&b"abc"[..]));
        assert_eq!(CookieFinder::new("nope").find(&h), None);
        assert_eq!(
            CookieFinder::new("poolgate").find(&h),
            None,
            "a prefix of a name is no match"
        );
        assert_eq!(CookieFinder::new("xsrf").find(&h), None);
        let set = set_cookie_header("poolgate_vm", "v", DAY, true);
        assert_eq!(
            set,
            "poolgate_vm=v; Path=/; Max-Age=86400; HttpOnly; SameSite=Lax; Secure"
        );
    }

    #[test]
    fn secret_is_generated_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/cookie_secret");
        let (a, generated) = CookieSigner::load_or_generate(&path, DAY).expect("generate");
        assert!(generated);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&path).expect("read").len(), SECRET_LEN);
        let (b, generated) = CookieSigner::load_or_generate(&path, DAY).expect("load");
        assert!(!generated);
        let v = a.sign("vm", &CookieSigner::new_session_id(), 5);
        assert!(b.verify(&v, 5).is_some());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(CookieSigner::load_or_generate(&path, DAY).is_err());
    }
}
