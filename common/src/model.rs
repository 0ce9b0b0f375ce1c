//! The vocabulary shared by the store, the API and the snapshot: transports, policy
//! effects, subjects and the like, each stored and sent as a fixed lowercase string.

use serde::{Deserialize, Serialize};

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
impl TransportType {
    /// Whether the target's env reaches a process (a STDIO child or a pod) as its environment,
    /// rather than travelling as headers to an HTTP server.
    pub fn runs_a_process(self) -> bool {
        matches!(self, TransportType::Stdio | TransportType::Kubernetes)
    }
}

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
