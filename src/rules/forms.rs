//! The state forms: what `count`, `distinct`, `first_seen`, `changed` and
//! `travel` keep in an entity's record, and when they fire. Each works on
//! the record in place (one cache lookup per rule) and is pure otherwise.

use super::{Form, OnFire, Rule};
use crate::event::{format_time_ms, parse_time_ms, scalar_string, Event, FieldPath};
use crate::state::{check_dict_size, granular_expiry, Record, StateError};
use serde_json::{json, Map, Value};

/// Alerts never list more values of a set than this.
const MAX_LISTED_VALUES: usize = 50;

/// What a state form decided.
pub(super) struct Decision {
    pub(super) context: Map<String, Value>,
    pub(super) reset: bool,
}

/// What a form saw, for `riskd replay`: the value a `count` or `distinct`
/// rule reached; with `measures` set, a `baseline` rule's z of each bucket
/// it closed with enough history and a `rare` rule's share of the value at
/// each event with enough history.
#[derive(Debug, Default)]
pub(super) struct Seen {
    pub(super) reached: Option<i64>,
    pub(super) measures: Option<Vec<f64>>,
}

/// Why a rule skips an event: a field it needs is absent, or the store failed.
#[derive(Debug)]
pub(super) enum Skip {
    Missing(String),
    State(StateError),
}

impl From<StateError> for Skip {
    fn from(e: StateError) -> Self {
        Skip::State(e)
    }
}

fn required<'a>(path: &FieldPath, event: &'a Event) -> Result<&'a Value, Skip> {
    path.lookup(&event.value).ok_or_else(|| Skip::Missing(format!("field {path} is absent")))
}

fn required_scalar(path: &FieldPath, event: &Event) -> Result<String, Skip> {
    scalar_string(required(path, event)?).ok_or_else(|| Skip::Missing(format!("field {path} is not a scalar")))
}

/// A finite number, or a string holding one.
pub(super) fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|x: &f64| x.is_finite())
}

/// Great-circle distance (haversine, Earth radius 6371 km).
pub fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0 * a.sqrt().min(1.0).asin()
}

fn round1(x: f64) -> Value {
    json!((x * 10.0).round() / 10.0)
}

/// Applies the rule's state form to the entity's record and decides whether
/// it fires; `seen` takes what replay figures need. `kept` is set when the form changed nothing
/// because an expiry refresh fell within `granule` (`store.expiry_granule`).
pub(super) fn apply_form(
    r: &mut Record,
    rule: &Rule,
    key: &str,
    event: &Event,
    seen: &mut Seen,
    (granule, kept): (f64, &mut bool),
) -> Result<Option<Decision>, Skip> {
    let now = event.time_ms;
    Ok(match &rule.form {
        Form::Stateless => Some(Decision { context: Map::new(), reset: false }),
        Form::Count { window_ms, threshold, on_fire } => {
            count(r, now, *window_ms, *threshold, *on_fire, &mut seen.reached)
        }
        Form::Distinct { field, window_ms, threshold, on_fire } => {
            let value = required_scalar(field, event)?;
            distinct(r, now, value, *window_ms, *threshold, *on_fire, &mut seen.reached)
        }
        Form::FirstSeen { field, ttl_ms } => {
            first_seen(r, now, required_scalar(field, event)?, *ttl_ms, (granule, kept))
        }
        Form::Changed { fields, ttl_ms } => changed(r, key, event, fields, *ttl_ms)?,
        Form::Travel { lat, lon, city, ttl_ms, min_km, max_kmh } => {
            // A coordinate outside its range is no more a place than text is.
            let point = |p: &FieldPath, limit: f64| {
                number(required(p, event)?)
                    .filter(|x| x.abs() <= limit)
                    .ok_or_else(|| Skip::Missing(format!("field {p} is not a number in [-{limit}, {limit}]")))
            };
            let (lat_v, lon_v) = (point(lat, 90.0)?, point(lon, 180.0)?);
            let city_v = city.as_ref().and_then(|c| c.lookup(&event.value)).cloned().unwrap_or(Value::Null);
            travel(r, key, now, (lat_v, lon_v, city_v), *ttl_ms, (*min_km, *max_kmh))?
        }
        Form::Baseline(b) => super::behaviour::baseline(r, b, event, seen.measures.as_mut())?,
        Form::Rare(spec) => {
            let decision = super::behaviour::rare(r, spec, event, seen.measures.as_mut())?;
            if let Some(d) = r.dict.as_ref() {
                check_dict_size(key, d)?;
            }
            decision
        }
        Form::Correlation(c) => {
            let parts = rule.matcher.parts_matching(event);
            let decision = super::correlation::apply(r, c, event, &parts)?;
            if let Some(d) = r.dict.as_ref() {
                check_dict_size(key, d)?;
            }
            decision
        }
    })
}

/// The window's start and end, for an alert's context.
fn window(c: &mut Map<String, Value>, end: i64, window_ms: i64) {
    c.insert("window_start".into(), json!(format_time_ms(end - window_ms)));
    c.insert("window_end".into(), json!(format_time_ms(end)));
}

/// `count`: the window opens at the first counted event and is not moved by later ones.
fn count(
    r: &mut Record,
    now: i64,
    window_ms: i64,
    threshold: i64,
    on_fire: OnFire,
    reached: &mut Option<i64>,
) -> Option<Decision> {
    if r.count <= 0 {
        r.count = 0;
        r.expires_at_ms = Some(now.saturating_add(window_ms));
    }
    r.count = r.count.saturating_add(1);
    *reached = Some(r.count);
    (r.count >= threshold).then(|| {
        let mut c = Map::new();
        c.insert("count".into(), json!(r.count));
        c.insert("threshold".into(), json!(threshold));
        window(&mut c, r.expires_at_ms.unwrap_or(now), window_ms);
        Decision { context: c, reset: on_fire == OnFire::Reset }
    })
}

/// `distinct`: the window opens at the first value.
fn distinct(
    r: &mut Record,
    now: i64,
    value: String,
    window_ms: i64,
    threshold: usize,
    on_fire: OnFire,
    reached: &mut Option<i64>,
) -> Option<Decision> {
    if r.set.is_empty() {
        r.expires_at_ms = Some(now.saturating_add(window_ms));
    }
    r.set.insert(value);
    *reached = Some(r.set.len() as i64);
    (r.set.len() >= threshold).then(|| {
        let values: Vec<&String> = r.set.iter().take(MAX_LISTED_VALUES).collect();
        let mut c = Map::new();
        c.insert("distinct".into(), json!(r.set.len()));
        c.insert("threshold".into(), json!(threshold));
        c.insert("values".into(), json!(values));
        window(&mut c, r.expires_at_ms.unwrap_or(now), window_ms);
        Decision { context: c, reset: on_fire == OnFire::Reset }
    })
}

/// `first_seen`: fires on a value the set does not hold (once it holds any).
fn first_seen(
    r: &mut Record,
    now: i64,
    value: String,
    ttl_ms: i64,
    (granule, kept): (f64, &mut bool),
) -> Option<Decision> {
    let known = r.set.len();
    let new_at = granular_expiry(now.saturating_add(ttl_ms), now, granule);
    if r.set.contains(&value) && r.expires_at_ms == Some(new_at) {
        // A known value whose refresh falls in the stored expiry's step
        // (`store.expiry_granule`): the record stays as it is (and clean).
        *kept = true;
        return None;
    }
    let fire = known > 0 && !r.set.contains(&value);
    let decision = fire.then(|| {
        let listed: Vec<&String> = r.set.iter().take(MAX_LISTED_VALUES).collect();
        let mut c = Map::new();
        c.insert("new_value".into(), json!(value));
        c.insert("known_count".into(), json!(known));
        c.insert("known_values".into(), json!(listed));
        Decision { context: c, reset: false }
    });
    r.set.insert(value);
    // Every matching event keeps the set for another ttl.
    r.expires_at_ms = Some(new_at);
    decision
}

/// `changed`: fires when a field differs from the entity's previous event.
fn changed(
    r: &mut Record,
    key: &str,
    event: &Event,
    fields: &[(String, FieldPath)],
    ttl_ms: i64,
) -> Result<Option<Decision>, Skip> {
    let now = event.time_ms;
    let mut current = Map::new();
    for (name, path) in fields {
        current.insert(name.clone(), required(path, event)?.clone());
    }
    let mut stored = current.clone();
    stored.insert("time".into(), json!(format_time_ms(now)));
    check_dict_size(key, &stored)?;
    let previous = r.dict.replace(stored).filter(|d| !d.is_empty());
    r.expires_at_ms = Some(now.saturating_add(ttl_ms));
    Ok(previous.and_then(|previous| {
        let changed: Vec<&str> = fields
            .iter()
            .filter(|(name, _)| previous.get(name).is_some_and(|p| Some(p) != current.get(name)))
            .map(|(name, _)| name.as_str())
            .collect();
        (!changed.is_empty()).then(|| {
            let mut c = Map::new();
            c.insert("changed".into(), json!(changed));
            c.insert("previous".into(), Value::Object(previous));
            c.insert("current".into(), Value::Object(current));
            Decision { context: c, reset: false }
        })
    }))
}

/// `travel`: fires when the distance from the previous point is over
/// `min_km` and the speed needed over `max_kmh`.
fn travel(
    r: &mut Record,
    key: &str,
    now: i64,
    (lat_v, lon_v, city_v): (f64, f64, Value),
    ttl_ms: i64,
    (min_km, max_kmh): (f64, f64),
) -> Result<Option<Decision>, Skip> {
    let mut current = Map::new();
    current.insert("city".into(), city_v);
    current.insert("lat".into(), json!(lat_v));
    current.insert("lon".into(), json!(lon_v));
    current.insert("time".into(), json!(format_time_ms(now)));
    check_dict_size(key, &current)?;
    let previous = r.dict.replace(current.clone()).unwrap_or_default();
    r.expires_at_ms = Some(now.saturating_add(ttl_ms));
    // A previous value that is not a readable point (written by
    // something else under a shared key) is treated as absent.
    let point = (|| {
        let plat = number(previous.get("lat")?)?;
        let plon = number(previous.get("lon")?)?;
        let ptime = parse_time_ms(previous.get("time")?)?;
        Some((plat, plon, ptime))
    })();
    Ok(point.and_then(|(plat, plon, ptime)| {
        let km = haversine_km(plat, plon, lat_v, lon_v);
        let hours = (now - ptime) as f64 / 3_600_000.0;
        let kmh = if hours <= 0.0 { f64::INFINITY } else { km / hours };
        (km > min_km && kmh > max_kmh).then(|| {
            let mut c = Map::new();
            c.insert("distance_km".into(), round1(km));
            // JSON has no infinity: a zero or negative time difference reads as null.
            c.insert("speed_kmh".into(), if kmh.is_finite() { round1(kmh) } else { Value::Null });
            c.insert("hours".into(), json!((hours * 1000.0).round() / 1000.0));
            c.insert("previous".into(), Value::Object(previous));
            c.insert("current".into(), Value::Object(current));
            Decision { context: c, reset: false }
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haversine_matches_known_distances() {
        // Paris – London is about 344 km.
        let d = haversine_km(48.8566, 2.3522, 51.5074, -0.1278);
        assert!((d - 343.5).abs() < 1.0, "{d}");
        assert_eq!(haversine_km(10.0, 10.0, 10.0, 10.0), 0.0);
    }
}
