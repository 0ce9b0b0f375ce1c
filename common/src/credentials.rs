//! Which stored value a caller receives for a target.
//!
//! One rule for tokens and env alike: **user > group > role > target default**. With
//! several matching groups, the lexicographically smallest group name wins. The target's
//! isolation boundary limits which scopes may be used at all, because a process shared by
//! several callers must not carry one caller's secrets:
//!
//! | isolation   | scopes that may resolve |
//! |-------------|-------------------------|
//! | `shared`    | default                 |
//! | `per_role`  | default, role           |
//! | `per_group` | default, group          |
//! | `per_user`  | default, role, group, user |

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest per-request timeout an env `TIMEOUT` may set.
pub const MAX_TARGET_TIMEOUT: Duration = Duration::from_secs(3600);

/// An env `TIMEOUT`: whole seconds (`30`) or a duration (`90s`, `2m`), from one second up to
/// [`MAX_TARGET_TIMEOUT`]; anything else is `None`. The admin API refuses what this refuses,
/// and data planes ignore it, so no stored value can make a request wait without bound.
pub fn parse_target_timeout(text: &str) -> Option<Duration> {
    let text = text.trim();
    let parsed = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(text).ok()?,
    };
    (Duration::from_secs(1)..=MAX_TARGET_TIMEOUT).contains(&parsed).then_some(parsed)
}

/// Where a value is stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "scope", content = "value", rename_all = "snake_case")]
pub enum Scope {
    Default,
    Role(String),
    Group(String),
    User(String),
}

impl Scope {
    /// The scope's kind as stored and as it appears in URLs.
    pub fn kind(&self) -> ScopeKind {
        match self {
            Scope::Default => ScopeKind::Default,
            Scope::Role(_) => ScopeKind::Role,
            Scope::Group(_) => ScopeKind::Group,
            Scope::User(_) => ScopeKind::User,
        }
    }

    /// The scope's value: the role or group name or user id; empty for the default.
    pub fn value(&self) -> &str {
        match self {
            Scope::Default => "",
            Scope::Role(v) | Scope::Group(v) | Scope::User(v) => v,
        }
    }

    pub fn from_parts(kind: ScopeKind, value: &str) -> Self {
        match kind {
            ScopeKind::Default => Scope::Default,
            ScopeKind::Role => Scope::Role(value.to_string()),
            ScopeKind::Group => Scope::Group(value.to_string()),
            ScopeKind::User => Scope::User(value.to_string()),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Default => f.write_str("default"),
            other => write!(f, "{}:{}", other.kind().as_str(), other.value()),
        }
    }
}

/// The kind of a [`Scope`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ScopeKind {
    Default,
    Role,
    Group,
    User,
}

impl ScopeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Default => "default",
            ScopeKind::Role => "role",
            ScopeKind::Group => "group",
            ScopeKind::User => "user",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "default" => ScopeKind::Default,
            "role" => ScopeKind::Role,
            "group" => ScopeKind::Group,
            "user" => ScopeKind::User,
            _ => return None,
        })
    }
}

/// A target's isolation boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    Shared,
    PerRole,
    PerGroup,
    PerUser,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Shared => "shared",
            Isolation::PerRole => "per_role",
            Isolation::PerGroup => "per_group",
            Isolation::PerUser => "per_user",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "shared" => Isolation::Shared,
            "per_role" => Isolation::PerRole,
            "per_group" => Isolation::PerGroup,
            "per_user" => Isolation::PerUser,
            _ => return None,
        })
    }

    /// The boundary that limits which scopes a request to a `transport` target may draw on.
    ///
    /// An isolation boundary keeps one caller's secrets out of a process that others share,
    /// so it limits STDIO and Kubernetes targets only. An HTTP or SSE target gets an upstream
    /// session per client session, so every scope applies to it (user > group > role >
    /// default) whatever `isolation_boundary` says.
    pub fn limiting(self, transport: crate::model::TransportType) -> Isolation {
        if transport.runs_a_process() {
            self
        } else {
            Isolation::PerUser
        }
    }

    /// Whether values stored at `kind` may reach a process with this boundary.
    pub fn admits(self, kind: ScopeKind) -> bool {
        matches!(
            (self, kind),
            (_, ScopeKind::Default)
                | (Isolation::PerRole, ScopeKind::Role)
                | (Isolation::PerGroup, ScopeKind::Group)
                | (Isolation::PerUser, _)
        )
    }
}

/// The identity a value is resolved for.
#[derive(Debug, Clone, Copy)]
pub struct Principal<'a> {
    pub user_id: &'a str,
    pub role: &'a str,
    pub groups: &'a [String],
}

impl Principal<'_> {
    /// Rank of `scope` for this principal: lower wins, `None` when it does not apply.
    fn rank<'s>(&self, scope: &'s Scope) -> Option<(u8, &'s str)> {
        match scope {
            Scope::User(id) if id == self.user_id => Some((0, "")),
            Scope::Group(g) if self.groups.iter().any(|mine| mine == g) => Some((1, g.as_str())),
            Scope::Role(r) if r == self.role => Some((2, "")),
            Scope::Default => Some((3, "")),
            _ => None,
        }
    }
}

/// Picks the entry that applies to `principal` under `isolation`, or `None`.
///
/// `entries` are the stored values for one thing (one env key, or the target token) at
/// their scopes.
pub fn resolve<'e, T>(
    entries: impl IntoIterator<Item = (&'e Scope, T)>,
    principal: &Principal<'_>,
    isolation: Isolation,
) -> Option<(&'e Scope, T)> {
    entries
        .into_iter()
        .filter(|(scope, _)| isolation.admits(scope.kind()))
        .filter_map(|(scope, value)| principal.rank(scope).map(|rank| (rank, scope, value)))
        .min_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, scope, value)| (scope, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes() -> Vec<Scope> {
        vec![
            Scope::Default,
            Scope::Role("developer".into()),
            Scope::Group("zeta".into()),
            Scope::Group("alpha".into()),
            Scope::User("u1".into()),
            Scope::User("u2".into()),
        ]
    }

    fn pick(isolation: Isolation, user: &str, role: &str, groups: &[&str], available: &[usize]) -> Option<Scope> {
        let all = scopes();
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let principal = Principal { user_id: user, role, groups: &groups };
        resolve(available.iter().map(|&i| (&all[i], i)), &principal, isolation).map(|(s, _)| s.clone())
    }

    #[test]
    fn precedence_user_group_role_default() {
        let all = [0, 1, 2, 3, 4, 5];
        assert_eq!(
            pick(Isolation::PerUser, "u1", "developer", &["zeta", "alpha"], &all),
            Some(Scope::User("u1".into()))
        );
        assert_eq!(
            pick(Isolation::PerUser, "u3", "developer", &["zeta", "alpha"], &all),
            Some(Scope::Group("alpha".into()))
        );
        assert_eq!(pick(Isolation::PerUser, "u3", "developer", &["zeta"], &all), Some(Scope::Group("zeta".into())));
        assert_eq!(pick(Isolation::PerUser, "u3", "developer", &[], &all), Some(Scope::Role("developer".into())));
        assert_eq!(pick(Isolation::PerUser, "u3", "ops", &[], &all), Some(Scope::Default));
        assert_eq!(pick(Isolation::PerUser, "u3", "ops", &[], &[1, 2, 4]), None);
    }

    #[test]
    fn timeouts_are_seconds_or_durations_and_bounded() {
        assert_eq!(parse_target_timeout("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_target_timeout(" 1m 30s "), Some(Duration::from_secs(90)));
        for bad in ["0", "0s", "soon", "3601", "2h", "18446744073709551615", "999999999999999999999y", ""] {
            assert_eq!(parse_target_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn isolation_limits_scopes() {
        let all = [0, 1, 2, 3, 4, 5];
        assert_eq!(pick(Isolation::Shared, "u1", "developer", &["alpha"], &all), Some(Scope::Default));
        assert_eq!(
            pick(Isolation::PerRole, "u1", "developer", &["alpha"], &all),
            Some(Scope::Role("developer".into()))
        );
        assert_eq!(pick(Isolation::PerGroup, "u1", "developer", &["alpha"], &all), Some(Scope::Group("alpha".into())));
        assert_eq!(pick(Isolation::Shared, "u1", "developer", &["alpha"], &[1, 3, 4]), None);
    }
}
