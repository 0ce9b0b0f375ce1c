//! The records the store keeps. Types that carry no secret double as REST responses.

use chrono::{DateTime, Utc};
use reflow_common::credentials::{Isolation, Scope};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The role that may administer the gateway.
pub const ADMIN_ROLE: &str = "admin";
/// The role new users get unless an admin says otherwise.
pub const DEFAULT_ROLE: &str = "user";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    /// `admin` administers the gateway; any other role is a name policies and credentials
    /// can refer to.
    pub role: String,
    /// Sorted group names.
    pub groups: Vec<String>,
    pub active: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl User {
    pub fn is_admin(&self) -> bool {
        self.role == ADMIN_ROLE
    }
}

#[derive(Debug, Clone)]
pub struct NewUser {
    pub email: String,
    pub password_hash: String,
    pub role: String,
    pub groups: Vec<String>,
    pub active: bool,
}

/// Fields of a user to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UserUpdate {
    pub role: Option<String>,
    pub groups: Option<Vec<String>>,
    pub active: Option<bool>,
    pub password_hash: Option<String>,
}

/// An API token's metadata. The token itself is shown once, at creation; only its hash is
/// stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ApiToken {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    /// The first characters of the token, to recognise it by.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct NewApiToken {
    pub user_id: Uuid,
    pub name: String,
    pub hash: Vec<u8>,
    pub prefix: String,
    pub expires_at: Option<DateTime<Utc>>,
}

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }
    };
}

text_enum!(
    /// How the gateway reaches a target.
    TransportType { StreamableHttp = "streamable-http", Sse = "sse", Stdio = "stdio", Kubernetes = "kubernetes" }
);
text_enum!(
    /// Whether a target keeps per-session state (decides session affinity upstream).
    Statefulness { Stateless = "stateless", Stateful = "stateful" }
);
text_enum!(
    /// How the resolved token is sent to an HTTP or SSE target.
    AuthType { Bearer = "bearer", Header = "header", None = "none" }
);
text_enum!(
    /// What a policy applies to.
    ResourceType { All = "all", Tool = "tool", Resource = "resource", Prompt = "prompt" }
);
text_enum!(
    Effect { Allow = "allow", Deny = "deny" }
);
text_enum!(
    /// Who a policy applies to.
    SubjectType { User = "user", Role = "role", Group = "group", Everyone = "everyone" }
);
text_enum!(
    /// The two kinds of per-scope secret a target has.
    SecretKind { Token = "token", Env = "env" }
);

/// A validated target definition, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    pub name: String,
    pub description: String,
    pub transport_type: TransportType,
    pub url: Option<String>,
    pub command: Option<String>,
    pub args: Vec<String>,
    pub image: Option<String>,
    pub port: Option<i32>,
    pub health_path: Option<String>,
    pub statefulness: Statefulness,
    pub isolation_boundary: Isolation,
    pub auth_type: AuthType,
    pub auth_header_name: Option<String>,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Target {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub transport_type: TransportType,
    pub url: Option<String>,
    pub command: Option<String>,
    pub args: Vec<String>,
    pub image: Option<String>,
    pub port: Option<i32>,
    pub health_path: Option<String>,
    pub statefulness: Statefulness,
    pub isolation_boundary: Isolation,
    pub auth_type: AuthType,
    pub auth_header_name: Option<String>,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Target {
    pub fn spec(&self) -> TargetSpec {
        TargetSpec {
            name: self.name.clone(),
            description: self.description.clone(),
            transport_type: self.transport_type,
            url: self.url.clone(),
            command: self.command.clone(),
            args: self.args.clone(),
            image: self.image.clone(),
            port: self.port,
            health_path: self.health_path.clone(),
            statefulness: self.statefulness,
            isolation_boundary: self.isolation_boundary,
            auth_type: self.auth_type,
            auth_header_name: self.auth_header_name.clone(),
            enabled: self.enabled,
        }
    }
}

/// A sealed secret of a target at one scope. `name` is the env key, or empty for the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEntry {
    pub target_id: Uuid,
    pub kind: SecretKind,
    pub scope: Scope,
    pub name: String,
    pub ciphertext: Vec<u8>,
    pub key_version: i32,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    pub name: String,
    pub description: String,
    pub target_id: Option<Uuid>,
    pub resource_type: ResourceType,
    pub pattern: Option<String>,
    pub effect: Effect,
    pub priority: i32,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, ToSchema)]
pub struct SubjectSpec {
    pub subject_type: SubjectType,
    /// User id, role or group name; empty for `everyone`.
    #[serde(default)]
    pub subject_value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct PolicySubject {
    pub id: Uuid,
    pub subject_type: SubjectType,
    pub subject_value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Policy {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    /// The target the policy applies to; `null` for every target.
    pub target_id: Option<Uuid>,
    pub resource_type: ResourceType,
    /// Anchored glob on the unprefixed tool, prompt or resource name; `null` matches all.
    pub pattern: Option<String>,
    pub effect: Effect,
    /// Higher is evaluated first; at equal priority deny wins.
    pub priority: i32,
    pub enabled: bool,
    pub subjects: Vec<PolicySubject>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}
