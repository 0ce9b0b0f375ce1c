//! What the gateway adds to requests for an HTTP or SSE upstream, from the snapshot's sealed
//! credentials.
//!
//! One rule for tokens and env alike: user > group > role > target default (several groups:
//! group name order), limited by the target's isolation boundary (`shared` → default only,
//! `per_role` → + role, `per_group` → + group, `per_user` → all) exactly as the control plane's
//! `env/resolve` view reports it, so what an admin is shown is what is sent.
//! As in the original gateway, env keys `AUTH_TOKEN` (the token, overriding the one set through
//! the token endpoints), `AUTH_HEADER` (the header carrying it), `BASE_URL` (overrides the
//! target URL) and `TIMEOUT` (seconds, or a duration such as `90s`) are reserved; every other
//! key travels as an `X-Env-<KEY>` header. Values are opened only here, and never logged.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use base64::Engine as _;
use reflow_common::credentials::{resolve, Principal, Scope};
use reflow_common::crypto::DeterministicSealer;
use reflow_common::model::{AuthType, SecretKind};
use reflow_proto::resources::{Credential, Target, User};

use crate::snapshot::View;

/// Credentials resolved for one user and target.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Injection {
    pub base_url: Option<String>,
    pub timeout: Option<Duration>,
    /// Marked sensitive, so they are never printed.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Where the token came from (`user`, `group:ops`, `role:developer`, `default`), for
    /// audit records; never the value.
    pub token_source: Option<String>,
}

impl std::fmt::Debug for Injection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injection")
            .field("base_url", &self.base_url.as_ref().map(|_| "<set>"))
            .field("timeout", &self.timeout)
            .field("headers", &self.headers.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>())
            .field("token_source", &self.token_source)
            .finish()
    }
}

fn source(scope: &Scope) -> String {
    match scope {
        Scope::Default => "default".into(),
        Scope::User(_) => "user".into(),
        Scope::Group(group) => format!("group:{group}"),
        Scope::Role(role) => format!("role:{role}"),
    }
}

/// Resolves what `user` sends to `target`. An entry that does not open (it cannot: the
/// snapshot was validated) or does not fit in a header is left out, with a warning naming
/// the key only.
pub fn resolve_injection(view: &View, sealer: &DeterministicSealer, target: &Target, user: &User) -> Injection {
    let principal = Principal { user_id: &user.id, role: &user.role, groups: &user.groups };
    let boundary = target.isolation_boundary.limiting(target.transport_type);
    let (tokens, env) = entries(view, target);
    let pick = |entries: &[&Credential]| -> Option<(String, String)> {
        let (scope, credential) = resolve(entries.iter().map(|c| (&c.scope, *c)), &principal, boundary)?;
        Some((source(scope), open(sealer, credential)?))
    };

    let mut injection = Injection::default();
    let mut token = pick(&tokens);
    let mut header_name = target.auth_header_name.clone();
    for (key, entries) in &env {
        let Some((scope, value)) = pick(entries) else { continue };
        match *key {
            "AUTH_TOKEN" => {
                token = Some((scope, value));
            }
            "AUTH_HEADER" => {
                header_name = Some(value);
            }
            "BASE_URL" => {
                injection.base_url = Some(value);
            }
            "TIMEOUT" => match reflow_common::credentials::parse_target_timeout(&value) {
                Some(timeout) => injection.timeout = Some(timeout),
                None => {
                    tracing::warn!(target = %target.name, "env TIMEOUT is not 1 s to 1 h (seconds or a duration); ignored")
                }
            },
            _ => {
                push_header(&mut injection.headers, &format!("X-Env-{key}"), &value, &target.name);
            }
        }
    }
    if let Some((scope, value)) = token {
        let header = match target.auth_type {
            AuthType::None => None,
            AuthType::Bearer => Some(("authorization".to_string(), format!("Bearer {value}"))),
            AuthType::Header => Some((header_name.unwrap_or_else(|| "authorization".into()), value)),
        };
        if let Some((name, value)) = header {
            if push_header(&mut injection.headers, &name, &value, &target.name) {
                injection.token_source = Some(scope);
            }
        }
    }
    injection
}

/// The environment a STDIO or Kubernetes target's process gets for `user`: every env key
/// resolved under the target's isolation boundary, and the token as `AUTH_TOKEN` unless an env
/// `AUTH_TOKEN` resolved.
pub fn resolve_env(
    view: &View,
    sealer: &DeterministicSealer,
    target: &Target,
    user: &User,
) -> BTreeMap<String, String> {
    let principal = Principal { user_id: &user.id, role: &user.role, groups: &user.groups };
    let boundary = target.isolation_boundary.limiting(target.transport_type);
    let (tokens, keyed) = entries(view, target);
    let pick = |entries: &[&Credential]| -> Option<(bool, String)> {
        let (scope, credential) = resolve(entries.iter().map(|c| (&c.scope, *c)), &principal, boundary)?;
        Some((matches!(scope, Scope::User(_)), open(sealer, credential)?))
    };
    let mut env = BTreeMap::new();
    for (key, entries) in &keyed {
        let Some((from_user, value)) = pick(entries) else { continue };
        // The control plane never stores these at a user scope; a value that got there anyway
        // (written before the rule, or by a broken control plane) never reaches a process.
        if from_user && reflow_common::names::changes_execution(key) {
            tracing::warn!(target = %target.name, key = %key, "a user-scope env value that changes what the process runs was dropped");
            continue;
        }
        env.insert(key.to_string(), value);
    }
    if !env.contains_key("AUTH_TOKEN") {
        if let Some((_, token)) = pick(&tokens) {
            env.insert("AUTH_TOKEN".into(), token);
        }
    }
    env
}

/// Every stored value of `target` (tokens and env, at every scope), opened: what audit records
/// mask wherever it appears in recorded arguments.
pub fn stored_values(view: &View, sealer: &DeterministicSealer, target: &Target) -> Vec<String> {
    view.credentials.iter().filter(|c| c.target_id == target.id).filter_map(|c| open(sealer, c)).collect()
}

/// A target's stored values at every scope: its tokens, and its env entries by key.
type Entries<'v> = (Vec<&'v Credential>, BTreeMap<&'v str, Vec<&'v Credential>>);

fn entries<'v>(view: &'v View, target: &Target) -> Entries<'v> {
    let mut tokens = Vec::new();
    let mut env: BTreeMap<&str, Vec<&Credential>> = BTreeMap::new();
    for credential in view.credentials.iter().filter(|c| c.target_id == target.id) {
        match credential.kind {
            SecretKind::Token => tokens.push(credential),
            SecretKind::Env => env.entry(credential.name.as_str()).or_default().push(credential),
        }
    }
    (tokens, env)
}

fn open(sealer: &DeterministicSealer, credential: &Credential) -> Option<String> {
    let aad = Credential::aad(&credential.target_id, credential.kind, &credential.scope, &credential.name);
    let sealed = base64::engine::general_purpose::STANDARD.decode(&credential.sealed).ok()?;
    let value = sealer.open(&sealed, &aad).ok()?;
    String::from_utf8(value.to_vec()).ok()
}

fn push_header(headers: &mut Vec<(HeaderName, HeaderValue)>, name: &str, value: &str, target: &str) -> bool {
    match (HeaderName::try_from(name), HeaderValue::try_from(value)) {
        (Ok(name), Ok(mut value)) => {
            value.set_sensitive(true);
            headers.push((name, value));
            true
        }
        _ => {
            tracing::warn!(%target, header = %name, "a credential does not fit in an HTTP header; not sent");
            false
        }
    }
}
