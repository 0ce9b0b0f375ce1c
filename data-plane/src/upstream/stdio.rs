//! STDIO upstreams: MCP servers run as child processes of the data plane, pooled by target and
//! isolation key, shared by every client session that maps to the key.
//!
//! Written here rather than with a child-process transport crate because a shared process
//! needs control such a transport does not give: ids, progress tokens and cancellations are
//! rewritten so concurrent sessions multiplex on one process without touching each other's
//! requests ([`super::multiplex`]), stdout lines that are not JSON-RPC are logged and skipped,
//! and the child's environment, directory, limits, process group and shutdown are the
//! gateway's to decide.
//!
//! Each child runs in a room of its own:
//! - a cleared environment: only its resolved env (limited by the isolation boundary) plus a
//!   minimal `PATH`, `HOME`/`TMPDIR` naming its private directory, and what keeps package
//!   runners from prompting (`npm_config_yes=true`, …); never the data plane's own environment
//!   (which holds the data-plane token);
//! - a private working directory, created for it (mode 0700, owned by `stdio.run_as` when set)
//!   under `stdio.work_dir` and removed when it stops: never the data plane's directory, which
//!   holds its data and cache;
//! - resource limits (`stdio.limits`: address space, open files, processes, no core dumps), set
//!   by the launcher ([`super::launch`]) it starts as, before it runs anything; everything it
//!   starts inherits them;
//! - optionally another OS user (`stdio.run_as`);
//! - its own process group, signalled whole when it stops (an `npx` wrapper's grandchildren
//!   included).
//!
//! Command and arguments are an array; a shell is never involved, and the command must be in
//! `stdio.allowed_commands`. One start per key at a time (two sessions arriving together share
//! one process); a start's initialisation runs in a task of its own, so a slow server holds up
//! no other key (the spawn itself, fork/exec and the private directory, happens under the pool's
//! lock). A caller that stops waiting leaves the start going, up to `stdio.start_timeout`; a
//! start that fails or passes that is killed with its group and counted like a crash.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reflow_common::config::{ConfigError, StdioConfig};
use reflow_common::credentials::Isolation;
use reflow_proto::resources::{Target, User};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::multiplex::{Multiplexer, Owner, Route, GATEWAY};
use super::{Sink, UpstreamError};
use crate::jsonrpc;

const CHILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What makes package runners and their kin non-interactive: a child never waits on a prompt
/// (its stdin is the MCP stream), whatever the machine's npm or pip configuration says
/// (`npx` honours `yes=false` in an npmrc by refusing to install). The target's resolved env
/// comes after, so an admin may set any of these otherwise.
const NON_INTERACTIVE: &[(&str, &str)] = &[
    ("npm_config_yes", "true"),
    ("npm_config_update_notifier", "false"),
    ("npm_config_fund", "false"),
    ("npm_config_audit", "false"),
    ("NO_UPDATE_NOTIFIER", "1"),
    ("PIP_NO_INPUT", "1"),
    ("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
    ("GIT_TERMINAL_PROMPT", "0"),
    ("DEBIAN_FRONTEND", "noninteractive"),
];
/// The last stderr lines of a process kept for its target's health, and the longest kept.
const STDERR_TAIL_LINES: usize = 20;
const STDERR_LINE_BYTES: usize = 300;

/// Why each target's STDIO servers last ended on their own or failed to start, by target id:
/// (unix seconds, reason with the tail of stderr, credentials masked).
pub type ExitLog = Arc<Mutex<HashMap<String, (i64, String)>>>;

/// How long a child gets to exit after its stdin closes, and then after SIGTERM.
const GRACE: Duration = Duration::from_secs(2);

/// What identifies one process: the target, the isolation key, and the env it was given.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProcessKey {
    pub target_id: String,
    /// `""` for shared; the role, the groups or the user id otherwise.
    pub scope: String,
}

impl ProcessKey {
    pub fn new(target: &Target, user: &User) -> Self {
        let scope = match target.isolation_boundary {
            Isolation::Shared => String::new(),
            Isolation::PerRole => format!("role:{}", user.role),
            Isolation::PerGroup => {
                let mut groups = user.groups.clone();
                groups.sort();
                format!("groups:{}", groups.join(","))
            }
            Isolation::PerUser => format!("user:{}", user.id),
        };
        ProcessKey { target_id: target.id.clone(), scope }
    }

    /// The user a `per_user` process runs for.
    pub fn user(&self) -> Option<&str> {
        self.scope.strip_prefix("user:")
    }
}

/// Where and as whom children run, and their limits; resolved once from `stdio`.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The parent of every process's private directory.
    pub work_dir: PathBuf,
    /// `stdio.run_as`, resolved.
    pub run_as: Option<(u32, u32)>,
    pub limits: reflow_common::config::StdioLimits,
    /// The binary that runs [`super::launch::main`] as `<launcher> stdio-launch …`.
    pub launcher: Option<PathBuf>,
}

impl Sandbox {
    /// Resolves `stdio.run_as` and `stdio.work_dir`, or says which is wrong.
    pub fn from_config(config: &StdioConfig) -> Result<Self, ConfigError> {
        let work_dir =
            config.work_dir.as_ref().map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("reflow-stdio"));
        let run_as = config.run_as.as_deref().map(resolve_user).transpose()?;
        if let Some((uid, _)) = run_as {
            let me = nix::unistd::geteuid().as_raw();
            if me != 0 && me != uid {
                return Err(ConfigError::new(
                    "stdio.run_as",
                    "running STDIO servers as another user needs the data plane to run as root",
                ));
            }
        }
        Ok(Sandbox { work_dir, run_as, limits: config.limits.clone(), launcher: None })
    }

    /// A fresh private directory for one process.
    fn private_dir(&self, target: &str) -> Result<PathBuf, UpstreamError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let failed = |what: &str, e: std::io::Error| {
            tracing::error!(dir = %self.work_dir.display(), error = %e, "cannot prepare a STDIO server's directory: {what}");
            UpstreamError::Unreachable("the gateway could not prepare the server's private directory".into())
        };
        if !self.work_dir.exists() {
            // Others may pass through it (to reach their own directory), never list it.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(&self.work_dir)
                .map_err(|e| failed("create", e))?;
            std::fs::set_permissions(&self.work_dir, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| failed("permissions", e))?;
        }
        // A directory someone else owns could have the children's directories swapped under them.
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(&self.work_dir).map_err(|e| failed("inspect", e))?;
        if metadata.uid() != nix::unistd::geteuid().as_raw() {
            return Err(failed("ownership", std::io::Error::other("stdio.work_dir is owned by another user")));
        }
        if self.run_as.is_some() && metadata.mode() & 0o001 == 0 {
            return Err(failed(
                "permissions",
                std::io::Error::other("with stdio.run_as, stdio.work_dir must let others pass through (mode 0711)"),
            ));
        }
        let mut random = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut random);
        let dir = self.work_dir.join(format!("{target}-{}", reflow_common::crypto::to_hex(&random)));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| failed("create", e))?;
        if let Some((uid, gid)) = self.run_as {
            nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(uid)), Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(|e| failed("chown", e.into()))?;
        }
        Ok(dir)
    }

    /// The launcher's limits for one process.
    fn launch_limits(&self) -> super::launch::Limits {
        let processes = match self.limits.processes {
            0 => 0,
            // RLIMIT_NPROC counts every process and thread of the child's OS user. Run as the
            // data plane's own user, the child may add `processes` to what that user runs now.
            n if self.run_as.is_none() => tasks_of(nix::unistd::getuid().as_raw()) + n,
            n => n,
        };
        super::launch::Limits { memory_bytes: self.limits.memory_bytes, open_files: self.limits.open_files, processes }
    }
}

/// Processes and threads owned by `uid` (real user id) now, from /proc.
fn tasks_of(uid: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    let mut count = 0;
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        let owner = field("Uid:").and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse::<u32>().ok());
        if owner == Some(uid) {
            count += field("Threads:").and_then(|v| v.parse::<u64>().ok()).unwrap_or(1);
        }
    }
    count
}

fn resolve_user(spec: &str) -> Result<(u32, u32), ConfigError> {
    let bad = |message: String| ConfigError::new("stdio.run_as", message);
    if let Some((uid, gid)) = spec.split_once(':') {
        let uid = uid.parse().map_err(|_| bad(format!("{spec:?}: uid:gid must be numbers")))?;
        let gid = gid.parse().map_err(|_| bad(format!("{spec:?}: uid:gid must be numbers")))?;
        return Ok((uid, gid));
    }
    let user = match spec.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => nix::unistd::User::from_name(spec),
    }
    .map_err(|e| bad(format!("cannot look up {spec:?}: {e}")))?
    .ok_or_else(|| bad(format!("no such user {spec:?}")))?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

/// One running child.
pub struct Process {
    pub key: ProcessKey,
    /// The target as it was when the process started.
    pub target: Target,
    pub target_name: String,
    pub pid: u32,
    pub started: Instant,
    /// When it started, by the wall clock (for status reports).
    pub started_wall: std::time::SystemTime,
    /// Its private working directory and `HOME`, removed when it has stopped.
    pub home: PathBuf,
    last_used: Mutex<Instant>,
    /// A hash of the command, arguments and env: a change in the snapshot recycles the process.
    pub fingerprint: String,
    stdin: Arc<tokio::sync::Mutex<ChildStdin>>,
    /// Requests in flight and their routing (see [`super::multiplex`]). Cleared, failing every
    /// waiter at once, when the child's stdout ends.
    mux: Arc<Mutex<Multiplexer>>,
    /// The result of the one `initialize` this process gets.
    pub initialize_result: Mutex<Option<Value>>,
    /// Cancelled when the child is gone or being stopped.
    pub closed: CancellationToken,
    /// Set when the gateway stops the process; a process closed without it crashed.
    stopping: Arc<AtomicBool>,
    /// The sessions using the process, by owner: where messages unrelated to a request go.
    subscribers: Arc<Mutex<HashMap<Owner, mpsc::Sender<Value>>>>,
    /// Its last stderr lines, for the target's health.
    stderr: StderrTail,
}

/// The last lines a process wrote to stderr, with the values of its env (its credentials)
/// masked when shown.
#[derive(Debug, Clone, Default)]
struct StderrTail {
    lines: Arc<Mutex<std::collections::VecDeque<String>>>,
    /// Values to mask: the env the process got (long enough to be a secret).
    secrets: Arc<Vec<String>>,
    /// Cancelled when stderr ended.
    done: CancellationToken,
}

impl StderrTail {
    fn push(&self, line: String) {
        // Masked before it is cut, so no secret is left half-visible at the cut.
        let mut line = self.mask(line);
        reflow_common::text::keep_tail(&mut line, STDERR_LINE_BYTES);
        let mut lines = self.lines.lock().unwrap();
        if lines.len() == STDERR_TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// `text` with every value of the process's env replaced by `[masked]`.
    fn mask(&self, mut text: String) -> String {
        for secret in self.secrets.iter() {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "[masked]");
            }
        }
        text
    }

    /// The tail as one line (each line masked as it arrived).
    fn text(&self) -> String {
        self.lines.lock().unwrap().iter().cloned().collect::<Vec<_>>().join(" | ")
    }
}

/// Records why a process of `target_id` ended or did not start, with its stderr tail.
fn record_exit(exits: &ExitLog, target_id: &str, what: &str, tail: &StderrTail) {
    let stderr = tail.text();
    let what = tail.mask(what.to_string());
    let reason = if stderr.is_empty() { what } else { format!("{what}; stderr: {stderr}") };
    exits.lock().unwrap().insert(target_id.to_string(), (reflow_common::text::unix_now(), reason));
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process").field("key", &self.key).field("pid", &self.pid).finish_non_exhaustive()
    }
}

fn fingerprint(target: &Target, env: &BTreeMap<String, String>) -> String {
    let mut hasher = Sha256::new();
    let what = (&target.command, &target.args, target.restart_generation, env);
    hasher.update(serde_json::to_vec(&what).unwrap_or_default());
    reflow_common::crypto::to_hex(&hasher.finalize())
}

impl Process {
    /// Starts the child and its reader tasks (not yet initialised).
    fn spawn(
        target: &Target,
        key: ProcessKey,
        env: BTreeMap<String, String>,
        sandbox: &Sandbox,
        max_line: usize,
        exits: ExitLog,
    ) -> Result<Arc<Process>, UpstreamError> {
        let command = target.command.as_deref().ok_or(UpstreamError::BadUrl)?;
        let tail = StderrTail {
            secrets: Arc::new(env.values().filter(|v| v.len() >= 6).cloned().collect()),
            ..StderrTail::default()
        };
        let launcher = sandbox.launcher.as_ref().ok_or_else(|| {
            UpstreamError::Refused(
                "this data plane has no STDIO launcher configured, so it runs no STDIO servers".into(),
            )
        })?;
        let fingerprint = fingerprint(target, &env);
        let home = sandbox.private_dir(&target.name)?;
        let mut child_command = Command::new(launcher);
        child_command
            .arg(super::launch::SUBCOMMAND)
            .args(sandbox.launch_limits().to_args())
            .arg(command)
            .args(&target.args)
            .env_clear()
            .envs(NON_INTERACTIVE.iter().copied())
            .envs(env.iter().filter(|(k, _)| !reflow_common::names::is_forbidden_env_key(k)))
            .env("PATH", CHILD_PATH)
            .env("HOME", &home)
            .env("TMPDIR", &home)
            .current_dir(&home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some((uid, gid)) = sandbox.run_as {
            child_command.uid(uid).gid(gid);
        }
        let mut child: Child = match child_command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&home);
                return Err(UpstreamError::Unreachable(format!("could not start {command:?}: {}", e.kind())));
            }
        };
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let closed = CancellationToken::new();
        let stdin = Arc::new(tokio::sync::Mutex::new(stdin));
        let mux: Arc<Mutex<Multiplexer>> = Arc::default();
        let subscribers: Arc<Mutex<HashMap<Owner, mpsc::Sender<Value>>>> = Arc::default();
        let name = target.name.clone();
        tokio::spawn({
            let (name, tail) = (name.clone(), tail.clone());
            async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(target: "reflow::stdio", target = %name, pid, "{line}");
                    tail.push(line);
                }
                tail.done.cancel();
            }
        });
        let reader = Reader {
            name: name.clone(),
            pid,
            mux: mux.clone(),
            subscribers: subscribers.clone(),
            stdin: stdin.clone(),
            closed: closed.clone(),
        };
        tokio::spawn(reader.run(stdout, max_line));
        let stopping = Arc::new(AtomicBool::new(false));
        let exited = Exited { exits, target_id: target.id.clone(), tail: tail.clone(), stopping: stopping.clone() };
        tokio::spawn(supervise(child, name.clone(), pid, closed.clone(), home.clone(), exited));
        tracing::info!(target = %name, pid, scope = %key.scope, "started a STDIO server");
        Ok(Arc::new(Process {
            key,
            target: target.clone(),
            target_name: name,
            pid,
            started: Instant::now(),
            started_wall: std::time::SystemTime::now(),
            home,
            last_used: Mutex::new(Instant::now()),
            fingerprint,
            stdin,
            mux,
            initialize_result: Mutex::new(None),
            closed,
            stopping,
            subscribers,
            stderr: tail,
        }))
    }

    /// Whether the process ended without the gateway stopping it (exit, crash, closed stdout).
    pub fn crashed(&self) -> bool {
        self.closed.is_cancelled() && !self.stopping.load(Ordering::Relaxed)
    }

    pub fn last_used(&self) -> Instant {
        *self.last_used.lock().unwrap()
    }

    /// Receives the messages the process sends outside any request, for `owner`'s session.
    pub fn subscribe(&self, owner: Owner, inbox: mpsc::Sender<Value>) {
        self.subscribers.lock().unwrap().insert(owner, inbox);
    }

    /// `owner`'s session no longer uses the process.
    pub fn unsubscribe(&self, owner: Owner) {
        self.subscribers.lock().unwrap().remove(&owner);
    }

    async fn write(&self, message: &Value) -> Result<(), UpstreamError> {
        write_line(&self.stdin, message).await
    }

    /// Sends `owner`'s request under a fresh id and returns the reply with the caller's id
    /// (and progress with the caller's token) restored.
    pub async fn request(&self, owner: Owner, message: &Value, sink: Option<&Sink>) -> Result<Value, UpstreamError> {
        if self.closed.is_cancelled() {
            return Err(UpstreamError::Disconnected);
        }
        *self.last_used.lock().unwrap() = Instant::now();
        let (id, rewritten, answered) = self.mux.lock().unwrap().register(owner, message, sink.cloned());
        // Forgotten however this ends: answered, failed, or dropped by a caller that gave up.
        struct Forget<'a>(&'a Mutex<Multiplexer>, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap().forget(self.1);
            }
        }
        let _forget = Forget(&self.mux, id);
        self.write(&rewritten).await?;
        answered.await.map_err(|_| UpstreamError::Disconnected)
    }

    /// Sends `owner`'s notification or response. A cancellation names `owner`'s own request by
    /// its process-side id (or is not sent); an answer goes only to a request asked of `owner`.
    pub async fn send(&self, owner: Owner, message: &Value) -> Result<(), UpstreamError> {
        *self.last_used.lock().unwrap() = Instant::now();
        let message = {
            let mut mux = self.mux.lock().unwrap();
            if jsonrpc::is_response(message) {
                if !mux.answer(owner, message) {
                    tracing::warn!(target = %self.target_name, "dropped an answer to a request this session was not asked");
                    return Ok(());
                }
                message.clone()
            } else if message.get("method").and_then(Value::as_str) == Some("notifications/cancelled") {
                let params = message.get("params");
                let request = params.and_then(|p| p.get("requestId")).cloned().unwrap_or_default();
                match mux.cancel(owner, &request, params.and_then(|p| p.get("reason"))) {
                    Some(rewritten) => rewritten,
                    None => return Ok(()),
                }
            } else {
                message.clone()
            }
        };
        self.write(&message).await
    }

    /// Stops the process: close its stdin (a well-behaved server exits), then SIGTERM, then
    /// SIGKILL to the whole group (see [`supervise`]).
    pub fn stop(self: &Arc<Self>) {
        self.stopping.store(true, Ordering::Relaxed);
        let process = self.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(GRACE, async { process.stdin.lock().await.shutdown().await }).await;
            process.closed.cancel();
        });
    }

    /// Kills the process group at once (a start that failed or was abandoned).
    fn kill(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.closed.cancel();
        signal_group(self.pid, nix::sys::signal::Signal::SIGKILL);
    }
}

async fn write_line(stdin: &tokio::sync::Mutex<ChildStdin>, message: &Value) -> Result<(), UpstreamError> {
    let mut line = serde_json::to_vec(message).expect("a JSON value serialises");
    line.push(b'\n');
    let mut stdin = stdin.lock().await;
    stdin.write_all(&line).await.map_err(|_| UpstreamError::Disconnected)?;
    stdin.flush().await.map_err(|_| UpstreamError::Disconnected)
}

/// Reads what a child writes and routes it.
struct Reader {
    name: String,
    pid: u32,
    mux: Arc<Mutex<Multiplexer>>,
    subscribers: Arc<Mutex<HashMap<Owner, mpsc::Sender<Value>>>>,
    stdin: Arc<tokio::sync::Mutex<ChildStdin>>,
    closed: CancellationToken,
}

impl Reader {
    async fn run(self, stdout: tokio::process::ChildStdout, max_line: usize) {
        let (name, pid) = (&self.name, self.pid);
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = tokio::select! {
                _ = self.closed.cancelled() => break,
                read = read_line(&mut reader, &mut line, max_line) => read,
            };
            match read {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(target = %name, pid, %error, "stopping a STDIO server whose output broke");
                    break;
                }
            }
            let Ok(message) = serde_json::from_slice::<Value>(&line) else {
                let shown = String::from_utf8_lossy(&line);
                tracing::warn!(target = %name, pid, line = %shown.trim_end().chars().take(200).collect::<String>(), "skipping stdout that is not JSON-RPC");
                continue;
            };
            if message.is_object() {
                self.route(message);
            }
        }
        self.closed.cancel();
        self.mux.lock().unwrap().clear();
    }

    fn route(&self, message: Value) {
        let sole = {
            let subscribers = self.subscribers.lock().unwrap();
            (subscribers.len() == 1).then(|| *subscribers.keys().next().expect("one subscriber"))
        };
        let route = self.mux.lock().unwrap().route(message, sole);
        match route {
            Route::Reply(waiter, reply) => {
                let _ = waiter.reply.send(reply);
            }
            Route::Session { owner, sink, message } => match sink {
                Some(sink) => {
                    let _ = sink.send(message);
                }
                None => {
                    let inbox = self.subscribers.lock().unwrap().get(&owner).cloned();
                    if let Some(inbox) = inbox {
                        if inbox.try_send(message).is_err() {
                            tracing::warn!(target = %self.name, "a session is not reading; a message for it was dropped");
                        }
                    }
                }
            },
            Route::Everyone(message) => {
                let inboxes: Vec<_> = self.subscribers.lock().unwrap().values().cloned().collect();
                for inbox in inboxes {
                    let _ = inbox.try_send(message.clone());
                }
                self.subscribers.lock().unwrap().retain(|_, s| !s.is_closed());
            }
            Route::Answer(answer) => {
                tracing::warn!(target = %self.name, "refused a server request no single session can be shown");
                let stdin = self.stdin.clone();
                tokio::spawn(async move {
                    let _ = write_line(&stdin, &answer).await;
                });
            }
            Route::Drop => {}
        }
    }
}

/// Reads one `\n`-terminated line, refusing lines longer than `max`.
async fn read_line(
    reader: &mut BufReader<tokio::process::ChildStdout>,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<usize> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(line.len());
        }
        match available.iter().position(|&b| b == b'\n') {
            Some(end) => {
                if line.len() + end > max {
                    return Err(std::io::Error::other("a message exceeded mcp.max_response_bytes"));
                }
                line.extend_from_slice(&available[..=end]);
                reader.consume(end + 1);
                return Ok(line.len());
            }
            None => {
                let taken = available.len();
                line.extend_from_slice(available);
                reader.consume(taken);
                if line.len() > max {
                    return Err(std::io::Error::other("a message exceeded mcp.max_response_bytes"));
                }
            }
        }
    }
}

/// Waits for the child to exit or to be stopped. Stopping ([`Process::stop`]) has closed its
/// stdin; after a grace period the group gets SIGTERM, then SIGKILL. Its private directory is
/// removed once the group is gone.
async fn supervise(mut child: Child, name: String, pid: u32, closed: CancellationToken, home: PathBuf, exited: Exited) {
    tokio::select! {
        status = child.wait() => {
            let status = status.map(|s| s.to_string()).unwrap_or_default();
            tracing::warn!(target = %name, pid, %status, "a STDIO server exited");
            exited.record(&status).await;
            closed.cancel();
            signal_group(pid, nix::sys::signal::Signal::SIGKILL);
            remove_home(&home);
            return;
        }
        _ = closed.cancelled() => {}
    }
    match tokio::time::timeout(GRACE, child.wait()).await {
        // Its output ended first, and it exited on its own.
        Ok(status) => exited.record(&status.map(|s| s.to_string()).unwrap_or_default()).await,
        Err(_) => {
            signal_group(pid, nix::sys::signal::Signal::SIGTERM);
            if tokio::time::timeout(GRACE, child.wait()).await.is_err() {
                signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait().await;
            }
        }
    }
    // The leader is gone; what it started in its group may not be.
    signal_group(pid, nix::sys::signal::Signal::SIGKILL);
    remove_home(&home);
    tracing::info!(target = %name, pid, "stopped a STDIO server");
}

/// Where [`supervise`] records a process that ends on its own.
struct Exited {
    exits: ExitLog,
    target_id: String,
    tail: StderrTail,
    /// Set when the gateway stops the process (then its end is no failure).
    stopping: Arc<AtomicBool>,
}

impl Exited {
    async fn record(&self, status: &str) {
        if self.stopping.load(Ordering::Relaxed) {
            return;
        }
        // What it wrote last, once its stderr is read to the end (briefly).
        let _ = tokio::time::timeout(Duration::from_millis(300), self.tail.done.cancelled()).await;
        record_exit(&self.exits, &self.target_id, &format!("the server exited ({status})"), &self.tail);
    }
}

fn remove_home(home: &Path) {
    if let Err(error) = std::fs::remove_dir_all(home) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %home.display(), %error, "cannot remove a stopped STDIO server's directory");
        }
    }
}

fn signal_group(pid: u32, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        if pid > 1 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
        }
    }
}

/// A crash this long after the start is not counted with earlier ones.
const CRASH_MEMORY: Duration = Duration::from_secs(30);

/// How long a key waits before its next start after `crashes` crashes in a row: the first
/// restart is immediate, then 1 s, 2 s, 4 s … up to 30 s.
fn restart_backoff(crashes: u32) -> Duration {
    match crashes {
        0 | 1 => Duration::ZERO,
        n => Duration::from_secs(1u64 << (n - 2).min(5)).min(Duration::from_secs(30)),
    }
}

/// A start in progress: the process being initialised, and where its outcome is published
/// (`None` until it is known). Callers wait on it; the start itself does not depend on them.
#[derive(Debug, Clone)]
struct Starting {
    process: Arc<Process>,
    outcome: tokio::sync::watch::Receiver<Option<Result<(), String>>>,
}

/// Whether a process started for `process.target` is still what `current` asks to run.
fn still_wanted(process: &Process, current: Option<&&Target>) -> bool {
    current.is_some_and(|t| {
        t.enabled
            && t.command == process.target.command
            && t.args == process.target.args
            && t.restart_generation == process.target.restart_generation
    })
}

/// The running processes, by key.
#[derive(Debug)]
pub struct Pool {
    settings: StdioConfig,
    /// Where and as whom children run; `Err` when `stdio` names a user or directory that
    /// cannot be used (every start then fails with the reason).
    sandbox: Result<Sandbox, ConfigError>,
    processes: Mutex<HashMap<ProcessKey, Arc<Process>>>,
    /// Recent crashes and failed starts by key (count, when): a key that keeps failing
    /// restarts with backoff.
    crashes: Mutex<HashMap<ProcessKey, (u32, Instant)>>,
    /// Starts in progress by key: two sessions arriving together share one start, and a slow
    /// initialisation holds up no other key.
    starting: Mutex<HashMap<ProcessKey, Starting>>,
    /// Told the target id of every process that finished starting, for sessions that listed
    /// without it.
    started: tokio::sync::broadcast::Sender<String>,
    /// Why each target's processes last ended on their own or failed to start.
    exits: ExitLog,
    /// Starts that failed, timed out or were abandoned.
    pub failed_starts: AtomicU64,
    /// The longest stdout line (one message) accepted from a child, as `mcp.max_response_bytes`
    /// bounds an HTTP upstream's reply; a longer one ends the process (it is broken or hostile).
    max_message_bytes: usize,
}

impl Pool {
    pub fn new(settings: StdioConfig) -> Self {
        let sandbox = Sandbox::from_config(&settings);
        match &sandbox {
            Err(error) => tracing::error!(%error, "STDIO servers cannot start"),
            Ok(sandbox) if sandbox.run_as.is_none() && nix::unistd::geteuid().is_root() => tracing::warn!(
                "STDIO servers run as root: the process-count limit does not bind root; set stdio.run_as to another user"
            ),
            Ok(_) => {}
        }
        Pool {
            settings,
            sandbox,
            processes: Mutex::new(HashMap::new()),
            crashes: Mutex::new(HashMap::new()),
            starting: Mutex::new(HashMap::new()),
            started: tokio::sync::broadcast::channel(64).0,
            exits: ExitLog::default(),
            failed_starts: AtomicU64::new(0),
            max_message_bytes: super::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }

    /// Runs STDIO servers through `launcher` (a binary that runs [`super::launch::main`] for
    /// `stdio-launch`): without one, none start.
    pub fn with_launcher(mut self, launcher: PathBuf) -> Self {
        if let Ok(sandbox) = &mut self.sandbox {
            sandbox.launcher = Some(launcher);
        }
        self
    }

    /// Bounds each message a child writes (see `mcp.max_response_bytes`).
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    pub fn processes(&self) -> Vec<Arc<Process>> {
        self.processes.lock().unwrap().values().cloned().collect()
    }

    /// The running processes, for status reports (sorted, so equal sets compare equal).
    pub fn instances(&self) -> Vec<reflow_proto::snapshot::v1::Instance> {
        let wall =
            |at: std::time::SystemTime| at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let unix = |at: Instant| std::time::SystemTime::now().checked_sub(at.elapsed()).map_or(0, wall);
        let mut instances: Vec<_> = self
            .processes()
            .iter()
            .filter(|p| !p.closed.is_cancelled())
            .map(|p| reflow_proto::snapshot::v1::Instance {
                target_id: p.key.target_id.clone(),
                scope: p.key.scope.clone(),
                pid: p.pid,
                started_at_unix: wall(p.started_wall),
                // Whole minutes: a report is not sent for every call.
                last_used_unix: unix(p.last_used()) / 60 * 60,
            })
            .collect();
        instances.sort_by(|a, b| (&a.target_id, &a.scope, a.pid).cmp(&(&b.target_id, &b.scope, b.pid)));
        instances
    }

    /// Why `target_id`'s processes last ended on their own or failed to start: (unix seconds,
    /// reason with the tail of stderr, credentials masked).
    pub fn last_exit(&self, target_id: &str) -> Option<(i64, String)> {
        self.exits.lock().unwrap().get(target_id).cloned()
    }

    /// The target ids of processes as they finish starting.
    pub fn subscribe_started(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.started.subscribe()
    }

    fn count_failure(&self, key: &ProcessKey, started: Instant) {
        let mut crashes = self.crashes.lock().unwrap();
        let entry = crashes.entry(key.clone()).or_insert((0, Instant::now()));
        // A process that ran a while before failing starts the count again.
        *entry = (if started.elapsed() > CRASH_MEMORY { 1 } else { entry.0 + 1 }, Instant::now());
    }

    /// The initialised process for `key`, started (and initialised once) when missing, or
    /// replaced when its command or env changed. Waits at most `wait` for a start: a start the
    /// caller stops waiting for goes on in the background (up to `stdio.start_timeout`), and
    /// [`Pool::subscribe_started`] announces it when it is up.
    pub async fn get(
        self: &Arc<Self>,
        target: &Target,
        key: ProcessKey,
        env: BTreeMap<String, String>,
        initialize: &Value,
        wait: Duration,
    ) -> Result<Arc<Process>, UpstreamError> {
        let command = target.command.as_deref().unwrap_or_default();
        if !self.settings.allows(command) {
            return Err(UpstreamError::Refused(format!(
                "the command {command:?} is not in this data plane's stdio.allowed_commands"
            )));
        }
        let sandbox = self.sandbox.as_ref().map_err(|e| UpstreamError::Refused(e.to_string()))?;
        let wanted = fingerprint(target, &env);
        let starting = {
            // Checking for a process or a start and beginning one happen under one lock, so two
            // callers never start the same key twice.
            let mut starts = self.starting.lock().unwrap();
            if let Some(existing) = self.processes.lock().unwrap().get(&key).cloned() {
                if !existing.closed.is_cancelled() && existing.fingerprint == wanted {
                    return Ok(existing);
                }
            }
            // A start of other settings (the env changed meanwhile) is not what this caller needs.
            if let Some(stale) = starts.get(&key).filter(|s| s.process.fingerprint != wanted) {
                stale.process.kill();
                starts.remove(&key);
            }
            match starts.get(&key).cloned() {
                Some(starting) => starting,
                None => {
                    let starting = self.begin(&starts, target, &key, env, sandbox, initialize)?;
                    starts.insert(key.clone(), starting.clone());
                    starting
                }
            }
        };
        let mut outcome = starting.outcome.clone();
        let waited = tokio::time::timeout(wait, outcome.wait_for(Option::is_some)).await;
        let result = match waited {
            Err(_) => {
                return Err(UpstreamError::Refused(format!(
                    "the STDIO server is still starting after {:.0} s; it goes on starting, and sessions are told when its tools are there",
                    wait.as_secs_f64()
                )))
            }
            Ok(Err(_)) => Err("the start was abandoned".to_string()),
            Ok(Ok(result)) => result.clone().expect("waited for an outcome"),
        };
        match result {
            Ok(()) => Ok(starting.process),
            Err(error) => Err(UpstreamError::Refused(error)),
        }
    }

    /// Checks the key may start now (crash backoff, process limits), spawns the process and
    /// leaves its initialisation to a task of its own. Called with the `starting` lock held.
    fn begin(
        self: &Arc<Self>,
        starts: &HashMap<ProcessKey, Starting>,
        target: &Target,
        key: &ProcessKey,
        env: BTreeMap<String, String>,
        sandbox: &Sandbox,
        initialize: &Value,
    ) -> Result<Starting, UpstreamError> {
        let gone = self.processes.lock().unwrap().get(key).filter(|p| p.closed.is_cancelled()).cloned();
        if let Some(gone) = gone.filter(|p| p.crashed()) {
            self.count_failure(key, gone.started);
            // Counted once: the dead process leaves the pool now.
            self.processes.lock().unwrap().remove(key);
        }
        if let Some(&(count, at)) = self.crashes.lock().unwrap().get(key) {
            let wait = restart_backoff(count);
            if at.elapsed() < wait {
                let left = (wait - at.elapsed()).as_secs_f64();
                return Err(UpstreamError::Refused(format!(
                    "the STDIO server failed {count} times in a row; it restarts in {left:.1} s"
                )));
            }
        }
        if let Some(stale) = self.processes.lock().unwrap().remove(key) {
            tracing::info!(target = %target.name, pid = stale.pid, "recycling a STDIO server (gone, or its command or env changed)");
            stale.stop();
        }
        {
            let processes = self.processes.lock().unwrap();
            // Starts in progress count as running.
            let mine = starts.keys().filter(|k| key.user().is_some() && k.user() == key.user()).count();
            let starts = (starts.len(), mine);
            let running = processes.values().filter(|p| !p.closed.is_cancelled());
            let (all, mine) = running.fold(starts, |(all, mine), p| {
                (all + 1, mine + usize::from(key.user().is_some() && p.key.user() == key.user()))
            });
            if all >= self.settings.max_processes as usize {
                return Err(UpstreamError::Refused(format!(
                    "this data plane runs its maximum of {} STDIO servers; try again later",
                    self.settings.max_processes
                )));
            }
            if mine >= self.settings.max_processes_per_user as usize {
                return Err(UpstreamError::Refused(format!(
                    "you already run {mine} STDIO servers here, the most one user may (stdio.max_processes_per_user)"
                )));
            }
        }
        let process = Process::spawn(target, key.clone(), env, sandbox, self.max_message_bytes, self.exits.clone())?;
        let (publish, outcome) = tokio::sync::watch::channel(None);
        let (pool, key, initialize, name) = (self.clone(), key.clone(), initialize.clone(), target.name.clone());
        let timeout = self.settings.start_timeout;
        let starting = process.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = match tokio::time::timeout(timeout, starting.request(GATEWAY, &initialize, None)).await {
                Ok(Ok(reply)) => match reply.get("result").cloned() {
                    Some(result) => Ok(result),
                    None => Err(UpstreamError::Refused(super::streamable::error_text(&reply))),
                },
                Ok(Err(error)) => Err(error),
                Err(_) => Err(UpstreamError::Timeout(timeout)),
            };
            let outcome = match outcome {
                Ok(result) => {
                    *starting.initialize_result.lock().unwrap() = Some(result);
                    starting.send(GATEWAY, &jsonrpc::notification("notifications/initialized", None)).await
                }
                Err(error) => Err(error),
            };
            let mut starts = pool.starting.lock().unwrap();
            // Only this start's entry: a newer start of the key may have replaced it.
            if starts.get(&key).is_some_and(|s| Arc::ptr_eq(&s.process, &starting)) {
                starts.remove(&key);
            }
            match outcome {
                Ok(()) if !starting.closed.is_cancelled() => {
                    pool.processes.lock().unwrap().insert(key, starting.clone());
                    drop(starts);
                    tracing::info!(target = %name, pid = starting.pid, seconds = started.elapsed().as_secs_f64(), "STDIO server started");
                    let _ = pool.started.send(starting.key.target_id.clone());
                    let _ = publish.send(Some(Ok(())));
                }
                // Stopped by the gateway while starting (restarted, recycled, replaced, shutdown):
                // not a failure of the server's.
                _ if starting.stopping.load(Ordering::Relaxed) => {
                    drop(starts);
                    starting.kill();
                    let _ =
                        publish.send(Some(Err("the start was stopped: the server was restarted or replaced".into())));
                }
                outcome => {
                    drop(starts);
                    let error = outcome
                        .err()
                        .map_or_else(|| "the server stopped while starting".to_string(), |e| e.to_string());
                    tracing::warn!(target = %name, pid = starting.pid, %error, "a STDIO server failed to start; stopped it");
                    record_exit(&pool.exits, &key.target_id, &format!("did not start: {error}"), &starting.stderr);
                    starting.kill();
                    pool.failed_starts.fetch_add(1, Ordering::Relaxed);
                    pool.count_failure(&key, started);
                    let _ = publish.send(Some(Err(error)));
                }
            }
        });
        Ok(Starting { process, outcome })
    }

    /// Stops processes idle past `idle_ttl` or older than `max_lifetime`, and forgets dead ones.
    pub fn collect(&self) {
        let mut processes = self.processes.lock().unwrap();
        processes.retain(|_, process| {
            let expired = process.last_used().elapsed() > self.settings.idle_ttl
                || process.started.elapsed() > self.settings.max_lifetime;
            if expired {
                tracing::info!(target = %process.target_name, pid = process.pid, "stopping an idle or expired STDIO server");
                process.stop();
            }
            // Crashed processes stay until the next start looks at them (to count the crash).
            !expired && (!process.closed.is_cancelled() || process.crashed())
        });
    }

    /// Stops the processes of targets that are gone, disabled, or changed in `targets` (a new
    /// command, arguments or restart generation): a new snapshot applies to running processes.
    /// Stops the processes whose target was restarted, changed, disabled or removed. Returns,
    /// per target id, how many were stopped.
    pub fn retire<'t>(&self, targets: impl IntoIterator<Item = &'t Target>) -> HashMap<String, u32> {
        let current: HashMap<&str, &Target> = targets.into_iter().map(|t| (t.id.as_str(), t)).collect();
        let mut stopped: HashMap<String, u32> = HashMap::new();
        // Starts in progress of what is no longer wanted end too (they would land later, stale).
        self.starting.lock().unwrap().retain(|_, starting| {
            let keep = still_wanted(&starting.process, current.get(starting.process.key.target_id.as_str()));
            if !keep {
                tracing::info!(target = %starting.process.target_name, pid = starting.process.pid, "stopping a STDIO server while it starts: its target was restarted, changed or removed");
                starting.process.kill();
                *stopped.entry(starting.process.key.target_id.clone()).or_default() += 1;
            }
            keep
        });
        self.processes.lock().unwrap().retain(|_, process| {
            let keep = still_wanted(process, current.get(process.key.target_id.as_str()));
            if !keep {
                tracing::info!(target = %process.target_name, pid = process.pid, "stopping a STDIO server: its target was restarted, changed or removed");
                process.stop();
                *stopped.entry(process.key.target_id.clone()).or_default() += 1;
            }
            keep
        });
        stopped
    }

    /// Stops the `per_user` processes of `user` (a recycle: they hold that user's old
    /// credentials). Returns how many.
    pub fn stop_user(&self, user: &str) -> u32 {
        let mut stopped = 0;
        self.starting.lock().unwrap().retain(|key, starting| {
            let keep = key.user() != Some(user);
            if !keep {
                starting.process.kill();
                stopped += 1;
            }
            keep
        });
        self.processes.lock().unwrap().retain(|_, process| {
            let keep = process.key.user() != Some(user);
            if !keep {
                tracing::info!(target = %process.target_name, pid = process.pid, "stopping a per-user STDIO server: its user's sessions were recycled");
                process.stop();
                stopped += 1;
            }
            keep
        });
        stopped
    }

    /// Stops every process (on shutdown): stdin closed and SIGTERM/SIGKILL after the grace
    /// periods, as [`Process::stop`] does.
    pub fn stop_all(&self) {
        for (_, starting) in self.starting.lock().unwrap().drain() {
            starting.process.kill();
        }
        for (_, process) in self.processes.lock().unwrap().drain() {
            process.stop();
        }
    }

    /// Stops every process and waits until each group is gone (at most two grace periods,
    /// then SIGKILL): what shutdown awaits, so no child outlives the data plane.
    pub async fn shutdown(&self) {
        for (_, starting) in self.starting.lock().unwrap().drain() {
            starting.process.kill();
        }
        let processes: Vec<Arc<Process>> = self.processes.lock().unwrap().drain().map(|(_, p)| p).collect();
        for process in &processes {
            process.stop();
        }
        let all_gone = async {
            for process in &processes {
                process.closed.cancelled().await;
                while std::path::Path::new(&format!("/proc/{}", process.pid)).exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        if tokio::time::timeout(GRACE * 2 + Duration::from_millis(500), all_gone).await.is_err() {
            for process in &processes {
                process.kill();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_after_repeated_crashes() {
        assert_eq!(restart_backoff(1), Duration::ZERO);
        assert_eq!(restart_backoff(2), Duration::from_secs(1));
        assert_eq!(restart_backoff(4), Duration::from_secs(4));
        assert_eq!(restart_backoff(40), Duration::from_secs(30));
    }

    #[test]
    fn run_as_resolves_names_and_ids() {
        assert_eq!(resolve_user("0").unwrap().0, 0);
        assert_eq!(resolve_user("1000:1001").unwrap(), (1000, 1001));
        assert_eq!(resolve_user("root").unwrap(), (0, 0));
        assert!(resolve_user("no-such-user-here").is_err());
        assert!(resolve_user("a:b").is_err());
    }
}
