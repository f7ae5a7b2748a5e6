//! How a study's work items are split into shards, and the record of a split.
//!
//! Two rules, both functions of the study alone (never of what is stored), so every task of an
//! array computes the same split without talking to the others, and a resubmitted task finds the
//! same items it had:
//!
//! - [`ShardBy::Hash`]: an item goes to `sha256(key) mod K` (the original `--shard I/K`). Even in
//!   item counts, blind to cost.
//! - [`ShardBy::Tokens`]: items are grouped by the exact prompt they prefill (same system prompt,
//!   same user prompt: the samples of a prompt and the conditions that differ only in steering),
//!   so a group's prompt tokens are encoded once and its prefill can be reused; groups are dealt
//!   to shards largest first, each to the shard with the fewest expected tokens (LPT scheduling),
//!   so shards finish together even when prompts differ in length. Expected tokens of an item are
//!   its prompt length estimated at 4 characters a token (no tokenizer is loaded to plan) plus
//!   `max_new_tokens`, the most it can generate.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::super::canon::hex_u64;
use super::super::plan::{Study, WorkItem};

/// Which rule assigns items to shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum ShardBy {
    /// `sha256(item key) mod K`.
    #[default]
    Hash,
    /// Prompt groups balanced by expected tokens.
    Tokens,
}

impl ShardBy {
    pub fn name(self) -> &'static str {
        match self {
            ShardBy::Hash => "hash",
            ShardBy::Tokens => "tokens",
        }
    }
}

/// One shard of a layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub index: u64,
    pub items: usize,
    /// Prompt groups (items that prefill the same prompt).
    pub groups: usize,
    /// Estimated prompt plus generated tokens of its items.
    pub expected_tokens: u64,
}

/// A study's split into shards: what receipts and merged databases record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLayout {
    pub version: u32,
    pub study_hash: String,
    pub by: ShardBy,
    pub count: u64,
    pub shards: Vec<ShardInfo>,
    /// sha256 of every `item_hash:shard` pair, sorted: two layouts with the same hash assign every
    /// item alike.
    pub hash: String,
}

impl ShardLayout {
    /// Largest shard's expected tokens over the mean (1.0: perfectly even).
    pub fn imbalance(&self) -> f64 {
        let total: u64 = self.shards.iter().map(|s| s.expected_tokens).sum();
        let max = self
            .shards
            .iter()
            .map(|s| s.expected_tokens)
            .max()
            .unwrap_or(0);
        if total == 0 {
            return 1.0;
        }
        max as f64 * self.shards.len() as f64 / total as f64
    }
}

/// Estimated tokens of one item: prompt characters / 4 plus the generation budget.
fn expected_tokens(study: &Study, it: &WorkItem) -> u64 {
    let c = &study.conditions[it.condition];
    let p = &study.prompt_sets[it.set].items[it.prompt];
    let chars = c.system.as_deref().map_or(0, str::len) + p.text.len();
    (chars as u64).div_ceil(4) + study.file.generation.max_new_tokens as u64
}

/// The key of the prompt an item prefills: system prompt and user prompt.
fn group_key(study: &Study, it: &WorkItem) -> String {
    let c = &study.conditions[it.condition];
    let set = &study.prompt_sets[it.set];
    crate::hash::sha256_bytes(
        format!(
            "{}\u{1f}{}\u{1f}{}",
            c.system.as_deref().unwrap_or(""),
            set.hash,
            set.items[it.prompt].id
        )
        .as_bytes(),
    )
}

/// The shard of every item of `study` under `by` with `count` shards, keyed by item hash.
pub fn assign(study: &Study, by: ShardBy, count: u64) -> HashMap<String, u64> {
    let count = count.max(1);
    let items = study.items();
    match by {
        ShardBy::Hash => items
            .iter()
            .map(|it| (it.item_hash.clone(), hex_u64(&it.item_hash) % count))
            .collect(),
        ShardBy::Tokens => balanced(study, &items, count),
    }
}

/// Longest-processing-time-first over prompt groups; ties broken by group key, then by the lowest
/// shard index, so the result is the same on every machine.
fn balanced(study: &Study, items: &[WorkItem], count: u64) -> HashMap<String, u64> {
    let mut groups: BTreeMap<String, (u64, Vec<&WorkItem>)> = BTreeMap::new();
    for it in items {
        let g = groups.entry(group_key(study, it)).or_default();
        g.0 += expected_tokens(study, it);
        g.1.push(it);
    }
    let mut order: Vec<(&String, &(u64, Vec<&WorkItem>))> = groups.iter().collect();
    order.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then_with(|| a.0.cmp(b.0)));
    let mut load = vec![0u64; count as usize];
    let mut out = HashMap::with_capacity(items.len());
    for (_, (tokens, members)) in order {
        let (shard, _) = load
            .iter()
            .enumerate()
            .min_by_key(|&(i, l)| (*l, i))
            .expect("at least one shard");
        load[shard] += tokens;
        for it in members {
            out.insert(it.item_hash.clone(), shard as u64);
        }
    }
    out
}

/// The layout of `study` split `count` ways by `by`: per-shard counts and expected tokens.
pub fn layout(study: &Study, by: ShardBy, count: u64) -> ShardLayout {
    let count = count.max(1);
    let of = assign(study, by, count);
    let mut shards: Vec<ShardInfo> = (0..count)
        .map(|index| ShardInfo {
            index,
            items: 0,
            groups: 0,
            expected_tokens: 0,
        })
        .collect();
    let mut seen_groups = std::collections::HashSet::new();
    for it in study.items() {
        let s = of[&it.item_hash];
        let info = &mut shards[s as usize];
        info.items += 1;
        info.expected_tokens += expected_tokens(study, &it);
        if seen_groups.insert((s, group_key(study, &it))) {
            info.groups += 1;
        }
    }
    let mut pairs: Vec<String> = of.iter().map(|(h, s)| format!("{h}:{s}")).collect();
    pairs.sort();
    ShardLayout {
        version: 1,
        study_hash: study.hash.clone(),
        by,
        count,
        shards,
        hash: crate::hash::sha256_bytes(pairs.join("\n").as_bytes()),
    }
}
