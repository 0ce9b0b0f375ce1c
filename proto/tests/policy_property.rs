//! The policy engine against a deliberately simple reference evaluator: 1,000 generated
//! policy sets × 100 generated requests each (100,000 decisions), 0 mismatches allowed.
//! Names and values are drawn from an alphabet with look-alikes (case, Cyrillic `а`,
//! zero-width space) and the characters that matter to prefixing (`_`).

use proptest::prelude::*;
use reflow_common::model::{Effect, ResourceType, SubjectType};
use reflow_proto::policy::{decide, CompiledPolicy, Kind};
use reflow_proto::resources::{Policy, Subject, User};

const ALPHABET: &[char] = &['a', 'b', 'A', '_', '.', '-', '\u{430}', '\u{200b}'];

/// Reference glob: plain recursion over the pattern.
fn glob_ref(pattern: &[char], name: &[char]) -> bool {
    match pattern.first() {
        None => name.is_empty(),
        Some('*') => (0..=name.len()).any(|skip| glob_ref(&pattern[1..], &name[skip..])),
        Some('?') => !name.is_empty() && glob_ref(&pattern[1..], &name[1..]),
        Some('\\') => match pattern.get(1) {
            Some(c) => name.first() == Some(c) && glob_ref(&pattern[2..], &name[1..]),
            None => false,
        },
        Some(c) => name.first() == Some(c) && glob_ref(&pattern[1..], &name[1..]),
    }
}

fn applies_ref(p: &Policy, user: &User, target: &str, kind: Kind, name: &str) -> bool {
    let target_ok = match &p.target_id {
        None => true,
        Some(t) => t == target,
    };
    let kind_ok = match p.resource_type {
        ResourceType::All => true,
        ResourceType::Tool => kind == Kind::Tool,
        ResourceType::Resource => kind == Kind::Resource,
        ResourceType::Prompt => kind == Kind::Prompt,
    };
    let name_ok = match &p.pattern {
        None => true,
        Some(pattern) => glob_ref(&pattern.chars().collect::<Vec<_>>(), &name.chars().collect::<Vec<_>>()),
    };
    let subject_ok = p.subjects.iter().any(|s| match s.subject_type {
        SubjectType::Everyone => true,
        SubjectType::User => s.subject_value == user.id,
        SubjectType::Role => s.subject_value == user.role,
        SubjectType::Group => user.groups.contains(&s.subject_value),
    });
    target_ok && kind_ok && name_ok && subject_ok
}

fn decide_ref(policies: &[Policy], user: &User, target: &str, kind: Kind, name: &str) -> bool {
    let applicable: Vec<&Policy> = policies.iter().filter(|p| applies_ref(p, user, target, kind, name)).collect();
    let Some(top) = applicable.iter().map(|p| p.priority).max() else { return false };
    !applicable.iter().any(|p| p.priority == top && p.effect == Effect::Deny)
}

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(ALPHABET), 0..max).prop_map(|c| c.into_iter().collect())
}

fn pattern() -> impl Strategy<Value = String> {
    let mut chars = ALPHABET.to_vec();
    chars.extend(['*', '?', '*']);
    proptest::collection::vec(proptest::sample::select(chars), 1..6).prop_map(|c| c.into_iter().collect::<String>())
}

fn subject() -> impl Strategy<Value = Subject> {
    prop_oneof![
        Just(Subject { subject_type: SubjectType::Everyone, subject_value: String::new() }),
        proptest::sample::select(vec!["u1", "u2"])
            .prop_map(|v| Subject { subject_type: SubjectType::User, subject_value: v.into() }),
        proptest::sample::select(vec!["developer", "Developer", "ops"])
            .prop_map(|v| Subject { subject_type: SubjectType::Role, subject_value: v.into() }),
        proptest::sample::select(vec!["eng", "a_b", "a"])
            .prop_map(|v| Subject { subject_type: SubjectType::Group, subject_value: v.into() }),
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        proptest::option::of(proptest::sample::select(vec!["t1", "t2"])),
        proptest::sample::select(vec![
            ResourceType::All,
            ResourceType::Tool,
            ResourceType::Resource,
            ResourceType::Prompt,
        ]),
        proptest::option::weighted(0.8, pattern()),
        proptest::bool::ANY,
        0i32..4,
        proptest::collection::vec(subject(), 1..3),
    )
        .prop_map(|(target, on, pattern, allow, priority, subjects)| Policy {
            id: String::new(),
            name: String::new(),
            target_id: target.map(String::from),
            resource_type: on,
            pattern,
            effect: if allow { Effect::Allow } else { Effect::Deny },
            priority,
            subjects,
        })
}

fn user() -> impl Strategy<Value = User> {
    (
        proptest::sample::select(vec!["u1", "u2", "u3"]),
        proptest::sample::select(vec!["developer", "Developer", "ops", "user"]),
        proptest::sample::subsequence(vec!["eng", "a_b", "a", "b"], 0..3),
    )
        .prop_map(|(id, role, groups)| User {
            id: id.into(),
            email: String::new(),
            role: role.into(),
            groups: groups.into_iter().map(String::from).collect(),
            active: true,
            session_generation: 0,
        })
}

fn request() -> impl Strategy<Value = (User, &'static str, Kind, String)> {
    (
        user(),
        proptest::sample::select(vec!["t1", "t2", "t3"]),
        proptest::sample::select(vec![Kind::Tool, Kind::Resource, Kind::Prompt]),
        text(6),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn engine_agrees_with_the_reference(
        policies in proptest::collection::vec(policy(), 0..8),
        requests in proptest::collection::vec(request(), 100),
    ) {
        let mut policies: Vec<Policy> = policies
            .into_iter()
            .enumerate()
            .map(|(i, mut p)| { p.id = format!("p{i}"); p.name = format!("p{i}"); p })
            .collect();
        policies.sort_by_key(|p| std::cmp::Reverse(p.priority));
        let compiled: Vec<CompiledPolicy> = policies.iter().cloned().map(|p| CompiledPolicy::new(p).unwrap()).collect();
        for (user, target, kind, name) in &requests {
            let decision = decide(&compiled, user, target, *kind, name);
            prop_assert_eq!(decision.allowed, decide_ref(&policies, user, target, *kind, name),
                "user {:?} target {} kind {:?} name {:?}", user, target, kind, name);
            if let Some(id) = &decision.policy_id {
                let winner = policies.iter().find(|p| &p.id == id).unwrap();
                prop_assert!(applies_ref(winner, user, target, *kind, name), "the deciding policy applies");
            }
        }
    }
}
