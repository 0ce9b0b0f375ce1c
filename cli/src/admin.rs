//! `reflow admin`: the management API from a terminal or a pipeline.
//!
//! Every command is a call of `reflow.admin.v1.ManagementService`, built and read through the
//! API's descriptors (the same ones the control plane serves), so `--set field=value` and
//! `call METHOD JSON` reach any operation and bad input is refused naming the field before
//! anything is sent. Declarative configuration (`validate`, `diff`, `apply`, `sync`, `dump`)
//! reads YAML or JSON files and directories.
//!
//! Exit codes: 0 done (for `diff`: nothing would change), 1 `diff` found changes, 2 any error
//! (bad input, a refusal of the server, the server unreachable).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use reflow_proto::admin::v1 as pb;
use serde_json::{json, Map, Value as Json};

const SERVICE: &str = "reflow.admin.v1.ManagementService";
const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The control plane's gRPC address (`http://…` or `https://…`); default: the one `login`
    /// stored, else http://127.0.0.1:50051 (`reflow up`).
    #[arg(long, env = "REFLOW_SERVER", global = true)]
    server: Option<String>,
    /// A JWT or `rfl_` API token; default: the one `login` stored.
    #[arg(long, env = "REFLOW_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// A CA certificate (PEM) to verify an https server with, instead of the public roots.
    #[arg(long, env = "REFLOW_CA", global = true)]
    ca: Option<PathBuf>,
    /// How answers are printed.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Log in and keep the token (and server) in the config directory, readable by you only.
    Login {
        #[arg(long)]
        email: String,
        /// Default: read from standard input.
        #[arg(long, env = "REFLOW_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
    /// Forget the stored token.
    Logout,
    /// Accounts, their roles and groups.
    Users(Resource),
    /// Upstream MCP servers.
    Targets(Resource),
    /// Authorization rules.
    Policies(Resource),
    /// Your API tokens.
    Tokens(Resource),
    /// Every data plane with the snapshot version it acknowledged, its lag and last rejection.
    Status,
    /// Why USER may or may not use NAME (a tool, resource or prompt) of TARGET.
    Explain {
        /// A user id or email.
        user: String,
        /// A target id or name.
        target: String,
        /// tool, resource or prompt.
        kind: String,
        name: String,
    },
    /// Any management method by name, with its request as JSON.
    Call {
        method: String,
        #[arg(default_value = "{}")]
        request: String,
    },
    /// Check declarative files against the schema and the API's rules, offline.
    Validate { paths: Vec<PathBuf> },
    /// What applying the files would change (exit 0: nothing, 1: changes).
    Diff {
        paths: Vec<PathBuf>,
        /// Also show what `sync --prune` would delete.
        #[arg(long)]
        prune: bool,
    },
    /// Create and update what the files declare, in one transaction; never deletes.
    Apply {
        paths: Vec<PathBuf>,
        #[arg(long)]
        dry_run: bool,
    },
    /// `apply`, and with `--prune` delete what carries the files' owner label but they no longer have.
    Sync {
        paths: Vec<PathBuf>,
        #[arg(long)]
        prune: bool,
        #[arg(long)]
        dry_run: bool,
    },
    /// The current state as a declarative document (YAML, or JSON with `--output json`).
    Dump,
}

#[derive(Debug, Args)]
struct Resource {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    List,
    /// By id (or a target's or policy's name, a user's email).
    Get {
        id: String,
    },
    /// Fields as `--set field=value` (lists comma-separated or as JSON) or a whole `--json`.
    Create {
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        set: Vec<String>,
        #[arg(long)]
        json: Option<String>,
    },
    /// Fields not given keep their value; `--set clear=field` empties one.
    Update {
        id: String,
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        set: Vec<String>,
        #[arg(long)]
        json: Option<String>,
    },
    Delete {
        id: String,
    },
}

/// Why a command failed: printed, and exit 2.
#[derive(Debug)]
struct Failed(String);

impl<E: std::fmt::Display> From<E> for Failed {
    fn from(e: E) -> Self {
        Failed(e.to_string())
    }
}

type Result<T, E = Failed> = std::result::Result<T, E>;

pub async fn run(args: AdminArgs) -> ExitCode {
    match execute(args).await {
        Ok(code) => code,
        Err(Failed(message)) => {
            eprintln!("reflow admin: {message}");
            ExitCode::from(2)
        }
    }
}

async fn execute(args: AdminArgs) -> Result<ExitCode> {
    let stored = Stored::load();
    let output = args.output;
    let server = args.server.clone().or_else(|| stored.server.clone()).unwrap_or_else(|| DEFAULT_SERVER.to_string());
    let token = args.token.clone().or_else(|| stored.token.clone());
    let connect = || Client::connect(&server, token.clone(), args.ca.as_deref());
    match args.command {
        AdminCommand::Login { email, password } => {
            let password = match password {
                Some(password) => password,
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            let mut client = Client::connect(&server, None, args.ca.as_deref()).await?;
            let answer = client.call("Login", json!({"email": email, "password": password})).await?;
            let token = answer["token"].as_str().unwrap_or_default().to_string();
            let path = Stored { server: Some(server.clone()), token: Some(token) }.save()?;
            eprintln!(
                "logged in as {} ({}); token kept in {}",
                answer["user"]["email"],
                answer["user"]["role"],
                path.display()
            );
        }
        AdminCommand::Logout => {
            Stored { server: stored.server, token: None }.save()?;
            eprintln!("token forgotten");
        }
        AdminCommand::Users(r) => resource(&mut connect().await?, Kind::Users, r.verb, output).await?,
        AdminCommand::Targets(r) => resource(&mut connect().await?, Kind::Targets, r.verb, output).await?,
        AdminCommand::Policies(r) => resource(&mut connect().await?, Kind::Policies, r.verb, output).await?,
        AdminCommand::Tokens(r) => resource(&mut connect().await?, Kind::Tokens, r.verb, output).await?,
        AdminCommand::Status => status(&mut connect().await?, output).await?,
        AdminCommand::Explain { user, target, kind, name } => {
            let mut client = connect().await?;
            let user_id = client.find(Kind::Users, &user).await?;
            let target_id = client.find(Kind::Targets, &target).await?;
            let request = json!({"user_id": user_id, "target_id": target_id, "kind": kind, "name": name});
            let answer = client.call("Explain", request).await?;
            print(&answer, output, "Explanation")?;
        }
        AdminCommand::Call { method, request } => {
            let request: Json = serde_json::from_str(&request).map_err(|e| format!("request: not JSON: {e}"))?;
            let mut client = connect().await?;
            let answer = client.call(&method, request).await?;
            print(&answer, output, &method)?;
        }
        AdminCommand::Validate { paths } => {
            let document = load_documents(&paths, false)?;
            let unchecked = reflow_control_plane::manage::declare::validate_offline(&document)
                .map_err(|e| format!("invalid: {}", e.message))?;
            for note in unchecked {
                eprintln!("note: {note}");
            }
            eprintln!("valid: {}", summary(&document));
        }
        AdminCommand::Diff { paths, prune } => {
            let document = load_documents(&paths, true)?;
            let answer = apply(&mut connect().await?, document, prune, true).await?;
            let changes = show_changes(&answer, output)?;
            return Ok(if changes == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        AdminCommand::Apply { paths, dry_run } => {
            let document = load_documents(&paths, true)?;
            let answer = apply(&mut connect().await?, document, false, dry_run).await?;
            show_changes(&answer, output)?;
            report(&answer, dry_run);
        }
        AdminCommand::Sync { paths, prune, dry_run } => {
            let document = load_documents(&paths, true)?;
            let answer = apply(&mut connect().await?, document, prune, dry_run).await?;
            show_changes(&answer, output)?;
            report(&answer, dry_run);
        }
        AdminCommand::Dump => {
            let mut client = connect().await?;
            let document = client.call("Dump", json!({})).await?;
            let document = client.compact(&document, "Document")?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&document)?),
                _ => print!("{}", serde_yaml_ng::to_string(&document)?),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The login kept between runs: `<config dir>/reflow/admin.json`, readable by its owner only.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Stored {
    server: Option<String>,
    token: Option<String>,
}

impl Stored {
    fn path() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
        Some(base.join("reflow").join("admin.json"))
    }

    fn load() -> Stored {
        Self::path()
            .and_then(|path| std::fs::read(path).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn save(&self) -> Result<PathBuf> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        let path = Self::path().ok_or("no config directory: set HOME or XDG_CONFIG_HOME")?;
        let dir = path.parent().expect("the path has a directory");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let temp = dir.join(".admin.json.tmp");
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(&serde_json::to_vec_pretty(self)?)?;
        file.sync_all()?;
        std::fs::rename(&temp, &path)?;
        Ok(path)
    }
}

/// A connection to the management service, calling methods by name with JSON.
struct Client {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
    token: Option<String>,
    pool: DescriptorPool,
}

impl Client {
    async fn connect(server: &str, token: Option<String>, ca: Option<&Path>) -> Result<Client> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(server.to_string())
            .map_err(|e| format!("--server {server:?}: {e}"))?
            .connect_timeout(std::time::Duration::from_secs(10));
        if server.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            tls = match ca {
                Some(ca) => {
                    let pem = std::fs::read(ca).map_err(|e| format!("--ca {}: {e}", ca.display()))?;
                    tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
                }
                None => tls.with_webpki_roots(),
            };
            endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
        }
        let channel = endpoint.connect().await.map_err(|e| format!("cannot reach {server}: {e}"))?;
        let pool = DescriptorPool::decode(reflow_proto::FILE_DESCRIPTOR_SET)?;
        let grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(64 * 1024 * 1024);
        Ok(Client { grpc, token, pool })
    }

    fn method(&self, name: &str) -> Result<(MessageDescriptor, MessageDescriptor)> {
        let service = self.pool.get_service_by_name(SERVICE).expect("the management service is described");
        let method = service.methods().find(|m| m.name() == name).ok_or_else(|| {
            let names: Vec<String> = service.methods().map(|m| m.name().to_string()).collect();
            format!("no method {name:?}; the methods are {}", names.join(", "))
        })?;
        Ok((method.input(), method.output()))
    }

    /// Calls `method` with `request` (JSON in the API's field names); answers JSON.
    async fn call(&mut self, method: &str, request: Json) -> Result<Json> {
        let (input, output) = self.method(method)?;
        let message = from_json(&input, request)?;
        let answer = self.call_raw(method, message.encode_to_vec()).await?;
        let answer = DynamicMessage::decode(output, answer.as_ref())?;
        let options = prost_reflect::SerializeOptions::new()
            .use_proto_field_name(true)
            .skip_default_fields(false)
            .stringify_64_bit_integers(false);
        Ok(answer.serialize_with_options(serde_json::value::Serializer, &options)?)
    }

    async fn call_raw(&mut self, method: &str, request: Vec<u8>) -> Result<bytes::Bytes> {
        let mut request = tonic::Request::new(bytes::Bytes::from(request));
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}").parse().map_err(|_| "the token is not a valid header value")?;
            request.metadata_mut().insert("authorization", value);
        }
        request.set_timeout(std::time::Duration::from_secs(300));
        self.grpc.ready().await.map_err(|e| format!("the server is not ready: {e}"))?;
        let path = format!("/{SERVICE}/{method}").parse().expect("a valid path");
        match self.grpc.unary(request, path, reflow_proto::raw::RawCodec).await {
            Ok(answer) => Ok(answer.into_inner()),
            Err(status) => Err(Failed(describe(&status))),
        }
    }

    /// `value` (JSON of message `name`) without the fields at their defaults.
    fn compact(&self, value: &Json, name: &str) -> Result<Json> {
        let descriptor =
            self.pool.get_message_by_name(&format!("reflow.admin.v1.{name}")).expect("a described message");
        let message = from_json(&descriptor, value.clone())?;
        let options = prost_reflect::SerializeOptions::new()
            .use_proto_field_name(true)
            .skip_default_fields(true)
            .stringify_64_bit_integers(false);
        Ok(message.serialize_with_options(serde_json::value::Serializer, &options)?)
    }

    /// The id of a resource named by id, name (targets, policies) or email (users).
    async fn find(&mut self, kind: Kind, name: &str) -> Result<String> {
        if uuid::Uuid::parse_str(name).is_ok() {
            return Ok(name.to_string());
        }
        let (list, field, key) = match kind {
            Kind::Users => ("ListUsers", "users", "email"),
            Kind::Targets => ("ListTargets", "targets", "name"),
            Kind::Policies => ("ListPolicies", "policies", "name"),
            Kind::Tokens => ("ListApiTokens", "tokens", "name"),
        };
        let answer = self.call(list, json!({})).await?;
        answer[field]
            .as_array()
            .into_iter()
            .flatten()
            .find(|item| item[key].as_str().is_some_and(|v| v.eq_ignore_ascii_case(name)))
            .and_then(|item| item["id"].as_str().map(str::to_string))
            .ok_or_else(|| Failed(format!("no {} with {key} {name:?}", kind.singular())))
    }
}

/// A gRPC status as one message: code, message, and each field it names.
fn describe(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let mut out = format!("{:?}: {}", status.code(), status.message());
    if let Some(bad) = status.get_details_bad_request() {
        for violation in bad.field_violations.iter().filter(|v| !v.field.is_empty()) {
            out.push_str(&format!("\n  field {}: {}", violation.field, violation.description));
        }
    }
    out
}

fn from_json(descriptor: &MessageDescriptor, value: Json) -> Result<DynamicMessage> {
    let options = prost_reflect::DeserializeOptions::new().deny_unknown_fields(true);
    let mut track = serde_path_to_error::Track::new();
    let deserializer = serde_path_to_error::Deserializer::new(value, &mut track);
    DynamicMessage::deserialize_with_options(descriptor.clone(), deserializer, &options).map_err(|e| {
        let path = track.path().to_string();
        if path == "." {
            Failed(format!("{}: {e}", descriptor.name()))
        } else {
            Failed(format!("{}: {path}: {e}", descriptor.name()))
        }
    })
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Users,
    Targets,
    Policies,
    Tokens,
}

impl Kind {
    fn singular(self) -> &'static str {
        match self {
            Kind::Users => "user",
            Kind::Targets => "target",
            Kind::Policies => "policy",
            Kind::Tokens => "API token",
        }
    }

    /// The methods behind list, get, create, update and delete (`None`: not offered).
    fn methods(self) -> [Option<&'static str>; 5] {
        match self {
            Kind::Users => {
                [Some("ListUsers"), Some("GetUser"), Some("CreateUser"), Some("UpdateUser"), Some("DeleteUser")]
            }
            Kind::Targets => [
                Some("ListTargets"),
                Some("GetTarget"),
                Some("CreateTarget"),
                Some("UpdateTarget"),
                Some("DeleteTarget"),
            ],
            Kind::Policies => [
                Some("ListPolicies"),
                Some("GetPolicy"),
                Some("CreatePolicy"),
                Some("UpdatePolicy"),
                Some("DeletePolicy"),
            ],
            Kind::Tokens => [Some("ListApiTokens"), None, Some("CreateApiToken"), None, Some("DeleteApiToken")],
        }
    }
}

async fn resource(client: &mut Client, kind: Kind, verb: Verb, output: Output) -> Result<()> {
    let [list, get, create, update, delete] = kind.methods();
    let offered = |method: Option<&'static str>, verb: &str| {
        method.ok_or_else(|| Failed(format!("{} has no {verb}; use list", kind.singular())))
    };
    let (method, request) = match verb {
        Verb::List => (offered(list, "list")?, json!({})),
        Verb::Get { id } => {
            if matches!(kind, Kind::Tokens) {
                return Err(Failed("API tokens have no get; use list".into()));
            }
            (offered(get, "get")?, json!({"id": client.find(kind, &id).await?}))
        }
        Verb::Create { set, json } => {
            let method = offered(create, "create")?;
            (method, fields(client, method, json, &set)?)
        }
        Verb::Update { id, set, json } => {
            let method = offered(update, "update")?;
            let mut request = fields(client, method, json, &set)?;
            request["id"] = Json::String(client.find(kind, &id).await?);
            (method, request)
        }
        Verb::Delete { id } => (offered(delete, "delete")?, json!({"id": client.find(kind, &id).await?})),
    };
    let answer = client.call(method, request).await?;
    print(&answer, output, method)
}

/// A request from `--json` and `--set field=value`, each value read as the field's type says.
fn fields(client: &Client, method: &str, base: Option<String>, sets: &[String]) -> Result<Json> {
    let (input, _) = client.method(method)?;
    let mut request: Map<String, Json> = match base {
        Some(text) => serde_json::from_str(&text).map_err(|e| format!("--json: {e}"))?,
        None => Map::new(),
    };
    for set in sets {
        let (name, value) = set.split_once('=').ok_or_else(|| format!("--set {set:?}: expected FIELD=VALUE"))?;
        let field = input.get_field_by_name(name).ok_or_else(|| {
            let names: Vec<String> = input.fields().map(|f| f.name().to_string()).collect();
            format!("--set {name}: not a field of {}; the fields are {}", input.name(), names.join(", "))
        })?;
        let parsed = serde_json::from_str::<Json>(value).ok();
        let value = if field.is_list() {
            match parsed {
                Some(list @ Json::Array(_)) => list,
                _ if value.is_empty() => Json::Array(Vec::new()),
                _ => Json::Array(value.split(',').map(|v| Json::String(v.trim().to_string())).collect()),
            }
        } else {
            match (field.kind(), parsed) {
                (prost_reflect::Kind::String, _) => Json::String(value.to_string()),
                (_, Some(parsed)) => parsed,
                (_, None) => Json::String(value.to_string()),
            }
        };
        if field.is_list() && request.contains_key(name) {
            if let (Some(Json::Array(existing)), Json::Array(more)) = (request.get_mut(name), &value) {
                existing.extend(more.iter().cloned());
                continue;
            }
        }
        request.insert(name.to_string(), value);
    }
    Ok(Json::Object(request))
}

/// The columns a table shows for a kind of item.
fn columns(item: &Map<String, Json>) -> Vec<String> {
    let preferred: &[&str] = if item.contains_key("email") {
        &["id", "email", "role", "groups", "active"]
    } else if item.contains_key("transport_type") {
        &["id", "name", "transport_type", "enabled", "url", "command", "isolation_boundary"]
    } else if item.contains_key("effect") {
        &["id", "name", "effect", "priority", "resource_type", "pattern", "target_id", "enabled"]
    } else if item.contains_key("prefix") {
        &["id", "name", "prefix", "expires_at", "last_used_at"]
    } else {
        &[]
    };
    if preferred.is_empty() {
        item.iter().filter(|(_, v)| !v.is_object()).map(|(k, _)| k.clone()).collect()
    } else {
        preferred.iter().map(|c| c.to_string()).collect()
    }
}

fn cell(value: Option<&Json>) -> String {
    match value {
        None | Some(Json::Null) => String::new(),
        Some(Json::String(s)) => s.clone(),
        Some(Json::Array(items)) => items.iter().map(|i| cell(Some(i))).collect::<Vec<_>>().join(","),
        Some(other) => other.to_string(),
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Prints an answer: lists as a table of their items, a message as field/value lines.
fn print(answer: &Json, output: Output, _what: &str) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(answer)?),
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(answer)?),
        Output::Table => {
            let Json::Object(map) = answer else { return Ok(()) };
            let lists: Vec<&Vec<Json>> = map.values().filter_map(Json::as_array).collect();
            let only_list = map.len() == 1 && lists.len() == 1;
            if only_list {
                let items: Vec<&Map<String, Json>> = lists[0].iter().filter_map(Json::as_object).collect();
                let Some(first) = items.first() else {
                    println!("(none)");
                    return Ok(());
                };
                let columns = columns(first);
                let mut rows = vec![columns.iter().map(|c| c.to_uppercase()).collect::<Vec<_>>()];
                rows.extend(items.iter().map(|item| columns.iter().map(|c| cell(item.get(c))).collect()));
                print!("{}", table(&rows));
            } else {
                let rows: Vec<Vec<String>> = map
                    .iter()
                    .map(|(k, v)| {
                        let text = if v.is_object() { v.to_string() } else { cell(Some(v)) };
                        vec![format!("{k}:"), text]
                    })
                    .collect();
                print!("{}", table(&rows));
            }
        }
    }
    Ok(())
}

async fn status(client: &mut Client, output: Output) -> Result<()> {
    let answer = client.call("GetStatus", json!({})).await?;
    if output != Output::Table {
        return print(&answer, output, "GetStatus");
    }
    let current = answer["current_version"].as_str().unwrap_or_default();
    println!("control plane {} serves snapshot {}", cell(answer.get("control_plane_id")), short(current));
    let now = chrono::Utc::now();
    let age = |at: &Json| {
        at.as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| {
                humantime::format_duration(std::time::Duration::from_secs(
                    (now - t.to_utc()).num_seconds().max(0) as u64
                ))
                .to_string()
            })
            .unwrap_or_default()
    };
    let mut rows = vec![["NODE", "GROUP", "CONNECTED", "ACKED VERSION", "SYNC", "ACKED", "LAST REJECTION"]
        .map(str::to_string)
        .to_vec()];
    for plane in answer["data_planes"].as_array().into_iter().flatten() {
        let acked = plane["acked_version"].as_str().unwrap_or_default();
        let connected = plane["connected"].as_bool().unwrap_or(false);
        let sync = match (connected, acked == current && !acked.is_empty()) {
            (false, _) => "DISCONNECTED",
            (true, true) => "SYNCED",
            (true, false) => "STALE",
        };
        let rejection = &plane["last_rejection"];
        let rejected = match rejection["version"].as_str() {
            Some(version) if !version.is_empty() => {
                format!("{} ({} ago): {}", short(version), age(&rejection["at"]), cell(rejection.get("reason")))
            }
            _ => String::new(),
        };
        let acked_age =
            if plane["acked_at"].is_null() { String::new() } else { format!("{} ago", age(&plane["acked_at"])) };
        rows.push(vec![
            cell(plane.get("node_id")),
            cell(plane.get("group")),
            connected.to_string(),
            short(acked).to_string(),
            sync.to_string(),
            acked_age,
            rejected,
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
}

fn short(version: &str) -> &str {
    &version[..version.len().min(12)]
}

/// Reads YAML or JSON files (and the `.yaml`, `.yml` and `.json` files of directories, in
/// name order; several documents per file with `---`) into one document, checked against the
/// schema. With `resolve`, credentials' `value_from` is read into their values.
fn load_documents(paths: &[PathBuf], resolve: bool) -> Result<pb::Document> {
    if paths.is_empty() {
        return Err(Failed("name at least one file or directory".into()));
    }
    let pool = DescriptorPool::decode(reflow_proto::FILE_DESCRIPTOR_SET)?;
    let descriptor = pool.get_message_by_name("reflow.admin.v1.Document").expect("the document is described");
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json"))
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path.clone());
        }
    }
    let mut merged = pb::Document::default();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let base = file.parent().unwrap_or(Path::new("."));
        for (n, part) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            use serde::Deserialize as _;
            let where_ =
                if n == 0 { file.display().to_string() } else { format!("{} (document {})", file.display(), n + 1) };
            let value = Json::deserialize(part).map_err(|e| format!("{where_}: {e}"))?;
            if value.is_null() {
                continue;
            }
            let message = from_json(&descriptor, value).map_err(|Failed(e)| format!("{where_}: {e}"))?;
            let mut document = pb::Document::decode(message.encode_to_vec().as_slice())?;
            for (i, credential) in document.credentials.iter_mut().enumerate() {
                let at = format!("{where_}: credentials[{i}]");
                if credential.value.is_some() {
                    return Err(Failed(format!(
                        "{at}.value: values never go in the file; name them with value_from (env or file)"
                    )));
                }
                if let Some(from) = credential.value_from.take() {
                    if resolve {
                        credential.value = Some(read_value(&from, base).map_err(|e| format!("{at}.value_from: {e}"))?);
                    } else {
                        check_value_from(&from).map_err(|e| format!("{at}.value_from: {e}"))?;
                        // Stands for the value in the offline checks, which look at its shape only.
                        credential.value = Some("x".into());
                    }
                }
            }
            if !document.owner.is_empty() && !merged.owner.is_empty() && document.owner != merged.owner {
                return Err(Failed(format!(
                    "{where_}: owner {:?} differs from {:?} in an earlier file; one apply has one owner",
                    document.owner, merged.owner
                )));
            }
            if merged.owner.is_empty() {
                merged.owner = document.owner;
            }
            merged.targets.extend(document.targets);
            merged.policies.extend(document.policies);
            merged.users.extend(document.users);
            merged.credentials.extend(document.credentials);
        }
    }
    Ok(merged)
}

fn check_value_from(from: &pb::ValueFrom) -> Result<(), String> {
    match (from.env.is_empty(), from.file.is_empty()) {
        (false, true) | (true, false) => Ok(()),
        _ => Err("name exactly one of env and file".into()),
    }
}

fn read_value(from: &pb::ValueFrom, base: &Path) -> Result<String, String> {
    check_value_from(from)?;
    if !from.env.is_empty() {
        return std::env::var(&from.env).map_err(|_| format!("environment variable {} is not set", from.env));
    }
    let path = base.join(&from.file);
    let mut text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

fn summary(document: &pb::Document) -> String {
    format!(
        "{} targets, {} policies, {} users, {} credentials",
        document.targets.len(),
        document.policies.len(),
        document.users.len(),
        document.credentials.len()
    )
}

async fn apply(client: &mut Client, document: pb::Document, prune: bool, dry_run: bool) -> Result<Json> {
    let started = std::time::Instant::now();
    eprintln!("planning {} against the server{}…", summary(&document), if dry_run { "" } else { " and applying it" });
    let request = pb::ApplyRequest { document: Some(document), prune, dry_run };
    let answer = client.call_raw("Apply", request.encode_to_vec()).await?;
    let answer = pb::ApplyResponse::decode(answer.as_ref())?;
    eprintln!("planned in {:.1} s", started.elapsed().as_secs_f64());
    let changes: Vec<Json> = answer
        .changes
        .iter()
        .map(|c| json!({"action": c.action, "kind": c.kind, "name": c.name, "fields": c.fields}))
        .collect();
    Ok(json!({"changes": changes, "applied": answer.applied, "snapshot_version": answer.snapshot_version}))
}

/// Prints the changes of a plan; answers how many there are.
fn show_changes(answer: &Json, output: Output) -> Result<usize> {
    let changes = answer["changes"].as_array().cloned().unwrap_or_default();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for change in &changes {
        *counts.entry(cell(change.get("action"))).or_default() += 1;
    }
    let changed = changes.len() - counts.get("unchanged").copied().unwrap_or(0);
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(answer)?),
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(answer)?),
        Output::Table => {
            for change in changes.iter().filter(|c| c["action"] != "unchanged") {
                let sign = match change["action"].as_str() {
                    Some("create") => "+",
                    Some("delete") => "-",
                    _ => "~",
                };
                let fields = cell(change.get("fields"));
                let fields = if fields.is_empty() { String::new() } else { format!(" ({fields})") };
                println!("{sign} {} {}{fields}", cell(change.get("kind")), cell(change.get("name")));
            }
            let count = |action: &str| counts.get(action).copied().unwrap_or(0);
            println!(
                "{} to create, {} to update, {} to delete, {} unchanged",
                count("create"),
                count("update"),
                count("delete"),
                count("unchanged")
            );
        }
    }
    Ok(changed)
}

fn report(answer: &Json, dry_run: bool) {
    if dry_run {
        eprintln!("dry run: nothing written");
    } else if answer["applied"] == true {
        eprintln!("applied in one transaction; snapshot {}", cell(answer.get("snapshot_version")));
    } else {
        eprintln!("nothing to change");
    }
}
