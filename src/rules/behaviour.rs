//! Behaviour forms: `baseline` (is this bucket's volume unusual for this
//! entity) and `rare` (is this value unusual for this entity). Both keep
//! their state in the entity's dictionary and are pure functions of it and
//! the event, so results are deterministic on event time and replayable.

use super::forms::{number, Decision, Skip};
use crate::event::{format_time_ms, scalar_string, Event, FieldPath};
use crate::state::Record;
use serde_json::{json, Map, Value};

/// Most values a `rare` rule may remember per entity.
pub const MAX_RARE_VALUES: u32 = 4096;

/// Empty buckets closed one by one at most; past this many the baseline
/// has decayed to nothing that a double can tell from zero (see `close_empty`).
const MAX_EMPTY_CLOSES: u64 = 100_000;

/// `baseline`, compiled.
#[derive(Debug)]
pub struct Baseline {
    /// Bucket length, ms.
    pub bucket_ms: i64,
    /// The number summed per bucket; `None`: events are counted.
    pub value: Option<FieldPath>,
    /// Half-life of the baseline, ms.
    pub half_life_ms: i64,
    /// Standard deviations above the mean that fire.
    pub k: f64,
    /// Least volume that fires.
    pub min_value: f64,
    /// Closed buckets needed before it fires.
    pub min_history: u64,
    /// Kept this long after the last event, ms.
    pub ttl_ms: i64,
}

/// `rare`, compiled.
#[derive(Debug)]
pub struct Rare {
    /// The value.
    pub field: FieldPath,
    /// Half-life of the weights, ms.
    pub half_life_ms: i64,
    /// Share under which a value is rare.
    pub max_share: f64,
    /// Decayed total weight needed before it fires.
    pub min_history: f64,
    /// Values remembered.
    pub max_values: usize,
    /// Kept this long after the last event, ms.
    pub ttl_ms: i64,
}

/// A baseline's state: `{b, v, mean, var, n, fired}`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bucketed {
    b: i64,
    v: f64,
    mean: f64,
    var: f64,
    n: u64,
    fired: bool,
}

impl Bucketed {
    fn read(d: &Map<String, Value>) -> Option<Self> {
        let f = |k: &str| d.get(k).and_then(Value::as_f64).filter(|x| x.is_finite());
        Some(Self {
            b: d.get("b")?.as_i64()?,
            v: f("v")?,
            mean: f("mean").unwrap_or(0.0),
            var: f("var").unwrap_or(0.0).max(0.0),
            n: d.get("n").and_then(Value::as_u64).unwrap_or(0),
            fired: d.get("fired").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// Writes the state into `d`, in place (no key allocated once present).
    fn write(&self, d: &mut Map<String, Value>) {
        set(d, "b", json!(self.b));
        set(d, "v", json!(self.v));
        set(d, "mean", json!(self.mean));
        set(d, "var", json!(self.var));
        set(d, "n", json!(self.n));
        set(d, "fired", json!(self.fired));
    }

    /// Closes the current bucket with volume `x`; with `min_history`
    /// closed before it, its z against the baseline before it goes to
    /// `measures` (for `riskd replay`; none where the stddev is 0).
    fn close(&mut self, x: f64, alpha: f64, measures: Option<(&mut Vec<f64>, u64)>) {
        if let Some((m, min_history)) = measures {
            let stddev = self.var.sqrt();
            if self.n >= min_history && stddev > 0.0 {
                m.push((x - self.mean) / stddev);
            }
        }
        if self.n == 0 {
            self.mean = x;
            self.var = 0.0;
        } else {
            let d = x - self.mean;
            self.mean += alpha * d;
            self.var = (1.0 - alpha) * (self.var + alpha * d * d);
        }
        self.n += 1;
    }

    /// Closes `m` empty buckets: each as `close(0)`, one by one while it
    /// can change a double, then only counted (both mean and variance shrink
    /// by at least `1 − α` per close, so past that they are 0).
    fn close_empty(&mut self, m: u64, alpha: f64, mut measures: Option<(&mut Vec<f64>, u64)>) {
        for i in 0..m {
            if i >= MAX_EMPTY_CLOSES || (self.n > 0 && self.mean == 0.0 && self.var == 0.0) {
                if self.n > 0 && i >= MAX_EMPTY_CLOSES {
                    self.mean = 0.0;
                    self.var = 0.0;
                }
                self.n += m - i;
                return;
            }
            self.close(0.0, alpha, measures.as_mut().map(|(v, h)| (&mut **v, *h)));
        }
    }
}

/// `baseline`: see [`super::spec::BaselineSpec`]. An event in a bucket
/// before the current one (later than any reordering waited for) changes
/// nothing and does not fire: closed buckets are not reopened.
/// `measures`: see [`super::forms::Seen`].
pub(super) fn baseline(
    r: &mut Record,
    spec: &Baseline,
    event: &Event,
    mut measures: Option<&mut Vec<f64>>,
) -> Result<Option<Decision>, Skip> {
    let add = match &spec.value {
        None => 1.0,
        Some(p) => p
            .lookup(&event.value)
            .and_then(number)
            .ok_or_else(|| Skip::Missing(format!("field {p} is absent or not a finite number")))?,
    };
    let now = event.time_ms;
    let bucket = now.div_euclid(spec.bucket_ms.max(1));
    let alpha = 1.0 - 0.5f64.powf(spec.bucket_ms as f64 / spec.half_life_ms.max(1) as f64);
    let stored = r.dict.as_ref().and_then(Bucketed::read);
    let mut s = match stored {
        None => Bucketed { b: bucket, v: 0.0, mean: 0.0, var: 0.0, n: 0, fired: false },
        Some(s) if bucket < s.b => return Ok(None),
        Some(mut s) => {
            if bucket > s.b {
                s.close(s.v, alpha, measures.as_mut().map(|m| (&mut **m, spec.min_history)));
                s.close_empty((bucket - s.b - 1) as u64, alpha, measures.map(|m| (m, spec.min_history)));
                s.b = bucket;
                s.v = 0.0;
                s.fired = false;
            }
            s
        }
    };
    s.v += add;
    let stddev = s.var.sqrt();
    let fire = !s.fired && s.n >= spec.min_history && s.v >= spec.min_value && s.v > s.mean + spec.k * stddev;
    if fire {
        s.fired = true;
    }
    s.write(r.dict.get_or_insert_with(Map::new));
    r.expires_at_ms = Some(now.saturating_add(spec.ttl_ms));
    Ok(fire.then(|| {
        let mut c = Map::new();
        c.insert("value".into(), json!(s.v));
        c.insert("mean".into(), json!(round(s.mean)));
        c.insert("stddev".into(), json!(round(stddev)));
        c.insert("z".into(), if stddev > 0.0 { json!(round((s.v - s.mean) / stddev)) } else { Value::Null });
        c.insert("history".into(), json!(s.n));
        c.insert("bucket_start".into(), json!(format_time_ms(bucket.saturating_mul(spec.bucket_ms))));
        Decision { context: c, reset: false }
    }))
}

/// Sets `key` in `d`, reusing the key's allocation when it is there.
fn set(d: &mut Map<String, Value>, key: &str, value: Value) {
    match d.get_mut(key) {
        Some(v) => *v = value,
        None => {
            d.insert(key.to_string(), value);
        }
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `rare`: see [`super::spec::RareSpec`]. Weights decay from the entity's
/// latest event; an event older than it decays nothing.
/// `measures`: see [`super::forms::Seen`].
pub(super) fn rare(
    r: &mut Record,
    spec: &Rare,
    event: &Event,
    measures: Option<&mut Vec<f64>>,
) -> Result<Option<Decision>, Skip> {
    let value = spec
        .field
        .lookup(&event.value)
        .and_then(scalar_string)
        .ok_or_else(|| Skip::Missing(format!("field {} is absent or not a scalar", spec.field)))?;
    let now = event.time_ms;
    // In place: the entity's dictionary is updated where it lies, so an
    // event allocates nothing but a value seen for the first time.
    let d = r.dict.get_or_insert_with(Map::new);
    let last = d.get("t").and_then(Value::as_i64).unwrap_or(now);
    let f = if now > last { 0.5f64.powf((now - last) as f64 / spec.half_life_ms.max(1) as f64) } else { 1.0 };
    let mut total = d.get("total").and_then(Value::as_f64).filter(|x| x.is_finite()).unwrap_or(0.0) * f;
    if !matches!(d.get("w"), Some(Value::Object(_))) {
        set(d, "w", Value::Object(Map::new()));
    }
    let Some(Value::Object(weights)) = d.get_mut("w") else { unreachable!("w was just made an object") };
    // Every weight decays by f; one that is not a number is dropped.
    weights.retain(|_, w| w.as_f64().is_some());
    for w in weights.values_mut() {
        *w = json!(w.as_f64().unwrap_or(0.0) * f);
    }
    let weight = weights.get(&value).and_then(Value::as_f64).unwrap_or(0.0);
    let share = if total > 0.0 { weight / total } else { 0.0 };
    let fire = total >= spec.min_history && share < spec.max_share;
    if let Some(m) = measures.filter(|_| total >= spec.min_history) {
        m.push(share);
    }
    let context = fire.then(|| {
        let mut top: Vec<(&String, f64)> = weights.iter().map(|(k, w)| (k, w.as_f64().unwrap_or(0.0))).collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let top: Vec<Value> = top.iter().take(5).map(|(k, w)| json!({"value": k, "share": round(w / total)})).collect();
        let mut c = Map::new();
        c.insert("value".into(), json!(value));
        c.insert("share".into(), json!(round(share)));
        c.insert("history".into(), json!(round(total)));
        c.insert("top".into(), Value::Array(top));
        c
    });
    match weights.get_mut(&value) {
        Some(w) => *w = json!(weight + 1.0),
        None => {
            weights.insert(value, json!(1.0));
        }
    }
    total += 1.0;
    if weights.len() > spec.max_values {
        // The lightest is forgotten (its weight stays in the total); ties: the first by value.
        let lightest = weights
            .iter()
            .map(|(k, w)| (k, w.as_f64().unwrap_or(0.0)))
            .min_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(b.0)))
            .map(|(k, _)| k.clone());
        if let Some(k) = lightest {
            weights.remove(&k);
        }
    }
    set(d, "t", json!(now.max(last)));
    set(d, "total", json!(total));
    r.expires_at_ms = Some(now.max(last).saturating_add(spec.ttl_ms));
    Ok(context.map(|context| Decision { context, reset: false }))
}

/// A behaviour rule's stored state in words (`riskd entity`): the
/// baseline's current bucket, mean and stddev and the volume that fires; a
/// rare rule's top values and their shares. `None` for other forms or a
/// dictionary that is not theirs.
pub fn describe(form: &super::Form, d: &Map<String, Value>) -> Option<String> {
    let n3 = |x: f64| round(x).to_string();
    let waiting = |have: String, need: String| format!("; fires only once it has {need} (has {have})");
    match form {
        super::Form::Baseline(spec) => {
            let s = Bucketed::read(d)?;
            let sd = s.var.sqrt();
            let mut text = format!(
                "baseline: {} in the bucket from {}{}; mean {} and stddev {} over {} closed buckets; fires at a volume above {} (mean + {}·stddev) and at least {}",
                n3(s.v),
                format_time_ms(s.b.saturating_mul(spec.bucket_ms)),
                if s.fired { " (fired)" } else { "" },
                n3(s.mean),
                n3(sd),
                s.n,
                n3(s.mean + spec.k * sd),
                spec.k,
                spec.min_value,
            );
            if s.n < spec.min_history {
                text += &waiting(format!("{}", s.n), format!("{} closed buckets", spec.min_history));
            }
            Some(text)
        }
        super::Form::Rare(spec) => {
            let total = d.get("total")?.as_f64()?;
            let at = d.get("t").and_then(Value::as_i64).map(format_time_ms).unwrap_or_default();
            let mut top: Vec<(&String, f64)> =
                d.get("w")?.as_object()?.iter().filter_map(|(k, w)| Some((k, w.as_f64()?))).collect();
            top.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            let shown: Vec<String> = top
                .iter()
                .take(5)
                .map(|(k, w)| format!("{k} {}%", n3(100.0 * w / total.max(f64::MIN_POSITIVE))))
                .collect();
            let mut text = format!(
                "rare: top values {} ({} remembered) of a total weight {} at {at}; a value under {}% of it fires",
                shown.join(", "),
                top.len(),
                n3(total),
                n3(100.0 * spec.max_share),
            );
            if total < spec.min_history {
                text += &waiting(n3(total), format!("a total weight of {}", spec.min_history));
            }
            Some(text)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TimeSource;

    const H: i64 = 3_600_000;

    fn at(ms: i64, v: Value) -> Event {
        Event::new(v, ms, TimeSource::Event)
    }

    fn spec(min_history: u64) -> Baseline {
        // α = 1 − 0.5^(1h / 1h) = 0.5: easy to follow by hand.
        Baseline { bucket_ms: H, value: None, half_life_ms: H, k: 2.0, min_value: 0.0, min_history, ttl_ms: 48 * H }
    }

    fn state(r: &Record) -> Bucketed {
        Bucketed::read(r.dict.as_ref().unwrap()).unwrap()
    }

    /// Feeds `counts[i]` events into hour `i`; returns the hours that fired.
    fn feed(spec: &Baseline, counts: &[u32]) -> (Record, Vec<usize>) {
        let mut r = Record::default();
        let mut fired = Vec::new();
        for (hour, n) in counts.iter().enumerate() {
            for j in 0..*n {
                let e = at(hour as i64 * H + i64::from(j), json!({}));
                if baseline(&mut r, spec, &e, None).ok().flatten().is_some() {
                    fired.push(hour);
                }
            }
        }
        (r, fired)
    }

    #[test]
    fn baseline_math_by_hand() {
        // Hours: 4, 2, then the third open. First close: mean 4, var 0.
        // Second: d = 2 − 4 = −2; mean = 4 + 0.5·(−2) = 3; var = 0.5·(0 + 0.5·4) = 1.
        let (r, _) = feed(&spec(100), &[4, 2, 1]);
        let s = state(&r);
        assert_eq!((s.b, s.v, s.n), (2, 1.0, 2));
        assert_eq!((s.mean, s.var), (3.0, 1.0));
    }

    #[test]
    fn empty_buckets_close_with_zero_and_the_first_bucket_is_the_first_close() {
        // 4 events in hour 0, then one in hour 3: hour 0 closes with 4 (first
        // close), hours 1 and 2 with 0: d = −4: mean 2, var 0.5·(0 + 0.5·16) = 4;
        // d = −2: mean 1, var 0.5·(4 + 0.5·4) = 3.
        let (r, _) = feed(&spec(100), &[4, 0, 0, 1]);
        let s = state(&r);
        assert_eq!((s.b, s.n, s.mean, s.var), (3, 3, 1.0, 3.0));
        // A very long gap: counted, and the baseline decays to nothing.
        let mut r = r;
        let e = at(1_000_000 * H, json!({}));
        baseline(&mut r, &spec(100), &e, None).unwrap();
        let s = state(&r);
        assert_eq!((s.n, s.mean, s.var), (3 + 1 + 999_996, 0.0, 0.0));
    }

    #[test]
    fn fires_once_per_bucket_after_min_history_above_mean_plus_k_stddev() {
        // Steady 2 per hour (mean 2, var 0), then 5: fires at the first
        // event over 2 (the third), once.
        let (_, fired) = feed(&spec(3), &[2, 2, 2, 5]);
        assert_eq!(fired, [3]);
        // Not before min_history closed buckets.
        let (_, fired) = feed(&spec(4), &[2, 2, 2, 5]);
        assert!(fired.is_empty());
        // A late event (an earlier bucket) changes nothing.
        let (mut r, _) = feed(&spec(3), &[2, 2, 2]);
        let before = r.clone();
        assert!(baseline(&mut r, &spec(3), &at(0, json!({})), None).unwrap().is_none());
        assert_eq!(r, before);
    }

    #[test]
    fn baseline_sums_a_value_and_skips_an_event_without_it() {
        let mut s = spec(0);
        s.value = Some(FieldPath::parse("bytes").unwrap());
        let mut r = Record::default();
        baseline(&mut r, &s, &at(0, json!({"bytes": 10})), None).unwrap();
        baseline(&mut r, &s, &at(1, json!({"bytes": "2.5"})), None).unwrap();
        assert_eq!(state(&r).v, 12.5);
        assert!(matches!(baseline(&mut r, &s, &at(2, json!({"bytes": "x"})), None), Err(Skip::Missing(_))));
    }

    #[test]
    fn replay_measures_are_the_z_of_closed_buckets_and_the_share_at_events_with_history() {
        // α = 0.5, min_history 1. Hour 0 (4) closes first: no history yet.
        // Hour 1 (2): mean 4, stddev 0: no z. Hour 2 (empty): mean 3,
        // var 1: z = (0 − 3)/1 = −3. Hour 3 (6): mean 1.5, var
        // 0.5·(1 + 0.5·9) = 2.75: z = 4.5/√2.75. Hour 4 stays open.
        let s = spec(1);
        let mut r = Record::default();
        let mut z = Vec::new();
        for (hour, n) in [4, 2, 0, 6, 1].into_iter().enumerate() {
            for j in 0..n {
                baseline(&mut r, &s, &at(hour as i64 * H + j, json!({})), Some(&mut z)).unwrap();
            }
        }
        assert_eq!(z, [-3.0, 4.5 / 2.75f64.sqrt()]);
        // rare, min_history 4: four DE (total 0..3: none), then FR (0/4) and DE (4/5).
        let s = rare_spec(256);
        let mut r = Record::default();
        let mut shares = Vec::new();
        for c in ["DE", "DE", "DE", "DE", "FR", "DE"] {
            rare(&mut r, &s, &at(0, json!({"c": c})), Some(&mut shares)).unwrap();
        }
        assert_eq!(shares, [0.0, 0.8]);
    }

    fn rare_spec(max_values: usize) -> Rare {
        Rare {
            field: FieldPath::parse("c").unwrap(),
            half_life_ms: H,
            max_share: 0.2,
            min_history: 4.0,
            max_values,
            ttl_ms: 48 * H,
        }
    }

    fn see(r: &mut Record, spec: &Rare, ms: i64, c: &str) -> Option<Map<String, Value>> {
        rare(r, spec, &at(ms, json!({"c": c})), None).unwrap().map(|d| d.context)
    }

    #[test]
    fn rare_fires_on_a_value_with_a_small_share_once_there_is_history() {
        let s = rare_spec(256);
        let mut r = Record::default();
        // Four DE at the same time: total 4 (no decay), the first four never fire
        // (total 0..3 < min_history 4).
        for _ in 0..4 {
            assert!(see(&mut r, &s, 0, "DE").is_none());
        }
        // FR: weight 0 / total 4 = 0 < 0.2: fires; then DE: 4/5 = 0.8: not.
        let c = see(&mut r, &s, 0, "FR").unwrap();
        assert_eq!(c["share"], json!(0.0));
        assert_eq!(c["top"], json!([{"value": "DE", "share": 1.0}]));
        assert!(see(&mut r, &s, 0, "DE").is_none());
        // FR again: 1/6 = 0.167 < 0.2: still rare.
        assert_eq!(see(&mut r, &s, 0, "FR").unwrap()["share"], json!(0.167));
    }

    #[test]
    fn rare_weights_decay_from_the_last_event_and_the_lightest_is_forgotten() {
        let s = rare_spec(2);
        let mut r = Record::default();
        for _ in 0..8 {
            see(&mut r, &s, 0, "DE");
        }
        // One half-life later: total 4, DE 4; FR is new (fires), then US
        // pushes past max_values 2: the lightest (FR, 1.0) is forgotten.
        assert!(see(&mut r, &s, H, "FR").is_some());
        see(&mut r, &s, H, "US");
        let d = r.dict.clone().unwrap();
        assert_eq!(d["total"], json!(6.0));
        assert_eq!(d["w"], json!({"DE": 4.0, "US": 1.0}));
        // An event older than the last decays nothing.
        see(&mut r, &s, 0, "DE");
        assert_eq!(r.dict.unwrap()["total"], json!(7.0));
    }
}
