//! The SQL behind [`Store`], written once and instantiated for PostgreSQL and SQLite.
//!
//! Both dialects accept the same statements here (`$n` placeholders, `ON CONFLICT`,
//! `RETURNING`); column types differ only in the migrations. A macro rather than generic
//! code keeps each instantiation concrete: sqlx's generic bounds over `Database` would
//! otherwise have to be restated on every function.
//!
//! SQLite note: a deferred transaction that reads before it writes can fail to upgrade its
//! lock under contention, so every multi-statement transaction here writes first.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reflow_common::credentials::{Isolation, Scope, ScopeKind};
use sqlx::Row;
use uuid::Uuid;

use super::*;

/// The settings row whose presence records that the first admin exists. Transactions that
/// can change who is an admin lock it first, so they run one at a time.
const FIRST_ADMIN_KEY: &str = "first_admin";

const USER_COLUMNS: &str = "id, email, role, active, created_at, updated_at, session_generation";
const TOKEN_COLUMNS: &str = "id, user_id, name, prefix, created_at, expires_at, last_used_at";
const TARGET_COLUMNS: &str = "id, name, description, transport_type, url, command, args, image, port, health_path, \
     statefulness, isolation_boundary, auth_type, auth_header_name, enabled, env_keys, audit_arguments, created_at, updated_at";
const POLICY_COLUMNS: &str =
    "id, name, description, target_id, resource_type, pattern, effect, priority, enabled, created_at, updated_at";

/// Maps a driver error; `conflict` is the message for a unique-constraint violation.
fn classify(error: sqlx::Error, conflict: &str) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(conflict.to_string()),
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => StoreError::NotFound("referenced record".into()),
        sqlx::Error::Database(db)
            if db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300") =>
        {
            StoreError::Unavailable(error)
        }
        // Connection-level failures: the database went away (or the link to it), not bad data.
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(error),
        _ => StoreError::Database(error),
    }
}

fn db(error: sqlx::Error) -> StoreError {
    classify(error, "conflicting record")
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("unknown {what} {value:?}"))
}

fn parse_text<T>(what: &str, value: String, parse: impl Fn(&str) -> Option<T>) -> StoreResult<T> {
    parse(&value).ok_or_else(|| corrupt(what, &value))
}

macro_rules! sql_store {
    ($Store:ident, $Db:ty, $Row:ty, $backend:literal, $snapshot_isolation:literal) => {
        /// The store on one backend.
        #[derive(Debug, Clone)]
        pub struct $Store {
            pool: sqlx::Pool<$Db>,
        }

        impl $Store {
            pub fn new(pool: sqlx::Pool<$Db>) -> Self {
                $Store { pool }
            }

            /// The underlying pool, for callers that need the database itself (change
            /// notification, tests).
            pub fn pool(&self) -> &sqlx::Pool<$Db> {
                &self.pool
            }

            async fn session_keys_in<'e, E>(executor: E) -> StoreResult<Vec<SessionKeyEntry>>
            where
                E: sqlx::Executor<'e, Database = $Db>,
            {
                sqlx::query("SELECT generation, ciphertext, created_at, retire_at FROM session_keys ORDER BY generation")
                    .fetch_all(executor)
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|row| {
                        Ok(SessionKeyEntry {
                            generation: row.try_get("generation").map_err(db)?,
                            ciphertext: row.try_get("ciphertext").map_err(db)?,
                            created_at: row.try_get("created_at").map_err(db)?,
                            retire_at: row.try_get("retire_at").map_err(db)?,
                        })
                    })
                    .collect()
            }

            fn user_from_row(row: &$Row, groups: Vec<String>) -> StoreResult<User> {
                Ok(User {
                    id: row.try_get("id").map_err(db)?,
                    email: row.try_get("email").map_err(db)?,
                    role: row.try_get("role").map_err(db)?,
                    groups,
                    active: row.try_get("active").map_err(db)?,
                    created_at: row.try_get("created_at").map_err(db)?,
                    updated_at: row.try_get("updated_at").map_err(db)?,
                    session_generation: row.try_get("session_generation").map_err(db)?,
                })
            }

            fn token_from_row(row: &$Row) -> StoreResult<ApiToken> {
                Ok(ApiToken {
                    id: row.try_get("id").map_err(db)?,
                    user_id: row.try_get("user_id").map_err(db)?,
                    name: row.try_get("name").map_err(db)?,
                    prefix: row.try_get("prefix").map_err(db)?,
                    created_at: row.try_get("created_at").map_err(db)?,
                    expires_at: row.try_get("expires_at").map_err(db)?,
                    last_used_at: row.try_get("last_used_at").map_err(db)?,
                })
            }

            fn target_from_row(row: &$Row) -> StoreResult<Target> {
                let args: String = row.try_get("args").map_err(db)?;
                let env_keys: String = row.try_get("env_keys").map_err(db)?;
                Ok(Target {
                    id: row.try_get("id").map_err(db)?,
                    name: row.try_get("name").map_err(db)?,
                    description: row.try_get("description").map_err(db)?,
                    transport_type: parse_text("transport", row.try_get("transport_type").map_err(db)?, TransportType::parse)?,
                    url: row.try_get("url").map_err(db)?,
                    command: row.try_get("command").map_err(db)?,
                    args: serde_json::from_str(&args).map_err(|_| corrupt("args", &args))?,
                    image: row.try_get("image").map_err(db)?,
                    port: row.try_get("port").map_err(db)?,
                    health_path: row.try_get("health_path").map_err(db)?,
                    statefulness: parse_text("statefulness", row.try_get("statefulness").map_err(db)?, Statefulness::parse)?,
                    isolation_boundary: parse_text("isolation", row.try_get("isolation_boundary").map_err(db)?, Isolation::parse)?,
                    auth_type: parse_text("auth type", row.try_get("auth_type").map_err(db)?, AuthType::parse)?,
                    auth_header_name: row.try_get("auth_header_name").map_err(db)?,
                    enabled: row.try_get("enabled").map_err(db)?,
                    env_keys: serde_json::from_str(&env_keys).map_err(|_| corrupt("env keys", &env_keys))?,
                    audit_arguments: row.try_get("audit_arguments").map_err(db)?,
                    restart_generation: row.try_get("restart_generation").map_err(db)?,
                    created_at: row.try_get("created_at").map_err(db)?,
                    updated_at: row.try_get("updated_at").map_err(db)?,
                })
            }

            fn secret_from_row(row: &$Row) -> StoreResult<SecretEntry> {
                let kind: String = row.try_get("scope_type").map_err(db)?;
                let value: String = row.try_get("scope_value").map_err(db)?;
                let scope_kind = ScopeKind::parse(&kind).ok_or_else(|| corrupt("scope", &kind))?;
                Ok(SecretEntry {
                    target_id: row.try_get("target_id").map_err(db)?,
                    kind: parse_text("secret kind", row.try_get("kind").map_err(db)?, SecretKind::parse)?,
                    scope: Scope::from_parts(scope_kind, &value),
                    name: row.try_get("name").map_err(db)?,
                    ciphertext: row.try_get("ciphertext").map_err(db)?,
                    key_version: row.try_get("key_version").map_err(db)?,
                    description: row.try_get("description").map_err(db)?,
                    updated_at: row.try_get("updated_at").map_err(db)?,
                })
            }

            fn policy_from_row(row: &$Row, subjects: Vec<PolicySubject>) -> StoreResult<Policy> {
                Ok(Policy {
                    id: row.try_get("id").map_err(db)?,
                    name: row.try_get("name").map_err(db)?,
                    description: row.try_get("description").map_err(db)?,
                    target_id: row.try_get("target_id").map_err(db)?,
                    resource_type: parse_text("resource type", row.try_get("resource_type").map_err(db)?, ResourceType::parse)?,
                    pattern: row.try_get("pattern").map_err(db)?,
                    effect: parse_text("effect", row.try_get("effect").map_err(db)?, Effect::parse)?,
                    priority: row.try_get("priority").map_err(db)?,
                    enabled: row.try_get("enabled").map_err(db)?,
                    subjects,
                    created_at: row.try_get("created_at").map_err(db)?,
                    updated_at: row.try_get("updated_at").map_err(db)?,
                })
            }

            async fn groups_of<'e, E>(executor: E, user_id: Uuid) -> StoreResult<Vec<String>>
            where
                E: sqlx::Executor<'e, Database = $Db>,
            {
                let rows = sqlx::query("SELECT group_name FROM user_groups WHERE user_id = $1 ORDER BY group_name")
                    .bind(user_id)
                    .fetch_all(executor)
                    .await
                    .map_err(db)?;
                rows.iter().map(|r| r.try_get::<String, _>("group_name").map_err(db)).collect()
            }

            async fn all_groups(&self) -> StoreResult<HashMap<Uuid, Vec<String>>> {
                let rows = sqlx::query("SELECT user_id, group_name FROM user_groups ORDER BY group_name")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                let mut groups: HashMap<Uuid, Vec<String>> = HashMap::new();
                for row in &rows {
                    groups
                        .entry(row.try_get("user_id").map_err(db)?)
                        .or_default()
                        .push(row.try_get("group_name").map_err(db)?);
                }
                Ok(groups)
            }

            async fn subjects_of<'e, E>(executor: E, policy_id: Option<Uuid>) -> StoreResult<HashMap<Uuid, Vec<PolicySubject>>>
            where
                E: sqlx::Executor<'e, Database = $Db>,
            {
                let sql = "SELECT id, policy_id, subject_type, subject_value, created_at FROM policy_subjects \
                           WHERE ($1 IS NULL OR policy_id = $1) ORDER BY subject_type, subject_value";
                let rows = sqlx::query(sql).bind(policy_id).fetch_all(executor).await.map_err(db)?;
                let mut subjects: HashMap<Uuid, Vec<PolicySubject>> = HashMap::new();
                for row in &rows {
                    let policy_id: Uuid = row.try_get("policy_id").map_err(db)?;
                    subjects.entry(policy_id).or_default().push(PolicySubject {
                        id: row.try_get("id").map_err(db)?,
                        policy_id,
                        subject_type: parse_text("subject type", row.try_get("subject_type").map_err(db)?, SubjectType::parse)?,
                        subject_value: row.try_get("subject_value").map_err(db)?,
                        created_at: row.try_get("created_at").map_err(db)?,
                    });
                }
                Ok(subjects)
            }

            async fn insert_user(
                tx: &mut sqlx::Transaction<'_, $Db>,
                new: NewUser,
                role: String,
            ) -> StoreResult<User> {
                let id = Uuid::new_v4();
                let at = now();
                sqlx::query(
                    "INSERT INTO users (id, email, password_hash, role, active, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $6)",
                )
                .bind(id)
                .bind(&new.email)
                .bind(&new.password_hash)
                .bind(&role)
                .bind(new.active)
                .bind(at)
                .execute(&mut **tx)
                .await
                .map_err(|e| classify(e, "a user with this email already exists"))?;
                let mut groups = new.groups;
                groups.sort();
                groups.dedup();
                Self::insert_groups(tx, id, &groups).await?;
                Ok(User {
                    id,
                    email: new.email,
                    role,
                    groups,
                    active: new.active,
                    created_at: at,
                    updated_at: at,
                    session_generation: 0,
                })
            }

            async fn insert_groups(tx: &mut sqlx::Transaction<'_, $Db>, user_id: Uuid, groups: &[String]) -> StoreResult<()> {
                for group in groups {
                    sqlx::query("INSERT INTO user_groups (user_id, group_name) VALUES ($1, $2)")
                        .bind(user_id)
                        .bind(group)
                        .execute(&mut **tx)
                        .await
                        .map_err(db)?;
                }
                Ok(())
            }

            /// Binds a target's fields in column order (name … audit_arguments).
            fn bind_target<'q>(
                query: sqlx::query::Query<'q, $Db, <$Db as sqlx::Database>::Arguments<'q>>,
                spec: &'q TargetSpec,
            ) -> sqlx::query::Query<'q, $Db, <$Db as sqlx::Database>::Arguments<'q>> {
                query
                    .bind(&spec.name)
                    .bind(&spec.description)
                    .bind(spec.transport_type.as_str())
                    .bind(&spec.url)
                    .bind(&spec.command)
                    .bind(serde_json::to_string(&spec.args).unwrap_or_else(|_| "[]".into()))
                    .bind(&spec.image)
                    .bind(spec.port)
                    .bind(&spec.health_path)
                    .bind(spec.statefulness.as_str())
                    .bind(spec.isolation_boundary.as_str())
                    .bind(spec.auth_type.as_str())
                    .bind(&spec.auth_header_name)
                    .bind(spec.enabled)
                    .bind(serde_json::to_string(&spec.env_keys).unwrap_or_else(|_| "[]".into()))
                    .bind(spec.audit_arguments)
            }

            /// Binds a policy's fields in column order (name … enabled).
            fn bind_policy<'q>(
                query: sqlx::query::Query<'q, $Db, <$Db as sqlx::Database>::Arguments<'q>>,
                spec: &'q PolicySpec,
            ) -> sqlx::query::Query<'q, $Db, <$Db as sqlx::Database>::Arguments<'q>> {
                query
                    .bind(&spec.name)
                    .bind(&spec.description)
                    .bind(spec.target_id)
                    .bind(spec.resource_type.as_str())
                    .bind(&spec.pattern)
                    .bind(spec.effect.as_str())
                    .bind(spec.priority)
                    .bind(spec.enabled)
            }

            /// Serialises transactions that may change the set of active admins.
            async fn lock_admins(tx: &mut sqlx::Transaction<'_, $Db>) -> StoreResult<()> {
                sqlx::query("UPDATE settings SET value = value WHERE key = $1")
                    .bind(FIRST_ADMIN_KEY)
                    .execute(&mut **tx)
                    .await
                    .map_err(db)?;
                Ok(())
            }

            async fn active_admins(tx: &mut sqlx::Transaction<'_, $Db>) -> StoreResult<i64> {
                sqlx::query("SELECT COUNT(*) AS n FROM users WHERE role = $1 AND active = TRUE")
                    .bind(ADMIN_ROLE)
                    .fetch_one(&mut **tx)
                    .await
                    .map_err(db)?
                    .try_get::<i64, _>("n")
                    .map_err(db)
            }

            async fn insert_subjects(
                tx: &mut sqlx::Transaction<'_, $Db>,
                policy_id: Uuid,
                subjects: Vec<SubjectSpec>,
            ) -> StoreResult<Vec<PolicySubject>> {
                let mut out = Vec::with_capacity(subjects.len());
                let created_at = now();
                for subject in subjects {
                    let id = Uuid::new_v4();
                    sqlx::query(
                        "INSERT INTO policy_subjects (id, policy_id, subject_type, subject_value, created_at) VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(id)
                    .bind(policy_id)
                    .bind(subject.subject_type.as_str())
                    .bind(&subject.subject_value)
                    .bind(created_at)
                    .execute(&mut **tx)
                    .await
                    .map_err(|e| classify(e, "the policy already has this subject"))?;
                    out.push(PolicySubject {
                        id,
                        policy_id,
                        subject_type: subject.subject_type,
                        subject_value: subject.subject_value,
                        created_at,
                    });
                }
                out.sort_by(|a, b| (a.subject_type.as_str(), &a.subject_value).cmp(&(b.subject_type.as_str(), &b.subject_value)));
                Ok(out)
            }

            async fn policy_in<'e, E>(executor: E, id: Uuid, subjects: Vec<PolicySubject>) -> StoreResult<Option<Policy>>
            where
                E: sqlx::Executor<'e, Database = $Db>,
            {
                let row = sqlx::query(&format!("SELECT {POLICY_COLUMNS} FROM policies WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(executor)
                    .await
                    .map_err(db)?;
                row.map(|row| Self::policy_from_row(&row, subjects)).transpose()
            }

            /// [`Store::update_user`] inside `tx`, which holds the admin lock.
            async fn update_user_in(tx: &mut sqlx::Transaction<'_, $Db>, id: Uuid, update: UserUpdate) -> StoreResult<User> {
                let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&mut **tx)
                    .await
                    .map_err(db)?
                    .ok_or_else(|| StoreError::NotFound("user".into()))?;
                let current = Self::user_from_row(&row, Vec::new())?;
                let role = update.role.unwrap_or(current.role.clone());
                let active = update.active.unwrap_or(current.active);
                sqlx::query(
                    "UPDATE users SET role = $2, active = $3, password_hash = COALESCE($4, password_hash), updated_at = $5 \
                     WHERE id = $1",
                )
                .bind(id)
                .bind(&role)
                .bind(active)
                .bind(update.password_hash)
                .bind(now())
                .execute(&mut **tx)
                .await
                .map_err(db)?;
                if let Some(mut groups) = update.groups {
                    groups.sort();
                    groups.dedup();
                    sqlx::query("DELETE FROM user_groups WHERE user_id = $1").bind(id).execute(&mut **tx).await.map_err(db)?;
                    Self::insert_groups(tx, id, &groups).await?;
                }
                if current.is_admin() && current.active && Self::active_admins(tx).await? == 0 {
                    return Err(StoreError::Conflict("the gateway must keep at least one active admin".into()));
                }
                let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
                    .bind(id)
                    .fetch_one(&mut **tx)
                    .await
                    .map_err(db)?;
                let groups = Self::groups_of(&mut **tx, id).await?;
                Self::user_from_row(&row, groups)
            }

            async fn insert_target<'e, E>(executor: E, id: Uuid, spec: &TargetSpec, owner: Option<&str>) -> StoreResult<()>
            where
                E: sqlx::Executor<'e, Database = $Db>,
            {
                let sql = format!(
                    "INSERT INTO targets ({TARGET_COLUMNS}, owner) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $18, $19)"
                );
                Self::bind_target(sqlx::query(&sql).bind(id), spec)
                    .bind(now())
                    .bind(owner)
                    .execute(executor)
                    .await
                    .map_err(|e| classify(e, &format!("a target named {:?} already exists", spec.name)))?;
                Ok(())
            }

            /// Replaces a target's fields, and its owner label unless `owner` is `None`.
            async fn write_target<'e, E>(executor: E, id: Uuid, spec: &TargetSpec, owner: Option<&str>) -> StoreResult<()>
            where
                E: sqlx::Executor<'e, Database = $Db>,
            {
                let sql = "UPDATE targets SET name = $2, description = $3, transport_type = $4, url = $5, command = $6, \
                           args = $7, image = $8, port = $9, health_path = $10, statefulness = $11, isolation_boundary = $12, \
                           auth_type = $13, auth_header_name = $14, enabled = $15, env_keys = $16, audit_arguments = $17, \
                           updated_at = $18, owner = COALESCE($19, owner) WHERE id = $1";
                let updated = Self::bind_target(sqlx::query(sql).bind(id), spec)
                    .bind(now())
                    .bind(owner)
                    .execute(executor)
                    .await
                    .map_err(|e| classify(e, &format!("a target named {:?} already exists", spec.name)))?
                    .rows_affected();
                if updated == 0 {
                    return Err(StoreError::NotFound("target".into()));
                }
                Ok(())
            }

            /// Deletes the row `id` of `table` (a fixed table name); `what` names it when absent.
            async fn delete_row<'e, E>(executor: E, table: &str, what: &str, id: Uuid) -> StoreResult<()>
            where
                E: sqlx::Executor<'e, Database = $Db>,
            {
                let deleted = sqlx::query(&format!("DELETE FROM {table} WHERE id = $1"))
                    .bind(id)
                    .execute(executor)
                    .await
                    .map_err(db)?
                    .rows_affected();
                if deleted == 0 {
                    return Err(StoreError::NotFound(what.into()));
                }
                Ok(())
            }

            fn policy_conflict(name: &str) -> impl Fn(sqlx::Error) -> StoreError + '_ {
                move |e| match classify(e, &format!("a policy named {name:?} already exists")) {
                    StoreError::NotFound(_) => StoreError::NotFound("target".into()),
                    other => other,
                }
            }

            async fn insert_policy(
                tx: &mut sqlx::Transaction<'_, $Db>,
                id: Uuid,
                spec: &PolicySpec,
                subjects: Vec<SubjectSpec>,
                owner: Option<&str>,
                at: DateTime<Utc>,
            ) -> StoreResult<Vec<PolicySubject>> {
                let sql = format!("INSERT INTO policies ({POLICY_COLUMNS}, owner) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11)");
                Self::bind_policy(sqlx::query(&sql).bind(id), spec)
                    .bind(at)
                    .bind(owner)
                    .execute(&mut **tx)
                    .await
                    .map_err(Self::policy_conflict(&spec.name))?;
                Self::insert_subjects(tx, id, subjects).await
            }

            /// Replaces a policy's fields, its subjects when given, and its owner label unless
            /// `owner` is `None`.
            async fn write_policy(
                tx: &mut sqlx::Transaction<'_, $Db>,
                id: Uuid,
                spec: &PolicySpec,
                subjects: Option<Vec<SubjectSpec>>,
                owner: Option<&str>,
            ) -> StoreResult<()> {
                let sql = "UPDATE policies SET name = $2, description = $3, target_id = $4, resource_type = $5, pattern = $6, \
                           effect = $7, priority = $8, enabled = $9, updated_at = $10, owner = COALESCE($11, owner) WHERE id = $1";
                let updated = Self::bind_policy(sqlx::query(sql).bind(id), spec)
                    .bind(now())
                    .bind(owner)
                    .execute(&mut **tx)
                    .await
                    .map_err(Self::policy_conflict(&spec.name))?
                    .rows_affected();
                if updated == 0 {
                    return Err(StoreError::NotFound("policy".into()));
                }
                if let Some(subjects) = subjects {
                    sqlx::query("DELETE FROM policy_subjects WHERE policy_id = $1").bind(id).execute(&mut **tx).await.map_err(db)?;
                    Self::insert_subjects(tx, id, subjects).await?;
                }
                Ok(())
            }

            /// Inserts or replaces a sealed value; a replaced value keeps its owner label unless
            /// `owner` is given.
            async fn upsert_secret<'e, E>(executor: E, entry: &SecretEntry, owner: Option<&str>) -> StoreResult<()>
            where
                E: sqlx::Executor<'e, Database = $Db>,
            {
                sqlx::query(
                    "INSERT INTO target_secrets (target_id, kind, scope_type, scope_value, name, ciphertext, key_version, description, updated_at, owner) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                     ON CONFLICT (target_id, kind, scope_type, scope_value, name) DO UPDATE SET \
                     ciphertext = excluded.ciphertext, key_version = excluded.key_version, \
                     description = excluded.description, updated_at = excluded.updated_at, \
                     owner = COALESCE(excluded.owner, target_secrets.owner)",
                )
                .bind(entry.target_id)
                .bind(entry.kind.as_str())
                .bind(entry.scope.kind().as_str())
                .bind(entry.scope.value())
                .bind(&entry.name)
                .bind(&entry.ciphertext)
                .bind(entry.key_version)
                .bind(&entry.description)
                .bind(entry.updated_at)
                .bind(owner)
                .execute(executor)
                .await
                .map_err(|e| match classify(e, "conflicting secret") {
                    StoreError::NotFound(_) => StoreError::NotFound("target".into()),
                    other => other,
                })?;
                Ok(())
            }

            async fn delete_secret_in<'e, E>(executor: E, target_id: Uuid, kind: SecretKind, scope: &Scope, name: &str) -> StoreResult<()>
            where
                E: sqlx::Executor<'e, Database = $Db>,
            {
                let deleted = sqlx::query(
                    "DELETE FROM target_secrets WHERE target_id = $1 AND kind = $2 AND scope_type = $3 AND scope_value = $4 AND name = $5",
                )
                .bind(target_id)
                .bind(kind.as_str())
                .bind(scope.kind().as_str())
                .bind(scope.value())
                .bind(name)
                .execute(executor)
                .await
                .map_err(db)?
                .rows_affected();
                if deleted == 0 {
                    return Err(StoreError::NotFound(match kind {
                        SecretKind::Token => format!("token for scope {scope}"),
                        SecretKind::Env => format!("env key {name:?} for scope {scope}"),
                    }));
                }
                Ok(())
            }
        }

        #[async_trait]
        impl Store for $Store {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn ping(&self) -> StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await.map_err(db)?;
                Ok(())
            }

            async fn register_user(&self, new: NewUser) -> StoreResult<User> {
                let mut tx = self.pool.begin().await.map_err(db)?;
                let claimed = sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
                    .bind(FIRST_ADMIN_KEY)
                    .bind(&new.email)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?
                    .rows_affected()
                    == 1;
                let role = if claimed { ADMIN_ROLE.to_string() } else { new.role.clone() };
                let user = Self::insert_user(&mut tx, new, role).await?;
                tx.commit().await.map_err(db)?;
                Ok(user)
            }

            async fn create_user(&self, new: NewUser) -> StoreResult<User> {
                let mut tx = self.pool.begin().await.map_err(db)?;
                if new.role == ADMIN_ROLE {
                    sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
                        .bind(FIRST_ADMIN_KEY)
                        .bind(&new.email)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
                let role = new.role.clone();
                let user = Self::insert_user(&mut tx, new, role).await?;
                tx.commit().await.map_err(db)?;
                Ok(user)
            }

            async fn get_user(&self, id: Uuid) -> StoreResult<Option<User>> {
                let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                match row {
                    Some(row) => Ok(Some(Self::user_from_row(&row, Self::groups_of(&self.pool, id).await?)?)),
                    None => Ok(None),
                }
            }

            async fn user_by_email(&self, email: &str) -> StoreResult<Option<(User, String)>> {
                let row = sqlx::query(&format!("SELECT {USER_COLUMNS}, password_hash FROM users WHERE email = $1"))
                    .bind(email)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                let Some(row) = row else { return Ok(None) };
                let id: Uuid = row.try_get("id").map_err(db)?;
                let user = Self::user_from_row(&row, Self::groups_of(&self.pool, id).await?)?;
                Ok(Some((user, row.try_get("password_hash").map_err(db)?)))
            }

            async fn list_users(&self) -> StoreResult<Vec<User>> {
                let rows = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users ORDER BY created_at, email"))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                let mut groups = self.all_groups().await?;
                rows.iter()
                    .map(|row| {
                        let id: Uuid = row.try_get("id").map_err(db)?;
                        Self::user_from_row(row, groups.remove(&id).unwrap_or_default())
                    })
                    .collect()
            }

            async fn update_user(&self, id: Uuid, update: UserUpdate) -> StoreResult<User> {
                let mut tx = self.pool.begin().await.map_err(db)?;
                Self::lock_admins(&mut tx).await?;
                let user = Self::update_user_in(&mut tx, id, update).await?;
                tx.commit().await.map_err(db)?;
                Ok(user)
            }

            async fn delete_user(&self, id: Uuid) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db)?;
                Self::lock_admins(&mut tx).await?;
                let id_text = id.to_string();
                sqlx::query("DELETE FROM target_secrets WHERE scope_type = 'user' AND scope_value = $1")
                    .bind(&id_text)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                sqlx::query("DELETE FROM policy_subjects WHERE subject_type = 'user' AND subject_value = $1")
                    .bind(&id_text)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                let deleted = sqlx::query("DELETE FROM users WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?
                    .rows_affected();
                if deleted == 0 {
                    return Err(StoreError::NotFound("user".into()));
                }
                if Self::active_admins(&mut tx).await? == 0 {
                    return Err(StoreError::Conflict("the gateway must keep at least one active admin".into()));
                }
                tx.commit().await.map_err(db)?;
                Ok(())
            }

            async fn create_api_token(&self, new: NewApiToken) -> StoreResult<ApiToken> {
                let token = ApiToken {
                    id: Uuid::new_v4(),
                    user_id: new.user_id,
                    name: new.name,
                    prefix: new.prefix,
                    created_at: now(),
                    expires_at: new.expires_at,
                    last_used_at: None,
                };
                sqlx::query(
                    "INSERT INTO api_tokens (id, user_id, name, token_hash, prefix, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(token.id)
                .bind(token.user_id)
                .bind(&token.name)
                .bind(&new.hash)
                .bind(&token.prefix)
                .bind(token.created_at)
                .bind(token.expires_at)
                .execute(&self.pool)
                .await
                .map_err(|e| classify(e, "token collision"))?;
                Ok(token)
            }

            async fn list_api_tokens(&self, user_id: Uuid) -> StoreResult<Vec<ApiToken>> {
                let rows = sqlx::query(&format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE user_id = $1 ORDER BY created_at"))
                    .bind(user_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter().map(Self::token_from_row).collect()
            }

            async fn delete_api_token(&self, user_id: Uuid, token_id: Uuid) -> StoreResult<()> {
                let deleted = sqlx::query("DELETE FROM api_tokens WHERE id = $1 AND user_id = $2")
                    .bind(token_id)
                    .bind(user_id)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?
                    .rows_affected();
                if deleted == 0 {
                    return Err(StoreError::NotFound("API token".into()));
                }
                Ok(())
            }

            async fn api_token_by_hash(&self, hash: &[u8]) -> StoreResult<Option<(ApiToken, User)>> {
                let row = sqlx::query(&format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE token_hash = $1"))
                    .bind(hash)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                let Some(row) = row else { return Ok(None) };
                let token = Self::token_from_row(&row)?;
                let user = self.get_user(token.user_id).await?.ok_or_else(|| StoreError::NotFound("user".into()))?;
                Ok(Some((token, user)))
            }

            async fn touch_api_token(&self, token_id: Uuid, at: DateTime<Utc>) -> StoreResult<()> {
                sqlx::query("UPDATE api_tokens SET last_used_at = $2 WHERE id = $1")
                    .bind(token_id)
                    .bind(at)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(())
            }

            async fn create_target(&self, spec: TargetSpec) -> StoreResult<Target> {
                let id = Uuid::new_v4();
                Self::insert_target(&self.pool, id, &spec, None).await?;
                self.get_target(id).await?.ok_or_else(|| StoreError::NotFound("target".into()))
            }

            async fn list_targets(&self) -> StoreResult<Vec<Target>> {
                let rows = sqlx::query(&format!("SELECT {TARGET_COLUMNS}, restart_generation FROM targets ORDER BY name"))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter().map(Self::target_from_row).collect()
            }

            async fn get_target(&self, id: Uuid) -> StoreResult<Option<Target>> {
                let row = sqlx::query(&format!("SELECT {TARGET_COLUMNS}, restart_generation FROM targets WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                row.as_ref().map(Self::target_from_row).transpose()
            }

            async fn update_target(&self, id: Uuid, spec: TargetSpec) -> StoreResult<Target> {
                Self::write_target(&self.pool, id, &spec, None).await?;
                self.get_target(id).await?.ok_or_else(|| StoreError::NotFound("target".into()))
            }

            async fn recycle_user(&self, id: Uuid) -> StoreResult<i64> {
                let row = sqlx::query(
                    "UPDATE users SET session_generation = session_generation + 1 WHERE id = $1 RETURNING session_generation",
                )
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?
                .ok_or_else(|| StoreError::NotFound("user".into()))?;
                row.try_get("session_generation").map_err(db)
            }

            async fn restart_target(&self, id: Uuid) -> StoreResult<i64> {
                let row = sqlx::query(
                    "UPDATE targets SET restart_generation = restart_generation + 1 WHERE id = $1 RETURNING restart_generation",
                )
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
                let row = row.ok_or_else(|| StoreError::NotFound("target".into()))?;
                row.try_get("restart_generation").map_err(db)
            }

            async fn delete_target(&self, id: Uuid) -> StoreResult<()> {
                Self::delete_row(&self.pool, "targets", "target", id).await
            }

            async fn put_secrets(&self, entries: Vec<SecretEntry>) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db)?;
                for entry in &entries {
                    Self::upsert_secret(&mut *tx, entry, None).await?;
                }
                tx.commit().await.map_err(db)
            }

            async fn delete_secret(&self, target_id: Uuid, kind: SecretKind, scope: &Scope, name: &str) -> StoreResult<()> {
                Self::delete_secret_in(&self.pool, target_id, kind, scope, name).await
            }

            async fn delete_scope_secrets(&self, target_id: Uuid, kind: SecretKind, scope: &Scope) -> StoreResult<u64> {
                Ok(sqlx::query("DELETE FROM target_secrets WHERE target_id = $1 AND kind = $2 AND scope_type = $3 AND scope_value = $4")
                    .bind(target_id)
                    .bind(kind.as_str())
                    .bind(scope.kind().as_str())
                    .bind(scope.value())
                    .execute(&self.pool)
                    .await
                    .map_err(db)?
                    .rows_affected())
            }

            async fn user_secret_usage(&self, user_id: Uuid) -> StoreResult<(u64, u64)> {
                let row = sqlx::query(
                    "SELECT COUNT(*) AS count, COALESCE(SUM(LENGTH(ciphertext)), 0) AS bytes FROM target_secrets \
                     WHERE scope_type = 'user' AND scope_value = $1",
                )
                .bind(user_id.to_string())
                .fetch_one(&self.pool)
                .await
                .map_err(db)?;
                let count: i64 = row.try_get("count").map_err(db)?;
                let bytes: i64 = row.try_get("bytes").map_err(db)?;
                Ok((count.max(0) as u64, bytes.max(0) as u64))
            }

            async fn list_secrets(&self, target_id: Uuid, kind: Option<SecretKind>) -> StoreResult<Vec<SecretEntry>> {
                let rows = sqlx::query(
                    "SELECT target_id, kind, scope_type, scope_value, name, ciphertext, key_version, description, updated_at FROM target_secrets \
                     WHERE target_id = $1 AND ($2 IS NULL OR kind = $2) ORDER BY kind, scope_type, scope_value, name",
                )
                .bind(target_id)
                .bind(kind.map(SecretKind::as_str))
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter().map(Self::secret_from_row).collect()
            }

            async fn create_policy(&self, spec: PolicySpec, subjects: Vec<SubjectSpec>) -> StoreResult<Policy> {
                let id = Uuid::new_v4();
                let at = now();
                let mut tx = self.pool.begin().await.map_err(db)?;
                let subjects = Self::insert_policy(&mut tx, id, &spec, subjects, None, at).await?;
                tx.commit().await.map_err(db)?;
                Ok(Policy {
                    id,
                    name: spec.name,
                    description: spec.description,
                    target_id: spec.target_id,
                    resource_type: spec.resource_type,
                    pattern: spec.pattern,
                    effect: spec.effect,
                    priority: spec.priority,
                    enabled: spec.enabled,
                    subjects,
                    created_at: at,
                    updated_at: at,
                })
            }

            async fn list_policies(&self) -> StoreResult<Vec<Policy>> {
                let rows = sqlx::query(&format!("SELECT {POLICY_COLUMNS} FROM policies ORDER BY priority DESC, name"))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                let mut subjects = Self::subjects_of(&self.pool, None).await?;
                rows.iter()
                    .map(|row| {
                        let id: Uuid = row.try_get("id").map_err(db)?;
                        Self::policy_from_row(row, subjects.remove(&id).unwrap_or_default())
                    })
                    .collect()
            }

            async fn get_policy(&self, id: Uuid) -> StoreResult<Option<Policy>> {
                let subjects = Self::subjects_of(&self.pool, Some(id)).await?.remove(&id).unwrap_or_default();
                Self::policy_in(&self.pool, id, subjects).await
            }

            async fn update_policy(&self, id: Uuid, spec: PolicySpec, subjects: Option<Vec<SubjectSpec>>) -> StoreResult<Policy> {
                let mut tx = self.pool.begin().await.map_err(db)?;
                Self::write_policy(&mut tx, id, &spec, subjects, None).await?;
                let subjects = Self::subjects_of(&mut *tx, Some(id)).await?.remove(&id).unwrap_or_default();
                let policy = Self::policy_in(&mut *tx, id, subjects).await?.ok_or_else(|| StoreError::NotFound("policy".into()))?;
                tx.commit().await.map_err(db)?;
                Ok(policy)
            }

            async fn delete_policy(&self, id: Uuid) -> StoreResult<()> {
                Self::delete_row(&self.pool, "policies", "policy", id).await
            }

            async fn add_policy_subject(&self, policy_id: Uuid, subject: SubjectSpec) -> StoreResult<PolicySubject> {
                let mut tx = self.pool.begin().await.map_err(db)?;
                let mut added = Self::insert_subjects(&mut tx, policy_id, vec![subject]).await.map_err(|e| match e {
                    StoreError::NotFound(_) => StoreError::NotFound("policy".into()),
                    other => other,
                })?;
                sqlx::query("UPDATE policies SET updated_at = $2 WHERE id = $1")
                    .bind(policy_id)
                    .bind(now())
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok(added.remove(0))
            }

            async fn remove_policy_subject(&self, policy_id: Uuid, subject_id: Uuid) -> StoreResult<()> {
                let deleted = sqlx::query("DELETE FROM policy_subjects WHERE id = $1 AND policy_id = $2")
                    .bind(subject_id)
                    .bind(policy_id)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?
                    .rows_affected();
                if deleted == 0 {
                    return Err(StoreError::NotFound("policy subject".into()));
                }
                Ok(())
            }

            async fn owners(&self) -> StoreResult<Owners> {
                let mut owners = Owners::default();
                for (table, map) in [("targets", &mut owners.targets), ("policies", &mut owners.policies)] {
                    for row in sqlx::query(&format!("SELECT id, owner FROM {table} WHERE owner IS NOT NULL"))
                        .fetch_all(&self.pool)
                        .await
                        .map_err(db)?
                    {
                        map.insert(row.try_get("id").map_err(db)?, row.try_get("owner").map_err(db)?);
                    }
                }
                for row in sqlx::query(
                    "SELECT target_id, kind, scope_type, scope_value, name, ciphertext, key_version, description, updated_at, owner \
                     FROM target_secrets WHERE owner IS NOT NULL",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(db)?
                {
                    owners.secrets.insert(Self::secret_from_row(&row)?.key(), row.try_get("owner").map_err(db)?);
                }
                Ok(owners)
            }

            async fn apply_writes(&self, writes: Vec<Write>) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db)?;
                if writes.iter().any(|w| matches!(w, Write::SetUser { .. })) {
                    Self::lock_admins(&mut tx).await?;
                }
                let at = now();
                for write in writes {
                    match write {
                        Write::CreateTarget { id, spec, owner } => {
                            Self::insert_target(&mut *tx, id, &spec, owner.as_deref()).await?
                        }
                        Write::UpdateTarget { id, spec, owner } => {
                            Self::write_target(&mut *tx, id, &spec, owner.as_deref()).await?
                        }
                        Write::DeleteTarget(id) => Self::delete_row(&mut *tx, "targets", "target", id).await?,
                        Write::CreatePolicy { id, spec, subjects, owner } => {
                            Self::insert_policy(&mut tx, id, &spec, subjects, owner.as_deref(), at).await?;
                        }
                        Write::UpdatePolicy { id, spec, subjects, owner } => {
                            Self::write_policy(&mut tx, id, &spec, Some(subjects), owner.as_deref()).await?
                        }
                        Write::DeletePolicy(id) => Self::delete_row(&mut *tx, "policies", "policy", id).await?,
                        Write::SetUser { id, role, groups } => {
                            let update = UserUpdate { role: Some(role), groups: Some(groups), active: None, password_hash: None };
                            Self::update_user_in(&mut tx, id, update).await?;
                        }
                        Write::PutSecret { entry, owner } => Self::upsert_secret(&mut *tx, &entry, owner.as_deref()).await?,
                        Write::SetSecretOwner { key: (target_id, kind, scope, name), owner } => {
                            sqlx::query(
                                "UPDATE target_secrets SET owner = $6 WHERE target_id = $1 AND kind = $2 AND scope_type = $3 \
                                 AND scope_value = $4 AND name = $5",
                            )
                            .bind(target_id)
                            .bind(kind.as_str())
                            .bind(scope.kind().as_str())
                            .bind(scope.value())
                            .bind(name)
                            .bind(owner)
                            .execute(&mut *tx)
                            .await
                            .map_err(db)?;
                        }
                        Write::DeleteSecret((target_id, kind, scope, name)) => {
                            Self::delete_secret_in(&mut *tx, target_id, kind, &scope, &name).await?
                        }
                    }
                }
                tx.commit().await.map_err(db)
            }

            async fn load_state(&self) -> StoreResult<StoreState> {
                let mut tx = self.pool.begin().await.map_err(db)?;
                sqlx::query($snapshot_isolation).execute(&mut *tx).await.map_err(db)?;
                let mut groups: HashMap<Uuid, Vec<String>> = HashMap::new();
                for row in sqlx::query("SELECT user_id, group_name FROM user_groups ORDER BY group_name")
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db)?
                {
                    groups.entry(row.try_get("user_id").map_err(db)?).or_default().push(row.try_get("group_name").map_err(db)?);
                }
                let users = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users ORDER BY id"))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|row| {
                        let id: Uuid = row.try_get("id").map_err(db)?;
                        Self::user_from_row(row, groups.remove(&id).unwrap_or_default())
                    })
                    .collect::<StoreResult<Vec<_>>>()?;
                let targets = sqlx::query(&format!("SELECT {TARGET_COLUMNS}, restart_generation FROM targets ORDER BY id"))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db)?
                    .iter()
                    .map(Self::target_from_row)
                    .collect::<StoreResult<Vec<_>>>()?;
                let mut subjects = Self::subjects_of(&mut *tx, None).await?;
                let policies = sqlx::query(&format!("SELECT {POLICY_COLUMNS} FROM policies ORDER BY id"))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|row| {
                        let id: Uuid = row.try_get("id").map_err(db)?;
                        Self::policy_from_row(row, subjects.remove(&id).unwrap_or_default())
                    })
                    .collect::<StoreResult<Vec<_>>>()?;
                let api_tokens = sqlx::query(&format!("SELECT {TOKEN_COLUMNS}, token_hash FROM api_tokens ORDER BY id"))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|row| Ok((Self::token_from_row(row)?, row.try_get::<Vec<u8>, _>("token_hash").map_err(db)?)))
                    .collect::<StoreResult<Vec<_>>>()?;
                let secrets = sqlx::query(
                    "SELECT target_id, kind, scope_type, scope_value, name, ciphertext, key_version, description, updated_at \
                     FROM target_secrets ORDER BY target_id, kind, scope_type, scope_value, name",
                )
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?
                .iter()
                .map(Self::secret_from_row)
                .collect::<StoreResult<Vec<_>>>()?;
                let session_keys = Self::session_keys_in(&mut *tx).await?;
                tx.commit().await.map_err(db)?;
                Ok(StoreState { users, targets, policies, api_tokens, secrets, session_keys })
            }

            async fn ensure_session_key(&self, ciphertext: Vec<u8>) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO session_keys (generation, ciphertext, created_at) \
                     SELECT 1, $1, $2 WHERE NOT EXISTS (SELECT 1 FROM session_keys) \
                     ON CONFLICT (generation) DO NOTHING",
                )
                .bind(ciphertext)
                .bind(Utc::now())
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }

            async fn rotate_session_key(
                &self,
                ciphertext: Vec<u8>,
                retire_at: DateTime<Utc>,
                forget_before: DateTime<Utc>,
            ) -> StoreResult<SessionKeyEntry> {
                let mut tx = self.pool.begin().await.map_err(db)?;
                // Writes first (see the SQLite note above): the insert takes the next generation.
                let created_at = Utc::now();
                let row = sqlx::query(
                    "INSERT INTO session_keys (generation, ciphertext, created_at) \
                     SELECT COALESCE(MAX(generation), 0) + 1, $1, $2 FROM session_keys RETURNING generation",
                )
                .bind(&ciphertext)
                .bind(created_at)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| classify(e, "another rotation of the session key is in progress"))?;
                let generation: i64 = row.try_get("generation").map_err(db)?;
                for key in Self::session_keys_in(&mut *tx).await? {
                    if key.generation == generation {
                        continue;
                    }
                    if key.retire_at.is_some_and(|at| at < forget_before) {
                        sqlx::query("DELETE FROM session_keys WHERE generation = $1")
                            .bind(key.generation)
                            .execute(&mut *tx)
                            .await
                            .map_err(db)?;
                    } else if key.retire_at.is_none_or(|at| at > retire_at) {
                        sqlx::query("UPDATE session_keys SET retire_at = $1 WHERE generation = $2")
                            .bind(retire_at)
                            .bind(key.generation)
                            .execute(&mut *tx)
                            .await
                            .map_err(db)?;
                    }
                }
                tx.commit().await.map_err(db)?;
                Ok(SessionKeyEntry { generation, ciphertext, created_at, retire_at: None })
            }

            async fn put_data_plane(&self, status: &DataPlaneStatus) -> StoreResult<()> {
                let rejection = status.last_rejection.as_ref();
                sqlx::query(
                    "INSERT INTO data_planes (node_id, node_group, labels, build_version, control_plane_id, connected, \
                     connected_since, last_seen, acked_version, acked_at, nack_version, nack_reason, nack_at, instances, report) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                     ON CONFLICT (node_id) DO UPDATE SET node_group = excluded.node_group, labels = excluded.labels, \
                     build_version = excluded.build_version, control_plane_id = excluded.control_plane_id, \
                     connected = excluded.connected, connected_since = excluded.connected_since, last_seen = excluded.last_seen, \
                     acked_version = excluded.acked_version, acked_at = excluded.acked_at, nack_version = excluded.nack_version, \
                     nack_reason = excluded.nack_reason, nack_at = excluded.nack_at, instances = excluded.instances, \
                     report = excluded.report",
                )
                .bind(&status.node_id)
                .bind(&status.group)
                .bind(serde_json::to_string(&status.labels).unwrap_or_else(|_| "{}".into()))
                .bind(&status.build_version)
                .bind(&status.control_plane_id)
                .bind(status.connected)
                .bind(status.connected_since)
                .bind(status.last_seen)
                .bind(&status.acked_version)
                .bind(status.acked_at)
                .bind(rejection.map(|r| r.version.clone()))
                .bind(rejection.map(|r| r.reason.clone()))
                .bind(rejection.map(|r| r.at))
                .bind(serde_json::to_string(&status.instances).unwrap_or_else(|_| "[]".into()))
                .bind(serde_json::to_string(&status.report).unwrap_or_else(|_| "{}".into()))
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }

            async fn list_data_planes(&self) -> StoreResult<Vec<DataPlaneStatus>> {
                let rows = sqlx::query("SELECT * FROM data_planes ORDER BY node_id").fetch_all(&self.pool).await.map_err(db)?;
                let stale = now() - chrono::Duration::seconds(60);
                rows.iter()
                    .map(|row| {
                        let labels: String = row.try_get("labels").map_err(db)?;
                        let instances: String = row.try_get("instances").map_err(db)?;
                        let report: String = row.try_get("report").map_err(db)?;
                        let last_seen: DateTime<Utc> = row.try_get("last_seen").map_err(db)?;
                        let nack_version: Option<String> = row.try_get("nack_version").map_err(db)?;
                        let last_rejection = match nack_version {
                            Some(version) => Some(Rejection {
                                version,
                                reason: row.try_get::<Option<String>, _>("nack_reason").map_err(db)?.unwrap_or_default(),
                                at: row.try_get::<Option<DateTime<Utc>>, _>("nack_at").map_err(db)?.unwrap_or(last_seen),
                            }),
                            None => None,
                        };
                        Ok(DataPlaneStatus {
                            node_id: row.try_get("node_id").map_err(db)?,
                            group: row.try_get("node_group").map_err(db)?,
                            labels: serde_json::from_str(&labels).map_err(|_| corrupt("labels", &labels))?,
                            build_version: row.try_get("build_version").map_err(db)?,
                            control_plane_id: row.try_get("control_plane_id").map_err(db)?,
                            connected: row.try_get::<bool, _>("connected").map_err(db)? && last_seen > stale,
                            connected_since: row.try_get("connected_since").map_err(db)?,
                            last_seen,
                            acked_version: row.try_get("acked_version").map_err(db)?,
                            acked_at: row.try_get("acked_at").map_err(db)?,
                            last_rejection,
                            instances: serde_json::from_str(&instances).map_err(|_| corrupt("instances", &instances))?,
                            report: serde_json::from_str(&report).map_err(|_| corrupt("report", &report))?,
                        })
                    })
                    .collect()
            }

            async fn put_control_plane(&self, status: &ControlPlaneStatus) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO control_planes (id, version, started_at, last_seen) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (id) DO UPDATE SET version = excluded.version, last_seen = excluded.last_seen",
                )
                .bind(&status.id)
                .bind(&status.version)
                .bind(status.started_at)
                .bind(status.last_seen)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }

            async fn append_audit(&self, records: &[crate::audit::AuditRecord]) -> StoreResult<u64> {
                // Rows written per INSERT: 12 bound values each, well inside both backends' limits.
                const ROWS_PER_INSERT: usize = 500;
                let mut tx = self.pool.begin().await.map_err(db)?;
                // One query for the ids stored already (a batch sent again after a lost answer).
                let mut stored = std::collections::HashSet::new();
                for ids in records.chunks(ROWS_PER_INSERT) {
                    let mut query = sqlx::QueryBuilder::<$Db>::new("SELECT id FROM audit_records WHERE id IN (");
                    let mut list = query.separated(", ");
                    for record in ids {
                        list.push_bind(record.id.as_str());
                    }
                    query.push(")");
                    for row in query.build().fetch_all(&mut *tx).await.map_err(db)? {
                        stored.insert(row.try_get::<String, _>("id").map_err(db)?);
                    }
                }
                let mut heads: HashMap<String, (i64, String)> = HashMap::new();
                let mut rows = Vec::with_capacity(records.len());
                for record in records {
                    // Once, even when a batch holds the same record twice.
                    if !stored.insert(record.id.clone()) {
                        continue;
                    }
                    // Times are kept to the microsecond (PostgreSQL's precision), body included,
                    // so the column and the body agree.
                    let mut record = record.clone();
                    record.at = DateTime::from_timestamp_micros(record.at.timestamp_micros()).unwrap_or(record.at);
                    if !heads.contains_key(&record.data_plane) {
                        // A write first, which locks the chain's head row (PostgreSQL) or the
                        // database (SQLite) until commit: appends to one chain never interleave.
                        sqlx::query(
                            "INSERT INTO audit_chains (data_plane, seq, hash) VALUES ($1, 0, '') \
                             ON CONFLICT (data_plane) DO UPDATE SET seq = audit_chains.seq",
                        )
                        .bind(&record.data_plane)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                        let head = sqlx::query("SELECT seq, hash FROM audit_chains WHERE data_plane = $1")
                            .bind(&record.data_plane)
                            .fetch_one(&mut *tx)
                            .await
                            .map_err(db)?;
                        heads.insert(
                            record.data_plane.clone(),
                            (head.try_get("seq").map_err(db)?, head.try_get("hash").map_err(db)?),
                        );
                    }
                    let (seq, previous) = heads.get_mut(&record.data_plane).expect("head loaded");
                    let body = record.body();
                    let hash = crate::audit::chain_hash(previous, &body);
                    *seq += 1;
                    rows.push((*seq, std::mem::replace(previous, hash.clone()), hash, body, record));
                }
                for chunk in rows.chunks(ROWS_PER_INSERT) {
                    let mut insert = sqlx::QueryBuilder::<$Db>::new(
                        "INSERT INTO audit_records (id, data_plane, seq, at, user_id, method, target, name, decision, body, prev_hash, hash) ",
                    );
                    insert.push_values(chunk, |mut row, (seq, previous, hash, body, record)| {
                        row.push_bind(record.id.as_str())
                            .push_bind(record.data_plane.as_str())
                            .push_bind(*seq)
                            .push_bind(record.at)
                            .push_bind(record.user_id.as_deref())
                            .push_bind(record.method.as_str())
                            .push_bind(record.target.as_deref())
                            .push_bind(record.name.as_deref())
                            .push_bind(record.decision.as_str())
                            .push_bind(body.as_str())
                            .push_bind(previous.as_str())
                            .push_bind(hash.as_str());
                    });
                    insert.build().execute(&mut *tx).await.map_err(db)?;
                }
                for (plane, (seq, hash)) in &heads {
                    sqlx::query("UPDATE audit_chains SET seq = $2, hash = $3 WHERE data_plane = $1")
                        .bind(plane)
                        .bind(*seq)
                        .bind(hash)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
                tx.commit().await.map_err(db)?;
                Ok(rows.len() as u64)
            }

            async fn list_audit(&self, filter: &AuditFilter) -> StoreResult<Vec<crate::audit::AuditRecord>> {
                let rows = sqlx::query(
                    "SELECT body FROM audit_records WHERE ($1 IS NULL OR user_id = $1) AND ($2 IS NULL OR target = $2) \
                     AND ($3 IS NULL OR method = $3) AND ($4 IS NULL OR name = $4) AND ($5 IS NULL OR decision = $5) \
                     AND ($6 IS NULL OR at >= $6) AND ($7 IS NULL OR at < $7) \
                     AND ($10 IS NULL OR EXISTS (SELECT 1 FROM audit_records c WHERE c.id = $10 AND \
                          (audit_records.at < c.at OR (audit_records.at = c.at AND (audit_records.data_plane > c.data_plane \
                           OR (audit_records.data_plane = c.data_plane AND audit_records.seq < c.seq)))))) \
                     ORDER BY at DESC, data_plane, seq DESC LIMIT $8 OFFSET $9",
                )
                .bind(&filter.user_id)
                .bind(&filter.target)
                .bind(&filter.method)
                .bind(&filter.name)
                .bind(&filter.decision)
                .bind(filter.since)
                .bind(filter.until)
                .bind(i64::from(filter.limit.min(1000)))
                .bind(i64::from(filter.offset))
                .bind(&filter.after)
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter()
                    .map(|row| {
                        let body: String = row.try_get("body").map_err(db)?;
                        serde_json::from_str(&body).map_err(|_| corrupt("audit record", &body))
                    })
                    .collect()
            }

            async fn audit_chains(
                &self,
            ) -> StoreResult<(Vec<crate::audit::StoredRecord>, HashMap<String, crate::audit::Anchor>)> {
                let mut tx = self.pool.begin().await.map_err(db)?;
                let rows = sqlx::query(
                    "SELECT id, data_plane, seq, at, user_id, method, target, name, decision, body, prev_hash, hash \
                     FROM audit_records ORDER BY data_plane, seq",
                )
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
                let records = rows
                    .iter()
                    .map(|row| {
                        Ok(crate::audit::StoredRecord {
                            id: row.try_get("id").map_err(db)?,
                            data_plane: row.try_get("data_plane").map_err(db)?,
                            seq: row.try_get("seq").map_err(db)?,
                            at: row.try_get("at").map_err(db)?,
                            user_id: row.try_get("user_id").map_err(db)?,
                            method: row.try_get("method").map_err(db)?,
                            target: row.try_get("target").map_err(db)?,
                            name: row.try_get("name").map_err(db)?,
                            decision: row.try_get("decision").map_err(db)?,
                            body: row.try_get("body").map_err(db)?,
                            prev_hash: row.try_get("prev_hash").map_err(db)?,
                            hash: row.try_get("hash").map_err(db)?,
                        })
                    })
                    .collect::<StoreResult<Vec<_>>>()?;
                let anchors = sqlx::query("SELECT data_plane, pruned_seq, pruned_hash FROM audit_chains")
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|row| {
                        let anchor = crate::audit::Anchor {
                            seq: row.try_get("pruned_seq").map_err(db)?,
                            hash: row.try_get("pruned_hash").map_err(db)?,
                        };
                        Ok((row.try_get::<String, _>("data_plane").map_err(db)?, anchor))
                    })
                    .collect::<StoreResult<HashMap<_, _>>>()?;
                tx.commit().await.map_err(db)?;
                Ok((records, anchors))
            }

            async fn prune_audit(&self, before: DateTime<Utc>) -> StoreResult<u64> {
                let mut tx = self.pool.begin().await.map_err(db)?;
                // Per chain, the records before the first one at or after `before`: a chain is
                // pruned from its start only, so what remains still links to the anchor.
                let planes = sqlx::query(
                    "UPDATE audit_chains SET pruned_seq = pruned_seq WHERE data_plane IN (SELECT DISTINCT data_plane FROM audit_records WHERE at < $1) \
                     RETURNING data_plane",
                )
                .bind(before)
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
                let mut removed = 0;
                for row in &planes {
                    let plane: String = row.try_get("data_plane").map_err(db)?;
                    let keep_from = sqlx::query(
                        "SELECT MIN(seq) AS seq FROM audit_records WHERE data_plane = $1 AND at >= $2",
                    )
                    .bind(&plane)
                    .bind(before)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db)?
                    .try_get::<Option<i64>, _>("seq")
                    .map_err(db)?;
                    let last = sqlx::query(
                        "SELECT seq, hash FROM audit_records WHERE data_plane = $1 AND ($2 IS NULL OR seq < $2) \
                         ORDER BY seq DESC LIMIT 1",
                    )
                    .bind(&plane)
                    .bind(keep_from)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
                    let Some(last) = last else { continue };
                    let (seq, hash): (i64, String) =
                        (last.try_get("seq").map_err(db)?, last.try_get("hash").map_err(db)?);
                    removed += sqlx::query("DELETE FROM audit_records WHERE data_plane = $1 AND seq <= $2")
                        .bind(&plane)
                        .bind(seq)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?
                        .rows_affected();
                    sqlx::query("UPDATE audit_chains SET pruned_seq = $2, pruned_hash = $3 WHERE data_plane = $1")
                        .bind(&plane)
                        .bind(seq)
                        .bind(&hash)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
                tx.commit().await.map_err(db)?;
                Ok(removed)
            }

            async fn list_control_planes(&self) -> StoreResult<Vec<ControlPlaneStatus>> {
                let rows = sqlx::query("SELECT id, version, started_at, last_seen FROM control_planes ORDER BY id")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter()
                    .map(|row| {
                        Ok(ControlPlaneStatus {
                            id: row.try_get("id").map_err(db)?,
                            version: row.try_get("version").map_err(db)?,
                            started_at: row.try_get("started_at").map_err(db)?,
                            last_seen: row.try_get("last_seen").map_err(db)?,
                        })
                    })
                    .collect()
            }

            async fn listen_for_changes(&self, notify: Arc<tokio::sync::Notify>, shutdown: tokio_util::sync::CancellationToken) {
                self.change_listener(notify, shutdown).await
            }

            async fn end_sessions(&self, ended: &[(String, i64)]) -> StoreResult<()> {
                let mut tx = self.pool.begin().await.map_err(db)?;
                sqlx::query("DELETE FROM ended_sessions WHERE until_unix <= $1")
                    .bind(Utc::now().timestamp())
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                for (nonce, until) in ended {
                    sqlx::query("INSERT INTO ended_sessions (nonce, until_unix) VALUES ($1, $2) ON CONFLICT (nonce) DO NOTHING")
                        .bind(nonce)
                        .bind(until)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
                tx.commit().await.map_err(db)
            }

            async fn ended_sessions(&self) -> StoreResult<Vec<(String, i64)>> {
                let rows = sqlx::query("SELECT nonce, until_unix FROM ended_sessions WHERE until_unix > $1")
                    .bind(Utc::now().timestamp())
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter()
                    .map(|row| Ok((row.try_get("nonce").map_err(db)?, row.try_get("until_unix").map_err(db)?)))
                    .collect()
            }

            async fn listen_for_ended_sessions(
                &self,
                ended: tokio::sync::mpsc::Sender<Vec<(String, i64)>>,
                shutdown: tokio_util::sync::CancellationToken,
            ) {
                self.ended_listener(ended, shutdown).await
            }
        }
    };
}

sql_store!(
    PostgresStore,
    sqlx::Postgres,
    sqlx::postgres::PgRow,
    "postgres",
    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
);
// A SQLite read transaction sees one snapshot of the database from its first read on.
sql_store!(SqliteStore, sqlx::Sqlite, sqlx::sqlite::SqliteRow, "sqlite", "SELECT 1");

/// Runs `listen` until `shutdown`, starting it again after a lost connection (with a backoff
/// from 200 ms to 5 s); it ends for good when `listen` returns `Ok`.
async fn reconnecting<F, Fut>(what: &str, shutdown: &tokio_util::sync::CancellationToken, mut listen: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut backoff = std::time::Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            result = listen() => match result {
                Ok(()) => return,
                Err(error) => tracing::warn!(%error, "{what} lost its connection; retrying"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}

impl PostgresStore {
    async fn change_listener(&self, notify: Arc<tokio::sync::Notify>, shutdown: tokio_util::sync::CancellationToken) {
        reconnecting("change listener", &shutdown, || async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await.map_err(|e| e.to_string())?;
            listener.listen("reflow_changes").await.map_err(|e| e.to_string())?;
            // Changes committed while not listening are caught by this wake-up.
            notify.notify_one();
            loop {
                listener.recv().await.map_err(|e| e.to_string())?;
                notify.notify_one();
            }
        })
        .await
    }

    async fn ended_listener(
        &self,
        ended: tokio::sync::mpsc::Sender<Vec<(String, i64)>>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        reconnecting("ended-session listener", &shutdown, || async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await.map_err(|e| e.to_string())?;
            listener.listen("reflow_sessions").await.map_err(|e| e.to_string())?;
            // Sessions ended while not listening are in the table.
            let recorded = self.ended_sessions().await.map_err(|e| e.to_string())?;
            if ended.send(recorded).await.is_err() {
                return Ok(());
            }
            loop {
                let notification = listener.recv().await.map_err(|e| e.to_string())?;
                let Some((nonce, until)) = notification.payload().split_once(' ') else { continue };
                let Ok(until) = until.parse::<i64>() else { continue };
                if ended.send(vec![(nonce.to_string(), until)]).await.is_err() {
                    return Ok(());
                }
            }
        })
        .await
    }
}

impl SqliteStore {
    /// One process: what was recorded before it started, once.
    async fn ended_listener(
        &self,
        ended: tokio::sync::mpsc::Sender<Vec<(String, i64)>>,
        _shutdown: tokio_util::sync::CancellationToken,
    ) {
        match self.ended_sessions().await {
            Ok(recorded) => {
                let _ = ended.send(recorded).await;
            }
            Err(error) => tracing::warn!(%error, "cannot read the sessions ended before this control plane started"),
        }
    }

    async fn change_listener(&self, _notify: Arc<tokio::sync::Notify>, _shutdown: tokio_util::sync::CancellationToken) {
    }
}
