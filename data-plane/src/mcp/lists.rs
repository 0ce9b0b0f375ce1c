//! Lists merged over every reachable target (`tools/list`, `prompts/list`, `resources/list`,
//! `resources/templates/list`): fetched from each upstream, filtered by policy, prefixed,
//! shared between the sessions of one user while nothing they depend on changed, and paged
//! with cursors over a stable result.

use std::sync::Arc;

use base64::Engine as _;
use reflow_proto::policy::{decide, may_allow_any, Kind};
use reflow_proto::resources::{Target, User};
use serde_json::{json, Map, Value};

use super::error::McpError;
use super::gateway::{Caller, Gateway, Reply};
use super::merged::{CachedList, ListKey, Merged};
use super::names;
use super::session::ClientSession;
use super::Scope;
use crate::audit::{LegStart, Trail};
use crate::jsonrpc;
use crate::snapshot::DataSnapshot;
use crate::upstream::UpstreamError;

/// Upstream list pages fetched at most, against an upstream whose cursors never end.
const MAX_UPSTREAM_PAGES: usize = 1000;

/// A list method and how its items are named.
#[derive(Debug)]
pub(super) struct ListSpec {
    pub(super) method: &'static str,
    pub(super) field: &'static str,
    /// The item field that names it: what policies match and what gets prefixed or mapped.
    pub(super) key: &'static str,
    pub(super) capability: &'static str,
    pub(super) kind: Kind,
    pub(super) changed: &'static str,
}

pub(super) const LISTS: [ListSpec; 4] = [
    ListSpec {
        method: "tools/list",
        field: "tools",
        key: "name",
        capability: "tools",
        kind: Kind::Tool,
        changed: "notifications/tools/list_changed",
    },
    ListSpec {
        method: "prompts/list",
        field: "prompts",
        key: "name",
        capability: "prompts",
        kind: Kind::Prompt,
        changed: "notifications/prompts/list_changed",
    },
    ListSpec {
        method: "resources/list",
        field: "resources",
        key: "uri",
        capability: "resources",
        kind: Kind::Resource,
        changed: "notifications/resources/list_changed",
    },
    ListSpec {
        method: "resources/templates/list",
        field: "resourceTemplates",
        key: "uriTemplate",
        capability: "resources",
        kind: Kind::Resource,
        changed: "notifications/resources/list_changed",
    },
];

impl Gateway {
    /// The targets a list on `scope` asks for `user`: servable, and reachable by some policy.
    pub(super) fn reachable<'s>(
        scope: &Scope,
        snapshot: &'s DataSnapshot,
        user: &User,
        kubernetes: bool,
    ) -> Vec<&'s Target> {
        let view = &snapshot.view;
        let candidates: Vec<&Target> = match scope {
            Scope::Aggregate => {
                view.targets.keys().filter_map(|name| Gateway::servable(snapshot, name, kubernetes)).collect()
            }
            Scope::Target(name) => Gateway::servable(snapshot, name, kubernetes).into_iter().collect(),
        };
        candidates.into_iter().filter(|t| may_allow_any(&view.policies, user, &t.id)).collect()
    }

    pub(super) async fn list(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        spec: &'static ListSpec,
        id: Value,
        params: Option<&Value>,
        trail: &mut Trail,
    ) -> Reply {
        if let Some(cursor) = params.and_then(|p| p.get("cursor")).filter(|c| !c.is_null()) {
            let lists = session.lists.lock().unwrap();
            let page = cursor.as_str().and_then(decode_cursor).and_then(|(generation, offset)| {
                lists
                    .get(spec.method)
                    .filter(|l| l.generation == generation && offset <= l.merged.items.len())
                    .map(|l| (l, offset))
            });
            return match page {
                Some((list, offset)) => Reply::Serialized(self.page(spec, list, offset, &id)),
                None => Reply::Now(McpError::BadCursor.into_jsonrpc(id)),
            };
        }
        let targets = Gateway::reachable(&session.scope, &caller.snapshot, &caller.user, caller.kubernetes);
        let ttl = self.settings.list_cache_ttl;
        let key = (!ttl.is_zero()).then(|| ListKey {
            version: caller.snapshot.version.clone(),
            user_id: caller.user.id.clone(),
            scope: session.scope.clone(),
            method: spec.method,
            client: session.upstream_params.get().map_or(0, |(_, hash)| *hash),
        });
        let merged = match key.as_ref().and_then(|key| self.merged.get(key, ttl)) {
            Some(merged) => merged,
            None => {
                let epochs = self.merged.epochs(targets.iter().map(|t| t.name.as_str()));
                let (merged, complete) = self.merge(session, caller, spec, &targets, trail).await;
                let merged = Arc::new(merged);
                // A merge that finished after the snapshot moved on is served, never kept.
                if let (Some(key), true, false) = (key, complete, self.snapshot_moved_on(caller)) {
                    self.merged.keep(key, merged.clone(), epochs, ttl);
                }
                merged
            }
        };
        let generation = session.next_number();
        let list = CachedList { generation, merged };
        let reply = self.page(spec, &list, 0, &id);
        session.lists.lock().unwrap().insert(spec.method, list);
        if self.snapshot_moved_on(caller) {
            // The snapshot changed while this list was made, after its sessions were checked.
            session.push(jsonrpc::notification(spec.changed, None));
        }
        Reply::Serialized(reply)
    }

    /// Whether a newer snapshot than the one `caller` is served from is active now.
    pub(super) fn snapshot_moved_on(&self, caller: &Caller) -> bool {
        self.state.load().is_some_and(|s| s.version != caller.snapshot.version)
    }

    /// Asks every target in parallel and merges what the user may see; `false` with the merge
    /// when some target failed (its items are missing).
    pub(super) async fn merge(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        spec: &'static ListSpec,
        targets: &[&Target],
        trail: &mut Trail,
    ) -> (Merged, bool) {
        // One leg (a client span) per target, whatever pages it takes.
        let legs: Vec<LegStart> = targets.iter().map(|_| trail.leg()).collect();
        let fetches = targets.iter().zip(&legs).map(|(target, leg)| async move {
            let traceparent = leg.traceparent.as_deref();
            let fetch = self.fetch_all(session, caller, target, spec, traceparent);
            let fetched = tokio::time::timeout(self.settings.list_timeout, fetch).await;
            (*target, fetched.unwrap_or(Err(UpstreamError::Timeout(self.settings.list_timeout))))
        });
        let results = futures::future::join_all(fetches).await;
        let aggregate = session.scope == Scope::Aggregate;
        let mut items = Vec::new();
        let mut offered = Vec::new();
        let mut complete = true;
        // The targets whose items are in the merge: one that failed is not, so sessions are told
        // when it comes up (a STDIO server still starting, say).
        let mut sources = Vec::with_capacity(results.len());
        let mut fields = Vec::with_capacity(results.len());
        for ((target, result), leg) in results.into_iter().zip(legs) {
            let error = match &result {
                Ok(_) => None,
                Err(UpstreamError::Timeout(_)) => Some("timeout".to_string()),
                Err(_) => Some("upstream_failed".to_string()),
            };
            trail.leg_done(leg, &target.name, target.transport_type.as_str(), spec.method, error);
            let raw = match result {
                Ok((raw, sent)) => {
                    fields.push(sent);
                    self.health.ok(&target.id);
                    sources.push(target.id.clone());
                    raw
                }
                Err(error) => {
                    self.count_failure(target, &error);
                    if error == UpstreamError::SharedSessionEnded {
                        self.upstream_session_ended(session);
                    }
                    complete = false;
                    continue;
                }
            };
            let allowed =
                |name: &str| decide(&caller.snapshot.view.policies, &caller.user, &target.id, spec.kind, name).allowed;
            merge_items(spec, target, raw, aggregate, allowed, &mut items, &mut offered);
        }
        let fields = result_fields(fields, aggregate);
        (Merged { items, offered, sources, fields }, complete)
    }

    /// The response carrying one page of a merged list, serialised straight from the shared
    /// items (building a JSON tree of the page would copy every item).
    pub(super) fn page(&self, spec: &ListSpec, list: &CachedList, offset: usize, id: &Value) -> String {
        let items = &list.merged.items;
        let end = (offset + self.settings.page_size).min(items.len());
        let page = serde_json::to_string(&items[offset..end]).expect("JSON values serialise");
        let cursor = if end < items.len() {
            format!(r#","nextCursor":"{}""#, encode_cursor(list.generation, end))
        } else {
            String::new()
        };
        let mut fields = String::new();
        for (key, value) in &list.merged.fields {
            fields.push(',');
            fields.push_str(&Value::String(key.clone()).to_string());
            fields.push(':');
            fields.push_str(&value.to_string());
        }
        format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{{"{}":{page}{cursor}{fields}}}}}"#, spec.field)
    }

    /// Every page of one upstream list (empty when the upstream lacks the capability), and the
    /// other fields of its first page's result.
    pub(super) async fn fetch_all(
        self: &Arc<Self>,
        session: &Arc<ClientSession>,
        caller: &Caller,
        target: &Target,
        spec: &ListSpec,
        traceparent: Option<&str>,
    ) -> Result<(Vec<Value>, Map<String, Value>), UpstreamError> {
        let upstream = self.upstream(session, caller, target).await;
        let initialized = upstream.initialize_result().await?;
        if initialized.pointer(&format!("/capabilities/{}", spec.capability)).is_none() {
            return Ok((Vec::new(), Map::new()));
        }
        let mut fields = Map::new();
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_UPSTREAM_PAGES {
            let params = cursor.as_ref().map(|c| json!({"cursor": c}));
            let mut request = jsonrpc::request(json!(session.next_id("list")), spec.method, params);
            if let Some(traceparent) = traceparent {
                jsonrpc::set_meta(&mut request, "traceparent", traceparent);
            }
            let reply = upstream.request(&request, None).await?;
            let Some(result) = reply.get("result") else {
                return Err(UpstreamError::Refused(format!("{} failed: {}", spec.method, reply["error"]["message"])));
            };
            if let Some(page) = result.get(spec.field).and_then(Value::as_array) {
                items.extend(page.iter().cloned());
            }
            if cursor.is_none() {
                if let Some(result) = result.as_object() {
                    let others = result.iter().filter(|(key, _)| !matches!(key.as_str(), "nextCursor" | "resultType"));
                    fields.extend(others.filter(|(key, _)| *key != spec.field).map(|(k, v)| (k.clone(), v.clone())));
                }
            }
            match result.get("nextCursor").and_then(Value::as_str) {
                Some(next) if !next.is_empty() && Some(next) != cursor.as_deref() => cursor = Some(next.to_string()),
                _ => break,
            }
        }
        Ok((items, fields))
    }
}

/// The fields of a merged list's result besides its items, from what each upstream's result
/// carried besides them. One target's are kept as they are. Merged over several, only caching
/// can be said of the whole: fresh for the shortest `ttlMs` any gave (none given counts as 0),
/// and `public` only if every one said so.
pub(super) fn result_fields(sent: Vec<Map<String, Value>>, aggregate: bool) -> Map<String, Value> {
    if !aggregate {
        return sent.into_iter().next().unwrap_or_default();
    }
    let mut fields = Map::new();
    if sent.iter().any(|f| f.contains_key("ttlMs") || f.contains_key("cacheScope")) {
        let ttl = sent.iter().map(|f| f.get("ttlMs").and_then(Value::as_u64).unwrap_or(0)).min().unwrap_or(0);
        let public = sent.iter().all(|f| f.get("cacheScope").and_then(Value::as_str) == Some("public"));
        fields.insert("ttlMs".into(), json!(ttl));
        fields.insert("cacheScope".into(), json!(if public { "public" } else { "private" }));
    }
    fields
}

/// Adds what `target` listed to a merge: each item decided as a call on it would be (resources
/// by their normal form; one that cannot be normalised cannot be called, so it is not listed
/// either), recorded in `offered` with the decision, and kept (named for the endpoint) when
/// `allowed`.
pub(super) fn merge_items(
    spec: &ListSpec,
    target: &Target,
    raw: Vec<Value>,
    aggregate: bool,
    allowed: impl Fn(&str) -> bool,
    items: &mut Vec<Value>,
    offered: &mut Vec<(String, String, bool)>,
) {
    for mut item in raw {
        let Some(key) = item.get(spec.key).and_then(Value::as_str).map(str::to_string) else { continue };
        let Ok(decided) = super::route::decided_name(spec.kind, &key) else { continue };
        let decided = decided.into_owned();
        let allowed = allowed(&decided);
        offered.push((target.id.clone(), decided, allowed));
        if !allowed {
            continue;
        }
        if aggregate {
            item[spec.key] = Value::String(match spec.kind {
                Kind::Resource => names::map_uri(&target.name, &key),
                _ => names::prefixed(&target.name, &key),
            });
        }
        items.push(item);
    }
}

pub(super) fn invalidate(session: &ClientSession, methods: &[&str]) {
    session.lists.lock().unwrap().retain(|method, _| !methods.contains(method));
}

fn encode_cursor(generation: u64, offset: usize) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{generation}:{offset}"))
}

fn decode_cursor(cursor: &str) -> Option<(u64, usize)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (generation, offset) = text.split_once(':')?;
    Some((generation.parse().ok()?, offset.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str) -> Target {
        Target {
            id: format!("id-{name}"),
            name: name.into(),
            transport_type: reflow_common::model::TransportType::StreamableHttp,
            url: Some("http://127.0.0.1:9/mcp".into()),
            command: None,
            args: vec![],
            image: None,
            port: None,
            health_path: None,
            statefulness: reflow_common::model::Statefulness::Stateless,
            isolation_boundary: reflow_common::credentials::Isolation::Shared,
            auth_type: reflow_common::model::AuthType::Bearer,
            auth_header_name: None,
            enabled: true,
            restart_generation: 0,
            audit_arguments: false,
        }
    }

    fn spec(method: &str) -> &'static ListSpec {
        LISTS.iter().find(|s| s.method == method).unwrap()
    }

    #[test]
    fn merged_items_are_filtered_by_decision_and_named_for_the_endpoint() {
        let github = target("github");
        let raw = vec![
            json!({"name": "create_issue", "description": "kept"}),
            json!({"name": "delete_repo"}),
            json!({"description": "no name: never listed"}),
        ];
        let allowed = |name: &str| name != "delete_repo";
        let (mut items, mut offered) = (Vec::new(), Vec::new());
        merge_items(spec("tools/list"), &github, raw.clone(), true, allowed, &mut items, &mut offered);
        assert_eq!(items, vec![json!({"name": "github_create_issue", "description": "kept"})]);
        assert_eq!(
            offered,
            vec![("id-github".into(), "create_issue".into(), true), ("id-github".into(), "delete_repo".into(), false)],
            "what was offered is kept with its decision, for re-checking against a later snapshot"
        );
        // On /mcp/{target}, names stay the upstream's.
        let (mut items, mut offered) = (Vec::new(), Vec::new());
        merge_items(spec("tools/list"), &github, raw, false, allowed, &mut items, &mut offered);
        assert_eq!(items[0]["name"], "create_issue");
    }

    #[test]
    fn merged_resources_are_decided_in_normal_form_and_mapped() {
        let docs = target("docs");
        let raw = vec![
            json!({"uri": "file:///public/../secret", "name": "walks out"}),
            json!({"uri": "file:///public/a.txt", "name": "a"}),
            json!({"uri": "file:///public/\u{0}", "name": "cannot be normalised"}),
        ];
        let decided = std::cell::RefCell::new(Vec::new());
        let allowed = |uri: &str| {
            decided.borrow_mut().push(uri.to_string());
            uri.starts_with("file:///public/")
        };
        let (mut items, mut offered) = (Vec::new(), Vec::new());
        merge_items(spec("resources/list"), &docs, raw, true, allowed, &mut items, &mut offered);
        assert_eq!(decided.into_inner(), vec!["file:///secret".to_string(), "file:///public/a.txt".to_string()]);
        assert_eq!(items, vec![json!({"uri": names::map_uri("docs", "file:///public/a.txt"), "name": "a"})]);
        assert_eq!(offered.len(), 2, "an unnormalisable URI is not offered at all");
    }

    #[test]
    fn what_upstreams_send_beside_the_items_is_kept_or_combined() {
        let one = |pairs: Value| pairs.as_object().unwrap().clone();
        let sent = one(json!({"ttlMs": 5000, "cacheScope": "public", "_meta": {"x": 1}, "newField": true}));
        assert_eq!(result_fields(vec![sent.clone()], false), sent, "one target's fields, all of them");
        let merged = result_fields(vec![sent, one(json!({"ttlMs": 200, "cacheScope": "public"}))], true);
        assert_eq!(Value::Object(merged), json!({"ttlMs": 200, "cacheScope": "public"}));
        let with_silent = result_fields(vec![one(json!({"ttlMs": 200, "cacheScope": "public"})), Map::new()], true);
        assert_eq!(Value::Object(with_silent), json!({"ttlMs": 0, "cacheScope": "private"}), "silence shares nothing");
        assert!(result_fields(vec![Map::new(), Map::new()], true).is_empty());
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        assert_eq!(decode_cursor(&encode_cursor(7, 100)), Some((7, 100)));
        assert_eq!(decode_cursor("not base64!"), None);
        assert_eq!(decode_cursor(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("x:1")), None);
    }
}
