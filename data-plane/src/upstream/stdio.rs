//! STDIO upstreams: MCP servers run as child processes of the data plane, pooled by target and
//! isolation key, shared by every client session that maps to the key.
//!
//! Written here rather than with a child-process transport crate because a shared process
//! needs control such a transport does not give: request ids are rewritten so concurrent
//! sessions multiplex on one process, replies and progress are routed back by id and token,
//! stdout lines that are not JSON-RPC are logged and skipped, and the child's environment,
//! process group and shutdown are the gateway's to decide.
//!
//! A child gets a cleared environment: only its resolved env (limited by the isolation
//! boundary) plus a minimal `PATH` and `HOME`, never the data plane's own (which holds the
//! data-plane token). Command and arguments are an array; a shell is never involved, and the
//! command must be in `stdio.allowed_commands`. Each child leads its own process group, and
//! stopping it signals the whole group (an `npx` wrapper's grandchildren included).

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reflow_common::config::StdioConfig;
use reflow_common::credentials::Isolation;
use reflow_proto::resources::{Target, User};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{owner_of, Sink, UpstreamError};
use crate::mcp::jsonrpc;

const CHILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Longest stdout line accepted from a child (a larger one ends the process: it is broken).
const MAX_LINE: usize = 16 * 1024 * 1024;
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
}

struct Waiter {
    /// The id the caller used, restored on the reply.
    original_id: Value,
    reply: oneshot::Sender<Value>,
    sink: Option<Sink>,
    progress_token: Option<Value>,
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
    last_used: Mutex<Instant>,
    /// A hash of the command, arguments and env: a change in the snapshot recycles the process.
    pub fingerprint: String,
    stdin: tokio::sync::Mutex<ChildStdin>,
    /// Requests awaiting replies, by the rewritten id. Cleared (failing every waiter at once)
    /// when the child's stdout ends.
    waiters: Arc<Mutex<HashMap<u64, Waiter>>>,
    next_id: AtomicU64,
    /// The result of the one `initialize` this process gets.
    pub initialize_result: Mutex<Option<Value>>,
    /// Cancelled when the child is gone or being stopped.
    pub closed: CancellationToken,
    /// Set when the gateway stops the process; a process closed without it crashed.
    stopping: std::sync::atomic::AtomicBool,
    /// Messages unrelated to a request, for every session using the process.
    subscribers: Arc<Mutex<Vec<mpsc::Sender<Value>>>>,
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
    fn spawn(target: &Target, key: ProcessKey, env: BTreeMap<String, String>) -> Result<Arc<Process>, UpstreamError> {
        let command = target.command.as_deref().ok_or(UpstreamError::BadUrl)?;
        let fingerprint = fingerprint(target, &env);
        let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
        let mut child_command = Command::new(command);
        child_command
            .args(&target.args)
            .env_clear()
            .env("PATH", CHILD_PATH)
            .env("HOME", home)
            .envs(env.iter().filter(|(k, _)| !reflow_common::names::is_forbidden_env_key(k)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child: Child = child_command
            .spawn()
            .map_err(|e| UpstreamError::Unreachable(format!("could not start {command:?}: {}", e.kind())))?;
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let closed = CancellationToken::new();
        let waiters: Arc<Mutex<HashMap<u64, Waiter>>> = Arc::default();
        let subscribers: Arc<Mutex<Vec<mpsc::Sender<Value>>>> = Arc::default();
        let name = target.name.clone();
        tokio::spawn({
            let name = name.clone();
            async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(target: "reflow::stdio", target = %name, pid, "{line}");
                }
            }
        });
        tokio::spawn(read_stdout(stdout, name.clone(), pid, waiters.clone(), subscribers.clone(), closed.clone()));
        tokio::spawn(supervise(child, name.clone(), pid, closed.clone()));
        tracing::info!(target = %name, pid, scope = %key.scope, "started a STDIO server");
        Ok(Arc::new(Process {
            key,
            target: target.clone(),
            target_name: name,
            pid,
            started: Instant::now(),
            started_wall: std::time::SystemTime::now(),
            last_used: Mutex::new(Instant::now()),
            fingerprint,
            stdin: tokio::sync::Mutex::new(stdin),
            waiters,
            next_id: AtomicU64::new(1),
            initialize_result: Mutex::new(None),
            closed,
            stopping: std::sync::atomic::AtomicBool::new(false),
            subscribers,
        }))
    }

    /// Whether the process ended without the gateway stopping it (exit, crash, closed stdout).
    pub fn crashed(&self) -> bool {
        self.closed.is_cancelled() && !self.stopping.load(Ordering::Relaxed)
    }

    pub fn last_used(&self) -> Instant {
        *self.last_used.lock().unwrap()
    }

    /// Receives the messages the process sends outside any request.
    pub fn subscribe(&self, inbox: mpsc::Sender<Value>) {
        self.subscribers.lock().unwrap().push(inbox);
    }

    async fn write(&self, message: &Value) -> Result<(), UpstreamError> {
        let mut line = serde_json::to_vec(message).expect("a JSON value serialises");
        line.push(b'\n');
        let mut stdin = self.stdin.lock().await;
        stdin.write_all(&line).await.map_err(|_| UpstreamError::Disconnected)?;
        stdin.flush().await.map_err(|_| UpstreamError::Disconnected)
    }

    /// Sends a request under a fresh id and returns the reply with the caller's id restored.
    pub async fn request(&self, message: &Value, sink: Option<&Sink>) -> Result<Value, UpstreamError> {
        if self.closed.is_cancelled() {
            return Err(UpstreamError::Disconnected);
        }
        *self.last_used.lock().unwrap() = Instant::now();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answered) = oneshot::channel();
        let waiter = Waiter {
            original_id: message["id"].clone(),
            reply,
            sink: sink.cloned(),
            progress_token: message.pointer("/params/_meta/progressToken").cloned(),
        };
        self.waiters.lock().unwrap().insert(id, waiter);
        let mut rewritten = message.clone();
        rewritten["id"] = json!(id);
        if let Err(error) = self.write(&rewritten).await {
            self.waiters.lock().unwrap().remove(&id);
            return Err(error);
        }
        let result = answered.await.map_err(|_| UpstreamError::Disconnected);
        self.waiters.lock().unwrap().remove(&id);
        result
    }

    /// Sends a notification or a response.
    pub async fn send(&self, message: &Value) -> Result<(), UpstreamError> {
        *self.last_used.lock().unwrap() = Instant::now();
        self.write(message).await
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
}

async fn read_stdout(
    stdout: tokio::process::ChildStdout,
    name: String,
    pid: u32,
    waiters: Arc<Mutex<HashMap<u64, Waiter>>>,
    subscribers: Arc<Mutex<Vec<mpsc::Sender<Value>>>>,
    closed: CancellationToken,
) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = tokio::select! {
            _ = closed.cancelled() => break,
            read = read_line(&mut reader, &mut line) => read,
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
        if !message.is_object() {
            continue;
        }
        if jsonrpc::is_response(&message) {
            let id = message["id"].as_u64();
            let waiter = id.and_then(|id| waiters.lock().unwrap().remove(&id));
            if let Some(waiter) = waiter {
                let mut message = message;
                message["id"] = waiter.original_id;
                let _ = waiter.reply.send(message);
            }
            continue;
        }
        let sink = {
            let waiters = waiters.lock().unwrap();
            owner_of(&message, waiters.values().map(|w| (w.progress_token.as_ref(), w.sink.as_ref())))
        };
        match sink {
            Some(sink) => {
                let _ = sink.send(message);
            }
            None => {
                let targets: Vec<_> = subscribers.lock().unwrap().clone();
                for subscriber in targets {
                    let _ = subscriber.try_send(message.clone());
                }
                subscribers.lock().unwrap().retain(|s| !s.is_closed());
            }
        }
    }
    closed.cancel();
    waiters.lock().unwrap().clear();
}

/// Reads one `\n`-terminated line, refusing lines longer than [`MAX_LINE`].
async fn read_line(reader: &mut BufReader<tokio::process::ChildStdout>, line: &mut Vec<u8>) -> std::io::Result<usize> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(line.len());
        }
        match available.iter().position(|&b| b == b'\n') {
            Some(end) => {
                line.extend_from_slice(&available[..=end]);
                reader.consume(end + 1);
                return Ok(line.len());
            }
            None => {
                let taken = available.len();
                line.extend_from_slice(available);
                reader.consume(taken);
                if line.len() > MAX_LINE {
                    return Err(std::io::Error::other("a line exceeded the size limit"));
                }
            }
        }
    }
}

/// Waits for the child to exit or to be stopped. Stopping ([`Process::stop`]) has closed its
/// stdin; after a grace period the group gets SIGTERM, then SIGKILL.
async fn supervise(mut child: Child, name: String, pid: u32, closed: CancellationToken) {
    tokio::select! {
        status = child.wait() => {
            tracing::warn!(target = %name, pid, status = %status.map(|s| s.to_string()).unwrap_or_default(), "a STDIO server exited");
            closed.cancel();
            signal_group(pid, nix::sys::signal::Signal::SIGKILL);
            return;
        }
        _ = closed.cancelled() => {}
    }
    if tokio::time::timeout(GRACE, child.wait()).await.is_err() {
        signal_group(pid, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(GRACE, child.wait()).await.is_err() {
            signal_group(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait().await;
        }
    }
    // The leader is gone; what it started in its group may not be.
    signal_group(pid, nix::sys::signal::Signal::SIGKILL);
    tracing::info!(target = %name, pid, "stopped a STDIO server");
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

/// The running processes, by key.
#[derive(Debug)]
pub struct Pool {
    settings: StdioConfig,
    processes: Mutex<HashMap<ProcessKey, Arc<Process>>>,
    /// Recent crashes by key (count, when): a key that keeps crashing restarts with backoff.
    crashes: Mutex<HashMap<ProcessKey, (u32, Instant)>>,
    /// Serialises starting processes, so two sessions arriving together share one.
    starting: tokio::sync::Mutex<()>,
}

impl Pool {
    pub fn new(settings: StdioConfig) -> Self {
        Pool {
            settings,
            processes: Mutex::new(HashMap::new()),
            crashes: Mutex::new(HashMap::new()),
            starting: tokio::sync::Mutex::new(()),
        }
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

    /// The initialised process for `key`, started (and initialised once) when missing, or
    /// replaced when its command or env changed.
    pub async fn get(
        &self,
        target: &Target,
        key: ProcessKey,
        env: BTreeMap<String, String>,
        initialize: &Value,
        timeout: Duration,
    ) -> Result<Arc<Process>, UpstreamError> {
        let command = target.command.as_deref().unwrap_or_default();
        if !self.settings.allows(command) {
            return Err(UpstreamError::Refused(format!(
                "the command {command:?} is not in this data plane's stdio.allowed_commands"
            )));
        }
        let wanted = fingerprint(target, &env);
        let _starting = self.starting.lock().await;
        if let Some(existing) = self.processes.lock().unwrap().get(&key).cloned() {
            if !existing.closed.is_cancelled() && existing.fingerprint == wanted {
                return Ok(existing);
            }
        }
        let gone = self.processes.lock().unwrap().get(&key).filter(|p| p.closed.is_cancelled()).cloned();
        if let Some(gone) = gone.filter(|p| p.crashed()) {
            // A process that ran a while before crashing starts the count again.
            let mut crashes = self.crashes.lock().unwrap();
            let entry = crashes.entry(key.clone()).or_insert((0, Instant::now()));
            *entry = (if gone.started.elapsed() > CRASH_MEMORY { 1 } else { entry.0 + 1 }, Instant::now());
            drop(crashes);
            // Counted once: the dead process leaves the pool now.
            self.processes.lock().unwrap().remove(&key);
        }
        if let Some(&(count, at)) = self.crashes.lock().unwrap().get(&key) {
            let wait = restart_backoff(count);
            if at.elapsed() < wait {
                let left = (wait - at.elapsed()).as_secs_f64();
                return Err(UpstreamError::Refused(format!(
                    "the STDIO server crashed {count} times in a row; it restarts in {left:.1} s"
                )));
            }
        }
        if let Some(stale) = self.processes.lock().unwrap().remove(&key) {
            tracing::info!(target = %target.name, pid = stale.pid, "recycling a STDIO server (gone, or its command or env changed)");
            stale.stop();
        }
        let running = self.processes.lock().unwrap().values().filter(|p| !p.closed.is_cancelled()).count();
        if running >= self.settings.max_processes as usize {
            return Err(UpstreamError::Refused(format!(
                "this data plane runs its maximum of {} STDIO servers; try again later",
                self.settings.max_processes
            )));
        }
        let process = Process::spawn(target, key.clone(), env)?;
        let reply = match tokio::time::timeout(timeout, process.request(initialize, None)).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => {
                process.stop();
                return Err(error);
            }
            Err(_) => {
                process.stop();
                return Err(UpstreamError::Timeout(timeout));
            }
        };
        let Some(result) = reply.get("result").cloned() else {
            process.stop();
            return Err(UpstreamError::Refused(super::streamable::error_text(&reply)));
        };
        process.send(&jsonrpc::notification("notifications/initialized", None)).await?;
        *process.initialize_result.lock().unwrap() = Some(result);
        self.processes.lock().unwrap().insert(key, process.clone());
        Ok(process)
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
    pub fn retire<'t>(&self, targets: impl IntoIterator<Item = &'t Target>) {
        let current: HashMap<&str, &Target> = targets.into_iter().map(|t| (t.id.as_str(), t)).collect();
        self.processes.lock().unwrap().retain(|_, process| {
            let keep = current.get(process.key.target_id.as_str()).is_some_and(|t| {
                t.enabled
                    && t.command == process.target.command
                    && t.args == process.target.args
                    && t.restart_generation == process.target.restart_generation
            });
            if !keep {
                tracing::info!(target = %process.target_name, pid = process.pid, "stopping a STDIO server: its target was restarted, changed or removed");
                process.stop();
            }
            keep
        });
    }

    /// Stops every process (on shutdown).
    pub fn stop_all(&self) {
        for (_, process) in self.processes.lock().unwrap().drain() {
            process.stop();
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
}
