//! Durable state behind one interface, [`Store`], with two backends built from the same SQL:
//! PostgreSQL for production and SQLite for the zero-setup `reflow up`.
//!
//! Every operation that writes more than one row runs in one transaction, so a failure
//! leaves nothing half-written. Migrations are numbered files under `migrations/<backend>`,
//! embedded at build time and applied on connect (PostgreSQL takes an advisory lock, so
//! replicas starting together apply them once; SQLite serialises writers itself).

mod model;
mod sql;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reflow_common::credentials::Scope;
use sqlx::{ConnectOptions, Connection};
use uuid::Uuid;

pub use model::*;
pub use sql::{PostgresStore, SqliteStore};

/// What went wrong in the store, in terms the API can map to a status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error")]
    Database(#[source] sqlx::Error),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The store shared by the API handlers.
pub type DynStore = Arc<dyn Store>;

/// Every durable operation of the control plane.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Which backend this is: `postgres` or `sqlite`.
    fn backend(&self) -> &'static str;
    /// Checks the database answers.
    async fn ping(&self) -> StoreResult<()>;

    /// Creates a user through self-registration: the very first user ever registered
    /// becomes `admin` whatever `new.role` says; this is decided atomically.
    async fn register_user(&self, new: NewUser) -> StoreResult<User>;
    /// Creates a user as given (an admin's action).
    async fn create_user(&self, new: NewUser) -> StoreResult<User>;
    async fn get_user(&self, id: Uuid) -> StoreResult<Option<User>>;
    /// The user with this (normalised) email and their password hash.
    async fn user_by_email(&self, email: &str) -> StoreResult<Option<(User, String)>>;
    async fn list_users(&self) -> StoreResult<Vec<User>>;
    /// Applies `update`; refuses to leave the gateway without an active admin.
    async fn update_user(&self, id: Uuid, update: UserUpdate) -> StoreResult<User>;
    /// Deletes a user with their tokens, user-scoped secrets and policy subjects; refuses to
    /// delete the last active admin.
    async fn delete_user(&self, id: Uuid) -> StoreResult<()>;

    async fn create_api_token(&self, new: NewApiToken) -> StoreResult<ApiToken>;
    async fn list_api_tokens(&self, user_id: Uuid) -> StoreResult<Vec<ApiToken>>;
    async fn delete_api_token(&self, user_id: Uuid, token_id: Uuid) -> StoreResult<()>;
    /// The token with this hash and its owner.
    async fn api_token_by_hash(&self, hash: &[u8]) -> StoreResult<Option<(ApiToken, User)>>;
    async fn touch_api_token(&self, token_id: Uuid, at: DateTime<Utc>) -> StoreResult<()>;

    async fn create_target(&self, spec: TargetSpec) -> StoreResult<Target>;
    async fn list_targets(&self) -> StoreResult<Vec<Target>>;
    async fn get_target(&self, id: Uuid) -> StoreResult<Option<Target>>;
    async fn update_target(&self, id: Uuid, spec: TargetSpec) -> StoreResult<Target>;
    async fn delete_target(&self, id: Uuid) -> StoreResult<()>;
    /// Bumps the target's restart generation (data planes restart its processes); returns it.
    async fn restart_target(&self, id: Uuid) -> StoreResult<i64>;
    /// Bumps a user's session generation (data planes recycle that user's sessions when
    /// their snapshot carries the new one); returns it.
    async fn recycle_user(&self, id: Uuid) -> StoreResult<i64>;

    /// Inserts or replaces a sealed secret. The ciphertext must already be bound to
    /// `(target, kind, scope, name)` by its associated data.
    async fn put_secret(&self, entry: SecretEntry) -> StoreResult<()> {
        self.put_secrets(vec![entry]).await
    }
    /// Inserts or replaces several sealed secrets in one transaction: all of them or none.
    async fn put_secrets(&self, entries: Vec<SecretEntry>) -> StoreResult<()>;
    async fn delete_secret(&self, target_id: Uuid, kind: SecretKind, scope: &Scope, name: &str) -> StoreResult<()>;
    /// Deletes every secret of a kind at one scope (all env keys of a role, say); returns
    /// how many were deleted.
    async fn delete_scope_secrets(&self, target_id: Uuid, kind: SecretKind, scope: &Scope) -> StoreResult<u64>;
    async fn list_secrets(&self, target_id: Uuid, kind: Option<SecretKind>) -> StoreResult<Vec<SecretEntry>>;
    /// How many values are stored at `user_id`'s user scope over every target, and their sealed
    /// bytes.
    async fn user_secret_usage(&self, user_id: Uuid) -> StoreResult<(u64, u64)>;

    async fn create_policy(&self, spec: PolicySpec, subjects: Vec<SubjectSpec>) -> StoreResult<Policy>;
    async fn list_policies(&self) -> StoreResult<Vec<Policy>>;
    async fn get_policy(&self, id: Uuid) -> StoreResult<Option<Policy>>;
    /// Replaces the policy's fields, and its subjects when `subjects` is given.
    async fn update_policy(
        &self,
        id: Uuid,
        spec: PolicySpec,
        subjects: Option<Vec<SubjectSpec>>,
    ) -> StoreResult<Policy>;
    async fn delete_policy(&self, id: Uuid) -> StoreResult<()>;
    async fn add_policy_subject(&self, policy_id: Uuid, subject: SubjectSpec) -> StoreResult<PolicySubject>;
    async fn remove_policy_subject(&self, policy_id: Uuid, subject_id: Uuid) -> StoreResult<()>;

    /// The owner labels of resources managed from declarative configuration.
    async fn owners(&self) -> StoreResult<Owners>;
    /// Writes a declarative apply in one transaction: all of it lands, or none.
    async fn apply_writes(&self, writes: Vec<Write>) -> StoreResult<()>;

    /// Stores `ciphertext` as the first session key unless a key exists already (several
    /// replicas may start at once: one of them wins).
    async fn ensure_session_key(&self, ciphertext: Vec<u8>) -> StoreResult<()>;
    /// Makes `ciphertext` the newest session key; the keys it replaces retire at `retire_at`
    /// (those retiring later are brought forward to it), and keys retired before `forget_before`
    /// are deleted. Returns the new key.
    async fn rotate_session_key(
        &self,
        ciphertext: Vec<u8>,
        retire_at: DateTime<Utc>,
        forget_before: DateTime<Utc>,
    ) -> StoreResult<SessionKeyEntry>;

    /// Records MCP sessions ended on some data plane (nonce, until when as Unix seconds), and
    /// forgets those whose time has passed. PostgreSQL tells every listening replica.
    async fn end_sessions(&self, ended: &[(String, i64)]) -> StoreResult<()>;
    /// The ended sessions whose time has not passed.
    async fn ended_sessions(&self) -> StoreResult<Vec<(String, i64)>>;

    /// Everything snapshots are compiled from, as of one moment.
    async fn load_state(&self) -> StoreResult<StoreState>;
    /// Records a data plane's status (insert or replace).
    async fn put_data_plane(&self, status: &DataPlaneStatus) -> StoreResult<()>;
    async fn list_data_planes(&self) -> StoreResult<Vec<DataPlaneStatus>>;
    /// Appends `records` to their data planes' audit chains in one transaction, each record
    /// once (a record whose id is stored already is skipped); returns how many were new.
    async fn append_audit(&self, records: &[crate::audit::AuditRecord]) -> StoreResult<u64>;
    /// Stored audit records, newest first, matching `filter`.
    async fn list_audit(&self, filter: &AuditFilter) -> StoreResult<Vec<crate::audit::AuditRecord>>;
    /// Every stored audit record in chain order (data plane, seq), with each data plane's
    /// pruning anchor, for verification.
    async fn audit_chains(
        &self,
    ) -> StoreResult<(Vec<crate::audit::StoredRecord>, HashMap<String, crate::audit::Anchor>)>;
    /// Removes records older than `before`, moving each data plane's anchor to the last one
    /// removed; returns how many were removed.
    async fn prune_audit(&self, before: DateTime<Utc>) -> StoreResult<u64>;
    /// Records the version a control-plane replica serves.
    async fn put_control_plane(&self, status: &ControlPlaneStatus) -> StoreResult<()>;
    async fn list_control_planes(&self) -> StoreResult<Vec<ControlPlaneStatus>>;
    /// Wakes `notify` whenever another process commits a change snapshots depend on, until
    /// `shutdown` is cancelled. PostgreSQL: `LISTEN reflow_changes`. SQLite has one process,
    /// which signals itself, so it returns at once.
    async fn listen_for_changes(&self, notify: Arc<tokio::sync::Notify>, shutdown: tokio_util::sync::CancellationToken);
    /// Sends the sessions other replicas record ended (see [`Store::end_sessions`]) to `ended`,
    /// until `shutdown` is cancelled or `ended` closes, beginning with every one recorded (and
    /// again after a lost connection, since some may have been missed). PostgreSQL: `LISTEN
    /// reflow_sessions`. SQLite has one process: it sends those recorded and returns.
    async fn listen_for_ended_sessions(
        &self,
        ended: tokio::sync::mpsc::Sender<Vec<(String, i64)>>,
        shutdown: tokio_util::sync::CancellationToken,
    );
}

/// Which audit records to read: every field optional, newest first, `limit` at most 1000.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub user_id: Option<String>,
    pub target: Option<String>,
    pub method: Option<String>,
    pub name: Option<String>,
    pub decision: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub limit: u32,
    pub offset: u32,
    /// Only records after (older than, in listing order) the record with this id: a cursor.
    /// A cursor whose record is gone (pruned) matches nothing.
    pub after: Option<String>,
}

/// How long a request waits for a database connection before it answers 503. Short on
/// purpose: with the database down, admin writes fail fast and clearly instead of hanging.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

/// Connects to `url` (`postgres://…` or `sqlite:…`) and applies pending migrations.
pub async fn connect(url: &str, max_connections: u32) -> StoreResult<DynStore> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let options = sqlx::postgres::PgConnectOptions::from_str(url).map_err(StoreError::Unavailable)?;
        // One direct connection first: a pool that cannot connect reports only a timeout,
        // while this names the cause (refused, authentication, unknown database).
        options.connect().await.map_err(StoreError::Unavailable)?.close().await.map_err(StoreError::Unavailable)?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(StoreError::Unavailable)?;
        sqlx::migrate!("../migrations/postgres").run(&pool).await.map_err(StoreError::Migrate)?;
        Ok(Arc::new(PostgresStore::new(pool)))
    } else if url.starts_with("sqlite:") {
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
            .map_err(StoreError::Unavailable)?
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(max_connections.clamp(1, 8))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(StoreError::Unavailable)?;
        sqlx::migrate!("../migrations/sqlite").run(&pool).await.map_err(StoreError::Migrate)?;
        Ok(Arc::new(SqliteStore::new(pool)))
    } else {
        Err(StoreError::Corrupt(format!(
            "database URL must start with postgres://, postgresql:// or sqlite: (got {})",
            url.split(':').next().unwrap_or("")
        )))
    }
}

/// The current time at the precision both backends keep (microseconds), so values read
/// back compare equal to the values written.
pub fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}
