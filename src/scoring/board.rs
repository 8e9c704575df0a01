//! Who is riskiest: a leaderboard of entities by score, kept in the process.
//!
//! Within one entity type every score decays with the same half-life `h`,
//! so `score(now) = Σ pᵢ·2^(−(now − tᵢ)/h) = 2^(rank − now/h)` with
//! `rank = log₂ Σ pᵢ·2^(tᵢ/h)`: an entity's rank does not change as time
//! passes, only when its contributions do. The board keeps every entity's
//! rank in an ordered set per type, so the top N at any time is the first N
//! of each type (merged across types by their score then). It is built once
//! from the store's risk records (a scan at start: never per request) and
//! kept current by [`Ranking`], which sees every risk record the job writes
//! — so, like the API, it shows state as of the last flush.

use super::{ContributionRow, RiskState, ScoringConfig, TypePolicy};
use crate::alert::{EntityRef, Severity};
use crate::event::format_time_ms;
use crate::state::{Checkpoint, Mutation, Record, Result, Store, WriteBatch, RISK_PREFIX};
use serde::Serialize;
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// A rank, ordered highest first (by `total_cmp`, so a NaN cannot break the set).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Rank(f64);

impl Eq for Rank {}

impl Ord for Rank {
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.total_cmp(&self.0)
    }
}

impl PartialOrd for Rank {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Entities by rank, per type.
#[derive(Debug, Default)]
pub struct Board {
    ranks: HashMap<(String, String), f64>,
    order: HashMap<String, BTreeSet<(Rank, String)>>,
    /// While a scan fills the board: the entities noted meanwhile, whose
    /// rank is newer than what the scan read.
    filling: Option<HashSet<(String, String)>>,
}

/// An entity's rank under `policy`: `log₂ Σ pᵢ·2^(tᵢ/h)`, computed from the
/// newest contribution's time so that nothing overflows; `None` without a
/// positive contribution.
pub fn rank(state: &RiskState, policy: &TypePolicy) -> Option<f64> {
    let newest = state.contributions.iter().map(|c| c.event_time).max()?;
    let h = policy.half_life_ms.max(1) as f64;
    let sum: f64 = state
        .contributions
        .iter()
        .map(|c| c.points * ((c.event_time - newest) as f64 / h).exp2())
        .filter(|x| x.is_finite() && *x > 0.0)
        .sum();
    (sum > 0.0).then(|| sum.log2() + newest as f64 / h)
}

/// The rank of a risk record of an entity of `type_` (`None`: deleted, or
/// no positive contribution), by its contributions up to `at` when given.
fn record_rank(cfg: &ScoringConfig, type_: &str, record: Option<&Record>, at: Option<i64>) -> Option<f64> {
    let mut state = RiskState::from_dict(record?.dict.as_ref());
    if let Some(at) = at {
        state.contributions.retain(|c| c.event_time <= at);
    }
    rank(&state, cfg.policy(type_))
}

/// The score a rank gives at event time `now` (for every contribution at or before `now`).
pub fn score_at(rank: f64, policy: &TypePolicy, now: i64) -> f64 {
    (rank - now as f64 / policy.half_life_ms.max(1) as f64).exp2()
}

/// The entity of a risk key, `riskd/risk/<type>/<id>`.
fn entity_of(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix(RISK_PREFIX)?.strip_prefix('/')?.split_once('/')
}

impl Board {
    /// Every entity with risk in `store`, ranked under `cfg` (one scan of
    /// the risk keys); with `at`, by their contributions up to that event
    /// time only (the ranking of a past moment).
    pub fn build(store: &dyn Store, cfg: &ScoringConfig, at: Option<i64>) -> Result<Self> {
        let mut board = Board::default();
        store.scan(&format!("{RISK_PREFIX}/"), &mut |key, record| {
            if let Some((type_, id)) = entity_of(key) {
                board.set((type_.to_string(), id.to_string()), record_rank(cfg, type_, Some(record), at));
            }
        })?;
        Ok(board)
    }

    /// Entities ranked.
    pub fn len(&self) -> usize {
        self.ranks.len()
    }

    /// Whether no entity is ranked.
    pub fn is_empty(&self) -> bool {
        self.ranks.is_empty()
    }

    /// Takes a risk key's new record (`None`: deleted); other keys are ignored.
    pub fn note(&mut self, cfg: &ScoringConfig, key: &str, record: Option<&Record>) {
        let Some((type_, id)) = entity_of(key) else { return };
        let entity = (type_.to_string(), id.to_string());
        let rank = record_rank(cfg, type_, record, None);
        if let Some(touched) = self.filling.as_mut() {
            touched.insert(entity.clone());
        }
        self.set(entity, rank);
    }

    fn set(&mut self, entity: (String, String), rank: Option<f64>) {
        if let Some(old) = self.ranks.remove(&entity) {
            if let Some(set) = self.order.get_mut(&entity.0) {
                set.remove(&(Rank(old), entity.1.clone()));
            }
        }
        if let Some(r) = rank {
            self.order.entry(entity.0.clone()).or_default().insert((Rank(r), entity.1.clone()));
            self.ranks.insert(entity, r);
        }
    }

    /// Whether a scan is still filling the board.
    pub fn filling(&self) -> bool {
        self.filling.is_some()
    }

    /// The `n` highest scores at `now` (of `type_` only, when given), at
    /// least `min_score`, highest first.
    pub fn top(
        &self,
        cfg: &ScoringConfig,
        type_: Option<&str>,
        n: usize,
        min_score: f64,
        now: i64,
    ) -> Vec<(EntityRef, f64)> {
        let mut out: Vec<(EntityRef, f64)> = Vec::new();
        for (t, set) in self.order.iter().filter(|(t, _)| type_.is_none_or(|want| want == t.as_str())) {
            let policy = cfg.policy(t);
            for (r, id) in set.iter().take(n) {
                let score = score_at(r.0, policy, now);
                if score < min_score {
                    break;
                }
                out.push((EntityRef { type_: t.clone(), id: id.clone() }, score));
            }
        }
        out.sort_by(|a, b| {
            b.1.total_cmp(&a.1).then_with(|| a.0.type_.cmp(&b.0.type_)).then_with(|| a.0.id.cmp(&b.0.id))
        });
        out.truncate(n);
        out
    }
}

/// The board of a running job, shared by the job's store (which keeps it
/// current: [`Leaderboard::ranking`]) and the API (which lists it).
#[derive(Clone)]
pub struct Leaderboard {
    board: Arc<Mutex<Board>>,
    scoring: Arc<Mutex<Arc<ScoringConfig>>>,
}

impl Leaderboard {
    /// An empty board ranking under `scoring`.
    pub fn new(scoring: Arc<ScoringConfig>) -> Self {
        Self { board: Arc::default(), scoring: Arc::new(Mutex::new(scoring)) }
    }

    fn scoring(&self) -> Arc<ScoringConfig> {
        self.scoring.lock().map(|c| Arc::clone(&c)).unwrap_or_default()
    }

    /// `inner`, keeping this board current with every risk record written through it.
    pub fn ranking(&self, inner: Box<dyn Store>) -> Ranking {
        Ranking { inner, board: self.clone() }
    }

    /// Fills the board from `store` (a reader handle) on a thread of its
    /// own: a scan of the risk keys, once, so that a large remote table
    /// does not hold the job back. What the job writes meanwhile wins over
    /// what the scan read.
    pub fn fill(&self, store: Box<dyn Store>) {
        if let Ok(mut b) = self.board.lock() {
            b.filling = Some(HashSet::new());
        }
        let this = self.clone();
        std::thread::spawn(move || {
            let cfg = this.scoring();
            let started = std::time::Instant::now();
            let built = Board::build(store.as_ref(), &cfg, None);
            let Ok(mut board) = this.board.lock() else { return };
            let touched = board.filling.take().unwrap_or_default();
            match built {
                Ok(built) => {
                    let n = built.len();
                    for (entity, r) in built.ranks {
                        if !touched.contains(&entity) {
                            board.set(entity, Some(r));
                        }
                    }
                    tracing::info!(entities = n, seconds = started.elapsed().as_secs_f64(), "leaderboard filled");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leaderboard: reading the risk keys failed; it lists what changes from now on")
                }
            }
        });
    }

    /// Ranks under reloaded scoring; a changed half-life ranks every
    /// entity anew from `store` (see [`Leaderboard::fill`]).
    pub fn set_scoring(&self, scoring: Arc<ScoringConfig>, store: Option<Box<dyn Store>>) {
        let old = self.scoring();
        let half_lives = |c: &ScoringConfig| {
            let mut v: Vec<(String, i64)> = c.types.iter().map(|(t, p)| (t.clone(), p.half_life_ms)).collect();
            v.sort();
            (c.default.half_life_ms, v)
        };
        let changed = half_lives(&old) != half_lives(&scoring);
        if let Ok(mut c) = self.scoring.lock() {
            *c = scoring;
        }
        if let (true, Some(store)) = (changed, store) {
            if let Ok(mut b) = self.board.lock() {
                *b = Board::default();
            }
            self.fill(store);
        }
    }

    /// The listing at the latest event time seen (see [`list`]).
    pub fn list(&self, store: &dyn Store, filter: (Option<&str>, usize, f64)) -> Result<Listing> {
        let cfg = self.scoring();
        let board = self
            .board
            .lock()
            .map_err(|_| crate::state::StateError::Backend { store: "leaderboard", message: "poisoned".into() })?;
        let mut listing = list(&board, &cfg, store, filter, None)?;
        listing.complete = !board.filling();
        Ok(listing)
    }

    fn note(&self, key: &str, record: Option<&Record>) {
        if entity_of(key).is_none() {
            return;
        }
        let cfg = self.scoring();
        if let Ok(mut board) = self.board.lock() {
            board.note(&cfg, key, record);
        }
    }
}

/// A [`Store`] decorator that keeps a [`Leaderboard`] current with every
/// risk record written through it.
pub struct Ranking {
    inner: Box<dyn Store>,
    board: Leaderboard,
}

impl Ranking {
    fn note(&self, key: &str, record: Option<&Record>) {
        self.board.note(key, record);
    }
}

impl Store for Ranking {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Record>>> {
        self.inner.get_many(keys)
    }

    fn apply(&mut self, batch: WriteBatch<'_>) -> Result<()> {
        let risk: Vec<(&str, Mutation<'_>)> =
            batch.mutations.iter().filter(|(k, _)| entity_of(k).is_some()).copied().collect();
        self.inner.apply(batch)?;
        for (key, mutation) in risk {
            match mutation {
                Mutation::Put(record) => self.note(key, Some(record)),
                Mutation::Delete => self.note(key, None),
            }
        }
        Ok(())
    }

    fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>> {
        self.inner.checkpoint(source)
    }

    fn scan(&self, prefix: &str, visit: &mut dyn FnMut(&str, &Record)) -> Result<()> {
        self.inner.scan(prefix, visit)
    }

    fn batched_reads(&self) -> bool {
        self.inner.batched_reads()
    }

    fn update(&mut self, key: &str, now_ms: i64, f: &mut dyn FnMut(&mut Record) -> bool) -> Result<()> {
        let mut last: Option<Record> = None;
        self.inner.update(key, now_ms, &mut |r| {
            let changed = f(r);
            last = changed.then(|| r.clone());
            changed
        })?;
        if let Some(record) = last {
            self.note(key, Some(&record));
        }
        Ok(())
    }

    fn purge_expired(&mut self, before_ms: i64) -> Result<usize> {
        self.inner.purge_expired(before_ms)
    }

    fn forget(&mut self) {
        self.inner.forget();
    }

    fn reader(&self) -> Option<Box<dyn Store>> {
        self.inner.reader()
    }
}

/// A leaderboard: `riskd entities`, `GET /v1/entities`.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Listing {
    /// The event time the scores are at: the latest seen unless asked for another.
    pub now: String,
    /// Entities with risk, of every type.
    pub ranked: usize,
    /// `false` while the board is still being filled from the store (at
    /// start, or after a reload changed a half-life): entities not yet read
    /// may be missing.
    pub complete: bool,
    /// The entities, highest score first.
    pub entities: Vec<Listed>,
}

/// One entity of a [`Listing`].
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Listed {
    /// Entity type.
    #[serde(rename = "type")]
    pub type_: String,
    /// Entity id.
    pub id: String,
    /// Its score at the listing's time, to 3 decimals.
    pub score: f64,
    /// The severity band the score is in (`None` below the lowest).
    pub band: Option<Severity>,
    /// Its type's threshold.
    pub threshold: f64,
    /// Whether crossing the threshold raises an alert.
    pub armed: bool,
    /// The time of its newest contribution (the last alert that added risk).
    pub last_alert: Option<String>,
    /// Its largest contributions at the listing's time (at most three).
    pub top: Vec<ContributionRow>,
}

/// The `top` entities by score at `at` (default: the latest event time the
/// store has seen), of `type_` when given, scoring at least `min_score`,
/// each with its largest contributions read from `store`. The board must
/// rank by the contributions up to `at` (see [`Board::build`]).
pub fn list(
    board: &Board,
    cfg: &ScoringConfig,
    store: &dyn Store,
    filter: (Option<&str>, usize, f64),
    at: Option<i64>,
) -> Result<Listing> {
    let (type_, top, min_score) = filter;
    let now = match at {
        Some(t) => t,
        None => crate::state::watermark(store)?,
    };
    let picked = board.top(cfg, type_, top, min_score, now);
    let keys: Vec<String> = picked.iter().map(|(e, _)| super::risk_key(e)).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let records = store.get_many(&refs)?;
    let mut entities = Vec::new();
    for ((entity, _), record) in picked.into_iter().zip(records) {
        let state = RiskState::from_dict(record.as_ref().and_then(|r| r.dict.as_ref()));
        let policy = cfg.policy(&entity.type_);
        let score = state.score(policy, now);
        if score < min_score || state.contributions.is_empty() {
            continue; // the board ran ahead of this reader (a flush in between)
        }
        let mut rows = super::explain_contributions(policy, &state, now);
        rows.truncate(3);
        entities.push(Listed {
            band: policy.band(score),
            threshold: policy.threshold,
            armed: super::explain::armed_at(policy, &state, now, score).0,
            last_alert: state.contributions.iter().map(|c| c.event_time).max().map(format_time_ms),
            top: rows,
            score: super::explain::round3(score),
            type_: entity.type_,
            id: entity.id,
        });
    }
    entities.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| (&a.type_, &a.id).cmp(&(&b.type_, &b.id))));
    Ok(Listing { now: format_time_ms(now), ranked: board.len(), complete: true, entities })
}

/// The text of `riskd entities`.
impl std::fmt::Display for Listing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} entities listed of {} with risk, scored at {}", self.entities.len(), self.ranked, self.now)?;
        if !self.complete {
            writeln!(f, "(the index is still being read from the store: some entities may be missing)")?;
        }
        for (i, e) in self.entities.iter().enumerate() {
            let band = e.band.map_or("-", Severity::as_str);
            let armed = if e.armed { "armed" } else { "disarmed" };
            writeln!(
                f,
                "{:>3}. {:<9} {:<48} {:>9} {:<8} {:<8} last alert {}",
                i + 1,
                e.type_,
                e.id,
                e.score,
                band,
                armed,
                e.last_alert.as_deref().unwrap_or("-")
            )?;
            for c in &e.top {
                writeln!(
                    f,
                    "       {:<32} {:>9} of {} pts at {}",
                    c.rule_id, c.decayed_points, c.points, c.event_time
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::Contribution;

    const H: i64 = 3_600_000;

    fn state(contributions: &[(f64, i64)]) -> RiskState {
        RiskState {
            contributions: contributions
                .iter()
                .map(|&(points, t)| Contribution {
                    rule_id: "r".into(),
                    points,
                    event_time: t,
                    alert_id: String::new(),
                })
                .collect(),
            ..RiskState::default()
        }
    }

    fn record(s: &RiskState) -> Record {
        let dict = match serde_json::to_value(s).unwrap() {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        };
        Record { dict: Some(dict), ..Record::default() }
    }

    #[test]
    fn a_rank_gives_the_score_at_any_later_time() {
        let cfg = ScoringConfig::default();
        let policy = cfg.policy("user");
        let s = state(&[(40.0, 10 * H), (10.0, 30 * H), (25.0, 1_700_000_000_000)]);
        let r = rank(&s, policy).unwrap();
        for now in [1_700_000_000_000, 1_700_000_000_000 + 5 * H, 1_700_000_000_000 + 400 * H] {
            let exact = s.score(policy, now);
            assert!((score_at(r, policy, now) - exact).abs() <= 1e-9 * exact.max(1.0), "{now}: {exact}");
        }
        assert_eq!(rank(&state(&[]), policy), None);
    }

    #[test]
    fn the_top_follows_writes_and_deletes_and_merges_types_by_score() {
        let cfg = ScoringConfig::default();
        let mut board = Board::default();
        let now = 100 * H;
        board.note(&cfg, "riskd/risk/user/old", Some(&record(&state(&[(90.0, 50 * H)]))));
        board.note(&cfg, "riskd/risk/user/new", Some(&record(&state(&[(30.0, now)]))));
        board.note(&cfg, "riskd/risk/ip/1.2.3.4", Some(&record(&state(&[(50.0, now)]))));
        board.note(&cfg, "okta_ip_change/user/x", Some(&record(&state(&[(500.0, now)]))));
        let top = |b: &Board, t: Option<&str>, min: f64| -> Vec<String> {
            b.top(&cfg, t, 10, min, now).into_iter().map(|(e, _)| format!("{}/{}", e.type_, e.id)).collect()
        };
        // old: 90 fifty hours ago, about 21 at `now`.
        assert_eq!(top(&board, None, 0.0), ["ip/1.2.3.4", "user/new", "user/old"]);
        assert_eq!(top(&board, Some("user"), 0.0), ["user/new", "user/old"]);
        assert_eq!(top(&board, None, 25.0), ["ip/1.2.3.4", "user/new"]);
        // A new contribution moves it; a deletion removes it.
        board.note(&cfg, "riskd/risk/user/old", Some(&record(&state(&[(90.0, 50 * H), (100.0, now)]))));
        assert_eq!(top(&board, None, 0.0)[0], "user/old");
        board.note(&cfg, "riskd/risk/user/old", None);
        assert_eq!(top(&board, None, 0.0), ["ip/1.2.3.4", "user/new"]);
        assert_eq!(board.len(), 2);
    }
}
