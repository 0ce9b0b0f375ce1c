//! Pieces that more than one Reflow role needs and that must behave identically in each:
//! the encryption envelope for secrets at rest and in snapshots, configuration loading,
//! the credential-resolution rule, and the validation of names that appear on the wire.
//!
//! Nothing here does I/O beyond what the caller hands in (config text and an environment
//! map), so every function is testable with plain values.
//!
//! # Layout
//! - [`bearer`]: reading `Authorization: Bearer` (and refusing tokens in query strings).
//! - [`jwt`]: the control plane's Ed25519 tokens: signing, and the one verification every role runs.
//! - [`crypto`]: AES-256-GCM envelope with key versions and associated data.
//! - [`config`]: the YAML config, `${ENV}` expansion, defaults and validation.
//! - [`credentials`]: which scope's value a caller receives (user > group > role > default,
//!   limited by the target's isolation boundary).
//! - [`names`]: the grammar of target names, role and group names, env keys and patterns.
//! - [`glob`]: the anchored glob used by policy patterns.
//! - [`model`]: the fixed vocabularies (transport types, effects, subject types, …).
//! - [`uri`]: the normal form of resource URIs that policies decide on.
//! - [`logging`]: line-buffered, control-character-escaped logs to stderr.
//! - [`text`]: the Unix clock and cutting text to a size, keeping its tail.
//! - `server` (feature `server`): the HTTP listener every role serves through, with header and
//!   body timeouts and a connection limit.
//! - `telemetry` (feature `telemetry`): the metrics registry, W3C trace context, and the
//!   OTLP exporter.

pub mod bearer;
pub mod config;
pub mod credentials;
pub mod crypto;
pub mod glob;
pub mod jwt;
pub mod logging;
pub mod model;
pub mod names;
#[cfg(feature = "server")]
pub mod net;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "telemetry")]
pub mod telemetry;
pub mod text;
pub mod uri;
