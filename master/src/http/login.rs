//! Logging in to Buildbot's web UI: `/auth/login` asks for one of `http.auth.users` with HTTP
//! basic authentication and sets a signed session cookie, `/auth/logout` clears it, and control
//! actions accept the cookie as they accept credentials.
//!
//! The cookie names the user and when the session ends, signed with a key every master of the
//! database shares (so a session holds on any of them) over the user's password too (so changing
//! a password ends its sessions). It is `HttpOnly` and `SameSite=Lax`, and control actions also
//! check the request's `Origin`, so another site's page cannot act with it.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::Query;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The session cookie's name.
const COOKIE: &str = "kiln_session";
/// How long a session lasts: a week, as Buildbot's sessions do by default.
const LIFETIME_SECS: u64 = 7 * 24 * 3600;

/// The users who may log in, and the key that signs their sessions.
#[derive(Clone)]
pub struct Sessions {
    key: Vec<u8>,
    /// `(username, password)` of each of `http.auth.users`.
    users: Vec<(String, String)>,
    /// Cookies only over HTTPS (the HTTP port serves TLS).
    secure: bool,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.users.iter().map(|(u, _)| u.as_str()).collect();
        f.debug_struct("Sessions").field("users", &names).field("secure", &self.secure).finish_non_exhaustive()
    }
}

impl Sessions {
    /// Sessions for `users` given as `username:password`, signed with `key`.
    pub fn new(key: Vec<u8>, users: &[String], secure: bool) -> Sessions {
        let users = users.iter().filter_map(|pair| pair.split_once(':')).map(|(u, p)| (u.to_owned(), p.to_owned()));
        Sessions { key, users: users.collect(), secure }
    }

    /// Whether anyone can log in (the configuration lists users).
    pub fn enabled(&self) -> bool {
        !self.users.is_empty()
    }

    /// The user whose valid, unexpired session cookie the request carries.
    pub fn user(&self, headers: &HeaderMap) -> Option<String> {
        let value = cookie(headers, COOKIE)?;
        let mut parts = value.split('.');
        let (name, expires, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let user = String::from_utf8(hex::decode(name).ok()?).ok()?;
        let expires: u64 = expires.parse().ok()?;
        if expires <= now_secs() {
            return None;
        }
        let (_, password) = self.users.iter().find(|(u, _)| *u == user)?;
        self.mac(&user, password, expires).verify_slice(&hex::decode(mac).ok()?).ok()?;
        Some(user)
    }

    /// What the UI's configuration says about logging in: `auth`, and `user` for this request.
    pub fn frontend(&self, headers: &HeaderMap) -> (Value, Value) {
        if !self.enabled() {
            return (
                json!({ "name": "NoAuth", "oauth2": false, "fa_icon": null, "autologin": false }),
                json!({ "anonymous": true }),
            );
        }
        let auth = json!({ "name": "UserPasswordAuth", "oauth2": false, "fa_icon": null, "autologin": false });
        let user = match self.user(headers) {
            // No `email`, as Buildbot's password logins give none: the force dialog then hides
            // "Your name" and the build's owner is the session's user.
            Some(name) => json!({ "username": name, "full_name": name, "groups": [] }),
            None => json!({ "anonymous": true }),
        };
        (auth, user)
    }

    fn mac(&self, user: &str, password: &str, expires: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(user.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac.update(b"\n");
        mac.update(&Sha256::digest(password.as_bytes()));
        mac
    }

    /// The `Set-Cookie` value of a new session for `user`.
    fn issue(&self, user: &str, password: &str) -> String {
        let expires = now_secs() + LIFETIME_SECS;
        let mac = hex::encode(self.mac(user, password, expires).finalize().into_bytes());
        let value = format!("{}.{expires}.{mac}", hex::encode(user));
        format!("{COOKIE}={value}; Path=/; Max-Age={LIFETIME_SECS}; HttpOnly; SameSite=Lax{}", self.secure_flag())
    }

    fn secure_flag(&self) -> &'static str {
        if self.secure { "; Secure" } else { "" }
    }

    /// The user whose `user:password` the request's basic authentication gives.
    fn basic(&self, headers: &HeaderMap) -> Option<&(String, String)> {
        use base64::Engine;
        let given = headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Basic ")?;
        let pair = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(given.trim()).ok()?).ok()?;
        let (user, password) = pair.split_once(':')?;
        // Compare every password, in constant time, so timing tells nothing about which matched.
        let mut found = None;
        for entry in &self.users {
            let matched = crate::secrets::matches_any(std::slice::from_ref(&entry.1), password);
            if matched && entry.0 == user {
                found = Some(entry);
            }
        }
        found
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
}

#[derive(Debug, Deserialize)]
struct Redirect {
    redirect: Option<String>,
}

/// Where to send the browser after logging in or out: a path of this site (the UI passes its
/// own, `/#/builders`), never another site.
fn target(redirect: Option<&str>) -> HeaderValue {
    let path = redirect.filter(|r| r.starts_with('/') && !r.starts_with("//") && !r.contains('\\'));
    HeaderValue::from_str(path.unwrap_or("/")).unwrap_or_else(|_| HeaderValue::from_static("/"))
}

fn see_other(to: HeaderValue, cookie: String) -> Response {
    let mut response = StatusCode::FOUND.into_response();
    response.headers_mut().insert(header::LOCATION, to);
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `/auth/login` and `/auth/logout`.
pub fn routes<S: Clone + Send + Sync + 'static>(sessions: Arc<Sessions>) -> Router<S> {
    let login = {
        let sessions = Arc::clone(&sessions);
        move |headers: HeaderMap, Query(query): Query<Redirect>| {
            let sessions = Arc::clone(&sessions);
            async move {
                if !sessions.enabled() {
                    let reason = "this master has no users to log in as: list them in http.auth.users";
                    return (StatusCode::NOT_FOUND, reason).into_response();
                }
                match sessions.basic(&headers) {
                    Some((user, password)) => {
                        tracing::info!(user = %user, "logged in to the web UI");
                        see_other(target(query.redirect.as_deref()), sessions.issue(user, password))
                    }
                    None => {
                        let challenge = HeaderValue::from_static("Basic realm=\"kiln\"");
                        let body = "log in as one of the users of this master's http.auth.users";
                        (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)], body).into_response()
                    }
                }
            }
        }
    };
    let logout = move |Query(query): Query<Redirect>| {
        let sessions = Arc::clone(&sessions);
        async move {
            let cleared = format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{}", sessions.secure_flag());
            see_other(target(query.redirect.as_deref()), cleared)
        }
    };
    Router::new().route("/auth/login", get(login)).route("/auth/logout", get(logout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(set_cookie: &str) -> HeaderMap {
        let value = set_cookie.split(';').next().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(&format!("other=1; {value}")).unwrap());
        headers
    }

    #[test]
    fn a_session_names_its_user_until_it_is_forged_expired_or_the_password_changes() {
        let sessions = Sessions::new(vec![7; 32], &["ada:s3cret".into(), "bo:pw".into()], false);
        let issued = sessions.issue("ada", "s3cret");
        assert!(issued.contains("HttpOnly") && issued.contains("SameSite=Lax") && !issued.contains("Secure"));
        assert_eq!(sessions.user(&with_cookie(&issued)).as_deref(), Some("ada"));

        // Another user's name over ada's signature.
        let value = issued.split(';').next().unwrap().trim_start_matches("kiln_session=");
        let forged = value.replacen(&hex::encode("ada"), &hex::encode("bo"), 1);
        assert_eq!(sessions.user(&with_cookie(&format!("kiln_session={forged}"))), None);
        // A later expiry over the same signature.
        let (name, rest) = value.split_once('.').unwrap();
        let (_, mac) = rest.split_once('.').unwrap();
        let extended = format!("kiln_session={name}.{}.{mac}", now_secs() + 10 * LIFETIME_SECS);
        assert_eq!(sessions.user(&with_cookie(&extended)), None);
        // Another key (another database), a changed password, an expired session.
        assert_eq!(Sessions::new(vec![8; 32], &["ada:s3cret".into()], false).user(&with_cookie(&issued)), None);
        assert_eq!(Sessions::new(vec![7; 32], &["ada:new".into()], false).user(&with_cookie(&issued)), None);
        let expired = format!(
            "kiln_session={name}.{}.{}",
            now_secs() - 1,
            hex::encode(sessions.mac("ada", "s3cret", now_secs() - 1).finalize().into_bytes())
        );
        assert_eq!(sessions.user(&with_cookie(&expired)), None);
    }

    #[test]
    fn only_a_path_of_this_site_is_a_redirect_target() {
        assert_eq!(target(Some("/#/builders/1")), "/#/builders/1");
        for foreign in [None, Some("https://evil.example/"), Some("//evil.example/"), Some("/\\evil.example")] {
            assert_eq!(target(foreign), "/", "{foreign:?}");
        }
    }

    #[test]
    fn basic_authentication_admits_a_user_only_with_their_own_password() {
        use base64::Engine;
        let sessions = Sessions::new(vec![1; 32], &["ada:a-pw".into(), "bo:b-pw".into()], true);
        let basic = |pair: &str| {
            let mut headers = HeaderMap::new();
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Basic {encoded}")).unwrap());
            headers
        };
        assert_eq!(sessions.basic(&basic("ada:a-pw")).map(|(u, _)| u.as_str()), Some("ada"));
        assert_eq!(sessions.basic(&basic("ada:b-pw")), None);
        assert_eq!(sessions.basic(&basic("carol:a-pw")), None);
        assert!(sessions.issue("ada", "a-pw").ends_with("; Secure"));
    }
}
