//! Many client sessions over one STDIO process, with no way for one to touch another's request.
//!
//! A shared process sees one JSON-RPC peer, the gateway, so everything that names a request is
//! rewritten to a process-side name the gateway chose, and mapped back on the way out:
//!
//! - a request's id becomes a fresh number; the reply gets the caller's id back;
//! - a request's progress token becomes `reflow-<that number>`; progress carrying it reaches
//!   the request's own stream with the caller's token, and progress for any other token is
//!   dropped (never broadcast);
//! - a client's `notifications/cancelled` names the process-side id of *that session's* request
//!   with the id it gave, or is not sent at all;
//! - a server→client request (sampling, elicitation, roots) goes to the one session it can be
//!   attributed to (the only request in flight, or the only session using the process), and only
//!   that session's answer is passed back; one that cannot be attributed is refused to the
//!   process with an error instead of being shown to every session.
//!
//! [`Multiplexer`] holds this bookkeeping as plain data, so the rules are tested on their own
//! (a property test below pits two sessions with colliding ids and tokens against each other).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::Sink;
use crate::jsonrpc;

/// Who a request belongs to: one per [`super::Upstream`], that is per client session.
pub type Owner = u64;

/// The owner of requests the gateway makes for the process itself (`initialize`).
pub const GATEWAY: Owner = 0;

/// Server→client requests awaiting a session's answer, at most (the oldest is forgotten).
const MAX_SERVER_REQUESTS: usize = 1024;
/// How long a server→client request may wait for its session's answer.
const SERVER_REQUEST_TTL: Duration = Duration::from_secs(600);

/// A request in flight on the process.
#[derive(Debug)]
pub struct Waiter {
    pub owner: Owner,
    /// The id the caller used, restored on the reply.
    pub original_id: Value,
    /// The progress token the caller used, restored on its progress.
    pub original_token: Option<Value>,
    pub reply: oneshot::Sender<Value>,
    pub sink: Option<Sink>,
}

/// What to do with a message the process wrote.
#[derive(Debug)]
pub enum Route {
    /// The reply to a waiting request, with the caller's id back in place.
    Reply(Waiter, Value),
    /// For one session: on its request's stream when it has one, else the session's inbox.
    Session { owner: Owner, sink: Option<Sink>, message: Value },
    /// Unrelated to any request (list changes, logging): every session using the process.
    Everyone(Value),
    /// Cannot be attributed to one session: this answer is written back to the process.
    Answer(Value),
    /// Nothing waits for it (a late reply, progress for a finished request).
    Drop,
}

#[derive(Debug, Default)]
pub struct Multiplexer {
    next_id: u64,
    waiters: HashMap<u64, Waiter>,
    /// Server→client requests handed to a session, by the process's id for them: who may answer.
    server_requests: HashMap<String, (Owner, Instant)>,
}

fn token_for(id: u64) -> Value {
    Value::String(format!("reflow-{id}"))
}

fn id_of_token(token: &Value) -> Option<u64> {
    token.as_str()?.strip_prefix("reflow-")?.parse().ok()
}

impl Multiplexer {
    /// Registers `message` (a request) of `owner`: returns its process-side id, the message to
    /// write, and where its reply will arrive.
    pub fn register(
        &mut self,
        owner: Owner,
        message: &Value,
        sink: Option<Sink>,
    ) -> (u64, Value, oneshot::Receiver<Value>) {
        self.next_id += 1;
        let id = self.next_id;
        let mut rewritten = message.clone();
        rewritten["id"] = json!(id);
        let original_token = message.pointer("/params/_meta/progressToken").cloned();
        if original_token.is_some() {
            rewritten["params"]["_meta"]["progressToken"] = token_for(id);
        }
        let (reply, answered) = oneshot::channel();
        let waiter = Waiter { owner, original_id: message["id"].clone(), original_token, reply, sink };
        self.waiters.insert(id, waiter);
        (id, rewritten, answered)
    }

    /// Forgets a request (answered, timed out, or abandoned).
    pub fn forget(&mut self, id: u64) {
        self.waiters.remove(&id);
    }

    /// Fails every waiting request at once (their reply channels close): the process is gone.
    pub fn clear(&mut self) {
        self.waiters.clear();
        self.server_requests.clear();
    }

    pub fn in_flight(&self) -> usize {
        self.waiters.len()
    }

    /// The `notifications/cancelled` to write for `owner` cancelling its request `original_id`,
    /// naming the process-side id; `None` when `owner` has no such request in flight.
    pub fn cancel(&self, owner: Owner, original_id: &Value, reason: Option<&Value>) -> Option<Value> {
        let (id, _) = self.waiters.iter().find(|(_, w)| w.owner == owner && w.original_id == *original_id)?;
        let mut params = json!({"requestId": id});
        if let Some(reason) = reason {
            params["reason"] = reason.clone();
        }
        Some(jsonrpc::notification("notifications/cancelled", Some(params)))
    }

    /// Whether `owner` may pass `response` (an answer to a server→client request) to the
    /// process: only the session the request was handed to may answer it, once.
    pub fn answer(&mut self, owner: Owner, response: &Value) -> bool {
        let key = jsonrpc::id_key(&response["id"]);
        match self.server_requests.get(&key) {
            Some((to, _)) if *to == owner => {
                self.server_requests.remove(&key);
                true
            }
            _ => false,
        }
    }

    /// Decides where a message the process wrote goes. `sole_subscriber` is the one session
    /// using the process, if only one does.
    pub fn route(&mut self, mut message: Value, sole_subscriber: Option<Owner>) -> Route {
        if jsonrpc::is_response(&message) {
            let Some(waiter) = message["id"].as_u64().and_then(|id| self.waiters.remove(&id)) else {
                return Route::Drop;
            };
            message["id"] = waiter.original_id.clone();
            return Route::Reply(waiter, message);
        }
        let method = message.get("method").and_then(Value::as_str).unwrap_or_default();
        if method == "notifications/progress" {
            let waiter =
                message.pointer("/params/progressToken").and_then(id_of_token).and_then(|id| self.waiters.get(&id));
            let Some(waiter) = waiter.filter(|w| w.original_token.is_some()) else { return Route::Drop };
            message["params"]["progressToken"] = waiter.original_token.clone().unwrap_or_default();
            return Route::Session { owner: waiter.owner, sink: waiter.sink.clone(), message };
        }
        if message.get("id").is_none() {
            return Route::Everyone(message);
        }
        // A server→client request: to the only request in flight, else the only session.
        let sessions: Vec<&Waiter> = self.waiters.values().filter(|w| w.owner != GATEWAY).collect();
        let target = match (sessions.as_slice(), sole_subscriber) {
            ([only], _) => Some((only.owner, only.sink.clone())),
            ([], Some(owner)) => Some((owner, None)),
            _ => None,
        };
        let Some((owner, sink)) = target else {
            return Route::Answer(jsonrpc::error(
                message["id"].clone(),
                -32603,
                "the gateway cannot tell which client this request is for: this process serves several sessions at once",
            ));
        };
        self.remember_server_request(&message["id"], owner);
        Route::Session { owner, sink, message }
    }

    fn remember_server_request(&mut self, id: &Value, owner: Owner) {
        let now = Instant::now();
        self.server_requests.retain(|_, (_, at)| now.duration_since(*at) < SERVER_REQUEST_TTL);
        if self.server_requests.len() >= MAX_SERVER_REQUESTS {
            if let Some(oldest) = self.server_requests.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| k.clone()) {
                self.server_requests.remove(&oldest);
            }
        }
        self.server_requests.insert(jsonrpc::id_key(id), (owner, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(id: Value, token: Option<Value>) -> Value {
        let mut message = jsonrpc::request(id, "tools/call", Some(json!({"name": "slow"})));
        if let Some(token) = token {
            message["params"]["_meta"] = json!({"progressToken": token});
        }
        message
    }

    #[test]
    fn a_server_request_goes_to_its_one_session_and_only_that_session_answers() {
        let mut mux = Multiplexer::default();
        let (sink, _rx) = Sink::channel();
        mux.register(7, &request(json!(1), None), Some(sink));
        let ask = jsonrpc::request(json!("s1"), "sampling/createMessage", Some(json!({})));
        assert!(matches!(mux.route(ask.clone(), None), Route::Session { owner: 7, sink: Some(_), .. }));
        let answer = json!({"jsonrpc": "2.0", "id": "s1", "result": {}});
        assert!(!mux.answer(8, &answer), "another session cannot answer");
        assert!(mux.answer(7, &answer));
        assert!(!mux.answer(7, &answer), "answered once");
        // Two sessions in flight: refused to the process, shown to nobody.
        mux.register(8, &request(json!(1), None), None);
        assert!(matches!(mux.route(ask, Some(7)), Route::Answer(reply) if reply["error"]["code"] == -32603));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Register { owner: Owner, id: u8, token: Option<u8> },
        Cancel { owner: Owner, id: u8 },
        Progress { process_id: u64 },
        Reply { process_id: u64 },
    }

    fn colliding(n: u8) -> Value {
        // 1 and "1" are different ids; both sessions use both.
        if n.is_multiple_of(2) {
            json!(n / 2)
        } else {
            json!((n / 2).to_string())
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..=2, 0u8..4, prop::option::of(0u8..4)).prop_map(|(owner, id, token)| Op::Register {
                owner,
                id,
                token
            }),
            (1u64..=2, 0u8..4).prop_map(|(owner, id)| Op::Cancel { owner, id }),
            (1u64..=12).prop_map(|process_id| Op::Progress { process_id }),
            (1u64..=12).prop_map(|process_id| Op::Reply { process_id }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Two sessions whose request ids and progress tokens collide on purpose: a cancellation
        /// only ever names the canceller's own request, progress only ever reaches the request
        /// that asked for it with its own token, and replies carry their caller's id.
        #[test]
        fn cancellations_progress_and_replies_never_cross(ops in prop::collection::vec(op(), 1..60)) {
            let mut mux = Multiplexer::default();
            // The reference: process id → (owner, original id, original token), while in flight.
            let mut model: HashMap<u64, (Owner, Value, Option<Value>)> = HashMap::new();
            let mut receivers = Vec::new();
            for op in ops {
                match op {
                    Op::Register { owner, id, token } => {
                        let (original_id, original_token) = (colliding(id), token.map(colliding));
                        let (process_id, written, answered) =
                            mux.register(owner, &request(original_id.clone(), original_token.clone()), None);
                        prop_assert_eq!(&written["id"], &json!(process_id));
                        if original_token.is_some() {
                            prop_assert_eq!(&written["params"]["_meta"]["progressToken"], &token_for(process_id));
                        }
                        model.insert(process_id, (owner, original_id, original_token));
                        receivers.push(answered);
                    }
                    Op::Cancel { owner, id } => {
                        let original = colliding(id);
                        match mux.cancel(owner, &original, None) {
                            Some(notification) => {
                                let named = notification["params"]["requestId"].as_u64().unwrap();
                                let (by, original_id, _) = model.get(&named).expect("names a request in flight");
                                prop_assert_eq!(*by, owner, "cancelled another session's request");
                                prop_assert_eq!(original_id, &original);
                            }
                            None => prop_assert!(!model.values().any(|(by, id, _)| *by == owner && *id == original)),
                        }
                    }
                    Op::Progress { process_id } => {
                        let progress = jsonrpc::notification(
                            "notifications/progress",
                            Some(json!({"progressToken": token_for(process_id), "progress": 1})),
                        );
                        match (mux.route(progress, Some(1)), model.get(&process_id)) {
                            (Route::Session { owner, message, .. }, Some((by, _, Some(token)))) => {
                                prop_assert_eq!(owner, *by);
                                prop_assert_eq!(&message["params"]["progressToken"], token);
                            }
                            (Route::Drop, None) | (Route::Drop, Some((_, _, None))) => {}
                            (route, expected) => prop_assert!(false, "{:?} for {:?}", route, expected),
                        }
                    }
                    Op::Reply { process_id } => {
                        let reply = json!({"jsonrpc": "2.0", "id": process_id, "result": {}});
                        match (mux.route(reply, None), model.remove(&process_id)) {
                            (Route::Reply(waiter, message), Some((owner, original_id, _))) => {
                                prop_assert_eq!(waiter.owner, owner);
                                prop_assert_eq!(&message["id"], &original_id);
                            }
                            (Route::Drop, None) => {}
                            (route, expected) => prop_assert!(false, "{:?} for {:?}", route, expected),
                        }
                    }
                }
            }
        }
    }
}
