//! Who a connection is: a JWT when authentication is on, `?user=` (or a generated id) when off.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{JwtAlgorithm, JwtConfig, JwtKey};

/// Longest user id accepted (a `sub` claim or `?user=`), to keep registry keys bounded.
pub const MAX_USER_LEN: usize = 128;

/// Which rooms (or, for `send`, which users) an identity may use for one purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    All,
    /// Each pattern is an exact name; or `prefix.*`, names that start with `prefix.` and go on
    /// (`user.alice.*` allows `user.alice.inbox`, not `user.alice` nor `user.alice2`); or any
    /// other `prefix*`, a raw prefix (`user.alice*` also allows `user.alice2`; kept for
    /// compatibility); `*` alone allows everything.
    Patterns(Vec<String>),
}

impl Access {
    pub fn allows(&self, name: &str) -> bool {
        match self {
            Access::All => true,
            Access::Patterns(patterns) => patterns.iter().any(|pattern| matches(pattern, name)),
        }
    }
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        // `prefix.*` needs something after the dot: the bare `prefix.` is no segment.
        Some(prefix) if prefix.ends_with('.') => {
            name.len() > prefix.len() && name.starts_with(prefix)
        }
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// The credentials of an `Authorization: Bearer <value>` header. The scheme is matched without
/// regard to case (RFC 7235); an empty value counts as none.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, value) = authorization.trim_start().split_once(' ')?;
    let value = value.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !value.is_empty()).then_some(value)
}

/// An admitted connection's identity.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: String,
    pub rooms: Access,
    pub publish: Access,
    /// Users this identity may `send` to.
    pub send: Access,
    /// Shown in presence.
    pub info: Option<Value>,
    /// The token's `exp`, in seconds since the Unix epoch.
    pub expires_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required (?token= or Authorization: Bearer)")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(jsonwebtoken::errors::Error),
    #[error("invalid token: sub must be 1 to {MAX_USER_LEN} bytes without control characters")]
    BadSub,
    #[error("invalid user id: must be 1 to {MAX_USER_LEN} bytes without control characters")]
    BadUser,
}

/// Why the configured verification key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("EC public key: {0}")]
    Ec(jsonwebtoken::errors::Error),
    #[error("RSA public key: {0}")]
    Rsa(jsonwebtoken::errors::Error),
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default)]
    publish: Option<Vec<String>>,
    #[serde(default)]
    send: Option<Vec<String>>,
    #[serde(default)]
    info: Option<Value>,
}

pub struct Authenticator {
    jwt: Option<(DecodingKey, Validation)>,
}

impl Authenticator {
    /// Fails when the configured key cannot be parsed.
    pub fn new(config: Option<&JwtConfig>) -> Result<Self, KeyError> {
        let Some(config) = config else {
            return Ok(Authenticator { jwt: None });
        };
        let (key, algorithm) = match (&config.key, config.algorithm) {
            (JwtKey::Secret(secret), _) => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            (JwtKey::PublicKeyPem(pem), JwtAlgorithm::Es256) => (
                DecodingKey::from_ec_pem(pem).map_err(KeyError::Ec)?,
                Algorithm::ES256,
            ),
            (JwtKey::PublicKeyPem(pem), _) => (
                DecodingKey::from_rsa_pem(pem).map_err(KeyError::Rsa)?,
                Algorithm::RS256,
            ),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Authenticator {
            jwt: Some((key, validation)),
        })
    }

    pub fn enabled(&self) -> bool {
        self.jwt.is_some()
    }

    /// The leeway granted past `exp`, in seconds.
    pub fn leeway_secs(&self) -> u64 {
        self.jwt
            .as_ref()
            .map_or(0, |(_, validation)| validation.leeway)
    }

    pub fn authenticate(
        &self,
        token: Option<&str>,
        user: Option<&str>,
    ) -> Result<Identity, AuthError> {
        let Some((key, validation)) = &self.jwt else {
            let user = match user {
                Some(user) if !valid_user(user) => {
                    return Err(AuthError::BadUser);
                }
                Some(user) => user.to_owned(),
                None => format!("anon-{:012x}", rand::random::<u64>() >> 16),
            };
            return Ok(Identity {
                user,
                rooms: Access::All,
                publish: Access::All,
                send: Access::All,
                info: None,
                expires_at: None,
            });
        };
        let token = token
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::Missing)?;
        let claims = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|error| match error.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(error),
            })?
            .claims;
        if !valid_user(&claims.sub) {
            return Err(AuthError::BadSub);
        }
        Ok(Identity {
            user: claims.sub,
            rooms: Access::Patterns(claims.rooms.unwrap_or_default()),
            publish: Access::Patterns(claims.publish.unwrap_or_default()),
            send: Access::Patterns(claims.send.unwrap_or_default()),
            info: claims.info,
            expires_at: claims.exp,
        })
    }
}

/// Why a user id is refused, in a session's `error` frame and the server API's 400 alike.
pub const INVALID_USER: &str = "user ids are 1 to 128 bytes without control characters";

/// User ids are 1 to 128 bytes without control characters (they are keys and line-separated
/// fields in the cluster's records).
pub fn valid_user(user: &str) -> bool {
    !user.is_empty() && user.len() <= MAX_USER_LEN && !user.chars().any(char::is_control)
}

/// Seconds since the Unix epoch.
pub fn unix_now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    #[test]
    fn the_user_id_refusal_states_the_limit_valid_user_applies() {
        let longest = "u".repeat(MAX_USER_LEN);
        assert!(valid_user(&longest) && !valid_user(&format!("{longest}u")));
        assert!(INVALID_USER.contains(&format!("1 to {MAX_USER_LEN} bytes")));
    }

    const SECRET: &str = "0123456789abcdef-test-secret";

    fn authenticator() -> Authenticator {
        Authenticator::new(Some(&JwtConfig {
            key: JwtKey::Secret(SECRET.into()),
            algorithm: JwtAlgorithm::Hs256,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(5),
        }))
        .unwrap()
    }

    fn token(claims: Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn patterns_match_exactly_or_by_prefix() {
        let access = Access::Patterns(vec!["lobby".into(), "chat.*".into()]);
        assert!(access.allows("lobby"));
        assert!(access.allows("chat.x"));
        assert!(!access.allows("lobby2"));
        assert!(!access.allows("chat"));
        assert!(Access::Patterns(vec!["*".into()]).allows("anything"));
        assert!(!Access::Patterns(vec![]).allows("anything"));
    }

    #[test]
    fn a_dot_star_pattern_stays_within_its_segment_and_a_bare_star_is_a_raw_prefix() {
        let segment = Access::Patterns(vec!["user.alice.*".into()]);
        assert!(segment.allows("user.alice.inbox"));
        assert!(segment.allows("user.alice.a.b"));
        assert!(!segment.allows("user.alice"));
        assert!(!segment.allows("user.alice."));
        assert!(!segment.allows("user.alice2"));
        assert!(!segment.allows("user.alice2.inbox"));
        let raw = Access::Patterns(vec!["user.alice*".into()]);
        assert!(raw.allows("user.alice"));
        assert!(raw.allows("user.alice2"));
        assert!(raw.allows("user.alice.inbox"));
        assert!(!raw.allows("user.alic"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_an_empty_credential_is_none() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    fn authenticator_for(issuer: Option<&str>, audience: Option<&str>) -> Authenticator {
        Authenticator::new(Some(&JwtConfig {
            key: JwtKey::Secret(SECRET.into()),
            algorithm: JwtAlgorithm::Hs256,
            issuer: issuer.map(str::to_owned),
            audience: audience.map(str::to_owned),
            leeway: Duration::from_secs(5),
        }))
        .unwrap()
    }

    #[test]
    fn a_configured_issuer_is_required_and_checked() {
        let auth = authenticator_for(Some("https://idp.example"), None);
        let exp = unix_now_secs() + 60;
        let right = token(json!({"sub": "a", "exp": exp, "iss": "https://idp.example"}));
        assert_eq!(auth.authenticate(Some(&right), None).unwrap().user, "a");
        for claims in [
            json!({"sub": "a", "exp": exp, "iss": "https://other.example"}),
            json!({"sub": "a", "exp": exp}),
        ] {
            assert!(
                matches!(
                    auth.authenticate(Some(&token(claims.clone())), None),
                    Err(AuthError::Invalid(_))
                ),
                "{claims}"
            );
        }
    }

    #[test]
    fn a_configured_audience_is_required_and_checked() {
        let auth = authenticator_for(None, Some("switchboard"));
        let exp = unix_now_secs() + 60;
        for aud in [json!("switchboard"), json!(["other", "switchboard"])] {
            let right = token(json!({"sub": "a", "exp": exp, "aud": aud}));
            assert!(auth.authenticate(Some(&right), None).is_ok(), "aud {aud}");
        }
        for claims in [
            json!({"sub": "a", "exp": exp, "aud": "another-service"}),
            json!({"sub": "a", "exp": exp}),
        ] {
            assert!(
                matches!(
                    auth.authenticate(Some(&token(claims.clone())), None),
                    Err(AuthError::Invalid(_))
                ),
                "{claims}"
            );
        }
        // Without a configured audience, a token's `aud` is not held against it.
        let unchecked = token(json!({"sub": "a", "exp": exp, "aud": "another-service"}));
        assert!(authenticator().authenticate(Some(&unchecked), None).is_ok());
    }

    #[test]
    fn extreme_time_claims_neither_panic_nor_wrap() {
        let auth = authenticator();
        let forever = token(json!({"sub": "a", "exp": u64::MAX}));
        assert_eq!(
            auth.authenticate(Some(&forever), None).unwrap().expires_at,
            Some(u64::MAX)
        );
        let never_valid = token(json!({"sub": "a", "exp": u64::MAX, "nbf": u64::MAX}));
        assert!(matches!(
            auth.authenticate(Some(&never_valid), None),
            Err(AuthError::Invalid(_))
        ));
        for exp in [json!(1e300), json!(-1), json!("soon")] {
            let odd = token(json!({"sub": "a", "exp": exp}));
            assert!(
                matches!(
                    auth.authenticate(Some(&odd), None),
                    Err(AuthError::Invalid(_))
                ),
                "exp {exp}"
            );
        }
    }

    #[test]
    fn send_is_allowed_only_to_the_users_the_token_names() {
        let auth = authenticator();
        let exp = unix_now_secs() + 60;
        let without = auth
            .authenticate(Some(&token(json!({"sub": "a", "exp": exp}))), None)
            .unwrap();
        assert!(!without.send.allows("bob"));
        let with = auth
            .authenticate(
                Some(&token(
                    json!({"sub": "a", "exp": exp, "send": ["bob", "team.*"]}),
                )),
                None,
            )
            .unwrap();
        assert!(with.send.allows("bob"));
        assert!(with.send.allows("team.carol"));
        assert!(!with.send.allows("bobby"));
        assert!(!with.send.allows("team"));
        let open = Authenticator::new(None).unwrap();
        assert_eq!(open.authenticate(None, None).unwrap().send, Access::All);
    }

    #[test]
    fn a_valid_token_gives_its_claims() {
        let exp = unix_now_secs() + 60;
        let identity = authenticator()
            .authenticate(
                Some(&token(
                    json!({"sub": "alice", "exp": exp, "rooms": ["chat.*"],
                    "publish": ["chat.lobby"], "info": {"name": "Alice"}}),
                )),
                None,
            )
            .unwrap();
        assert_eq!(identity.user, "alice");
        assert!(identity.rooms.allows("chat.x"));
        assert!(!identity.publish.allows("chat.x"));
        assert_eq!(identity.info, Some(json!({"name": "Alice"})));
        assert_eq!(identity.expires_at, Some(exp));
    }

    #[test]
    fn bad_tokens_are_refused() {
        let auth = authenticator();
        assert_eq!(
            auth.authenticate(None, Some("x")).unwrap_err(),
            AuthError::Missing
        );
        let expired = token(json!({"sub": "a", "exp": unix_now_secs() - 60}));
        assert_eq!(
            auth.authenticate(Some(&expired), None).unwrap_err(),
            AuthError::Expired
        );
        let within_leeway = token(json!({"sub": "a", "exp": unix_now_secs() - 2}));
        assert!(auth.authenticate(Some(&within_leeway), None).is_ok());
        let no_exp = token(json!({"sub": "a"}));
        assert!(matches!(
            auth.authenticate(Some(&no_exp), None),
            Err(AuthError::Invalid(_))
        ));
        let forged = encode(
            &Header::default(),
            &json!({"sub": "a", "exp": unix_now_secs() + 60}),
            &EncodingKey::from_secret(b"another-secret-of-16-bytes"),
        )
        .unwrap();
        assert!(matches!(
            auth.authenticate(Some(&forged), None),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            auth.authenticate(Some("not.a.jwt"), None),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn a_sub_that_is_no_valid_user_id_is_refused_with_its_own_error() {
        let auth = authenticator();
        let exp = unix_now_secs() + 60;
        for sub in ["", "a\nb", &"x".repeat(MAX_USER_LEN + 1)] {
            let error = auth
                .authenticate(Some(&token(json!({"sub": sub, "exp": exp}))), None)
                .unwrap_err();
            assert_eq!(error, AuthError::BadSub, "{sub:?}");
            assert_eq!(
                error.to_string(),
                "invalid token: sub must be 1 to 128 bytes without control characters"
            );
        }
    }

    #[test]
    fn an_unreadable_public_key_names_its_kind() {
        for (algorithm, prefix) in [
            (JwtAlgorithm::Rs256, "RSA public key: "),
            (JwtAlgorithm::Es256, "EC public key: "),
        ] {
            let error = Authenticator::new(Some(&JwtConfig {
                key: JwtKey::PublicKeyPem(b"not a PEM".to_vec()),
                algorithm,
                issuer: None,
                audience: None,
                leeway: Duration::from_secs(5),
            }))
            .err()
            .expect("refused");
            assert!(error.to_string().starts_with(prefix), "{error}");
        }
    }

    #[test]
    fn with_auth_off_the_user_comes_from_the_query_or_is_generated() {
        let auth = Authenticator::new(None).unwrap();
        assert_eq!(auth.authenticate(None, Some("bob")).unwrap().user, "bob");
        let anonymous = auth.authenticate(None, None).unwrap();
        assert!(anonymous.user.starts_with("anon-"));
        assert_eq!(anonymous.rooms, Access::All);
        assert_eq!(
            auth.authenticate(None, Some(&"x".repeat(MAX_USER_LEN + 1)))
                .unwrap_err(),
            AuthError::BadUser
        );
    }
}
