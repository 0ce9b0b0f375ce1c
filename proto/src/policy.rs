//! Policy decisions: default deny, highest priority first, deny wins ties.
//!
//! A policy applies to a request when its target is the request's target (or it names no
//! target), its resource type is the request's kind (or `all`), its anchored glob matches the
//! unprefixed name (or it has none), and one of its subjects is the user (by id, role, group,
//! or `everyone`). Among the policies that apply, those of the highest priority decide; if any
//! of them denies, the answer is deny. When none applies, the answer is deny.
//!
//! The same function answers listing and calling, so what a list shows is exactly what a call
//! allows.

use crate::resources::{Policy, User};
use reflow_common::glob::Glob;
use reflow_common::model::{Effect, ResourceType, SubjectType};

/// What a request asks to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tool,
    Resource,
    Prompt,
}

impl Kind {
    fn admitted_by(self, resource_type: ResourceType) -> bool {
        matches!(
            (resource_type, self),
            (ResourceType::All, _)
                | (ResourceType::Tool, Kind::Tool)
                | (ResourceType::Resource, Kind::Resource)
                | (ResourceType::Prompt, Kind::Prompt)
        )
    }
}

/// A policy with its pattern compiled once per snapshot.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub policy: Policy,
    glob: Option<Glob>,
}

impl CompiledPolicy {
    pub fn new(policy: Policy) -> Result<Self, String> {
        let glob = policy.pattern.as_deref().map(Glob::new).transpose()?;
        Ok(CompiledPolicy { policy, glob })
    }

    fn applies(&self, user: &User, target_id: &str, kind: Kind, name: &str) -> bool {
        let policy = &self.policy;
        policy.target_id.as_deref().is_none_or(|t| t == target_id)
            && kind.admitted_by(policy.resource_type)
            && self.glob.as_ref().is_none_or(|g| g.matches(name))
            && self.names(user)
    }

    fn names(&self, user: &User) -> bool {
        self.policy.subjects.iter().any(|s| match s.subject_type {
            SubjectType::Everyone => true,
            SubjectType::User => s.subject_value == user.id,
            SubjectType::Role => s.subject_value == user.role,
            SubjectType::Group => user.groups.contains(&s.subject_value),
        })
    }
}

/// The answer, with the policy that gave it (`None`: no policy applied, default deny).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub policy_id: Option<String>,
    pub policy_name: Option<String>,
}

/// Whether any policy could allow `user` something on `target_id`. When none can, every
/// decision there is deny, so the gateway need not contact the target at all.
pub fn may_allow_any(policies: &[CompiledPolicy], user: &User, target_id: &str) -> bool {
    policies.iter().any(|p| {
        p.policy.effect == Effect::Allow
            && p.policy.target_id.as_deref().is_none_or(|t| t == target_id)
            && p.names(user)
    })
}

/// Decides for `user` using `name` of `kind` on `target_id`. `policies` must be sorted by
/// priority, highest first (the snapshot view keeps them so).
pub fn decide(policies: &[CompiledPolicy], user: &User, target_id: &str, kind: Kind, name: &str) -> Decision {
    let mut decided: Option<&CompiledPolicy> = None;
    for candidate in policies {
        if let Some(winner) = decided {
            if candidate.policy.priority < winner.policy.priority {
                break;
            }
        }
        if !candidate.applies(user, target_id, kind, name) {
            continue;
        }
        match decided {
            None => decided = Some(candidate),
            Some(winner) if winner.policy.effect == Effect::Allow && candidate.policy.effect == Effect::Deny => {
                decided = Some(candidate)
            }
            Some(_) => {}
        }
    }
    match decided {
        Some(winner) => Decision {
            allowed: winner.policy.effect == Effect::Allow,
            policy_id: Some(winner.policy.id.clone()),
            policy_name: Some(winner.policy.name.clone()),
        },
        None => Decision { allowed: false, policy_id: None, policy_name: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Subject;

    fn user(role: &str, groups: &[&str]) -> User {
        User {
            id: "u1".into(),
            email: "u@example.com".into(),
            role: role.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            active: true,
            session_generation: 0,
        }
    }

    fn policy(
        id: &str,
        target: Option<&str>,
        on: ResourceType,
        pattern: Option<&str>,
        effect: Effect,
        priority: i32,
        subject: (SubjectType, &str),
    ) -> CompiledPolicy {
        CompiledPolicy::new(Policy {
            id: id.into(),
            name: id.into(),
            target_id: target.map(String::from),
            resource_type: on,
            pattern: pattern.map(String::from),
            effect,
            priority,
            subjects: vec![Subject { subject_type: subject.0, subject_value: subject.1.into() }],
        })
        .unwrap()
    }

    fn sorted(mut policies: Vec<CompiledPolicy>) -> Vec<CompiledPolicy> {
        policies.sort_by_key(|p| std::cmp::Reverse(p.policy.priority));
        policies
    }

    #[test]
    fn default_deny() {
        let d = decide(&[], &user("developer", &[]), "t", Kind::Tool, "read_file");
        assert_eq!(d, Decision { allowed: false, policy_id: None, policy_name: None });
    }

    #[test]
    fn deny_wins_ties_and_priority_orders() {
        let dev = user("developer", &["eng"]);
        let allow = policy("allow", None, ResourceType::All, None, Effect::Allow, 10, (SubjectType::Role, "developer"));
        let deny = policy(
            "deny",
            Some("t"),
            ResourceType::Tool,
            Some("delete_*"),
            Effect::Deny,
            10,
            (SubjectType::Group, "eng"),
        );
        let policies = sorted(vec![allow.clone(), deny.clone()]);
        assert!(decide(&policies, &dev, "t", Kind::Tool, "read_file").allowed);
        let d = decide(&policies, &dev, "t", Kind::Tool, "delete_repo");
        assert_eq!((d.allowed, d.policy_name.as_deref()), (false, Some("deny")));
        assert!(decide(&policies, &dev, "other", Kind::Tool, "delete_repo").allowed, "deny is scoped to target t");
        assert!(decide(&policies, &dev, "t", Kind::Prompt, "delete_repo").allowed, "deny is for tools only");
        let higher = policy("override", None, ResourceType::All, None, Effect::Allow, 20, (SubjectType::Everyone, ""));
        let policies = sorted(vec![allow, deny, higher]);
        assert_eq!(decide(&policies, &dev, "t", Kind::Tool, "delete_repo").policy_name.as_deref(), Some("override"));
    }

    #[test]
    fn subjects_must_match_exactly() {
        let p = sorted(vec![policy(
            "p",
            None,
            ResourceType::All,
            Some("read_*"),
            Effect::Allow,
            1,
            (SubjectType::Role, "developer"),
        )]);
        assert!(!decide(&p, &user("Developer", &[]), "t", Kind::Tool, "read_file").allowed);
        assert!(!decide(&p, &user("developer", &[]), "t", Kind::Tool, "Read_file").allowed);
        assert!(!decide(&p, &user("developer", &[]), "t", Kind::Tool, "reаd_file").allowed, "Cyrillic a");
        assert!(!decide(&p, &user("developer", &[]), "t", Kind::Tool, "read\u{200b}_file").allowed, "zero-width space");
        assert!(!decide(&p, &user("developer", &[]), "t", Kind::Tool, "xread_file").allowed, "anchored");
    }
}
